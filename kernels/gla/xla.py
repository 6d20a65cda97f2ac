"""Gated linear attention in XLA: the chunked form (Yang et al. 2024, §3), with the mLSTM's
stabilised input gate and document boundaries; see ``kernels/gla/__init__.py`` for the derivation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels.gla.reference import _document_starts, _initial

_NEG = -1e30


def _gla_chunked(q, k, v, log_decay, initial_state, chunk_size: int, log_input_gate=None, segment_ids=None):
  batch, time, heads, d_k = q.shape
  gated = log_input_gate is not None
  scalar = log_decay is not None and log_decay.ndim == 3
  n = -(-time // chunk_size)
  pad = n * chunk_size - time
  # Padding: k = v = 0, log-decay 0 and input gate −∞ leave the state and stabiliser untouched;
  # padded outputs are dropped (and padded tokens start no document).
  pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
  chunks = lambda x, fill=0.0: rearrange(jnp.pad(x.astype(jnp.float32), pad4[:x.ndim], constant_values=fill),
                                         "b (n c) ... -> b n c ...", c=chunk_size)
  qc, kc, vc = chunks(q), chunks(k), chunks(v)
  if log_decay is None:
    ld = jnp.zeros((batch, n, chunk_size, heads), jnp.float32)
    scalar = True
  else:
    ld = chunks(log_decay)
  segmented = segment_ids is not None
  if segmented:
    # ℓ_t: document starts in the chunk up to t (inclusive), [b n c]. Within a chunk s and t are in one
    # document iff ℓ_s = ℓ_t; the state entering the chunk reaches t iff ℓ_t = 0; token s reaches the
    # chunk's last state iff ℓ_s = ℓ_last. A start token's own log-decay only multiplies the discarded
    # state: it is set to 0 (no −∞ in the cumulative sums, no gradient), and the masks keep every
    # b_t − b_s used within one document (each exponent stays ≤ 0).
    starts = chunks(_document_starts(segment_ids))  # [b n c] f32 0/1
    ell = jnp.cumsum(starts, axis=2)
    start_ld = ld
    ld = jnp.where((starts > 0)[..., None] if ld.ndim == 4 else (starts > 0)[..., None, None], 0.0, ld)
  b = jnp.cumsum(ld, axis=2)  # within-chunk cumulative log-decay, [b n c h (k)]
  causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
  b_full = b[..., None] if scalar else b  # [b n c h k]
  b_last = b_full[:, :, -1:]  # [b n 1 h k]

  if scalar:
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # b_t − b_s, [b n t s h]
    mask = causal[None, None, :, :, None]
  else:
    diff = b[:, :, :, None] - b[:, :, None]  # [b n t s h k]
    mask = causal[None, None, :, :, None, None]
  if segmented:
    same = ell[:, :, :, None] == ell[:, :, None, :]  # [b n t s]
    mask = mask & (same[..., None] if scalar else same[..., None, None])
    reach = (ell == 0)[..., None]  # [b n c 1]: the entering state reaches t
    tail = (ell == ell[:, :, -1:])[..., None]  # [b n c 1]: s reaches the chunk's last state
    keep = ell[:, :, -1] == 0  # [b n]: no start in the chunk

  if gated:
    ig = chunks(log_input_gate, _NEG)  # [b n c h]
    # The stabiliser's candidates: b_t − b_s + ĩ_s over s ≤ t in t's document, and the carried
    # b_t + m_in while t is in the chunk's first document. A document starting at p inside the row
    # enters with (S, m) = (0, 0), so its carried candidate is b_t − b_p + log α_p: one more candidate
    # at s = p, folded into a stabiliser-only gate ĩ'_p = max(ĩ_p, log α_p).
    if segmented:
      ig_m = jnp.where(starts[..., None] > 0, jnp.maximum(ig, start_ld), ig)
      diff_m = jnp.where(mask, diff + ig_m[:, :, None, :, :], _NEG)
    diff = jnp.where(mask, diff + ig[:, :, None, :, :], _NEG)  # b_t − b_s + ĩ_s
    if not segmented:
      diff_m = diff
    local = jnp.max(diff_m, axis=3)  # max_{s≤t}, [b n t h]
    g_last = local[:, :, -1]  # the chunk's own contribution's maximum (its last document's), [b n h]
    # decay from s to the chunk's end times the input gate, relative to g: exponent ≤ 0
    to_end = b[:, :, -1:] - b + ig - g_last[:, :, None]
    if segmented:
      to_end = jnp.where(tail, to_end, _NEG)
    k_to_end = kc * jnp.exp(to_end)[..., None]
    chunk_decay = b[:, :, -1]  # log-decay over the whole chunk, [b n h]
  else:
    k_to_end = kc * jnp.exp(b_last - b_full)  # decay from s to the chunk's end, ≤ 1
    if segmented:
      k_to_end = jnp.where(tail[..., None], k_to_end, 0.0)
    chunk_decay = jnp.broadcast_to(jnp.exp(b_last[:, :, 0]), (batch, n, heads, d_k))
    if segmented:
      chunk_decay = jnp.where(keep[:, :, None, None], chunk_decay, 0.0)
  chunk_kv = jnp.einsum("bnshk,bnshv->bnhkv", k_to_end, vc)

  if gated:
    def carry(state, inputs):
      (s, m), (log_a, g, kv) = state, inputs[:3]
      if not segmented:
        m_new = jnp.maximum(log_a + m, g)
        s_new = jnp.exp(log_a + m - m_new)[..., None, None] * s + jnp.exp(g - m_new)[..., None, None] * kv
        return (s_new, m_new), (s, m)  # emit the state entering the chunk
      # A chunk with a start keeps nothing of the entering pair: its last document entered with
      # (0, 0), which g already counts (ĩ').
      kept = inputs[3][:, None]  # [b 1]
      m_new = jnp.where(kept, jnp.maximum(log_a + m, g), g)
      decay = jnp.where(kept, jnp.exp(jnp.where(kept, log_a + m - m_new, 0.0)), 0.0)
      s_new = decay[..., None, None] * s + jnp.exp(g - m_new)[..., None, None] * kv
      return (s_new, m_new), (s, m)

    xs = (chunk_decay, g_last, chunk_kv) + ((keep,) if segmented else ())
  else:
    def carry(state, inputs):
      decay, kv = inputs
      return decay[..., None] * state + kv, state

    xs = (chunk_decay, chunk_kv)
  state0 = _initial(q, v, initial_state, gated)
  final, entering = jax.lax.scan(carry, state0, tuple(jnp.moveaxis(x, 1, 0) for x in xs))
  entering = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), entering)

  if gated:
    s_in, m_in = entering  # [b n h k v], [b n h]
    if segmented:  # the carried candidate only while t is in the chunk's first document
      carried = jnp.where(reach, b + m_in[:, :, None], _NEG)  # [b n c h]
      m = jnp.maximum(carried, local)  # the row maxima: stabiliser m_t, [b n c h]
    else:
      m = jnp.maximum(b + m_in[:, :, None], local)
    gain = jnp.exp(jnp.where(mask, diff - m[:, :, :, None, :], _NEG))
    scores = jnp.einsum("bnthk,bnshk->bntsh", qc, kc) * gain
    if segmented:
      q_in = qc * jnp.exp(jnp.where(reach, carried - m, _NEG))[..., None]
    else:
      q_in = qc * jnp.exp(b + m_in[:, :, None] - m)[..., None]
  else:
    s_in = entering
    gain = jnp.exp(jnp.where(mask, diff, _NEG))
    if scalar:
      scores = jnp.einsum("bnthk,bnshk->bntsh", qc, kc) * gain
    else:
      scores = jnp.einsum("bnthk,bnshk,bntshk->bntsh", qc, kc, gain)
    q_in = qc * jnp.exp(b_full)
    if segmented:
      q_in = jnp.where(reach[..., None], q_in, 0.0)
  o_intra = jnp.einsum("bntsh,bnshv->bnthv", scores, vc)
  o_inter = jnp.einsum("bnthk,bnhkv->bnthv", q_in, s_in)
  o = rearrange(o_intra + o_inter, "b n c h v -> b (n c) h v")[:, :time].astype(v.dtype)
  if gated:
    return o, final, rearrange(m, "b n c h -> b (n c) h")[:, :time]
  return o, final
