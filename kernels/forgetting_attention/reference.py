"""Forgetting attention's dense O(T²) definition (``impl="reference"``), the argument checks every
implementation shares, the cumulative log-forget with document restarts, and one decode step
against a key/value cache carrying each slot's accumulated log-forget."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels import documents
from kernels.window_attention import document_index

MASKED = -1e30  # finite: an all-masked padded row gives zeros, and adding log f to it stays ≈ MASKED


def check(q, k, v, log_forget, window, segment_ids) -> None:
  """ValueError naming the argument for shapes or settings no implementation can run."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"forgetting_attention: expected q, k, v [batch, time, heads, head_dim], got q{q.shape} "
                     f"k{k.shape} v{v.shape}")
  if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"forgetting_attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"forgetting_attention: heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]}")
  if log_forget.shape != q.shape[:3]:
    raise ValueError(f"forgetting_attention: log_forget{log_forget.shape} must be [batch, time, heads] = {q.shape[:3]}")
  if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
    raise ValueError(f"forgetting_attention: window must be a positive int or None (global), got {window!r}")
  if segment_ids is not None and (getattr(segment_ids, "shape", None) != q.shape[:2]
                                  or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"forgetting_attention: segment_ids must be an integer array [batch, time] = {q.shape[:2]}; "
                     f"got {getattr(segment_ids, 'dtype', type(segment_ids))}{getattr(segment_ids, 'shape', '')}")


def document_starts(segment_ids):
  """``segment_ids: int [batch, time]`` → bool ``[batch, time]``: True at t = 0 and where the id changes."""
  return documents.starts(segment_ids, first=True)


def cumulative_log_forget(log_forget, segment_ids=None):
  """``c_t = Σ_{l ≤ t} log f_l`` over ``log_forget [batch, time, heads]`` (f32), restarting at every
  document start when ``segment_ids [batch, time]`` is given (then the sum runs over ``t``'s own
  document only). ``c_i − c_j`` for ``j ≤ i`` of one document is the FoX bias ``Σ_{j<l≤i} log f_l``;
  the restart keeps ``|c|`` to one document's length, so the difference loses less to rounding."""
  log_forget = log_forget.astype(jnp.float32)
  if segment_ids is None:
    return jnp.cumsum(log_forget, axis=1)
  return documents.segmented_cumsum(log_forget, document_starts(segment_ids)[..., None], axis=1)


def forgetting_attention_reference(q, k, v, log_forget, *, window: int | None = None, segment_ids=None):
  """Dense definition (float32 scores, bias and softmax).

  ``o_i = Σ_j softmax_j(q_i·k_j/√d + c_i − c_j) v_j`` over keys ``j`` with ``0 ≤ i − j < window``
  (every ``j ≤ i`` when ``window`` is None) of ``i``'s document; ``c`` from :func:`cumulative_log_forget`.
  Shapes as :func:`kernels.forgetting_attention.forgetting_attention`.
  """
  check(q, k, v, log_forget, window, segment_ids)
  time, kv_heads = q.shape[1], k.shape[2]
  c = cumulative_log_forget(log_forget, segment_ids)
  c = rearrange(c, "b t (hk g) -> b hk g t", hk=kv_heads)
  qg = rearrange(q, "b t (hk g) d -> b t hk g d", hk=kv_heads).astype(jnp.float32)
  scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  scores = scores + (c[..., :, None] - c[..., None, :])
  offset = jnp.arange(time)[:, None] - jnp.arange(time)[None, :]
  allowed = offset >= 0
  if window is not None:
    allowed &= offset < window
  if segment_ids is not None:  # [batch, 1, 1, t, s]
    doc = document_index(segment_ids)
    allowed = allowed & (doc[:, :, None] == doc[:, None, :])[:, None, None]
  probs = jax.nn.softmax(jnp.where(allowed, scores, MASKED), axis=-1)
  out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
  return rearrange(out, "b t hk g d -> b t (hk g) d").astype(q.dtype)


def decode_forgetting_attention(q, k_cache, v_cache, log_forget_cache):
  """One query step against a key/value cache.

  Args:
    q: ``[batch, heads, head_dim]``.
    k_cache, v_cache: ``[batch, slots, kv_heads, head_dim]`` (a ring buffer or a growing cache).
    log_forget_cache: f32 ``[batch, slots, heads]``: ``Σ log f`` over the positions after each slot's
      key up to the query's (0 for the query's own key), :data:`MASKED` where a slot holds no key
      the query may read.
  Returns:
    ``[batch, heads, head_dim]`` in ``q.dtype``.
  """
  kv_heads = k_cache.shape[2]
  qg = rearrange(q, "b (hk g) d -> b hk g d", hk=kv_heads).astype(jnp.float32)
  scores = jnp.einsum("bhgd,bshd->bhgs", qg, k_cache.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  scores = scores + rearrange(log_forget_cache.astype(jnp.float32), "b s (hk g) -> b hk g s", hk=kv_heads)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhgs,bshd->bhgd", probs, v_cache.astype(jnp.float32))
  return rearrange(out, "b hk g d -> b (hk g) d").astype(q.dtype)
