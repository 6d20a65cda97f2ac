"""Sliding-window attention in XLA (``impl="xla"``): the blocked band. Query block ``i`` of
``block_size`` rows reads only key blocks ``i − ⌈(window−1)/block⌉ … i``, so time and memory are
O(T·(W + block)), not O(T²)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels.window_attention.reference import _MASKED, _cap


def default_block_size(window: int) -> int:
  # Small windows want blocks about as wide as the window (the band then costs ~2W per row);
  # large ones cap the block so the padded context stays ≈ W + 128.
  return max(1, min(window, 128))


def _banded(q, k, v, window: int, softcap, block: int, segment_ids=None):
  batch, time, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  n_blocks = -(-time // block)
  lookback = -(-(window - 1) // block)  # earlier key blocks a query block can reach
  pad_t = n_blocks * block - time
  qb = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
  qb = rearrange(qb, "b (n c) (hk g) d -> b n c hk g d", c=block, hk=kv_heads).astype(jnp.float32)
  pad_kv = ((0, 0), (lookback * block, pad_t), (0, 0), (0, 0))
  kb = rearrange(jnp.pad(k, pad_kv), "b (n c) h d -> b n c h d", c=block).astype(jnp.float32)
  vb = rearrange(jnp.pad(v, pad_kv), "b (n c) h d -> b n c h d", c=block).astype(jnp.float32)
  # Context of query block i = key blocks i-lookback … i (in padded coordinates: j … j+lookback).
  k_ctx = jnp.concatenate([kb[:, j:j + n_blocks] for j in range(lookback + 1)], axis=2)
  v_ctx = jnp.concatenate([vb[:, j:j + n_blocks] for j in range(lookback + 1)], axis=2)
  scores = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qb, k_ctx) / math.sqrt(head_dim)
  scores = _cap(scores, softcap)
  row = jnp.arange(block)[:, None]
  col = jnp.arange((lookback + 1) * block)[None, :]
  offset = lookback * block + row - col  # query position minus key position
  key_pos = (jnp.arange(n_blocks)[:, None, None] - lookback) * block + col[None]
  allowed = (offset >= 0) & (offset < window)
  allowed = allowed[None] & (key_pos >= 0)  # [n, c, ctx]
  allowed = allowed[None, :, None, None]  # [1, n, 1, 1, c, ctx]
  if segment_ids is not None:  # a query reads keys of its own document only (padding: id -1)
    q_ids = rearrange(jnp.pad(segment_ids, ((0, 0), (0, pad_t)), constant_values=-1), "b (n c) -> b n c", c=block)
    k_ids = rearrange(jnp.pad(segment_ids, ((0, 0), (lookback * block, pad_t)), constant_values=-1),
                      "b (n c) -> b n c", c=block)
    k_ids = jnp.concatenate([k_ids[:, j:j + n_blocks] for j in range(lookback + 1)], axis=2)
    allowed = allowed & (q_ids[:, :, :, None] == k_ids[:, :, None, :])[:, :, None, None]
  scores = jnp.where(allowed, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bnhgqk,bnkhd->bnqhgd", probs, v_ctx)
  out = rearrange(out, "b n c hk g d -> b (n c) (hk g) d")[:, :time]
  return out.astype(q.dtype)

