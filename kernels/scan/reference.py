"""The diagonal scan's definition: a sequential ``lax.scan`` over time in float32 (what the tests
compare every other implementation with), and the argument checks every implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(a: jax.Array, b: jax.Array, h0: jax.Array | None) -> None:
  if a.shape != b.shape:
    raise ValueError(f"linear_scan: a{a.shape} and b{b.shape} must have the same shape")
  if a.ndim < 2:
    raise ValueError(f"linear_scan: expected [batch, time, ...], got shape {a.shape}")
  if h0 is not None and h0.shape != (a.shape[0],) + a.shape[2:]:
    raise ValueError(f"linear_scan: h0{h0.shape} must be [batch, *features] = {(a.shape[0],) + a.shape[2:]}")


def linear_scan_reference(a, b, h0=None, *, reverse: bool = False):
  """The definition: a sequential ``lax.scan`` over time in float32."""
  _check(a, b, h0)
  out_dtype = b.dtype
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  h = jnp.zeros_like(b32[:, 0]) if h0 is None else h0.astype(jnp.float32)

  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  h_last, hs = jax.lax.scan(step, h, (jnp.moveaxis(a32, 1, 0), jnp.moveaxis(b32, 1, 0)), reverse=reverse)
  return jnp.moveaxis(hs, 0, 1).astype(out_dtype), h_last
