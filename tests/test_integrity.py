"""Faults injected into run directories: each ends with nothing lost and a clear message (issue 22).

``FAULTS`` is the tally (35): 5 SIGKILL points around a checkpoint save; 9 corrupted checkpoints (bit
flips in the parameters, in the optimizer state and in all three kept steps; a truncated chunk; a
deleted ``params/``; an edited ``next_index``; an edited or a missing ``checksums.json``; a planted
file); 5 concurrent writers (another thread, another process holding the lock, two trainers started
together, a launcher against a held lock, the stale lock of a SIGKILLed holder); 2 re-runs of a
finished run; 3 divergences (NaN gradient norm with and without a checkpoint, non-finite
parameters); 8 control characters bound for a SLURM job script; 3 attacks on the sweep root's
private directories. A step saved before checksums existed is restored, unverified, with a warning.
"""

import concurrent.futures
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings

import pytest

from hybrids import train as train_lib
from hybrids.config import get_config
from hybrids.train import DivergedError, RunBusyError, RunDirectoryError, train
from launch import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
FAULTS = {"kill points": 5, "corrupted checkpoints": 9, "concurrent writers": 5, "finished re-runs": 2,
          "divergences": 3, "job-script control characters": 8, "private-directory attacks": 3}  # 35


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run: 12 steps, checkpoints 4, 8, 12 (each with its checksums)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train(get_config(TINY), workdir, progress=False)
  return workdir


def copy_of(finished, tmp_path, name="copy"):
  workdir = str(tmp_path / name)
  shutil.copytree(finished, workdir)
  return workdir


def largest_file(directory):
  files = [p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def flip_bits(path, bits=2):
  data = bytearray(open(path, "rb").read())
  for i in range(bits):
    data[len(data) // 2 + 7 * i] ^= 1 << (3 + i)
  open(path, "wb").write(bytes(data))


def test_every_checkpoint_carries_checksums_of_every_file(finished):
  checkpoints = os.path.join(finished, "checkpoints")
  for step in (4, 8, 12):
    step_dir = os.path.join(checkpoints, str(step))
    listed = json.load(open(os.path.join(step_dir, train_lib.CHECKSUM_FILE)))["files"]
    on_disk = {os.path.relpath(p, step_dir) for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
               if os.path.isfile(p)} - {train_lib.CHECKSUM_FILE}
    assert set(listed) == on_disk and "data/metadata" in listed  # the data iterator's state too
    assert any(p.startswith("params/") for p in listed) and any(p.startswith("opt_state/") for p in listed)
    assert train_lib.verify_checksums(checkpoints, step) is None
  assert json.load(open(os.path.join(finished, train_lib.CHECKSUMS_SINCE_FILE))) == {"step": 4}


def test_bit_flips_in_params_are_caught_by_evaluate_then_training_restores_the_checkpoint(finished, tmp_path):
  """The issue's case: 2 flipped bits in the largest parameter file of the newest checkpoint."""
  from hybrids import evaluate

  workdir = copy_of(finished, tmp_path)
  flip_bits(largest_file(os.path.join(workdir, "checkpoints", "12", "params")))
  with pytest.warns(UserWarning, match=r"resumed from step 8;.*step 12: checksum mismatch: params/"):
    assert evaluate.main(["--workdir", workdir, "--eval", "loss"]) == 0
  assert json.load(open(os.path.join(workdir, "eval", "loss.json")))["step"] == 8  # not the corrupt 12
  (moved,) = summary(workdir)["corrupt_checkpoints"]
  assert moved["step"] == 12 and "checksum mismatch" in moved["reason"] and os.path.isdir(moved["moved_to"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]

  # Training again: the summary says done but the final checkpoint is gone, so steps 9-12 are trained
  # again from step 8 — bit-identically — and checkpoint 12 exists again, with its checksums.
  with pytest.warns(UserWarning, match=r"final checkpoint \(step 12\) cannot be used \(it is missing\)"):
    s = train(get_config(TINY), workdir, progress=False)
  assert s["status"] == "done" and s["restored_checkpoint"] == {"step": 8, "verified": True}
  assert metrics(workdir) == metrics(finished)  # every float exactly, every step once
  assert train_lib.verify_checksums(os.path.join(workdir, "checkpoints"), 12) is None
  assert summary(workdir)["corrupt_checkpoints"][0]["step"] == 12  # the record survives the resume


def _corrupt(workdir, how):
  step_dir = os.path.join(workdir, "checkpoints", "12")
  if how == "opt_state_bit_flips":
    flip_bits(largest_file(os.path.join(step_dir, "opt_state")))
  elif how == "truncated_chunk":
    path = largest_file(os.path.join(step_dir, "params"))
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "missing_params":
    shutil.rmtree(os.path.join(step_dir, "params"))
  elif how == "edited_next_index":
    path = os.path.join(step_dir, "data", "metadata")
    text = open(path).read()
    assert '"next_index": 12' in text
    open(path, "w").write(text.replace('"next_index": 12', '"next_index": 4'))
  elif how == "edited_checksums":
    path = os.path.join(step_dir, train_lib.CHECKSUM_FILE)
    record = json.load(open(path))
    name = next(iter(record["files"]))
    record["files"][name]["sha256"] = "0" * 64
    open(path, "w").write(json.dumps(record))
  elif how == "missing_checksums":  # what a SIGKILL between orbax's commit and ours leaves
    os.remove(os.path.join(step_dir, train_lib.CHECKSUM_FILE))
  elif how == "planted_file":
    open(os.path.join(step_dir, "params", "extra.bin"), "wb").write(b"\x00" * 16)


@pytest.mark.parametrize("how, reason", [
    ("opt_state_bit_flips", "checksum mismatch: opt_state/"),
    ("truncated_chunk", r"checksum mismatch: params/\S+: sha256 mismatch \(\d+ bytes, \d+ written\)"),
    ("missing_params", "params/_METADATA: missing"),
    ("edited_next_index", "checksum mismatch: data/metadata"),
    ("edited_checksums", "checksum mismatch"),
    ("missing_checksums", "cut before its checksums were committed"),
    ("planted_file", "params/extra.bin: not in checksums.json"),
])
def test_a_corrupt_checkpoint_is_moved_aside_and_the_previous_one_restored(finished, tmp_path, how, reason):
  from hybrids import evaluate

  workdir = copy_of(finished, tmp_path)
  _corrupt(workdir, how)
  config = evaluate.load_config(workdir)
  with pytest.warns(UserWarning, match=f"resumed from step 8;.*step 12: .*{reason}"):
    step, _, _, _ = evaluate.restore_params(workdir, config)
  assert step == 8
  (moved,) = summary(workdir)["corrupt_checkpoints"]
  assert moved["step"] == 12 and os.path.dirname(moved["moved_to"]) == os.path.join(workdir, "corrupt_checkpoints")
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == [os.path.basename(moved["moved_to"])]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_every_checkpoint_corrupt_refuses_and_keeps_them_all(finished, tmp_path):
  from hybrids import evaluate

  workdir = copy_of(finished, tmp_path)
  for step in (4, 8, 12):
    flip_bits(largest_file(os.path.join(workdir, "checkpoints", str(step), "params")))
  with pytest.raises(RunDirectoryError, match=r"(?s)could be read and verified.*step 12: checksum mismatch"
                                              r".*step 8: checksum.*step 4: checksum"):
    train_lib.restore_checkpoint(workdir, 3, *_abstract_state(evaluate, workdir))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def _abstract_state(evaluate, workdir):
  """Abstract params and optimizer state of a run (no compile), as evaluate.restore_params builds them."""
  import jax
  from flax import nnx

  from hybrids.model import HybridLM
  config = evaluate.load_config(workdir)
  model = nnx.eval_shape(lambda: HybridLM(config.model, rngs=nnx.Rngs(params=config.seed)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  params = target(nnx.to_pure_dict(nnx.split(model)[1]))
  return params, target(jax.eval_shape(train_lib.make_optimizer(config.train).init, params))


def test_a_step_saved_before_checksums_existed_is_restored_unverified(finished, tmp_path):
  from hybrids import evaluate

  workdir = copy_of(finished, tmp_path)
  os.remove(os.path.join(workdir, train_lib.CHECKSUMS_SINCE_FILE))
  for path in glob.glob(os.path.join(workdir, "checkpoints", "*", train_lib.CHECKSUM_FILE)):
    os.remove(path)
  report = {}
  with pytest.warns(UserWarning, match="restored step 12 .* unverified"):
    manager, restored = train_lib.restore_checkpoint(workdir, 3, *_abstract_state(evaluate, workdir), report=report)
  manager.close()
  assert restored[0] == 12 and report == {"restored_checkpoint": {"step": 12, "verified": False}}


# ----------------------------------------------------------------------------- SIGKILL around a save

KILL_DRIVER = r'''
import os, signal, sys
import hybrids.train as T
from hybrids.config import get_config

point, at, workdir, tiny = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "before_orbax_save":
  import orbax.checkpoint as ocp
  original_save = ocp.CheckpointManager.save
  def save(self, step, *a, **k):
    if str(step) == at: die()
    return original_save(self, step, *a, **k)
  ocp.CheckpointManager.save = save
elif point == "before_orbax_commit":  # every file written, the tmp directory not yet renamed
  from orbax.checkpoint._src.path import async_path
  original_rename = async_path.rename
  async def rename(src, dst):
    if os.path.basename(str(dst)) == at: die()
    return await original_rename(src, dst)
  async_path.rename = rename
elif point == "before_checksums":
  original_checksums = T.write_checksums
  def write_checksums(step_dir):
    if os.path.basename(step_dir) == at: die()
    return original_checksums(step_dir)
  T.write_checksums = write_checksums
elif point == "mid_checksum_file":
  original_json = T._write_json
  def write_json(path, obj):
    if path.endswith(os.path.join(at, T.CHECKSUM_FILE)):
      with open(f"{path}.tmp{os.getpid()}", "w") as f:
        f.write('{"algorithm": "sha256", "files": {"para')
      die()
    return original_json(path, obj)
  T._write_json = write_json
elif point == "after_checksums":
  original_ckpt = T.save_checkpoint
  def save_checkpoint(manager, step, *a):
    original_ckpt(manager, step, *a)
    if str(step) == at: die()
  T.save_checkpoint = save_checkpoint
T.train(get_config(tiny), workdir, progress=False)
'''

# (kill point, step whose save is killed, step the rerun resumes from, what the rerun says)
KILLS = [("before_orbax_save", "8", 4, None),
         ("before_orbax_commit", "8", 4, None),
         ("before_checksums", "8", 4, "step 8: no checksums.json"),
         ("mid_checksum_file", "4", 0, "no committed checkpoint"),
         ("after_checksums", "8", 8, None)]


def test_sigkill_at_every_point_of_a_save_resumes_bit_identically(finished, tmp_path):
  driver = tmp_path / "driver.py"
  driver.write_text(KILL_DRIVER)

  def killed(kill):
    workdir = str(tmp_path / kill[0])
    proc = subprocess.run([sys.executable, str(driver), kill[0], kill[1], workdir, TINY], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    return workdir, proc

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    first = list(pool.map(killed, KILLS))
  reference = metrics(finished)
  for (workdir, proc), (point, at, resumed, said) in zip(first, KILLS):
    assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
    assert summary(workdir)["status"] == "running"  # killed: no chance to write anything else
    with warnings.catch_warnings(record=True) as caught:  # the rerun (in-process: the compile is cached)
      warnings.simplefilter("always")
      s = train(get_config(TINY), workdir, progress=False)
    told = "\n".join(str(w.message) for w in caught)
    assert s["status"] == "done" and s["step"] == 12, point
    assert s.get("restored_checkpoint", {}).get("step", 0) == resumed, (point, s.get("restored_checkpoint"))
    assert metrics(workdir) == reference, point  # every step once, every float exactly
    if said:
      assert said in told, (point, told)
      assert s["corrupt_checkpoints"][0]["step"] == int(at)
    for step in (4, 8, 12):
      assert train_lib.verify_checksums(os.path.join(workdir, "checkpoints"), step) is None, point


# ----------------------------------------------------------------------------- one writer per run

def test_a_second_trainer_in_another_thread_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with runs.run_lock(workdir):
    with runs.run_lock(workdir):  # the launcher's thread re-enters (it calls train() under its lock)
      pass
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      future = pool.submit(train, get_config(TINY), workdir, progress=False)
      with pytest.raises(RunBusyError, match=rf"being trained by another process: pid {os.getpid()} on "):
        future.result()
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # refused before writing anything
  assert open(os.path.join(workdir, runs.LOCK_FILE)).read() == ""  # a clean release leaves no holder


HOLDER = r'''
import os, signal, sys, time
from launch import runs
with runs.run_lock(sys.argv[1]):
  print("held", flush=True)
  if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(120)
'''


def test_a_trainer_is_refused_while_another_process_holds_the_lock(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir, "hold"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert runs.is_locked(workdir)
    proc = subprocess.run([sys.executable, "-m", "hybrids.train", "--config", TINY, "--workdir", workdir],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"being trained by another process: pid {holder.pid} on " in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_two_trainers_started_together_one_trains_the_other_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "hybrids.train", "--config", TINY, "--workdir", workdir, "--config.train.steps=300",
         "--config.train.checkpoint_every=1000", "--config.train.eval_every=0"]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], outs
  winner = next(p for p in procs if p.returncode == 0)
  loser_err = next(o[1] for p, o in zip(procs, outs) if p.returncode == 2)
  assert f"pid {winner.pid} on " in loser_err and "refusing to write into it as a second trainer" in loser_err
  steps = [m["step"] for m in metrics(workdir) if "loss" in m]
  assert steps == list(range(1, 301))  # every step once: nothing interleaved
  assert summary(workdir)["status"] == "done"


def test_the_launcher_takes_the_lock_before_it_checks_done(tmp_path, capsys):
  from hybrids.rundir import config_json as _config_json
  from launch import run_point
  from launch import sweep as sweep_lib

  experiment = os.path.join(REPO, "experiments", "quickstart.py")
  config = sweep_lib.resolve_point(experiment, {"config": "tiny"})
  workdir = tmp_path / "root" / sweep_lib.run_id(experiment, config)
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(_config_json(config)))
  (workdir / "summary.json").write_text(json.dumps({"status": "done", "step": 12, "steps": 12}))
  held, release = threading.Event(), threading.Event()

  def hold():
    with runs.run_lock(str(workdir)):
      held.set()
      release.wait(60)

  holder = threading.Thread(target=hold)
  holder.start()
  held.wait(10)
  try:
    code, _ = run_point.execute(experiment, {"config": "tiny"}, str(workdir))
  finally:
    release.set()
    holder.join()
  assert code == run_point.EXIT_BUSY and "is already done" not in capsys.readouterr().out
  code, s = run_point.execute(experiment, {"config": "tiny"}, str(workdir))
  assert code == run_point.EXIT_DONE and s["status"] == "done" and "is already done" in capsys.readouterr().out


def test_a_finished_run_is_a_no_op_and_a_stale_lock_is_recovered(finished, tmp_path, capsys):
  workdir = copy_of(finished, tmp_path)
  before = {name: open(os.path.join(workdir, name), "rb").read() for name in ("summary.json", "metrics.jsonl")}
  s = train(get_config(TINY), workdir, progress=False)
  assert s == json.loads(before["summary.json"]) and s["train_loss"] is not None and s["tokens_per_sec"]
  assert "is already done (step 12/12): nothing to train; summary.json left as it is" in capsys.readouterr().out

  # A holder SIGKILLed with the lock: the next trainer recovers it, says whose it was, and (the run
  # being done) touches nothing, on the command line too.
  dead = subprocess.run([sys.executable, "-c", HOLDER, workdir, "die"], cwd=REPO, env=ENV, capture_output=True)
  assert dead.returncode == -signal.SIGKILL
  assert runs.lock_holder(workdir)["pid"] and not runs.is_locked(workdir)
  dead_pid = runs.lock_holder(workdir)["pid"]
  proc = subprocess.run([sys.executable, "-m", "hybrids.train", "--config", TINY, "--workdir", workdir], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"recovered the stale lock of pid {dead_pid} " in proc.stderr and "(no longer running)" in proc.stderr
  assert "is already done (step 12/12)" in proc.stdout and "done: step 12/12, train loss" in proc.stdout
  for name, content in before.items():
    assert open(os.path.join(workdir, name), "rb").read() == content, name
  assert runs.lock_holder(workdir) == {}


# ----------------------------------------------------------------------------- divergence

def test_a_nan_gradient_norm_is_named_and_the_last_finite_checkpoint_kept(tmp_path):
  # Global attention at this lr: step 3's loss is still finite while its gradient norm is NaN (the
  # RG-LRU's loss turns NaN at the same step, which the message also names, tested in test_train).
  overrides = {"train.lr": 1e30, "train.grad_clip": 1e30, "model.pattern": ("attention",)}
  with pytest.raises(DivergedError, match=r"non-finite grad_norm at step 3 while the loss was finite \(4\.1\d*\).*"
                                          r"the last checkpoint with finite parameters is kept \(step 2\)"):
    train(get_config(TINY, {**overrides, "train.checkpoint_every": 2}), str(tmp_path / "every2"), progress=False)
  assert os.listdir(tmp_path / "every2" / "checkpoints") == ["2"]
  with pytest.raises(DivergedError, match=r"non-finite grad_norm at step 3 .*no checkpoint is kept: none was saved "
                                          r"before it \(train.checkpoint_every=4, started from step 0\)"):
    train(get_config(TINY, overrides), str(tmp_path / "default"), progress=False)
  assert summary(str(tmp_path / "default"))["status"] == "diverged"
  assert "non-finite grad_norm" in summary(str(tmp_path / "default"))["error"]


def test_non_finite_parameters_are_never_saved(tmp_path, monkeypatch):
  calls = []

  def finite_until_step_8(tree):
    calls.append(1)
    return len(calls) < 2  # the save at step 4 is finite, the one at step 8 is not

  monkeypatch.setattr(train_lib, "_all_finite", finite_until_step_8)
  with pytest.raises(DivergedError, match=r"non-finite parameters or optimizer state after step 8 .*not saved; "
                                          r"the last checkpoint with finite parameters is kept \(step 4\)"):
    train(get_config(TINY), str(tmp_path), progress=False)
  assert os.listdir(tmp_path / "checkpoints") == ["4"]


def test_all_finite_sees_nan_and_inf_anywhere():
  import jax.numpy as jnp
  tree = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2)), "n": jnp.array(3, jnp.int32)}}
  assert train_lib._all_finite(tree)
  assert not train_lib._all_finite({**tree, "a": jnp.array([1.0, jnp.nan, 0.0])})
  assert not train_lib._all_finite({**tree, "b": {"c": jnp.full((2, 2), jnp.inf)}})


# ----------------------------------------------------------------------------- job scripts, sweep root

@pytest.mark.parametrize("flags", [
    ["--slurm-param", "qos=high\n#SBATCH --signal=USR1@1"],
    ["--slurm-param", "qos=high\r--x"],
    ["--slurm-param", "qos=high\x00"],
    ["--slurm-param", "q\nos=high"],
    ["--slurm-param", "comment=a\u2028b"],
    ["--slurm-partition", "gpu\nsrun evil"],
    ["--root", "/tmp/sweep\nevil"],
])
def test_control_characters_never_reach_a_job_script(flags):
  from hybrids.config import ConfigError
  from launch import slurm
  from launch.__main__ import _parser

  args = _parser().parse_args(["sweep", "x.py", "--backend", "slurm", *flags])
  with pytest.raises(ConfigError, match="control characters"):
    slurm.executor_parameters(args, "quickstart", 1)


def test_the_sweep_command_refuses_a_newline_in_a_slurm_param_before_submitting(tmp_path):
  # In a subprocess: absl's logging, imported here by hybrids.train, and pytest's capture disagree.
  quickstart = os.path.join(REPO, "experiments", "quickstart.py")
  proc = subprocess.run([sys.executable, "-m", "launch", "sweep", quickstart, "--backend", "slurm", "--root",
                         str(tmp_path / "root"), "--slurm-param", "qos=high\n#SBATCH --signal=USR1@1"],
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "control characters ('\\n')" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "root").exists()  # nothing written, nothing submitted
  args_ok = ["sweep", "x.py", "--backend", "slurm", "--slurm-param", "qos=high"]
  from launch import slurm
  from launch.__main__ import _parser
  assert slurm.executor_parameters(_parser().parse_args(args_ok), "x", 1)["slurm_additional_parameters"] == {
      "qos": "high"}


def test_sweep_root_code_directories_are_private(tmp_path, monkeypatch):
  import types

  from launch import slurm
  from launch.run_point import share_compilation_cache
  from hybrids.config import base_config

  old_umask = os.umask(0)  # even a permissive umask gives 0700
  try:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    share_compilation_cache(base_config(), str(root / "run-0123456789"), env={})
    assert oct(os.stat(root / ".jax_cache").st_mode & 0o777) == "0o700"
    os.chmod(root / ".jax_cache", 0o777)  # loosened after the fact: tightened again
    share_compilation_cache(base_config(), str(root / "run-0123456789"), env={})
    assert oct(os.stat(root / ".jax_cache").st_mode & 0o777) == "0o700"

    folders = []

    class Executor:
      def __init__(self, folder, cluster):
        folders.append(folder)

      def update_parameters(self, **kw):
        pass

      def batch(self):
        raise RuntimeError("stop here")

    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=Executor))
    with pytest.raises(RuntimeError, match="stop here"):
      slurm.submit("x.py", str(root), [], {"name": "x"})
    assert folders == [os.path.join(str(root), ".submitit", "%j")]
    assert oct(os.stat(root / ".submitit").st_mode & 0o777) == "0o700"

    (tmp_path / "other").mkdir()
    (tmp_path / "root2").mkdir()
    os.symlink(tmp_path / "other", tmp_path / "root2" / ".jax_cache")  # planted by whoever could write root2
    with pytest.raises(PermissionError, match="symlink"):
      share_compilation_cache(base_config(), str(tmp_path / "root2" / "run-0123456789"), env={})
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      runs.private_dir(str(tmp_path / "shared" / ".submitit"))  # tmp_path/shared made with umask 0: 0777
    assert any("writable by others" in str(w.message) for w in caught)
  finally:
    os.umask(old_umask)
