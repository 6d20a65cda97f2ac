"""Causal (sliding-window) softmax attention with grouped key/value heads.

``o_t = Σ_{s ∈ band(t)} softmax_s(q_t · k_s / √d) v_s`` where ``band(t) = {s : 0 ≤ t − s < window}``
(``window=None``: every ``s ≤ t``, i.e. global causal attention). GQA/MQA: query head ``h`` reads
key/value head ``h // (heads // kv_heads)``. An optional logit soft-cap ``c·tanh(s/c)`` (Gemma 2).

Shapes: ``q: [batch, time, heads, head_dim]``, ``k, v: [batch, time, kv_heads, head_dim]``.

Implementations:
- ``"reference"``: dense ``[time, time]`` scores with a band mask — the definition, O(T²).
- ``"xla"``: blocked band; query block ``i`` of ``block_size`` rows reads only key blocks
  ``i − ⌈(window−1)/block⌉ … i``, so time and memory are O(T·(W + block)), not O(T²).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange

Impl = Literal["auto", "xla", "reference"]
IMPLS = ("auto", "xla", "reference")
_MASKED = -1e30  # finite so a fully masked padded row gives zeros, not NaN


def _check(q, k, v, window):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"window_attention: expected [batch, time, heads, head_dim], got q{q.shape} k{k.shape} v{v.shape}")
  if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"window_attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"window_attention: heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]}")
  if window is not None and window <= 0:
    raise ValueError(f"window_attention: window must be a positive int or None (global), got {window}")


def _cap(scores, softcap):
  return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def window_attention_reference(q, k, v, *, window: int | None = None, softcap: float | None = None):
  """Dense O(T²) definition (float32 softmax)."""
  _check(q, k, v, window)
  time, kv_heads = q.shape[1], k.shape[2]
  qg = rearrange(q, "b t (hk g) d -> b t hk g d", hk=kv_heads).astype(jnp.float32)
  scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  scores = _cap(scores, softcap)
  offset = jnp.arange(time)[:, None] - jnp.arange(time)[None, :]
  allowed = offset >= 0
  if window is not None:
    allowed &= offset < window
  probs = jax.nn.softmax(jnp.where(allowed, scores, _MASKED), axis=-1)
  out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
  return rearrange(out, "b t hk g d -> b t (hk g) d").astype(q.dtype)


def default_block_size(window: int) -> int:
  # Small windows want blocks about as wide as the window (the band then costs ~2W per row);
  # large ones cap the block so the padded context stays ≈ W + 128.
  return max(1, min(window, 128))


def _banded(q, k, v, window: int, softcap, block: int):
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
  scores = jnp.where(allowed[None, :, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bnhgqk,bnkhd->bnqhgd", probs, v_ctx)
  out = rearrange(out, "b n c hk g d -> b (n c) (hk g) d")[:, :time]
  return out.astype(q.dtype)


def window_attention(q, k, v, *, window: int | None = None, softcap: float | None = None,
                     impl: Impl = "auto", block_size: int | None = None):
  """Causal attention restricted to the last ``window`` positions (``None``: global).

  Args:
    q: ``[batch, time, heads, head_dim]``; k, v: ``[batch, time, kv_heads, head_dim]``.
    window: band width W ≥ 1 (position t reads t−W+1 … t) or None for global causal attention.
    softcap: optional logit soft-cap.
    impl: ``"reference"`` (dense mask), ``"xla"`` (blocked band, O(T·W)) or ``"auto"``.
    block_size: query/key block of the banded path (default: ``min(window, 128)``).
  Returns:
    ``[batch, time, heads, head_dim]`` in ``q.dtype``.
  """
  _check(q, k, v, window)
  if impl not in IMPLS:
    raise ValueError(f"window_attention: unknown impl {impl!r}; valid: {IMPLS}")
  time = q.shape[1]
  if impl == "reference" or window is None or window >= time:
    # Global causal attention has no band to exploit; the dense form is the O(T²) it must be.
    return window_attention_reference(q, k, v, window=window, softcap=softcap)
  return _banded(q, k, v, window, softcap, block_size or default_block_size(window))


def decode_attention(q, k_cache, v_cache, valid, *, softcap: float | None = None):
  """One query step against a key/value cache.

  Args:
    q: ``[batch, heads, head_dim]``.
    k_cache, v_cache: ``[batch, slots, kv_heads, head_dim]`` (a ring buffer or a growing cache).
    valid: ``[batch, slots]`` or ``[slots]`` bool, which slots hold a key the query may read.
  Returns:
    ``[batch, heads, head_dim]`` in ``q.dtype``.
  """
  kv_heads = k_cache.shape[2]
  qg = rearrange(q, "b (hk g) d -> b hk g d", hk=kv_heads).astype(jnp.float32)
  scores = jnp.einsum("bhgd,bshd->bhgs", qg, k_cache.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  scores = _cap(scores, softcap)
  valid = jnp.broadcast_to(valid, (q.shape[0], k_cache.shape[1]))
  probs = jax.nn.softmax(jnp.where(valid[:, None, None, :], scores, _MASKED), axis=-1)
  out = jnp.einsum("bhgs,bshd->bhgd", probs, v_cache.astype(jnp.float32))
  return rearrange(out, "b hk g d -> b (hk g) d").astype(q.dtype)
