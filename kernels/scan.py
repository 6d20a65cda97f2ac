"""Diagonal linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t``.

Serves every mixer whose state evolves elementwise: RG-LRU (Griffin, De et al. 2024), Mamba's S6
(Gu & Dao 2023, state ``[d, n]``) and S4D (Gu et al. 2022).

Shapes: ``a, b: [batch, time, *features]``; ``h0: [batch, *features]``. Returns ``(h, h_last)`` with
``h: [batch, time, *features]`` and ``h_last: [batch, *features]``. Accumulation is in float32 for
lower-precision inputs; ``h`` is returned in ``b``'s dtype, ``h_last`` in float32 so that a decode
loop carries an unrounded state.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "xla", "reference"]
IMPLS = ("auto", "xla", "reference")


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


def linear_scan(a, b, h0=None, *, reverse: bool = False, impl: Impl = "auto"):
  """``h_t = a_t ⊙ h_{t-1} + b_t`` over axis 1 (``reverse`` runs from the end, as a backward pass needs).

  Args:
    a: decay, ``[batch, time, *features]``.
    b: input, same shape as ``a``.
    h0: optional initial state ``[batch, *features]`` (zeros when None).
    reverse: scan from ``t = T-1`` down to 0; ``h_last`` is then the state at ``t = 0``.
    impl: ``"reference"`` (sequential), ``"xla"`` (associative scan) or ``"auto"``.
  Returns:
    ``(h [batch, time, *features] in b.dtype, h_last [batch, *features] in float32)``.
  """
  _check(a, b, h0)
  if impl not in IMPLS:
    raise ValueError(f"linear_scan: unknown impl {impl!r}; valid: {IMPLS}")
  if impl == "reference":
    return linear_scan_reference(a, b, h0, reverse=reverse)
  return _linear_scan_associative(a, b, h0, reverse=reverse)
