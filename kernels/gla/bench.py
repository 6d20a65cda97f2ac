"""Gated linear attention (``kernels/gla``): our Pallas kernels and XLA chunked form vs fla's Triton.

    python -m kernels.bench --kernels gla            # B4 T8192 H16 d_k = d_v = 128, bf16, per-key-dim decay
    python -m kernels.bench --kernels gla --quick    # a tiny shape (on CPU the Pallas kernels interpret)
    python -m kernels.gla.bench --segments 4 --json /tmp/gla.json   # also with 4 packed documents per row
    python -c "from kernels.gla.bench import tune; tune()"   # Pallas tilings, time per kernel
    python -c "from kernels.gla.bench import tune; tune(segments=4)"   # the same with documents

Inputs (the GLA paper's regime): q ~ N(0, 1/d_k), k, v ~ N(0, 1), log-decay per key dim
``log σ(x) / 16`` with x ~ N(0, 1) (GLA's temperature τ = 16: decays ≈ 0.95 – 1, long memory), all
bf16; fwd+bwd is the vjp wrt q, k, v and the log-decay for a random cotangent. Peer: fla
(flash-linear-attention) ``chunk_gla(q, k, v, g, scale=1.0)`` on the same ``[B, T, H, D]`` tensors.

With ``--segments N`` each of our implementations is also timed with ``segment_ids`` that cut every
row into N documents at random positions (``segment_ids``; the same cuts for every input set),
beside the same call without them; those rows carry ``"segments": N`` (the others None), and the
JSON report, the same as ``python -m kernels.bench`` writes, a top-level ``"segments"``. On GPU each
Pallas row's ``note`` names its output stage and why it is not Mosaic GPU. On Hopper the default
output stage is Mosaic GPU's with documents too, so one more row, "pallas triton output (ours) N
docs/row", times the Triton stage (``PallasConfig.out_kernel="triton"``) with the same documents,
checked like every row.

Every implementation is checked before it is timed, on the very program that is timed (full
shape): its output and each gradient for batch 0, heads 0–1 (all 8192 tokens) against the
token-by-token recurrence in f32 (``impl="reference"``, ``highest`` matmul precision) on that slice,
where the reference's saved per-step states fit in memory. Progress is logged with timestamps.

Floors. Bytes: forward reads q, k, v, g and writes o (5 arrays); fwd+bwd adds dO read and dq, dk,
dv, dg written and q, k, v, g read again (14 arrays). FLOPs of the chunked form with chunks of 64:
per token and head 4·d_k·d_v (reading and updating the state) + 64·(d_k + d_v) (the causal half of
the intra-chunk products); the backward counts twice the forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time as _time

import jax
import jax.numpy as jnp

from kernels.bench import (Context, check_out_and_grads, checked_row, format_table, head_slice, peer_row,
                           progress_log, random_documents, torch_peer, vjp_fns, write_report)
from kernels.dispatch import tma_gpu
from kernels.gla import PallasConfig, gla
from kernels.gla.reference import _document_starts

FULL = (4, 8192, 16, 128, 128)  # batch, time, heads, d_k, d_v
QUICK = (1, 64, 2, 32, 32)
TOL = 2e-2  # bf16 inputs against an f32 reference
N_SETS = 3
XLA_CHUNK = 16  # the mixers' default chunk_size


def _label(batch, time, heads, dk, dv):
  return f"B{batch} T{time} H{heads} Dk{dk} Dv{dv} bf16 per-dim decay"


def _inputs(seed, batch, time, heads, dk, dv):
  kq, kk, kv, kg, kd = jax.random.split(jax.random.key(seed), 5)
  bf = jnp.bfloat16
  q = (jax.random.normal(kq, (batch, time, heads, dk)) * dk ** -0.5).astype(bf)
  k = jax.random.normal(kk, (batch, time, heads, dk)).astype(bf)
  v = jax.random.normal(kv, (batch, time, heads, dv)).astype(bf)
  g = (jax.nn.log_sigmoid(jax.random.normal(kg, (batch, time, heads, dk))) / 16).astype(bf)
  do = jax.random.normal(kd, (batch, time, heads, dv)).astype(bf)
  return q, k, v, g, do


def _fns(**kwargs):
  """jit(q, k, v, g) → o; jit(q, k, v, g, do) → (dq, dk, dv, dg); jit(…, do) → (o, grads)."""
  return vjp_fns(lambda q, k, v, g: gla(q, k, v, g, **kwargs)[0])


def _check_all(name, ours, ref, tol=TOL):
  return check_out_and_grads(name, ours, ref, ("q", "k", "v", "g"), tol)


def _reference(args, segments=None):
  f32 = [x.astype(jnp.float32) for x in args]
  with jax.default_matmul_precision("highest"):
    return _fns(impl="reference", segment_ids=segments)[2](*f32)


_log = progress_log("bench_gla")


def _fla(ctx, sets, ref):
  """fla chunk_gla: (timings dict, None) or (None, why not)."""
  def load():
    from fla.ops.gla import chunk_gla
    return lambda q, k, v, g: chunk_gla(q, k, v, g, scale=1.0)[0]

  return torch_peer(ctx, "fla chunk_gla", load, sets, 4, ref, ("q", "k", "v", "g"), TOL, _log)


def run(ctx: Context, config: PallasConfig | None = None, *, with_xla: bool = True,
        segments: int | None = None) -> list[dict]:
  """Our Pallas kernels (``config``), our XLA chunked form (``with_xla``) and fla's ``chunk_gla``;
  ``segments``: ours also with that many documents per row (see the module docstring)."""
  shape = QUICK if ctx.quick else FULL
  batch, time, heads, dk, dv = shape
  sets = [_inputs(seed, *shape) for seed in range(1 if ctx.quick else N_SETS)]
  ref = jax.block_until_ready(_reference(head_slice(sets[0])))
  _log(f"reference ready ({_label(*shape)})")
  seg = ref_seg = None
  if segments is not None:
    seg = random_documents(batch, time, segments)
    ref_seg = jax.block_until_ready(_reference(head_slice(sets[0]), seg[:1]))
    _log(f"reference with {segments} documents per row ready")
  n_qk, n_v = batch * time * heads * dk, batch * time * heads * dv
  io = 2 * (3 * n_qk + 2 * n_v)  # q, k, g, v, o in bf16
  flops = batch * time * heads * (4 * dk * dv + 64 * (dk + dv))
  base = dict(kernel="gla", shape=_label(*shape), floor_fwd_ms=ctx.floor_ms(bytes_moved=io, flops=flops),
              floor_fwdbwd_ms=ctx.floor_ms(bytes_moved=2 * (9 * n_qk + 5 * n_v), flops=3 * flops),
              reference="token recurrence f32, batch 0 heads 0-1, all tokens")
  on_cpu = ctx.platform == "cpu"

  def ours(name, **kwargs):
    rows = [dict(checked_row(ctx, base, name, _fns(**kwargs), sets, ref, _check_all, _log), segments=None)]
    if segments is not None:
      row = checked_row(ctx, base, f"{name} {segments} docs/row", _fns(segment_ids=seg, **kwargs), sets, ref_seg,
                        _check_all, _log)
      rows.append(dict(row, segments=segments))
    if kwargs.get("impl") == "pallas" and not on_cpu:
      for row in rows:
        row.setdefault("note", _output_stage_note(sets[0], kwargs.get("pallas_config")))
    return rows

  def peer():
    return dict(peer_row(base, "fla chunk_gla (Triton)", lambda: _fla(ctx, sets, ref), _log), segments=None)

  # Ours first: the peer's autotuning can take minutes and a time limit may end the run there.
  rows = ours("pallas (ours)", impl="pallas", interpret=on_cpu, pallas_config=config)
  if segments is not None and not on_cpu and tma_gpu():
    triton = dataclasses.replace(config or PallasConfig(), out_kernel="triton")
    row = checked_row(ctx, base, f"pallas triton output (ours) {segments} docs/row",
                      _fns(impl="pallas", pallas_config=triton, segment_ids=seg), sets, ref_seg, _check_all, _log)
    rows.append(dict(row, segments=segments, note=_output_stage_note(sets[0], triton)))
  if with_xla:
    rows += ours(f"xla chunked C={XLA_CHUNK} (ours)", impl="xla", chunk_size=XLA_CHUNK)
  _log("rows so far: " + json.dumps([{k: r.get(k) for k in ("impl", "fwd_ms", "fwdbwd_ms", "rel_err")} for r in rows]))
  return rows + [peer()]


def _output_stage_note(args, config: PallasConfig | None) -> str:
  """The output stage a Pallas row ran on this GPU and, if not Mosaic GPU, why (the full-size inputs
  need no padding: time is a multiple of the chunk, head dims powers of two)."""
  from kernels.gla import pallas as G
  q, _, v, g, _ = args
  try:
    stage, why = G._output_stage(q, v, g, config or PallasConfig(), interpret=False)
  except ValueError as e:  # an explicit out_kernel this call cannot take (the row says skipped)
    return f"output stage: {e}"
  return f"output stage {stage}" + (f": {why}" if why else "")


# --- tuning: the Pallas kernels one at a time --------------------------------------------------------


def kernel_times(ctx: Context, config: PallasConfig, shape=FULL, segments: int | None = None) -> dict:
  """ms per call of each Pallas kernel (forward states, output, backward states, dq/dk/dlogα, dv; on
  Hopper also the Mosaic GPU output stage and the dv kernel that reads its score matrices);
  ``segments``: with that many documents per row (every kernel's document masks, the Mosaic GPU
  stage's too: timed only here, checked by :func:`run`)."""
  from kernels.gla import pallas as G
  batch, time, heads, dk, dv = shape
  q, k, v, g, do = _inputs(0, *shape)
  cfg = dataclasses.replace(config, chunk=min(config.chunk, time))
  plan = G._Plan(target="triton", interpret=ctx.platform == "cpu", cfg=cfg, heads=heads, chunks=time // cfg.chunk, dk=dk, dv=dv,
                 decay=True, dot_dtype="bfloat16", segmented=segments is not None)
  s0 = jnp.zeros((batch, heads, dv, dk), jnp.float32)
  ell = None
  if segments is not None:
    ell = G._chunk_start_counts(_document_starts(random_documents(batch, time, segments)), cfg.chunk, time)
  fns = {
      "states": jax.jit(lambda *a: G._states_call(plan, *a, reverse=False, ell=ell)),
      "output": jax.jit(lambda *a: G._output_call(plan, *a, ell=ell)),
      "states_bwd": jax.jit(lambda *a: G._states_call(plan, *a, reverse=True, ell=ell)),
      "dqk": jax.jit(lambda *a: G._dqk_call(plan, *a, ell=ell)),
      "dv": jax.jit(lambda *a: G._dv_call(plan, *a, ell=ell)),
  }
  out, args = {}, {"states": (k, g, v, s0), "states_bwd": (q, g, do, s0)}
  try:
    states = fns["states"](*args["states"])[0]
    args["output"] = (q, k, g, v, states)
    at = fns["output"](*args["output"])[1]
    e_states = fns["states_bwd"](*args["states_bwd"])[0]
    args["dqk"] = (q, k, g, v, do, states, e_states)
    args["dv"] = (q, k, g, do, at, e_states)
  except Exception as e:  # a tiling that fails to compile is reported, not fatal
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
  from kernels.gla import mosaic_gpu as gla_mgpu
  if tma_gpu() and not gla_mgpu.supports(q, v, g, cfg.chunk):  # the Mosaic GPU output stage and its dv
    mplan = dataclasses.replace(plan, mgpu_out=True)
    fns["output_mgpu"] = jax.jit(lambda q, k, v, g, st: gla_mgpu.output(
        q, k, v, gla_mgpu.decay_parts(g, G.MIN_LOG_DECAY), st, min_log_decay=G.MIN_LOG_DECAY, ell=ell))
    fns["dv_mgpu"] = jax.jit(lambda *a: G._dv_call(mplan, *a, ell=ell))
    args["output_mgpu"] = (q, k, v, g, states)
    args["dv_mgpu"] = (q, k, g, do, fns["output_mgpu"](*args["output_mgpu"])[1], e_states)
  for name, f in fns.items():
    try:
      out[name] = ctx.time_jax(f, [args[name]])
    except Exception as e:
      out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
  return out


CANDIDATES = [  # each field only changes the kernels named by its prefix
    PallasConfig(),
    PallasConfig(unroll=True),
    PallasConfig(dqk_reuse_scores=False),
    PallasConfig(dqk_warps=2, dv_warps=8),
    PallasConfig(out_block=64, dv_block=64),
    PallasConfig(out_block=64, out_warps=2, dqk_block=16),
    PallasConfig(states_block=32, states_stages=3),
    PallasConfig(chunk=32),
    PallasConfig(chunk=128),
    PallasConfig(exact_dots="ieee", dqk_block=16, dqk_warps=2),
    PallasConfig(dqk_exact_dots="ieee", dqk_block=16, dqk_warps=2),
]

# Which fields each kernel's time depends on (besides the shared ones, which change several).
KERNEL_FIELDS = {"states": ("states_block", "states_warps", "states_stages"),
                 "states_bwd": ("states_block", "states_warps", "states_stages"),
                 "output": ("out_block", "out_warps"),
                 "dqk": ("dqk_block", "dqk_warps", "dqk_reuse_scores", "dqk_exact_dots"),
                 "dv": ("dv_block", "dv_warps")}
SHARED_FIELDS = ("chunk", "stages", "unroll", "exact_dots")


def best_config(results: list[tuple[PallasConfig, dict]]) -> tuple[PallasConfig, float] | None:
  """The fastest fwd+bwd combination of measured tiles: per value of the shared fields (chunk, stages,
  unroll, exact_dots), each kernel's fields from the candidate where that kernel was fastest (the
  states fields by forward + reverse time); then the shared values with the smallest sum. Returns
  (config, predicted fwd+bwd ms) or None."""
  groups: dict = {}
  for cfg, times in results:
    if all(isinstance(times.get(k), float) for k in KERNEL_FIELDS):
      groups.setdefault(tuple(getattr(cfg, f) for f in SHARED_FIELDS), []).append((cfg, times))
  best = None
  for shared, members in groups.items():
    fields, total = dict(zip(SHARED_FIELDS, shared)), 0.0
    for kernels in (("states", "states_bwd"), ("output",), ("dqk",), ("dv",)):
      cfg, times = min(members, key=lambda m: sum(m[1][k] for k in kernels))
      fields.update({f: getattr(cfg, f) for f in KERNEL_FIELDS[kernels[0]]})
      total += sum(times[k] for k in kernels)
    if best is None or total < best[1]:
      best = (PallasConfig(**fields), total)
  return best


def tune(configs: list[PallasConfig] | None = None, shape=None, budget_s: float = 1e9, segments: int | None = None):
  """Prints the time of each Pallas kernel under several tilings (stops starting new ones after
  ``budget_s`` seconds), then the best combination (:func:`best_config`); ``segments``: with that
  many documents per row."""
  device = jax.devices()[0]
  ctx = Context(quick=False, platform=device.platform, iters=10, repeats=3)
  shape = shape or (FULL if ctx.platform != "cpu" else QUICK)
  start = _time.time()
  results = []
  for cfg in configs or CANDIDATES:
    if _time.time() - start > budget_s:
      break
    t0 = _time.time()
    times = kernel_times(ctx, cfg, shape, segments)
    given = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(PallasConfig(), k)}
    total = [sum(times[k] for k in keys) if all(isinstance(times.get(k), float) for k in keys) else None
             for keys in (("states", "output"), ("states", "output", "states_bwd", "dqk", "dv"))]
    print(f"  {given}: " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in times.items())
          + " | " + " ".join(f"{k} {v:.3f}" for k, v in zip(("fwd", "fwd+bwd"), total) if v is not None)
          + f" ({_time.time() - t0:.0f} s)", flush=True)
    results.append((cfg, times))
  best = best_config(results)
  if best is not None:
    given = {k: v for k, v in dataclasses.asdict(best[0]).items() if v != getattr(PallasConfig(), k)}
    print(f"  best combination {given}: fwd+bwd {best[1]:.3f} ms predicted from the per-kernel times", flush=True)
  return results


def main(argv=None) -> int:
  """``python -m kernels.gla.bench``: this family's rows as ``python -m kernels.bench --kernels gla``
  prints and writes them, with ``--segments``."""
  parser = argparse.ArgumentParser(prog="python -m kernels.gla.bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny shape (checks the script, not the speed)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  parser.add_argument("--segments", type=int, default=None, metavar="N",
                      help="also time ours with N packed documents per row")
  parser.add_argument("--no-xla", action="store_true",
                      help="leave out our XLA chunked rows (on an H100 they take most of the run: ~13 / 41 ms "
                      "a call against ~1 / 7 for the kernels)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  ctx = Context(quick=args.quick, platform=device.platform, iters=3 if args.quick else 20,
                repeats=1 if args.quick else 5)
  rows = run(ctx, segments=args.segments, with_xla=not args.no_xla)
  print(format_table(rows), flush=True)
  write_report("kernels.gla.bench", argv, rows, args.json, segments=args.segments)
  return 0


if __name__ == "__main__":
  sys.exit(main())
