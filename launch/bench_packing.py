"""Points per hour of a local sweep, one run per device against N runs packed per device.

    python -m launch.bench_packing --experiment experiments/zoology_mqar.py:small --root /tmp/packing \\
        --runs-per-device 1,4,8,8mps --limit 8 [--steps 1000] [--filter model.d_model=64]

Runs the same points once per N, each time in a fresh root ``ROOT/rpd-N``, through the public entry
``python -m launch sweep SPEC --backend local --runs-per-device N --root ROOT/rpd-N``, and times the
whole sweep (start-up and compilation included: each root has its own empty compilation cache).
``Nmps`` (e.g. ``8mps``) runs N per device as clients of a CUDA MPS daemon (the sweep's ``--mps``), in
``ROOT/rpd-Nmps``; a ``-lrG`` suffix (``8mps-lr4``) trains each cell's learning rates as lockstep groups of
up to G (the sweep's ``--lr-group G``; N then counts processes, each of up to G runs). Groups form
only among points that differ in ``train.lr`` alone, so give whole cells (``--filter``) rather than
``--limit``, which spreads single points over the grid.
Prints points/hour and the speedup over the first N given, and writes ``ROOT/packing.json``. For
one-GPU numbers on a multi-GPU host, set ``CUDA_VISIBLE_DEVICES=0``.

``--limit K`` keeps K points spread evenly over the sweep (first, last, and evenly between) and
``--steps S`` sets ``train.steps`` of every point; both work through a wrapper experiment file
``ROOT/experiment/NAME.py`` that loads the real one (the sweep CLI takes no config overrides). Without
``--steps`` the points are exactly the experiment's (same run ids). ``--filter`` passes through to the sweep.
The final train / eval losses of every run are compared across N (a packed run computes what it
computes alone; on GPU the comparison is informative, XLA's GPU kernels need not be bitwise
deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from hybrids import rundir
from launch import runs
from launch import sweep as sweep_lib

MARKER = ".bench_packing"

WRAPPER = '''"""Benchmark wrapper of {path} (written by launch.bench_packing): {k} point(s), steps {steps}."""
import inspect
from hybrids import config as _config_lib

_target = _config_lib.load_experiment({path!r})
_STEPS = {steps!r}
_KEEP = {keep!r}


def get_config(arg=None):
  c = _target.get_config(arg)
  if _STEPS is not None:
    c.train.steps = _STEPS
  return c


def get_sweep(h, arg=None):
  params = inspect.signature(_target.get_sweep).parameters
  points = _target.get_sweep(h, arg) if len(params) >= 2 else _target.get_sweep(h)
  points = [dict(p) for i, p in enumerate(points) if _KEEP is None or i in _KEEP]
  if _STEPS is not None:
    for p in points:
      p["train.steps"] = _STEPS
  return points
'''


def spread(n: int, k: int | None) -> list[int] | None:
  """Indices of ``k`` of ``n`` points, evenly spread, first and last included (None: all)."""
  if k is None or k >= n:
    return None
  if k == 1:
    return [0]
  return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def wrapper_experiment(experiment: str, root: str, limit: int | None, steps: int | None) -> str:
  """The experiment spec the sweeps run: the experiment itself, or a wrapper keeping ``limit`` points."""
  path, arg = sweep_lib.split_spec(experiment)
  keep = spread(len(sweep_lib.sweep_points(experiment)), limit)
  if keep is None and steps is None:
    return experiment
  out_dir = os.path.join(root, "experiment")
  os.makedirs(out_dir, exist_ok=True)
  out = os.path.join(out_dir, os.path.basename(path))
  with open(out, "w") as f:
    f.write(WRAPPER.format(path=os.path.abspath(path), k=len(keep) if keep else "all", steps=steps, keep=keep))
  return out + (f":{arg}" if arg else "")


class GpuSampler:
  """Peak memory used and mean utilisation of the visible GPUs, from ``nvidia-smi`` every ``every_s``."""

  def __init__(self, every_s: float = 2.0):
    self.every_s, self.samples, self._stop = every_s, [], threading.Event()
    self.thread = threading.Thread(target=self._loop, daemon=True) if shutil.which("nvidia-smi") else None

  def _loop(self):
    while not self._stop.is_set():
      try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        rows = [[float(x) for x in line.split(",")] for line in out.strip().splitlines() if line.strip()]
        if visible:
          rows = [r for r in rows if str(int(r[0])) in visible.split(",")]
        if rows:
          self.samples.append((max(r[1] for r in rows), sum(r[2] for r in rows) / len(rows)))
      except (OSError, subprocess.SubprocessError, ValueError):
        pass
      self._stop.wait(self.every_s)

  def __enter__(self):
    if self.thread:
      self.thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self.thread:
      self.thread.join()

  def result(self) -> dict:
    if not self.samples:
      return {}
    return {"peak_memory_mib": max(m for m, _ in self.samples),
            "mean_utilization_pct": round(sum(u for _, u in self.samples) / len(self.samples), 1)}


def device_name() -> str:
  if shutil.which("nvidia-smi"):
    try:
      names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split("\n")
      visible = os.environ.get("CUDA_VISIBLE_DEVICES")
      names = [n.strip() for i, n in enumerate(names) if n.strip() and (not visible or str(i) in visible.split(","))]
      if names:
        return f"{len(names)}× {names[0]}"
    except (OSError, subprocess.SubprocessError):
      pass
  return "cpu" if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") else "unknown"


def parse_counts(value: str) -> list[tuple[int, bool, int]]:
  """``--runs-per-device``: comma-separated ``N``, ``Nmps`` (N processes per device under CUDA MPS), each
  optionally ``-lrG`` (lockstep learning-rate groups of up to G runs per process) → ``(N, mps, G)``."""
  counts = []
  for token in (t.strip() for t in value.split(",")):
    if not token:
      continue
    head, sep, group = token.partition("-lr")
    mps = head.endswith("mps")
    digits = head[:-3] if mps else head
    if (not digits.isdigit() or int(digits) < 1 or sep and (not group.isdigit() or int(group) < 1)):
      raise ValueError(f"--runs-per-device {value!r}: {token!r} is not N, Nmps, N-lrG or Nmps-lrG (N, G ≥ 1), "
                       "e.g. 1,8mps,8mps-lr4")
    counts.append((int(digits), mps, int(group) if sep else 1))
  if not counts:
    raise ValueError("--runs-per-device needs a value, e.g. 1,8,8mps")
  return counts


def label(n: int, mps: bool, group: int = 1) -> str:
  return (f"{n}mps" if mps else str(n)) + (f"-lr{group}" if group > 1 else "")


def run_sweep(spec: str, root: str, n: int, filters: list[str], python: str, mps: bool = False, group: int = 1) -> dict:
  argv = [python, "-m", "launch", "sweep", spec, "--backend", "local", "--runs-per-device", str(n),
          *(["--mps"] if mps else []), *(["--lr-group", str(group)] if group > 1 else []), "--root", root, "--no-progress",
          *[a for f in filters for a in ("--filter", f)]]
  print(f"[bench] {' '.join(argv[1:])}", flush=True)
  os.makedirs(root, exist_ok=True)
  open(os.path.join(root, MARKER), "w").close()
  with open(os.path.join(root, "bench_sweep.log"), "w") as log, GpuSampler() as gpu:
    start = time.perf_counter()
    code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
  summaries = {}
  for name in sorted(os.listdir(root)):
    if os.path.isfile(os.path.join(root, name, rundir.SUMMARY_FILE)):
      summaries[name] = runs.read_summary(os.path.join(root, name))
  done = sum(1 for s in summaries.values() if s.get("status") == "done")
  tps = [s["tokens_per_sec"] for s in summaries.values() if s.get("tokens_per_sec")]
  return {"runs_per_device": n, "mps": mps, "lr_group": group, "label": label(n, mps, group), "returncode": code, "wall_s": round(wall, 1), "points": len(summaries),
          "done": done, "points_per_hour": round(done / wall * 3600, 1) if wall > 0 else None,
          "mean_run_tokens_per_sec": round(sum(tps) / len(tps)) if tps else None, **gpu.result(),
          "_runs": {rid: {"train_loss": s.get("train_loss"), "eval": s.get("eval")} for rid, s in summaries.items()}}


def compare(results: list[dict]) -> dict:
  """Largest |difference| of each run's final train loss / eval metrics against the first N's run."""
  base = results[0]["_runs"]
  out = {}
  for r in results[1:]:
    worst = 0.0
    for rid, b in base.items():
      o = r["_runs"].get(rid)
      if not o:
        continue
      pairs = [(b.get("train_loss"), o.get("train_loss"))]
      pairs += [((b.get("eval") or {}).get(k), (o.get("eval") or {}).get(k)) for k in (b.get("eval") or {})]
      for x, y in pairs:
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
          worst = max(worst, abs(x - y))
    out[r["label"]] = worst
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.bench_packing", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--experiment", required=True, help="FILE[:ARG], e.g. experiments/zoology_mqar.py:small")
  parser.add_argument("--root", required=True, help="benchmark directory: ROOT/rpd-N per N, ROOT/packing.json")
  parser.add_argument("--runs-per-device", default="1,4,8",
                      help="comma-separated N (Nmps: under CUDA MPS; -lrG: lockstep lr groups of G) values; the first "
                      "is the baseline")
  parser.add_argument("--limit", type=int, default=None, help="K points, spread evenly over the sweep")
  parser.add_argument("--steps", type=int, default=None, help="train.steps of every point (default: the experiment's)")
  parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE", help="passed to the sweep")
  parser.add_argument("--python", default=sys.executable)
  args = parser.parse_args(argv)
  try:
    counts = parse_counts(args.runs_per_device)
  except ValueError as e:
    parser.error(str(e))
  if args.limit is not None and args.limit < 1 or args.steps is not None and args.steps < 1:
    parser.error("--limit and --steps must be ≥ 1")
  for n, mps, group in counts:
    root = os.path.join(args.root, f"rpd-{label(n, mps, group)}")
    if os.path.exists(root):
      if not os.path.exists(os.path.join(root, MARKER)):
        parser.error(f"{root} exists and was not written by this benchmark; pick another --root")
      shutil.rmtree(root)  # fresh: no finished runs, no compilation cache
  os.makedirs(args.root, exist_ok=True)
  spec = wrapper_experiment(args.experiment, args.root, args.limit, args.steps)

  device = device_name()
  results = []
  for n, mps, group in counts:
    results.append(run_sweep(spec, os.path.join(args.root, f"rpd-{label(n, mps, group)}"), n, args.filter, args.python,
                             mps, group))
    r = results[-1]
    print(f"[bench] N={r['label']}: {r['done']}/{r['points']} done in {r['wall_s']} s (exit {r['returncode']})",
          flush=True)
  base = results[0]["points_per_hour"] or 0
  for r in results:
    r["speedup"] = round(r["points_per_hour"] / base, 2) if base and r["points_per_hour"] else None
  diffs = compare(results)

  header = ("runs/device", "points", "done", "wall s", "points/h", "speedup", "run tok/s", "peak MiB", "util %")
  rows = [(r["label"], r["points"], r["done"], r["wall_s"], r["points_per_hour"], r["speedup"],
           r["mean_run_tokens_per_sec"], r.get("peak_memory_mib", "—"), r.get("mean_utilization_pct", "—"))
          for r in results]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  print(f"\n{args.experiment} on {device}" + (f", {args.limit} point(s)" if args.limit else "") +
        (f", {args.steps} steps" if args.steps else ""))
  for row in (header, *rows):
    print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
  print(f"largest |Δ| of final losses / eval metrics vs N={results[0]['label']}: {diffs}")

  out = {"experiment": args.experiment, "spec": spec, "limit": args.limit, "steps": args.steps,
         "filters": args.filter, "device": device, "created": runs.now_iso(),
         "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
         "max_abs_diff_vs_baseline": diffs}
  path = os.path.join(args.root, "packing.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {path}")
  return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
