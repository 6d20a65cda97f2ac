"""Windowed forgetting attention in XLA (``impl="xla"``): the blocked band of
``kernels.window_attention.xla`` plus the forget-gate bias. Query block ``n`` of ``block`` rows reads
key blocks ``n − lookback … n`` (``lookback = ⌈(window − 1)/block⌉``): time and memory O(T·(W + block)).

The bias ``Σ_{j<l≤i} log f_l`` of a pair is formed from block-local sums, never from a cumulative sum
over the whole row: with ``L`` the inclusive cumulative log-forget inside each block and ``tot_p``
block ``p``'s total, a query ``i`` of block ``Q`` and a key ``j`` of block ``K ≤ Q`` get

    bias_ij = L_i − L_j + Σ_{K ≤ p < Q} tot_p

so every term sums at most ``(lookback + 1)·block`` gates: its rounding does not grow with the
position in the row (a row-long cumulative sum reaches ``|c| ~ T·|log f|``, and ``c_i − c_j`` then
loses ``|c|·ε`` to cancellation). Every term is a sum of ``log f ≤ 0``, so the bias is ≤ 0 up to
the rounding of ``L_i − L_j``; the softmax subtracts each row's maximum after adding it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels.forgetting_attention.reference import MASKED


def _context(blocks, n_blocks: int, lookback: int):
  """``[batch, n_blocks + lookback, block, ...]`` (front-padded by ``lookback`` blocks) → the context
  of each query block, key blocks ``n − lookback … n`` side by side:
  ``[batch, n_blocks, (lookback + 1)·block, ...]``."""
  return jnp.concatenate([blocks[:, j:j + n_blocks] for j in range(lookback + 1)], axis=2)


def banded(q, k, v, log_forget, window: int, block: int, segment_ids=None):
  """The blocked band; arguments as :func:`kernels.forgetting_attention.forgetting_attention`,
  ``segment_ids`` already renumbered by ``document_index`` (or None)."""
  time, head_dim = q.shape[1], q.shape[3]
  kv_heads = k.shape[2]
  n_blocks = -(-time // block)
  lookback = -(-(window - 1) // block)  # earlier key blocks a query block can reach
  pad_t = n_blocks * block - time
  pad_front = ((0, 0), (lookback * block, pad_t), (0, 0), (0, 0))
  qb = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  qb = rearrange(qb, "b (n c) (hk g) d -> b n c hk g d", c=block, hk=kv_heads).astype(jnp.float32)
  to_blocks = lambda x: rearrange(jnp.pad(x, pad_front).astype(jnp.float32), "b (n c) h d -> b n c h d", c=block)
  k_ctx = _context(to_blocks(k), n_blocks, lookback)
  v_ctx = _context(to_blocks(v), n_blocks, lookback)
  scores = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qb, k_ctx) / math.sqrt(head_dim)

  # The bias from block-local sums (module docstring); padding carries log f = 0 and is masked.
  lf = jnp.pad(log_forget.astype(jnp.float32), ((0, 0), (lookback * block, pad_t), (0, 0)))
  local = jnp.cumsum(rearrange(lf, "b (n c) h -> b n c h", c=block), axis=2)  # L, [b, n + lookback, c, h]
  total = local[:, :, -1]  # tot_p, [b, n + lookback, h]
  # between[j]: Σ tot_p over key block n − lookback + j up to the query block n (exclusive).
  between = [jnp.zeros_like(total[:, :n_blocks])]
  for j in range(lookback - 1, -1, -1):
    between.insert(0, between[0] + total[:, j:j + n_blocks])
  key_offset = jnp.concatenate([jnp.broadcast_to(s[:, :, None], (s.shape[0], n_blocks, block, s.shape[-1]))
                                for s in between], axis=2)  # [b, n, ctx, h]
  key_local = _context(local, n_blocks, lookback)  # L_j, [b, n, ctx, h]
  query_local = local[:, lookback:]  # L_i, [b, n, c, h]
  bias = query_local[:, :, :, None] - key_local[:, :, None] + key_offset[:, :, None]  # [b, n, c, ctx, h]
  scores = scores + rearrange(bias, "b n q k (hk g) -> b n hk g q k", hk=kv_heads)

  row = jnp.arange(block)[:, None]
  col = jnp.arange((lookback + 1) * block)[None, :]
  offset = lookback * block + row - col  # query position minus key position
  key_pos = (jnp.arange(n_blocks)[:, None, None] - lookback) * block + col[None]
  allowed = ((offset >= 0) & (offset < window))[None] & (key_pos >= 0)  # [n, c, ctx]
  allowed = allowed[None, :, None, None]  # [1, n, 1, 1, c, ctx]
  if segment_ids is not None:  # a query reads keys of its own document only (padding: id -1)
    q_ids = rearrange(jnp.pad(segment_ids, ((0, 0), (0, pad_t)), constant_values=-1), "b (n c) -> b n c", c=block)
    k_ids = rearrange(jnp.pad(segment_ids, ((0, 0), (lookback * block, pad_t)), constant_values=-1),
                      "b (n c) -> b n c", c=block)
    k_ids = _context(k_ids, n_blocks, lookback)
    allowed = allowed & (q_ids[:, :, :, None] == k_ids[:, :, None, :])[:, :, None, None]
  probs = jax.nn.softmax(jnp.where(allowed, scores, MASKED), axis=-1)
  out = jnp.einsum("bnhgqk,bnkhd->bnqhgd", probs, v_ctx)
  return rearrange(out, "b n c hk g d -> b (n c) (hk g) d")[:, :time].astype(q.dtype)
