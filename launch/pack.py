"""``python -m launch pack ROOT OUT.tgz`` / ``unpack ROOT ARCHIVE…``: a sweep's results as one archive, to
carry off a short GPU slot, and merged back into a sweep without losing newer work.

    python -m launch pack runs/zoology_mqar-figure2 /tmp/out/z2.tgz
    python -m launch pack runs/zoology_mqar-figure2 /tmp/out/z2.tgz --checkpoints-mb 45 --part-mb 15
    python -m launch unpack runs/zoology_mqar-figure2 /tmp/out/z2.tgz.part-*   # where the sweep goes on

GPU time often comes in slots a few minutes long on machines whose disks vanish afterwards, and only a
few files come back from them. The sweep is idempotent, so what must come back is what ``launch status``,
``launch report`` and the next ``launch sweep`` read: for every run directory under ROOT its
``config.json``, ``summary.json``, ``launch.json`` (attempts: failures count towards ``--max-retries``),
``metrics.jsonl``, ``checksums_since.json`` (so a carried checkpoint is verified on restore) and
``eval/*.json``, and ROOT's ``sweep.json`` — not TensorBoard events or logs.

``--checkpoints-mb MB`` adds the newest checkpoint of unfinished runs, the furthest trained first,
while their total stays within MB (a run that does not fit is skipped, a smaller one after it may
still fit): unpacked beside the results, the next slot resumes those runs instead of restarting them.
``--part-mb MB`` splits the archive into ``OUT.part-000``, ``OUT.part-001``, … of at most MB each
(for transfers that cap a file's size); ``cat OUT.part-* | tar xzf -`` joins them. ``--slim`` leaves the
metrics logs out: the archive a report's directory commits (``experiments/results/*/runs.tgz``).

Nothing is overwritten: an existing OUT (or its parts) is an error, as are a ROOT with no run
directories and a non-positive size, each one line, exit 2, before anything is written.

``unpack`` takes an archive (or its parts, in order) and merges it into ROOT run by run: a run ROOT
lacks is added; a run the archive holds further trained (a later step, or done where ROOT's is not)
replaces ROOT's files and adds its checkpoint, unless a process is training it here now; any other run
is kept as ROOT has it, so an old archive unpacked over newer results changes nothing. ``sweep.json`` is taken only where ROOT has none. A member
outside its run directory (an absolute path, ``..``, a link) refuses the whole archive before anything
is written; so do a missing archive and a ROOT that is a file.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import shutil
import sys
import tarfile
import tempfile

from hybrids import rundir
from launch import runs

SWEEP_FILE = "sweep.json"
# (checksums_since.json: from which step the checkpoints carry checksums, so a carried one is verified)
RUN_FILES = (rundir.CONFIG_FILE, rundir.SUMMARY_FILE, rundir.LAUNCH_FILE, rundir.METRICS_FILE,
             rundir.CHECKSUMS_SINCE_FILE)


class PackError(ValueError):
  """Bad input to ``launch pack``: one line, nothing written."""


def run_dirs(root: str) -> list[str]:
  """The run directories directly under ``root`` (those holding a ``config.json``), sorted."""
  return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, rundir.CONFIG_FILE)))


def _tree_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def result_files(root: str, *, slim: bool = False) -> list[str]:
  """Paths relative to ``root`` of every file a report or a resumed sweep reads (see the module doc);
  ``slim``: not the metrics logs (what a report of finished runs needs, small enough to commit)."""
  out = [SWEEP_FILE] if os.path.isfile(os.path.join(root, SWEEP_FILE)) else []
  names = [n for n in RUN_FILES if not (slim and n == rundir.METRICS_FILE)]
  for run in run_dirs(root):
    out += [os.path.join(run, name) for name in names if os.path.isfile(os.path.join(root, run, name))]
    out += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, run, rundir.EVAL_DIR, "*.json")))
  return out


def checkpoints_to_carry(root: str, budget_bytes: int) -> list[tuple[str, int, int]]:
  """``[(run's newest checkpoint dir relative to root, its step, its bytes)]`` of unfinished runs, the
  furthest trained first, greedily within ``budget_bytes``."""
  candidates = []
  for run in run_dirs(root):
    workdir = os.path.join(root, run)
    step = runs.latest_checkpoint_step(workdir)
    if not step or runs.run_state(workdir)["status"] == "done":
      continue
    path = os.path.join(run, rundir.CHECKPOINTS_DIR, str(step))
    candidates.append((path, step, _tree_bytes(os.path.join(root, path))))
  kept, total = [], 0
  for path, step, size in sorted(candidates, key=lambda c: (-c[1], c[0])):
    if total + size <= budget_bytes:
      kept.append((path, step, size))
      total += size
  return kept


class _PartWriter(io.RawIOBase):
  """A write-only stream cut into ``prefix.part-000``, ``-001``, … of at most ``part_bytes`` each."""

  def __init__(self, prefix: str, part_bytes: int):
    self.prefix, self.part_bytes, self.paths = prefix, part_bytes, []
    self._file, self._left = None, 0

  def writable(self):
    return True

  def write(self, data) -> int:
    view, n = memoryview(data), len(data)
    while view:
      if self._left == 0:
        if self._file:
          self._file.close()
        self.paths.append(f"{self.prefix}.part-{len(self.paths):03d}")
        self._file, self._left = open(self.paths[-1], "xb"), self.part_bytes
      chunk = view[:self._left]
      self._file.write(chunk)
      self._left -= len(chunk)
      view = view[len(chunk):]
    return n

  def close(self):
    if self._file:
      self._file.close()
    super().close()


def pack(root: str, out: str, *, checkpoints_mb: float = 0.0, part_mb: float | None = None,
         slim: bool = False) -> dict:
  """Write the archive (see the module doc); returns ``{"files", "runs", "carried", "paths", "bytes"}``
  (``carried``: :func:`checkpoints_to_carry`'s list)."""
  if not os.path.isdir(root):
    raise PackError(f"ROOT {root!r} is not a directory (a sweep's root, e.g. runs/quickstart)")
  if not run_dirs(root):
    raise PackError(f"ROOT {root!r} holds no run directories (none has a {rundir.CONFIG_FILE})")
  if checkpoints_mb < 0 or (part_mb is not None and part_mb <= 0):
    raise PackError(f"--checkpoints-mb={checkpoints_mb} must be ≥ 0 and --part-mb={part_mb} > 0")
  existing = [out] if os.path.exists(out) else []
  existing += sorted(glob.glob(glob.escape(out) + ".part-*"))
  if existing:
    raise PackError(f"{existing[0]} exists: launch pack overwrites nothing (choose another OUT or remove it)")
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise PackError(f"the folder of OUT {out!r} does not exist")

  files = result_files(root, slim=slim)
  ckpts = checkpoints_to_carry(root, int(checkpoints_mb * 2**20)) if checkpoints_mb else []
  stream = _PartWriter(out, int(part_mb * 2**20)) if part_mb else open(out, "xb")
  try:
    with tarfile.open(fileobj=stream, mode="w:gz") as tar:
      for rel in files:
        tar.add(os.path.join(root, rel), arcname=rel, recursive=False)
      for rel, _, _ in ckpts:
        tar.add(os.path.join(root, rel), arcname=rel)
  finally:
    stream.close()
  paths = stream.paths if part_mb else [out]
  return {"files": len(files), "runs": len(run_dirs(root)), "carried": ckpts, "paths": paths,
          "bytes": sum(os.path.getsize(p) for p in paths)}


# tarfile's own guard against members that escape (Python ≥ 3.11.4), on top of _check_member's.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class _PartReader(io.RawIOBase):
  """The concatenation of ``paths`` as one read-only stream (an archive's parts, in order)."""

  def __init__(self, paths: list[str]):
    self._paths, self._file = list(paths), None

  def readable(self):
    return True

  def readinto(self, buffer) -> int:
    while True:
      if self._file is None:
        if not self._paths:
          return 0
        self._file = open(self._paths.pop(0), "rb")
      n = self._file.readinto(buffer)
      if n:
        return n
      self._file.close()
      self._file = None

  def close(self):
    if self._file:
      self._file.close()
    super().close()


def _progress(summary: dict) -> tuple[bool, int]:
  """How far a run is, for comparing two copies of it: (done, step)."""
  step = summary.get("step") if isinstance(summary.get("step"), int) else 0
  return summary.get("status") == "done", step


def unpack(root: str, archives: list[str]) -> dict:
  """Merge ``archives`` (one archive, or its parts in order) into ``root`` (see the module doc); returns
  ``{"added", "updated", "kept"}``: run ids by what happened to them."""
  missing = [a for a in archives if not os.path.isfile(a)]
  if not archives or missing:
    raise PackError(f"archive {missing[0] if missing else ''!r} does not exist (give the .tgz, or all its parts "
                    "in order)")
  if os.path.exists(root) and not os.path.isdir(root):
    raise PackError(f"ROOT {root!r} is a file, not a sweep directory")
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  stream = _PartReader(archives)
  with tempfile.TemporaryDirectory(dir=parent, prefix=".unpack-") as scratch:  # same filesystem: moves
    try:
      with tarfile.open(fileobj=io.BufferedReader(stream), mode="r|gz") as tar:
        for member in tar:
          _check_member(member)
          tar.extract(member, scratch, set_attrs=False, **_DATA_FILTER)
    except (tarfile.TarError, EOFError, OSError) as e:
      raise PackError(f"{archives[0]}: not a readable .tgz archive ({e})") from None
    finally:
      stream.close()
    os.makedirs(root, exist_ok=True)
    result = {"added": [], "updated": [], "kept": []}
    if os.path.isfile(os.path.join(scratch, SWEEP_FILE)) and not os.path.exists(os.path.join(root, SWEEP_FILE)):
      shutil.move(os.path.join(scratch, SWEEP_FILE), os.path.join(root, SWEEP_FILE))
    for run in run_dirs(scratch):
      incoming, local = os.path.join(scratch, run), os.path.join(root, run)
      if not os.path.isdir(local):
        shutil.move(incoming, local)
        result["added"].append(run)
        continue
      theirs, ours = (_progress(runs.read_summary(workdir) or {}) for workdir in (incoming, local))
      if theirs <= ours or runs.is_locked(local):  # (a run training here now is never written under)
        result["kept"].append(run)
        continue
      for dirpath, _, files in os.walk(incoming):
        rel = os.path.relpath(dirpath, incoming)
        os.makedirs(os.path.join(local, rel), exist_ok=True)
        for name in files:
          os.replace(os.path.join(dirpath, name), os.path.join(local, rel, name))
      result["updated"].append(run)
  return result


def _check_member(member: tarfile.TarInfo) -> None:
  parts = member.name.split("/")
  if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
    raise PackError(f"archive member {member.name!r} is not a plain file inside the sweep (an absolute path, "
                    "'..' or a link): refusing the whole archive")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch pack", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("root", help="the sweep directory, e.g. runs/zoology_mqar-figure2")
  p.add_argument("out", help="the archive to write (.tgz); with --part-mb, the prefix of its parts")
  p.add_argument("--checkpoints-mb", type=float, default=0.0, metavar="MB",
                 help="also the newest checkpoint of unfinished runs, furthest trained first, up to MB in all")
  p.add_argument("--part-mb", type=float, default=None, metavar="MB", help="split the archive into parts of ≤ MB")
  p.add_argument("--slim", action="store_true", help="leave out the metrics logs (a report's archive to commit)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    result = pack(args.root, args.out, checkpoints_mb=args.checkpoints_mb, part_mb=args.part_mb, slim=args.slim)
  except PackError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  ckpts = result["carried"]
  carried = (f", {len(ckpts)} checkpoint(s) ({sum(c[2] for c in ckpts) / 2**20:.1f} MB: "
             + ", ".join(f"{os.path.dirname(os.path.dirname(p))}@{s}" for p, s, _ in ckpts) + ")") if ckpts else ""
  print(f"[launch] pack: {result['runs']} run(s), {result['files']} file(s){carried} → "
        f"{', '.join(result['paths'])} ({result['bytes'] / 2**20:.1f} MB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())


def unpack_main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch unpack", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("root", help="the sweep directory to merge into (made if missing)")
  p.add_argument("archives", nargs="+", help="the .tgz launch pack wrote, or all its parts in order")
  args = p.parse_args(argv)
  try:
    result = unpack(args.root, args.archives)
  except PackError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  kept = result["kept"]
  print(f"[launch] unpack into {args.root}: {len(result['added'])} run(s) added, {len(result['updated'])} updated "
        f"(further trained in the archive), {len(kept)} kept as they were (as far or further here)")
  return 0
