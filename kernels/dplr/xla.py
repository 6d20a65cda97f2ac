"""The generalized delta rule in XLA: the chunked WY / UT form for diagonal-plus-rank-one transitions
(derivation in ``kernels/dplr/__init__.py``). The unit-lower solve and the per-chunk document indices
are the delta rule's (``kernels.delta.xla``: :func:`wy_solve`, :func:`chunk_documents`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels.delta.xla import chunk_documents, to_chunks, wy_solve
from kernels.dplr.reference import _state0
from kernels.documents import segmented_cumsum

_NEG = -1e30


class _Chunks(NamedTuple):
  """The chunk-parallel work before the sequential pass (``[b n h c …]``: batch, chunk, head, row).
  ``…k`` is ``d_k`` for a per-key-channel decay; with a per-head decay the decay arrays drop it."""
  q_in: jax.Array         # [b n h c k]  q_t e^{G_t}, zero where the entering state does not reach t
  v: jax.Array            # [b n h c v]
  w: jax.Array            # [b n h c k]  (I + M_ba)⁻¹ B̂
  u_tilde: jax.Array      # [b n h c v]  (I + M_ba)⁻¹ M_bk V
  a_to_end: jax.Array     # [b n h c k]  a_s e^{G_C − G_s} (the chunk's last document only)
  kv_to_end: jax.Array    # [b n h k v]  Σ_s (k_s e^{G_C − G_s}) v_sᵀ over the same rows
  chunk_decay: jax.Array  # [b n h (k)]  e^{G_C}, zero where a document starts in the chunk
  m_qk: jax.Array         # [b n h t s]  Σ_i q_ti k_si e^{G_ti − G_si}  (s ≤ t, one document)
  m_qa: jax.Array         # [b n h t s]  the same with a_s


def _pair_gain(log_gain_t, log_gain_s, mask, per_key: bool):
  """``e^{L_t − L_s}`` where ``mask [.. t s]`` holds, else 0: ``[b n h t s (d_k)]`` from ``L [b n h c (d_k)]``.
  Masked before ``exp``: where the mask holds every exponent is ≤ 0 (s before t in one document),
  elsewhere it could be positive and overflow."""
  if per_key:
    diff = log_gain_t[..., :, None, :] - log_gain_s[..., None, :, :]  # [b n h t s k]
    return jnp.exp(jnp.where(mask[..., None], diff, _NEG))
  return jnp.exp(jnp.where(mask, log_gain_t[..., :, None] - log_gain_s[..., None, :], _NEG))


def _pair_products(x, y, gain):
  """``M_ts = Σ_i x_ti y_si gain_ts(i)``: ``x, y [b n h c d_k]``, ``gain`` of :func:`_pair_gain` (per key
  channel: a three-factor product-sum; per head: a matmul times the gain)."""
  if gain.ndim == x.ndim + 1:
    return jnp.einsum("...tk,...sk,...tsk->...ts", x, y, gain)
  return jnp.einsum("...tk,...sk->...ts", x, y) * gain


def _precompute(q, k, v, a, b, log_decay, chunk_size: int, segment_ids=None) -> _Chunks:
  batch, time, heads, d_k = q.shape
  n = -(-time // chunk_size)
  # Padding: k = a = b = v = 0 write and read nothing, log-decay 0 keeps the state; padded outputs
  # are dropped (and padded rows start no document: chunk_documents puts them in the last one).
  chunks = lambda x: to_chunks(x, chunk_size)
  q_h, k_h, v_h, a_h, b_h = (chunks(x) for x in (q, k, v, a, b))  # [b n h c d]
  per_key = log_decay is not None and log_decay.ndim == 4
  if log_decay is None:  # (a cumsum of zeros would be constant-folded by XLA, for seconds)
    g = jnp.zeros((batch, n, heads, chunk_size), jnp.float32)
  else:
    g = chunks(log_decay)  # [b n h c (k)]
  row_axis = -2 if per_key else -1
  expand = (lambda m: m[..., None]) if per_key else (lambda m: m)  # [b n 1 c] → against g
  if segment_ids is None:
    starts = doc = None
    same = None
  else:
    starts, doc = chunk_documents(segment_ids, chunk_size)  # [b n 1 c]
    # A start's own log-decay only multiplies the state it discards: dropped, so the cumulative
    # log-decay restarts there and every difference used below spans one document.
    g = jnp.where(expand(starts), 0.0, g)
    same = doc[..., :, None] == doc[..., None, :]  # [b n 1 t s]
  # G_t, inclusive, ≤ 0; restarting at each document start
  log_gain = jnp.cumsum(g, axis=row_axis) if starts is None else segmented_cumsum(g, expand(starts), axis=row_axis)
  # G_{t−1}: the decay between the chunk's (or t's document's) start and the state b_t reads.
  shifted = jnp.concatenate([jnp.zeros_like(jax.lax.slice_in_dim(log_gain, 0, 1, axis=row_axis % g.ndim)),
                             jax.lax.slice_in_dim(log_gain, 0, chunk_size - 1, axis=row_axis % g.ndim)],
                            axis=row_axis)
  log_gain_read = shifted if starts is None else jnp.where(expand(starts), 0.0, shifted)

  t_idx = jnp.arange(chunk_size)
  inclusive = t_idx[:, None] >= t_idx[None, :]
  exclusive = t_idx[:, None] > t_idx[None, :]
  if same is not None:
    inclusive, exclusive = inclusive & same, exclusive & same
  gain_out = _pair_gain(log_gain, log_gain, inclusive, per_key)  # e^{G_t − G_s}, s ≤ t
  gain_read = _pair_gain(log_gain_read, log_gain, exclusive, per_key)  # e^{G_{t−1} − G_s}, s < t
  m_qk, m_qa = _pair_products(q_h, k_h, gain_out), _pair_products(q_h, a_h, gain_out)
  m_bk, m_ba = _pair_products(b_h, k_h, gain_read), _pair_products(b_h, a_h, gain_read)

  gain_in = jnp.exp(log_gain if per_key else log_gain[..., None])  # e^{G_t}, [b n h c (k|1)]
  gain_b = jnp.exp(log_gain_read if per_key else log_gain_read[..., None])  # e^{G_{t−1}}
  to_end_log = jax.lax.slice_in_dim(log_gain, chunk_size - 1, chunk_size, axis=row_axis % g.ndim) - log_gain
  if doc is None:
    to_end = jnp.exp(to_end_log)
    chunk_decay = jnp.exp(jnp.take(log_gain, chunk_size - 1, axis=row_axis))
    b_hat, q_in = b_h * gain_b, q_h * gain_in
  else:
    reaches = (doc == 0)[..., None]  # [b n 1 c 1]: the entering state reaches row t
    in_last = expand(doc == doc[..., -1:])  # rows of the chunk's last document: the only ones it passes on
    to_end = jnp.where(in_last, jnp.exp(jnp.where(in_last, to_end_log, 0.0)), 0.0)
    last_decay = jnp.exp(jnp.take(log_gain, chunk_size - 1, axis=row_axis))
    no_start = doc[..., -1] == 0  # [b n 1]
    chunk_decay = jnp.where(no_start[..., None] if per_key else no_start, last_decay, 0.0)
    b_hat = jnp.where(reaches, b_h * gain_b, 0.0)
    q_in = jnp.where(reaches, q_h * gain_in, 0.0)
  if not per_key:
    to_end = to_end[..., None]
  d_v = v_h.shape[-1]
  # One solve for both right-hand sides: U = Ũ + W S₀ with (I + M_ba) [Ũ | W] = [M_bk V | B̂].
  solved = wy_solve(m_ba, jnp.concatenate([jnp.einsum("...ts,...sv->...tv", m_bk, v_h), b_hat], axis=-1))
  return _Chunks(q_in=q_in, v=v_h, w=solved[..., d_v:], u_tilde=solved[..., :d_v], a_to_end=a_h * to_end,
                 kv_to_end=jnp.einsum("...sk,...sv->...kv", k_h * to_end, v_h), chunk_decay=chunk_decay,
                 m_qk=m_qk, m_qa=m_qa)


def _scan_pass(w, u_tilde, a_to_end, kv_to_end, chunk_decay, state0):
  """The sequential pass over chunks: ``U = Ũ + W S`` (what each row's read key returns from the state
  it meets), ``S_next = e^{G_C} ⊙ S + Σ_s e^{G_C − G_s} ⊙ (k_s v_sᵀ − a_s u_sᵀ)``, as a ``lax.scan``
  (shapes: :class:`_Chunks`; the Pallas version: :func:`kernels.dplr.pallas.state_pass`). Returns the
  state entering each chunk ``[b n h k v]``, ``U [b n h c v]`` and the final state."""

  def carry(state, inputs):
    w_n, u_n, a_n, kv_n, decay_n = inputs
    u = u_n + jnp.einsum("bhck,bhkv->bhcv", w_n, state)
    decay = decay_n[..., None] if decay_n.ndim == 3 else decay_n[..., None, None]
    return decay * state + kv_n - jnp.einsum("bhck,bhcv->bhkv", a_n, u), (state, u)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (w, u_tilde, a_to_end, kv_to_end, chunk_decay))
  final, (entering, u) = jax.lax.scan(carry, state0, xs)
  return jnp.moveaxis(entering, 0, 1), jnp.moveaxis(u, 0, 1), final


def _dplr_chunked(q, k, v, a, b, log_decay, initial_state, chunk_size: int, segment_ids=None,
                  state_pass=_scan_pass, precompute=_precompute):
  """The chunked form; ``state_pass``: the sequential pass over chunks (:func:`_scan_pass` or the
  Pallas kernel of ``kernels.dplr.pallas``, same signature); ``precompute``: the chunk-parallel work
  before it (:func:`_precompute` or the Pallas kernel of ``kernels.dplr.precompute``, same signature)."""
  batch, time, heads, d_k = q.shape
  c = precompute(q, k, v, a, b, log_decay, chunk_size, segment_ids)
  state0 = _state0(initial_state, batch, heads, d_k, v.shape[-1])
  entering, u, final = state_pass(c.w, c.u_tilde, c.a_to_end, c.kv_to_end, c.chunk_decay, state0)
  # o_t = S_tᵀ q_t = (q_t e^{G_t})ᵀ S₀ + Σ_{s≤t} M_qk[t, s] v_s − Σ_{s≤t} M_qa[t, s] u_s
  o = (jnp.einsum("bnhtk,bnhkv->bnhtv", c.q_in, entering) + jnp.einsum("bnhts,bnhsv->bnhtv", c.m_qk, c.v)
       - jnp.einsum("bnhts,bnhsv->bnhtv", c.m_qa, u))
  return rearrange(o, "b n h c v -> b (n c) h v")[:, :time].astype(v.dtype), final
