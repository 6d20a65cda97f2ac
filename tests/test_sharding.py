"""Sharding: partition rules for every mixer, mesh checks, SLURM/TPU env parsing; on 8 fake CPU
devices in one subprocess, sharded steps equal the single-device step and checkpoints move meshes;
two CPU processes (jax.distributed over gloo) train like one.

    PYTHONPATH=. python -m pytest -q -n 0 tests/test_sharding.py

The 8-device part runs ``python tests/test_sharding.py OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (pytest workers already hold a 1-device jax).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"
# data=8 and data=2 × fsdp=4 are covered by the resume check (its halves train on them).
MESHES = {"data2_fsdp2_tensor2": (2, 2, 2)}
STEPS = 4
# One SWA layer and its MLP: every rule kind (fsdp, column/row tensor, embedding) at the least compile
# time — 8 virtual devices share the CI's 2 cores. Rules for every mixer are checked abstractly above.
# Cheaper LLVM codegen for XLA:CPU: compiles dominate these tests; every run compared uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
EIGHT_DEVICE_OVERRIDES = {"model.pattern": ("swa",), "model.n_layers": 1, "train.batch_size": 8,
                          "train.steps": STEPS, "train.checkpoint_every": STEPS // 2, "train.eval_every": 0,
                          "train.log_every": 1}


def _mesh_overrides(data, fsdp, tensor):
  return {"runtime.mesh.data": data, "runtime.mesh.fsdp": fsdp, "runtime.mesh.tensor": tensor}


# ----------------------------------------------------------------------------- partition rules (no devices)

def _abstract_params(overrides):
  from flax import nnx

  from hybrids.config import get_config
  from hybrids.model import HybridLM, layer_pattern
  from hybrids.train import resolve
  config = resolve(get_config(TINY, overrides))
  model = nnx.eval_shape(lambda: HybridLM(config.model, rngs=nnx.Rngs(params=0)))
  return nnx.to_pure_dict(nnx.state(model)), layer_pattern(config.model), config


def _check_valid(params, specs, axis_sizes):
  import jax
  from jax.sharding import PartitionSpec
  leaves = jax.tree_util.tree_leaves_with_path(params)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
  assert len(leaves) == len(spec_leaves)
  for (path, x), spec in zip(leaves, spec_leaves):
    where = jax.tree_util.keystr(path)
    assert len(spec) <= x.ndim, where
    used = [axis for axis in spec if axis is not None]
    assert len(used) == len(set(used)), where
    for dim, axis in enumerate(spec):
      if axis is not None:
        assert x.shape[dim] % axis_sizes[axis] == 0, (where, x.shape, spec)
    if x.ndim < 2:
      assert spec == PartitionSpec(), where
      continue
    tensor_dims = [d for d, axis in enumerate(spec) if axis == "tensor"]
    # Every matrix is split over fsdp when any dimension tensor left free is divisible.
    can_fsdp = any(n % axis_sizes["fsdp"] == 0 for d, n in enumerate(x.shape) if d not in tensor_dims)
    assert ("fsdp" in used) == can_fsdp, (where, x.shape, spec)


def _check_replicated_listed(params, layers, even_specs, odd_specs, listed):
  """``listed`` (at fsdp=3, tensor=5) names exactly the matrices left whole on an axis their rule uses:
  fsdp for every matrix without "fsdp" in its spec, tensor for those split over tensor at size 2 but not 5."""
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec
  is_spec = lambda s: isinstance(s, PartitionSpec)
  expected = []
  for (path, x), even, odd in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree.leaves(even_specs, is_leaf=is_spec), jax.tree.leaves(odd_specs, is_leaf=is_spec)):
    if x.ndim < 2:
      continue
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    row = (name, tuple(x.shape), int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize)
    if "tensor" in even and "tensor" not in odd:
      expected.append((*row, "tensor", 5))
    if "fsdp" not in odd:
      expected.append((*row, "fsdp", 3))
  got = [(r.name, r.shape, r.bytes, r.axis, r.axis_size) for r in listed]
  assert sorted(got) == sorted(expected)
  assert any(axis == "tensor" for *_, axis, _ in got) and any(axis == "fsdp" for *_, axis, _ in got)


def test_matrices_left_whole_are_listed_and_warned_once():
  import dataclasses
  import warnings

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec

  from hybrids import sharding
  width = 3 * 4 + 2  # divisible by 2, not by 4
  matrix = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  params = {"blocks": {0: {"mixer": {"q_proj": {"kernel": matrix(64, width)}, "o_proj": {"kernel": matrix(width, 64)}},
                           "mlp": {"up": {"kernel": matrix(64, 128)}, "down": {"kernel": matrix(128, 64)}},
                           "mlp_norm": {"scale": matrix(width)}}},
            "embed": {"embedding": matrix(width, width, dtype=jnp.bfloat16)}}
  axis_sizes = {"data": 1, "fsdp": 4, "tensor": 4}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    specs = sharding.param_specs(params, axis_sizes, ("swa",))
  assert len(caught) == 1
  message = str(caught[0].message)
  bf16_bytes = jnp.dtype(jnp.bfloat16).itemsize
  assert f"2 parameter(s), {2 * 64 * width * 4:,} bytes, not split over runtime.mesh.tensor=4" in message
  assert f"1 parameter(s), {width * width * bf16_bytes:,} bytes, not split over runtime.mesh.fsdp=4" in message
  assert "blocks/0/mixer/q_proj/kernel" in message and "embed/embedding" in message
  # The q/o projections still get fsdp on their other dimension; the embedding stays whole.
  assert specs["blocks"][0]["mixer"]["q_proj"]["kernel"] == PartitionSpec("fsdp")
  assert specs["embed"]["embedding"] == PartitionSpec()
  listed = sharding.replicated_params(params, axis_sizes, ("swa",))
  assert sorted((r.name, r.axis) for r in listed) == [("blocks/0/mixer/o_proj/kernel", "tensor"),
                                                       ("blocks/0/mixer/q_proj/kernel", "tensor"),
                                                       ("embed/embedding", "fsdp")]
  assert dataclasses.asdict(listed[-1]) == {"name": "embed/embedding", "shape": (width, width),
                                           "bytes": width * width * bf16_bytes, "axis": "fsdp", "axis_size": 4}
  # Sizes that divide everything: nothing listed, nothing said.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sharding.param_specs(params, {"data": 1, "fsdp": 2, "tensor": 2}, ("swa",))
  assert caught == [] and sharding.replicated_params(params, {"data": 1, "fsdp": 2, "tensor": 2}, ("swa",)) == []


@pytest.mark.parametrize("pattern", ["every_mixer", "parallel_moe_untied", "sequential_no_mlp"])
def test_every_parameter_of_every_mixer_gets_a_valid_spec(pattern):
  import jax
  from jax.sharding import PartitionSpec

  from hybrids import sharding
  from hybrids.mixers import MIXERS
  if pattern == "every_mixer":
    names = tuple(sorted(MIXERS))
    overrides = {"model.pattern": names, "model.n_layers": len(names)}
  elif pattern == "sequential_no_mlp":  # Zoology's settings: no MLP sublayer, LayerNorm, learned positions
    overrides = {"model.pattern": ("baseconv>attention", "mamba2>swa"), "model.mlp_expansion": 0.0,
                 "model.norm": "layer", "model.position": "learned"}
  else:
    overrides = {"model.pattern": ("swa|mamba2", "attention"), "model.moe_every": 2, "model.num_experts": 4,
                 "model.tie_embeddings": False, "model.parallel_merge": "gate"}
  params, layers, _ = _abstract_params(overrides)
  axis_sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  specs = sharding.param_specs(params, axis_sizes, layers)
  _check_valid(params, specs, axis_sizes)
  # fsdp 3 divides almost nothing: specs stay valid by leaving such dimensions whole, and say so.
  odd_sizes = {"data": 1, "fsdp": 3, "tensor": 5}
  with pytest.warns(UserWarning, match=r"not split over runtime.mesh.fsdp=3") as caught:
    odd_specs = sharding.param_specs(params, odd_sizes, layers)
  assert len([w for w in caught if "sharding:" in str(w.message)]) == 1  # one summary per call
  _check_valid(params, odd_specs, odd_sizes)
  _check_replicated_listed(params, layers, specs, odd_specs, sharding.replicated_params(params, odd_sizes, layers))
  assert sharding.replicated_params(params, axis_sizes, layers) == []  # every wanted split happened at 4 × 2
  assert specs["embed"]["embedding"] == PartitionSpec("fsdp")  # [vocab, d_model]: over the vocabulary
  for i, name in enumerate(layers):
    block = specs["blocks"][i]
    if pattern == "sequential_no_mlp":
      assert "mlp" not in block and "mlp_norm" not in block
      continue
    assert block["mlp_norm"]["scale"] == PartitionSpec()
    if pattern == "every_mixer":
      assert block["mlp"]["up"]["kernel"] == PartitionSpec("fsdp", "tensor")
      assert block["mlp"]["down"]["kernel"] == PartitionSpec("tensor", "fsdp")
      if name in sharding.TENSOR_MIXERS:
        assert block["mixer"]["q_proj"]["kernel"] == PartitionSpec("fsdp", "tensor")
        assert block["mixer"]["o_proj"]["kernel"] == PartitionSpec("tensor", "fsdp")
      else:
        assert all("tensor" not in s for s in jax.tree.leaves(block["mixer"], is_leaf=lambda s: isinstance(s, PartitionSpec)))
  if pattern == "sequential_no_mlp":
    first, second = specs["blocks"][0]["mixer"]["parts"], specs["blocks"][1]["mixer"]["parts"]
    assert first[1]["q_proj"]["kernel"] == PartitionSpec("fsdp", "tensor")  # attention after baseconv
    assert first[1]["o_proj"]["kernel"] == PartitionSpec("tensor", "fsdp")
    assert first[0]["in_proj"]["kernel"] == PartitionSpec("fsdp")  # baseconv: not a tensor-parallel mixer
    assert second[1]["k_proj"]["kernel"] == PartitionSpec("fsdp", "tensor")  # swa after mamba2
    assert "tensor" not in second[0]["in_proj"]["kernel"]
    assert specs["position_embed"]["embedding"] == PartitionSpec("fsdp")  # [max_len, d_model], as the token table
  if pattern == "parallel_moe_untied":
    swa_part = specs["blocks"][0]["mixer"]["parts"][0]
    assert swa_part["k_proj"]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert "tensor" not in specs["blocks"][0]["mixer"]["parts"][1]["in_proj"]["kernel"]  # mamba2
    assert specs["blocks"][0]["mixer"]["gate"]["kernel"] == PartitionSpec("fsdp")  # the merge gate: fsdp only
    assert specs["blocks"][1]["mlp"]["w_up"] == PartitionSpec(None, "fsdp", "tensor")  # MoE [experts, d, hidden]
    assert specs["blocks"][1]["mlp"]["w_down"] == PartitionSpec(None, "tensor", "fsdp")
    assert specs["head"]["kernel"] == PartitionSpec(None, "fsdp")  # untied head [d_model, vocab]


def test_optimizer_moments_follow_their_parameters():
  import jax
  from jax.sharding import Mesh, PartitionSpec

  from hybrids import sharding
  from hybrids.train import make_optimizer
  import numpy as np
  params, layers, config = _abstract_params({})
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
  # Specs are computed for fsdp=4 and placed on a 1-device mesh: only the bookkeeping is under test.
  specs = sharding.param_specs(params, {"fsdp": 4, "tensor": 1}, layers)
  params_sharding = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                                 is_leaf=lambda s: isinstance(s, PartitionSpec))
  opt_state = jax.eval_shape(make_optimizer(config.train).init, params)
  opt_sharding = sharding.follow_params_shardings(opt_state, params, params_sharding, mesh)
  by_path = {sharding._names(p)[-5:]: s.spec for p, s in jax.tree_util.tree_leaves_with_path(opt_sharding)}
  assert by_path[("mu", "blocks", 0, "mlp", "up", "kernel")[-5:]] == specs["blocks"][0]["mlp"]["up"]["kernel"] != PartitionSpec()
  leaves = jax.tree_util.tree_leaves_with_path(opt_sharding)
  counts = [s for p, s in leaves if sharding._names(p)[-1] == "count"]
  assert counts and all(s.spec == PartitionSpec() for s in counts)
  moments = [s for p, s in leaves if "nu" in sharding._names(p)]
  assert len(moments) == len(jax.tree.leaves(params))


# ----------------------------------------------------------------------------- mesh checks

def test_mesh_shape_resolves_and_names_the_field():
  from hybrids.config import ConfigError
  from hybrids.sharding import mesh_shape
  assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh_shape({"data": 2, "fsdp": 1, "tensor": 1}, 8) == {"data": 2, "fsdp": 1, "tensor": 1}  # part of a host
  with pytest.raises(ConfigError, match=r"runtime.mesh .*fsdp=3.*does not divide the 8 devices"):
    mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ConfigError, match=r"needs 2 devices but there are 8 over 2 processes"):
    mesh_shape({"data": 2, "fsdp": 1, "tensor": 1}, 8, process_count=2)
  with pytest.raises(ConfigError, match=r"data × fsdp = 1 must be a multiple of the 2 processes"):
    mesh_shape({"data": 1, "fsdp": 1, "tensor": -1}, 2, process_count=2)
  with pytest.raises(ConfigError, match=r"needs 16 devices but there are 8; set runtime.mesh.data=-1"):
    mesh_shape({"data": 4, "fsdp": 4, "tensor": 1}, 8)
  with pytest.raises(ConfigError, match=r"train.batch_size=4 is not divisible by runtime.mesh.data × runtime.mesh.fsdp = 4 × 2"):
    mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8, batch_size=4)
  with pytest.raises(ConfigError, match=r"only one axis may be -1"):
    mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ConfigError, match=r"runtime.mesh.tensor=0 must be a positive integer or -1"):
    mesh_shape({"data": -1, "fsdp": 1, "tensor": 0}, 8)


@pytest.mark.parametrize("overrides,message", [
    (_mesh_overrides(2, 1, 1), r"runtime.mesh \(data=2 × fsdp=1 × tensor=1\) needs 2 devices but there are 1"),
    (_mesh_overrides(-1, 0, 1), r"runtime.mesh.fsdp=0 must be a positive integer or -1"),
    (_mesh_overrides(1, 3, 1), r"train.batch_size=4 is not divisible by runtime.mesh.data × runtime.mesh.fsdp = 3"),
])
def test_bad_mesh_is_rejected_before_anything_is_written(tmp_path, overrides, message):
  from hybrids.config import ConfigError, get_config
  from hybrids.train import train
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    train(get_config(TINY, overrides), str(workdir), progress=False)
  assert not workdir.exists()


def test_runtime_is_not_part_of_the_run_identity(tmp_path):
  from hybrids.config import get_config
  from hybrids.train import RunDirectoryError, prepare_workdir, resolve
  workdir = str(tmp_path)
  prepare_workdir(resolve(get_config(TINY, _mesh_overrides(-1, 1, 1))), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert "runtime" not in json.load(f)
  prepare_workdir(resolve(get_config(TINY, _mesh_overrides(1, 1, 1))), workdir)  # another mesh: same run
  with open(os.path.join(workdir, "config.json"), "w") as f:  # written by a tool that kept the section
    json.dump(json.loads(resolve(get_config(TINY, _mesh_overrides(2, 1, 1))).to_json_best_effort()), f)
  prepare_workdir(resolve(get_config(TINY)), workdir)
  with pytest.raises(RunDirectoryError, match="train.lr"):
    prepare_workdir(resolve(get_config(TINY, {"train.lr": 0.5})), workdir)


# ----------------------------------------------------------------------------- multi-process environment

def test_expand_slurm_nodelist():
  from hybrids.sharding import expand_nodelist
  assert expand_nodelist("node[01-03],other") == ["node01", "node02", "node03", "other"]
  assert expand_nodelist("gpu-a100-[7,9-10]") == ["gpu-a100-7", "gpu-a100-9", "gpu-a100-10"]
  assert expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
  assert expand_nodelist("solo") == ["solo"]
  assert expand_nodelist("a[098-101],b[1],c") == ["a098", "a099", "a100", "a101", "b1", "c"]
  with pytest.raises(ValueError, match="unbalanced"):
    expand_nodelist("node[01-03")


def test_distributed_plan_from_the_environment():
  from hybrids.config import ConfigError
  from hybrids.sharding import DistributedPlan, distributed_plan
  assert distributed_plan({}) is None
  assert distributed_plan({"SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"}) is None
  assert distributed_plan({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM

  explicit = distributed_plan({"HYBRIDS_COORDINATOR": "localhost:1234", "HYBRIDS_NUM_PROCESSES": "2",
                               "HYBRIDS_PROCESS_ID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "x[1-2]"})
  assert explicit == DistributedPlan("env", "localhost:1234", 2, 1)  # explicit variables beat SLURM's
  assert explicit.kwargs() == {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
  with pytest.raises(ConfigError, match="HYBRIDS_PROCESS_ID not set"):
    distributed_plan({"HYBRIDS_COORDINATOR": "h:1", "HYBRIDS_NUM_PROCESSES": "2"})
  with pytest.raises(ConfigError, match=r"HYBRIDS_PROCESS_ID=2 must be in \[0, HYBRIDS_NUM_PROCESSES=2\)"):
    distributed_plan({"HYBRIDS_COORDINATOR": "h:1", "HYBRIDS_NUM_PROCESSES": "2", "HYBRIDS_PROCESS_ID": "2"})

  srun = {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_JOB_ID": "123456",
          "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_JOB_NODELIST": "gpu[01-04]",
          "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "1"}
  assert distributed_plan(srun) == DistributedPlan("slurm", "gpu03:23456", 4, 3, (1,))
  # SLURM bound one GPU per task already: the task's only visible device is its own.
  assert distributed_plan({**srun, "CUDA_VISIBLE_DEVICES": "1"}).local_device_ids is None
  sbatch = {"SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "node[01-02]", "HYBRIDS_COORDINATOR_PORT": "9999"}
  assert distributed_plan(sbatch) == DistributedPlan("slurm", "node01:9999", 2, 0)  # no step: the job's list
  with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"):
    distributed_plan({"SLURM_NTASKS": "2"})

  assert distributed_plan({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == DistributedPlan("tpu")
  assert distributed_plan({"MEGASCALE_COORDINATOR_ADDRESS": "c:8080"}) == DistributedPlan("tpu")
  assert distributed_plan({"JOBSET_NAME": "train"}).kwargs() == {}  # jax.distributed.initialize() detects all


# ----------------------------------------------------------------------------- 8 fake devices (subprocess)

@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("eight") / "result.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + FAST_COMPILE,
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def test_sharded_steps_equal_the_single_device_steps(eight_devices):
  import numpy as np
  assert eight_devices["device_count"] == 8
  reference = eight_devices["steps"]["single"]
  for name, shape in MESHES.items():
    result = eight_devices["steps"][name]
    assert result["mesh"] == dict(zip(("data", "fsdp", "tensor"), shape)), name
    assert result["axes_used"] == ["fsdp", "tensor"], name  # the weights really were split
    # f32 with matmul precision 'highest': only the reduction order differs between layouts.
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=2e-6, err_msg=name)
    np.testing.assert_allclose(result["grad_norms"], reference["grad_norms"], rtol=2e-5, err_msg=name)
    assert result["max_param_diff"] <= 1e-5 * reference["max_param"], name


def test_checkpoint_from_one_mesh_resumes_on_another(eight_devices):
  import numpy as np
  resume = eight_devices["resume"]
  assert resume["first"] == {"data": 8, "fsdp": 1, "tensor": 1} and resume["second"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert resume["restored_shardings_match"]  # the checkpoint from data=8 landed in the data=2 × fsdp=4 layout
  assert resume["restored_max_diff"] <= 1e-5 * eight_devices["steps"]["single"]["max_param"]
  assert [s for s, _ in resume["losses"]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in resume["losses"]], eight_devices["steps"]["single"]["losses"], rtol=2e-6)


def test_two_processes_train_like_one(tmp_path, monkeypatch, capsys):
  """``launch.multiprocess_check`` on CPU: 2 processes × 1 device (gloo) vs 1 process, same global batch."""
  from launch import multiprocess_check
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
  code = multiprocess_check.main(["--platform", "cpu", "--steps", "3", "--root", str(tmp_path), "--timeout", "300",
                                  "--", '--config.model.pattern=("swa",)', "--config.model.n_layers=1"])
  out = capsys.readouterr().out
  assert code == 0, out + "".join(open(tmp_path / f).read()[-2000:] for f in os.listdir(tmp_path) if f.endswith(".log"))
  assert "'process_count': 2" in out and "'mesh': {'data': 2, 'fsdp': 1, 'tensor': 1}" in out
  assert [line.split()[0] for line in out.splitlines() if " loss " in f" {line} "] == ["1", "2", "3"]


def _eight_device_checks(out_path: str) -> None:
  """Runs in the subprocess: train steps on several meshes, then a run that changes mesh on resume."""
  import shutil
  import tempfile
  import time

  import jax
  import numpy as np

  jax.config.update("jax_default_matmul_precision", "highest")
  from hybrids import data as data_lib
  from hybrids import sharding
  from hybrids.config import get_config
  from hybrids.train import build, layout, resolve, restore_checkpoint, train

  assert jax.device_count() == 8, jax.devices()
  base = resolve(get_config(TINY, EIGHT_DEVICE_OVERRIDES))
  dataset = data_lib.train_dataset(base.data, seq_len=base.data.seq_len, batch_size=base.train.batch_size,
                                   seed=base.seed)
  batches = [dataset[i] for i in range(STEPS)]
  result = {"device_count": jax.device_count(), "steps": {}}
  params_at_half = None
  start = time.perf_counter()
  for name, shape in {"single": (1, 1, 1), **MESHES}.items():
    mesh = sharding.make_mesh(dict(zip(sharding.AXES, shape)), batch_size=base.train.batch_size)
    setup = build(base, mesh)
    params, opt_state = setup.params, setup.opt_state
    losses, grad_norms = [], []
    for i, batch in enumerate(batches):
      params, opt_state, metrics = setup.train_step(params, opt_state, sharding.shard_batch(batch, setup.batch_sharding), None)
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
      if name == "single" and i == STEPS // 2 - 1:
        params_at_half = jax.device_get(params)
    final = jax.device_get(params)
    if name == "single":
      reference = final
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(reference)))
    print(f"[eight devices] {name}: {time.perf_counter() - start:.1f} s wall, {time.process_time():.1f} s cpu", file=sys.stderr, flush=True)
    axes_used = sorted({a for x in jax.tree.leaves(params) for a in x.sharding.spec if a is not None})
    result["steps"][name] = {"mesh": dict(mesh.shape), "axes_used": axes_used, "losses": losses,
                             "grad_norms": grad_norms, "max_param_diff": diff,
                             "max_param": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(reference))}

  workdir = tempfile.mkdtemp()
  try:
    first, second = _mesh_overrides(8, 1, 1), _mesh_overrides(2, 4, 1)
    stopped = train(get_config(TINY, {**EIGHT_DEVICE_OVERRIDES, **first}), workdir, stop_after_steps=STEPS // 2, progress=False)
    resolved = resolve(get_config(TINY, {**EIGHT_DEVICE_OVERRIDES, **second}))
    target = layout(resolved, sharding.make_mesh(sharding.mesh_config_of(resolved)))  # abstract: no compile
    manager, (step, params, opt_state, _) = restore_checkpoint(workdir, 3, target.params, target.opt_state)
    manager.close()
    same = lambda restored, wanted: all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(wanted)))
    summary = train(get_config(TINY, {**EIGHT_DEVICE_OVERRIDES, **second}), workdir, progress=False)
    print(f"[eight devices] resume: {time.perf_counter() - start:.1f} s wall, {time.process_time():.1f} s cpu", file=sys.stderr, flush=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    result["resume"] = {
        "first": stopped["hardware"]["mesh"], "second": summary["hardware"]["mesh"],
        "restored_step": step,
        "restored_shardings_match": step == STEPS // 2 and same(params, target.params) and same(opt_state, target.opt_state)
                                    and any("fsdp" in a.sharding.spec for a in jax.tree.leaves(params)),
        "restored_max_diff": max(float(np.max(np.abs(np.asarray(a) - b)))
                                 for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_at_half))),
        "losses": [(r["step"], r["loss"]) for r in rows if "loss" in r],
    }
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _eight_device_checks(sys.argv[1])
