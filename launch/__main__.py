"""``python -m launch {sweep,status,report,evaluate,pack,unpack}``: run an experiment's sweep, watch it, report on it.

    python -m launch sweep experiments/NAME.py[:ARG] --backend {local,slurm,tpu,xpk} [--root DIR] [--dry-run]
        [--filter FIELD=VALUE ...] [--max-parallel N] [--max-retries N] [--runs-per-device N [--mps]] [--lr-group G]
        [--cell-stop] [--time-limit SECONDS]
    python -m launch status runs/NAME
    python -m launch report runs/NAME
    python -m launch evaluate runs/NAME --eval retrieval,position [--best] [--dry-run] [-- EVALUATE OPTIONS]
    python -m launch pack runs/NAME OUT.tgz [--checkpoints-mb MB] [--part-mb MB]
    python -m launch unpack runs/NAME OUT.tgz [OUT.tgz.part-001 ...]

``sweep`` expands ``get_sweep`` (``FILE:ARG`` passes ARG to ``get_sweep(h, ARG)`` and makes it the
default ``get_config`` argument), validates every point, writes ``ROOT/sweep.json`` and launches the
points that are not finished: done runs are skipped, interrupted ones resume from their checkpoints,
failed ones are retried until they have failed ``--max-retries`` + 1 times (diverged runs are not
retried: resuming replays the same steps). ROOT defaults to ``runs/NAME`` (``runs/NAME-ARG`` with an
ARG). ``--filter model.window=16`` keeps points whose resolved config has that value (repeat a field
for alternatives; ``config=ARG`` matches the get_config argument, ``model.mixer=swa`` any layer's
mixer). ``--runs-per-device N`` (local) packs N runs onto each GPU (or device group) at once, each
with a 1/N share of its memory, and ``--mps`` makes them clients of a CUDA MPS daemon so their kernels
overlap (launch/local.py); ``--lr-group G`` trains up to G points that differ only in their learning rate
together in one process (``hybrids.train.train_group``); ``--cell-stop`` (local) ends a cell once one of
its learning rates passes ``train.stop_at_accuracy`` (its group stops, its other runs are not launched);
``--time-limit S`` (local) stops the sweep S seconds after it starts, as Ctrl-C would. ``pack`` writes a
sweep's results (and optionally the checkpoints of unfinished runs) into one archive, and ``unpack`` merges
one back, run by run, never replacing a run with a less trained copy (launch/pack.py).
Exit status: 0 all done (local; runs of decided cells count as done) or all submitted, 1 some failed,
2 bad input, 3 stopped by --time-limit, 130 stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

BACKENDS = ("local", "slurm", "tpu", "xpk")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  s = sub.add_parser("sweep", help="launch every unfinished point of experiments/NAME.py's get_sweep")
  s.add_argument("experiment", help="experiment file, optionally FILE:ARG (e.g. experiments/quickstart.py)")
  s.add_argument("--backend", choices=BACKENDS, default="local")
  s.add_argument("--root", default=None, help="the sweep directory holding the run directories "
                 "(default runs/NAME, or runs/NAME-ARG for FILE:ARG)")
  s.add_argument("--dry-run", action="store_true", help="print the points and the exact commands; run and write nothing")
  s.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                 help="keep points whose resolved config has FIELD=VALUE (repeatable)")
  s.add_argument("--max-parallel", type=int, default=None,
                 help="runs at once (local: default one per device group, 1 on CPU; slurm: array parallelism)")
  s.add_argument("--max-retries", type=int, default=2, help="relaunches of a failed run before giving up")
  s.add_argument("--no-progress", action="store_true", help="no live status table")
  g = s.add_argument_group("local")
  g.add_argument("--devices-per-run", type=int, default=1, help="accelerators per run when several are present")
  g.add_argument("--runs-per-device", default="1", metavar="N",
                 help="runs at once on each GPU / device group (1-64; each gets a 1/N memory share: "
                 "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9/N, no preallocation); on CPU N at once; not on TPU")
  g.add_argument("--lr-group", type=int, default=1, metavar="G",
                 help="train up to G points that differ only in train.lr (and resume from the same step) as one "
                 "lockstep group in one process, their steps vmapped together (default 1: one process per point)")
  g.add_argument("--cell-stop", action="store_true",
                 help="a cell (points that differ only in train.lr) is decided once one of its runs passes "
                 "train.stop_at_accuracy: a lockstep group stops with it, and the cell's other runs are not "
                 "launched (their directories are left as they are). Zoology plots a cell's best lr, and each of "
                 "its runs stops at 0.99 anyway")
  g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                 help="stop after SECONDS as on Ctrl-C (no new runs; running ones checkpoint), exit status 3: for a "
                 "slot of GPU time that ends at a known moment (leave a minute for the checkpoints and the pack)")
  g.add_argument("--mps", action="store_true",
                 help="run the packed runs as clients of a CUDA MPS daemon (the one running, else one started "
                 "for the sweep and stopped after it), so their kernels overlap; GPU, --runs-per-device ≥ 2")
  g = s.add_argument_group("slurm")
  g.add_argument("--slurm-partition", default=None)
  g.add_argument("--slurm-time-min", type=int, default=1440, help="time limit of each array task, minutes")
  g.add_argument("--slurm-cpus-per-task", type=int, default=None)
  g.add_argument("--slurm-gpus-per-node", type=int, default=None)
  g.add_argument("--slurm-mem-gb", type=float, default=None)
  g.add_argument("--slurm-signal-delay-s", type=int, default=90,
                 help="SIGUSR2 this long before the time limit: checkpoint and requeue")
  g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                 help="any other sbatch option (repeatable), e.g. qos=high")
  g = s.add_argument_group("tpu / xpk")
  g.add_argument("--zone", default=None)
  g.add_argument("--project", default=None)
  g.add_argument("--accelerator-type", default=None, help="tpu: e.g. v4-8, v5litepod-8")
  g.add_argument("--runtime-version", default="tpu-ubuntu2204-base", help="tpu: TPU VM software version")
  g.add_argument("--spot", action="store_true", help="tpu: spot capacity")
  g.add_argument("--queued", action="store_true", help="tpu: a queued resource per run instead of tpu-vm create")
  g.add_argument("--keep-vm", action="store_true", help="tpu: do not delete the VM after its run")
  g.add_argument("--cluster", default=None, help="xpk: the GKE cluster")
  g.add_argument("--tpu-type", default=None, help="xpk: e.g. v5litepod-16")
  g.add_argument("--num-slices", type=int, default=1, help="xpk")
  g.add_argument("--docker-image", default=None, help="xpk: image holding this repository")
  g.add_argument("--max-restarts", type=int, default=None, help="xpk: restarts after preemption (default --max-retries)")
  g.add_argument("--remote-repo", default=None, help="where the repository is remotely (tpu default: hybrids)")
  g.add_argument("--remote-root", default=None, help="the sweep directory as the remote side sees it (default --root)")
  g.add_argument("--remote-python", default="python3")
  g.add_argument("--name-prefix", default="", help="prefix of TPU VM / workload names")
  st = sub.add_parser("status", help="table of a sweep's runs: pending / running / done / failed, step, loss")
  st.add_argument("root", help="the sweep directory, e.g. runs/quickstart")
  sub.add_parser("report", help="loss-vs-FLOPs fits, tables and plots (python -m launch report --help)", add_help=False)
  sub.add_parser("evaluate", help="python -m hybrids.evaluate on every finished run, or each cell's best "
                 "(python -m launch evaluate --help)", add_help=False)
  sub.add_parser("pack", help="a sweep's results (and checkpoints) as one archive (python -m launch pack --help)",
                 add_help=False)
  sub.add_parser("unpack", help="merge such an archive into a sweep, keeping runs trained further here "
                 "(python -m launch unpack --help)", add_help=False)
  return parser


def _cloud_options(args):
  from launch.cloud import CloudOptions
  return CloudOptions(
      zone=args.zone, project=args.project, accelerator_type=args.accelerator_type,
      runtime_version=args.runtime_version, spot=args.spot, queued=args.queued, keep_vm=args.keep_vm,
      cluster=args.cluster, tpu_type=args.tpu_type, num_slices=args.num_slices, docker_image=args.docker_image,
      max_restarts=args.max_retries if args.max_restarts is None else args.max_restarts,
      remote_repo=args.remote_repo, remote_root=args.remote_root, python=args.remote_python,
      name_prefix=args.name_prefix)


def plan_rows(root: str, selected, *, max_retries: int, backend: str = "local",
              decided=None) -> tuple[list[dict], list[dict]]:
  """``(all rows, rows to launch)``: done, diverged and given-up runs are not launched again, nor
  (except locally, where the new process waits for the run's lock) runs that are training now, nor
  (``decided``: run id → why its cell needs it no more, or None) the runs of decided cells.

  Runs that resume from a checkpoint are launched first, the furthest trained first, then the rest in
  the sweep's order: in a time-limited slot, work already done is finished before new work starts (and
  a checkpoint carried into the slot is used in it)."""
  from launch import runs

  rows, todo = [], []
  for rid, point, _ in selected:
    row = {"run": rid, "point": point, "workdir": os.path.join(root, rid)}
    row.update(runs.run_state(row["workdir"]))
    resumes = row["status"] in ("interrupted", "failed")  # not pending, nor held by a live process
    row["resume_step"] = runs.latest_checkpoint_step(row["workdir"]) if resumes else 0
    if row["status"] == "done":
      row["action"] = "skip (done)"
    elif row["status"] == "diverged":
      row["action"] = "skip (diverged; resuming would replay the same steps)"
    elif row["status"] == "running" and backend != "local":
      row["action"] = "skip (running now)"
    elif row["failures"] > max_retries:
      row["action"] = f"skip (failed {row['failures']} times > --max-retries {max_retries})"
    elif decided is not None and (why := decided(rid)) is not None:
      row["action"] = f"skip ({why})"
    else:
      row["action"] = {"pending": "start", "running": "wait for the live process, then resume",
                       "interrupted": f"resume from step {row['resume_step']}",
                       "failed": f"retry ({row['failures']} failure(s) so far)"}.get(row["status"], "start")
      todo.append(row)
    rows.append(row)
  todo.sort(key=lambda row: -row["resume_step"])  # stable: the sweep's order within each step
  return rows, todo


def cmd_sweep(args) -> int:
  import shlex

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from hybrids import config as config_lib
  from hybrids.config import ConfigError
  from launch import local, runs
  from launch import sweep as sweep_lib

  root = args.root or os.path.join("runs", sweep_lib.sweep_name(args.experiment))
  try:
    if args.max_parallel is not None and args.max_parallel < 1:
      raise ConfigError(f"--max-parallel={args.max_parallel} must be ≥ 1")
    if args.max_retries < 0:
      raise ConfigError(f"--max-retries={args.max_retries} must be ≥ 0")
    if args.devices_per_run < 1:
      raise ConfigError(f"--devices-per-run={args.devices_per_run} must be ≥ 1")
    if args.lr_group < 1:
      raise ConfigError(f"--lr-group={args.lr_group} must be ≥ 1 (runs trained together in one process)")
    if args.time_limit is not None and not (args.time_limit > 0 and args.backend == "local"):
      raise ConfigError(f"--time-limit={args.time_limit:g} must be > 0 seconds, with --backend local "
                        f"(got --backend {args.backend})")
    if args.cell_stop and args.backend != "local":
      raise ConfigError(f"--cell-stop applies to --backend local (got --backend {args.backend})")
    if args.lr_group > 1 and (args.backend != "local" or args.devices_per_run != 1):
      raise ConfigError(f"--lr-group={args.lr_group} applies to --backend local with one device per run "
                        f"(got --backend {args.backend}, --devices-per-run {args.devices_per_run})")
    try:
      args.runs_per_device = local.parse_runs_per_device(args.runs_per_device)
      if args.runs_per_device > 1 and args.backend != "local":
        raise ValueError(f"--runs-per-device={args.runs_per_device} applies to --backend local only")
      detected = local.detect_devices() if args.backend == "local" else None  # once per sweep: run() reuses it
      platform = detected[0] if detected else None
      if args.runs_per_device > 1 and args.backend == "local":
        local.parse_runs_per_device(args.runs_per_device, platform)  # refused on TPU
      if args.mps:
        if args.backend != "local":
          raise ValueError("--mps applies to --backend local only")
        local.Mps.check(platform, args.runs_per_device)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    cloud_opts = None
    if args.backend in ("tpu", "xpk"):
      cloud_opts = _cloud_options(args)
      cloud_opts.check(args.backend)
    if args.backend == "slurm":
      from launch import slurm
      slurm_params = slurm.executor_parameters(args, sweep_lib.sweep_name(args.experiment), 1)
    path, _, variant = args.experiment.partition(":")
    module = config_lib.load_experiment(path)
    if variant:  # a misspelt FILE:VARIANT is an error, even where every point sets its own get_config argument
      try:
        module.get_config(variant)
      except ValueError as e:
        raise ConfigError(str(e) if isinstance(e, ConfigError) else f"{args.experiment}: {e}") from None
    expanded = sweep_lib.expand(args.experiment)
    selected = sweep_lib.select(args.experiment, expanded, args.filter)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not selected:
    print(f"error: no point of {args.experiment}'s {len(expanded)} matches --filter {' '.join(args.filter)}",
          file=sys.stderr)
    return 2
  decided = None
  if args.cell_stop:
    if not any(config.train.stop_at_accuracy for _, _, config in selected):
      print(f"error: --cell-stop: no point of {args.experiment} sets train.stop_at_accuracy (a cell is decided when "
            "one of its runs passes it); valid with experiments that stop at an accuracy, e.g. "
            "experiments/zoology_mqar.py", file=sys.stderr)
      return 2
    decided = sweep_lib.cell_decisions(root, selected)
  rows, todo = plan_rows(root, selected, max_retries=args.max_retries, backend=args.backend, decided=decided)
  if args.cell_stop:  # groups of the cells that stop at an accuracy stop with their cell
    stops = {rid for rid, _, config in selected if config.train.stop_at_accuracy}
    for row in todo:
      row["cell_stop"] = row["run"] in stops
  units = None
  if args.lr_group > 1:
    units = local.lr_groups(todo, {rid: config for rid, _, config in selected}, args.lr_group)
  remote_root = (cloud_opts.remote_root if cloud_opts and cloud_opts.remote_root else root)
  for row in todo:
    row["remote_workdir"] = os.path.join(remote_root, row["run"])

  if args.dry_run:
    print(f"# {args.experiment}: {len(expanded)} point(s), {len(selected)} selected, {len(todo)} to launch "
          f"on {args.backend}; root {root}")
    for row in rows:
      print(f"# {row['run']}  {row['status']:<11} {row['action']}")
    if args.backend in ("local", "slurm"):
      if args.backend == "slurm" and todo:
        print("# each array task runs, in-process, the equivalent of:")
      for unit in units or [[row] for row in todo]:
        print(shlex.join(local.unit_argv(args.experiment, unit)))
      if args.backend == "slurm":
        print(f"# one submitit job array, parameters: {slurm.executor_parameters(args, sweep_lib.sweep_name(args.experiment), len(todo))}")
    else:
      from launch import cloud
      cloud.print_plan(cloud.plan(args.backend, args.experiment, todo, cloud_opts))
    return 0

  sweep_lib.write_manifest(root, args.experiment, selected, backend=args.backend, filters=args.filter)
  for row in rows:
    if row["action"].startswith("skip"):
      print(f"[launch] {row['run']}: {row['action']}")
  if args.backend == "local":
    try:
      code = local.run(args.experiment, todo, max_parallel=args.max_parallel, devices_per_run=args.devices_per_run,
                       runs_per_device=args.runs_per_device, mps=args.mps, live=not args.no_progress,
                       detected=detected, units=units, decided=decided, time_limit_s=args.time_limit) if todo else 0
    except local.MpsError as e:  # before any run started: the runs' directories are untouched
      print(f"error: {e}", file=sys.stderr)
      return 2
    for row in rows:
      row.update(runs.run_state(row["workdir"]))
    # the runs of decided cells that were not trained (skipped now or before) say so
    excused = {r["run"] for r in rows if decided and r["status"] in ("pending", "interrupted") and decided(r["run"])}
    summaries = [{"run": r["run"], "point": r["point"], **r["summary"],
                  "status": r["status"] + (" (cell decided)" if r["run"] in excused else "")} for r in rows]
    table = sweep_lib.format_table(summaries)
    print("\n" + table)
    with open(os.path.join(root, "results.md"), "w") as f:
      f.write(f"# {sweep_lib.sweep_name(args.experiment)}\n\n```\n{table}\n```\n")
    print(f"\nresults: {os.path.abspath(root)}/results.md (run directories beside it)")
    if code:
      why = "--time-limit reached" if code == local.TIME_LIMIT_EXIT else "stopped"
      print(f"[launch] {why}; run the same command again to resume", file=sys.stderr)
      return code
    return 0 if all(r["status"] == "done" or r["run"] in excused for r in rows) else 1
  if not todo:
    print("[launch] nothing to launch")
    return 0 if all(r["status"] == "done" for r in rows) else 1
  if args.backend == "slurm":
    slurm_params["slurm_array_parallelism"] = min(args.max_parallel or len(todo), len(todo))
    for row, job_id, log in slurm.submit(args.experiment, root, todo, slurm_params):
      print(f"[launch] {row['run']}: SLURM job {job_id}  log {log}")
    print(f"[launch] follow with: python -m launch status {shlex.quote(root)}")
    return 0
  from launch import cloud
  failed = cloud.execute(args.backend, cloud.plan(args.backend, args.experiment, todo, cloud_opts), cloud_opts,
                         max_parallel=args.max_parallel)
  return 1 if failed else 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "report":
    try:
      from launch import report  # written separately; imported only when asked for
    except ImportError as e:
      print(f"error: python -m launch report is not available: {e}", file=sys.stderr)
      return 2
    return report.main(argv[1:])
  if argv and argv[0] == "evaluate":
    from launch import evaluate
    return evaluate.main(argv[1:])
  if argv and argv[0] in ("pack", "unpack"):
    from launch import pack
    return (pack.main if argv[0] == "pack" else pack.unpack_main)(argv[1:])
  args = _parser().parse_args(argv)
  if args.command == "status":
    from launch import status
    return status.main([args.root])
  return cmd_sweep(args)


if __name__ == "__main__":
  sys.exit(main())
