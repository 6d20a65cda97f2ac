"""The generalized delta rule's chunk precompute as one Pallas kernel (``dplr(precompute="pallas")``).

Everything :func:`kernels.dplr.xla._precompute` makes for the state pass and the outputs, one program per
(batch, chunk, head) with the chunk on chip: the within-chunk cumulative log-decay ``G`` (restarted at
document starts), the pair products ``M_qk, M_qa`` (outputs) and ``M_bk, M_ba`` (the read keys), the UT
solve ``(I + M_ba) [Ũ | W] = [M_bk V | B̂]``, ``Â``, ``X = Σ_s e^{G_C − G_s} ⊙ k_s v_sᵀ``, ``q e^{G}``
and the chunk decay. XLA's form materialises ``[chunk, chunk, d_k]`` gains for every chunk at once in
HBM; here they never leave the program. Triton layout (the Pallas interpreter on CPU).

Blocks of ``B = 16`` rows. Every decay factor is ``exp`` of a difference of cumulative log-decays that
is ≤ 0, masked (to −∞, then ``exp`` gives 0) where it is not one:

- Pairs (t, s) in blocks i > j factor through the block edge ``r`` (the last row of block j, s ≤ r < t):
  ``e^{G'_t − G_s} = e^{G'_t − G_r} · e^{G_r − G_s}``, both exponents ≤ 0, so ``M_ij`` is one dot of
  ``x_t ⊙ e^{G'_t − G_r}`` and ``y_s ⊙ e^{G_r − G_s}``. With documents, a factor is kept only where its
  row shares r's document: a pair of one document with s ≤ r < t has no start in (s, t], so both
  factors are decays; any other pair is in two documents, where M is zero anyway.
- Pairs inside a diagonal block: a loop over the block's columns s, each a ``[B, d_k]`` masked gain
  ``e^{G'_t − G_s}`` (t ≥ s, or t > s for the read keys) times ``x_t y_s`` summed over keys.

The UT solve is block forward substitution, ``X_i = (I + M_ba[i, i])⁻¹ (R_i − Σ_{j<i} M_ba[i, j] X_j)``,
the diagonal blocks inverted by :func:`kernels.delta.xla.unit_lower_inverse` (products of 16 × 16).
``G`` is a masked lower-triangular matmul of the log-decays (zeroed at starts by the caller), and the
read keys' ``G_{t−1}`` is ``G_t − g_t`` (0 at a start and at the chunk's first row).

Dots of f32 values run as three TF32 products on the GPU (about f32 accuracy), IEEE f32 in the
interpreter. The backward is JAX's vjp of the XLA ``_precompute`` (recomputed): this kernel is for the
forward's speed. A per-head decay arrives broadcast to 16 columns (a Triton dot's smallest width) for
the cumulative sum and is reduced to one column after it; no decay is the per-head case with zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.delta.pallas import MIN_TILE, _is_pow2_tile
from kernels.delta.reference import state_resets
from kernels.delta.xla import chunk_documents, to_chunks, unit_lower_inverse
from kernels.dplr.xla import _Chunks, _precompute
from kernels.pallas_compat import SQUEEZED, lowered_once, triton_params
from kernels.tiling import next_pow2

__all__ = ["precompute"]

_F32 = jnp.float32
_SQ = SQUEEZED
BLOCK = 16  # rows per block (a Triton dot tile)


def _iota(shape, axis):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _masked_exp(log_gain, mask):
  """``e^{log_gain}`` where ``mask`` holds, else 0; the exponent is replaced before ``exp`` (and clipped
  at 0, which only rounding can exceed where the mask holds)."""
  if mask is None:
    return jnp.exp(jnp.minimum(log_gain, 0.0))
  return jnp.exp(jnp.where(mask, jnp.minimum(log_gain, 0.0), -jnp.inf))


def _kernel(q_ref, k_ref, v_ref, a_ref, b_ref, g_ref, *refs, per_key: bool, segmented: bool, gpu: bool):
  # q, k, a, b: [c, d_k]; v: [c, d_v] (input dtype); g: [c, d_k | 16] f32 (log-decay, zero at starts
  # and padding); doc: [c, 1] and doc_row: [1, c] int32 when segmented (each row's document index in
  # the chunk). Outputs: q_in, w, a_to_end [c, d_k]; u_tilde [c, d_v]; kv_to_end [d_k, d_v];
  # chunk_decay [1, d_k | 16]; m_qk, m_qa [c, c]; all f32.
  if segmented:
    doc_ref, doc_row_ref, *refs = refs
  else:
    doc_ref = doc_row_ref = None
  q_in_ref, w_ref, u_ref, a_end_ref, kv_ref, decay_ref, m_qk_ref, m_qa_ref = refs
  c = q_ref.shape[0]
  nb = c // BLOCK
  rows = lambda i: pl.ds(i * BLOCK, BLOCK)
  precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if gpu else jax.lax.Precision.HIGHEST

  def dot(x, y, cx=1, cy=0):
    return jax.lax.dot_general(x, y, (((cx,), (cy,)), ((), ())), precision=precision,
                               preferred_element_type=_F32)

  load = lambda ref, i: ref[rows(i), :].astype(_F32)
  q, k, a, b = ([load(r, i) for i in range(nb)] for r in (q_ref, k_ref, a_ref, b_ref))
  v = [load(v_ref, i) for i in range(nb)]
  g = [load(g_ref, i) for i in range(nb)]
  doc = [doc_ref[rows(i), :] for i in range(nb)] if segmented else None  # [B, 1]
  lower_eq = _iota((BLOCK, BLOCK), 0) >= _iota((BLOCK, BLOCK), 1)
  same_doc = lambda i, y: None if not segmented else doc[i] == y
  both = lambda m1, m2: m2 if m1 is None else (m1 if m2 is None else m1 & m2)

  # G_t = Σ_{s ≤ t, one document} g_s: a masked lower-triangular matmul per block pair.
  log_gain = []
  for i in range(nb):
    total = None
    for j in range(i + 1):
      mask = lower_eq if i == j else None
      if segmented:
        mask = both(mask, doc[i] == doc_row_ref[:, rows(j)])
      if mask is None:
        part = dot(jnp.ones((BLOCK, BLOCK), _F32), g[j])
      else:
        part = dot(mask.astype(_F32), g[j])
      total = part if total is None else total + part
    log_gain.append(total)
  if not per_key:  # the 16 equal columns of a per-head decay: one column
    log_gain = [jnp.max(x, axis=1, keepdims=True) for x in log_gain]
    g = [jnp.max(x, axis=1, keepdims=True) for x in g]
  log_read = [lg - gi for lg, gi in zip(log_gain, g)]  # G_{t−1}; 0 at starts and the chunk's first row

  row_of = lambda x, t: jnp.sum(jnp.where(_iota(x.shape, 0) == t, x, 0.0), axis=0, keepdims=True)  # [1, ·]

  # Pair products, block (i, j), j ≤ i.
  m_qk, m_qa, m_bk, m_ba = {}, {}, {}, {}
  for i in range(nb):
    for j in range(i):
      # r: the last row of block j
      g_r = row_of(log_gain[j], BLOCK - 1)  # [1, d_k | 1]
      doc_r = doc_ref[pl.ds(j * BLOCK + BLOCK - 1, 1), :] if segmented else None  # [1, 1]
      t_keep = same_doc(i, doc_r)
      s_keep = same_doc(j, doc_r)
      s_gain = _masked_exp(g_r - log_gain[j], s_keep)  # e^{G_r − G_s}
      out_gain = _masked_exp(log_gain[i] - g_r, t_keep)  # e^{G_t − G_r}
      read_gain = _masked_exp(log_read[i] - g_r, t_keep)  # e^{G_{t−1} − G_r}
      k_s, a_s = k[j] * s_gain, a[j] * s_gain
      q_t, b_t = q[i] * out_gain, b[i] * read_gain
      m_qk[i, j], m_qa[i, j] = dot(q_t, k_s, 1, 1), dot(q_t, a_s, 1, 1)
      m_bk[i, j], m_ba[i, j] = dot(b_t, k_s, 1, 1), dot(b_t, a_s, 1, 1)

    # The diagonal block, one column s at a time.
    def column(s, carry, i=i):
      mqk, mqa, mbk, mba = carry
      at = i * BLOCK + s
      k_s, a_s = k_ref[pl.ds(at, 1), :].astype(_F32), a_ref[pl.ds(at, 1), :].astype(_F32)  # [1, d_k]
      g_s = row_of(log_gain[i], s)
      t_idx = _iota((BLOCK, 1), 0)
      keep_out, keep_read = t_idx >= s, t_idx > s
      if segmented:
        same = doc[i] == doc_ref[pl.ds(at, 1), :]
        keep_out, keep_read = keep_out & same, keep_read & same
      out_gain = _masked_exp(log_gain[i] - g_s, keep_out)  # [B, d_k | 1]
      read_gain = _masked_exp(log_read[i] - g_s, keep_read)
      col = lambda x, gain, y: jnp.sum(x * gain * y, axis=1, keepdims=True)  # [B, 1]
      put = lambda m, x: jnp.where(_iota((BLOCK, BLOCK), 1) == s, x, m)
      return (put(mqk, col(q[i], out_gain, k_s)), put(mqa, col(q[i], out_gain, a_s)),
              put(mbk, col(b[i], read_gain, k_s)), put(mba, col(b[i], read_gain, a_s)))

    zero = jnp.zeros((BLOCK, BLOCK), _F32)
    m_qk[i, i], m_qa[i, i], m_bk[i, i], m_ba[i, i] = jax.lax.fori_loop(0, BLOCK, column, (zero,) * 4)

  for i in range(nb):
    for j in range(nb):
      m_qk_ref[rows(i), rows(j)] = m_qk[i, j] if j <= i else jnp.zeros((BLOCK, BLOCK), _F32)
      m_qa_ref[rows(i), rows(j)] = m_qa[i, j] if j <= i else jnp.zeros((BLOCK, BLOCK), _F32)

  # q e^{G_t} and B̂ = b e^{G_{t−1}}: only rows the entering state reaches (no start at or before t).
  reaches = [d == 0 for d in doc] if segmented else [None] * nb
  for i in range(nb):
    q_in_ref[rows(i), :] = q[i] * _masked_exp(log_gain[i], reaches[i])
  b_hat = [b[i] * _masked_exp(log_read[i], reaches[i]) for i in range(nb)]

  # Block forward substitution for [Ũ | W].
  solved_u, solved_w = [], []
  for i in range(nb):
    rhs_u = functools.reduce(jnp.add, [dot(m_bk[i, j], v[j]) for j in range(i + 1)])
    rhs_w = b_hat[i]
    for j in range(i):
      rhs_u = rhs_u - dot(m_ba[i, j], solved_u[j])
      rhs_w = rhs_w - dot(m_ba[i, j], solved_w[j])
    inverse = unit_lower_inverse(m_ba[i, i], dot)
    solved_u.append(dot(inverse, rhs_u))
    solved_w.append(dot(inverse, rhs_w))
    u_ref[rows(i), :] = solved_u[i]
    w_ref[rows(i), :] = solved_w[i]

  # To the chunk's end: its last document only.
  g_end = row_of(log_gain[nb - 1], BLOCK - 1)  # [1, d_k | 1]
  doc_end = doc_ref[pl.ds(c - 1, 1), :] if segmented else None  # [1, 1]
  kv = None
  for i in range(nb):
    to_end = _masked_exp(g_end - log_gain[i], None if not segmented else doc[i] == doc_end)
    a_end_ref[rows(i), :] = a[i] * to_end
    part = dot(k[i] * to_end, v[i], 0, 0)
    kv = part if kv is None else kv + part
  kv_ref[...] = kv
  decay_ref[...] = _masked_exp(g_end, None if not segmented else doc_end == 0) + jnp.zeros(
      decay_ref.shape, _F32)


def _call(q, k, v, a, b, g, doc, *, per_key: bool, interpret: bool, warps: int, chunk_size: int):
  """q, k, a, b ``[b, t, h, dk]``, v ``[b, t, h, dv]`` (t a multiple of the chunk, dk and dv Triton
  tiles), g f32 ``[b, t, h, dk | 16]``, doc int32 ``[b, t, 1]`` or None. Returns the kernel's outputs
  in the chunked layout ``[b, n, h, …]``."""
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  n = time // c
  gw = g.shape[-1]
  tok = lambda width: pl.BlockSpec((_SQ, c, _SQ, width), lambda i, m, h: (i, m, h, 0))
  out = lambda r, w: pl.BlockSpec((_SQ, _SQ, _SQ, r, w), lambda i, m, h: (i, m, h, 0, 0))
  shape = lambda r, w: jax.ShapeDtypeStruct((batch, n, heads, r, w), _F32)
  in_specs = [tok(dk), tok(dk), tok(dv), tok(dk), tok(dk), tok(gw)]
  arrays = [q, k, v, a, b, g]
  if doc is not None:
    in_specs += [pl.BlockSpec((_SQ, c, 1), lambda i, m, h: (i, m, 0)),
                 pl.BlockSpec((_SQ, 1, c), lambda i, m, h: (i, 0, m))]
    arrays += [doc, doc.reshape(batch, 1, time)]
  out_specs = [out(c, dk), out(c, dk), out(c, dv), out(c, dk), out(dk, dv), out(1, gw), out(c, c), out(c, c)]
  out_shape = [shape(c, dk), shape(c, dk), shape(c, dv), shape(c, dk), shape(dk, dv), shape(1, gw),
               shape(c, c), shape(c, c)]
  kernel = functools.partial(_kernel, per_key=per_key, segmented=doc is not None, gpu=not interpret)
  return pl.pallas_call(kernel, grid=(batch, n, heads), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret, name="dplr_precompute",
                        compiler_params=None if interpret else triton_params(warps, 1))(*arrays)


def _forward(q, k, v, a, b, log_decay, segment_ids, chunk_size, interpret, warps) -> _Chunks:
  batch, time, heads, d_k = q.shape
  d_v = v.shape[-1]
  c = chunk_size
  n = -(-time // c)
  pad_t = n * c - time
  dk, dv = max(MIN_TILE, next_pow2(d_k)), max(MIN_TILE, next_pow2(d_v))
  per_key = log_decay is not None and log_decay.ndim == 4
  pad = lambda x, width: jnp.pad(x, ((0, 0), (0, pad_t), (0, 0), (0, width - x.shape[-1])))
  if log_decay is None:
    g = jnp.zeros((batch, time, heads, MIN_TILE), _F32)
  elif per_key:
    g = log_decay.astype(_F32)
  else:
    g = jnp.broadcast_to(log_decay.astype(_F32)[..., None], (batch, time, heads, MIN_TILE))
  doc = None
  if segment_ids is not None:
    _, doc_chunked = chunk_documents(segment_ids, c)  # [b n 1 c]
    # A start's own log-decay only multiplies the state it discards (as in _precompute).
    g = jnp.where(state_resets(segment_ids)[:, :, None, None], 0.0, g)
    doc = doc_chunked.reshape(batch, n * c, 1).astype(jnp.int32)
  g = pad(g, dk if per_key else MIN_TILE)
  q_in, w, u_tilde, a_end, kv, decay, m_qk, m_qa = _call(
      pad(q, dk), pad(k, dk), pad(v, dv), pad(a, dk), pad(b, dk), g, doc, per_key=per_key,
      interpret=interpret, warps=warps, chunk_size=c)
  chunk_decay = decay[..., 0, :d_k] if per_key else decay[..., 0, 0]
  return _Chunks(q_in=q_in[..., :d_k], v=to_chunks(v, c), w=w[..., :d_k], u_tilde=u_tilde[..., :d_v],
                 a_to_end=a_end[..., :d_k], kv_to_end=kv[..., :d_k, :d_v], chunk_decay=chunk_decay,
                 m_qk=m_qk, m_qa=m_qa)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _precompute_pallas(q, k, v, a, b, log_decay, segment_ids, chunk_size, interpret, warps):
  return _forward(q, k, v, a, b, log_decay, segment_ids, chunk_size, interpret, warps)


def _fwd(q, k, v, a, b, log_decay, segment_ids, chunk_size, interpret, warps):
  out = _forward(q, k, v, a, b, log_decay, segment_ids, chunk_size, interpret, warps)
  return out, (q, k, v, a, b, log_decay, segment_ids)


def _bwd(chunk_size, interpret, warps, residuals, cotangents):
  # Recompute: JAX's vjp of the XLA precompute (the same function, every exponent ≤ 0 there too).
  del interpret, warps
  q, k, v, a, b, log_decay, segment_ids = residuals
  xla = lambda q, k, v, a, b, log_decay: _precompute(q, k, v, a, b, log_decay, chunk_size, segment_ids)
  _, vjp = jax.vjp(xla, q, k, v, a, b, log_decay)
  return vjp(cotangents) + (None,)


_precompute_pallas.defvjp(_fwd, _bwd)
_precompute_shared = lowered_once(_precompute_pallas, static_argnums=(7, 8, 9))


def precompute(q, k, v, a, b, log_decay, chunk_size: int, segment_ids=None, *, interpret: bool = False,
               warps: int = 4) -> _Chunks:
  """:func:`kernels.dplr.xla._precompute` as one Pallas (Triton) kernel, same arguments and result
  (:class:`kernels.dplr.xla._Chunks`, f32), differentiable (backward: the XLA form's vjp, recomputed).

  Args:
    q, k, a, b: ``[batch, time, heads, d_k]``; v: ``[batch, time, heads, d_v]`` (any float dtype: read
      as is, computed in f32).
    log_decay: ``[batch, time, heads, d_k]``, ``[batch, time, heads]`` or None.
    chunk_size: a power of two ≥ 16.
    segment_ids: int ``[batch, time]`` or None (packed documents, as ``_precompute``).
    interpret: the Pallas interpreter (CPU); warps: the Triton launch's warps.
  """
  if not _is_pow2_tile(chunk_size):
    raise ValueError(f"dplr: precompute='pallas' needs chunk_size a power of two ≥ {MIN_TILE} "
                     f"(got {chunk_size})")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)
  return _precompute_shared(q, k, v, a, b, log_decay, segment_ids, chunk_size, interpret, warps)
