"""Sliding-window flash attention as Pallas kernels (``impl="pallas"``; Dao 2023,
"FlashAttention-2"): the Triton (GPU) and Mosaic TPU lowerings, the ``custom_vjp`` core both share
(and that the Mosaic GPU kernels of ``kernels/window_attention/mosaic_gpu.py`` plug into on Hopper),
and :func:`flash_window_attention`, which pads and lays out a call for its lowering. The algorithm is
described in ``kernels/window_attention/__init__.py``; measured tilings in ``kernels/BENCHMARKS.md``.

An optional decay bias (``flash_window_attention(..., decay_bias=c)``: each logit gets ``c_i − c_j``,
forgetting attention's cumulative log forget gate, ``kernels/forgetting_attention``) enters the Triton
and Mosaic TPU kernels as two float32 parts ``c = hi + lo`` (so a long ``c`` keeps its differences
exact), and their backward then also returns ``dc``; without it (``_Flash.bias`` False) the kernels
are traced exactly as before. The Mosaic GPU kernels take no bias.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental import pallas as pl

from kernels import documents
from kernels.dispatch import mosaic_gpu_or_triton, pallas_layout, tma_gpu
from kernels.pallas_compat import lowered_once, mosaic_params, triton_params
from kernels.tiling import next_pow2, round_up
from kernels.window_attention import mosaic_gpu as window_attention_mgpu
from kernels.window_attention.band import (_band, _band_loops, _div, _document_key_blocks, _document_query_blocks, _i32,
                                           _key_blocks, _query_blocks)
from kernels.window_attention.reference import _check

PallasTarget = Literal["triton", "mosaic_tpu", "mosaic"]
# Why a call with a decay bias (forgetting attention) runs the Triton kernels on Hopper too.
NO_DECAY_BIAS = "takes no decay bias (the Hopper Mosaic GPU window kernels have no bias input)"
_MASKED = -1e30  # finite so a fully masked padded row gives zeros, not NaN
_LOG2E = math.log2(math.e)


# ------------------------------------------------------------------------------------------------
# Pallas flash attention (impl="pallas")


@dataclasses.dataclass(frozen=True)
class PallasBlocks:
  """Tile sizes and Triton launch parameters; the Mosaic (TPU) path uses ``block`` only.

  ``fwd_q`` query rows per program × ``fwd_k`` keys per loop step (forward); ``dkv_k`` key rows per
  program × ``dkv_q`` queries per step (dK/dV kernel); ``dq_q`` × ``dq_k`` (dQ kernel). Triton needs
  powers of two ≥ 16 (they shrink to the padded length for short sequences). The defaults were
  tuned on an H100 for bf16, head_dim 128 (``kernels/bench_window_attention.py``); wider rows
  (f32, head_dim > 128) get tiles halved per doubling, to fit shared memory.
  """
  fwd_q: int = 128
  fwd_k: int = 128
  fwd_warps: int = 8
  fwd_stages: int = 3
  dkv_q: int = 64
  dkv_k: int = 128
  dkv_warps: int = 8
  dkv_stages: int = 3
  dq_q: int = 128
  dq_k: int = 64
  dq_warps: int = 8
  dq_stages: int = 3
  split_mask: bool = True  # Triton: unmasked interior blocks in their own loop (no iota/select there)
  block: int = 128  # Mosaic: query block = key block; a multiple of 128 keeps the score tile lane-dense
  # GPU forward: "triton", or "mosaic_gpu" (kernels/window_attention_mgpu.py: TMA and wgmma, Hopper;
  # bf16/f16, head_dim 64 or 128, no soft-cap) with ``mgpu_kv`` keys per step, ``mgpu_stages`` in
  # flight, and ``mgpu_pingpong`` (its two compute warpgroups take turns on the tensor cores). None:
  # Mosaic GPU where it runs (a GPU with TMA, not interpreting), else Triton. H100, B4 T8192 H16 D128
  # W1024 bf16, fwd ms: Triton 0.798–0.820, Mosaic GPU 0.598–0.606, with ping-pong 0.580–0.588,
  # cuDNN 0.580–0.602 in the same processes (kernels/BENCHMARKS.md); persistent,
  # with the fence below, 0.533–0.561 against cuDNN's 0.586–0.596.
  fwd_kernel: str | None = None
  mgpu_kv: int = 128
  mgpu_stages: int = 2
  mgpu_pingpong: bool = True
  # GPU backward: "triton", or "mosaic_gpu" (dK/dV and dQ kernels on wgmma; same conditions and the
  # same default choice) with ``mgpu_bwd_q`` queries per dK/dV step, ``mgpu_bwd_kv`` keys per dQ step,
  # ``mgpu_bwd_stages`` slots (dQ: as many as fit, ≥ 2).
  bwd_kernel: str | None = None
  # H100, B4 T8192 H16 D128 W1024, fwd+bwd ms with the ping-pong forward (runs vary by ~±0.03):
  # kv 64 · 2 slots 2.685; 128 · 2 2.634, 2.696; 64 · 3 2.637, 2.638 (default); 128 · 3 2.671; q 128: 3.172.
  mgpu_bwd_q: int = 64
  mgpu_bwd_kv: int = 64
  mgpu_bwd_stages: int = 3
  # ``mgpu_own_band``: each compute warpgroup runs only its own 64 rows' band (with 64-row blocks it
  # skips one of the CTA's blocks, and fewer of its blocks need a mask); ``mgpu_softmax_fence``: the
  # forward fences its softmax before handing over the tensor cores; ``mgpu_persistent`` /
  # ``mgpu_bwd_persistent``: one CTA per SM loops over the tiles (window_attention_mgpu.forward /
  # backward). H100, B4 T8192 W1024, ms (cuDNN 0.584–0.591 / 2.647–2.666 beside them):
  # fence fwd 0.597 → 0.580; own band fwd+bwd 2.619 → 2.423; persistent fwd 0.587 → 0.533–0.544, but
  # bwd (fwd+bwd − fwd) 1.823 → 1.890 (3 slots) or 1.808 (2 slots): the backward stays one CTA per tile.
  mgpu_own_band: bool = True
  mgpu_softmax_fence: bool = True
  mgpu_persistent: bool = True
  mgpu_bwd_persistent: bool = False
  # ``mgpu_skip_outside_documents`` (packed documents, issue 23): the Mosaic GPU kernels visit, and
  # their memory warpgroups stream, only the blocks that meet their tile's documents (as Triton does:
  # keys from the tile's first document start, queries up to its keys' last document end), and mask
  # only the blocks a boundary or the band's edge cuts. False streams the whole band and masks every
  # block (the first version; kept as the benchmark's comparison). H100, B4 T8192 H16 d128 W1024, 4
  # documents a row: 0.655 / 2.654 ms → 0.568 / 2.160 ms fwd / fwd+bwd (kernels/BENCHMARKS.md). No
  # effect without segment ids.
  mgpu_skip_outside_documents: bool = True


@dataclasses.dataclass(frozen=True)
class _Flash:
  """Static configuration of one flash-attention call (hashable: a ``custom_vjp`` nondiff argument)."""
  window: int  # already clipped to the padded length (global causal: the padded length)
  softcap: float | None
  scale: float
  target: str
  blocks: PallasBlocks
  interpret: bool
  documents: bool = False  # packed documents: the kernels take doc_start / doc_end (document_bounds)
  bias: bool = False  # a decay bias: the logit of query i, key j gets c_i − c_j (the kernels take c's two parts)




def _mosaic_params(grid_rank: int):
  # Every grid axis is independent except the last, which accumulates (the band / the query sweep).
  return mosaic_params(("parallel",) * (grid_rank - 1) + ("arbitrary",))


def _dot(a, b, contract):
  # f32 operands get full-precision products (Triton's default for f32 is TF32, ~1e-3 relative).
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _mm(a, b):  # a @ b
  return _dot(a, b, ((1,), (0,)))


def _mm_nt(a, b):  # a @ bᵀ
  return _dot(a, b, ((1,), (1,)))


def _logits(a, b, cfg: _Flash, unit: float):
  """Logits of ``a @ bᵀ`` (scaled, soft-capped) in units of ``1/unit`` (log₂e for an exp2 softmax),
  as ``(raw, c, t)`` with logits = ``raw · c``: the kernels fold ``c`` into the exponent's argument
  (one FMA per score, ``exp2(raw·c − m)``). ``t`` is the soft-cap's tanh (None without one), whose
  ``1 − t²`` is the derivative the backward needs.
  """
  x = _mm_nt(a, b)
  if cfg.softcap is None:
    return x, cfg.scale * unit, None
  t = jnp.tanh(x * (cfg.scale / cfg.softcap))
  return t, cfg.softcap * unit, t


# --- the decay bias (forgetting attention) ---------------------------------------------------------
# ``c`` per (position, head) as two f32 parts, ``hi`` and ``lo`` (each ``[batch, heads, time]`` as lse;
# the core takes them stacked, ``[batch, 2, heads, time]``): the logit of query i and key j gets
# ``c_i − c_j`` (FoX: c the cumulative log forget gate, so the bias is ≤ 0 for every pair the band
# reads; pairs a mask drops are set to −inf before any exp, so a large ``c_i − c_j`` of a future key
# or another document never reaches one). Why two parts: ``|c|`` grows along a document, and one f32
# per position would lose ``|c|·2⁻²⁴`` of every bias; ``(hi_i − hi_j) + (lo_i − lo_j)`` loses only
# ``|c_i − c_j|·2⁻²⁴`` (a difference rounds at its own size; ``hi_i − hi_j`` of two nearby ``c`` of one
# sign, a band's pairs, is even exact, Sterbenz). For the same reason Triton scales the difference,
# not c, by log₂e (a base-2 ``hi`` would round at ``|c|·2⁻²⁴`` again). The gradient needs nothing
# new: ``ds`` is the logit's gradient, so ``dc_i = Σ_j ds_ij`` (a row sum in the dQ kernel)
# ``− Σ_l ds_li`` (a column sum, in the dK/dV kernel, per query head), the same for both parts.


def _plus_bias(s, c, query_bias, key_bias, unit: float):
  """The logits ``s · c`` (as :func:`_logits` gives them, in units of ``1/unit``) plus ``c_i − c_j``:
  ``query_bias`` and ``key_bias`` are ``(hi, lo)`` pairs already shaped to broadcast over the tile.
  Returns ``(logits, 1.0)``: the kernels go on with ``s · c``."""
  (query_hi, query_lo), (key_hi, key_lo) = query_bias, key_bias
  bias = (query_hi - key_hi) + (query_lo - key_lo)
  return s * c + (bias if unit == 1.0 else bias * unit), 1.0


# --- packed documents (segment_ids) ---------------------------------------------------------------
# A document starts at t = 0 and wherever the id changes. Query t reads key s only inside its own
# document: with causality that is ``s ≥ doc_start[t]``, or equivalently ``t < doc_end[s]`` (the
# start of the next document). The wrapper computes both as int32 ``[batch, time]`` vectors. Triton
# reads the resident side's: a query-block kernel (forward, dQ) its queries' starts, the key-block
# kernel (dK/dV) its keys' ends. Both are monotone in t, so the block's extremes narrow its loop: key
# blocks wholly before the first start (query blocks wholly past the last end) are not visited, and
# only blocks a boundary cuts are masked. Mosaic TPU reads the streamed side's, as a lane-dense row
# (``[batch, 8, time]``, like the backward's lse and Δ: the key block's ends in the forward and dQ,
# the query block's starts in dK/dV), and visits the band as without documents. The Mosaic GPU kernels
# read the resident side's, as Triton, and narrow their loops the same way (``band``'s
# ``_document_key_blocks`` / ``_document_query_blocks``) with ``PallasBlocks.mgpu_skip_outside_documents``.


def document_bounds(segment_ids, padded: int):
  """``segment_ids: int [batch, time]`` → ``(doc_start, doc_end)``, int32 ``[batch, padded]``: the
  first position of each position's document and the first position after it. The zero padding
  (positions ``time … padded − 1``) is one more document, so a padded query reads only padded keys
  (never an empty row) and no real query reads a padded key."""
  batch, time = segment_ids.shape
  t = jnp.arange(padded, dtype=jnp.int32)
  padding = (jnp.arange(time, padded) == time)[None].repeat(batch, axis=0)  # one document, starting at time
  is_start = jnp.concatenate([documents.starts(segment_ids, first=True), padding], axis=1)
  doc_start = jax.lax.cummax(jnp.where(is_start, t, 0), axis=1)
  next_start = jnp.concatenate([jnp.where(is_start, t, padded)[:, 1:], jnp.full((batch, 1), padded, jnp.int32)], axis=1)
  doc_end = jax.lax.cummin(next_start, axis=1, reverse=True)
  return doc_start, doc_end


def _allowed(shape, q_start, k_start, cfg, bound, *, keys_first: bool = False):
  """A Triton tile's mask: the band, cut at document boundaries when ``cfg.documents`` (``bound``: the
  rows' ``doc_start``, or with ``keys_first`` their ``doc_end``; :func:`_in_document`)."""
  allowed = _band(shape, q_start, k_start, cfg.window, keys_first=keys_first)
  if cfg.documents:
    allowed &= _in_document(shape, q_start if keys_first else k_start, bound, keys_first=keys_first)
  return allowed


def _in_document(shape, cols, bound, *, keys_first: bool):
  """Which (row, col) pairs of a tile lie in one document (the band's causality assumed); ``cols``:
  the first column's position. Queries on rows: ``bound`` is the rows' ``doc_start`` (``[rows]``),
  and key ``cols + j ≥ doc_start``; keys on rows (``keys_first``): ``bound`` is the rows'
  ``doc_end``, and query ``cols + j < doc_end``."""
  col = cols + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return col < bound[:, None] if keys_first else col >= bound[:, None]


def _query_key_blocks(q_start, starts, cfg, bq: int, bk: int):
  """The key blocks a query-block kernel visits: the band's, narrowed to its rows' documents
  (``starts``: their ``doc_start``, None without documents)."""
  bounds = _key_blocks(q_start, bq, bk, cfg.window)
  if starts is None:
    return bounds
  return _document_key_blocks(bounds, jnp.min(starts), jnp.max(starts), bk)


# --- Triton (GPU): one program per query (or key) block, looping over the band --------------------
# Layout [batch, time, heads, head_dim]; the key/value block is the whole (padded) sequence of one
# kv head, i.e. a base pointer, and the loop loads the band's tiles from it.

def _triton_fwd_kernel(*refs, cfg: _Flash, bq: int, bk: int):
  # refs: q, k, v, [doc_start (cfg.documents)], [c's hi, lo: the head's whole row (cfg.bias)], o, lse
  (q_ref, k_ref, v_ref), (o_ref, lse_ref) = refs[:3], refs[-2:]
  q_start = pl.program_id(0) * bq
  q = q_ref[...]
  starts = refs[3][...] if cfg.documents else None
  bias_refs = refs[3 + cfg.documents:5 + cfg.documents] if cfg.bias else ()
  q_bias = tuple(r[pl.ds(q_start, bq)][:, None] for r in bias_refs)

  def step(j, carry, masked):
    acc, m, l = carry
    k_start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(k_start, bk), :], v_ref[pl.ds(k_start, bk), :]
    s, c, _ = _logits(q, k, cfg, _LOG2E)
    if cfg.bias:
      s, c = _plus_bias(s, c, q_bias, tuple(r[pl.ds(k_start, bk)][None, :] for r in bias_refs), _LOG2E)
    if masked:
      s = jnp.where(_allowed(s.shape, q_start, k_start, cfg, starts), s, -jnp.inf)
    # m starts finite, so a row with no allowed key in this tile keeps alpha = 1 and p = 0.
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * c)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * c - m_new[:, None])
    return alpha[:, None] * acc + _mm(p.astype(v.dtype), v), m_new, alpha * l + jnp.sum(p, axis=1)

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), _MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = _band_loops(_query_key_blocks(q_start, starts, cfg, bq, bk), step, carry, cfg.blocks.split_mask)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # base-2 log-sum-exp of the scaled logits


def _triton_dkv_kernel(*refs, cfg: _Flash, bq: int, bk: int, group: int, n_q_blocks: int):
  # Transposed tiles ([keys, queries]) so the per-query lse and Δ broadcast along rows and dK, dV
  # are plain products (pᵀ·dO, dsᵀ·Q) with no transposes of the tile.
  # refs: q, k, v, do, lse, Δ, [doc_end (cfg.documents)], [c's hi, lo of the group's heads (cfg.bias)],
  # dk, dv, [dc: the group's heads' −Σ_queries ds for these keys (cfg.bias)]
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref) = refs[:6]
  (dk_ref, dv_ref), dc_ref = (refs[-3:-1], refs[-1]) if cfg.bias else (refs[-2:], None)
  bias_refs = refs[6 + cfg.documents:8 + cfg.documents] if cfg.bias else ()
  k_start = pl.program_id(0) * bk
  k, v = k_ref[...], v_ref[...]
  bounds = _query_blocks(k_start, bq, bk, cfg.window, n_q_blocks)
  ends = refs[6][...] if cfg.documents else None
  if cfg.documents:
    bounds = _document_query_blocks(bounds, jnp.min(ends), jnp.max(ends), bq)

  def step(i, carry, masked, head):
    dk, dv = carry[:2]
    q_start = pl.multiple_of(i * bq, bq)
    rows = pl.ds(q_start, bq)
    q, do = q_ref[rows, head, :], do_ref[rows, head, :]
    lse, delta = lse_ref[head, rows], delta_ref[head, rows]
    s, c, t = _logits(k, q, cfg, _LOG2E)
    if cfg.bias:
      s, c = _plus_bias(s, c, tuple(r[head, rows][None, :] for r in bias_refs),
                        tuple(r[head, pl.ds(k_start, bk)][:, None] for r in bias_refs), _LOG2E)
    if masked:
      s = jnp.where(_allowed(s.shape, q_start, k_start, cfg, ends, keys_first=True), s, -jnp.inf)
    p = jnp.exp2(s * c - lse[None, :])
    dv = dv + _mm(p.astype(do.dtype), do)
    ds = p * (_mm_nt(v, do) - delta[None, :])
    if t is not None:
      ds = ds * (1.0 - t * t)
    if cfg.bias:
      return dk + _mm(ds.astype(q.dtype), q), dv, carry[2] + jnp.sum(ds, axis=1)
    return dk + _mm(ds.astype(q.dtype), q), dv

  def one_head(head, carry):
    if not cfg.bias:
      return _band_loops(bounds, functools.partial(step, head=head), carry, cfg.blocks.split_mask)
    # c is per query head: each head's column sums are written out, not summed over the group.
    *carry, dc = _band_loops(bounds, functools.partial(step, head=head), (*carry, jnp.zeros((bk,), jnp.float32)),
                             cfg.blocks.split_mask)
    dc_ref[head, :] = -dc
    return tuple(carry)

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  # The group's query heads all read this kv head: summing them here avoids a [.., heads, ..] dK.
  dk, dv = one_head(0, carry) if group == 1 else jax.lax.fori_loop(0, group, one_head, carry)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _triton_dq_kernel(*refs, cfg: _Flash, bq: int, bk: int):
  # Runs before the dK/dV kernel and also produces Δ = rowsum(o ⊙ dO) for it: this program reads
  # its rows of dO anyway, which saves a separate pass over o and dO.
  # refs: q, k, v, o, do, lse, [doc_start (cfg.documents)], [c's hi, lo: the head's whole row (cfg.bias)],
  # dq, Δ, [dc: Σ_keys ds of these rows (cfg.bias)]
  (q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref) = refs[:6]
  (dq_ref, delta_ref), dc_ref = (refs[-3:-1], refs[-1]) if cfg.bias else (refs[-2:], None)
  q_start = pl.program_id(0) * bq
  q, do, lse = q_ref[...], do_ref[...], lse_ref[...]
  starts = refs[6][...] if cfg.documents else None
  bias_refs = refs[6 + cfg.documents:8 + cfg.documents] if cfg.bias else ()
  q_bias = tuple(r[pl.ds(q_start, bq)][:, None] for r in bias_refs)
  delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
  delta_ref[...] = delta

  def step(j, carry, masked):
    k_start = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(k_start, bk), :], v_ref[pl.ds(k_start, bk), :]
    s, c, t = _logits(q, k, cfg, _LOG2E)
    if cfg.bias:
      s, c = _plus_bias(s, c, q_bias, tuple(r[pl.ds(k_start, bk)][None, :] for r in bias_refs), _LOG2E)
    if masked:
      s = jnp.where(_allowed(s.shape, q_start, k_start, cfg, starts), s, -jnp.inf)
    p = jnp.exp2(s * c - lse[:, None])
    ds = p * (_mm_nt(do, v) - delta[:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    if cfg.bias:
      dq, dc = carry
      return dq + _mm(ds.astype(k.dtype), k), dc + jnp.sum(ds, axis=1)
    return carry + _mm(ds.astype(k.dtype), k)

  carry = jnp.zeros(q.shape, jnp.float32)
  if cfg.bias:
    carry = (carry, jnp.zeros((bq,), jnp.float32))
  dq = _band_loops(_query_key_blocks(q_start, starts, cfg, bq, bk), step, carry, cfg.blocks.split_mask)
  if cfg.bias:
    dq, dc = dq
    dc_ref[...] = dc
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _triton_bias(bias, cfg: _Flash):
  """The specs and operands of c's two parts (``bias``: ``[batch, 2, heads, time]``) for a Triton
  kernel over grid (block, batch, head): the head's whole row, as the keys are. Empty without a bias."""
  if not cfg.bias:
    return [], []
  return [pl.BlockSpec((None, None, bias.shape[-1]), lambda i, n, h: (n, h, 0))] * 2, [bias[:, 0], bias[:, 1]]


def _triton_forward(q, k, v, doc_start, bias, cfg: _Flash):
  batch, time, heads, dim = q.shape
  group = heads // k.shape[2]
  b = cfg.blocks
  bq, bk = b.fwd_q, b.fwd_k
  q_spec = pl.BlockSpec((None, bq, None, dim), lambda i, n, h: (n, i, h, 0))
  kv_spec = pl.BlockSpec((None, time, None, dim), lambda i, n, h: (n, 0, _div(h, group), 0))
  documents = [pl.BlockSpec((None, bq), lambda i, n, h: (n, i))] if cfg.documents else []
  bias_spec, bias = _triton_bias(bias, cfg)
  return pl.pallas_call(
      functools.partial(_triton_fwd_kernel, cfg=cfg, bq=bq, bk=bk),
      grid=(time // bq, batch, heads),  # query blocks fastest: neighbours share their keys in L2
      in_specs=[q_spec, kv_spec, kv_spec, *documents, *bias_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, time), jnp.float32)],
      compiler_params=triton_params(b.fwd_warps, b.fwd_stages),
      interpret=cfg.interpret, name="window_attention_fwd",
  )(q, k, v, *([doc_start] if cfg.documents else []), *bias)


def _triton_backward(q, k, v, o, lse, do, doc_start, doc_end, bias, cfg: _Flash):
  batch, time, heads, dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  b = cfg.blocks
  bias_spec, bias = _triton_bias(bias, cfg)

  bq, bk = b.dq_q, b.dq_k
  q_block = pl.BlockSpec((None, bq, None, dim), lambda i, n, h: (n, i, h, 0))
  stat_block = pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i))
  kv_seq = pl.BlockSpec((None, time, None, dim), lambda i, n, h: (n, 0, _div(h, group), 0))
  documents = [pl.BlockSpec((None, bq), lambda i, n, h: (n, i))] if cfg.documents else []
  stat_shape = jax.ShapeDtypeStruct(lse.shape, jnp.float32)
  dq, delta, *dc_rows = pl.pallas_call(
      functools.partial(_triton_dq_kernel, cfg=cfg, bq=bq, bk=bk),
      grid=(time // bq, batch, heads),
      in_specs=[q_block, kv_seq, kv_seq, q_block, q_block, stat_block, *documents, *bias_spec],
      out_specs=[q_block, stat_block, *([stat_block] if cfg.bias else [])],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape, *([stat_shape] if cfg.bias else [])],
      compiler_params=triton_params(b.dq_warps, b.dq_stages),
      interpret=cfg.interpret, name="window_attention_dq",
  )(q, k, v, o, do, lse, *([doc_start] if cfg.documents else []), *bias)

  bq, bk = b.dkv_q, b.dkv_k
  group_seq = pl.BlockSpec((None, time, group, dim), lambda j, n, h: (n, 0, h, 0))
  group_stat = pl.BlockSpec((None, group, time), lambda j, n, h: (n, h, 0))
  kv_block = pl.BlockSpec((None, bk, None, dim), lambda j, n, h: (n, j, h, 0))
  documents = [pl.BlockSpec((None, bk), lambda j, n, h: (n, j))] if cfg.documents else []
  # c of the group's query heads (both parts), and their column sums of ds for this key block.
  bias_spec = [group_stat] * 2 if cfg.bias else []
  dc_spec = [pl.BlockSpec((None, group, bk), lambda j, n, h: (n, h, j))] if cfg.bias else []
  dk, dv, *dc_cols = pl.pallas_call(
      functools.partial(_triton_dkv_kernel, cfg=cfg, bq=bq, bk=bk, group=group, n_q_blocks=time // bq),
      grid=(time // bk, batch, kv_heads),
      in_specs=[group_seq, kv_block, kv_block, group_seq, group_stat, group_stat, *documents, *bias_spec],
      out_specs=[kv_block, kv_block, *dc_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 *([stat_shape] if cfg.bias else [])],
      compiler_params=triton_params(b.dkv_warps, b.dkv_stages),
      interpret=cfg.interpret, name="window_attention_dkv",
  )(q, k, v, do, lse, delta, *([doc_end] if cfg.documents else []), *bias)
  return dq, dk, dv, (dc_rows[0] + dc_cols[0] if cfg.bias else None)


# --- Mosaic (TPU): the band is a grid axis; accumulators live in VMEM scratch ----------------------
# Layout [batch, heads, time, head_dim]. Query block = key block = ``blk``; query block i meets key
# blocks i − (n_band − 1) … i. Per-row statistics follow the layouts Mosaic tiles natively (as jax's
# own TPU flash / splash attention do): the forward keeps m, l and writes lse replicated over the
# 128 lanes; the backward reads lse and Δ as rows replicated over 8 sublanes, ``[.., 8, time]``.
_LANES, _SUBLANES = 128, 8


def _vmem(shape):
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.VMEM(shape, jnp.float32)


def _lanes(x, n: int):
  """A lane-replicated ``[rows, 128]`` statistic as ``[rows, n]``."""
  if n == _LANES:
    return x
  return jnp.tile(x, (1, n // _LANES)) if n % _LANES == 0 else jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _split_refs(refs, n_in: int, documents: bool):
  """A kernel's refs as (its ``n_in`` inputs, the document bound after them or None, the rest)."""
  if documents:
    return refs[:n_in], refs[n_in], refs[n_in + 1:]
  return refs[:n_in], None, refs[n_in:]


def _bias_refs(rest, cfg: _Flash):
  """The refs after the inputs and document bound as (the two views of c, each a ``(hi, lo)`` pair of
  refs, or (None, None); the rest): the resident block's c lane-replicated (``[rows, 128]``) and the
  streamed block's as a row replicated over 8 sublanes (``[8, cols]``), the layouts of lse and Δ."""
  return ((tuple(rest[:2]), tuple(rest[2:4])), rest[4:]) if cfg.bias else ((None, None), rest)


def _mosaic_bias(bias):
  """c's parts (``bias``: ``[batch, 2, heads, time]``) as the Mosaic kernels read them: hi and lo
  lane-replicated ``[batch, heads, time, 128]`` (the resident block's rows), then hi and lo
  sublane-replicated ``[batch, heads, 8, time]`` (the streamed block's)."""
  batch, _, heads, time = bias.shape
  parts = (bias[:, 0], bias[:, 1])
  return (*(jnp.broadcast_to(x[..., None], (batch, heads, time, _LANES)) for x in parts),
          *(jnp.broadcast_to(x[:, :, None, :], (batch, heads, _SUBLANES, time)) for x in parts))


def _lane_bias(refs):
  """A lane-replicated ``(hi, lo)`` pair of refs as the tile's rows' c: ``[rows, 1]`` each."""
  return tuple(r[:, :1] for r in refs)


def _row_bias(refs):
  """A sublane-replicated ``(hi, lo)`` pair of refs as the tile's columns' c: ``[1, cols]`` each."""
  return tuple(r[:1, :] for r in refs)


def _row_sums(x):
  """``Σ`` over a tile's columns, lane-replicated ``[rows, 128]``."""
  return jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), (x.shape[0], _LANES))


def _allowed_rows(shape, q_start, k_start, cfg, bound_ref, *, keys_first: bool = False):
  """A Mosaic TPU tile's mask: the band, cut at document boundaries when ``cfg.documents``
  (:func:`_in_document_rows`, from the columns' bounds)."""
  allowed = _band(shape, q_start, k_start, cfg.window, keys_first=keys_first)
  if cfg.documents:
    allowed &= _in_document_rows(shape, k_start if keys_first else q_start, bound_ref, keys_first=keys_first)
  return allowed


def _in_document_rows(shape, rows, bound_ref, *, keys_first: bool):
  """The document mask of a Mosaic tile from its columns' bounds, ``bound_ref``: a ``[8, cols]`` row
  block (sublane replicated); ``rows``: the first row's position. Queries on rows: the columns are
  keys, their ``doc_end``, and query ``rows + i < doc_end``; keys on rows (``keys_first``): the
  columns are queries, their ``doc_start``, and key ``rows + i ≥ doc_start``."""
  row = rows + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  bound = bound_ref[:1, :]
  return row >= bound if keys_first else row < bound


def _mosaic_fwd_kernel(*refs, cfg: _Flash, blk: int, n_band: int):
  # refs: q, k, v, [the key block's doc_end (cfg.documents)], [the query block's c (hi, lo), the key
  # block's c (hi, lo) (cfg.bias)], o, lse, then m, l, acc scratch
  (q_ref, k_ref, v_ref), ends_ref, rest = _split_refs(refs, 3, cfg.documents)
  (q_bias_ref, k_bias_ref), (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _bias_refs(rest, cfg)
  i, j = pl.program_id(2), pl.program_id(3)
  kb = i - (n_band - 1) + j

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(kb >= 0)
  def _accumulate():
    v = v_ref[...]
    s, c, _ = _logits(q_ref[...], k_ref[...], cfg, 1.0)
    if cfg.bias:
      s, c = _plus_bias(s, c, _lane_bias(q_bias_ref), _row_bias(k_bias_ref), 1.0)
    s = jnp.where(_allowed_rows(s.shape, i * blk, kb * blk, cfg, ends_ref), s * c, -jnp.inf)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - _lanes(m_new, blk))
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = _lanes(alpha, acc_sc.shape[1]) * acc_sc[...] + _mm(p.astype(v.dtype), v)
    m_sc[...] = m_new

  @pl.when(j == n_band - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / _lanes(l, acc_sc.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l)


def _mosaic_dkv_kernel(*refs, cfg: _Flash, blk: int, n_band: int, n_blocks: int, group: int):
  # Keys-first tiles, as in the Triton kernel: lse and Δ (and the queries' doc_start) are rows.
  # refs: q, k, v, do, lse, Δ, [the query block's doc_start (cfg.documents)], [the key block's c (hi,
  # lo), the query block's c (hi, lo), both of the step's query head (cfg.bias)], dk, dv, [dc of the
  # step's query head (cfg.bias)], then dk, dv scratch
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), starts_ref, rest = _split_refs(refs, 6, cfg.documents)
  (k_bias_ref, q_bias_ref), rest = _bias_refs(rest, cfg)
  (dk_ref, dv_ref), dc_ref, (dk_sc, dv_sc) = rest[:2], (rest[2] if cfg.bias else None), rest[-2:]
  kb, step = pl.program_id(2), pl.program_id(3)
  qb = kb + jax.lax.rem(step, _i32(n_band))

  @pl.when(step == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  if cfg.bias:  # one query head's column sums over its n_band consecutive steps
    @pl.when(jax.lax.rem(step, _i32(n_band)) == 0)
    def _init_dc():
      dc_ref[...] = jnp.zeros(dc_ref.shape, jnp.float32)

  @pl.when(qb < n_blocks)
  def _accumulate():
    q, do = q_ref[...], do_ref[...]
    s, c, t = _logits(k_ref[...], q, cfg, 1.0)
    if cfg.bias:
      s, c = _plus_bias(s, c, _row_bias(q_bias_ref), _lane_bias(k_bias_ref), 1.0)
    s = jnp.where(_allowed_rows(s.shape, qb * blk, kb * blk, cfg, starts_ref, keys_first=True), s * c, -jnp.inf)
    p = jnp.exp(s - lse_ref[:1, :])
    dv_sc[...] += _mm(p.astype(do.dtype), do)
    ds = p * (_mm_nt(v_ref[...], do) - delta_ref[:1, :])
    if t is not None:
      ds = ds * (1.0 - t * t)
    dk_sc[...] += _mm(ds.astype(q.dtype), q)
    if cfg.bias:
      dc_ref[...] -= _row_sums(ds)

  @pl.when(step == group * n_band - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _mosaic_dq_kernel(*refs, cfg: _Flash, blk: int, n_band: int):
  # refs: q, k, v, do, lse, Δ, [the key block's doc_end (cfg.documents)], [the query block's c (hi, lo),
  # the key block's c (hi, lo) (cfg.bias)], dq, [dc (cfg.bias)], then dq scratch
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), ends_ref, rest = _split_refs(refs, 6, cfg.documents)
  (q_bias_ref, k_bias_ref), rest = _bias_refs(rest, cfg)
  (dq_ref, dc_ref, dq_sc) = rest if cfg.bias else (rest[0], None, rest[1])
  i, j = pl.program_id(2), pl.program_id(3)
  kb = i - (n_band - 1) + j

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
    if cfg.bias:
      dc_ref[...] = jnp.zeros(dc_ref.shape, jnp.float32)

  @pl.when(kb >= 0)
  def _accumulate():
    k = k_ref[...]
    s, c, t = _logits(q_ref[...], k, cfg, 1.0)
    if cfg.bias:
      s, c = _plus_bias(s, c, _lane_bias(q_bias_ref), _row_bias(k_bias_ref), 1.0)
    s = jnp.where(_allowed_rows(s.shape, i * blk, kb * blk, cfg, ends_ref), s * c, -jnp.inf)
    p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))
    ds = p * (_mm_nt(do_ref[...], v_ref[...]) - jnp.expand_dims(delta_ref[0], -1))
    if t is not None:
      ds = ds * (1.0 - t * t)
    dq_sc[...] += _mm(ds.astype(k.dtype), k)
    if cfg.bias:
      dc_ref[...] += _row_sums(ds)

  @pl.when(j == n_band - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _mosaic_band(cfg: _Flash, time: int):
  blk = cfg.blocks.block
  n_blocks = time // blk
  return blk, n_blocks, min(n_blocks, -(-(cfg.window - 1) // blk) + 1)


def _mosaic_query_side_specs(blk, dim, n_band, group):
  """Specs over grid (batch, head, query block, band step): the query block's rows, its statistics
  (``[.., 8, time]`` rows), and its band's key block."""
  rows = pl.BlockSpec((None, None, blk, dim), lambda n, h, i, j: (n, h, i, 0))
  stats = pl.BlockSpec((None, None, _SUBLANES, blk), lambda n, h, i, j: (n, h, 0, i))
  # Steps before the sequence start clamp to block 0 (already resident: no copy) and are skipped.
  keys = pl.BlockSpec((None, None, blk, dim),
                      lambda n, h, i, j: (n, _div(h, group), jnp.maximum(i - (n_band - 1) + j, 0), 0))
  return rows, stats, keys


def _mosaic_key_documents(blk, n_band):
  """Spec of the band's key block's ``doc_end`` (``[batch, 8, time]``), over the query-side grid."""
  return pl.BlockSpec((None, _SUBLANES, blk), lambda n, h, i, j: (n, 0, jnp.maximum(i - (n_band - 1) + j, 0)))


def _mosaic_query_side_bias(blk, n_band, cfg: _Flash):
  """Specs of c's hi and lo over the query-side grid: the query block's (lanes, ``[.., time, 128]``),
  then the band's key block's (a row, ``[.., 8, time]``); all of the query head. Empty without a bias."""
  if not cfg.bias:
    return []
  key_block = lambda n, h, i, j: (n, h, 0, jnp.maximum(i - (n_band - 1) + j, 0))
  return [pl.BlockSpec((None, None, blk, _LANES), lambda n, h, i, j: (n, h, i, 0))] * 2 + [
      pl.BlockSpec((None, None, _SUBLANES, blk), key_block)] * 2


def _mosaic_forward(q, k, v, doc_end, bias, cfg: _Flash):
  batch, heads, time, dim = q.shape
  group = heads // k.shape[1]
  blk, n_blocks, n_band = _mosaic_band(cfg, time)
  rows, _, keys = _mosaic_query_side_specs(blk, dim, n_band, group)
  documents = [_mosaic_key_documents(blk, n_band)] if cfg.documents else []
  o, lse = pl.pallas_call(
      functools.partial(_mosaic_fwd_kernel, cfg=cfg, blk=blk, n_band=n_band),
      grid=(batch, heads, n_blocks, n_band),
      in_specs=[rows, keys, keys, *documents, *_mosaic_query_side_bias(blk, n_band, cfg)],
      out_specs=[rows, pl.BlockSpec((None, None, blk, _LANES), lambda n, h, i, j: (n, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, time, _LANES), jnp.float32)],
      scratch_shapes=[_vmem((blk, _LANES)), _vmem((blk, _LANES)), _vmem((blk, dim))],
      compiler_params=_mosaic_params(4),
      interpret=cfg.interpret, name="window_attention_fwd",
  )(q, k, v, *([doc_end] if cfg.documents else []), *(_mosaic_bias(bias) if cfg.bias else ()))
  return o, lse[..., 0]


def _mosaic_backward(q, k, v, o, lse, do, doc_start, doc_end, bias, cfg: _Flash):
  batch, heads, time, dim = q.shape
  kv_heads = k.shape[1]
  group = heads // kv_heads
  blk, n_blocks, n_band = _mosaic_band(cfg, time)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  lse, delta = (jnp.broadcast_to(x[:, :, None, :], (batch, heads, _SUBLANES, time)) for x in (lse, delta))

  # dK, dV: grid (batch, kv head, key block, step); step runs over (query head of the group, query
  # block kb … kb + n_band − 1), clamped at the end of the sequence and skipped there.
  def query_block(n, h, kb, s):
    return n, h * group + _div(s, n_band), jnp.minimum(kb + jax.lax.rem(s, _i32(n_band)), n_blocks - 1)
  q_rows = pl.BlockSpec((None, None, blk, dim), lambda *g: (*query_block(*g), 0))
  q_stats = pl.BlockSpec((None, None, _SUBLANES, blk), lambda *g: (*query_block(*g)[:2], 0, query_block(*g)[2]))
  kv_rows = pl.BlockSpec((None, None, blk, dim), lambda n, h, kb, s: (n, h, kb, 0))
  documents = ([pl.BlockSpec((None, _SUBLANES, blk), lambda *g: (g[0], 0, query_block(*g)[2]))]
               if cfg.documents else [])
  bias = _mosaic_bias(bias) if cfg.bias else ()
  lanes_shape = jax.ShapeDtypeStruct((batch, heads, time, _LANES), jnp.float32)
  # c (hi, lo) of the step's query head: the key block's (lanes; dc is written in the same blocks) and
  # the query block's (a row). The dc block moves on with the query head, every n_band steps.
  key_lanes = pl.BlockSpec((None, None, blk, _LANES), lambda *g: (g[0], query_block(*g)[1], g[2], 0))
  bias_specs = [key_lanes] * 2 + [q_stats] * 2 if cfg.bias else []
  dk, dv, *dc_cols = pl.pallas_call(
      functools.partial(_mosaic_dkv_kernel, cfg=cfg, blk=blk, n_band=n_band, n_blocks=n_blocks, group=group),
      grid=(batch, kv_heads, n_blocks, group * n_band),
      in_specs=[q_rows, kv_rows, kv_rows, q_rows, q_stats, q_stats, *documents, *bias_specs],
      out_specs=[kv_rows, kv_rows, *([key_lanes] if cfg.bias else [])],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 *([lanes_shape] if cfg.bias else [])],
      scratch_shapes=[_vmem((blk, dim)), _vmem((blk, dim))],
      compiler_params=_mosaic_params(4),
      interpret=cfg.interpret, name="window_attention_dkv",
  )(q, k, v, do, lse, delta, *([doc_start] if cfg.documents else []), *bias)

  rows, stats, keys = _mosaic_query_side_specs(blk, dim, n_band, group)
  documents = [_mosaic_key_documents(blk, n_band)] if cfg.documents else []
  bias_specs = _mosaic_query_side_bias(blk, n_band, cfg)
  dq, *dc_rows = pl.pallas_call(
      functools.partial(_mosaic_dq_kernel, cfg=cfg, blk=blk, n_band=n_band),
      grid=(batch, heads, n_blocks, n_band),
      in_specs=[rows, keys, keys, rows, stats, stats, *documents, *bias_specs],
      out_specs=[rows, *bias_specs[:1]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *([lanes_shape] if cfg.bias else [])],
      scratch_shapes=[_vmem((blk, dim))],
      compiler_params=_mosaic_params(4),
      interpret=cfg.interpret, name="window_attention_dq",
  )(q, k, v, do, lse, delta, *([doc_end] if cfg.documents else []), *bias)
  return dq, dk, dv, (dc_rows[0][..., 0] + dc_cols[0][..., 0] if cfg.bias else None)


# --- the differentiable core: inputs already padded and laid out for the target -------------------

# ``doc_start``, ``doc_end``: None, or the int32 bounds of ``document_bounds`` (``[batch, time]``; the
# Mosaic TPU layout ``[batch, 8, time]``); integer inputs, so their cotangents are None. ``bias``:
# None, or the decay bias c as its two f32 parts, ``[batch, 2, heads, time]`` (hi, lo; cfg.bias), whose
# cotangent the backward forms: the kernels' dc for each part, since the logits read only hi + lo.

@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, doc_start, doc_end, bias, cfg: _Flash):
  return _flash_fwd(q, k, v, doc_start, doc_end, bias, cfg)[0]


def _flash_fwd(q, k, v, doc_start, doc_end, bias, cfg: _Flash):
  if cfg.target == "triton" and cfg.blocks.fwd_kernel == "mosaic_gpu":
    b = cfg.blocks
    o, lse = window_attention_mgpu.forward(q, k, v, window=cfg.window, scale=cfg.scale, block_kv=b.mgpu_kv,
                                           stages=b.mgpu_stages, pingpong=b.mgpu_pingpong,
                                           own_band=b.mgpu_own_band, softmax_fence=b.mgpu_softmax_fence,
                                           persistent=b.mgpu_persistent, doc_start=doc_start,
                                           skip_outside_documents=b.mgpu_skip_outside_documents)
  elif cfg.target == "triton":
    o, lse = _triton_forward(q, k, v, doc_start, bias, cfg)
  else:
    o, lse = _mosaic_forward(q, k, v, doc_end, bias, cfg)
  return o, (q, k, v, o, lse, doc_start, doc_end, bias)


def _flash_bwd(cfg: _Flash, residuals, do):
  b = cfg.blocks
  q, k, v, o, lse, doc_start, doc_end, bias = residuals
  if cfg.target == "triton" and b.bwd_kernel == "mosaic_gpu":
    grads = window_attention_mgpu.backward(q, k, v, o, lse, do, window=cfg.window, scale=cfg.scale,
                                           block_q=b.mgpu_bwd_q, block_kv=b.mgpu_bwd_kv, stages=b.mgpu_bwd_stages,
                                           own_band=b.mgpu_own_band, persistent=b.mgpu_bwd_persistent,
                                           doc_start=doc_start, doc_end=doc_end,
                                           skip_outside_documents=b.mgpu_skip_outside_documents)
    grads = (*grads, None)  # (no bias: flash_window_attention keeps biased calls on Triton)
  else:
    grads = (_triton_backward if cfg.target == "triton" else _mosaic_backward)(q, k, v, o, lse, do, doc_start,
                                                                               doc_end, bias, cfg)
  dq, dk, dv, dc = grads
  return dq, dk, dv, None, None, (None if dc is None else jnp.stack([dc, dc], axis=1))


_flash.defvjp(_flash_fwd, _flash_bwd)
_flash_shared = lowered_once(_flash, static_argnums=(6,))


_next_pow2 = next_pow2


_round_up = round_up


def _halved(b: PallasBlocks) -> PallasBlocks:
  """Tiles for rows twice as wide (in bytes): half of each tile, fewer pipeline stages."""
  half = lambda n: max(16, n // 2)
  return dataclasses.replace(
      b, fwd_q=half(b.fwd_q), fwd_k=half(b.fwd_k), dkv_q=half(b.dkv_q), dkv_k=half(b.dkv_k), dq_q=half(b.dq_q),
      dq_k=half(b.dq_k), fwd_warps=4, dkv_warps=4, dq_warps=4, fwd_stages=2, dkv_stages=2, dq_stages=2)


def _pallas_target(target: str | None, interpret: bool) -> str:
  if target is not None:
    return pallas_layout(target, "attention")
  backend = jax.default_backend()
  if backend == "tpu":
    return "mosaic"
  if backend == "gpu" or interpret:
    return "triton"
  raise ValueError(f"window_attention: impl='pallas' needs a GPU or TPU (backend is {backend!r}); "
                   "pass interpret=True to run the kernel in the Pallas interpreter")


def flash_window_attention(q, k, v, *, window: int | None = None, softcap: float | None = None,
                           interpret: bool = False, target: PallasTarget | None = None,
                           blocks: PallasBlocks | None = None, segment_ids=None, decay_bias=None):
  """The Pallas path of :func:`window_attention` (same arguments and result). ``segment_ids``
  (``int [batch, time]``): packed documents, a new one wherever the id changes; the kernels mask
  across them (``document_bounds``). ``decay_bias``: optional ``c``, ``[batch, time, heads]`` (read in
  float32, differentiable), or a pair ``(hi, lo)`` of such arrays standing for ``c = hi + lo`` (a
  ``c`` too long for one float32 to keep its differences; each part gets ``dc``): the logit of query
  ``i`` and key ``j`` of head ``h`` gets ``c_ih − c_jh`` (forgetting attention's cumulative log forget
  gate, ``kernels.forgetting_attention``); it should not increase along a document, so every pair the
  band reads has a bias ≤ 0. No soft-cap with it; the Mosaic GPU kernels take none (Triton runs it on
  every GPU)."""
  _check(q, k, v, window)
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"window_attention: segment_ids{segment_ids.shape} must be [batch, time] = {q.shape[:2]}")
  if decay_bias is not None:
    if not isinstance(decay_bias, (tuple, list)):
      decay_bias = (decay_bias, jnp.zeros(decay_bias.shape, jnp.float32))  # one part: lo = 0
    if len(decay_bias) != 2 or any(part.shape != q.shape[:3] for part in decay_bias):
      raise ValueError(f"window_attention: decay_bias must be c or (c_hi, c_lo), each [batch, time, heads] = "
                       f"{q.shape[:3]}; got {[getattr(part, 'shape', part) for part in decay_bias]}")
    if softcap is not None:
      raise ValueError("window_attention: decay_bias with a soft-cap is not supported (the bias is added after it)")
  target = _pallas_target(target, interpret)
  batch, time, heads, dim = q.shape
  if blocks is None:
    blocks = PallasBlocks()
    if target == "triton":
      width = q.dtype.itemsize * _next_pow2(dim) // 256  # row bytes relative to bf16 × 128
      for _ in range((width - 1).bit_length() if width > 1 else 0):
        blocks = _halved(blocks)
  if target == "triton":
    # Triton tiles are powers of two (dot operands ≥ 16); short sequences shrink the tiles.
    cap = max(16, _next_pow2(time))
    blocks = dataclasses.replace(blocks, **{f: min(getattr(blocks, f), cap)
                                            for f in ("fwd_q", "fwd_k", "dkv_q", "dkv_k", "dq_q", "dq_k")})
    padded = _round_up(time, max(blocks.fwd_q, blocks.fwd_k, blocks.dkv_q, blocks.dkv_k, blocks.dq_q, blocks.dq_k))
    pad_dim = max(16, _next_pow2(dim)) - dim  # zero features change no score and give zero outputs
  else:
    blocks = dataclasses.replace(blocks, block=min(blocks.block, _round_up(time, 8)))
    padded, pad_dim = _round_up(time, blocks.block), 0
  for field in ("fwd_kernel", "bwd_kernel"):
    if getattr(blocks, field) not in (None, "triton", "mosaic_gpu"):
      raise ValueError(f"window_attention: PallasBlocks.{field}={getattr(blocks, field)!r}; valid: 'triton', 'mosaic_gpu'")
  documents = segment_ids is not None
  if target == "triton":
    problem = window_attention_mgpu.supports(jax.ShapeDtypeStruct((batch, padded, heads, dim + pad_dim), q.dtype),
                                             k, softcap)
    if decay_bias is not None:
      problem = NO_DECAY_BIAS
    blocks = dataclasses.replace(blocks, **{
        field: mosaic_gpu_or_triton(getattr(blocks, field), problem, interpret=interpret, hopper=tma_gpu(),
                                    field=f"window_attention: PallasBlocks.{field}")
        for field in ("fwd_kernel", "bwd_kernel")})
  cfg = _Flash(window=padded if window is None else min(window, padded), softcap=softcap,
               scale=1.0 / math.sqrt(dim), target=target, blocks=blocks, interpret=interpret, documents=documents,
               bias=decay_bias is not None)
  widths = ((0, 0), (0, padded - time), (0, 0), (0, pad_dim))
  q, k, v = (jnp.pad(x, widths) if padded > time or pad_dim else x for x in (q, k, v))
  doc_start = doc_end = bias = None
  if documents:
    doc_start, doc_end = document_bounds(segment_ids, padded)
  if decay_bias is not None:
    # Padding repeats the last c: a padded query's pairs get a bias ≤ 0 too (its cotangent is 0).
    bias = jnp.stack([part.astype(jnp.float32) for part in decay_bias], axis=1)  # [b, 2, t, h]
    bias = jnp.pad(rearrange(bias, "b p t h -> b p h t"), ((0, 0), (0, 0), (0, 0), (0, padded - time)), mode="edge")
  if target == "mosaic":
    q, k, v = (rearrange(x, "b t h d -> b h t d") for x in (q, k, v))
    if documents:  # rows replicated over 8 sublanes, as the backward's lse and Δ
      doc_start, doc_end = (jnp.broadcast_to(x[:, None, :], (batch, _SUBLANES, padded)) for x in (doc_start, doc_end))
    return rearrange(_flash_shared(q, k, v, doc_start, doc_end, bias, cfg), "b h t d -> b t h d")[:, :time]
  return _flash_shared(q, k, v, doc_start, doc_end, bias, cfg)[:, :time, :, :dim]
