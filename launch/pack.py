"""``python -m launch pack ROOT OUT.tgz``: a sweep's results as one archive, to carry off a short GPU slot.

    python -m launch pack runs/zoology_mqar-figure2 /tmp/out/z2.tgz
    python -m launch pack runs/zoology_mqar-figure2 /tmp/out/z2.tgz --checkpoints-mb 45 --part-mb 15
    mkdir -p runs/z2 && cat /tmp/out/z2.tgz* | tar xzf - -C runs/z2      # where the sweep goes on

GPU time often comes in slots a few minutes long on machines whose disks vanish afterwards, and only a
few files come back from them. The sweep is idempotent, so what must come back is what ``launch status``,
``launch report`` and the next ``launch sweep`` read: for every run directory under ROOT its
``config.json``, ``summary.json``, ``launch.json`` (attempts: failures count towards ``--max-retries``),
``metrics.jsonl`` and ``eval/*.json``, and ROOT's ``sweep.json`` — not TensorBoard events or logs.

``--checkpoints-mb MB`` adds the newest checkpoint of unfinished runs, the furthest trained first,
while their total stays within MB (a run that does not fit is skipped, a smaller one after it may
still fit): unpacked beside the results, the next slot resumes those runs instead of restarting them.
``--part-mb MB`` splits the archive into ``OUT.part-000``, ``OUT.part-001``, … of at most MB each
(for transfers that cap a file's size); ``cat OUT.part-* | tar xzf -`` joins them.

Nothing is overwritten: an existing OUT (or its parts) is an error, as are a ROOT with no run
directories and a non-positive size, each one line, exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import tarfile

from hybrids import rundir
from launch import runs

SWEEP_FILE = "sweep.json"
RUN_FILES = (rundir.CONFIG_FILE, rundir.SUMMARY_FILE, rundir.LAUNCH_FILE, rundir.METRICS_FILE)


class PackError(ValueError):
  """Bad input to ``launch pack``: one line, nothing written."""


def run_dirs(root: str) -> list[str]:
  """The run directories directly under ``root`` (those holding a ``config.json``), sorted."""
  return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, rundir.CONFIG_FILE)))


def _tree_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def result_files(root: str) -> list[str]:
  """Paths relative to ``root`` of every file a report or a resumed sweep reads (see the module doc)."""
  out = [SWEEP_FILE] if os.path.isfile(os.path.join(root, SWEEP_FILE)) else []
  for run in run_dirs(root):
    out += [os.path.join(run, name) for name in RUN_FILES if os.path.isfile(os.path.join(root, run, name))]
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


def pack(root: str, out: str, *, checkpoints_mb: float = 0.0, part_mb: float | None = None) -> dict:
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

  files = result_files(root)
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


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch pack", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("root", help="the sweep directory, e.g. runs/zoology_mqar-figure2")
  p.add_argument("out", help="the archive to write (.tgz); with --part-mb, the prefix of its parts")
  p.add_argument("--checkpoints-mb", type=float, default=0.0, metavar="MB",
                 help="also the newest checkpoint of unfinished runs, furthest trained first, up to MB in all")
  p.add_argument("--part-mb", type=float, default=None, metavar="MB", help="split the archive into parts of ≤ MB")
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    result = pack(args.root, args.out, checkpoints_mb=args.checkpoints_mb, part_mb=args.part_mb)
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
