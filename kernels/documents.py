"""Packed documents as the kernels see them: ``segment_ids: int [batch, time]``, a new document wherever
the id changes from one position to the next (an id that recurs after another names a new document)."""

from __future__ import annotations

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
