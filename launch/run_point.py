"""Train one sweep point: the entry point every backend runs (local subprocess, SLURM task, TPU VM, XPK pod).

    python -m launch.run_point --experiment experiments/quickstart.py --point-json '{"config": "swa"}' \\
        --workdir runs/quickstart/quickstart-0123456789

The point travels as one JSON argv element (never spliced into a shell line); it is re-resolved here
and its run id must equal the name of ``--workdir`` (``--run-id`` when the directory is named
otherwise), so a run directory never receives another config. The run's ``.lock`` is taken first and
held while training (``hybrids.train`` takes the same lock again); a run already done with this config
then returns at once, without building the model. Each attempt is recorded in ``launch.json``.
Exit status: 0 done, 2 bad config or run directory, 3 diverged, 1 failed, 75 busy (another process
trains the run), 143 interrupted (SIGTERM: checkpoint saved, resumes on the next launch).

Several ``--point-json P --workdir W`` pairs train the points as one lockstep group
(``hybrids.train.train_group``: runs that differ only in ``train.lr``, stepped together in this one
process; ``launch sweep --lr-group G`` forms them). Each member is checked, locked and recorded as
above; the exit status is the worst of the members' (2, 1, 75, 143, 3, then 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

from hybrids import rundir
from launch import runs

EXIT_DONE, EXIT_FAILED, EXIT_CONFIG, EXIT_DIVERGED, EXIT_BUSY = 0, 1, 2, 3, 75
EXIT_INTERRUPTED = 128 + signal.SIGTERM


def _checked_config(experiment: str, point: dict, workdir: str, run_id: str | None = None):
  """The point's resolved config, its compilation cache set, checked against the directory's run id;
  None (the error printed in one line) when it does not resolve or is another run's."""
  from hybrids.config import ConfigError
  from launch import sweep as sweep_lib

  try:
    config = sweep_lib.resolve_point(experiment, point)
  except (ConfigError, ValueError) as e:
    print(f"error: {experiment} point {json.dumps(point)}: {e}", file=sys.stderr)
    return None
  try:
    share_compilation_cache(config, workdir)
  except OSError as e:  # e.g. <root>/.jax_cache planted by another user
    print(f"error: {e}", file=sys.stderr)
    return None
  expected = run_id or os.path.basename(os.path.normpath(workdir))
  actual = sweep_lib.run_id(experiment, config)
  if actual != expected:
    print(f"error: point {json.dumps(point)} of {experiment} resolves to run id {actual}, not {expected}: "
          "the experiment file changed since the sweep was expanded, or --workdir is another run's", file=sys.stderr)
    return None
  return config


def execute(experiment: str, point: dict, workdir: str, *, run_id: str | None = None, lock_wait_s: float = 0.0,
            progress: bool = False, **attempt_info) -> tuple[int, dict]:
  """Resolve, check the run id, lock, train; returns ``(exit status, summary)``.

  Exceptions from training are caught and recorded (status "failed" in ``launch.json``); the
  caller decides what a failure means for its backend.
  """
  from hybrids.config import ConfigError
  from hybrids.train import DivergedError, train

  config = _checked_config(experiment, point, workdir, run_id)
  if config is None:
    return EXIT_CONFIG, {}
  actual = run_id or os.path.basename(os.path.normpath(workdir))  # the config's run id (checked)
  try:
    with runs.run_lock(workdir, wait_s=lock_wait_s):
      # Checked under the lock: a launch that finds the run busy, then done, never re-enters it.
      if _already_done(workdir, config):  # e.g. a requeued task or a second launch of a finished run
        print(f"[launch] {actual} is already done: {json.dumps(point, sort_keys=True)}", flush=True)
        return EXIT_DONE, runs.read_summary(workdir)
      resumed_from = runs.latest_checkpoint_step(workdir)
      attempt = runs.start_attempt(workdir, resumed_from=resumed_from, **attempt_info)
      print(f"[launch] {actual} attempt {attempt}, from step {resumed_from}: {json.dumps(point)}", flush=True)
      try:
        summary = train(config, workdir, progress=progress)
      except (ConfigError, rundir.RunDirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        runs.end_attempt(workdir, "failed", error=str(e))
        return EXIT_CONFIG, runs.read_summary(workdir)
      except DivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        runs.end_attempt(workdir, "diverged", error=str(e))
        return EXIT_DIVERGED, runs.read_summary(workdir)
      except Exception as e:  # recorded so that a relaunch retries it up to --max-retries
        traceback.print_exc()
        runs.end_attempt(workdir, "failed", error=f"{type(e).__name__}: {e}")
        return EXIT_FAILED, runs.read_summary(workdir)
      runs.end_attempt(workdir, summary["status"], step=summary["step"])
      summary = runs.read_summary(workdir)
  except runs.RunBusy as e:
    print(f"[launch] {e}; leaving it alone", file=sys.stderr)
    return EXIT_BUSY, {}
  return (EXIT_DONE if summary.get("status") == "done" else EXIT_INTERRUPTED), summary


# A group's exit status: its worst member's, in this order.
_SEVERITY = (EXIT_CONFIG, EXIT_FAILED, EXIT_BUSY, EXIT_INTERRUPTED, EXIT_DIVERGED, EXIT_DONE)


def execute_group(experiment: str, points: list[dict], workdirs: list[str], *, lock_wait_s: float = 0.0,
                  progress: bool = False, cell_stop: bool = False, **attempt_info) -> tuple[int, list[dict]]:
  """:func:`execute` for a lockstep group: each point resolved and checked against its directory's
  name, every lock taken, done members left alone, the rest trained together; ``(exit status, summaries)``.
  ``cell_stop``: ``train_group``'s (the members stop when one passes ``train.stop_at_accuracy``)."""
  import contextlib

  from hybrids.config import ConfigError
  from hybrids.train import train_group

  configs = []
  for point, workdir in zip(points, workdirs):
    config = _checked_config(experiment, point, workdir)
    if config is None:
      return EXIT_CONFIG, [{} for _ in points]
    configs.append(config)
  codes, summaries = [EXIT_DONE] * len(points), [{} for _ in points]
  try:
    with contextlib.ExitStack() as held:
      for workdir in workdirs:
        held.enter_context(runs.run_lock(workdir, wait_s=lock_wait_s))
      todo = []
      for i, workdir in enumerate(workdirs):
        if _already_done(workdir, configs[i]):
          print(f"[launch] {os.path.basename(workdir)} is already done: {json.dumps(points[i], sort_keys=True)}", flush=True)
          summaries[i] = runs.read_summary(workdir)
          continue
        if runs.read_summary(workdir).get("status") == "diverged":  # resuming would replay the same steps
          print(f"[launch] {os.path.basename(workdir)} diverged earlier: left alone", flush=True)
          summaries[i], codes[i] = runs.read_summary(workdir), EXIT_DIVERGED
          continue
        resumed_from = runs.latest_checkpoint_step(workdir)
        attempt = runs.start_attempt(workdir, resumed_from=resumed_from, group=len(points), **attempt_info)
        print(f"[launch] {os.path.basename(workdir)} attempt {attempt}, from step {resumed_from}, in a group of "
              f"{len(points)}: {json.dumps(points[i])}", flush=True)
        todo.append(i)
      if todo:
        failure = None
        try:
          train_group([configs[i] for i in todo], [workdirs[i] for i in todo], progress=progress, cell_stop=cell_stop)
        except (ConfigError, rundir.RunDirectoryError) as e:
          print(f"error: {e}", file=sys.stderr)
          failure = (EXIT_CONFIG, str(e))
        except Exception as e:  # noqa: BLE001  (recorded so that a relaunch retries it up to --max-retries)
          traceback.print_exc()
          failure = (EXIT_FAILED, f"{type(e).__name__}: {e}")
        for i in todo:  # each member as its own summary says it ended (one may have finished before a crash)
          summary = runs.read_summary(workdirs[i])
          status = summary.get("status")
          if status == "done":
            runs.end_attempt(workdirs[i], "done", step=summary.get("step"))
            codes[i] = EXIT_DONE
          elif status == "diverged":
            runs.end_attempt(workdirs[i], "diverged", error=summary.get("error", ""))
            codes[i] = EXIT_DIVERGED
          elif failure is not None:
            runs.end_attempt(workdirs[i], "failed", error=failure[1])
            codes[i] = failure[0]
          else:
            runs.end_attempt(workdirs[i], status, step=summary.get("step"))
            codes[i] = EXIT_INTERRUPTED
        for i in todo:
          summaries[i] = runs.read_summary(workdirs[i])
  except runs.RunBusy as e:
    print(f"[launch] {e}; leaving the group alone", file=sys.stderr)
    return EXIT_BUSY, summaries
  return min(codes, key=_SEVERITY.index), summaries


def share_compilation_cache(config, workdir: str, env=os.environ) -> None:
  """Runs of one sweep share compiled steps in ``<sweep root>/.jax_cache``, unless the config's
  ``runtime.compilation_cache_dir`` or JAX's own ``JAX_COMPILATION_CACHE_DIR`` already names a cache."""
  if not config.runtime.get("compilation_cache_dir", "") and not env.get("JAX_COMPILATION_CACHE_DIR"):
    cache = os.path.join(os.path.dirname(os.path.abspath(workdir)), ".jax_cache")
    runs.private_dir(cache)  # compiled programs are loaded and run: mode 0700, ours, not a symlink
    config.runtime.compilation_cache_dir = cache


def _already_done(workdir: str, config) -> bool:
  """The run directory holds this very config and its summary says done: nothing to build or train."""
  return rundir.read_summary(workdir).get("status") == "done" and rundir.holds_config(workdir, config)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.run_point", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--experiment", required=True, help="experiment file, optionally FILE:ARG")
  parser.add_argument("--point-json", required=True, action="append",
                      help="the point's overrides as one JSON object (several, each with its --workdir: a lockstep group)")
  parser.add_argument("--workdir", required=True, action="append", help="the run directory, ROOT/RUNID")
  parser.add_argument("--run-id", default=None, help="expected run id (default: the name of --workdir)")
  parser.add_argument("--lock-wait", type=float, default=0.0,
                      help="seconds to wait for another process that still holds the run's lock")
  parser.add_argument("--backend", default="direct", help="recorded in launch.json")
  parser.add_argument("--progress", action="store_true", help="show the training progress bar")
  parser.add_argument("--cell-stop", action="store_true",
                      help="with several points (one cell's learning rates): all stop when one passes "
                           "train.stop_at_accuracy (hybrids.train.train_group)")
  args = parser.parse_args(argv)
  if len(args.point_json) != len(args.workdir):
    parser.error(f"{len(args.point_json)} --point-json for {len(args.workdir)} --workdir: one run directory per point")
  if len(args.workdir) > 1 and args.run_id:
    parser.error("--run-id names one run; a group's directories are named by their run ids")
  points = []
  for text in args.point_json:
    try:
      point = json.loads(text)
    except json.JSONDecodeError as e:
      parser.error(f"--point-json is not valid JSON: {e}")
    if not isinstance(point, dict):
      parser.error("--point-json must be a JSON object of config overrides")
    points.append(point)

  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  info = {"backend": args.backend}
  for env, key in (("SLURM_JOB_ID", "job_id"), ("CUDA_VISIBLE_DEVICES", "devices"), ("TPU_VISIBLE_CHIPS", "devices")):
    if os.environ.get(env):
      info[key] = os.environ[env]
  if os.environ.get(runs.RUNS_PER_DEVICE_ENV, "").isdigit():
    info["runs_per_device"] = int(os.environ[runs.RUNS_PER_DEVICE_ENV])
  if len(points) == 1:
    code, summary = execute(args.experiment, points[0], args.workdir[0], run_id=args.run_id, lock_wait_s=args.lock_wait,
                            progress=args.progress, **info)
    summaries = [summary]
  else:
    code, summaries = execute_group(args.experiment, points, args.workdir, lock_wait_s=args.lock_wait,
                                    progress=args.progress, cell_stop=args.cell_stop, **info)
  for summary, workdir in zip(summaries, args.workdir):
    if summary:
      ev = summary.get("eval") or {}
      print(f"{summary.get('status')}: step {summary.get('step')}/{summary.get('steps')}, train loss "
            f"{summary.get('train_loss')}, eval loss {ev.get('eval_loss')} → {os.path.abspath(workdir)}", flush=True)
  return code


if __name__ == "__main__":
  sys.exit(main())
