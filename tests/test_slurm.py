"""The SLURM backend on a real single-node SLURM cluster started on localhost for this test.

    PYTHONPATH=. python -m pytest -q -n 0 tests/test_slurm.py

Installs Debian's ``slurmctld slurmd slurm-client munge`` when they are missing (root with apt-get, as
on CI), writes a ``slurm.conf`` for this host in a temp dir (``proctrack/linuxproc``, ``task/none``,
state and spool in the temp dir, ``auth/none`` when the plugin is installed, else munge with a key made
here), starts the daemons, submits a 4-point sweep as one job array through
``python -m launch sweep --backend slurm``, preempts one job mid-run the way submitit does
(``scancel --signal=USR2``), and checks that all four finish, the preempted one resumed from its
checkpoint with continuous metrics, and that a shell-breaking config string ran nothing. Skipped —
loudly — only when the packages cannot be installed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "quickstart.py")
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
STEPS = 400

EXPERIMENT = '''
"""Four tiny points for the SLURM test."""
from hybrids.config import get_config as _get_config

def get_config(arg=None):
  return _get_config({quickstart!r} + ":tiny", {{
      "train.steps": {steps}, "train.checkpoint_every": 1000, "train.eval_every": 0,
      "model.pattern": ("swa",), "model.n_layers": 1}})

def get_sweep(h):
  # Seeds only: one compiled program for all four runs (and the resumed one), via JAX's compilation cache.
  return h.product([h.sweep("seed", [0, 1, 2, 3]), h.sweep("data.files", [{files!r}])])
'''


def _install_failure() -> str | None:
  """None when the SLURM daemons are available (installing them if we can), else why not."""
  if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "sinfo")):
    return None
  if os.geteuid() != 0 or not shutil.which("apt-get"):
    return "slurmctld is not installed and apt-get cannot run here (not root, or not Debian)"
  env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
  try:
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:  # a fresh machine has no package lists yet
      subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
      done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"apt-get install {' '.join(PACKAGES)} failed: {e}"
  if done.returncode:
    return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr[-800:]}"
  return None if shutil.which("slurmctld") else "slurmctld still not on PATH after apt-get install"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _slurm_conf(tmp: str, host: str, auth_lines: list[str]) -> str:
  lines = [
      "ClusterName=hybridstest", f"SlurmctldHost={host}(127.0.0.1)",
      f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "SlurmUser=root", "SlurmdUser=root",
      *auth_lines,
      f"StateSaveLocation={tmp}/state", f"SlurmdSpoolDir={tmp}/spool",
      f"SlurmctldPidFile={tmp}/slurmctld.pid", f"SlurmdPidFile={tmp}/slurmd.pid",
      f"SlurmctldLogFile={tmp}/slurmctld.log", f"SlurmdLogFile={tmp}/slurmd.log",
      "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
      "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
      # Requeued jobs wait for cred_expire before they may start again (default 120 s); the scheduler
      # looks at pending jobs every sched_interval seconds (default 60).
      "SchedulerParameters=sched_interval=2", "MpiDefault=none", "ReturnToService=2",
      "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
      "JobCompType=jobcomp/none", "JobRequeue=1", "KillWait=30", "MinJobAge=600",
      f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
      f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
  ]
  path = os.path.join(tmp, "slurm.conf")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _stop(pid_file: str) -> None:
  try:
    pid = int(open(pid_file).read().strip())
  except (OSError, ValueError):
    return
  try:
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
      os.kill(pid, 0)
      time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
  reason = _install_failure()
  if reason:
    message = f"SLURM TEST SKIPPED — the SLURM backend is NOT tested on this machine: {reason}"
    warnings.warn(message)
    print("\n" + "!" * 100 + "\n" + message + "\n" + "!" * 100, file=sys.stderr)
    pytest.skip(message)
  tmp = str(tmp_path_factory.mktemp("slurm"))
  for d in ("state", "spool"):
    os.makedirs(os.path.join(tmp, d))
  host = socket.gethostname().split(".")[0]
  procs_started = [os.path.join(tmp, "slurmctld.pid"), os.path.join(tmp, "slurmd.pid")]
  if glob.glob("/usr/lib/*/slurm*/auth_none.so") + glob.glob("/usr/lib/slurm*/auth_none.so"):
    auth = ["AuthType=auth/none", "CredType=cred/none", "AuthInfo=cred_expire=5"]
  else:  # munge with a key of our own, on a socket of our own
    key, sock = os.path.join(tmp, "munge.key"), os.path.join(tmp, "munge.sock")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={tmp}/munged.pid", f"--log-file={tmp}/munged.log", f"--seed-file={tmp}/munge.seed"],
                   check=True, timeout=30)
    procs_started.append(os.path.join(tmp, "munged.pid"))
    auth = ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock},cred_expire=5"]
  env = {**os.environ, "SLURM_CONF": _slurm_conf(tmp, host, auth)}
  try:
    subprocess.run(["slurmctld", "-c"], env=env, check=True, timeout=60)
    subprocess.run(["slurmd", "-c", "-N", host], env=env, check=True, timeout=60)
    deadline = time.time() + 60
    state = ""
    while time.time() < deadline:
      state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
      if state == "idle":
        break
      time.sleep(0.5)
    assert state == "idle", f"the test cluster's node is {state!r}; logs in {tmp}"
    yield env
  finally:
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
    if jobs:
      subprocess.run(["scancel", *jobs], env=env, capture_output=True)
      for _ in range(60):
        if not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
          break
        time.sleep(0.5)
    for pid_file in reversed(procs_started):
      _stop(pid_file)


def _metric_steps(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f if '"loss"' in line]
  except OSError:
    return []


def test_slurm_sweep_requeues_preempted_job_and_resumes(slurm_env, tmp_path):
  from launch import runs, status
  from launch import sweep as sweep_lib

  pwned = tmp_path / "pwned"
  payload = f"x'; touch {pwned}; echo '"
  exp = tmp_path / "slurmsweep.py"
  exp.write_text(EXPERIMENT.format(quickstart=QUICKSTART, steps=STEPS, files=payload))
  root = tmp_path / "root"
  env = {**slurm_env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,  # sbatch passes this environment on
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  submitted = subprocess.run(
      [sys.executable, "-m", "launch", "sweep", str(exp), "--root", str(root), "--backend", "slurm",
       "--max-parallel", "2", "--slurm-cpus-per-task", "1", "--slurm-time-min", "20"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert submitted.returncode == 0, submitted.stdout + submitted.stderr
  assert submitted.stdout.count("SLURM job") == 4
  workdirs = [str(root / rid) for rid, _, _ in sweep_lib.expand(str(exp))]

  # Preempt the first run that is well into training, the way submitit's own tests do.
  deadline, victim = time.time() + 300, None
  while victim is None and time.time() < deadline:
    for w in workdirs:
      if len(_metric_steps(w)) >= 5 and runs.read_attempts(w):
        victim = w
        break
    time.sleep(0.05)
  assert victim, "no job started training within 300 s"
  job_id = runs.read_attempts(victim)[-1]["job_id"]
  sent = []
  for _ in range(5):  # until the preempted attempt has checkpointed and ended
    try:
      done = subprocess.run(["scancel", "--signal=USR2", job_id], env=env, capture_output=True, text=True, timeout=2)
      sent.append((done.returncode, done.stderr.strip()))
    except subprocess.TimeoutExpired:
      # slurmctld can answer "Job can not be altered now" (the signal may still have reached the step);
      # scancel then retries every 5+ s, and a late retry would hit the requeued job as it starts.
      sent.append(("timeout", ""))
    deadline = time.time() + 10
    while time.time() < deadline and runs.read_attempts(victim)[0].get("status") == "running":
      time.sleep(0.1)
    if runs.read_attempts(victim)[0].get("status") != "running":
      break
  assert runs.read_attempts(victim)[0]["status"] == "interrupted", (sent, runs.read_attempts(victim))

  # summary.json says "done" a moment before the attempt record is closed and the run's lock freed;
  # `status` reports "running" until then, so wait for both.
  deadline = time.time() + 600
  while time.time() < deadline:
    table = status.format_status(status.collect(str(root)))
    if all(runs.read_summary(w).get("status") == "done" for w in workdirs) and "4 run(s): 4 done" in table:
      break
    time.sleep(1)
  logs = "\n".join(open(p).read()[-1500:] for p in glob.glob(str(root / ".submitit" / "*" / "*.err")))
  assert all(runs.read_summary(w).get("status") == "done" for w in workdirs), table + "\n" + logs
  assert "4 run(s): 4 done" in table

  attempts = runs.read_attempts(victim)
  assert [a["status"] for a in attempts] == ["interrupted", "done"], (sent, attempts)
  assert attempts[0]["job_id"] == attempts[1]["job_id"] == job_id  # requeued, not resubmitted
  assert 0 < attempts[0]["step"] == attempts[1]["resumed_from"] < STEPS
  assert runs.read_summary(victim)["resumed_from"] == [0, attempts[0]["step"]]
  for w in workdirs:
    assert _metric_steps(w) == list(range(1, STEPS + 1))
    assert json.loads(open(os.path.join(w, "config.json")).read())["data"]["files"] == payload
  assert not pwned.exists()
