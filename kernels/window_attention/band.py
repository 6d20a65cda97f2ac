"""Which key blocks a query block reads (and the reverse), narrowed to packed documents, and the loops
over them: the band arithmetic every flash-attention lowering shares (Triton, Mosaic TPU, Mosaic GPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _i32(x: int):
  return jnp.int32(x)


def _div(x, d: int):
  """Floor division of a non-negative traced int32 (``lax.div`` truncates; ``//`` adds a sign fix-up)."""
  return jax.lax.div(x, _i32(d))


def _band(shape, q_start, k_start, window: int, *, keys_first: bool = False):
  """Which (query, key) pairs of a tile are in the band ``0 ≤ t − s < window``."""
  q_axis, k_axis = (1, 0) if keys_first else (0, 1)
  offset = (q_start + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)) - \
           (k_start + jax.lax.broadcasted_iota(jnp.int32, shape, k_axis))
  return (offset >= 0) & (offset < window)


def _key_blocks(q_start, bq: int, bk: int, window: int):
  """Key blocks a query block ``[q_start, q_start + bq)`` reads: ``[lo, hi)``, of which
  ``[full_lo, full_hi)`` lie inside the band for every row (no mask needed)."""
  lo = _div(jnp.maximum(q_start - (window - 1), 0), bk)
  hi = _div(q_start + (bq - 1), bk) + 1
  full_lo = jnp.clip(_div(jnp.maximum(q_start + (bq - window), 0) + (bk - 1), bk), lo, hi)
  full_hi = jnp.clip(_div(q_start + 1, bk), full_lo, hi)
  return lo, full_lo, full_hi, hi


def _query_blocks(k_start, bq: int, bk: int, window: int, n_q_blocks: int):
  """Query blocks that read key block ``[k_start, k_start + bk)``: ``[lo, hi)``, unmasked ``[full_lo, full_hi)``."""
  lo = _div(k_start, bq)
  hi = jnp.minimum(_div(k_start + (bk - 1) + (window - 1), bq) + 1, n_q_blocks)
  full_lo = jnp.clip(_div(k_start + (bk - 1) + (bq - 1), bq), lo, hi)
  full_hi = jnp.clip(_div(k_start + window, bq), full_lo, hi)
  return lo, full_lo, full_hi, hi


def _document_key_blocks(bounds, first_start, last_start, bk: int):
  """``_key_blocks``' ``(lo, full_lo, full_hi, hi)`` narrowed to the query block's documents (its
  rows' ``doc_start`` span ``[first_start, last_start]``; starts never decrease along a row, so these
  are its first and last row's): no block wholly before ``first_start``, and the unmasked interior
  only where every key is at or past ``last_start``. Each row reaches a contiguous run of keys ending
  at itself, so ``[lo, hi)`` is exactly the blocks that hold a pair of one document in the band."""
  lo, full_lo, full_hi, hi = bounds
  lo = jnp.maximum(lo, _div(first_start, bk))
  full_lo = jnp.clip(jnp.maximum(full_lo, _div(last_start + (bk - 1), bk)), lo, hi)
  return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def _document_query_blocks(bounds, first_end, last_end, bq: int):
  """``_query_blocks``' bounds narrowed to the key block's documents (its rows' ``doc_end`` span
  ``[first_end, last_end]``, its first and last row's): no query block wholly at or past
  ``last_end``, and the unmasked interior only where every query is before ``first_end``. As for
  :func:`_document_key_blocks`, ``[lo, hi)`` is exactly the blocks that hold a pair."""
  lo, full_lo, full_hi, hi = bounds
  hi = jnp.minimum(hi, _div(last_end + (bq - 1), bq))
  full_lo = jnp.clip(full_lo, lo, hi)
  return lo, full_lo, jnp.clip(jnp.minimum(full_hi, _div(first_end, bq)), full_lo, hi), hi


def _band_loops(bounds, step, carry, split: bool):
  """Run ``step(j, carry, masked)`` over the band: masked edge, unmasked interior, masked edge
  (``split``), or one loop that masks every block (one software-pipeline fill instead of three)."""
  lo, full_lo, full_hi, hi = bounds
  if not split:
    return jax.lax.fori_loop(lo, hi, functools.partial(step, masked=True), carry)
  for start, stop, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
    carry = jax.lax.fori_loop(start, stop, functools.partial(step, masked=masked), carry)
  return carry

