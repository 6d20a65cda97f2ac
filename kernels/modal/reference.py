"""The modal recurrence's definition: a sequential ``lax.scan`` over time in float32 (what the tests
compare the kernels with), and the argument checks every implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check(u, log_poles, residues, starts) -> None:
  if u.ndim != 3:
    raise ValueError(f"modal_conv: u must be [batch, time, channels], got shape {u.shape}")
  channels = u.shape[2]
  if log_poles.ndim != 2 or log_poles.shape[0] != channels or residues.shape != log_poles.shape:
    raise ValueError(f"modal_conv: log_poles{log_poles.shape} and residues{residues.shape} must both be "
                     f"[channels, modes] with channels = {channels}")
  if starts is not None and starts.shape != u.shape[:2]:
    raise ValueError(f"modal_conv: starts{starts.shape} must be [batch, time] = {u.shape[:2]}")


def modal_conv_reference(u, log_poles, residues, starts=None):
  """``y_t = Re Σ_n R_n s_{t,n}``, ``s_t = λ ⊙ s_{t−1} · (0 if starts_t else 1) + u_t``, ``s_{−1} = 0``.

  Args:
    u: ``[batch, time, channels]`` (computed in float32).
    log_poles, residues: complex ``[channels, modes]`` (``log λ`` and ``R``).
    starts: optional bool ``[batch, time]``, True where a document starts (the state is dropped).
  Returns:
    ``(y float32 [batch, time, channels], s complex64 [batch, channels, modes])``: the output and the
    state after the last step (the last document's alone).
  """
  check(u, log_poles, residues, starts)
  batch, time, channels = u.shape
  poles = jnp.exp(log_poles.astype(jnp.complex64))
  keep = (jnp.ones((batch, time), jnp.float32) if starts is None
          else 1.0 - starts.astype(jnp.float32))

  def step(s, inputs):
    u_t, keep_t = inputs
    s = poles * s * keep_t[:, None, None] + u_t[..., None]
    return s, jnp.real(jnp.sum(residues * s, axis=-1))

  s0 = jnp.zeros((batch, channels, log_poles.shape[1]), jnp.complex64)
  s, ys = jax.lax.scan(step, s0, (jnp.moveaxis(u.astype(jnp.float32), 1, 0), jnp.moveaxis(keep, 1, 0)))
  return jnp.moveaxis(ys, 0, 1), s
