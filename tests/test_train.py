"""The training loop: learning, exact resume (in-process and after SIGTERM), run-directory safety."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from hybrids.config import get_config
from hybrids.train import DivergedError, RunDirectoryError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  train(get_config(TINY), workdir, progress=False)
  return workdir


def test_run_directory_contract(uninterrupted):
  files = set(os.listdir(uninterrupted))
  assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints", "tb"} <= files
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(uninterrupted, "tb")))
  s = summary(uninterrupted)
  assert s["status"] == "done" and s["step"] == 12 and s["tokens"] == 12 * 4 * 32
  assert s["params"] > s["non_embedding_params"] > 0
  assert s["tokens_per_sec"] > 0 and s["eval"]["step"] == 12
  assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= set(s["versions"])
  assert s["impl"] == {"attention": "xla", "scan": "xla", "gla": "xla", "delta": "xla", "dplr": "xla",
                       "forgetting_attention": "xla"}  # "auto" on CPU
  # Griffin's calls, each recorded at its own shapes with what ran and why the others did not
  assert {c["family"] for c in s["kernels_per_call"]} == {"scan", "attention"}
  for call in s["kernels_per_call"]:
    assert call["call"].startswith(("a=", "q=")) and call["impl"] == s["impl"][call["family"]]
    assert call["rejected"] and "reference" in call["rejected"]
  assert s["compile"]["xla_options"] == {}  # no XLA options on CPU
  assert s["replicated_params"] == []  # one device: no mesh axis to split on, nothing left whole
  # TINY's 3 layers are one Griffin period: asked to scan, the stack runs unrolled, and says so.
  assert s["compile"]["scan_layers"] is False and s["compile"]["scan_layers_requested"] is True
  assert "repeats 1× in 3 layers" in s["compile"]["scan_layers_fallback"]
  assert "flops_error" not in s and s["train_flops"] > 0
  assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints"))) == ["12", "4", "8"]


def test_loss_decreases_on_mqar(tmp_path):
  config = get_config(TINY, {"train.steps": 60, "train.lr": 1e-2, "train.warmup_steps": 5, "train.eval_every": 0,
                             "train.checkpoint_every": 60})
  train(config, str(tmp_path), progress=False)
  losses = [l for _, l in train_losses(str(tmp_path))[0]]
  assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_resume_is_bit_identical(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  first = train(get_config(TINY), workdir, stop_after_steps=5, progress=False)
  assert first["status"] == "interrupted" and first["step"] == 5
  assert "5" in os.listdir(os.path.join(workdir, "checkpoints"))
  second = train(get_config(TINY), workdir, progress=False)
  assert second["status"] == "done"
  assert train_losses(workdir) == train_losses(uninterrupted)  # floats compared exactly


def test_sigterm_then_rerun_resumes_exactly(tmp_path):
  overrides = {"train.steps": 400, "train.checkpoint_every": 1000, "train.eval_every": 0}
  reference = str(tmp_path / "reference")
  train(get_config(TINY, overrides), reference, progress=False)

  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "hybrids.train", "--config", TINY, "--workdir", workdir,
         "--config.train.steps=400", "--config.train.checkpoint_every=1000", "--config.train.eval_every=0"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 20:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out
  stopped = summary(workdir)
  assert stopped["status"] == "interrupted" and 20 <= stopped["step"] < 400
  assert str(stopped["step"]) in os.listdir(os.path.join(workdir, "checkpoints"))

  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert summary(workdir)["status"] == "done"
  assert train_losses(workdir) == train_losses(reference)


def test_different_config_refuses_to_resume(uninterrupted):
  before = open(os.path.join(uninterrupted, "config.json")).read()
  with pytest.raises(RunDirectoryError, match=r"(?s)different config.*model.window: 8 \(on disk\) != 4"):
    train(get_config(TINY, {"model.window": 4}), uninterrupted, progress=False)
  assert open(os.path.join(uninterrupted, "config.json")).read() == before


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = get_config(TINY, {"train.lr": 1e30, "train.grad_clip": 1e30, "train.checkpoint_every": 2})
  with pytest.raises(DivergedError, match="non-finite loss at step 3"):
    train(config, str(tmp_path), progress=False)
  assert summary(str(tmp_path))["status"] == "diverged"
  assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["2"]


def test_corrupt_latest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(uninterrupted, workdir)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "12", "params")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with pytest.warns(UserWarning, match="resumed from step 8"):
    s = train(get_config(TINY), workdir, progress=False)
  assert s["status"] == "done"
  assert train_losses(workdir) == train_losses(uninterrupted)


def test_one_mixer_per_kernel_family_trains_in_one_hybrid_stack_with_moe(tmp_path):
  # Every mixer alone trains through the same train step in test_learning.py; compiling all 17 in one
  # stack here cost two minutes of CI, so one mixer of each kernel family (scan, gla, delta, long
  # convolution, window attention) shares a stack with MoE.
  pattern = ("rglru", "mamba2", "gated_deltanet", "hyena", "swa")
  config = get_config(TINY, {"model.pattern": pattern, "model.n_layers": len(pattern), "train.steps": 3,
                             "train.eval_every": 0, "train.checkpoint_every": 3, "model.moe_every": 2,
                             "model.num_experts": 4})
  s = train(config, str(tmp_path), progress=False)
  assert s["status"] == "done" and math.isfinite(s["train_loss"])
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    assert all(math.isfinite(json.loads(line)["moe_balance"]) for line in f if '"loss"' in line)


def test_swax_stochastic_windows_are_drawn_per_step_and_resume_exactly(tmp_path):
  overrides = {"train.window_choices": (2, 8), "train.window_anneal_steps": 3}
  full = str(tmp_path / "full")
  train(get_config(TINY, overrides), full, progress=False)
  with open(os.path.join(full, "metrics.jsonl")) as f:
    windows = [json.loads(l)["window"] for l in f if '"window"' in l]
  assert len(windows) == 12 and set(windows[:9]) == {2, 8} and windows[9:] == [8, 8, 8]
  resumed = str(tmp_path / "resumed")
  train(get_config(TINY, overrides), resumed, stop_after_steps=4, progress=False)
  train(get_config(TINY, overrides), resumed, progress=False)
  assert train_losses(resumed) == train_losses(full)


def test_window_override_equals_a_model_built_with_that_window():
  import jax
  from flax import nnx
  from hybrids.model import HybridLM
  from hybrids.train import resolve
  config = resolve(get_config(TINY))
  tokens = jax.numpy.arange(2 * 32).reshape(2, 32) % 64
  model = HybridLM(config.model, rngs=nnx.Rngs(params=0))
  model.set_window(3)
  config.model.window = 3
  reference = HybridLM(config.model, rngs=nnx.Rngs(params=0))
  assert float(jax.numpy.max(jax.numpy.abs(model(tokens) - reference(tokens)))) == 0.0


def test_weight_decay_skips_dynamics_and_norm_scales():
  from flax import nnx

  from hybrids.model import HybridLM
  from hybrids.train import decay_mask
  config = get_config(TINY, {"model.pattern": ("mamba", "s4d", "swa")})
  config.model.vocab_size = 64
  model = nnx.eval_shape(lambda: HybridLM(config.model, rngs=nnx.Rngs(params=0)))
  mask = decay_mask(nnx.to_pure_dict(nnx.state(model)))
  assert mask["blocks"][0]["mixer"]["in_proj"]["kernel"] is True
  assert mask["blocks"][0]["mixer"]["a_log"] is False  # Mamba's A: [d_inner, d_state]
  assert mask["blocks"][1]["mixer"]["log_neg_a_real"] is False
  assert mask["embed"]["embedding"] is True


def test_step_compiler_options_turn_triton_gemms_off_on_gpu_only(monkeypatch):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from hybrids.train import step_compiler_options

  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert step_compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}
  assert step_compiler_options("cpu") is None and step_compiler_options("tpu") is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")  # the user's flag wins
  assert step_compiler_options("gpu") is None
  # The option is one XLA accepts (a typo in its name would fail here, not on the first GPU run).
  f = jax.jit(lambda x: x @ x, compiler_options={"xla_gpu_enable_triton_gemm": False})
  np.testing.assert_allclose(f(jnp.eye(3)), jnp.eye(3))


def test_compilation_cache_is_written_then_reused(tmp_path):
  """A second run of the same config loads every compiled step from the cache (no new entries)."""
  cache = tmp_path / "cache"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

  def run(name):
    cmd = [sys.executable, "-m", "hybrids.train", "--config", TINY, "--workdir", str(tmp_path / name),
           "--config.train.steps=4", f"--config.runtime.compilation_cache_dir={cache}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sorted(os.listdir(cache)), summary(str(tmp_path / name))

  first, first_summary = run("a")
  assert first and first_summary["compile"]["cache_dir"] == str(cache)
  second, second_summary = run("b")
  assert second == first
  assert second_summary["train_loss"] == first_summary["train_loss"]


def test_threefry_kernel_is_scoped_and_changes_no_bits():
  import jax
  import jax.numpy as jnp

  from hybrids.train import threefry_kernel

  draw = lambda: jax.jit(lambda: jax.random.normal(jax.random.key(3), (5, 7)))()
  before = jax.config.jax_threefry_gpu_kernel_lowering
  with threefry_kernel(True):
    assert jax.config.jax_threefry_gpu_kernel_lowering is True
    inside = draw()
  assert jax.config.jax_threefry_gpu_kernel_lowering == before
  with pytest.raises(RuntimeError), threefry_kernel(True):
    raise RuntimeError("the flag is restored on errors too")
  assert jax.config.jax_threefry_gpu_kernel_lowering == before
  assert bool(jnp.array_equal(inside, draw()))  # the same bits (on the GPU: .data check, BENCHMARKS)


@pytest.mark.parametrize("field, value, says", [
    ("gla_impl", "pallas", "model.gla_impl='pallas': Pallas kernels need a GPU or TPU"),
    ("scan_impl", "pallas", "model.scan_impl='pallas': Pallas kernels need a GPU or TPU"),
    ("attention_impl", "cudnn", "model.attention_impl='cudnn': window_attention: impl='cudnn' needs an NVIDIA GPU"),
])
def test_a_kernel_this_platform_cannot_run_is_refused_before_anything_is_written(tmp_path, field, value, says):
  """On the CPU the tests run on: one line naming the field, no run directory (nothing compiled)."""
  from hybrids.config import ConfigError
  config = get_config(TINY, {f"model.{field}": value})
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=re.escape(says)):
    train(config, str(workdir), progress=False)
  assert not workdir.exists()


def test_scans_layers_is_what_the_forward_does():
  from flax import nnx
  from hybrids.model import HybridLM
  from hybrids.train import resolve

  def model(n_layers):
    config = resolve(get_config(TINY, {"model.n_layers": n_layers}))
    return nnx.eval_shape(lambda: HybridLM(config.model, rngs=nnx.Rngs(params=0)))

  one_period, two_periods = model(3), model(7)  # (rglru, rglru, swa) once; twice + 1 layer after
  assert not one_period.scans_layers(True) and "a scan needs 2" in one_period.scan_fallback()
  assert two_periods.scans_layers(True) and two_periods.scan_fallback() is None
  assert not two_periods.scans_layers(False)


def test_failed_flop_accounting_is_recorded_in_the_summary(tmp_path, monkeypatch):
  from hybrids import flops as flops_lib

  def broken(*args, **kwargs):
    raise NotImplementedError("mixer 'rglru' has no flops()")

  monkeypatch.setattr(flops_lib, "summary_fields", broken)
  config = get_config(TINY, {"train.steps": 3, "train.eval_every": 0, "train.checkpoint_every": 3})
  with pytest.warns(UserWarning, match="FLOP accounting failed"):
    s = train(config, str(tmp_path), progress=False)
  assert s["status"] == "done" and "train_flops" not in s
  assert summary(str(tmp_path))["flops_error"] == "NotImplementedError: mixer 'rglru' has no flops()"


def test_unparsable_checksums_since_leaves_a_step_without_checksums_untrusted(uninterrupted, tmp_path):
  """A missing checksums_since.json is an older run (test_integrity); an unparsable one trusts no step
  that lacks its checksums.json: it is set aside and recorded, as a corrupt one is."""
  import shutil

  from hybrids import evaluate
  from hybrids import train as train_lib

  workdir = str(tmp_path / "copy")
  shutil.copytree(uninterrupted, workdir)
  since = os.path.join(workdir, train_lib.CHECKSUMS_SINCE_FILE)
  open(since, "w").write('{"step": ')
  os.remove(os.path.join(workdir, "checkpoints", "12", train_lib.CHECKSUM_FILE))
  config = evaluate.load_config(workdir)
  with pytest.warns(UserWarning, match=r"resumed from step 8;.*step 12: checksums_since.json is unreadable "
                                       r"\(JSONDecodeError.*no checksums.json"):
    step, _, _, _ = evaluate.restore_params(workdir, config)
  assert step == 8  # step 8 carries its own checksums: verified without the since file
  (moved,) = summary(workdir)["corrupt_checkpoints"]
  assert moved["step"] == 12 and "checksums_since.json is unreadable" in moved["reason"]
  assert open(since).read() == '{"step": '  # left as found

  for step in ("4", "8"):  # no step left with checksums: all kept, and refused
    os.remove(os.path.join(workdir, "checkpoints", step, train_lib.CHECKSUM_FILE))
  with pytest.raises(evaluate.EvalError, match=r"(?s)could be read and verified.*step 8: checksums_since.json"):
    evaluate.restore_params(workdir, config)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_bench_step_times_the_loop_piece_by_piece(tmp_path, capsys):
  """``python -m hybrids.bench_step``: the loops of its docstring on the config's own step and
  pipeline (row 5: two runs vmapped into one step), rows in the JSON; a misspelt field or a group of one
  is one error line, exit status 2, before anything runs."""
  from hybrids import bench_step

  path, spec = tmp_path / "step.json", os.path.join(REPO, "experiments", "zoology_mqar.py:tiny")
  assert bench_step.main(["bench_step", "--config", spec, "--steps", "2",
                          "--json", str(path), "--config.train.log_every=2", "--lr-group", "2"]) == 0
  report = json.loads(path.read_text())
  assert [r["loop"][:2] for r in report["rows"]] == ["1.", "2.", "3.", "4.", "5."]
  assert report["rows"][4]["lr_group"] == 2
  assert "fetched every 2 steps" in report["rows"][3]["loop"]
  assert all(r["ms_per_step"] > 0 and r["tokens_per_sec"] > 0 for r in report["rows"])
  assert report["overrides"] == {"train.log_every": "2"}
  capsys.readouterr()
  assert bench_step.main(["bench_step", "--config", spec, "--config.train.stepz=3"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "train.stepz" in err
  with pytest.raises(SystemExit) as exit_info:
    bench_step.main(["bench_step", "--config", spec, "--lr-group", "1"])
  assert exit_info.value.code == 2 and "--lr-group" in capsys.readouterr().err


def test_a_data_pipeline_that_fails_leaves_the_run_as_it_was(uninterrupted, tmp_path, monkeypatch):
  """The batches are set up before the run's files are touched: a pipeline that fails on resume leaves
  summary.json and metrics.jsonl as they were (the run stays "interrupted", resumable)."""
  from hybrids import data as data_lib

  workdir = str(tmp_path / "run")
  train(get_config(TINY), workdir, stop_after_steps=5, progress=False)
  files = lambda: [open(os.path.join(workdir, f), "rb").read() for f in ("summary.json", "metrics.jsonl")]
  before = files()

  def broken(*args, **kwargs):
    raise OSError("corpus unreadable")
  monkeypatch.setattr(data_lib, "train_dataset", broken)
  with pytest.raises(OSError, match="corpus unreadable"):
    train(get_config(TINY), workdir, progress=False)
  assert files() == before and summary(workdir)["status"] == "interrupted"


def test_the_chunked_loss_is_the_whole_batch_loss():
  """``runtime.loss_chunk_tokens``: the head and loss a few positions at a time give the loss, every
  gradient, the step's metrics and the eval sums of the whole batch at once (up to the order of the sums),
  alone and in a lockstep group; at any length and chunk (padded where no divisor of the length is near the
  chunk; one chunk) the sums and their gradients are :func:`lm_loss`'s; -1 chunks only where the batch's
  logits would be large, never MQAR's few scored positions nor a mesh of several devices; a bad value is
  one line."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from hybrids import config as config_lib
  from hybrids import sharding as sharding_lib
  from hybrids.train import LOSS_CHUNK_BYTES, build, group_steps, loss_chunk_tokens

  spec = "experiments/quickstart.py:tiny"
  setups = []
  for chunk in (0, 12):
    config = config_lib.resolve(get_config(spec, {"runtime.loss_chunk_tokens": chunk, "train.warmup_steps": 0}))
    setup = build(config, sharding_lib.make_mesh(sharding_lib.mesh_config_of(config), batch_size=config.train.batch_size))
    # every position scored, as in language modelling (the tiny config is MQAR, scored at a few)
    setup.trainer = dataclasses.replace(setup.trainer, label_slots=0, eval_label_slots=0)
    setups.append(setup)
  assert [s.trainer.loss_chunk for s in setups] == [0, 12]
  batch_size, time, vocab = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  rng = np.random.default_rng(0)
  labels = np.where(rng.random((batch_size, time)) < 0.8, rng.integers(0, vocab, (batch_size, time)), -100)
  batch = {"inputs": jnp.asarray(rng.integers(0, vocab, (batch_size, time)), jnp.int32),
           "labels": jnp.asarray(labels, jnp.int32)}
  def close(a, b, rtol):  # each leaf within rtol of its largest value (small entries carry the sums' rounding)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      assert np.max(np.abs(x - y), initial=0.0) <= rtol * max(np.max(np.abs(x), initial=0.0), 1e-12), (x, y)
  grads = [jax.grad(lambda p, s=s: s.trainer._loss(p, batch, None)[0])(s.params) for s in setups]
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[0])) > 0
  close(grads[0], grads[1], 1e-5)
  # the step's metrics; its update is the optimizer's function of the gradients compared above (Adam's first
  # step, ~lr · sign(g), turns the sums' rounding of a gradient entry near its ε into any difference)
  (_, _, metrics_a), (_, _, metrics_b) = (jax.jit(s.trainer.train_step)(s.params, s.opt_state, batch) for s in setups)
  close(metrics_a, metrics_b, 1e-6)
  sums = [s.trainer.eval_step(s.params, batch) for s in setups]
  np.testing.assert_allclose(float(sums[1][0]), float(sums[0][0]), rtol=1e-6)
  assert [int(x) for x in sums[1][1:]] == [int(x) for x in sums[0][1:]] and int(sums[0][2]) == int((labels != -100).sum())
  # a lockstep group of two learning rates, as the survey pilot trains
  lrs, live = jnp.asarray([1e-3, 3e-3]), jnp.asarray([True, True])
  stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)
  grouped = [group_steps(s.trainer, config)[0](stack(s.params), stack(s.opt_state), batch, lrs, live, None) for s in setups]
  close(grouped[0][2], grouped[1][2], 1e-6)  # each member's loss, accuracy and gradient norm

  from hybrids.train import chunked_lm_loss, lm_loss
  keys = jax.random.split(jax.random.key(1), 3)
  hidden, weight = jax.random.normal(keys[0], (2, 31, 8)), jax.random.normal(keys[1], (8, 40))
  token_labels = jnp.where(jax.random.uniform(keys[2], (2, 31)) < 0.7, jnp.arange(62).reshape(2, 31) % 40, -100)
  whole = lambda h, w: lm_loss(h @ w, token_labels)
  for chunk in (6, 8, 62, 1000):  # rows 3 and 4 (31 is prime: padded), 31 and more (one chunk)
    parts = lambda h, w: chunked_lm_loss(lambda x: x @ w, h, token_labels, chunk)
    close(parts(hidden, weight), whole(hidden, weight), 1e-6)
    close(jax.grad(lambda h, w: parts(h, w)[0], argnums=(0, 1))(hidden, weight),
          jax.grad(lambda h, w: whole(h, w)[0], argnums=(0, 1))(hidden, weight), 1e-5)

  resolved = lambda **over: config_lib.resolve(get_config(spec, {"runtime.loss_chunk_tokens": -1, **over}))
  assert loss_chunk_tokens(resolved()) == 0  # MQAR: a few scored positions a row
  text = {"data.name": "text", "data.files": __file__, "data.tokenizer": "bytes"}
  assert loss_chunk_tokens(resolved(**text)) == 0  # small logits: all at once
  big = resolved(**text, **{"train.batch_size": 4096})
  assert loss_chunk_tokens(big) == LOSS_CHUNK_BYTES // (4 * big.model.vocab_size)
  assert loss_chunk_tokens(big, devices=8) == 0  # several devices: the head's gradient would be reduced per chunk
  with pytest.raises(config_lib.ConfigError, match="runtime.loss_chunk_tokens=-2 must be an int ≥ -1"):
    config_lib.resolve(get_config(spec, {"runtime.loss_chunk_tokens": -2}))
