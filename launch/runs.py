"""What a run directory says about its run: status, progress, attempts — read by every backend and ``status``.

A run directory (``ROOT/RUNID``, see ``hybrids/train.py``) gains two files from the launcher:
``launch.json`` (one entry per attempt: start/end time, host, pid, backend, job id, the checkpoint step
it resumed from, how it ended) and ``.lock`` (held with ``flock`` while a process trains the run, so
two launches never train one run at once and ``status`` can tell running from killed; ``hybrids.train``
takes the same lock, so two trainers of one run directory never interleave either).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import threading
import time
import warnings

LAUNCH_FILE = "launch.json"
LOCK_FILE = ".lock"
LOG_FILE = "launch.log"
# A run trained on another host counts as running while it wrote something this recently.
REMOTE_STALE_S = 900.0
# Statuses a run can have; "pending" = nothing on disk yet.
STATUSES = ("pending", "running", "interrupted", "done", "failed", "diverged")


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def _write_json(path: str, obj) -> None:
  from hybrids.train import _write_json as write_atomically
  write_atomically(path, obj)


def read_summary(workdir: str) -> dict:
  return _read_json(os.path.join(workdir, "summary.json"))


def read_attempts(workdir: str) -> list[dict]:
  return _read_json(os.path.join(workdir, LAUNCH_FILE)).get("attempts", [])


def failures(workdir: str) -> int:
  """Attempts that ended in an error (not interruptions or preemptions, which resume)."""
  return sum(1 for a in read_attempts(workdir) if a.get("status") == "failed")


def latest_checkpoint_step(workdir: str) -> int:
  """The newest step under ``checkpoints/`` (0 when none): where the next attempt resumes."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except OSError:
    return 0
  return max((int(n) for n in names if n.isdigit()), default=0)


def last_train_metrics(workdir: str, tail_bytes: int = 8192) -> dict:
  """The last ``{"step", "loss", ...}`` line of ``metrics.jsonl`` (reads only the file's tail)."""
  path = os.path.join(workdir, "metrics.jsonl")
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
  for name in ("metrics.jsonl", "summary.json", LAUNCH_FILE):
    with contextlib.suppress(OSError):
      times.append(os.path.getmtime(os.path.join(workdir, name)))
  return max(times) if times else None


def is_locked(workdir: str) -> bool:
  """Whether some live process holds the run's lock (i.e. trains it now)."""
  path = os.path.join(workdir, LOCK_FILE)
  if not os.path.exists(path):
    return False
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
  return False


class RunBusy(RuntimeError):
  """Another process trains this run."""


# Locks this process holds: real path of the lock file → (thread that took it, depth). The launcher
# takes a run's lock and then calls ``hybrids.train.train``, which takes it again: the same thread
# re-enters; any other thread or process is refused.
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def lock_holder(workdir: str) -> dict:
  """What the holder of the run's lock wrote into it: ``{"pid", "host", "since", "argv"}`` ({} if nothing)."""
  return _read_json(os.path.join(workdir, LOCK_FILE))


def describe_holder(holder: dict) -> str:
  if not holder.get("pid"):
    return "an unknown process (its lock file names none)"
  argv = " ".join(holder.get("argv") or [])[:200]
  return (f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('since', '?')}"
          + (f" ({argv})" if argv else ""))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def run_lock(workdir: str, wait_s: float = 0.0):
  """Hold the run's lock (``flock`` on ``WORKDIR/.lock``) for the whole block; released on any exit,
  a SIGKILL included (the kernel drops a dead process's flock).

  Waits up to ``wait_s`` for another holder (e.g. a killed sweep's child still writing its SIGTERM
  checkpoint), then raises :class:`RunBusy` naming the holder (pid, host, start, command line, which
  the holder writes into the lock file). The thread that holds the lock may take it again (the
  launcher holds it around ``train()``, which takes it too). A lock file left by a process that died
  holding it is recovered, with a warning that names the dead process.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  me = threading.get_ident()
  with _HELD_GUARD:
    held = _HELD.get(path)
    if held is not None and held[0] == me:
      _HELD[path] = (me, held[1] + 1)
  if held is not None and held[0] == me:
    try:
      yield
    finally:
      with _HELD_GUARD:
        _HELD[path] = (me, _HELD[path][1] - 1)
    return
  f = open(path, "a")
  deadline = time.monotonic() + wait_s
  try:
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise  # e.g. a filesystem without locks: say so rather than call the run busy forever
        if time.monotonic() >= deadline:
          raise RunBusy(f"{workdir} is being trained by another process: "
                        f"{describe_holder(lock_holder(workdir))} holds its {LOCK_FILE}") from None
        time.sleep(0.2)
    previous = lock_holder(workdir)
    if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
      alive = previous.get("host") == socket.gethostname() and _pid_alive(int(previous["pid"]))
      warnings.warn(f"{workdir}: recovered the stale lock of {describe_holder(previous)}"
                    + (" (that pid is alive but no longer holds the lock)" if alive else " (no longer running)"),
                    stacklevel=3)
    f.truncate(0)
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
                        "argv": list(sys.argv)}) + "\n")
    f.flush()
    with _HELD_GUARD:
      _HELD[path] = (me, 1)
    try:
      yield
    finally:
      with _HELD_GUARD:
        _HELD.pop(path, None)
      with contextlib.suppress(OSError):
        f.truncate(0)  # a clean release leaves no holder behind; a killed holder's record stays (stale)
  finally:
    f.close()  # closing releases the flock


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
  record = _read_json(path)
  attempts = record.setdefault("attempts", [])
  attempts.append({"attempt": len(attempts) + 1, "started": now_iso(), "ended": None, "host": socket.gethostname(),
                   "pid": os.getpid(), "status": "running", **info})
  _write_json(path, record)
  return len(attempts)


def end_attempt(workdir: str, status: str, **info) -> None:
  """Close the last attempt and mirror ``attempts`` / ``resumed_from`` into ``summary.json``."""
  path = os.path.join(workdir, LAUNCH_FILE)
  record = _read_json(path)
  attempts = record.get("attempts") or [{"attempt": 1}]
  attempts[-1].update({"ended": now_iso(), "status": status, **info})
  record["attempts"] = attempts
  _write_json(path, record)
  summary_path = os.path.join(workdir, "summary.json")
  summary = _read_json(summary_path)
  if summary:
    summary["attempts"] = len(attempts)
    summary["resumed_from"] = [a.get("resumed_from", 0) for a in attempts]
    _write_json(summary_path, summary)


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
