"""Gated linear attention in XLA: the chunked form (Yang et al. 2024, §3), with the mLSTM's
stabilised input gate; see ``kernels/gla/__init__.py`` for the derivation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels.gla.reference import _initial

_NEG = -1e30


def _gla_chunked(q, k, v, log_decay, initial_state, chunk_size: int, log_input_gate=None):
  batch, time, heads, d_k = q.shape
  gated = log_input_gate is not None
  scalar = log_decay is not None and log_decay.ndim == 3
  n = -(-time // chunk_size)
  pad = n * chunk_size - time
  # Padding: k = v = 0, log-decay 0 and input gate −∞ leave the state and stabiliser untouched;
  # padded outputs are dropped.
  pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
  chunks = lambda x, fill=0.0: rearrange(jnp.pad(x.astype(jnp.float32), pad4[:x.ndim], constant_values=fill),
                                         "b (n c) ... -> b n c ...", c=chunk_size)
  qc, kc, vc = chunks(q), chunks(k), chunks(v)
  if log_decay is None:
    ld = jnp.zeros((batch, n, chunk_size, heads), jnp.float32)
    scalar = True
  else:
    ld = chunks(log_decay)
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

  if gated:
    ig = chunks(log_input_gate, _NEG)  # [b n c h]
    diff = jnp.where(mask, diff + ig[:, :, None, :, :], _NEG)  # b_t − b_s + ĩ_s
    local = jnp.max(diff, axis=3)  # max_{s≤t}, [b n t h]
    g_last = local[:, :, -1]  # the chunk's own contribution's maximum, [b n h]
    # decay from s to the chunk's end times the input gate, relative to g: exponent ≤ 0
    k_to_end = kc * jnp.exp(b[:, :, -1:] - b + ig - g_last[:, :, None])[..., None]
    chunk_decay = b[:, :, -1]  # log-decay over the whole chunk, [b n h]
  else:
    k_to_end = kc * jnp.exp(b_last - b_full)  # decay from s to the chunk's end, ≤ 1
    chunk_decay = jnp.broadcast_to(jnp.exp(b_last[:, :, 0]), (batch, n, heads, d_k))
  chunk_kv = jnp.einsum("bnshk,bnshv->bnhkv", k_to_end, vc)

  if gated:
    def carry(state, inputs):
      (s, m), (log_a, g, kv) = state, inputs
      m_new = jnp.maximum(log_a + m, g)
      s_new = jnp.exp(log_a + m - m_new)[..., None, None] * s + jnp.exp(g - m_new)[..., None, None] * kv
      return (s_new, m_new), (s, m)  # emit the state entering the chunk

    xs = (chunk_decay, g_last, chunk_kv)
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
    m = jnp.maximum(b + m_in[:, :, None], local)  # the row maxima: stabiliser m_t, [b n c h]
    gain = jnp.exp(jnp.where(mask, diff - m[:, :, :, None, :], _NEG))
    scores = jnp.einsum("bnthk,bnshk->bntsh", qc, kc) * gain
    q_in = qc * jnp.exp(b + m_in[:, :, None] - m)[..., None]
  else:
    s_in = entering
    gain = jnp.exp(jnp.where(mask, diff, _NEG))
    if scalar:
      scores = jnp.einsum("bnthk,bnshk->bntsh", qc, kc) * gain
    else:
      scores = jnp.einsum("bnthk,bnshk,bntshk->bntsh", qc, kc, gain)
    q_in = qc * jnp.exp(b_full)
  o_intra = jnp.einsum("bntsh,bnshv->bnthv", scores, vc)
  o_inter = jnp.einsum("bnthk,bnhkv->bnthv", q_in, s_in)
  o = rearrange(o_intra + o_inter, "b n c h v -> b (n c) h v")[:, :time].astype(v.dtype)
  if gated:
    return o, final, rearrange(m, "b n c h -> b (n c) h")[:, :time]
  return o, final

