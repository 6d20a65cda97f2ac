"""What a run directory says about its run: status, progress, attempts — read by every backend and ``status``.

A run directory (``ROOT/RUNID``; its files are named in ``hybrids.rundir``) gains two files from the
launcher: ``launch.json`` (one entry per attempt: start/end time, host, pid, backend, job id, the
checkpoint step it resumed from, how it ended) and ``.lock`` (``hybrids.rundir.run_lock``: held with
``flock`` while a process trains the run, so two launches never train one run at once and ``status``
can tell running from killed; ``hybrids.train`` takes the same lock, so two trainers of one run
directory never interleave either). The lock's names are re-exported here for the launcher's callers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import stat
import time
import warnings

from hybrids import rundir
from hybrids.rundir import (  # noqa: F401  (re-exported: the launcher's view of a run directory)
    LAUNCH_FILE, LOCK_FILE, LOG_FILE, RunBusy, describe_holder, is_locked, lock_holder, now_iso, read_summary,
    run_lock)

# A run trained on another host counts as running while it wrote something this recently.
REMOTE_STALE_S = 900.0
# Set by the local launcher for each run it starts: how many processes share its device (group); kept in
# the run's attempts, so that its device time can be counted (attempt_device_seconds).
RUNS_PER_DEVICE_ENV = "HYBRIDS_RUNS_PER_DEVICE"
# Statuses a run can have; "pending" = nothing on disk yet.
STATUSES = ("pending", "running", "interrupted", "done", "failed", "diverged")


def passed_stop_accuracy(summary: dict) -> dict | None:
  """A run's ``early_stop`` when it is done because its own eval accuracy passed ``train.stop_at_accuracy``
  (which decides its cell); None otherwise, and for a run that stopped with its cell (``cell_decided_by``)."""
  early = summary.get("early_stop") if summary.get("status") == "done" else None
  return early if early and not early.get("cell_decided_by") else None


def stopped_with_cell(summary: dict) -> str | None:
  """The run that decided this one's cell, when this one stopped with it (``launch sweep --cell-stop``)."""
  early = summary.get("early_stop") if summary.get("status") == "done" else None
  return (early or {}).get("cell_decided_by")


def read_attempts(workdir: str) -> list[dict]:
  return rundir.read_json(os.path.join(workdir, LAUNCH_FILE)).get("attempts", [])


def failures(workdir: str) -> int:
  """Attempts that ended in an error (not interruptions or preemptions, which resume)."""
  return sum(1 for a in read_attempts(workdir) if a.get("status") == "failed")


def latest_checkpoint_step(workdir: str) -> int:
  """The newest step under ``checkpoints/`` (0 when none): where the next attempt resumes."""
  try:
    names = os.listdir(os.path.join(workdir, rundir.CHECKPOINTS_DIR))
  except OSError:
    return 0
  return max((int(n) for n in names if n.isdigit()), default=0)


def last_train_metrics(workdir: str, tail_bytes: int = 8192) -> dict:
  """The last ``{"step", "loss", ...}`` line of ``metrics.jsonl`` (reads only the file's tail)."""
  path = os.path.join(workdir, rundir.METRICS_FILE)
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - tail_bytes))
      lines = f.read().decode(errors="replace").splitlines()
  except OSError:
    return {}
  for line in reversed(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # the first line of the tail is usually cut, the last may be mid-write
    if "loss" in record:
      return record
  return {}


def last_update(workdir: str) -> float | None:
  """Newest modification time of the files a live run keeps writing."""
  times = []
  for name in (rundir.METRICS_FILE, rundir.SUMMARY_FILE, LAUNCH_FILE):
    with contextlib.suppress(OSError):
      times.append(os.path.getmtime(os.path.join(workdir, name)))
  return max(times) if times else None


def private_dir(path: str) -> str:
  """Create ``path`` (and its parents) as a directory only its owner can use (mode 0700), or make an
  existing one so; refuse one that is a symlink or belongs to another user. For directories whose
  files are executed or unpickled later (submitit's pickles, JAX's compiled programs)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with contextlib.suppress(FileExistsError):
    os.mkdir(path, 0o700)
  st = os.lstat(path)
  if not stat.S_ISDIR(st.st_mode):
    raise PermissionError(f"{path} is not a directory (a symlink or a file); refusing to use it")
  if st.st_uid != os.getuid():
    raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to you; refusing to load code from it")
  if stat.S_IMODE(st.st_mode) != 0o700:
    os.chmod(path, 0o700)
  parent = os.stat(os.path.dirname(os.path.abspath(path)))
  if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:  # world-writable, not sticky
    warnings.warn(f"{os.path.dirname(os.path.abspath(path))} is writable by others: they could replace {path}; "
                  "a sweep root must not be writable by others", stacklevel=2)
  return path


def start_attempt(workdir: str, **info) -> int:
  """Append an attempt to ``launch.json``; returns its number (1-based)."""
  path = os.path.join(workdir, LAUNCH_FILE)
  record = rundir.read_json(path)
  attempts = record.setdefault("attempts", [])
  attempts.append({"attempt": len(attempts) + 1, "started": now_iso(), "ended": None, "host": socket.gethostname(),
                   "pid": os.getpid(), "status": "running", **info})
  rundir.write_json(path, record)
  return len(attempts)


def end_attempt(workdir: str, status: str, **info) -> None:
  """Close the last attempt (with the devices it trained on, from ``summary.json``'s ``hardware``) and
  mirror ``attempts`` / ``resumed_from`` into ``summary.json``."""
  path = os.path.join(workdir, LAUNCH_FILE)
  record = rundir.read_json(path)
  attempts = record.get("attempts") or [{"attempt": 1}]
  summary = read_summary(workdir)
  hardware = summary.get("hardware") if isinstance(summary, dict) else None
  if isinstance(hardware, dict):
    info = {"device_kind": hardware.get("device_kind"), "device_count": hardware.get("device_count"), **info}
  attempts[-1].update({"ended": now_iso(), "status": status, **info})
  record["attempts"] = attempts
  rundir.write_json(path, record)
  if summary:
    summary["attempts"] = len(attempts)
    summary["resumed_from"] = [a.get("resumed_from", 0) for a in attempts]
    rundir.write_summary(workdir, summary)


def run_state(workdir: str) -> dict:
  """``{"status", "step", "steps", "loss", "attempts", "failures", "updated"}`` of one run directory.

  ``status`` is one of :data:`STATUSES`. A summary that says "running" while nobody holds the run's
  lock belongs to a process that was killed: the run is "interrupted" (it resumes on relaunch) —
  unless the attempt runs on another host and wrote within :data:`REMOTE_STALE_S`.
  """
  summary = read_summary(workdir)
  attempts = read_attempts(workdir)
  updated = last_update(workdir)
  if is_locked(workdir):
    status = "running"
  elif not summary:
    status = "pending" if not attempts else ("failed" if attempts[-1].get("status") == "failed" else "interrupted")
  else:
    status = summary.get("status", "running")
    if status == "running":
      # Another host's lock may be invisible here (no flock across that filesystem): trust a recent heartbeat.
      remote = attempts and attempts[-1].get("host") not in (None, socket.gethostname())
      fresh = updated is not None and time.time() - updated < REMOTE_STALE_S
      status = "running" if remote and fresh else "interrupted"
  metrics = last_train_metrics(workdir)
  step = max(metrics.get("step", 0), summary.get("step", 0) if status != "running" else 0)
  loss = metrics.get("loss") if metrics else summary.get("train_loss")
  return {"status": status, "step": step, "steps": summary.get("steps"), "loss": loss,
          "attempts": len(attempts), "failures": sum(1 for a in attempts if a.get("status") == "failed"),
          "updated": updated, "eval": summary.get("eval"), "summary": summary}


def attempt_device_seconds(attempt: dict) -> float | None:
  """The device time one attempt used: its wall time × its devices ÷ the processes that shared them
  (``runs_per_device``) ÷ the runs trained in its process (``group``, a lockstep group); None for an
  attempt with no end (still running, or killed before it could say)."""
  import datetime
  try:
    start = datetime.datetime.fromisoformat(attempt["started"])
    end = datetime.datetime.fromisoformat(attempt["ended"])
  except (KeyError, TypeError, ValueError):
    return None
  devices = attempt.get("device_count") or 1
  share = (attempt.get("runs_per_device") or 1) * (attempt.get("group") or 1)
  return max(0.0, (end - start).total_seconds()) * devices / share
