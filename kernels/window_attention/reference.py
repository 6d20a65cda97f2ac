"""Causal (sliding-window) attention's dense O(T²) definition (``impl="reference"``), the argument
checks every implementation shares, and one decode step against a key/value cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange

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


def window_attention_reference(q, k, v, *, window: int | None = None, softcap: float | None = None,
                               segment_ids=None):
  """Dense O(T²) definition (float32 softmax).

  ``segment_ids: int [batch, time]`` (optional): packed documents; query ``t`` reads key ``s`` only
  when both hold the same id.
  """
  _check(q, k, v, window)
  time, kv_heads = q.shape[1], k.shape[2]
  qg = rearrange(q, "b t (hk g) d -> b t hk g d", hk=kv_heads).astype(jnp.float32)
  scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  scores = _cap(scores, softcap)
  offset = jnp.arange(time)[:, None] - jnp.arange(time)[None, :]
  allowed = offset >= 0
  if window is not None:
    allowed &= offset < window
  if segment_ids is not None:  # [batch, 1, 1, t, s]
    allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
  probs = jax.nn.softmax(jnp.where(allowed, scores, _MASKED), axis=-1)
  out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
  return rearrange(out, "b t hk g d -> b t (hk g) d").astype(q.dtype)


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
