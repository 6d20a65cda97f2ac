"""Side-by-side kernel benchmarks: ours vs each peer, measured in the same process, vs the hardware floor.

    python -m kernels.bench                       # every kernel, the issue's shapes
    python -m kernels.bench --kernels scan --json /tmp/scan.json
    python -m kernels.bench --quick               # small shapes: a smoke test of the script itself

Each kernel family has a module ``kernels/<family>/bench.py`` with ``run(ctx) -> list[dict]``; a row is one
(kernel, shape, implementation) with ``fwd_ms`` and ``fwdbwd_ms`` (None where it does not apply) and
``rel_err`` against the reference (checked before timing: a wrong kernel is never timed). The driver
prints one table per kernel with the floor and the ratio to the best peer, and writes everything
(device, versions, command) to JSON.

Timing: a jitted function is called ``iters`` times back to back and the device is synchronised
once at the end (dispatch overlaps execution, so this is device time per call, not host latency);
the median of ``repeats`` such loops is reported. Inputs rotate among several sets so that a kernel
whose inputs would fit in L2 is not timed from cache. Torch peers are timed with
``triton.testing.do_bench`` (CUDA events, median).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

KERNELS = ("scan", "gla", "window_attention", "delta", "dplr", "forgetting_attention")

# Measured ceilings of the H100 this project benchmarks on (device README: copy ≈3.0 TB/s counting read+write).
HBM_BYTES_PER_S = {"gpu": 3.0e12, "tpu": 8.2e11, "cpu": 2.0e10}
BF16_FLOPS = {"gpu": 6.75e14, "tpu": 1.97e14, "cpu": 1.0e11}


@dataclasses.dataclass
class Context:
  quick: bool
  platform: str
  iters: int = 20
  repeats: int = 5
  # Each timed repeat lasts at least this long (more calls for short kernels), so that a stall of
  # the host while it dispatches cannot weigh much in a repeat of a 0.1 ms kernel.
  min_repeat_ms: float = 20.0

  def floor_ms(self, *, bytes_moved: float = 0.0, flops: float = 0.0) -> float:
    """max(bytes / bandwidth, flops / peak) in ms."""
    return 1e3 * max(bytes_moved / HBM_BYTES_PER_S[self.platform], flops / BF16_FLOPS[self.platform])

  def time_jax(self, fn: Callable, input_sets: Sequence[tuple]) -> float:
    """Median ms per call of jitted ``fn`` over rotating ``input_sets`` (each a tuple of arrays)."""
    jax.block_until_ready(fn(*input_sets[0]))  # compile
    for args in input_sets:
      jax.block_until_ready(fn(*args))

    def per_call_ms(iters: int) -> float:
      start = time.perf_counter()
      out = None
      for i in range(iters):
        out = fn(*input_sets[i % len(input_sets)])
      jax.block_until_ready(out)
      return (time.perf_counter() - start) / iters * 1e3
    iters = max(self.iters, math.ceil(self.min_repeat_ms / max(per_call_ms(self.iters), 1e-3)))
    return statistics.median(per_call_ms(iters) for _ in range(self.repeats))

  def time_torch(self, fn: Callable) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def rel_err(ours, ref) -> float:
  """‖ours − ref‖ / ‖ref‖ in float64 over all leaves."""
  num = den = 0.0
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num += float(np.sum((a - b) ** 2))
    den += float(np.sum(b ** 2))
  return (num / max(den, 1e-300)) ** 0.5


def check(name: str, ours, ref, tol: float) -> float:
  err = rel_err(ours, ref)
  if not np.isfinite(err) or err > tol:
    raise AssertionError(f"{name}: relative error {err:.3g} > {tol:g}; not timing a wrong kernel")
  return err


# --- shared by the matrix-state benchmarks (bench_gla, bench_delta) ---------------------------------


def random_documents(batch: int, time: int, documents: int, seed: int = 0):
  """``int32 [batch, time]``, ids 0, 1, …: each row cut into ``documents`` documents at distinct random
  positions (the packed-document rows of every ``--segments`` benchmark)."""
  if not 1 <= documents <= time:
    raise ValueError(f"segments={documents} must be between 1 and the row length {time}")
  rng = np.random.default_rng(seed)
  starts = np.zeros((batch, time), np.int32)
  for row in starts:
    row[rng.choice(np.arange(1, time), documents - 1, replace=False)] = 1
  return jax.numpy.asarray(np.cumsum(starts, axis=1), np.int32)


def vjp_fns(f: Callable):
  """For ``f(*args) -> out``: jit(*args) → out; jit(*args, cotangent) → grads; jit(*args, cotangent)
  → (out, grads)."""
  def both(*args):
    out, vjp = jax.vjp(f, *args[:-1])
    return out, vjp(args[-1].astype(out.dtype))

  return jax.jit(f), jax.jit(lambda *a: both(*a)[1]), jax.jit(both)


def check_out_and_grads(name: str, ours, ref, arg_names: Sequence[str], tol: float) -> float:
  """Output and each gradient separately (one norm over all would hide a bad small one)."""
  (out, grads), (out_ref, grads_ref) = ours, ref
  errs = [check(f"{name} out", out, out_ref, tol)]
  errs += [check(f"{name} d{x}", g, g_ref, tol) for x, g, g_ref in zip(arg_names, grads, grads_ref)]
  return max(errs)


def torch_peer(ctx: Context, name: str, load: Callable[[], Callable], sets, n_args: int, ref, arg_names: Sequence[str],
               tol: float, log) -> tuple[dict | None, str | None]:
  """Check and time a torch peer ``run(*inputs) -> out`` on the same inputs as ours, ``run = load()``
  (which imports the peer's package). The peer is optional: ``(None, why not)`` where torch or its
  package is missing (``"not measured: …"``) or there is no CUDA GPU.

  ``sets``: tuples of jax arrays, the first ``n_args`` the inputs, the last the output's cotangent
  (``[batch, time, heads, ...]``; bf16 stays bf16 on the GPU, anything else goes as f32). ``ref``: the
  reference ``(out, grads)`` on :func:`head_slice` of ``sets[0]``. The peer runs once on ``sets[0]``
  and is checked (output, and each gradient unless its backward fails, e.g. a Triton it cannot compile
  for: then the forward alone is checked and timed and the error goes to ``note``), then its forward
  and forward+backward are timed over the rotating sets. Returns ``(timings, None)`` for
  :func:`peer_row`."""
  import traceback

  try:
    import torch
    run = load()
  except Exception as e:  # the peer is optional: report why it was not measured
    return None, f"not measured: {type(e).__name__}: {e}"
  if ctx.platform != "gpu" or not torch.cuda.is_available():
    return None, "needs a CUDA GPU"

  def to_torch(x):
    dtype = torch.bfloat16 if x.dtype == jax.numpy.bfloat16 else torch.float32
    return torch.from_numpy(np.asarray(x.astype(np.float32))).to("cuda", dtype)

  tsets = [tuple(to_torch(x) for x in s) for s in sets]
  back = lambda x: x.detach()[:1, :, :2].float().cpu().numpy()
  leaves = [x.clone().requires_grad_() for x in tsets[0][:n_args]]
  out = run(*leaves)
  bwd_error = None
  try:
    out.backward(tsets[0][n_args])
    torch.cuda.synchronize()
  except Exception as e:
    traceback.print_exc()
    bwd_error = f"backward failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  if bwd_error is None:
    err = check_out_and_grads(name, (back(out), tuple(back(x.grad) for x in leaves)), ref, arg_names, tol)
  else:
    err = check(f"{name} out", back(out), ref[0], tol)
  log(f"{name}: checked (rel err {err:.2e}){' forward only: ' + bwd_error if bwd_error else ''}")
  calls = {"n": 0}

  def next_set(pool):
    calls["n"] += 1
    return pool[calls["n"] % len(pool)]

  def fwd():
    with torch.no_grad():
      run(*next_set(tsets)[:n_args])

  timing = dict(fwd_ms=ctx.time_torch(fwd), fwdbwd_ms=None, rel_err=err)
  if bwd_error is not None:
    return dict(timing, note=bwd_error), None
  grad_sets = [tuple(x.clone().requires_grad_() for x in s[:n_args]) + (s[n_args],) for s in tsets]

  def fwdbwd():
    args = next_set(grad_sets)
    for x in args[:n_args]:
      x.grad = None
    run(*args[:n_args]).backward(args[n_args])

  timing["fwdbwd_ms"] = ctx.time_torch(fwdbwd)
  return timing, None


def head_slice(tree):
  """The slice a token-by-token reference can afford at full size: batch 0, heads 0–1, every token
  of ``[batch, time, heads, ...]`` arrays."""
  return jax.tree.map(lambda x: x[:1, :, :2], tree)


def progress_log(prefix: str) -> Callable[[str], None]:
  """``log(msg)`` printing ``[prefix  seconds since this call] msg`` (the table comes only at the end)."""
  start = time.time()
  return lambda msg: print(f"[{prefix} {time.time() - start:6.1f} s] {msg}", flush=True)


def checked_row(ctx: Context, base: dict, name: str, fns, sets, ref, compare: Callable, log) -> dict:
  """One of our rows: the timed program itself runs once at full size and its head slice is
  compared with ``ref`` (``compare(name, ours, ref) -> rel err``, raising on a wrong result), then
  forward (``sets`` without their last element, the cotangent) and forward+backward are timed. An
  implementation that cannot run here is reported as skipped; a wrong one stops the benchmark."""
  import traceback

  fwd, _, both = fns
  row = dict(base, impl=name, ours=True, fwd_ms=None, fwdbwd_ms=None)
  try:
    out = jax.block_until_ready(both(*sets[0]))
    log(f"{name}: fwd+bwd compiled and ran")
    row["rel_err"] = compare(name, head_slice(out), ref)
    log(f"{name}: checked (rel err {row['rel_err']:.2e})")
  except AssertionError:
    raise
  except Exception as e:  # an implementation this platform lacks, or one that fails to compile
    traceback.print_exc()
    return dict(row, impl=f"{name} — skipped", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
  row["fwd_ms"] = ctx.time_jax(fwd, [s[:-1] for s in sets])
  log(f"{name}: fwd {row['fwd_ms']:.3f} ms")
  row["fwdbwd_ms"] = ctx.time_jax(both, sets)
  log(f"{name}: fwd+bwd {row['fwdbwd_ms']:.3f} ms")
  return row


def peer_row(base: dict, label: str, measure: Callable, log) -> dict:
  """A peer's row from ``measure() -> (timings dict | None, why not)``; a peer that fails or is not
  installed is reported in its row, a wrong result (AssertionError) stops the benchmark."""
  import traceback

  row = dict(base, impl=label, ours=False, fwd_ms=None, fwdbwd_ms=None)
  try:
    timing, why = measure()
  except AssertionError:
    raise
  except Exception as e:  # a peer that fails is reported, not fatal
    traceback.print_exc()
    timing, why = None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  if timing is None:
    return dict(row, impl=f"{label} — skipped", note=why)
  log(f"{label}: fwd {timing['fwd_ms']:.3f} ms, fwd+bwd {timing['fwdbwd_ms']} ms")
  return dict(row, **timing)


def versions() -> dict:
  out = {"python": platform.python_version(), "jax": jax.__version__}
  for mod in ("jaxlib", "torch", "triton", "fla"):
    try:
      out[mod] = importlib.import_module(mod).__version__
    except Exception:  # a peer that is not installed is simply not measured
      pass
  return out


def _fmt(x, digits=3):
  return "—" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def format_table(rows: list[dict]) -> str:
  """One block per (kernel, shape): every implementation, the floor, and ours vs the best peer."""
  lines = []
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["kernel"], row["shape"]), []).append(row)
  for (kernel, shape), group in groups.items():
    lines.append(f"\n{kernel}  {shape}   floor fwd {_fmt(group[0].get('floor_fwd_ms'))} ms, "
                 f"fwd+bwd {_fmt(group[0].get('floor_fwdbwd_ms'))} ms")
    lines.append(f"  {'impl':<28} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd/floor':>10} {'rel err':>9}")
    for row in group:
      ratio = (row["fwd_ms"] / row["floor_fwd_ms"]) if row.get("fwd_ms") and row.get("floor_fwd_ms") else None
      lines.append(f"  {row['impl']:<28} {_fmt(row.get('fwd_ms')):>9} {_fmt(row.get('fwdbwd_ms')):>11} "
                   f"{_fmt(ratio, 2):>10} {_fmt(row.get('rel_err'), 6) if row.get('rel_err') is not None else '—':>9}")
    ours = [r for r in group if r.get("ours")]
    peers = [r for r in group if not r.get("ours") and r.get("fwd_ms")]
    if ours and peers:
      best_ours = min((r for r in ours if r.get("fwd_ms")), key=lambda r: r["fwd_ms"], default=None)
      best_peer = min(peers, key=lambda r: r["fwd_ms"])
      if best_ours:
        lines.append(f"  best ours {best_ours['impl']} vs best peer {best_peer['impl']}: "
                     f"fwd ×{best_peer['fwd_ms'] / best_ours['fwd_ms']:.2f}"
                     + (f", fwd+bwd ×{best_peer['fwdbwd_ms'] / best_ours['fwdbwd_ms']:.2f}"
                        if best_ours.get("fwdbwd_ms") and best_peer.get("fwdbwd_ms") else "")
                     + " (>1: ours faster)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
  parser.add_argument("--quick", action="store_true", help="small shapes (checks the script, not the speed)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  args = parser.parse_args(argv)
  names = [k.strip() for k in args.kernels.split(",") if k.strip()]
  unknown = [k for k in names if k not in KERNELS]
  if unknown:
    parser.error(f"--kernels: unknown {unknown}; valid: {', '.join(KERNELS)}")
  device = jax.devices()[0]
  ctx = Context(quick=args.quick, platform=device.platform, iters=3 if args.quick else 20,
                repeats=1 if args.quick else 5)
  rows: list[dict] = []
  for name in names:
    module = importlib.import_module(f"kernels.{name}.bench")
    new_rows = module.run(ctx)
    print(format_table(new_rows), flush=True)
    rows += new_rows
  write_report("kernels.bench", argv, rows, args.json)
  return 0


def write_report(module: str, argv, rows: list[dict], json_path: str, **extra) -> dict:
  """Print the device and versions under a benchmark's table and, with ``json_path``, write the report
  (date, device, versions, the command, ``rows`` and ``extra`` fields) there."""
  device = jax.devices()[0]
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": getattr(device, "device_kind", device.platform), "platform": device.platform,
            "versions": versions(), "command": " ".join([f"python -m {module}"] + list(argv or sys.argv[1:])),
            "rows": rows, **extra}
  print(f"\n{report['device']} · " + " · ".join(f"{k} {v}" for k, v in report["versions"].items()))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  sys.exit(main())
