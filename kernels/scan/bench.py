"""Benchmark of the diagonal linear scan ``h_t = a_t ⊙ h_{t-1} + b_t`` (``kernels/scan``).

    python -m kernels.bench --kernels scan                      # B8 T4096 D1024, f32 and bf16
    python -m kernels.bench --kernels scan --quick              # tiny shapes (checks the script)
    python -m kernels.scan.bench --tune --bench                 # tilings side by side, then the best

Rows: our Pallas kernel, our XLA associative scan, the sequential ``lax.scan`` reference (only with
``--quick``: at full size it is a 4096-step loop of tiny kernels) and the peer fla ``chunk_hgrn``
(flash-linear-attention, Triton; it takes the log-decay ``g = log a``). Every row is checked against
the reference before it is timed. fwd+bwd is the gradient of ``sum(h * cotangent)`` wrt ``a`` and ``b``.

Floors (bytes at HBM bandwidth): fwd reads a, b and writes h. fwd+bwd: any implementation must read
a, b, the cotangent and write ∂a, ∂b (5 arrays, the floor reported); our kernels, like most, also
write h in the forward pass and read it back in the backward pass (8 arrays, ``bytes_fwdbwd_ours``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.bench import Context, check
from kernels.scan import PallasConfig, linear_scan, linear_scan_pallas, linear_scan_reference

FULL = (8, 4096, 1024)
QUICK = (2, 64, 32)
N_SETS = 3  # input sets rotated through while timing, so that a run is not timed from L2


def _inputs(shape, dtype, seed):
  ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
  # Decays in [0.8, 1): long memory, as RG-LRU and Mamba produce, so errors have time to accumulate.
  a = jax.random.uniform(ka, shape, jnp.float32, 0.8, 1.0).astype(dtype)
  b = jax.random.normal(kb, shape, jnp.float32).astype(dtype)
  ct = jax.random.normal(kc, shape, jnp.float32).astype(dtype)
  return a, b, ct


def _jax_fns(scan):
  """(forward, fwd+bwd) jitted around ``scan(a, b) -> (h, h_last)``."""
  fwd = jax.jit(scan)

  def loss(a, b, ct):
    return jnp.sum((scan(a, b)[0] * ct).astype(jnp.float32))

  return fwd, jax.jit(jax.grad(loss, argnums=(0, 1)))


def _fla_row(ctx, shape, dtype, sets, tol, floor_fwd, floor_fwdbwd):
  row = {"kernel": "scan", "shape": _shape_name(shape, dtype), "impl": "fla chunk_hgrn (Triton)",
         "ours": False, "fwd_ms": None, "fwdbwd_ms": None, "rel_err": None,
         "floor_fwd_ms": floor_fwd, "floor_fwdbwd_ms": floor_fwdbwd}
  try:
    import torch
    from fla.ops.hgrn import chunk_hgrn
    if ctx.platform != "gpu" or not torch.cuda.is_available():
      raise RuntimeError("needs a CUDA GPU")
  except Exception as e:  # the peer is optional: report why it was not measured
    row["note"] = f"not measured: {type(e).__name__}: {e}"
    return row
  try:
    _fla_measure(ctx, row, dtype, sets, tol, torch, chunk_hgrn)
  except Exception as e:  # a failing peer is reported in its row, it does not end the benchmark
    row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  return row


def _fla_measure(ctx, row, dtype, sets, tol, torch, chunk_hgrn):
  tdtype = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16}[jnp.dtype(dtype)]
  to = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to("cuda", tdtype)
  # chunk_hgrn(x, g) runs h_t = exp(g_t) h_{t-1} + x_t; g = log a rounded to the input dtype.
  tsets = [(torch.log(to(a).float()).to(tdtype), to(b), to(ct)) for a, b, ct in sets]

  # Its reference: our sequential definition on the decays it actually sees, exp(g).
  g0, x0, ct0 = tsets[0]
  a_seen = jnp.asarray(torch.exp(g0.float()).cpu().numpy())
  b_seen = jnp.asarray(x0.float().cpu().numpy())
  ref_fwd, ref_grad = _jax_fns(lambda a, b: linear_scan_reference(a, b))
  h_ref = ref_fwd(a_seen, b_seen)[0]
  da_ref, db_ref = ref_grad(a_seen, b_seen, jnp.asarray(ct0.float().cpu().numpy()))
  g, x = g0.clone().requires_grad_(), x0.clone().requires_grad_()
  o, _ = chunk_hgrn(x, g)
  o.backward(ct0)
  ours = (o.detach().float().cpu().numpy(), g.grad.float().cpu().numpy(), x.grad.float().cpu().numpy())
  row["rel_err"] = check(row["impl"], ours, (h_ref, da_ref * a_seen, db_ref), tol)  # ∂L/∂g = a ∂L/∂a

  state = {"i": 0}

  def fwd():
    gg, xx, _ = tsets[state["i"] % len(tsets)]
    state["i"] += 1
    with torch.no_grad():
      chunk_hgrn(xx, gg)

  leaves = [(gg.clone().requires_grad_(), xx.clone().requires_grad_(), cc) for gg, xx, cc in tsets]

  def fwdbwd():
    gg, xx, cc = leaves[state["i"] % len(leaves)]
    state["i"] += 1
    gg.grad = xx.grad = None
    o, _ = chunk_hgrn(xx, gg)
    o.backward(cc)

  row["fwd_ms"] = ctx.time_torch(fwd)
  row["fwdbwd_ms"] = ctx.time_torch(fwdbwd)


def _shape_name(shape, dtype) -> str:
  return f"B{shape[0]} T{shape[1]} D{shape[2]} {jnp.dtype(dtype).name}"


def _emit(rows: list[dict], row: dict) -> None:
  # Progress on stderr: the driver prints the table only once every row is done.
  rows.append(row)
  print(f"[scan] {row['shape']} {row['impl']}: fwd {row.get('fwd_ms')} fwd+bwd {row.get('fwdbwd_ms')} "
        f"err {row.get('rel_err')} {row.get('note', '')}", file=sys.stderr, flush=True)


def run(ctx: Context) -> list[dict]:
  shape = QUICK if ctx.quick else FULL
  rows: list[dict] = []
  for dtype in (jnp.float32, jnp.bfloat16):
    sets = [_inputs(shape, dtype, seed) for seed in range(N_SETS)]
    n, size = int(np.prod(shape)), jnp.dtype(dtype).itemsize
    floor_fwd = ctx.floor_ms(bytes_moved=3 * n * size)
    floor_fwdbwd = ctx.floor_ms(bytes_moved=5 * n * size)
    tol_fwd, tol_grad = (1e-5, 1e-4) if dtype == jnp.float32 else (1e-2, 1e-2)

    ref_fwd, ref_grad = _jax_fns(lambda a, b: linear_scan_reference(a, b))
    a, b, ct = sets[0]
    h_ref = ref_fwd(a, b)
    g_ref = ref_grad(a, b, ct)

    impls = [("pallas", "pallas"), ("xla associative scan", "xla")]
    if ctx.quick:
      impls.append(("reference lax.scan", "reference"))
    for label, impl in impls:
      if impl == "pallas" and ctx.platform not in ("gpu", "tpu"):
        rows.append({"kernel": "scan", "shape": _shape_name(shape, dtype), "impl": label, "ours": True,
                     "fwd_ms": None, "fwdbwd_ms": None, "rel_err": None, "floor_fwd_ms": floor_fwd,
                     "floor_fwdbwd_ms": floor_fwdbwd, "note": "Pallas needs a GPU or TPU"})
        continue
      fwd, grad = _jax_fns(lambda a, b, impl=impl: linear_scan(a, b, impl=impl))
      h, h_last = fwd(a, b)
      da, db = grad(a, b, ct)
      err = max(check(f"{label} fwd", (h, h_last), h_ref, tol_fwd),
                check(f"{label} grad", (da, db), g_ref, tol_grad))
      _emit(rows, {"kernel": "scan", "shape": _shape_name(shape, dtype), "impl": label, "ours": True,
                   "fwd_ms": ctx.time_jax(fwd, [s[:2] for s in sets]),
                   "fwdbwd_ms": ctx.time_jax(grad, sets), "rel_err": err,
                   "floor_fwd_ms": floor_fwd, "floor_fwdbwd_ms": floor_fwdbwd,
                   "bytes_fwdbwd_ours": 8 * n * size})
    _emit(rows, _fla_row(ctx, shape, dtype, sets, max(tol_fwd, tol_grad), floor_fwd, floor_fwdbwd))
  return rows


# Tilings tried by ``--tune`` (GPU): rows per lane in flight ≈ (depth - 1)·chunk; registers per lane
# ≈ depth·chunk·(2 forward, 3 backward) must stay under 255 or the kernel spills.
CANDIDATES = [
    PallasConfig(chunk=16, depth=4, bwd_chunk=16, bwd_depth=3),
    PallasConfig(chunk=8, depth=8, bwd_chunk=8, bwd_depth=6),
    PallasConfig(chunk=16, depth=6, bwd_chunk=16, bwd_depth=4),
    PallasConfig(chunk=32, depth=3, bwd_chunk=32, bwd_depth=2),
]


def _given(cfg: PallasConfig) -> dict:
  return {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(PallasConfig(), k)}


def tune(configs: list[PallasConfig] | None = None, shape=FULL, dtype=jnp.float32,
         shapes: list[tuple[int, int, int]] | None = None, threads: int = 8) -> list[dict]:
  """Times the Pallas scan under several tilings (forward and fwd+bwd) and shapes, one line each.

  Every (shape, tiling) is first compiled, ``threads`` at a time (Triton compiles on the host, one
  core each, and a big unrolled kernel takes tens of seconds), with its compile time recorded; then
  each is checked against the reference and timed alone.
  """
  import concurrent.futures

  device = jax.devices()[0]
  ctx = Context(quick=False, platform=device.platform, iters=20, repeats=5)
  tol_fwd, tol_grad = (1e-5, 1e-4) if dtype == jnp.float32 else (1e-2, 1e-2)
  jobs = [(tuple(sh), cfg) for sh in (shapes or [shape]) for cfg in (configs or CANDIDATES)]
  data = {sh: [_inputs(sh, dtype, seed) for seed in range(N_SETS)] for sh in dict.fromkeys(j[0] for j in jobs)}

  def compile_one(job):
    sh, cfg = job
    fwd, grad = _jax_fns(lambda a, b, cfg=cfg: linear_scan_pallas(a, b, config=cfg))
    a, b, ct = data[sh][0]
    out = {}
    for name, fn, args in (("fwd", fwd, (a, b)), ("grad", grad, (a, b, ct))):
      start = time.perf_counter()
      out[name] = fn.lower(*args).compile()
      out[name + "_compile_s"] = time.perf_counter() - start
    return out

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    futures = [pool.submit(compile_one, job) for job in jobs]
  results = []
  for (sh, cfg), future in zip(jobs, futures):
    n = int(np.prod(sh)) * jnp.dtype(dtype).itemsize
    result = {"shape": _shape_name(sh, dtype), "config": _given(cfg),
              "floor_fwd_ms": ctx.floor_ms(bytes_moved=3 * n), "floor_fwdbwd_ms": ctx.floor_ms(bytes_moved=8 * n)}
    try:
      compiled = future.result()
      sets = data[sh]
      a, b, ct = sets[0]
      ref_fwd, ref_grad = _jax_fns(lambda a, b: linear_scan_reference(a, b))
      result["compile_s"] = {k[:-10]: round(v, 1) for k, v in compiled.items() if k.endswith("_compile_s")}
      result["rel_err"] = max(check("fwd", compiled["fwd"](a, b), ref_fwd(a, b), tol_fwd),
                              check("grad", compiled["grad"](a, b, ct), ref_grad(a, b, ct), tol_grad))
      result["fwd_ms"] = ctx.time_jax(compiled["fwd"], [s[:2] for s in sets])
      result["fwdbwd_ms"] = ctx.time_jax(compiled["grad"], sets)
      line = (f"fwd {result['fwd_ms']:7.3f} ms  fwd+bwd {result['fwdbwd_ms']:7.3f} ms  err {result['rel_err']:.1e}"
              f"  compile {result['compile_s']}")
    except Exception as e:  # a tiling that fails to compile is reported, not fatal
      result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      line = "FAILED " + result["error"]
    print(f"  {result['shape']} {result['config']}: {line}", flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    results.append(result)
  return results


def _tune_isolated(per_config_s: float, budget_s: float, dtype: str) -> dict:
  """Runs each candidate in its own process under a time limit (a tiling that makes the compiler
  spill can take minutes), then returns the best forward tiling joined with the best backward one."""
  results = []
  start = time.perf_counter()
  for cfg in CANDIDATES:
    if time.perf_counter() - start + per_config_s > budget_s:
      print(f"  {_given(cfg)}: out of the {budget_s:.0f} s budget, skipped", flush=True)
      continue
    code = (f"import jax.numpy as jnp; from kernels.scan.bench import tune; from kernels.scan import PallasConfig; "
            f"tune([PallasConfig(**{_given(cfg)!r})], dtype=jnp.{dtype})")
    try:
      out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=per_config_s).stdout
    except subprocess.TimeoutExpired:
      print(f"  {_given(cfg)}: over {per_config_s:.0f} s, skipped", flush=True)
      continue
    for line in out.splitlines():
      if line.startswith("RESULT "):
        results.append(json.loads(line[len("RESULT "):]))
      else:
        print(line, flush=True)
  good = [r for r in results if "fwd_ms" in r]
  if not good:
    return {}
  best_fwd = min(good, key=lambda r: r["fwd_ms"])
  best_bwd = min(good, key=lambda r: r["fwdbwd_ms"] - r["fwd_ms"])
  best = {k: v for k, v in best_fwd["config"].items() if not k.startswith("bwd_")}
  best.update({k: v for k, v in best_bwd["config"].items() if k.startswith("bwd_")})
  print(f"best forward {best_fwd['config']} ({best_fwd['fwd_ms']:.3f} ms), best backward "
        f"{best_bwd['config']} ({best_bwd['fwdbwd_ms'] - best_bwd['fwd_ms']:.3f} ms): {best}", flush=True)
  return best


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m kernels.scan.bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--tune", action="store_true", help="time CANDIDATES, each in its own process")
  parser.add_argument("--per-config-s", type=float, default=150.0,
                      help="time limit of one candidate (Triton compiles fwd+bwd in ~1 minute on an H100 host)")
  parser.add_argument("--budget-s", type=float, default=600.0, help="time limit of the whole search")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--sweep", default="", metavar="FILE.json",
                      help='time {"shapes": [[B, T, D], ...], "configs": [{PallasConfig fields}, ...]} '
                           "(every shape under every config, compiled in parallel), then exit")
  parser.add_argument("--bench", action="store_true", help="then run the benchmark with the best tiling")
  parser.add_argument("--json", default="", help="with --bench: where kernels.bench writes its JSON")
  args = parser.parse_args(argv)
  if args.sweep:
    with open(args.sweep) as f:
      spec = json.load(f)
    unknown = set(spec) - {"shapes", "configs", "dtype", "out"}
    if unknown:
      parser.error(f"--sweep {args.sweep}: unknown keys {sorted(unknown)}; valid: shapes, configs, dtype, out")
    results = tune([PallasConfig(**c) for c in spec["configs"]], shapes=[tuple(s) for s in spec["shapes"]],
                   dtype=jnp.dtype(spec.get("dtype", args.dtype)))
    if spec.get("out"):
      with open(spec["out"], "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, f, indent=1)
    return 0
  best = _tune_isolated(args.per_config_s, args.budget_s, args.dtype) if args.tune else {}
  if args.bench:
    from kernels import bench, scan
    scan.GPU_DEFAULTS.update(best)
    print(f"benchmark with GPU_DEFAULTS = {scan.GPU_DEFAULTS}", flush=True)
    return bench.main(["--kernels", "scan"] + (["--json", args.json] if args.json else []))
  return 0


if __name__ == "__main__":
  sys.exit(main())
