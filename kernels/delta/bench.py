"""The delta rule (``kernels/delta``): our Pallas state pass and XLA chunked form vs fla's Triton.

    python -m kernels.bench --kernels delta            # B4 T8192 H16 d_k = d_v = 128, bf16, gated and ungated
    python -m kernels.bench --kernels delta --quick    # a tiny shape (on CPU the Pallas kernels interpret)
    python -c "from kernels.delta.bench import stages; stages()"   # ms of each stage of our chunked form
    python -m kernels.delta.bench --segments 4 --json /tmp/delta_segments.json
        # ours again with 4 packed documents per row (segment_ids) beside the rows without

Packed documents (``--segments D``): each row is cut into D documents at distinct random positions
(fixed seed) and our implementations run again with those ``segment_ids``, checked against the token
recurrence with the same ids; those rows carry ``"segments": D`` (0 in the others) and the shape label
says "D docs/row". The peer is timed without segments only.

Inputs (DeltaNet / Gated DeltaNet as the mixers feed them): q, k L2-normalised per head (q also scaled
by d_k^−1/2), v ~ N(0, 1), β = σ(x), and for the gated variant one log-decay per head
``log σ(x) / 16`` (decays ≈ 0.96 – 1, long memory), x ~ N(0, 1); q, k, v, β bf16, the log-decay f32.
fwd+bwd is the vjp wrt q, k, v, β (and the log-decay) for a random bf16 cotangent. Peers: fla
(flash-linear-attention) ``chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0)`` and
``chunk_delta_rule(q, k, v, beta, scale=1.0)`` on the same ``[B, T, H, D]`` tensors; where fla refuses
to run (e.g. its backward on Triton < 3.7.1 on Hopper) the row records the error.

Every implementation is checked before it is timed, on the very program that is timed (full shape):
its output and each gradient for batch 0, heads 0–1 (all 8192 tokens) against the token-by-token
recurrence in f32 (``impl="reference"``, ``highest`` matmul precision) on that slice. Progress is
logged with timestamps.

Floors. Bytes: forward reads q, k, v, β (and g) and writes o; fwd+bwd adds dO read, q, k, v, β, g read
again and dq, dk, dv, dβ, dg written. FLOPs of the chunked form with chunks of C = 64, per token and
head: 6·d_k·d_v (W S, K̂ᵀU and q S against the d_k × d_v state) + C·(3·d_k + 2·d_v) (the causal halves
of k kᵀ, of the triangular solve for [U | W] and of the intra-chunk q kᵀ and scores·U); the backward
counts twice the forward.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from kernels.bench import (Context, check_out_and_grads, checked_row, format_table, head_slice, peer_row,
                           progress_log, random_documents, torch_peer, vjp_fns, write_report)
from kernels.delta import pallas as P
from kernels.delta import xla as X
from kernels.delta.pallas import PallasConfig
from kernels.delta import delta_rule

FULL = (4, 8192, 16, 128, 128)  # batch, time, heads, d_k, d_v
QUICK = (1, 128, 2, 32, 32)
TOL = 2e-2  # bf16 inputs against an f32 reference
N_SETS = 3
PALLAS_CHUNK = 64  # fla's chunk; the Pallas path needs a power of two ≥ 16
XLA_CHUNK = 16  # the mixers' default chunk_size
NAMES = ("q", "k", "v", "beta", "g")


def _label(gated, batch, time, heads, dk, dv, segments=0):
  return (f"B{batch} T{time} H{heads} Dk{dk} Dv{dv} bf16 " + ("gated (per-head decay)" if gated else "ungated")
          + (f" {segments} docs/row" if segments else ""))


def _inputs(seed, gated, batch, time, heads, dk, dv):
  """(q, k, v, beta[, g], do): the arguments of delta_rule and the output cotangent."""
  kq, kk, kv, kb, kg, kd = jax.random.split(jax.random.key(seed), 6)
  bf = jnp.bfloat16
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = (unit(jax.random.normal(kq, (batch, time, heads, dk))) * dk ** -0.5).astype(bf)
  k = unit(jax.random.normal(kk, (batch, time, heads, dk))).astype(bf)
  v = jax.random.normal(kv, (batch, time, heads, dv)).astype(bf)
  beta = jax.nn.sigmoid(jax.random.normal(kb, (batch, time, heads))).astype(bf)
  g = jax.nn.log_sigmoid(jax.random.normal(kg, (batch, time, heads))) / 16
  do = jax.random.normal(kd, (batch, time, heads, dv)).astype(bf)
  return (q, k, v, beta) + ((g,) if gated else ()) + (do,)


def _fns(**kwargs):
  """jit(q, k, v, beta[, g]) → o; jit(…, do) → grads; jit(…, do) → (o, grads)."""
  return vjp_fns(lambda *a: delta_rule(*a, **kwargs)[0])


def _check_all(name, ours, ref, tol=TOL):
  return check_out_and_grads(name, ours, ref, NAMES, tol)


def _reference(args, segment_ids=None):
  f32 = [x.astype(jnp.float32) for x in args]
  with jax.default_matmul_precision("highest"):
    return _fns(impl="reference", segment_ids=segment_ids)[2](*f32)


_log = progress_log("bench_delta")


def _fla(ctx, gated, sets, ref):
  """fla chunk_(gated_)delta_rule: (timings dict, None) or (None, why not). A backward that fails
  leaves the forward timed and checked, with the error in ``note``."""
  name = "fla chunk_gated_delta_rule" if gated else "fla chunk_delta_rule"
  def load():
    if gated:
      from fla.ops.gated_delta_rule import chunk_gated_delta_rule
      return lambda q, k, v, beta, g: chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0)[0]
    from fla.ops.delta_rule import chunk_delta_rule
    return lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta, scale=1.0)[0]

  return torch_peer(ctx, name, load, sets, len(sets[0]) - 1, ref, NAMES, TOL, _log)


ROWS = ("pallas64", "fla", "pallas16", "xla16")


def _run_one(ctx: Context, gated: bool, shape, which=ROWS, segments: int = 0) -> list[dict]:
  """The rows ``which`` for one shape; ``segments``: documents per row (0: no segment_ids)."""
  batch, time, heads, dk, dv = shape
  sets = [_inputs(seed, gated, *shape) for seed in range(1 if ctx.quick else N_SETS)]
  segment_ids = random_documents(batch, time, segments) if segments else None
  packed = {} if segment_ids is None else {"segment_ids": segment_ids}
  ref = jax.block_until_ready(_reference(head_slice(sets[0]), None if segment_ids is None else segment_ids[:1]))
  _log(f"reference ready ({_label(gated, *shape, segments)})")
  n_qk, n_v, n_h = batch * time * heads * dk, batch * time * heads * dv, batch * time * heads
  scalars = 2 * n_h + (4 * n_h if gated else 0)  # β bf16, g f32
  io = 2 * (2 * n_qk + 2 * n_v) + scalars  # q, k, v, o in bf16
  flops = batch * time * heads * (6 * dk * dv + PALLAS_CHUNK * (3 * dk + 2 * dv))
  base = dict(kernel="delta", shape=_label(gated, *shape, segments), segments=segments,
              floor_fwd_ms=ctx.floor_ms(bytes_moved=io, flops=flops),
              floor_fwdbwd_ms=ctx.floor_ms(bytes_moved=2 * (6 * n_qk + 5 * n_v) + 3 * scalars, flops=3 * flops),
              reference="token recurrence f32, batch 0 heads 0-1, all tokens")
  on_cpu = ctx.platform == "cpu"

  def ours(name, **kwargs):
    return checked_row(ctx, base, name, _fns(**packed, **kwargs), sets, ref, _check_all, _log)

  def peer():
    label = "fla chunk_gated_delta_rule" if gated else "fla chunk_delta_rule"
    return peer_row(base, f"{label} (Triton)", lambda: _fla(ctx, gated, sets, ref), _log)

  # Most informative first: ours, the peer, then our XLA form (slowest to compile).
  makers = {
      "pallas64": lambda: ours(f"pallas C={PALLAS_CHUNK} (ours)", impl="pallas", chunk_size=PALLAS_CHUNK,
                               interpret=on_cpu),
      "fla": peer,
      "pallas16": lambda: ours(f"pallas C={XLA_CHUNK} (ours)", impl="pallas", chunk_size=XLA_CHUNK, interpret=on_cpu),
      "xla16": lambda: ours(f"xla chunked C={XLA_CHUNK} (ours)", impl="xla", chunk_size=XLA_CHUNK),
  }
  rows = {name: makers[name]() for name in which}
  order = ("pallas64", "pallas16", "xla16", "fla")  # the table: ours, then the peer
  return [rows[name] for name in order if name in rows]


def run(ctx: Context, which=ROWS, segments: int = 0) -> list[dict]:
  """Gated and ungated; ``which``: the rows to measure (a subset of ``ROWS``); ``segments`` > 0: our
  rows of ``which`` again with that many packed documents per row, after the rows without."""
  unknown = set(which) - set(ROWS)
  if unknown:
    raise ValueError(f"bench_delta.run: unknown rows {sorted(unknown)}; valid: {ROWS}")
  shape = QUICK if ctx.quick else FULL
  ours = tuple(name for name in which if name != "fla")
  rows = []
  for gated in (True, False):
    rows += _run_one(ctx, gated, shape, which)
    if segments:
      rows += _run_one(ctx, gated, shape, ours, segments)
  return rows


def main(argv=None) -> int:
  """``python -m kernels.delta.bench``: the rows of ``kernels.bench --kernels delta`` (same context,
  table and JSON report), with ``--segments`` for packed documents; the report adds ``"segments"``."""
  parser = argparse.ArgumentParser(prog="python -m kernels.delta.bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--segments", type=int, default=0,
                      help="also time our rows with this many documents per row (segment_ids); 0: off")
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
  parser.add_argument("--quick", action="store_true", help="small shapes (checks the script, not the speed)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  args = parser.parse_args(argv)
  which = tuple(name.strip() for name in args.rows.split(",") if name.strip())
  if set(which) - set(ROWS):
    parser.error(f"--rows: unknown {sorted(set(which) - set(ROWS))}; valid: {', '.join(ROWS)}")
  if args.segments < 0 or args.segments == 1:
    parser.error(f"--segments={args.segments}: 0 (off) or at least 2 documents per row")
  device = jax.devices()[0]
  ctx = Context(quick=args.quick, platform=device.platform, iters=3 if args.quick else 20,
                repeats=1 if args.quick else 5)
  rows = run(ctx, which, segments=args.segments)
  print(format_table(rows), flush=True)
  write_report("kernels.delta.bench", argv, rows, args.json, segments=args.segments)
  return 0


# --- where the time goes: the stages of our chunked form -----------------------------------------------


def _stage_fns(f, n_args: int):
  """jit(*args) → f's outputs; jit(*args) → gradients of Σ ⟨outputs, fixed random cotangents⟩."""
  def loss(*args):
    leaves = [x for x in jax.tree.leaves(f(*args)) if jnp.issubdtype(x.dtype, jnp.floating)]
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return sum(jnp.vdot(jax.random.normal(key, x.shape, jnp.float32), x.astype(jnp.float32))
               for key, x in zip(keys, leaves))

  return jax.jit(f), jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def stages(shape=None, chunks=(16, 64), gated: bool = True) -> list[dict]:
  """Times the three stages of ``delta_rule``'s chunked form separately, forward and fwd+bwd: the
  WY precompute (all XLA, or with the Pallas WY kernel, whole chunks and blocks of 16), the
  sequential pass over chunks (Pallas on GPU, ``lax.scan`` for impl xla) and the outputs (XLA), for
  each chunk size. Prints one line per stage and returns the rows."""
  device = jax.devices()[0]
  ctx = Context(quick=False, platform=device.platform, iters=10, repeats=3)
  shape = shape or (FULL if ctx.platform != "cpu" else QUICK)
  batch, time, heads, dk, dv = shape
  q, k, v, beta, *rest = _inputs(0, gated, *shape)
  g = rest[0] if gated else None
  dot_dtype = "bfloat16"
  rows = []
  for chunk in chunks:
    c = jax.jit(X._precompute, static_argnums=5)(q, k, v, beta, g, chunk)
    s0 = jnp.zeros((batch, heads, dk, dv), jnp.float32)
    passes = {"xla scan": X._scan_pass}
    if P._is_pow2_tile(chunk):
      passes["pallas"] = lambda *a: P.state_pass(*a, dot_dtype=dot_dtype, interpret=ctx.platform == "cpu")
    entering, u, _ = jax.jit(X._scan_pass)(c.w, c.u_tilde, c.k_to_end, c.chunk_decay, s0)
    wy_pallas = lambda *a, block=None: P.wy_factors(*a, dot_dtype=dot_dtype, interpret=ctx.platform == "cpu",
                                                           config=PallasConfig(wy_block=block))
    precompute = lambda wy: (lambda q, k, v, beta, *g: X._precompute(q, k, v, beta, (g or [None])[0], chunk, wy),
                             (q, k, v, beta) + ((g,) if gated else ()))
    work = {
        "precompute (xla)": precompute(X.wy_factors_xla),
        **({"precompute (pallas wy)": precompute(wy_pallas)} if P._is_pow2_tile(chunk) else {}),
        **({"precompute (pallas wy, blocks 16)": precompute(lambda *a: wy_pallas(*a, block=16))}
           if P._is_pow2_tile(chunk) and chunk > 16 else {}),
        **{f"pass ({name})": (fn, (c.w, c.u_tilde, c.k_to_end, c.chunk_decay, s0)) for name, fn in passes.items()},
        "outputs": (lambda c, entering, u: X._outputs(c, entering, u, time), (c, entering, u)),
    }
    for name, (f, args) in work.items():
      fwd, grad = _stage_fns(f, len(args))
      row = dict(chunk=chunk, stage=name, fwd_ms=ctx.time_jax(fwd, [args]), fwdbwd_ms=ctx.time_jax(grad, [args]))
      print(f"  C={chunk:<3} {name:<34} fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwdbwd_ms']:8.3f} ms", flush=True)
      rows.append(row)
  return rows


if __name__ == "__main__":
  sys.exit(main())
