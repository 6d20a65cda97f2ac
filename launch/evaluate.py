"""``python -m launch evaluate ROOT --eval E[,E…] [--best] [--dry-run] [-- EVALUATE OPTIONS]``: run
``python -m hybrids.evaluate`` on every finished run of a sweep.

A survey's recall and long-context questions (issue 25: passkey / NIAH at the trained sizes, loss past
the window and past the training length) are asked of its trained runs, hundreds of them: one command
evaluates them all, resumes where it stopped, and leaves ``RUN/eval/<eval>.json`` where ``python -m
launch report`` reads it.

- Runs: every run of ``ROOT`` whose summary says ``done``; with ``--best`` only each cell's best
  learning rate (the run ``launch report`` keeps: :func:`launch.report.learning_rate_cells`), since a
  cell's losing rates answer nothing the best one does not.
- Idempotent: a run is skipped when every requested eval's ``eval/<eval>.json`` was computed at the
  run's final step (a run trained further since, or one missing an eval, is evaluated again, all the
  requested evals together).
- Options after ``--`` go to every ``hybrids.evaluate`` call unchanged (``--lengths``, ``--tasks``,
  ``--samples``, ``--face``, …); ``--eval`` and ``--workdir`` are this command's.
- Each run is one process (``python -m hybrids.evaluate``), one after the other, its output appended to
  ``RUN/launch.log``: a run that fails does not stop the others. Progress: one line a run, with the
  count, the elapsed time and an ETA.

Bad input (an eval name not in ``hybrids.evaluate.EVALS``, a ROOT without runs, ``--workdir`` or
``--eval`` after ``--``) is one line on stderr and exit status 2, before anything runs. Exit status 0:
every selected run evaluated or already up to date; 1: some evaluation failed (named); 130: stopped
(Ctrl-C; the same command goes on where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from hybrids import rundir

EVALUATE = ("-m", "hybrids.evaluate")
OWN_OPTIONS = ("--workdir", "--eval")  # this command sets them for each run


class EvaluateError(ValueError):
  """Bad input to ``launch evaluate``: one line, exit status 2."""


def parse_evals(text: str) -> list[str]:
  """``--eval``'s names, checked as ``hybrids.evaluate`` checks its own (one line naming the valid ones)."""
  from hybrids import evaluate

  try:
    return evaluate.parse_evals(text)
  except evaluate.EvalError as e:
    raise EvaluateError(str(e)) from None


def eval_step(run_dir: str, name: str) -> int | None:
  """The checkpoint step ``RUN/eval/<name>.json`` was computed at (None: absent or unreadable)."""
  try:
    with open(os.path.join(run_dir, rundir.EVAL_DIR, f"{name}.json")) as f:
      step = json.load(f).get("step")
  except (OSError, ValueError, AttributeError):
    return None
  return step if isinstance(step, int) else None


def plan(root: str, evals: list[str], *, best: bool) -> list[dict]:
  """One row per finished run selected: ``{"run", "workdir", "step", "action"}`` with action ``"evaluate"``
  or ``"skip (up to date)"``; runs in the report's order (cells sorted by label, then fields)."""
  from launch import report

  problems: list[str] = []
  try:
    runs = report.load_runs(root, problems)
  except report.ReportError as e:
    raise EvaluateError(str(e)) from None
  done = [r for r in runs if r.status == "done"]
  if best:
    report.assign_labels(runs)
    chosen = {r.run_id for r in report.best_runs(done, report.learning_rate_cells(done))}
    done = [r for r in done if r.run_id in chosen]
  rows = []
  for r in done:
    step = r.summary.get("step")
    current = all(eval_step(r.path, name) == step for name in evals)
    rows.append({"run": r.run_id, "workdir": r.path, "step": step,
                 "action": "skip (up to date)" if current else "evaluate"})
  return rows


def _eta(done: int, total: int, elapsed: float) -> str:
  if not done:
    return "ETA —"
  left = elapsed / done * (total - done)
  return f"ETA {int(left // 60)}m{int(left % 60):02d}s"


def run(root: str, evals: list[str], passthrough: list[str], *, best: bool, dry_run: bool) -> int:
  rows = plan(root, evals, best=best)
  todo = [row for row in rows if row["action"] == "evaluate"]
  which = "each cell's best run" if best else "every finished run"
  print(f"[launch] evaluate {','.join(evals)} on {which} of {root}: {len(rows)} run(s), {len(todo)} to evaluate, "
        f"{len(rows) - len(todo)} up to date", flush=True)
  failed = []
  start = time.monotonic()
  for i, row in enumerate(todo):
    argv = [sys.executable, *EVALUATE, "--workdir", row["workdir"], "--eval", ",".join(evals), *passthrough]
    if dry_run:
      print(" ".join(argv))
      continue
    with open(os.path.join(row["workdir"], rundir.LOG_FILE), "a") as log:
      log.write(f"\n# launch evaluate: {' '.join(argv[1:])}\n")
      log.flush()
      code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code:
      failed.append(row["run"])
    elapsed = time.monotonic() - start
    print(f"[launch] evaluate {i + 1}/{len(todo)} {row['run']} (step {row['step']}): "
          f"{'done' if not code else f'failed (exit {code}; see its launch.log)'}; "
          f"{int(elapsed)} s, {_eta(i + 1, len(todo), elapsed)}", flush=True)
  if failed:
    print(f"[launch] evaluate: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("root", help="the sweep directory, e.g. runs/mixer_survey-1m")
  p.add_argument("--eval", required=True, help="comma list of hybrids.evaluate's evals (loss, position, mqar, "
                 "retrieval)")
  p.add_argument("--best", action="store_true", help="only each cell's best learning rate (as launch report picks)")
  p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  ours, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  args = parser().parse_args(ours)
  try:
    clash = [a for a in passthrough if a.split("=")[0] in OWN_OPTIONS]
    if clash:
      raise EvaluateError(f"{clash[0].split('=')[0]} after -- : launch evaluate sets it for each run (give --eval "
                          "before --)")
    evals = parse_evals(args.eval)
    return run(args.root, evals, passthrough, best=args.best, dry_run=args.dry_run)
  except EvaluateError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # the running child got the same SIGINT; its eval files are written atomically
    print("[launch] evaluate: stopped; run the same command again to go on", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
