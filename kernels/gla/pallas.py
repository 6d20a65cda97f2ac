"""Gated linear attention as Pallas kernels (``impl="pallas"``): the chunked form's states, output
and backward kernels, written once for both layouts (Triton on GPU, Mosaic on TPU: ``_Plan.target``),
with the Mosaic GPU output stage of ``kernels/gla/mosaic_gpu.py`` on Hopper.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental import pallas as pl

from kernels.dispatch import mosaic_gpu_or_triton, pallas_layout, tma_gpu
from kernels.gla import mosaic_gpu as gla_mgpu
from kernels.gla.reference import _check, _document_starts
from kernels.pallas_compat import SQUEEZED, lowered_once, mosaic_params, triton_params
from kernels.tiling import next_pow2, round_up

# ----------------------------------------------------------------------------------------------------
# Pallas (impl="pallas").
#
# Chunks of C tokens (``PallasConfig.chunk``), each split into sub-chunks of 16 rows. Within a
# sub-chunk, β_t = Σ_{m≤t} log α_m is the inclusive cumulative log-decay (per key dim, f32) and
# λ = β_15 its total. Across sub-chunks a state carries everything: it is read with q ⊙ e^{β} and
# updated with k ⊙ e^{λ−β}, exponents ≤ 0 that never overflow however strong the decay (an
# underflow to 0 is a true weight below 1e-38); no factor e^{−β}, which overflows within a few
# steps of log α ≈ −20, is ever formed.
#
# Exponents. The intra-sub-chunk scores A_ts = Σ_d q_td k_sd e^{β_td − β_sd} (s ≤ t) carry a decay
# per pair and key dim. They are the dots (q ⊙ e^{β−μ})(k ⊙ e^{μ−β})ᵀ, exact but only safe while
# |β − μ| stays below ~88 (f32 and bf16 share that exponent range). So each log α
# is capped at MIN_LOG_DECAY = −20 (a decay below e^{−20} ≈ 2·10⁻⁹ lets through less than 2e-9 of
# the state, and its gradient is set to 0), and the 16 rows are split in halves of 8 with μ the
# middle of each half (between rows 3–4 and 11–12), so every exponent is within ±3.5·20 = 70:
# pairs in the same half use their half's μ; the 8 × 8 cross block (t in rows 8–15, s in rows 0–7)
# uses μ = β_7, which makes both of its exponents ≤ 0. Products for masked pairs (s > t) may
# overflow; they are discarded by a select. These small dots (16 × 16 × d) take f32 operands at IEEE
# precision even for bf16 inputs: their factors span e^{±70}, and in bf16 the d log α identity below
# amplified their rounding to a 1.4e-2 error (2.4e-3 in f32). Without decay they are plain dots.
# (An earlier version built the diagonal blocks by an exact 16-step recurrence on CUDA cores, with
# no cap; on an H100 at B4 T8192 H16 d128 it was latency-bound on its dependent row loads: 4.1 ms
# for the output kernel and 14.7 ms for dq/dk.)
#
# States are stored transposed, Sᵀ: [d_v, d_k], so every decay acts along the last (lane) axis.
# Forward, two kernels:
#   states  sequential over chunks: stores Sᵀ entering each chunk, Sᵀ ← Sᵀ e^{b_C} + vᵀ(k e^{b_C−b}),
#           and returns the final state (f32).
#   output  one program per (chunk, head, d_v block): a sub-chunk loop o_j = q̂_j S' + A_jj v_j,
#           S' ← e^{λ_j} S' + k̂_jᵀ v_j (f32 in registers) from the stored entering state. It also
#           stores the diagonal score blocks A_jjᵀ (16 floats per token) for the backward. On Hopper
#           with bf16 inputs, a decay and chunks of 64, ``kernels/gla/mosaic_gpu.py`` replaces it (whole-
#           chunk wgmma products; it stores each chunk's whole score matrix A, 64 floats per token).
# Backward, with dO and the cotangent of the final state: the reverse state D_t = ∂L/∂S_t obeys
# D_t = q_t dO_tᵀ + diag(α_{t+1}) D_{t+1} (a GLA recurrence run backwards), and
#   dq_t = S_t dO_t,   dk_t = D_t v_t,   dv_t = D_tᵀ k_t,   dS_0 = diag(α_0) D_0,
#   d log α_r = Σ_{t≥r} (q_t ⊙ dq_t − k_t ⊙ dk_t) + Σ_v (dS_final ⊙ S_final)      (per key dim)
# The last identity follows from α_r S_{r−1} = S_r − k_r v_rᵀ and telescoping Σ_v D_r ⊙ S_r. At the
# end of chunk n its tail Σ_{t > end} (…) + Σ_v dS_final ⊙ S_final equals Σ_v E_n ⊙ S_end(n), with
# E_n the gradient reaching the chunk's last state from later tokens, so each chunk finishes its own
# d log α without a pass over the whole sequence. Three kernels:
#   states (reverse)  the same sequential kernel backwards: stores E_n, returns dS_0.
#   dq/dk/dlogα  per (chunk, head, d_k block), all of d_v: a forward sub-chunk loop for dq (state S'),
#           then a reverse one for dk (state E') and the reverse cumulative sum for d log α.
#   dv      per (chunk, head, d_v block), all of d_k: reverse sub-chunk loop, A_jjᵀ dO_j + k̂_j E'
#           (A_jj read from either output stage's residual).
#
# Layouts. Triton (GPU): arrays stay [batch, time, heads, dim]; a program reads its tiles with
# strides; the sequential kernels hold the whole time axis of one head (a pointer) and loop over
# chunks in a fori_loop; tiles are powers of two ≥ 16 (dims are zero-padded up to one), f32 dots run
# at IEEE precision, 16-bit ones on tensor cores with f32 accumulation. Mosaic (TPU): arrays are moved
# to [batch, heads, time, dim] so blocks are (chunk, dim) tiles; the chunk is a grid axis (sequential
# "arbitrary" for the state kernels, whose carry is the resident final-state block); cumulative sums
# are a lower-triangular f32 matmul (Mosaic has no scan). Rows of a tile are read by a masked
# reduction on both.
# Time is zero-padded to a multiple of the chunk (k = v = q = 0, log α = 0 change nothing).
#
# Documents (``segment_ids``). The state entering a document start is zero. No −∞ enters a cumulative
# log-decay (e^{−∞ − (−∞)} is NaN, and a huge finite value would ruin the differences): a start's own
# log α (finite, ≥ MIN_LOG_DECAY like every row's) stays in the cumulative sums, where every product it
# would decay straddles the start and is masked, so the resets are masks alone; its gradient (it only
# multiplies the discarded state) is zeroed after the dq/dk/d log α kernel. (Zeroing it before the
# kernels, as until session 8, costs a read and a write of log α in the forward: at B4 T8192 H16 d128
# bf16, 2 × 268 MB, an estimated 0.18 ms at 3 TB/s against the 0.18 ms documents added there, unless XLA
# fused it into another pass; not yet measured.) ℓ_t (f32 [batch, time, 1], shared by the heads) counts the starts from
# the chunk's first row up to row t, so within a chunk s and t share a document iff ℓ_s = ℓ_t. For a
# block of rows (a chunk, or a sub-chunk entered after a row with ℓ = ℓ_b): the entering state reaches
# row t iff ℓ_t = ℓ_b ("reach"), row s reaches the block's last state iff ℓ_s = ℓ_last ("tail"), and the
# entering state survives the block iff ℓ_last = ℓ_b ("keep"). So q ⊙ e^{β} is masked by reach,
# k ⊙ e^{λ−β} by tail, the decay e^{λ} of a carried state (S or the reverse E) by keep, and each pair
# of a diagonal block by one-document; every exponent stays as above. d log α: with db_r = q_r ⊙ dq_r −
# k_r ⊙ dk_r and Y_r = Σ_v D_r ⊙ S_r − k_r ⊙ dk_r, Y_r = db_r + [r + 1 is no start] Y_{r+1}, and
# d log α_r = Y_r (0 at a start): per sub-chunk a masked suffix sum (a 16 × 16 product) plus the carry
# on the rows whose document reaches the sub-chunk's end; the carry handed to the previous sub-chunk
# is Y at row 0 unless row 0 starts a document; a chunk's own carry is Σ_v E ⊙ S_end as before (E
# already masked). The Mosaic GPU output stage applies the same masks to whole chunks (its module
# docstring), checked on an H100: documents take whichever output stage ``_output_stage`` picks.
# ----------------------------------------------------------------------------------------------------

PallasTarget = Literal["triton", "mosaic_tpu", "mosaic"]  # "mosaic": the older name of "mosaic_tpu"
EXACT_DOTS = ("ieee", "tf32x3")
OUT_KERNELS = (None, "triton", "mosaic_gpu")
_SUB = 16  # rows of a sub-chunk (the smallest tile a Triton dot takes)
MIN_LOG_DECAY = -20.0  # the Pallas kernels treat log α < −20 as −20 (see the section comment)


@dataclasses.dataclass(frozen=True)
class PallasConfig:
  """Tiling of the Pallas GLA kernels (GPU fields; Mosaic uses ``chunk`` and whole dims).

  ``chunk``: tokens per stored state (a multiple of 16, a power of two on GPU); ``*_block``: the
  d_k / d_v tile of each kernel (powers of two); ``*_warps`` / ``*_stages``: Triton launch values;
  ``unroll``: unroll the loop over the sub-chunks of a chunk (else a fori_loop; the dq/dk kernel
  always unrolls it: its reverse pass reuses every sub-chunk's q ⊙ dq).
  """
  chunk: int = 64
  states_block: int = 64
  states_warps: int = 4
  states_stages: int = 2
  # The defaults below are the fastest tilings measured on an H100 (per-kernel times, the tilings
  # tried, and why the sub-chunk loop carries the state: kernels/BENCHMARKS.md, "GLA Pallas tiling").
  # Small d_k blocks for dq/dk keep two [d_v, block] f32 states in registers and double the programs.
  out_block: int = 128
  out_warps: int = 4
  dqk_block: int = 32
  dqk_warps: int = 4
  # dq/dk: keep each sub-chunk's [16, 16] value–gradient scores from the forward pass for the
  # reverse one instead of recomputing them (a d_v-long dot per sub-chunk).
  dqk_reuse_scores: bool = True
  dv_block: int = 128
  dv_warps: int = 4
  # The exact-f32 diagonal-block dots on GPU: "ieee" (FMA on CUDA cores) or "tf32x3" (three TF32
  # tensor-core products, about f32 accuracy, and faster in every kernel); ``dqk_exact_dots`` for the
  # dq/dk kernel (None: the same). The interpreter and Mosaic always use IEEE.
  exact_dots: str = "tf32x3"
  dqk_exact_dots: str | None = None
  stages: int = 1
  unroll: bool = False
  # The forward's output stage on GPU: "triton" (``_output_kernel``) or "mosaic_gpu"
  # (``kernels/gla/mosaic_gpu.py``: one chunk of 64 rows per CTA, every product a wgmma; Hopper, bf16
  # q, k, v with a decay, d_k and d_v of 64 or 128). None: "mosaic_gpu" where it runs, with or
  # without documents (its document masks were checked against the reference on an H100, and with 4
  # documents a row they keep most of its speed: kernels/BENCHMARKS.md), else "triton". It stores each
  # chunk's whole score matrix for the dv kernel.
  out_kernel: str | None = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one padded, laid-out problem (hashable: a custom_vjp nondiff argument)."""
  target: str
  interpret: bool
  cfg: PallasConfig
  heads: int
  chunks: int
  dk: int
  dv: int
  decay: bool
  dot_dtype: str  # "float32" (IEEE dots) or the 16-bit input dtype (tensor cores, f32 accumulation)
  mgpu_out: bool = False  # the output stage is gla_mgpu.output (residual: each chunk's whole score matrix)
  segmented: bool = False  # document boundaries: every kernel takes ℓ (see "Documents" in the section comment)


_SQ = SQUEEZED
_F32 = jnp.float32


def _f32(x):
  return x.astype(_F32)


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(plan: _Plan, a, b, ca: int, cb: int, *, exact: bool = False):
  """Contract dim ``ca`` of 2-D ``a`` with dim ``cb`` of ``b``; f32 accumulation. ``exact``: f32
  operands at IEEE precision whatever the inputs (the 16 × 16 diagonal blocks, whose factors span
  e^{±70} and whose rounding the d log α identity Σ(q ⊙ dq − k ⊙ dk) would amplify)."""
  dtype = jnp.dtype(_F32 if exact else plan.dot_dtype)
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  if exact and plan.cfg.exact_dots == "tf32x3" and plan.target == "triton" and not plan.interpret:
    precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((ca,), (cb,)), ((), ())),
                             precision=precision, preferred_element_type=_F32)


def _cumsum(plan: _Plan, x):
  """Inclusive cumulative sum over rows, f32."""
  if plan.target == "triton":
    return jnp.cumsum(x, axis=0)
  n = x.shape[0]  # Mosaic has no scan: a lower-triangular ones matrix at f32 precision
  tril = (_iota((n, n), 0) >= _iota((n, n), 1)).astype(_F32)
  return jax.lax.dot_general(tril, x, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=_F32)


def _rows_at(x, *rows):
  """Sum of the given rows of ``x`` as ``[1, dim]`` (a masked reduction: rows of a register tile
  cannot be indexed on GPU)."""
  r = _iota(x.shape, 0)
  mask = functools.reduce(jnp.logical_or, [r == i for i in rows])
  return jnp.sum(jnp.where(mask, x, 0.0), axis=0, keepdims=True)


@dataclasses.dataclass
class _Docs:
  """Document masks of a block of rows (a chunk or a sub-chunk) from ℓ (see "Documents" in the
  section comment): ``reach [rows, 1]``: the state entering the block reaches row t; ``tail [rows,
  1]``: row s reaches the block's last state; ``keep [1, 1]``: no document starts in the block (its
  entering state survives it); ``same [rows, rows]`` (sub-chunks only, ``[s, t]``): s and t are in
  one document."""
  reach: jax.Array
  tail: jax.Array
  keep: jax.Array
  same: jax.Array | None = None


def _docs(plan: _Plan, ell, ell_before, *, pairs: bool = True) -> _Docs:
  """Masks of the rows whose ℓ is ``ell [rows, 1]`` (f32), entered after a row with ℓ =
  ``ell_before [1, 1]``; ``pairs``: with ``same``."""
  last = jnp.max(ell, axis=0, keepdims=True)  # ℓ never decreases within a chunk
  same = None
  if pairs:
    n = ell.shape[0]
    # ℓ along columns too, [s, t] → ℓ_t, as a product with a diagonal (no transposes: Triton and
    # Mosaic both take it); ℓ are small integers, exact in every dot precision used here.
    diag = jnp.where(_iota((n, n), 0) == _iota((n, n), 1), ell, 0.0)
    ell_t = _dot(plan, jnp.ones((n, n), _F32), diag, 1, 0, exact=True)
    same = jnp.abs(ell - ell_t) < 0.5
  return _Docs(reach=ell == ell_before, tail=ell == last, keep=last == ell_before, same=same)


def _ell_before(ell_ref, j):
  """ℓ of the row before sub-chunk ``j`` ([1, 1]; 0 before the chunk's first row)."""
  if isinstance(j, int):
    if j == 0:
      return jnp.zeros((1, 1), _F32)
    return jnp.max(_load(ell_ref, pl.ds(_start(j - 1), _SUB)), axis=0, keepdims=True)
  prev = jnp.max(_load(ell_ref, pl.ds(_start(jnp.maximum(j - 1, 0)), _SUB)), axis=0, keepdims=True)
  return jnp.where(j > 0, prev, 0.0)


@dataclasses.dataclass
class _Sub:
  """Decay factors of one sub-chunk of 16 rows (all None without decay), and its document masks
  (``docs``, None without documents).

  Across sub-chunks (exponents ≤ 0): ``eb = e^{β}`` (entering state → row t), ``ek = e^{λ−β}`` (row s
  → the sub-chunk's end), ``elam = e^{λ}``. Diagonal block (see the section comment): ``fq = e^{β−μ}``,
  ``fk = e^{μ−β}`` with μ the middle of the row's half (|exponent| ≤ 3.5·20 = 70), and for the
  cross pairs (t in rows 8–15, s in rows 0–7) ``cq = e^{β−β_7}`` on rows 8–15 and ``ck = e^{β_7−β}``
  on rows 0–7 (0 elsewhere; exponents ≤ 0).
  """
  eb: jax.Array | None = None
  ek: jax.Array | None = None
  elam: jax.Array | None = None
  fq: jax.Array | None = None
  fk: jax.Array | None = None
  cq: jax.Array | None = None
  ck: jax.Array | None = None
  docs: _Docs | None = None

  def q(self, q):  # the rows' reading of the entering state
    q = q if self.eb is None else q * self.eb
    return q if self.docs is None else jnp.where(self.docs.reach, q, 0.0)

  def k(self, k):  # the rows' contribution to the leaving state
    k = k if self.ek is None else k * self.ek
    return k if self.docs is None else jnp.where(self.docs.tail, k, 0.0)

  def decay(self, state):  # a transposed state [*, d]
    state = state if self.elam is None else state * self.elam
    return state if self.docs is None else jnp.where(self.docs.keep, state, 0.0)

  def pairs(self, mask):
    """A [s, t] mask of the diagonal block, restricted to pairs in one document."""
    return mask if self.docs is None else mask & self.docs.same


def _clamp(g):
  # Decays below e^{-20} ≈ 2·10⁻⁹ per step count as e^{-20}: what they let through is below 2e-9 of
  # the state, and the bound keeps every factor of the diagonal blocks within e^{±70}.
  return jnp.maximum(g, MIN_LOG_DECAY)


def _sub(plan: _Plan, g, docs: _Docs | None = None) -> _Sub:
  if g is None:
    return _Sub(docs=docs)
  beta = _cumsum(plan, _clamp(g))
  lam = _rows_at(beta, _SUB - 1)
  low = _iota(beta.shape, 0) < _SUB // 2  # rows 0–7
  mid = jnp.where(low, 0.5 * _rows_at(beta, 3, 4), 0.5 * _rows_at(beta, 11, 12))  # μ of the row's half
  fq, fk = jnp.exp(beta - mid), jnp.exp(mid - beta)
  split = _rows_at(beta, _SUB // 2 - 1)  # β_7
  # e^{β} = e^{β−μ}·e^{μ} and e^{λ−β} = e^{μ−β}·e^{λ−μ}: factors ≤ e^{70} times row factors ≤ 1.
  return _Sub(eb=fq * jnp.exp(mid), ek=fk * jnp.exp(lam - mid), elam=jnp.exp(lam), fq=fq, fk=fk,
              cq=jnp.where(low, 0.0, jnp.exp(jnp.minimum(beta - split, 0.0))),
              ck=jnp.where(low, jnp.exp(jnp.minimum(split - beta, 0.0)), 0.0), docs=docs)


def _causal_t(n=_SUB):
  """[s, t] mask s ≤ t (a transposed causal mask)."""
  return _iota((n, n), 0) <= _iota((n, n), 1)


def _pair_masks():
  """[s, t] masks of the diagonal block: same half with s ≤ t; t in rows 8–15 with s in rows 0–7."""
  s, t = _iota((_SUB, _SUB), 0), _iota((_SUB, _SUB), 1)
  hs, ht = s >= _SUB // 2, t >= _SUB // 2
  return (hs == ht) & (s <= t), ht & jnp.logical_not(hs)


def _start(j):
  """First row of sub-chunk ``j`` (static, or traced with its alignment stated for Mosaic)."""
  return j * _SUB if isinstance(j, int) else pl.multiple_of(j * _SUB, _SUB)


def _sub_chunks(plan: _Plan, n: int, body, carry, *, reverse: bool = False):
  """``carry = body(j, carry)`` over the sub-chunks of a chunk (the last update is unused)."""
  order = range(n - 1, -1, -1) if reverse else range(n)
  if plan.cfg.unroll or n == 1:
    for j in order:
      carry = body(j, carry)
    return carry
  flip = (lambda i: n - 1 - i) if reverse else (lambda i: i)
  return jax.lax.fori_loop(0, n, lambda i, c: body(flip(i), c), carry)


def _diag_scores_t(plan: _Plan, sub: _Sub, q, k):
  """``AT[s, t] = A_ts = Σ_d q_td k_sd e^{β_td − β_sd}`` for s ≤ t in one sub-chunk and document (else 0)."""
  if sub.fq is None:
    return jnp.where(sub.pairs(_causal_t()), _dot(plan, k, q, 1, 1, exact=True), 0.0)
  same, cross = map(sub.pairs, _pair_masks())
  # Entries outside a mask may overflow to ±inf or NaN; `where` drops them (a select, not a product).
  within = _dot(plan, k * sub.fk, q * sub.fq, 1, 1, exact=True)
  across = _dot(plan, k * sub.ck, q * sub.cq, 1, 1, exact=True)
  return jnp.where(same, within, jnp.where(cross, across, 0.0))


def _dq_intra(plan: _Plan, sub: _Sub, mt, k):
  """``dq_t = Σ_{s≤t} MT[s, t] k_s e^{β_t − β_s}`` with ``MT[s, t] = v_s · dO_t`` (s in t's document)."""
  if sub.fq is None:
    return _dot(plan, jnp.where(sub.pairs(_causal_t()), mt, 0.0), k, 0, 0, exact=True)
  same, cross = map(sub.pairs, _pair_masks())  # masking MT first keeps the products finite
  return (sub.fq * _dot(plan, jnp.where(same, mt, 0.0), k * sub.fk, 0, 0, exact=True)
          + sub.cq * _dot(plan, jnp.where(cross, mt, 0.0), k * sub.ck, 0, 0, exact=True))


def _dk_intra(plan: _Plan, sub: _Sub, mt, q):
  """``dk_s = Σ_{t≥s} MT[s, t] q_t e^{β_t − β_s}`` (t in s's document)."""
  if sub.fq is None:
    return _dot(plan, jnp.where(sub.pairs(_causal_t()), mt, 0.0), q, 1, 0, exact=True)
  same, cross = map(sub.pairs, _pair_masks())
  return (sub.fk * _dot(plan, jnp.where(same, mt, 0.0), q * sub.fq, 1, 0, exact=True)
          + sub.ck * _dot(plan, jnp.where(cross, mt, 0.0), q * sub.cq, 1, 0, exact=True))


def _split(refs, plan: _Plan, n_before_g: int):
  """``(ℓ ref or None, the other refs)`` with None inserted for an absent log-decay ref, so kernels
  unpack one signature (ℓ comes first when the plan has documents)."""
  refs = list(refs)
  ell_ref = refs.pop(0) if plan.segmented else None
  if not plan.decay:
    refs.insert(n_before_g, None)
  return ell_ref, refs


def _load(ref, rows):
  return None if ref is None else _f32(ref[rows, :])


# --- kernel bodies (refs are 2-D tiles; shared by both layouts) --------------------------------------


def _states_step(plan: _Plan, state, x, g, y, reverse: bool, docs: _Docs | None = None):
  """One chunk of the sequential pass on a transposed state [d_y, d_x].

  forward (x = k, y = v):  Sᵀ ← Sᵀ e^{b_C} + vᵀ (k e^{b_C − b})
  reverse (x = q, y = dO): Eᵀ ← Eᵀ e^{b_C} + dOᵀ (q e^{b})
  With ``docs``: the carried term only if no document starts in the chunk; forward, only rows of the
  chunk's last document contribute; reverse, only rows of its first (those the entering state reaches).
  """
  rows = None if docs is None else (docs.reach if reverse else docs.tail)
  keep = (lambda a: a) if docs is None else (lambda a: jnp.where(docs.keep, a, 0.0))
  if g is None:
    return keep(state) + _dot(plan, y, x if rows is None else jnp.where(rows, x, 0.0), 0, 0)
  b = _cumsum(plan, _clamp(g))
  b_last = _rows_at(b, b.shape[0] - 1)
  weight = jnp.exp(b) if reverse else jnp.exp(b_last - b)
  if rows is not None:
    weight = jnp.where(rows, weight, 0.0)
  return keep(state * jnp.exp(b_last)) + _dot(plan, y, x * weight, 0, 0)


def _chunk_docs(plan: _Plan, ell_ref, rows):
  """The document masks of a whole chunk (ℓ counts from the chunk's first row: ℓ before it is 0)."""
  if ell_ref is None:
    return None
  return _docs(plan, _load(ell_ref, rows), jnp.zeros((1, 1), _F32), pairs=False)


def _states_kernel_triton(*refs, plan: _Plan, reverse: bool):
  # x, g: [time, bk]; y: [time, bv]; s0, final: [bv, bk]; states: [chunks, bv, bk]; ℓ: [time, 1]
  ell_ref, (x_ref, g_ref, y_ref, s0_ref, st_ref, sf_ref) = _split(refs, plan, 1)
  c, n_chunks = plan.cfg.chunk, plan.chunks

  def body(i, state):
    n = n_chunks - 1 - i if reverse else i
    rows = pl.ds(pl.multiple_of(n * c, c), c)
    st_ref[n] = state.astype(st_ref.dtype)  # the state entering chunk n (from its far side if reverse)
    return _states_step(plan, state, _load(x_ref, rows), _load(g_ref, rows), y_ref[rows, :], reverse,
                        _chunk_docs(plan, ell_ref, rows))

  sf_ref[...] = jax.lax.fori_loop(0, n_chunks, body, _f32(s0_ref[...]))


def _states_kernel_mosaic(*refs, plan: _Plan, reverse: bool):
  # One chunk per grid step along the (sequential) last axis; the final-state block stays resident.
  ell_ref, (x_ref, g_ref, y_ref, s0_ref, st_ref, sf_ref) = _split(refs, plan, 1)

  @pl.when(pl.program_id(2) == 0)
  def _():
    sf_ref[...] = _f32(s0_ref[...])

  state = sf_ref[...]
  st_ref[...] = state.astype(st_ref.dtype)
  rows = slice(None)
  sf_ref[...] = _states_step(plan, state, _load(x_ref, rows), _load(g_ref, rows), y_ref[...], reverse,
                             _chunk_docs(plan, ell_ref, rows))


def _sub_docs(plan: _Plan, ell_ref, j, *, pairs: bool = True):
  """The document masks of sub-chunk ``j`` (None without documents); ``pairs``: with ``same``."""
  if ell_ref is None:
    return None
  return _docs(plan, _load(ell_ref, pl.ds(_start(j), _SUB)), _ell_before(ell_ref, j), pairs=pairs)


def _output_kernel(*refs, plan: _Plan):
  # q, k, g: [chunk, d_k]; v, o: [chunk, bv]; st: Sᵀ entering the chunk [bv, d_k]; at: [chunk, 16];
  # ℓ: [chunk, 1]
  ell_ref, (q_ref, k_ref, g_ref, v_ref, st_ref, o_ref, at_ref) = _split(refs, plan, 2)

  def sub_chunk(j, state):
    start = _start(j)
    rows = pl.ds(start, _SUB)
    q, k, g, v = _load(q_ref, rows), _load(k_ref, rows), _load(g_ref, rows), v_ref[rows, :]
    sub = _sub(plan, g, _sub_docs(plan, ell_ref, j))
    at = _diag_scores_t(plan, sub, q, k)
    o = _dot(plan, sub.q(q), state, 1, 1) + _dot(plan, at, v, 0, 0, exact=True)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    at_ref[rows, :] = at
    return sub.decay(state) + _dot(plan, v, sub.k(k), 0, 0)

  _sub_chunks(plan, q_ref.shape[0] // _SUB, sub_chunk, _f32(st_ref[...]))


def _dqk_kernel(*refs, plan: _Plan):
  # q, k, g, dq, dk, dg: [chunk, bk]; v, do: [chunk, d_v]; st (Sᵀ entering), e (Eᵀ leaving): [d_v, bk];
  # ℓ: [chunk, 1]
  ell_ref, refs = _split(refs, plan, 2)
  q_ref, k_ref, g_ref, v_ref, do_ref, st_ref, e_ref, dq_ref, dk_ref = refs[:9]
  dg_ref = refs[9] if plan.decay else None
  n_sub = q_ref.shape[0] // _SUB

  def sub_chunk(j):  # each pass reloads its tiles rather than keep all sub-chunks' in registers
    rows = pl.ds(j * _SUB, _SUB)
    g = _load(g_ref, rows)
    return (rows, _load(q_ref, rows), _load(k_ref, rows), g, v_ref[rows, :], do_ref[rows, :],
            _sub(plan, g, _sub_docs(plan, ell_ref, j)))

  state = _f32(st_ref[...])
  q_dq, scores = [], []  # scores: MT_jj[s, t] = v_s · dO_t, kept for the reverse pass if reuse_scores
  for j in range(n_sub):  # forward: dq_t = S_t dO_t
    rows, q, k, g, v, do, sub = sub_chunk(j)
    mt = _dot(plan, v, do, 1, 1)
    if plan.cfg.dqk_reuse_scores:
      scores.append(mt)
    dq = sub.q(_dot(plan, do, state, 1, 0))
    dq = dq + _dq_intra(plan, sub, mt, k)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    q_dq.append(q * dq)
    state = sub.decay(state) + _dot(plan, v, sub.k(k), 0, 0)
  # `state` is now the chunk's last state S_end: the tail of d log α is Σ_v E ⊙ S_end.
  e = _f32(e_ref[...])
  carry = jnp.sum(e * state, axis=0, keepdims=True)
  for j in reversed(range(n_sub)):  # reverse: dk_t = D_t v_t and d log α
    rows, q, k, g, v, do, sub = sub_chunk(j)
    dk = sub.k(_dot(plan, v, e, 1, 0))
    dk = dk + _dk_intra(plan, sub, scores[j] if scores else _dot(plan, v, do, 1, 1), q)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    if dg_ref is not None:
      db = q_dq[j] - k * dk
      if sub.docs is None:
        total = jnp.sum(db, axis=0, keepdims=True)
        dg = total - _cumsum(plan, db) + db + carry  # Σ_{t ≥ r} within, plus the tail
        dg_ref[rows, :] = jnp.where(g >= MIN_LOG_DECAY, dg, 0.0)  # clamped decays have no gradient
        carry = carry + total
      else:
        # Σ_{t ≥ r} within r's document, plus the tail where r's document reaches the sub-chunk's
        # end; the previous sub-chunk's last row receives row 0's sum unless row 0 starts a document
        # (see "Documents" in the section comment).
        suffix = jnp.where(sub.pairs(_causal_t()), 1.0, 0.0)  # [r, t]: t ≥ r in r's document
        dg = _dot(plan, suffix, db, 1, 0, exact=True) + jnp.where(sub.docs.tail, carry, 0.0)
        dg_ref[rows, :] = jnp.where(g >= MIN_LOG_DECAY, dg, 0.0)
        carry = _rows_at(jnp.where(sub.docs.reach, dg, 0.0), 0)
    e = sub.decay(e) + _dot(plan, do, sub.q(q), 0, 0)


def _dv_kernel(*refs, plan: _Plan):
  # q, k, g: [chunk, d_k]; do, dv: [chunk, bv]; e (Eᵀ leaving the chunk): [bv, d_k]; the diagonal
  # score blocks: at [chunk, 16] (A_jjᵀ, the Triton output kernel's) or a [chunk, chunk] (the whole
  # masked A, gla_mgpu's); ℓ: [chunk, 1]
  ell_ref, (q_ref, k_ref, g_ref, do_ref, at_ref, e_ref, dv_ref) = _split(refs, plan, 2)

  def sub_chunk(j, e):
    rows = pl.ds(_start(j), _SUB)
    q, k, g, do = _load(q_ref, rows), _load(k_ref, rows), _load(g_ref, rows), do_ref[rows, :]
    sub = _sub(plan, g, _sub_docs(plan, ell_ref, j, pairs=False))  # (the stored scores are masked already)
    if plan.mgpu_out:  # A_jj [t, s]: contract t
      diag = _dot(plan, at_ref[rows, pl.ds(_start(j), _SUB)], do, 0, 0, exact=True)
    else:
      diag = _dot(plan, at_ref[rows, :], do, 1, 0, exact=True)
    dv = diag + _dot(plan, sub.k(k), e, 1, 1)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return sub.decay(e) + _dot(plan, do, sub.q(q), 0, 0)

  _sub_chunks(plan, q_ref.shape[0] // _SUB, sub_chunk, _f32(e_ref[...]), reverse=True)


# --- pallas_calls --------------------------------------------------------------------------------------
# Triton arrays: [batch, time, heads, dim]; states [batch, heads, chunks, d_v, d_k]. Programs are
# (block, chunk, batch·heads) with the dim block fastest, so programs sharing a chunk run together.
# Mosaic arrays: [batch, heads, time, dim]; grid (batch, heads, chunk).


def _bh(plan: _Plan, bh):
  return jax.lax.div(bh, jnp.int32(plan.heads)), jax.lax.rem(bh, jnp.int32(plan.heads))


def _rows_spec(plan: _Plan, rows: int, width: int, *, blocked: bool = False):
  """A chunk of rows of a [batch, time, heads, dim] (Triton) or [batch, heads, time, dim] (Mosaic)
  array for the per-chunk kernels; ``blocked``: the dim is tiled by the grid's block axis."""
  if plan.target == "triton":
    def index(a, n, bh):
      b, h = _bh(plan, bh)
      return b, n, h, (a if blocked else 0)
    return pl.BlockSpec((_SQ, rows, _SQ, width), index)
  return pl.BlockSpec((_SQ, _SQ, rows, width), lambda b, h, n: (b, h, n, 0))


def _ell_spec(plan: _Plan):
  """A chunk of rows of ℓ ``[batch, time, 1]`` (one per token, shared by the heads) for the per-chunk kernels."""
  c = plan.cfg.chunk
  if plan.target == "triton":
    return pl.BlockSpec((_SQ, c, 1), lambda a, n, bh: (_bh(plan, bh)[0], n, 0))
  return pl.BlockSpec((_SQ, c, 1), lambda b, h, n: (b, n, 0))


def _with_ell(plan: _Plan, ell, arrays, in_specs, spec=None):
  """ℓ first among a kernel's inputs when the plan has documents."""
  if not plan.segmented:
    return arrays, in_specs
  return [ell] + arrays, [spec or _ell_spec(plan)] + in_specs


def _state_spec(plan: _Plan, bv: int, bk: int, *, v_block=False, k_block=False):
  """Spec of one chunk's state in [batch, heads, chunks, d_v, d_k] for the per-chunk kernels."""
  if plan.target == "triton":
    def index(a, n, bh):
      b, h = _bh(plan, bh)
      return b, h, n, (a if v_block else 0), (a if k_block else 0)
    return pl.BlockSpec((_SQ, _SQ, _SQ, bv, bk), index)
  return pl.BlockSpec((_SQ, _SQ, _SQ, bv, bk), lambda b, h, n: (b, h, n, 0, 0))


def _grid(plan: _Plan, blocks: int, batch: int):
  if plan.target == "triton":
    return (blocks, plan.chunks, batch * plan.heads)
  return (batch, plan.heads, plan.chunks)


def _params(plan: _Plan, warps: int, parallel=True):
  if plan.interpret:
    return None
  if plan.target == "triton":
    return triton_params(warps, plan.cfg.stages)
  return mosaic_params(("parallel", "parallel", "parallel" if parallel else "arbitrary"))


def _states_call(plan: _Plan, x, g, y, s0, *, reverse: bool, ell=None):
  """Sequential pass: (states entering each chunk [b, h, n, d_y, d_x], final state f32 [b, h, d_y, d_x]);
  ``ell``: ℓ [b, time, 1] with documents."""
  batch = x.shape[0]
  dx, dy = x.shape[-1], y.shape[-1]
  n_chunks, c = plan.chunks, plan.cfg.chunk
  state_dtype = jnp.dtype(plan.dot_dtype)
  st_shape = jax.ShapeDtypeStruct((batch, plan.heads, n_chunks, dy, dx), state_dtype)
  sf_shape = jax.ShapeDtypeStruct((batch, plan.heads, dy, dx), _F32)
  arrays = [x] + ([g] if plan.decay else []) + [y, s0]
  if plan.target == "triton":
    bx, by = min(plan.cfg.states_block, dx), min(plan.cfg.states_block, dy)
    time = x.shape[1]

    def time_spec(width, pick):  # the whole time axis of one head: the kernel loops over chunks
      def index(ik, iv, bh):
        b, h = _bh(plan, bh)
        return b, 0, h, pick(ik, iv)
      return pl.BlockSpec((_SQ, time, _SQ, width), index)

    x_spec, y_spec = time_spec(bx, lambda ik, iv: ik), time_spec(by, lambda ik, iv: iv)

    def s_index(ik, iv, bh):
      b, h = _bh(plan, bh)
      return b, h, iv, ik

    def st_index(ik, iv, bh):
      b, h = _bh(plan, bh)
      return b, h, 0, iv, ik

    s_spec = pl.BlockSpec((_SQ, _SQ, by, bx), s_index)
    in_specs = [x_spec] + ([x_spec] if plan.decay else []) + [y_spec, s_spec]
    ell_spec = pl.BlockSpec((_SQ, time, 1), lambda ik, iv, bh: (_bh(plan, bh)[0], 0, 0))
    out_specs = [pl.BlockSpec((_SQ, _SQ, n_chunks, by, bx), st_index), s_spec]
    grid = (dx // bx, dy // by, batch * plan.heads)
    kernel = functools.partial(_states_kernel_triton, plan=plan, reverse=reverse)
    params = None if plan.interpret else triton_params(plan.cfg.states_warps, plan.cfg.states_stages)
  else:
    chunk = (lambda n: n_chunks - 1 - n) if reverse else (lambda n: n)
    row = lambda width: pl.BlockSpec((_SQ, _SQ, c, width), lambda b, h, n: (b, h, chunk(n), 0))
    s_spec = pl.BlockSpec((_SQ, _SQ, dy, dx), lambda b, h, n: (b, h, 0, 0))
    in_specs = [row(dx)] + ([row(dx)] if plan.decay else []) + [row(dy), s_spec]
    ell_spec = pl.BlockSpec((_SQ, c, 1), lambda b, h, n: (b, chunk(n), 0))
    out_specs = [pl.BlockSpec((_SQ, _SQ, _SQ, dy, dx), lambda b, h, n: (b, h, chunk(n), 0, 0)), s_spec]
    grid = (batch, plan.heads, n_chunks)
    kernel = functools.partial(_states_kernel_mosaic, plan=plan, reverse=reverse)
    params = _params(plan, 0, parallel=False)
  arrays, in_specs = _with_ell(plan, ell, arrays, in_specs, ell_spec)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=[st_shape, sf_shape], compiler_params=params, interpret=plan.interpret,
                        name="gla_states_bwd" if reverse else "gla_states")(*arrays)


def _output_call(plan: _Plan, q, k, g, v, states, ell=None):
  batch, c = q.shape[0], plan.cfg.chunk
  bv = min(plan.cfg.out_block, plan.dv) if plan.target == "triton" else plan.dv
  qk = _rows_spec(plan, c, plan.dk)
  vb = _rows_spec(plan, c, bv, blocked=True)
  at = _rows_spec(plan, c, _SUB)
  in_specs = [qk, qk] + ([qk] if plan.decay else []) + [vb, _state_spec(plan, bv, plan.dk, v_block=True)]
  time = plan.chunks * c
  shape = lambda width, dtype: jax.ShapeDtypeStruct(_layout(plan, batch, time, width), dtype)
  arrays = [q, k] + ([g] if plan.decay else []) + [v, states]
  arrays, in_specs = _with_ell(plan, ell, arrays, in_specs)
  return pl.pallas_call(
      functools.partial(_output_kernel, plan=plan), grid=_grid(plan, plan.dv // bv, batch),
      in_specs=in_specs, out_specs=[vb, at], out_shape=[shape(plan.dv, v.dtype), shape(_SUB, _F32)],
      compiler_params=_params(plan, plan.cfg.out_warps), interpret=plan.interpret, name="gla_output")(*arrays)


def _with_exact_dots(plan: _Plan, exact_dots: str | None) -> _Plan:
  """``plan`` with one kernel's own ``exact_dots`` (None: the shared one)."""
  if exact_dots is None or exact_dots == plan.cfg.exact_dots:
    return plan
  return dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, exact_dots=exact_dots))


def _dqk_call(plan: _Plan, q, k, g, v, do, states, e_states, ell=None):
  batch, c = q.shape[0], plan.cfg.chunk
  bk = min(plan.cfg.dqk_block, plan.dk) if plan.target == "triton" else plan.dk
  kb = _rows_spec(plan, c, bk, blocked=True)
  vf = _rows_spec(plan, c, plan.dv)
  st = _state_spec(plan, plan.dv, bk, k_block=True)
  in_specs = [kb, kb] + ([kb] if plan.decay else []) + [vf, vf, st, st]
  time = plan.chunks * c
  shape = lambda dtype: jax.ShapeDtypeStruct(_layout(plan, batch, time, plan.dk), dtype)
  out_shape = [shape(q.dtype), shape(k.dtype)] + ([shape(_F32)] if plan.decay else [])
  arrays = [q, k] + ([g] if plan.decay else []) + [v, do, states, e_states]
  arrays, in_specs = _with_ell(plan, ell, arrays, in_specs)
  out = pl.pallas_call(
      functools.partial(_dqk_kernel, plan=_with_exact_dots(plan, plan.cfg.dqk_exact_dots)),
      grid=_grid(plan, plan.dk // bk, batch),
      in_specs=in_specs, out_specs=[kb] * len(out_shape), out_shape=out_shape,
      compiler_params=_params(plan, plan.cfg.dqk_warps), interpret=plan.interpret, name="gla_dqk")(*arrays)
  return (out[0], out[1], out[2] if plan.decay else None)


def _dv_call(plan: _Plan, q, k, g, do, at, e_states, ell=None):
  batch, c = q.shape[0], plan.cfg.chunk
  bv = min(plan.cfg.dv_block, plan.dv) if plan.target == "triton" else plan.dv
  qk = _rows_spec(plan, c, plan.dk)
  vb = _rows_spec(plan, c, bv, blocked=True)
  in_specs = [qk, qk] + ([qk] if plan.decay else []) + [vb, _rows_spec(plan, c, c if plan.mgpu_out else _SUB),
                                                        _state_spec(plan, bv, plan.dk, v_block=True)]
  time = plan.chunks * c
  arrays = [q, k] + ([g] if plan.decay else []) + [do, at, e_states]
  arrays, in_specs = _with_ell(plan, ell, arrays, in_specs)
  return pl.pallas_call(
      functools.partial(_dv_kernel, plan=plan), grid=_grid(plan, plan.dv // bv, batch),
      in_specs=in_specs, out_specs=vb,
      out_shape=jax.ShapeDtypeStruct(_layout(plan, batch, time, plan.dv), do.dtype),
      compiler_params=_params(plan, plan.cfg.dv_warps), interpret=plan.interpret, name="gla_dv")(*arrays)


def _layout(plan: _Plan, batch: int, time: int, width: int):
  if plan.target == "triton":
    return (batch, time, plan.heads, width)
  return (batch, plan.heads, time, width)


# --- the differentiable core (padded, laid out) --------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas_core(q, k, v, g, s0, ell, plan: _Plan):
  return _pallas_core_fwd(q, k, v, g, s0, ell, plan)[0]


def _pallas_core_fwd(q, k, v, g, s0, ell, plan: _Plan):
  states, final = _states_call(plan, k, g, v, s0, reverse=False, ell=ell)
  if plan.mgpu_out:
    parts = gla_mgpu.decay_parts(g, MIN_LOG_DECAY)
    o, at = gla_mgpu.output(q, k, v, parts, states, min_log_decay=MIN_LOG_DECAY, ell=ell)
  else:
    o, at = _output_call(plan, q, k, g, v, states, ell)
  return (o, final), (q, k, v, g, states, at, ell)


def _pallas_core_bwd(plan: _Plan, residuals, cotangents):
  q, k, v, g, states, at, ell = residuals
  do, d_final = cotangents
  do = do.astype(v.dtype)
  e_states, ds0 = _states_call(plan, q, g, do, d_final.astype(_F32), reverse=True, ell=ell)
  dq, dk, dg = _dqk_call(plan, q, k, g, v, do, states, e_states, ell)
  dv = _dv_call(plan, q, k, g, do, at, e_states, ell)
  if g is not None and ell is not None:  # a start's own decay multiplies only the state it discards
    dg = jnp.where(_row_starts(plan, ell), jnp.zeros((), dg.dtype), dg)
  return dq, dk, dv, (None if g is None else dg.astype(g.dtype)), ds0, None  # ℓ: no gradient


def _row_starts(plan: _Plan, ell):
  """bool, broadcastable to the kernels' ``[…, time, …, d_k]`` layout: the rows where a document starts
  (ℓ, counted from each chunk's first row, steps up there)."""
  batch, time, _ = ell.shape
  counts = ell.reshape(batch, time // plan.cfg.chunk, plan.cfg.chunk)
  before = jnp.pad(counts, ((0, 0), (0, 0), (1, 0)))[:, :, :-1]
  starts = (counts - before > 0.5).reshape(batch, time)
  return starts[:, :, None, None] if plan.target == "triton" else starts[:, None, :, None]


_pallas_core.defvjp(_pallas_core_fwd, _pallas_core_bwd)
_pallas_core_shared = lowered_once(_pallas_core, static_argnums=(6,))


_next_pow2 = next_pow2


_round_up = round_up


def _output_stage(q, v, g, cfg: PallasConfig, *, interpret: bool) -> tuple[str, str | None]:
  """``(stage, why not Mosaic GPU)``: the GPU output stage for the padded Triton-layout problem,
  ``cfg.out_kernel``, or for None "mosaic_gpu" where it runs (a Hopper GPU, ``gla_mgpu.supports``;
  documents or not), else "triton"; and why it is not "mosaic_gpu" (None when it is)."""
  problem, hopper = gla_mgpu.supports(q, v, g, cfg.chunk), tma_gpu()
  stage = mosaic_gpu_or_triton(cfg.out_kernel, problem, interpret=interpret, hopper=hopper,
                               field="gla: PallasConfig.out_kernel")
  if stage == "mosaic_gpu":
    return stage, None
  if cfg.out_kernel == "triton":
    return stage, "PallasConfig.out_kernel='triton'"
  if interpret:
    return stage, "does not interpret (Mosaic GPU's interpreter has no wgmma)"
  return stage, problem or "needs a Hopper GPU (TMA and wgmma)"


def _chunk_start_counts(starts, chunk: int, padded: int):
  """ℓ ``f32 [batch, padded, 1]``: the document starts (``starts: bool [batch, time]``) from each
  chunk's first row up to each row; padded rows start none."""
  batch, time = starts.shape
  counts = jnp.pad(starts, ((0, 0), (0, padded - time))).reshape(batch, padded // chunk, chunk)
  return jnp.cumsum(counts.astype(_F32), axis=2).reshape(batch, padded, 1)


def _gla_pallas_target(q, k, v, log_decay, initial_state, segment_ids=None, *, target: str, interpret: bool,
                       cfg: PallasConfig):
  batch, time, heads, d_k = q.shape
  d_v, out_dtype = v.shape[-1], v.dtype
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  dot_dtype = jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(_F32)
  if cfg.chunk % _SUB or (target == "triton" and cfg.chunk != _next_pow2(cfg.chunk)):
    raise ValueError(f"gla: PallasConfig.chunk={cfg.chunk} must be a multiple of {_SUB} (a power of two on GPU)")
  for field in ("exact_dots", "dqk_exact_dots"):
    if getattr(cfg, field) not in EXACT_DOTS + ((None,) if field.startswith("dqk") else ()):
      raise ValueError(f"gla: PallasConfig.{field}={getattr(cfg, field)!r}; valid: {EXACT_DOTS}")
  if cfg.out_kernel not in OUT_KERNELS:
    raise ValueError(f"gla: PallasConfig.out_kernel={cfg.out_kernel!r}; valid: {OUT_KERNELS}")
  # Short sequences shrink the chunk (a power of two ≥ 16) rather than pad to a long one.
  chunk = min(cfg.chunk, max(_SUB, _next_pow2(time)))
  cfg = dataclasses.replace(cfg, chunk=chunk)
  padded = _round_up(time, chunk)
  if target == "triton":  # Triton tiles: powers of two ≥ 16; zero dims change nothing
    dk, dv = max(_SUB, _next_pow2(d_k)), max(_SUB, _next_pow2(d_v))
  else:
    dk, dv = d_k, d_v
  g = None if log_decay is None else log_decay
  if g is not None and g.ndim == 3:  # one decay per head, broadcast over the key dims
    g = jnp.broadcast_to(g.astype(_F32)[..., None], q.shape)
  ell = None
  if segment_ids is not None:
    ell = _chunk_start_counts(_document_starts(segment_ids), chunk, padded)
  pad = lambda x, width: jnp.pad(x, ((0, 0), (0, padded - time), (0, 0), (0, width - x.shape[-1])))
  q, k = pad(q.astype(dtype), dk), pad(k.astype(dtype), dk)
  v = pad(v.astype(dtype), dv)
  g = None if g is None else pad(g, dk)
  s0 = (jnp.zeros((batch, heads, d_k, d_v), _F32) if initial_state is None
        else initial_state.astype(_F32))
  s0 = jnp.pad(jnp.swapaxes(s0, -1, -2), ((0, 0), (0, 0), (0, dv - d_v), (0, dk - d_k)))  # Sᵀ
  if target == "mosaic":
    q, k, v = (rearrange(x, "b t h d -> b h t d") for x in (q, k, v))
    g = None if g is None else rearrange(g, "b t h d -> b h t d")
  mgpu_out = target == "triton" and _output_stage(q, v, g, cfg, interpret=interpret)[0] == "mosaic_gpu"
  plan = _Plan(target=target, interpret=interpret, cfg=cfg, heads=heads, chunks=padded // chunk, dk=dk,
               dv=dv, decay=g is not None, dot_dtype=dot_dtype.name, mgpu_out=mgpu_out, segmented=ell is not None)
  o, final = _pallas_core_shared(q, k, v, g, s0, ell, plan)
  if target == "mosaic":
    o = rearrange(o, "b h t d -> b t h d")
  return o[:, :time, :, :d_v].astype(out_dtype), jnp.swapaxes(final, -1, -2)[:, :, :d_k, :d_v]


def gla_pallas(q, k, v, log_decay=None, initial_state=None, *, segment_ids=None, interpret: bool = False,
               target: PallasTarget | None = None, config: PallasConfig | None = None):
  """The Pallas path of :func:`gla` without an input gate (same arguments and results).

  ``target`` picks the kernel layout; ``None`` decides at lowering time (Mosaic when lowered for TPU,
  Triton otherwise), so ``jax.export(..., platforms=["tpu"])`` from any host gets the TPU kernels.
  ``interpret=True`` runs either layout in the Pallas interpreter (there ``None`` means Triton).
  With ``segment_ids`` every kernel applies the document masks, the Mosaic GPU output stage's too.
  """
  _check(q, k, v, log_decay, initial_state, segment_ids=segment_ids)
  cfg = config or PallasConfig()
  target = pallas_layout(target, "gla")
  run = lambda t: functools.partial(_gla_pallas_target, target=t, interpret=interpret, cfg=cfg)
  if target is not None or interpret:
    return run(target or "triton")(q, k, v, log_decay, initial_state, segment_ids)
  return jax.lax.platform_dependent(q, k, v, log_decay, initial_state, segment_ids, tpu=run("mosaic"),
                                    default=run("triton"))
