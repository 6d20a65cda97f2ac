"""``python -m launch sweep EXPERIMENT --root DIR``: run every point of an experiment's sweep.

Backends beyond sequential local execution (parallel local, SLURM, TPU VM, XPK) are not built yet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  sweep = sub.add_parser("sweep", help="run every point of experiments/NAME.py's get_sweep(h)")
  sweep.add_argument("experiment", help="experiment file, e.g. experiments/quickstart.py")
  sweep.add_argument("--root", default=None, help="parent of the run directories (default runs/NAME)")
  sweep.add_argument("--dry-run", action="store_true", help="list the points and run ids, run nothing")
  sweep.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from hybrids.config import ConfigError
  from launch import sweep as sweep_lib

  name = os.path.splitext(os.path.basename(args.experiment))[0]
  root = args.root or os.path.join("runs", name)
  try:
    if args.dry_run:
      for rid, point, _ in sweep_lib.expand(args.experiment):
        print(rid, json.dumps(point))
      return 0
    rows = sweep_lib.run_local(args.experiment, root, progress=not args.no_progress)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  table = sweep_lib.format_table(rows)
  print("\n" + table)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(f"# {name}\n\n```\n{table}\n```\n")
  print(f"\nresults: {os.path.abspath(root)}/results.md (run directories beside it)")
  return 0 if all(r.get("status") == "done" for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
