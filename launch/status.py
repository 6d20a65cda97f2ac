"""``python -m launch status ROOT/NAME``: a table of a sweep's runs from their run directories.

    python -m launch status runs/quickstart

One row per point of ``ROOT/sweep.json`` (points without a directory yet are "pending") plus any other
run directory under ROOT: status (pending / running / interrupted / done / failed / diverged), step,
last training loss, attempts and the time since the run last wrote anything. "running" means a live
process holds the run's lock; a run whose process was killed shows as "interrupted" and resumes on
the next ``launch sweep``. A pending or interrupted run whose cell (the points that differ from it only
in ``train.lr``) has a run that passed ``train.stop_at_accuracy`` shows "(cell decided)": ``launch
sweep --cell-stop`` does not launch it. Reads only files; works while a sweep runs, from any backend.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from hybrids import rundir
from launch import runs
from launch import sweep as sweep_lib

COLUMNS = ("run", "point", "status", "step", "loss", "attempts", "last update")


def collect(root: str) -> list[dict]:
  """``[{"run", "point", "workdir", **run_state}]`` for the manifest's points and every run directory."""
  manifest = sweep_lib.read_manifest(root) or {}
  rows, seen = [], set()
  for entry in manifest.get("points", []):
    rid = entry["run_id"]
    seen.add(rid)
    rows.append({"run": rid, "point": entry.get("point", {}), "workdir": os.path.join(root, rid)})
  if os.path.isdir(root):
    for name in sorted(os.listdir(root)):
      workdir = os.path.join(root, name)
      if name not in seen and any(os.path.exists(os.path.join(workdir, f)) for f in (rundir.CONFIG_FILE, rundir.LAUNCH_FILE)):
        rows.append({"run": name, "point": {}, "workdir": workdir})
  for row in rows:
    row.update(runs.run_state(row["workdir"]))
  _mark_decided_cells(rows)
  return rows


def _mark_decided_cells(rows: list[dict]) -> None:
  """Append " (cell decided)" to the status of pending / interrupted rows whose cell (same point but
  ``train.lr``) holds a run done by passing ``train.stop_at_accuracy`` itself."""
  import json

  cell = lambda row: (json.dumps({k: v for k, v in row["point"].items() if k != "train.lr"}, sort_keys=True)
                      if "train.lr" in row.get("point", {}) else None)
  decided = set()
  for row in rows:
    if cell(row) is not None and runs.passed_stop_accuracy(runs.read_summary(row["workdir"])):
      decided.add(cell(row))
  for row in rows:
    if row.get("status") in ("pending", "interrupted") and cell(row) in decided:
      row["status"] += " (cell decided)"


def _ago(t: float | None, now: float) -> str:
  if t is None:
    return "—"
  s = max(0, int(now - t))
  if s < 60:
    return f"{s}s ago"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s ago"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m ago"
  return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def table_rows(rows: list[dict], now: float | None = None) -> list[tuple[str, ...]]:
  now = time.time() if now is None else now
  out = []
  for r in rows:
    steps = r.get("steps")
    step = f"{r.get('step') or 0}/{steps}" if steps else (str(r["step"]) if r.get("step") else "—")
    loss = "—" if r.get("loss") is None else f"{r['loss']:.4f}"
    point = " ".join(f"{k}={v}" for k, v in (r.get("point") or {}).items()) or "—"
    out.append((r["run"], point, r.get("status", "?"), step, loss, str(r.get("attempts", 0)),
                _ago(r.get("updated"), now)))
  return out


def format_status(rows: list[dict], now: float | None = None) -> str:
  lines = table_rows(rows, now)
  widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *lines)]
  fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  counts = {}
  for r in rows:
    counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
  total = f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
  return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines] + ["", total])


def describe(row: dict) -> str:
  """One line for logs: ``running (step 37/400, loss 2.3141)``."""
  parts = []
  if row.get("step"):
    parts.append(f"step {row['step']}" + (f"/{row['steps']}" if row.get("steps") else ""))
  if row.get("loss") is not None:
    parts.append(f"loss {row['loss']:.4f}")
  return row.get("status", "?") + (f" ({', '.join(parts)})" if parts else "")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch status", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root", help="the sweep directory, e.g. runs/quickstart")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.root):
    print(f"error: {args.root} is not a directory (expected a sweep root such as runs/quickstart)", file=sys.stderr)
    return 2
  rows = collect(args.root)
  if not rows:
    print(f"error: {args.root} holds no {sweep_lib.MANIFEST_FILE} and no run directories", file=sys.stderr)
    return 2
  print(format_status(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
