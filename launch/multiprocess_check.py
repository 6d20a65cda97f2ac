"""Two processes train one model data-parallel through ``jax.distributed``; their losses must equal
a single process's with the same global batch.

    python -m launch.multiprocess_check --platform gpu   # 2 GPUs, one per process (NCCL)
    python -m launch.multiprocess_check --platform cpu   # 2 CPU processes, one device each (gloo)

It starts ``python -m hybrids.train`` twice with ``HYBRIDS_COORDINATOR=localhost:PORT``,
``HYBRIDS_NUM_PROCESSES=2`` and ``HYBRIDS_PROCESS_ID=0/1`` (on GPU also ``CUDA_VISIBLE_DEVICES=0/1``)
into one run directory — each process loads half of every batch, process 0 writes the run's files,
both write the checkpoints — then once as a single process on one device into another directory,
and compares ``metrics.jsonl`` step by step. Both runs use f32 matmuls at 'highest' precision (no
TF32), so only the order of the reductions differs. Prints a table; exits 1 on a mismatch.

Options: ``--config FILE:ARG`` (default the quickstart's ``tiny``), ``--steps``, ``--rtol``, ``--root``
(keeps the run directories; default a temporary directory), and after ``--`` any ``--config.X=Y``
override for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from hybrids import rundir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(platform: str, device: str | None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDS_", "SLURM_"))}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  env["JAX_PLATFORMS"] = "cpu" if platform == "cpu" else "cuda"
  if platform == "cpu":  # one CPU device per process, whatever the caller forced; other flags pass
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
  elif device is not None:
    env["CUDA_VISIBLE_DEVICES"] = device
  return env


def _train_command(config: str, workdir: str, steps: int, overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "hybrids.train", "--config", config, "--workdir", workdir,
          f"--config.train.steps={steps}", "--config.runtime.mesh.data=-1", *overrides]


def _run(commands: list[tuple[list[str], dict[str, str], str]], timeout: float) -> None:
  """Start every command at once (logs to files); wait for all; raise with the logs' tails on failure."""
  procs = []
  for cmd, env, log in commands:
    with open(log, "w") as f:
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT), log))
  deadline = time.monotonic() + timeout
  failed = []
  for proc, log in procs:
    try:
      code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for other, _ in procs:
        if other.poll() is None:
          other.kill()
      code = "timeout"
    if code != 0:
      failed.append((log, code))
  if failed:
    tails = []
    for log, code in failed:
      with open(log) as f:
        tails.append(f"--- {log} (exit {code}):\n" + f.read()[-3000:])
    raise RuntimeError("training failed:\n" + "\n".join(tails))


def _metrics(workdir: str) -> dict[int, dict]:
  rows: dict[int, dict] = {}
  with open(os.path.join(workdir, rundir.METRICS_FILE)) as f:
    for line in f:
      record = json.loads(line)
      rows.setdefault(record["step"], {}).update(record)
  return rows


def compare(single: str, multi: str, rtol: float) -> tuple[str, bool]:
  """A table of the two runs' losses (and eval loss) per step, and whether all agree within ``rtol``."""
  a, b = _metrics(single), _metrics(multi)
  hardware = rundir.read_summary(multi, strict=True)["hardware"]
  ok = sorted(a) == sorted(b) and hardware.get("process_count") == 2
  lines = [f"two-process run: {hardware}", f"{'step':>5}  {'metric':<10}  {'1 process':>12}  {'2 processes':>12}  {'rel diff':>9}"]
  for step in sorted(set(a) | set(b)):
    for key in ("loss", "grad_norm", "eval_loss"):
      if key not in a.get(step, {}) and key not in b.get(step, {}):
        continue
      x, y = a.get(step, {}).get(key), b.get(step, {}).get(key)
      if x is None or y is None:
        ok = False
        lines.append(f"{step:>5}  {key:<10}  {x!s:>12}  {y!s:>12}  {'missing':>9}")
        continue
      rel = abs(x - y) / max(abs(x), 1e-12)
      ok &= rel <= rtol
      lines.append(f"{step:>5}  {key:<10}  {x:>12.7f}  {y:>12.7f}  {rel:>9.1e}{'' if rel <= rtol else '  MISMATCH'}")
  return "\n".join(lines), ok


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.multiprocess_check", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="gpu")
  parser.add_argument("--config", default=DEFAULT_CONFIG)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--rtol", type=float, default=1e-5)
  parser.add_argument("--root", default=None, help="where the run directories go (kept); default a temp dir")
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds for each phase")
  parser.add_argument("overrides", nargs="*", help="--config.X=Y for both runs (after --)")
  args = parser.parse_args(argv)

  root = args.root or tempfile.mkdtemp(prefix="multiprocess_check_")
  os.makedirs(root, exist_ok=True)
  multi, single = os.path.join(root, "two_processes"), os.path.join(root, "one_process")
  for workdir in (multi, single):
    if os.path.exists(workdir):
      shutil.rmtree(workdir)  # a fresh comparison, never a resume of an older one
  port = _free_port()
  started = time.perf_counter()
  try:
    commands = []
    for rank in range(2):
      env = _env(args.platform, str(rank))
      env.update(HYBRIDS_COORDINATOR=f"localhost:{port}", HYBRIDS_NUM_PROCESSES="2", HYBRIDS_PROCESS_ID=str(rank))
      commands.append((_train_command(args.config, multi, args.steps, args.overrides), env,
                       os.path.join(root, f"process{rank}.log")))
    # On GPU the single run needs device 0, which process 0 holds: it runs afterwards. On CPU all
    # three run at once.
    single_run = (_train_command(args.config, single, args.steps, args.overrides), _env(args.platform, "0"),
                  os.path.join(root, "single.log"))
    if args.platform == "cpu":
      _run(commands + [single_run], args.timeout)
    else:
      _run(commands, args.timeout)
      _run([single_run], args.timeout)
  except RuntimeError as e:
    print(e, file=sys.stderr)
    return 2
  table, ok = compare(single, multi, args.rtol)
  print(table)
  print(f"{'OK' if ok else 'MISMATCH'}: 2 processes vs 1 on {args.platform}, rtol {args.rtol:g}, "
        f"{time.perf_counter() - started:.0f} s; runs in {root}")
  if args.root is None and ok:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
