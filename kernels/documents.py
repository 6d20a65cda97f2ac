"""Packed documents as the kernels see them: ``segment_ids: int [batch, time]``, a new document wherever
the id changes from one position to the next (an id that recurs after another names a new document)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def starts(segment_ids, *, first: bool):
  """bool ``[batch, time]``: True where the id changes from t − 1 to t; at t = 0, ``first`` (False where
  an ``initial_state`` flows into the row's first document, True where a row starts fresh)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  # (not full_like(change[:, :1]): with one position, change has no column to copy the shape of)
  return jnp.concatenate([jnp.full((segment_ids.shape[0], 1), first, bool), change], axis=1)


def document_index(segment_ids):
  """int32 ``[batch, time]``: each position's document, counted from 0 along the row."""
  return jnp.cumsum(starts(segment_ids, first=False).astype(jnp.int32), axis=1)


def segmented_scan(add, values, starts, *, axis: int, reverse: bool = False):
  """Inclusive scan of ``values`` (an array or a pytree of arrays) under the associative ``add`` along
  ``axis``, restarting at every ``starts`` (bool, the leaves' shape): a start discards what came before
  it, so a later document's partial sums are not differences of one long sum (whose size, after strong
  decays, would cost them their precision). ``reverse``: from the end, ``starts`` then marking each
  document's last position."""
  def combine(earlier, later):
    (value_a, start_a), (value_b, start_b) = earlier, later
    summed = add(value_a, value_b)
    return jax.tree.map(lambda b, s: jnp.where(start_b, b, s), value_b, summed), start_a | start_b

  return jax.lax.associative_scan(combine, (values, starts), axis=axis, reverse=reverse)[0]


def segmented_cumsum(x, starts, *, axis: int):
  """Cumulative sum of ``x`` along ``axis``, restarting at every ``starts`` (bool, broadcast against
  ``x``): :func:`segmented_scan` of ``+``."""
  return segmented_scan(jnp.add, x, jnp.broadcast_to(starts, x.shape), axis=axis % x.ndim)
