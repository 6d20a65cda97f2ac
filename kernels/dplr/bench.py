"""The generalized delta rule (``kernels/dplr``): our Pallas state pass and XLA chunked form vs fla's Triton.

    python -m kernels.bench --kernels dplr            # B4 T8192 H16 d_k = d_v = 128, bf16, three variants
    python -m kernels.dplr.bench --quick              # a tiny shape (on CPU the Pallas kernels interpret)
    python -m kernels.dplr.bench --variants kda --rows pallas,fla --json /tmp/dplr.json

Variants: the recurrence as each mixer feeds it, each beside the fla kernel of the same recurrence.

- ``kda`` (Kimi Delta Attention): ``S_t = (I − β k kᵀ) Diag(α_t) S + β k vᵀ``, one decay per key channel,
  through :func:`kernels.dplr.delta_rule_as_dplr` (as the mixer does); fla ``chunk_kda(q, k, v, g, beta,
  scale=1.0)``.
- ``rwkv7``: ``Diag(w_t) − (κ̂ ⊙ a_t) κ̂ᵀ``, one decay per key channel: ``dplr(r, k, v, a = κ̂ ⊙ a_t,
  b = κ̂, log w)``; fla ``chunk_rwkv7(r, w = log w, k, v, a = −κ̂, b = κ̂ ⊙ a_t, scale=1.0)`` (the same
  transition with the roles of a and b swapped: ``kernels/dplr/__init__.py``).
- ``gated_delta`` (Gated DeltaNet): as ``kda`` with one decay per head; fla ``chunk_gated_delta_rule(q, k,
  v, g, beta, scale=1.0)``.

Inputs: q (RWKV-7's r) and k L2-normalised per head, q also scaled by d_k^−1/2 (RWKV-7's k: N(0, 1/d_k)),
κ̂ L2-normalised, v ~ N(0, 1), β and a_t = σ(x); log-decays ``log σ(x) / 16`` (KDA, Gated DeltaNet:
decays ≈ 0.96 – 1) and ``−e^{−1/2} σ(x)`` (RWKV-7's range), x ~ N(0, 1). Everything bf16 but the
log-decays (f32). fwd+bwd is the vjp wrt every input for a random bf16 cotangent of the output; our
rows include the conversion to ``dplr``'s arguments (what the mixers run), fla's its own.

Every implementation is checked before it is timed, on the very program that is timed (full shape):
its output and each gradient for batch 0, heads 0–1 (all tokens) against the token recurrence in f32
(``impl="reference"``, ``highest`` matmul precision) on that slice. An implementation that cannot run
here is reported as skipped with the reason; a wrong one stops the benchmark.

Floors. Bytes: forward reads every input and writes o; fwd+bwd reads the inputs twice, dO once, and
writes o and a gradient of every input. FLOPs of the chunked form with chunks of C = 16 (ours), per
token and head: 8·d_k·d_v (K̂ᵀV, W S, Âᵀ U and q S against the d_k × d_v state) + C·(5·d_k + 4·d_v) (the
causal halves of the four pair matrices M_qk, M_qa, M_bk, M_ba, of the solve for [Ũ | W] and of
M_bk V, M_qk V, M_qa U); the backward counts twice the forward.

Our chunk is 16, the mixers' default: the per-key-channel pair gains of the XLA precompute are
``[chunk, chunk, d_k]`` per chunk and head (at C = 64 and this shape, 17 GB each in f32).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kernels.bench import (Context, check_out_and_grads, checked_row, format_table, head_slice, peer_row,
                           progress_log, torch_peer, vjp_fns, write_report)
from kernels.dplr import delta_rule_as_dplr, dplr

FULL = (4, 8192, 16, 128, 128)  # batch, time, heads, d_k, d_v
QUICK = (1, 128, 2, 32, 32)
TOL = 2e-2  # bf16 inputs against an f32 reference
N_SETS = 3
CHUNK = 16
VARIANTS = ("kda", "rwkv7", "gated_delta")
ROWS = ("pallas", "pallas_pre", "fla", "xla")
# The arguments of each variant, in the order our function and fla's take them (gradient names).
NAMES = {"kda": ("q", "k", "v", "beta", "g"), "gated_delta": ("q", "k", "v", "beta", "g"),
         "rwkv7": ("r", "w", "k", "v", "kappa", "iclr")}
PEERS = {"kda": "fla chunk_kda", "rwkv7": "fla chunk_rwkv7", "gated_delta": "fla chunk_gated_delta_rule"}


def _label(variant, batch, time, heads, dk, dv):
  decay = "per-head decay" if variant == "gated_delta" else "per-key decay"
  return f"{variant} B{batch} T{time} H{heads} Dk{dk} Dv{dv} bf16 ({decay})"


def _inputs(seed, variant, batch, time, heads, dk, dv):
  """The arguments of the variant (:data:`NAMES`) and the output cotangent, last."""
  keys = iter(jax.random.split(jax.random.key(seed), 7))
  bf = jnp.bfloat16
  normal = lambda *shape: jax.random.normal(next(keys), shape)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  per_key, per_head = (batch, time, heads, dk), (batch, time, heads)
  q = (unit(normal(*per_key)) * dk ** -0.5).astype(bf)
  v = normal(batch, time, heads, dv).astype(bf)
  if variant == "rwkv7":
    k = (normal(*per_key) * dk ** -0.5).astype(bf)
    log_w = -np.exp(-0.5) * jax.nn.sigmoid(normal(*per_key))
    kappa, iclr = unit(normal(*per_key)).astype(bf), jax.nn.sigmoid(normal(*per_key)).astype(bf)
    args = (q, log_w, k, v, kappa, iclr)
  else:
    k = unit(normal(*per_key)).astype(bf)
    beta = jax.nn.sigmoid(normal(*per_head)).astype(bf)
    g = jax.nn.log_sigmoid(normal(*(per_head if variant == "gated_delta" else per_key))) / 16
    args = (q, k, v, beta, g)
  return args + (normal(batch, time, heads, dv).astype(bf),)


def _ours(variant, **kwargs):
  """``f(*args) -> o`` of the variant on ``kernels.dplr``, the conversion to its arguments included."""
  if variant == "rwkv7":
    return lambda r, log_w, k, v, kappa, iclr: dplr(r, k, v, kappa * iclr, kappa, log_w, **kwargs)[0]

  def delta(q, k, v, beta, g):
    keys, a, b = delta_rule_as_dplr(k, beta, g)
    return dplr(q, keys, v, a, b, g, **kwargs)[0]

  return delta


def _reference(variant, args):
  f32 = [x.astype(jnp.float32) for x in args]
  with jax.default_matmul_precision("highest"):
    return vjp_fns(_ours(variant, impl="reference"))[2](*f32)


_log = progress_log("bench_dplr")


def _fla_kernel(variant):
  """fla's function of the variant, taking the variant's arguments (:data:`NAMES`) as torch tensors."""
  if variant == "kda":
    from fla.ops.kda import chunk_kda
    return lambda q, k, v, beta, g: chunk_kda(q=q, k=k, v=v, g=g, beta=beta, scale=1.0)[0]
  if variant == "gated_delta":
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return lambda q, k, v, beta, g: chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, scale=1.0)[0]
  from fla.ops.rwkv7 import chunk_rwkv7
  return lambda r, w, k, v, kappa, iclr: chunk_rwkv7(r=r, w=w, k=k, v=v, a=-kappa, b=kappa * iclr, scale=1.0)[0]


def _fla(ctx, variant, sets, ref):
  """fla's kernel of the variant: (timings dict, None) or (None, why not). A backward that fails leaves
  the forward checked and timed, with the error in ``note``."""
  return torch_peer(ctx, PEERS[variant], lambda: _fla_kernel(variant), sets, len(sets[0]) - 1, ref, NAMES[variant], TOL, _log)


def _run_one(ctx: Context, variant: str, shape, which=ROWS) -> list[dict]:
  batch, time, heads, dk, dv = shape
  sets = [_inputs(seed, variant, *shape) for seed in range(1 if ctx.quick else N_SETS)]
  ref = jax.block_until_ready(_reference(variant, head_slice(sets[0])))
  _log(f"reference ready ({_label(variant, *shape)})")
  inputs = sum(x.size * x.dtype.itemsize for x in sets[0][:-1])
  output = sets[0][-1].size * sets[0][-1].dtype.itemsize
  flops = batch * time * heads * (8 * dk * dv + CHUNK * (5 * dk + 4 * dv))
  base = dict(kernel="dplr", shape=_label(variant, *shape), variant=variant,
              floor_fwd_ms=ctx.floor_ms(bytes_moved=inputs + output, flops=flops),
              floor_fwdbwd_ms=ctx.floor_ms(bytes_moved=3 * inputs + 2 * output, flops=3 * flops),
              reference="token recurrence f32, batch 0 heads 0-1, all tokens")
  compare = lambda name, ours, ref: check_out_and_grads(name, ours, ref, NAMES[variant], TOL)

  def ours(name, **kwargs):
    return checked_row(ctx, base, name, vjp_fns(_ours(variant, **kwargs)), sets, ref, compare, _log)

  # Most informative first: ours, the peer, then our XLA form.
  makers = {
      "pallas": lambda: ours(f"pallas C={CHUNK} (ours)", impl="pallas", chunk_size=CHUNK,
                             interpret=ctx.platform == "cpu"),
      # The precompute as one Pallas kernel too (dplr's precompute="pallas"; its default is "xla" until
      # this row is measured faster than the one above on a GPU).
      "pallas_pre": lambda: ours(f"pallas+precompute kernel C={CHUNK} (ours)", impl="pallas",
                                 chunk_size=CHUNK, precompute="pallas", interpret=ctx.platform == "cpu"),
      "fla": lambda: peer_row(base, f"{PEERS[variant]} (Triton)", lambda: _fla(ctx, variant, sets, ref), _log),
      "xla": lambda: ours(f"xla chunked C={CHUNK} (ours)", impl="xla", chunk_size=CHUNK),
  }
  rows = {name: makers[name]() for name in which}
  return [rows[name] for name in ("pallas", "pallas_pre", "xla", "fla") if name in rows]  # the table: ours, then the peer


def run(ctx: Context, which=ROWS, variants=VARIANTS) -> list[dict]:
  """The rows ``which`` (a subset of :data:`ROWS`) of each of ``variants`` (of :data:`VARIANTS`)."""
  unknown = (set(which) - set(ROWS)) | (set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"bench_dplr.run: unknown {sorted(unknown)}; rows: {ROWS}, variants: {VARIANTS}")
  shape = QUICK if ctx.quick else FULL
  return [row for variant in variants for row in _run_one(ctx, variant, shape, which)]


def main(argv=None) -> int:
  """``python -m kernels.dplr.bench``: the rows of ``kernels.bench --kernels dplr`` (same context, table
  and JSON report), with a choice of rows and variants."""
  parser = argparse.ArgumentParser(prog="python -m kernels.dplr.bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
  parser.add_argument("--quick", action="store_true", help="small shapes (checks the script, not the speed)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  args = parser.parse_args(argv)
  split = lambda text: tuple(name.strip() for name in text.split(",") if name.strip())
  which, variants = split(args.rows), split(args.variants)
  if set(which) - set(ROWS):
    parser.error(f"--rows: unknown {sorted(set(which) - set(ROWS))}; valid: {', '.join(ROWS)}")
  if set(variants) - set(VARIANTS):
    parser.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; valid: {', '.join(VARIANTS)}")
  device = jax.devices()[0]
  ctx = Context(quick=args.quick, platform=device.platform, iters=3 if args.quick else 20,
                repeats=1 if args.quick else 5)
  rows = run(ctx, which, variants)
  print(format_table(rows), flush=True)
  write_report("kernels.dplr.bench", argv, rows, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
