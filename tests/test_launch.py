"""The launcher: sweep expansion and filters, exact cloud command lines, shell quoting, the status
table, retries, an interrupted local sweep that resumes to bit-identical losses, and SIGTERM (hence a
checkpoint) for the runs of a sweep that is killed outright.

    PYTHONPATH=. python -m pytest -q -n 0 tests/test_launch.py
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import random
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from hybrids.config import ConfigError
from launch import cloud, runs, status
from launch import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "quickstart.py")
PAYLOAD = "x'; touch {pwned}; echo '"

EXPERIMENT = '''
"""Tiny launcher-test sweep: one SWA layer, {steps} steps."""
from hybrids.config import get_config as _get_config

def get_config(arg=None):
  c = _get_config({quickstart!r} + ":tiny", {{
      "train.steps": {steps}, "train.checkpoint_every": 1000, "train.eval_every": 0,
      "model.pattern": ("swa",), "model.n_layers": 1}})
  if arg == "wide":
    c.model.d_model = 64
  return c

def get_sweep(h, arg=None):
  lrs = [1e-2, 3e-3] if arg != "one" else [1e-2]
  if arg == "twins":  # two runs that train identically: MQAR data ignores data.files
    return h.product([h.sweep("data.files", ["run-a", "run-b"]), h.sweep("model.window", [8])])
  axes = [h.sweep("train.lr", lrs), h.sweep("model.window", [8])]
  if {files!r}:  # a string field that reaches every backend's command line
    axes.append(h.sweep("data.files", [{files!r}]))
  return h.product(axes)
'''


def write_experiment(tmp_path, steps=200, files="", name="tinysweep"):
  path = tmp_path / f"{name}.py"
  path.write_text(EXPERIMENT.format(quickstart=QUICKSTART, steps=steps, files=files))
  return str(path)


def two_point_sweep(tmp_path, monkeypatch, steps):
  """The test sweep's two learning rates, to be launched in-process from the repository (CPU)."""
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", REPO)
  exp = write_experiment(tmp_path, steps=steps)
  expanded = sweep_lib.expand(exp)
  assert len(expanded) == 2
  return exp, expanded


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- expansion, variants, filters

def test_helpers_variants_and_run_ids(tmp_path):
  h = sweep_lib.SweepHelpers()
  assert h.product([h.sweep("a", [1, 2]), h.sweep("b", [3])]) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
  assert h.zip([h.sweep("a", [1, 2]), h.sweep("b", [3, 4])]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert h.chain([h.sweep("a", [1]), h.sweep("b", [2])]) == [{"a": 1}, {"b": 2}]
  with pytest.raises(ValueError, match="different lengths"):
    h.zip([h.sweep("a", [1, 2]), h.sweep("b", [3])])
  plain = sweep_lib.plain({"lr": np.logspace(-4, -2, 3)[1], "n": np.int64(3), "pattern": ("swa", "rglru")})
  assert plain == {"lr": 1e-3, "n": 3, "pattern": ["swa", "rglru"]} and type(plain["n"]) is int  # JSON-able

  exp = write_experiment(tmp_path)
  full = sweep_lib.expand(exp)
  one = sweep_lib.expand(exp + ":one")           # ARG reaches get_sweep(h, arg)
  wide = sweep_lib.expand(exp + ":wide")         # ... and is the get_config argument of points without "config"
  assert len(full) == 2 and len(one) == 1 and one[0][0] == full[0][0]
  assert wide[0][2].model.d_model == 64 and wide[0][0] != full[0][0]
  assert sweep_lib.sweep_name(exp) == "tinysweep" and sweep_lib.sweep_name(exp + ":wide") == "tinysweep-wide"
  # The point as JSON (tuples become lists) resolves to the same run id: what run_point re-checks.
  rid, point, _ = full[0]
  assert sweep_lib.run_id(exp, sweep_lib.resolve_point(exp, json.loads(json.dumps(point)))) == rid
  # get_sweep(h) with one parameter keeps working.
  assert [p["config"] for _, p, _ in sweep_lib.expand(QUICKSTART)] == ["attention", "swa", "rglru"]


def test_filters_match_resolved_config_and_name_bad_fields(tmp_path):
  exp = write_experiment(tmp_path)
  expanded = sweep_lib.expand(exp)
  assert [p["train.lr"] for _, p, _ in sweep_lib.select(exp, expanded, ["train.lr=0.003"])] == [3e-3]
  assert len(sweep_lib.select(exp, expanded, ["train.lr=0.003", "train.lr=1e-2"])) == 2  # one field: OR
  assert sweep_lib.select(exp, expanded, ["train.lr=0.003", "model.window=16"]) == []     # fields: AND
  assert len(sweep_lib.select(exp, expanded, ["model.mixer=swa"])) == 2
  assert sweep_lib.select(exp, expanded, ["model.mixer=rglru"]) == []
  assert len(sweep_lib.select(exp, expanded, ["model.pattern=('swa',)"])) == 2
  with pytest.raises(ConfigError, match=r"model has no 'widnow'.*valid: .*window"):
    sweep_lib.select(exp, expanded, ["model.widnow=8"])
  with pytest.raises(ConfigError, match=r"not a mixer; valid: .*rglru"):
    sweep_lib.select(exp, expanded, ["model.mixer=rglr"])
  with pytest.raises(ConfigError, match="cannot parse"):
    sweep_lib.select(exp, expanded, ["model.window=eight"])


def test_bad_input_is_named_before_anything_is_written(tmp_path, capsys):
  from launch.__main__ import main

  exp = write_experiment(tmp_path)
  root = tmp_path / "root"
  assert main(["sweep", exp, "--root", str(root), "--filter", "train.lrr=1"]) == 2
  assert "unknown field" in capsys.readouterr().err
  assert main(["sweep", str(tmp_path / "nope.py"), "--root", str(root)]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert main(["sweep", exp, "--root", str(root), "--backend", "tpu", "--dry-run"]) == 2
  assert "--zone and --accelerator-type" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["sweep", exp, "--backend", "kubernetes"])
  assert "choose from 'local', 'slurm', 'tpu', 'xpk'" in capsys.readouterr().err
  assert main(["sweep", exp, "--root", str(root), "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert out.count("-m launch.run_point") == 2 and "2 to launch on local" in out
  assert not root.exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------- cloud command lines

def test_tpu_and_xpk_commands_are_exact():
  point = {"model.window": 8, "train.lr": 0.01}
  remote = ("cd hybrids && python3 -m launch.run_point --experiment experiments/x.py:small --point-json "
            "'{\"model.window\": 8, \"train.lr\": 0.01}' --workdir runs/x/x-0123456789 --backend tpu")
  opts = cloud.CloudOptions(zone="us-central2-b", accelerator_type="v4-8", project="proj")
  cmds = cloud.tpu_commands("experiments/x.py:small", "x-0123456789", point, "runs/x/x-0123456789", opts)
  assert cmds == {
      "create": ["gcloud", "compute", "tpus", "tpu-vm", "create", "x-0123456789", "--zone=us-central2-b",
                 "--project=proj", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"],
      "run": ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "x-0123456789", "--zone=us-central2-b", "--project=proj",
              "--worker=all", f"--command={remote}"],
      "delete": ["gcloud", "compute", "tpus", "tpu-vm", "delete", "x-0123456789", "--zone=us-central2-b",
                 "--project=proj", "--quiet"]}
  queued = cloud.tpu_commands("experiments/x.py:small", "x-0123456789", point, "runs/x/x-0123456789",
                              cloud.CloudOptions(zone="z", accelerator_type="v5litepod-8", queued=True, spot=True))
  assert queued["create"] == ["gcloud", "compute", "tpus", "queued-resources", "create", "x-0123456789",
                              "--node-id=x-0123456789", "--zone=z", "--accelerator-type=v5litepod-8",
                              "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  assert queued["wait"][-1] == "--format=value(state.state)"
  assert queued["delete"] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "x-0123456789", "--zone=z",
                              "--force", "--quiet"]

  xopts = cloud.CloudOptions(cluster="c1", tpu_type="v5litepod-16", num_slices=2, docker_image="gcr.io/p/img",
                             max_restarts=5, remote_repo="/app")
  assert cloud.xpk_command("experiments/x.py:small", "x-0123456789", point, "/gcs/runs/x/x-0123456789", xopts) == [
      "xpk", "workload", "create", "--cluster=c1", "--workload=x-0123456789", "--tpu-type=v5litepod-16",
      "--num-slices=2", "--docker-image=gcr.io/p/img", "--max-restarts=5",
      "--command=cd /app && python3 -m launch.run_point --experiment experiments/x.py:small --point-json "
      "'{\"model.window\": 8, \"train.lr\": 0.01}' --workdir /gcs/runs/x/x-0123456789 --backend xpk"]
  assert cloud.resource_name("Zoology_MQAR-0123456789") == "zoology-mqar-0123456789"
  long_name = cloud.resource_name("a" * 60 + "-0123456789", max_len=40)
  assert len(long_name) == 40 and long_name.endswith("-0123456789")


FAKE_REMOTE = """#!/bin/bash
# Stands in for {tool}: runs what the remote side would run — the --command=... string — through a shell.
for arg in "$@"; do
  case "$arg" in --command=*) exec bash -c "${{arg#--command=}}" ;; esac
done
"""
FAKE_PYTHON = """#!/bin/bash
# Stands in for the remote python3: records its argv, one element per line, NUL-separated.
printf '%s\\0' "$@" > "$ARGV_OUT"
"""


def test_shell_payload_is_never_executed(tmp_path, capsys):
  """A config string made to break out of quotes, through every backend's printed command and a real shell."""
  from launch.__main__ import main

  pwned = tmp_path / "pwned"
  payload = PAYLOAD.format(pwned=pwned)
  exp = write_experiment(tmp_path, steps=3, files=payload)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool, text in (("gcloud", FAKE_REMOTE), ("xpk", FAKE_REMOTE), ("python3", FAKE_PYTHON)):
    (bin_dir / tool).write_text(text.format(tool=tool))
    (bin_dir / tool).chmod(0o755)
  point = {"train.lr": 0.01, "model.window": 8, "data.files": payload}
  root = tmp_path / "root"
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO}
  common = ["sweep", exp + ":one", "--root", str(root), "--dry-run", "--remote-repo", str(tmp_path)]
  for backend, flags in (("tpu", ["--zone", "z", "--accelerator-type", "v4-8"]),
                         ("xpk", ["--cluster", "c", "--tpu-type", "v5litepod-8"])):
    assert main([*common, "--backend", backend, *flags]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("gcloud compute tpus tpu-vm ssh") or l.startswith("xpk ")]
    assert len(lines) == 1, out
    argv_out = tmp_path / f"argv-{backend}"
    subprocess.run(["bash", "-c", lines[0]], env={**env, "ARGV_OUT": str(argv_out)}, check=True, cwd=tmp_path)
    remote_argv = argv_out.read_bytes().decode().split("\0")[:-1]
    assert json.loads(remote_argv[remote_argv.index("--point-json") + 1])["data.files"] == payload
  assert not pwned.exists()

  # The local backend's printed line, run by bash for real. Its run directory says "done" for this very
  # config, so run_point re-resolves the point from its JSON argument, checks the run id and the
  # config, and stops there (no training to pay for); it echoes the point it received.
  from hybrids.rundir import config_json as _config_json
  assert main(["sweep", exp + ":one", "--root", str(root), "--dry-run"]) == 0
  out = capsys.readouterr().out
  (line,) = [l for l in out.splitlines() if "-m launch.run_point" in l]
  assert json.loads(shlex.split(line)[shlex.split(line).index("--point-json") + 1]) == point
  (rid, _, config), = sweep_lib.expand(exp + ":one")
  (root / rid).mkdir(parents=True)
  (root / rid / "config.json").write_text(json.dumps(_config_json(config)))
  (root / rid / "summary.json").write_text(json.dumps({"status": "done", "step": 3, "steps": 3}))
  done = subprocess.run(["bash", "-c", line], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  echoed = done.stdout.split(f"[launch] {rid} is already done: ", 1)[1].splitlines()[0]
  assert json.loads(echoed) == point and json.loads(echoed)["data.files"] == payload
  assert not pwned.exists()


FAKE_GCLOUD_LOG = """#!/bin/bash
# Stands in for gcloud: logs its argv; "ssh" runs the remote command line through a shell.
printf '%s\\n' "$*" >> "$GCLOUD_LOG"
for arg in "$@"; do
  case "$arg" in --command=*) exec bash -c "${arg#--command=}" ;; esac
done
"""


def test_tpu_backend_creates_runs_and_deletes_a_vm_per_run(tmp_path, monkeypatch, capsys):
  from launch.__main__ import main

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD_LOG)
  (bin_dir / "python3").write_text(FAKE_PYTHON)
  for tool in ("gcloud", "python3"):
    (bin_dir / tool).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("GCLOUD_LOG", str(tmp_path / "gcloud.log"))
  monkeypatch.setenv("ARGV_OUT", str(tmp_path / "argv"))
  exp = write_experiment(tmp_path)
  root = tmp_path / "root"
  assert main(["sweep", exp + ":one", "--root", str(root), "--backend", "tpu", "--zone", "z",
               "--accelerator-type", "v4-8", "--remote-repo", str(tmp_path), "--remote-root", "/mnt/runs"]) == 0
  (rid, _, _), = sweep_lib.expand(exp + ":one")
  name = cloud.resource_name(rid)
  log = (tmp_path / "gcloud.log").read_text().splitlines()
  assert [l.split()[2:4] for l in log] == [["tpu-vm", "create"], ["tpu-vm", "ssh"], ["tpu-vm", "delete"]]
  assert all(l.split()[4] == name for l in log)
  remote_argv = (tmp_path / "argv").read_bytes().decode().split("\0")[:-1]
  assert remote_argv[remote_argv.index("--workdir") + 1] == f"/mnt/runs/{rid}"
  assert json.loads((root / "sweep.json").read_text())["points"][0]["run_id"] == rid


def test_local_devices_are_found_without_jax_and_split_into_groups():
  from launch import local

  assert local.detect_devices({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0,1"}) == ("cpu", [])
  assert local.detect_devices({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == ("gpu", ["0", "1", "2", "3"])
  assert local.device_groups(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]
  assert local.child_env("gpu", ["2", "3"], 1, base={})["CUDA_VISIBLE_DEVICES"] == "2,3"
  tpu = local.child_env("tpu", ["1"], 1, base={})
  assert tpu["TPU_VISIBLE_CHIPS"] == "1" and tpu["TPU_PROCESS_BOUNDS"] == "1,1,1" and tpu["TPU_PROCESS_PORT"] == "8477"
  assert local.child_env("cpu", None, 0, base={"A": "1"}) == {"A": "1", runs.RUNS_PER_DEVICE_ENV: "1"}


def test_a_failing_nvidia_smi_is_named_once_and_the_host_taken_as_cpu(tmp_path, monkeypatch, capsys):
  from launch import local

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  smi = bin_dir / "nvidia-smi"
  smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
  smi.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setattr(local, "_SMI_FAILURES_SHOWN", set())
  monkeypatch.setattr(local.glob, "glob", lambda pattern: [])  # whatever this host has: no TPU chips
  assert local.detect_devices({}) == ("gpu", ["0", "1"])
  smi.write_text("#!/bin/sh\necho 'Failed to initialize NVML: Driver/library version mismatch'\nexit 1\n")
  assert local.detect_devices({}) == ("cpu", [])
  assert local.detect_devices({}) == ("cpu", [])  # a sweep counts twice: one line
  err = capsys.readouterr().err
  assert err == ("launch: `nvidia-smi -L` failed (exit 1: Failed to initialize NVML: Driver/library version "
                 "mismatch); the sweep treats this host as CPU-only (no device pinned per run; set "
                 "CUDA_VISIBLE_DEVICES to name the GPUs)\n")
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi: a CPU host, nothing to say
  assert local.detect_devices({}) == ("cpu", []) and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- run states, status, retries

def _fake_run(root, rid, *, summary=None, attempts=None, metrics=None):
  workdir = root / rid
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  if summary is not None:
    (workdir / "summary.json").write_text(json.dumps(summary))
  if attempts is not None:
    (workdir / runs.LAUNCH_FILE).write_text(json.dumps({"attempts": attempts}))
  if metrics is not None:
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
  return str(workdir)


def test_status_table_and_retry_limit(tmp_path, capsys):
  from launch.__main__ import main, plan_rows

  root = tmp_path / "sweep"
  _fake_run(root, "s-done", summary={"status": "done", "step": 50, "steps": 50, "train_loss": 1.25},
            attempts=[{"status": "done"}], metrics=[{"step": 50, "loss": 1.25}])
  live = _fake_run(root, "s-live", summary={"status": "running", "step": 0, "steps": 50},
                   metrics=[{"step": 1, "loss": 4.0}, {"step": 7, "loss": 3.5}])
  _fake_run(root, "s-killed", summary={"status": "running", "step": 0, "steps": 50},
            metrics=[{"step": 3, "loss": 3.75}])
  _fake_run(root, "s-failed", summary={"status": "failed", "step": 2, "steps": 50},
            attempts=[{"status": "failed"}] * 3)
  _fake_run(root, "s-diverged", summary={"status": "diverged", "step": 9, "steps": 50})
  (root / "sweep.json").write_text(json.dumps({"points": [
      {"run_id": rid, "point": {"train.lr": i}} for i, rid in
      enumerate(["s-done", "s-live", "s-killed", "s-failed", "s-diverged", "s-pending"])]}))
  with runs.run_lock(live):  # a live process trains s-live
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    rows = {r["run"]: r for r in status.collect(str(root))}
    assert [r["run"] for r in plan_rows(str(root), [("s-live", {}, None)], max_retries=2)[1]] == ["s-live"]
    assert plan_rows(str(root), [("s-live", {}, None)], max_retries=2, backend="slurm")[1] == []
  table = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.startswith("s-")}
  assert table["s-done"][1:5] == ["train.lr=0", "done", "50/50", "1.2500"]
  assert table["s-live"][2:5] == ["running", "7/50", "3.5000"]
  assert table["s-killed"][2] == "interrupted" and table["s-failed"][2:6] == ["failed", "2/50", "—", "3"]
  assert table["s-diverged"][2] == "diverged" and table["s-pending"][2:] == ["pending", "—", "—", "0", "—"]
  assert "6 run(s): 1 diverged, 1 done, 1 failed, 1 interrupted, 1 pending, 1 running" in out
  assert rows["s-live"]["status"] == "running"
  # A run on another host (its lock invisible from here) is running while its files are fresh.
  remote = _fake_run(root, "s-remote", summary={"status": "running", "step": 0, "steps": 50},
                     attempts=[{"status": "running", "host": "another-host"}])
  assert runs.run_state(remote)["status"] == "running"
  os.utime(os.path.join(remote, "summary.json"), (0, 0))
  os.utime(os.path.join(remote, runs.LAUNCH_FILE), (0, 0))
  assert runs.run_state(remote)["status"] == "interrupted"
  assert runs.run_state(live)["status"] == "interrupted"  # lock released: its process is gone

  # Which runs a relaunch starts: not done, not diverged, not failed more than --max-retries times.
  selected = [(rid, {}, None) for rid in ("s-done", "s-killed", "s-failed", "s-diverged", "s-pending")]
  _, todo = plan_rows(str(root), selected, max_retries=2)
  assert [r["run"] for r in todo] == ["s-killed", "s-pending"]
  _, todo = plan_rows(str(root), selected, max_retries=3)
  assert [r["run"] for r in todo] == ["s-killed", "s-failed", "s-pending"]
  assert main(["status", str(tmp_path / "missing")]) == 2


def test_runs_resuming_from_a_checkpoint_launch_first(tmp_path):
  """In a time-limited slot, finish what has started: runs with a checkpoint go first, the furthest
  trained first; the rest (new runs, runs cut before their first checkpoint) keep the sweep's order."""
  from launch.__main__ import plan_rows

  root = tmp_path / "sweep"
  names = ("s-new", "s-40", "s-live", "s-cut", "s-80")
  for rid, step in zip(names, (None, 40, 90, 0, 80)):
    workdir = _fake_run(root, rid, summary=None if step is None else {"status": "interrupted", "step": step,
                                                                      "steps": 100})
    if step:
      os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
  with runs.run_lock(str(root / "s-live")):  # a live process holds it: it waits for the lock, so not first
    rows, todo = plan_rows(str(root), [(rid, {}, None) for rid in names], max_retries=2)
  assert [r["run"] for r in todo] == ["s-80", "s-40", "s-new", "s-live", "s-cut"]
  assert [r["run"] for r in rows] == list(names)  # the table keeps the sweep's order
  assert {r["run"]: r["action"] for r in rows}["s-80"] == "resume from step 80"


# ----------------------------------------------------------------------------- reliability

def _wait_for_steps(targets, proc, timeout=300):
  """Until each ``workdir``'s metrics.jsonl has at least ``targets[workdir]`` lines."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    counts = {}
    for w in targets:
      try:
        counts[w] = sum(1 for _ in open(os.path.join(w, "metrics.jsonl")))
      except OSError:
        counts[w] = 0
    if all(counts[w] >= n for w, n in targets.items()):
      return
    time.sleep(0.05)
  raise AssertionError(f"runs did not reach {targets} logged steps (sweep exited {proc.poll()})")


KILLED_PARENT = r"""
import subprocess, sys, time
from launch.local import _die_with_parent
CHILD = '''
import os, signal, sys, time
def on_term(*_):
  # Written aside and renamed: the test polls for the file, which must not appear empty.
  with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("SIGTERM")
  os.replace(sys.argv[1] + ".tmp", sys.argv[1])
  sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
'''
child = subprocess.Popen([sys.executable, "-c", CHILD, sys.argv[1]], start_new_session=True,
                         preexec_fn=_die_with_parent, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print("started", flush=True)
time.sleep(60)
"""


def test_children_of_a_killed_sweep_get_sigterm(tmp_path):
  """A sweep killed outright (SIGKILL, the OOM killer) still sends its runs SIGTERM, on which training
  saves a checkpoint (as the test below and tests/test_train.py check): the kernel does it
  (PR_SET_PDEATHSIG), so nothing of the sweep process has to run."""
  marker = tmp_path / "child_got"
  parent = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, str(marker)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE, text=True)
  assert parent.stdout.readline().strip() == "started"
  parent.kill()
  parent.wait()
  deadline = time.time() + 30
  while not marker.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert marker.read_text() == "SIGTERM"


def test_interrupted_local_sweep_resumes_bit_identically(tmp_path):
  """SIGTERM to a sweep at a random step; the next launch — on another root that received the first one's
  state only as ``launch pack --checkpoints-mb`` → ``launch unpack``, as the next GPU slot does — resumes
  that run and trains its twin (the same training, another run id) beside it: both complete with
  continuous metrics and identical losses, i.e. the resumed run logged exactly what an uninterrupted one does."""
  from launch.__main__ import main, plan_rows

  steps = 200
  exp = write_experiment(tmp_path, steps=steps) + ":twins"
  expanded = sweep_lib.expand(exp)
  (resumed, _, _), (twin, _, _) = expanded
  root = tmp_path / "root"
  resumed, twin = str(root / resumed), str(root / twin)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         # The second launch loads the compiled programs of the first instead of compiling them again.
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  argv = [sys.executable, "-m", "launch", "sweep", exp, "--root", str(root), "--max-parallel", "2", "--no-progress"]

  first = subprocess.Popen(argv + ["--filter", "data.files=run-a"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  _wait_for_steps({resumed: random.randint(3, 30)}, first)
  first.send_signal(signal.SIGTERM)  # the sweep forwards it at once; the run checkpoints at its next step
  out, _ = first.communicate(timeout=300)
  assert first.returncode == 130, out
  stopped = runs.run_state(resumed)
  assert stopped["status"] == "interrupted" and 0 < stopped["step"] < steps, stopped
  assert runs.run_state(twin)["status"] == "pending"

  # The slot ends: what leaves it is one archive; the next slot starts from it on a fresh disk.
  archive = tmp_path / "slot.tgz"
  assert main(["pack", str(root), str(archive), "--checkpoints-mb", "50", "--part-mb", "1"]) == 0
  root = tmp_path / "next-slot"
  assert main(["unpack", str(root), *sorted(map(str, tmp_path.glob("slot.tgz.part-*")))]) == 0
  resumed, twin = (str(root / os.path.basename(p)) for p in (resumed, twin))
  assert runs.run_state(resumed)["status"] == "interrupted" and not os.path.exists(twin)
  assert os.path.exists(os.path.join(resumed, "checksums_since.json"))  # the carried checkpoint is verified
  argv[argv.index("--root") + 1] = str(root)

  second = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  attempts = runs.read_attempts(resumed)
  assert [a["status"] for a in attempts] == ["interrupted", "done"], attempts
  assert attempts[1]["resumed_from"] == attempts[0]["step"] == stopped["step"]
  assert [a["status"] for a in runs.read_attempts(twin)] == ["done"]
  rows = metric_rows(resumed)
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
  assert rows == metric_rows(twin)  # every logged float, exactly
  rows, todo = plan_rows(str(root), expanded, max_retries=2)  # what a third launch would do: nothing
  assert todo == [] and [r["action"] for r in rows] == ["skip (done)"] * 2


def test_sweep_runs_share_a_compilation_cache_unless_one_is_named(tmp_path):
  from hybrids.config import base_config
  from launch.run_point import share_compilation_cache

  workdir = str(tmp_path / "root" / "run-0123456789")
  config = base_config()
  share_compilation_cache(config, workdir, env={})
  assert config.runtime.compilation_cache_dir == str(tmp_path / "root" / ".jax_cache")
  for named, env in (("/elsewhere", {}), ("", {"JAX_COMPILATION_CACHE_DIR": "/jax"})):
    config = base_config()
    config.runtime.compilation_cache_dir = named
    share_compilation_cache(config, workdir, env=env)
    assert config.runtime.compilation_cache_dir == named


# ----------------------------------------------------------------------------- runs packed per device

def test_runs_per_device_is_validated_before_anything_is_written(tmp_path, capsys, monkeypatch):
  from launch import local
  from launch.__main__ import main

  exp = write_experiment(tmp_path)
  root = tmp_path / "root"
  for bad in ("0", "-1", "65", "two", "1.5"):
    assert main(["sweep", exp, "--root", str(root), "--runs-per-device", bad]) == 2, bad
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --runs-per-device=") and "1 to 64" in err, err
  assert main(["sweep", exp, "--root", str(root), "--runs-per-device", "2", "--backend", "slurm"]) == 2
  assert "--backend local only" in capsys.readouterr().err
  monkeypatch.setattr(local, "detect_devices", lambda environ=None: ("tpu", ["0", "1"]))
  assert main(["sweep", exp, "--root", str(root), "--runs-per-device", "4"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--runs-per-device=4: a TPU chip admits one process" in err, err
  assert not root.exists()
  assert main(["sweep", exp, "--root", str(root), "--runs-per-device", "64", "--dry-run", "--backend", "slurm"]) == 2
  monkeypatch.undo()
  assert main(["sweep", exp, "--root", str(root), "--runs-per-device", "64", "--dry-run"]) == 0  # CPU: allowed
  assert not root.exists()


FAKE_MPS_CONTROL = """#!/bin/sh
# A stand-in for nvidia-cuda-mps-control: -d makes the control pipe; "quit" on stdin removes it.
if [ "$1" = "-d" ]; then
  [ -n "$FAIL" ] && { echo "cannot start" >&2; exit 1; }
  echo pid > "$CUDA_MPS_PIPE_DIRECTORY/control"; echo started >> "$LOG"; exit 0
fi
read cmd; [ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control" && echo quit >> "$LOG"
"""


def test_mps_is_checked_before_anything_is_written_and_stops_only_its_own_daemon(tmp_path, capsys, monkeypatch):
  """--mps: one line naming what is missing, before anything is written; a daemon already listening
  is used and left running; otherwise one is started in a temporary directory, its pipe reaches the
  children's environment, and it quits at the end; a daemon that does not start is an error."""
  from launch import local
  from launch.__main__ import main

  exp = write_experiment(tmp_path)
  root = tmp_path / "root"
  for argv, message in (([], "--mps needs NVIDIA GPUs (this host: cpu)"),
                        (["--backend", "slurm", "--runs-per-device", "1"], "--mps applies to --backend local only")):
    assert main(["sweep", exp, "--root", str(root), "--runs-per-device", "2", "--mps", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
  monkeypatch.setattr(local, "detect_devices", lambda environ=None: ("gpu", ["0"]))
  assert main(["sweep", exp, "--root", str(root), "--mps"]) == 2
  assert "give --runs-per-device N ≥ 2" in capsys.readouterr().err
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  assert main(["sweep", exp, "--root", str(root), "--runs-per-device", "2", "--mps"]) == 2
  assert "nvidia-cuda-mps-control is not on PATH" in capsys.readouterr().err
  assert not root.exists()

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  control = bin_dir / "nvidia-cuda-mps-control"
  control.write_text(FAKE_MPS_CONTROL)
  control.chmod(0o755)
  log = tmp_path / "mps.log"
  base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(log)}
  monkeypatch.setenv("PATH", base["PATH"])
  local.Mps.check("gpu", 2)
  monkeypatch.setattr(local.Mps, "PROBE", ("true",))  # a client that reaches the GPU
  daemon = local.Mps(base).start()
  pipe = daemon.env()["CUDA_MPS_PIPE_DIRECTORY"]
  assert os.path.exists(os.path.join(pipe, "control")) and "started for this sweep" in daemon.note
  assert daemon.env()["CUDA_MPS_LOG_DIRECTORY"].startswith(daemon.owned)
  owned = daemon.owned
  daemon.stop()
  assert log.read_text().split() == ["started", "quit"] and not os.path.exists(owned)

  running = tmp_path / "running"
  running.mkdir()
  (running / "control").write_text("pid")
  daemon = local.Mps({**base, "CUDA_MPS_PIPE_DIRECTORY": str(running)}).start()
  assert daemon.env() == {"CUDA_MPS_PIPE_DIRECTORY": str(running)} and "already listening" in daemon.note
  daemon.stop()
  assert (running / "control").exists() and log.read_text().split() == ["started", "quit"]  # not ours: left

  with pytest.raises(local.MpsError, match="did not start a daemon .exit 1: cannot start"):
    local.Mps({**base, "FAIL": "1"}).start()

  # A daemon that starts but serves no client: refused in one line, and the daemon started here quits.
  monkeypatch.setattr(local.Mps, "PROBE", ("sh", "-c", "echo Traceback >&2; echo 'RuntimeError: Unable to initialize "
                                           "backend cuda: no supported devices found for platform CUDA' >&2; exit 1"))
  with pytest.raises(local.MpsError, match="cannot reach the GPU through the MPS daemon .* no supported devices .*"
                                           "run without --mps"):
    local.Mps(base).start()
  assert log.read_text().split() == ["started", "quit", "started", "quit"]
  # What the MPS server logged says why; the refusal carries its last line.
  monkeypatch.setattr(local.Mps, "PROBE", ("sh", "-c", 'echo "[2026-12-07] Failed to start server: device busy" '
                                           '> "$CUDA_MPS_LOG_DIRECTORY/server.log"; echo no device >&2; exit 1'))
  with pytest.raises(local.MpsError, match=r"\(no device; the daemon's log: \[2026-12-07\] Failed to start "
                                           r"server: device busy\); run without --mps"):
    local.Mps(base).start()
  # A daemon found running with no log directory named: no log is guessed (not a server.log of the cwd).
  monkeypatch.chdir(tmp_path)
  (tmp_path / "server.log").write_text("someone else's log\n")
  monkeypatch.setattr(local.Mps, "PROBE", ("sh", "-c", "echo no device >&2; exit 1"))
  with pytest.raises(local.MpsError, match=r"\(no device\); run without --mps") as refused:
    local.Mps({**base, "CUDA_MPS_PIPE_DIRECTORY": str(running)}).start()
  assert "someone else's" not in str(refused.value)
  monkeypatch.setattr(local, "detect_devices", lambda environ=None: ("gpu", ["0"]))
  fresh = tmp_path / "fresh"
  assert main(["sweep", exp, "--root", str(fresh), "--runs-per-device", "2", "--mps"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "cannot reach the GPU through the MPS daemon" in err, err
  assert not any(p.name != "sweep.json" for p in fresh.iterdir())  # no run directory was made


def test_bench_packing_counts():
  from launch import bench_packing
  assert bench_packing.parse_counts("1, 8,8mps,8mps-lr4,2-lr3") == [(1, False, 1), (8, False, 1), (8, True, 1),
                                                                    (8, True, 4), (2, False, 3)]
  assert bench_packing.label(8, True) == "8mps" and bench_packing.label(8, True, 4) == "8mps-lr4"
  for bad in ("", "0", "x", "8 mps", "mps", "8-lr", "8-lr0", "8mps-lrx"):
    with pytest.raises(ValueError, match="--runs-per-device"):
      bench_packing.parse_counts(bad)


def test_packed_slots_and_their_environment():
  from launch import local

  # Two GPUs, 3 runs each: 6 slots, the first ones on distinct GPUs; --max-parallel caps them.
  assert local.plan_slots("gpu", ["0", "1"], runs_per_device=3) == [["0"], ["1"]] * 3
  assert local.plan_slots("gpu", ["0", "1"], runs_per_device=3, max_parallel=3) == [["0"], ["1"], ["0"]]
  assert local.plan_slots("gpu", ["0", "1", "2", "3"], devices_per_run=2, runs_per_device=2, n_runs=3) == [
      ["0", "1"], ["2", "3"], ["0", "1"]]
  assert local.plan_slots("gpu", ["0"], runs_per_device=4) == [None] * 4      # one GPU: N runs on it
  assert local.plan_slots("gpu", ["0"], runs_per_device=4, max_parallel=8) == [None] * 4
  assert local.plan_slots("gpu", ["0", "1"]) == [["0"], ["1"]]              # unpacked: as before
  assert local.plan_slots("cpu", [], runs_per_device=3) == [None] * 3         # CPU: N at once ...
  assert local.plan_slots("cpu", [], runs_per_device=3, max_parallel=2) == [None] * 2  # ... unless --max-parallel
  assert local.plan_slots("cpu", [], n_runs=0) == [None]
  env = local.child_env("gpu", ["1"], 2, base={}, runs_per_device=4)
  # (HYBRIDS_RUNS_PER_DEVICE: the share each attempt records, for the report's device hours)
  assert env == {"CUDA_VISIBLE_DEVICES": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                 "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225", runs.RUNS_PER_DEVICE_ENV: "4"}
  assert local.child_env("gpu", None, 0, base={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1"},
                         runs_per_device=8)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.1"  # the user's value wins
  assert local.memory_fraction(3) == "0.300" and local.memory_fraction(64) == "0.014"
  assert local.child_env("gpu", ["0"], 0, base={}) == {"CUDA_VISIBLE_DEVICES": "0",  # N=1: JAX's defaults
                                                        runs.RUNS_PER_DEVICE_ENV: "1"}
  assert local.child_env("cpu", None, 0, base={}, runs_per_device=4) == {runs.RUNS_PER_DEVICE_ENV: "4"}
  with pytest.raises(ValueError, match="TPU"):
    local.parse_runs_per_device(2, "tpu")
  assert local.parse_runs_per_device("1", "tpu") == 1


FAKE_POINT = """
import json, os, sys, time
workdir, name = sys.argv[1], os.path.basename(sys.argv[1])
packed = "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ
with open(os.path.join(os.path.dirname(workdir), "events"), "a") as f:
  f.write(json.dumps([name, "start", packed, time.time()]) + "\\n")
time.sleep(0.3)
with open(os.path.join(os.path.dirname(workdir), "events"), "a") as f:
  f.write(json.dumps([name, "end", packed, time.time()]) + "\\n")
if name == "big" and packed or name == "huge":
  print("jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.40GiB")
  sys.exit(1)
if name == "broken":  # XLA's allocator logs this while autotuning; it is not what failed
  print("W bfc_allocator.cc:296] Allocator (GPU_0_bfc) ran out of memory trying to allocate 2.40GiB. The caller "
        "indicates that this is not a failure, but this may mean that there could be performance gains")
  print("ValueError: not a memory problem")
  sys.exit(1)
"""


def test_a_packed_run_out_of_memory_is_retried_once_alone(tmp_path, monkeypatch, capsys):
  """A run that fails for memory beside packed runs reruns once with the GPU to itself (nothing else
  running meanwhile, no memory share); one that fails otherwise, or again alone, is not retried."""
  from launch import local

  script = tmp_path / "fake_point.py"  # a file, so the log's command line does not hold its text
  script.write_text(FAKE_POINT)
  monkeypatch.setattr(local, "run_point_argv", lambda experiment, point, workdir, extra=(): [
      sys.executable, str(script), workdir])
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  names = ["a", "big", "b", "broken", "huge", "c"]
  todo = [{"run": n, "point": {}, "workdir": str(tmp_path / n)} for n in names]
  assert local._run("exp.py", todo, "gpu", ["0"], local.Mps(), max_parallel=None, devices_per_run=1,
                    runs_per_device=3, live=False, poll_s=0.02) == 0
  out = capsys.readouterr().out
  assert "big: out of GPU memory beside 2 packed run(s); retrying it once with the GPUs to itself" in out
  assert "huge: out of GPU memory" in out and "broken: out of GPU memory" not in out
  codes = {row["run"]: row["returncode"] for row in todo}
  assert codes == {"a": 0, "big": 0, "b": 0, "broken": 1, "huge": 1, "c": 0}
  events = [json.loads(line) for line in (tmp_path / "events").read_text().splitlines()]
  starts = {n: [p for name, what, p, _ in events if name == n and what == "start"] for n in names}
  assert starts["big"] == [True, False] and starts["huge"] == [True, False] and starts["broken"] == [True]
  # While a run has the GPU to itself, no other run is running.
  for name in ("big", "huge"):
    t0 = next(t for n, w, p, t in events if n == name and w == "start" and not p)
    t1 = next(t for n, w, p, t in events if n == name and w == "end" and not p)
    assert not [n for n, w, p, t in events if n != name and t0 <= t <= t1]  # nothing starts or ends meanwhile
    started = sum(1 for n, w, p, t in events if n != name and w == "start" and t < t0)
    assert started == sum(1 for n, w, p, t in events if n != name and w == "end" and t < t0)  # nor runs on
  log = (tmp_path / "big" / runs.LOG_FILE).read_text()
  assert log.count("runs-per-device 3") == 1 and "runs-per-device 1, mem fraction default, MPS off, retried alone" in log


def test_a_packed_run_computes_what_it_computes_alone(tmp_path, monkeypatch, capsys):
  """The same two points, one at a time and both at once (--runs-per-device 2 on CPU): every logged
  loss and the final eval are identical."""
  from launch.__main__ import main

  exp, expanded = two_point_sweep(tmp_path, monkeypatch, steps=20)
  roots = {n: tmp_path / f"rpd-{n}" for n in (1, 2)}
  for n, root in roots.items():
    assert main(["sweep", exp, "--root", str(root), "--runs-per-device", str(n), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"2 run(s), {n} at a time (cpu); runs-per-device {n}" in out, out
  for rid, _, _ in expanded:
    alone, packed = str(roots[1] / rid), str(roots[2] / rid)
    assert "runs-per-device 2, mem fraction default" in open(os.path.join(packed, runs.LOG_FILE)).read()
    rows = metric_rows(alone)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in metric_rows(packed)]
    assert rows == metric_rows(packed)
    a, p = runs.read_summary(alone), runs.read_summary(packed)
    assert a["status"] == p["status"] == "done" and a["eval"] and a["eval"] == p["eval"]
    assert a["train_loss"] == p["train_loss"]
    # Each attempt keeps its device share and devices, so the report can count device time.
    for n, workdir in ((1, alone), (2, packed)):
      (attempt,) = runs.read_attempts(workdir)
      assert attempt["runs_per_device"] == n and attempt["device_kind"] == "cpu" and attempt["device_count"] == 1
      assert runs.attempt_device_seconds(attempt) == pytest.approx(
          (datetime.datetime.fromisoformat(attempt["ended"]) - datetime.datetime.fromisoformat(attempt["started"]))
          .total_seconds() / n)


def test_evaluate_runs_each_cells_best_once_and_names_bad_input(tmp_path, monkeypatch, capsys):
  """``launch evaluate ROOT --eval mqar --best``: only the cell's best learning rate is evaluated
  (eval/mqar.json at its final step), a second call finds it up to date, and without --best the other
  run follows; bad input is one line, exit 2, before anything runs or is written."""
  from launch import report
  from launch.__main__ import main

  exp, expanded = two_point_sweep(tmp_path, monkeypatch, steps=4)
  root = tmp_path / "root"
  assert main(["sweep", exp, "--root", str(root), "--no-progress"]) == 0
  capsys.readouterr()
  problems = []
  done = report.load_runs(str(root), problems)
  report.assign_labels(done)
  (cell,) = report.learning_rate_cells(done)
  best, other = cell.best.run_id, next(rid for rid, _, _ in expanded if rid != cell.best.run_id)
  mqar_json = lambda rid: root / rid / "eval" / "mqar.json"

  for argv, message in ((["--eval", "nope"], "--eval='nope': unknown eval 'nope'; valid: loss, position, mqar, retrieval"),
                        (["--eval", "mqar", "--", "--workdir", "x"], "--workdir after -- : launch evaluate sets it"),
                        (["--eval", "mqar", "--", "--eval=loss"], "--eval after -- : launch evaluate sets it")):
    assert main(["evaluate", str(root), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
  assert main(["evaluate", str(tmp_path / "nowhere"), "--eval", "mqar"]) == 2
  assert "is not a directory" in capsys.readouterr().err
  assert not mqar_json(best).exists() and not mqar_json(other).exists()

  assert main(["evaluate", str(root), "--eval", "mqar", "--best", "--", "--samples", "4"]) == 0
  out = capsys.readouterr().out
  assert "1 run(s), 1 to evaluate, 0 up to date" in out and f"1/1 {best} (step 4): done" in out, out
  assert json.loads(mqar_json(best).read_text())["step"] == 4 and not mqar_json(other).exists()
  assert "# launch evaluate: -m hybrids.evaluate --workdir" in (root / best / runs.LOG_FILE).read_text()

  assert main(["evaluate", str(root), "--eval", "mqar", "--best"]) == 0
  assert "1 run(s), 0 to evaluate, 1 up to date" in capsys.readouterr().out
  assert main(["evaluate", str(root), "--eval", "mqar", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "2 run(s), 1 to evaluate, 1 up to date" in out and f"--workdir {root / other} --eval mqar" in out
  assert not mqar_json(other).exists()  # a dry run writes nothing
  assert main(["evaluate", str(root), "--eval", "mqar", "--", "--face", "sideways"]) == 1  # the child refuses it
  captured = capsys.readouterr()
  assert f"1/1 {other} (step 4): failed (exit 2; see its launch.log)" in captured.out, captured.out
  assert f"1 run(s) failed: {other}" in captured.err and not mqar_json(other).exists()
  assert "--face" in (root / other / runs.LOG_FILE).read_text()


def test_evaluate_stopped_by_ctrl_c_exits_130_and_says_how_to_go_on(tmp_path, monkeypatch, capsys):
  from launch import evaluate

  run = tmp_path / "root" / "r1"
  run.mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"model": {"pattern": ["swa"]}, "train": {"lr": 1e-3}}))
  (run / "summary.json").write_text(json.dumps({"status": "done", "step": 3}))

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(evaluate.subprocess, "run", interrupted)
  assert evaluate.main([str(tmp_path / "root"), "--eval", "loss"]) == 130
  assert "stopped; run the same command again to go on" in capsys.readouterr().err


# ----------------------------------------------------------------------------- time-limited slots, pack
SLEEPER = '''
import signal, sys, time
def stop(*_):
  open(sys.argv[1], "w").write("SIGTERM")  # where training would save its checkpoint
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
time.sleep(120)
'''


def test_time_limit_stops_a_sweep_as_ctrl_c_and_launches_nothing_after(tmp_path, monkeypatch, capsys):
  """``--time-limit``: once it passes, the running run gets SIGTERM (its checkpoint) and the queued one is
  never started; exit status 3 (130 stays a signal's)."""
  from launch import local

  rows = [{"run": f"r{i}", "point": {}, "workdir": str(tmp_path / f"r{i}")} for i in range(2)]
  monkeypatch.setattr(local, "unit_argv",
                      lambda exp, unit, extra=(): [sys.executable, "-c", SLEEPER, unit[0]["workdir"] + "/stopped"])
  start = time.monotonic()
  code = local.run("unused.py", rows, live=False, poll_s=0.05, detected=("cpu", []), time_limit_s=1.0)
  assert code == local.TIME_LIMIT_EXIT == 3
  assert 1.0 <= time.monotonic() - start < 30
  assert (tmp_path / "r0" / "stopped").read_text() == "SIGTERM"
  assert not (tmp_path / "r1").exists()  # the queued run was not launched: its directory is untouched
  assert "--time-limit 1 s reached" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_a_bad_time_limit_is_one_line_before_anything_is_written(tmp_path, capsys, value):
  from launch.__main__ import main

  root = tmp_path / "root"
  assert main(["sweep", write_experiment(tmp_path), "--root", str(root), f"--time-limit={value}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--time-limit" in err and "must be > 0 seconds" in err, err
  assert not root.exists()


def _packable_run(root, name, status, checkpoints=(), ckpt_bytes=1000):
  """:func:`_fake_run` with everything a run directory holds: evals, logs, TensorBoard, checkpoints."""
  run = pathlib.Path(_fake_run(root, name, summary={"status": status, "step": max(checkpoints, default=0)},
                               attempts=[{"status": "interrupted"}], metrics=[{"step": 1, "loss": 2.0}]))
  (run / "eval").mkdir()
  (run / "eval" / "retrieval.json").write_text("{}")
  (run / "tb").mkdir()
  (run / "tb" / "events.out").write_bytes(b"x" * 100)
  (run / "launch.log").write_text("log")
  for step in checkpoints:
    ckpt = run / "checkpoints" / str(step) / "state"
    ckpt.mkdir(parents=True)
    (ckpt / "data").write_bytes(os.urandom(ckpt_bytes))


def test_pack_carries_results_and_the_furthest_checkpoints_within_budget(tmp_path, capsys):
  """The archive holds what status, report and the next sweep read (not logs or TensorBoard), and the
  newest checkpoint of unfinished runs, furthest first, greedily within --checkpoints-mb; split into
  parts it joins back to the same files."""
  from launch.__main__ import main

  root = tmp_path / "root"
  root.mkdir()
  (root / "sweep.json").write_text("{}")
  _packable_run(root, "done", "done", checkpoints=(300,))  # finished: its checkpoint is not needed
  _packable_run(root, "far", "running", checkpoints=(50, 200))  # interrupted at 200
  _packable_run(root, "big", "running", checkpoints=(150,), ckpt_bytes=60_000)  # does not fit the budget
  _packable_run(root, "near", "running", checkpoints=(100,))  # fits after "big" is passed over
  (root / "notes.txt").write_text("not a run")
  out = tmp_path / "out" / "z.tgz"
  out.parent.mkdir()
  assert main(["pack", str(root), str(out), "--checkpoints-mb", "0.01", "--part-mb", "0.002"]) == 0
  said = capsys.readouterr().out
  assert "4 run(s), 21 file(s), 2 checkpoint(s)" in said and "far@200, near@100" in said, said
  parts = sorted(out.parent.iterdir())
  assert len(parts) > 1 and all(p.name.startswith("z.tgz.part-") for p in parts)
  assert all(p.stat().st_size <= 0.002 * 2**20 for p in parts)
  joined = tmp_path / "joined.tgz"
  joined.write_bytes(b"".join(p.read_bytes() for p in parts))
  dest = tmp_path / "dest"
  dest.mkdir()
  subprocess.run(["tar", "xzf", str(joined), "-C", str(dest)], check=True)
  got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
  results = [f"{r}/{f}" for r in ("big", "done", "far", "near")
             for f in ("config.json", "eval/retrieval.json", "launch.json", "metrics.jsonl", "summary.json")]
  ckpts = ["far/checkpoints/200/state/data", "near/checkpoints/100/state/data"]
  assert got == sorted(results + ckpts + ["sweep.json"])
  for rel in got:
    assert (dest / rel).read_bytes() == (root / rel).read_bytes(), rel
  assert runs.latest_checkpoint_step(str(dest / "far")) == 200  # what the next sweep resumes from
  slim = tmp_path / "slim.tgz"
  assert main(["pack", str(root), str(slim), "--slim"]) == 0
  with tarfile.open(slim) as tar:
    names = sorted(tar.getnames())
  assert names == sorted(["sweep.json"] + [r for r in results if not r.endswith("metrics.jsonl")])


def test_pack_refuses_bad_input_in_one_line_and_overwrites_nothing(tmp_path, capsys):
  from launch.__main__ import main

  root = tmp_path / "root"
  root.mkdir()
  _packable_run(root, "a", "done")
  existing = tmp_path / "old.tgz"
  existing.write_text("keep me")
  (tmp_path / "parts.tgz.part-000").write_text("keep me too")
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [([str(root), str(existing)], "exists: launch pack overwrites nothing"),
           ([str(root), str(tmp_path / "parts.tgz"), "--part-mb", "1"], "parts.tgz.part-000 exists"),
           ([str(empty), str(tmp_path / "x.tgz")], "holds no run directories"),
           ([str(tmp_path / "missing"), str(tmp_path / "x.tgz")], "is not a directory"),
           ([str(root), str(tmp_path / "x.tgz"), "--checkpoints-mb", "-1"], "must be ≥ 0"),
           ([str(root), str(tmp_path / "x.tgz"), "--part-mb", "0"], "--part-mb=0.0 > 0"),
           ([str(root), str(tmp_path / "no" / "x.tgz")], "folder of OUT")]
  for argv, message in cases:
    assert main(["pack", *argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, (argv, err)
  assert existing.read_text() == "keep me" and (tmp_path / "parts.tgz.part-000").read_text() == "keep me too"
  assert not (tmp_path / "x.tgz").exists()


def test_unpack_merges_an_archive_and_never_replaces_a_run_trained_further_here(tmp_path, capsys):
  """``launch unpack ROOT PARTS…``: into an empty root it restores exactly what was packed (parts given in
  order, checkpoints included); into a root whose copy of a run is further trained (a later step, or done)
  it keeps that run as it is, while a run the archive holds further trained replaces the local files
  and adds its checkpoint (logs and older checkpoints stay)."""
  from launch.__main__ import main

  slot = tmp_path / "slot"
  slot.mkdir()
  (slot / "sweep.json").write_text('{"slot": 1}')
  _packable_run(slot, "ahead-there", "running", checkpoints=(300,))
  _packable_run(slot, "ahead-here", "running", checkpoints=(100,))
  _packable_run(slot, "done-here", "running", checkpoints=(500,))
  _packable_run(slot, "new", "done")
  out = tmp_path / "out" / "s.tgz"
  out.parent.mkdir()
  assert main(["pack", str(slot), str(out), "--checkpoints-mb", "1", "--part-mb", "0.002"]) == 0
  parts = sorted(str(p) for p in out.parent.iterdir())
  assert len(parts) > 1

  fresh = tmp_path / "fresh"
  assert main(["unpack", str(fresh), *parts]) == 0
  assert "4 run(s) added, 0 updated" in capsys.readouterr().out
  for rel in ("sweep.json", "ahead-there/summary.json", "ahead-there/checkpoints/300/state/data", "new/eval/retrieval.json"):
    assert (fresh / rel).read_bytes() == (slot / rel).read_bytes(), rel

  home = tmp_path / "home"
  home.mkdir()
  (home / "sweep.json").write_text('{"home": 1}')
  _packable_run(home, "ahead-there", "running", checkpoints=(200,))  # the archive's is at 300
  _packable_run(home, "ahead-here", "running", checkpoints=(100, 400))  # further than the archive's 100
  _packable_run(home, "done-here", "done", checkpoints=(50,))  # done beats the archive's step 500
  before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
  assert main(["unpack", str(home), *parts]) == 0
  assert "1 run(s) added, 1 updated (further trained in the archive), 2 kept" in capsys.readouterr().out
  for kept in ("ahead-here", "done-here"):
    assert {p: p.read_bytes() for p in (home / kept).rglob("*") if p.is_file()} == {
        p: b for p, b in before.items() if kept in p.parts}
  assert (home / "sweep.json").read_text() == '{"home": 1}'
  updated = home / "ahead-there"
  assert json.loads((updated / "summary.json").read_text())["step"] == 300
  assert runs.latest_checkpoint_step(str(updated)) == 300
  assert (updated / "checkpoints" / "200" / "state" / "data").exists() and (updated / "launch.log").exists()
  assert (home / "new" / "config.json").exists()
  # a run that a process is training here now is never written under, however far the archive's went
  busy = tmp_path / "busy"
  _packable_run(busy, "ahead-there", "running", checkpoints=(10,))
  with runs.run_lock(str(busy / "ahead-there")):
    assert main(["unpack", str(busy), *parts]) == 0
  assert json.loads((busy / "ahead-there" / "summary.json").read_text())["step"] == 10


def test_unpack_refuses_an_unsafe_or_unreadable_archive_before_writing_anything(tmp_path, capsys):
  import io

  from launch.__main__ import main

  evil = tmp_path / "evil.tgz"
  with tarfile.open(evil, "w:gz") as tar:
    for name in ("run/config.json", "../escape.txt"):
      info = tarfile.TarInfo(name)
      info.size = 2
      tar.addfile(info, io.BytesIO(b"{}"))
  junk = tmp_path / "junk.tgz"
  junk.write_bytes(b"not an archive")
  (tmp_path / "a-file").write_text("x")
  root = tmp_path / "root"
  cases = [([str(root), str(evil)], "'../escape.txt' is not a plain file inside the sweep"),
           ([str(root), str(junk)], "not a readable .tgz archive"),
           ([str(root), str(tmp_path / "missing.tgz")], "does not exist"),
           ([str(tmp_path / "a-file"), str(evil)], "is a file, not a sweep directory")]
  for argv, message in cases:
    assert main(["unpack", *argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, (argv, err)
  assert not root.exists() and not (tmp_path / "escape.txt").exists()
  assert not list(tmp_path.glob(".unpack-*"))
