"""The run directory: the names of its files, atomic JSON writes, the config it holds, its summary, its lock.

One run directory ``WORKDIR`` holds one training run (DESIGN.md):

=========================  ==================================================================================
``config.json``            the resolved config without its ``runtime`` section: the run's identity, written
                           once and compared on every resume (a directory never receives another config)
``metrics.jsonl``          one line per logged step and per eval
``summary.json``           status, progress, counts, versions, hardware, evals, attempts
``tb/``                    TensorBoard events
``checkpoints/STEP/``      orbax checkpoints, each with ``checksums.json`` (sha256 of every file of the step)
``checksums_since.json``   the first step saved with checksums (an older step has none and is restored
                           unverified; a newer one without them was cut mid-save)
``corrupt_checkpoints/``   checkpoints that failed verification, moved out of orbax's way
``eval/NAME.json``         results of ``python -m hybrids.evaluate``
``launch.json``            the launcher's attempts (``launch.runs``)
``launch.log``             the launcher's log of the run
``.lock``                  ``flock``-ed while a process trains the run; names its holder
=========================  ==================================================================================

The trainer (``hybrids.train``), the evaluator (``hybrids.evaluate``) and the launcher (``launch``) name
these files and read or write them through this module, so each name is spelled once and every JSON
file is replaced atomically. Nothing here imports jax at import time: ``launch status`` and
``launch report`` stay fast.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import warnings
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"
CHECKPOINTS_DIR = "checkpoints"
CHECKSUM_FILE = "checksums.json"  # in checkpoints/STEP/
CHECKSUMS_SINCE_FILE = "checksums_since.json"
CORRUPT_DIR = "corrupt_checkpoints"
EVAL_DIR = "eval"
LAUNCH_FILE = "launch.json"
LOG_FILE = "launch.log"
LOCK_FILE = ".lock"


class RunDirectoryError(RuntimeError):
  """The run directory cannot be used for this config (it holds another run, or is damaged)."""


class RunBusy(RuntimeError):
  """Another process (or thread) trains this run."""


def now_iso() -> str:
  """The current UTC time as the run directory's files record it (ISO 8601, seconds)."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- JSON files

def write_json(path: str, obj: Any) -> None:
  """Write atomically: a killed process leaves the old file or the new one, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str, *, strict: bool = False) -> dict:
  """The JSON object in ``path``; ``{}`` when the file is missing or holds something other than an
  object. A file that cannot be read or parsed is ``{}`` too, unless ``strict`` (then it raises)."""
  try:
    with open(path) as f:
      content = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
    if strict:
      raise
    return {}
  return content if isinstance(content, dict) else {}


# ----------------------------------------------------------------------------- config.json

def config_json(config) -> dict:
  """What ``config.json`` holds and what identifies the run (its id hashes this): the resolved config
  without its runtime sections (placement: a run may resume on another mesh)."""
  from hybrids import config as config_lib

  return config_lib.identity(config)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(stored: dict, config) -> list[str]:
  """``"  FIELD: ON_DISK (on disk) != REQUESTED (requested)"`` for each field where the ``config.json``
  content ``stored`` and ``config`` differ; empty when they are the same run. A runtime section in
  ``stored`` (written by an older version) is ignored."""
  from hybrids import config as config_lib

  stored = config_lib.identity_of_json(stored)
  wanted = config_json(config)
  if stored == wanted:
    return []
  a, b = _flatten(stored), _flatten(wanted)
  return [f"  {k}: {a.get(k, '<absent>')!r} (on disk) != {b.get(k, '<absent>')!r} (requested)"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def holds_config(workdir: str, config) -> bool:
  """Whether ``workdir`` has a readable ``config.json`` of this very run."""
  try:
    stored = read_json(os.path.join(workdir, CONFIG_FILE), strict=True)
  except (OSError, ValueError):
    return False
  return bool(stored) and not config_differences(stored, config)


def prepare(config, workdir: str, *, write: bool = True) -> None:
  """Create ``workdir`` or check that it holds this very config; never overwrites another run.

  Raises :class:`RunDirectoryError` (naming every differing field) for a directory that holds another
  config, an unreadable ``config.json``, or checkpoints without one. ``write=False`` (processes other
  than 0) only checks, so that every process refuses alike.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      try:
        existing = json.load(f)
      except json.JSONDecodeError as e:
        raise RunDirectoryError(f"{path} is not valid JSON ({e}); refusing to overwrite it") from None
    diff = config_differences(existing, config)
    if diff:
      raise RunDirectoryError(
          f"{workdir} holds a run with a different config; refusing to resume into it. "
          "Use a new --workdir. Differences:\n" + "\n".join(diff))
  elif os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR)) and os.listdir(os.path.join(workdir, CHECKPOINTS_DIR)):
    raise RunDirectoryError(f"{workdir} has checkpoints but no {CONFIG_FILE}; refusing to reuse it")
  elif write:
    write_json(path, config_json(config))


# ----------------------------------------------------------------------------- summary.json

def read_summary(workdir: str, *, strict: bool = False) -> dict:
  """``summary.json`` (``{}`` when there is none; see :func:`read_json` for ``strict``)."""
  return read_json(os.path.join(workdir, SUMMARY_FILE), strict=strict)


def write_summary(workdir: str, summary: dict) -> None:
  write_json(os.path.join(workdir, SUMMARY_FILE), summary)


def append_to_summary(workdir: str, key: str, entries: list[dict]) -> None:
  """Append ``entries`` to ``summary.json[key]``, only when a summary exists. Raises
  :class:`RunDirectoryError` (naming the entries, which are not recorded) when it cannot be read: the
  file is left as found, as the trainer's strict read would refuse it too."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not entries or not os.path.exists(path):
    return
  try:
    summary = read_summary(workdir, strict=True)
  except (OSError, ValueError) as e:
    raise RunDirectoryError(f"{path} is unreadable ({type(e).__name__}: {e}); could not record "
                            f"{key}: {json.dumps(entries, default=str)}") from e
  summary[key] = list(summary.get(key) or []) + entries
  write_summary(workdir, summary)


# ----------------------------------------------------------------------------- the run's lock

# Locks this process holds: real path of the lock file → (thread that took it, depth). The launcher
# takes a run's lock and then calls ``hybrids.train.train``, which takes it again: the same thread
# re-enters; any other thread or process is refused.
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


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


def lock_holder(workdir: str) -> dict:
  """What the holder of the run's lock wrote into it: ``{"pid", "host", "since", "argv"}`` ({} if nothing)."""
  return read_json(os.path.join(workdir, LOCK_FILE))


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
