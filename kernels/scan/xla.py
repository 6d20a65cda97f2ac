"""The diagonal scan in XLA: a parallel prefix (``lax.associative_scan``) over time, the CPU default."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _linear_scan_associative(a, b, h0=None, *, reverse: bool = False):
  """Parallel prefix over time with the affine-map monoid ``(a1,b1)∘(a2,b2) = (a1 a2, a2 b1 + b2)``."""
  out_dtype = b.dtype
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  if h0 is not None:
    # Folding h0 into the first input keeps the scan itself state-free.
    first = 0 if not reverse else -1
    b32 = b32.at[:, first].add(a32[:, first] * h0.astype(jnp.float32))

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, hs = jax.lax.associative_scan(combine, (a32, b32), axis=1, reverse=reverse)
  h_last = hs[:, 0] if reverse else hs[:, -1]
  return hs.astype(out_dtype), h_last
