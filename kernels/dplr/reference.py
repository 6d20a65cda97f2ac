"""The generalized delta rule's definition, token by token in float32 (``impl="reference"``), the one
recurrent step the decoders run, and the argument checks every implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.delta.reference import _state0, state_resets  # the same document starts and zero state


def _check(q, k, v, a, b, log_decay, initial_state, segment_ids=None):
  if q.ndim != 4 or k.shape != q.shape or a.shape != q.shape or b.shape != q.shape:
    raise ValueError(f"dplr: expected q, k, a, b [batch, time, heads, d_k] alike; got q{q.shape} k{k.shape} "
                     f"a{a.shape} b{b.shape}")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"dplr: v{v.shape} must be [batch, time, heads, d_v] with [batch, time, heads] = {q.shape[:3]}")
  if log_decay is not None and log_decay.shape not in (q.shape, q.shape[:3]):
    raise ValueError(f"dplr: log_decay{log_decay.shape} must be {q.shape} (per key channel), {q.shape[:3]} "
                     "(one scalar per head) or None (no decay)")
  want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  if initial_state is not None and getattr(initial_state, "shape", None) != want:
    raise ValueError(f"dplr: initial_state{getattr(initial_state, 'shape', type(initial_state))} must be "
                     f"[batch, heads, d_k, d_v] = {want}")
  if segment_ids is not None and (getattr(segment_ids, "shape", None) != q.shape[:2]
                                  or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"dplr: segment_ids must be None or integer [batch, time] = {q.shape[:2]}; got "
                     f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}"
                     f"{tuple(getattr(segment_ids, 'shape', ()))}")


def dplr_reference(q, k, v, a, b, log_decay=None, initial_state=None, segment_ids=None):
  """``S_t = (Diag(e^{log_decay_t}) − a_t b_tᵀ) S_{t−1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t``, token by token in
  float32 (shapes: :func:`kernels.dplr.dplr`). ``segment_ids`` (int ``[batch, time]`` or None): where the
  id changes between t − 1 and t the state entering t is zero (a new document)."""
  _check(q, k, v, a, b, log_decay, initial_state, segment_ids)
  batch, _, heads, d_k = q.shape
  state = _state0(initial_state, batch, heads, d_k, v.shape[-1])
  ld = jnp.zeros(q.shape[:3], jnp.float32) if log_decay is None else log_decay

  def step(state, inputs):
    q_t, k_t, v_t, a_t, b_t, ld_t, *start_t = inputs
    if start_t:
      state = jnp.where(start_t[0][:, None, None, None], 0.0, state)
    o_t, state = dplr_step(q_t, k_t, v_t, a_t, b_t, ld_t, state)
    return state, o_t

  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, a, b, ld))
  if segment_ids is not None:
    xs += (jnp.moveaxis(state_resets(segment_ids), 1, 0),)
  final, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final


def dplr_step(q_t, k_t, v_t, a_t, b_t, log_decay_t, state):
  """One recurrent step: ``q_t, k_t, a_t, b_t: [batch, heads, d_k]``, ``v_t: [batch, heads, d_v]``,
  ``log_decay_t: [batch, heads, d_k] | [batch, heads] | None``, ``state: f32 [batch, heads, d_k, d_v]``.
  Returns ``(o_t [batch, heads, d_v] f32, state)``."""
  f32 = lambda x: x.astype(jnp.float32)
  state = f32(state)
  # What the old state returns for the read key b_t: removed along a_t (before the decay's product,
  # which multiplies the old state too, since the transition is Diag(α) − a bᵀ applied to S_{t−1}).
  read = jnp.einsum("bhk,bhkv->bhv", f32(b_t), state)
  if log_decay_t is not None:
    decay = jnp.exp(f32(log_decay_t))
    # [batch, heads, d_k]: per key channel (a row of the state each); [batch, heads]: per head.
    state = (decay[..., None] if decay.ndim == 3 else decay[..., None, None]) * state
  state = state - f32(a_t)[..., :, None] * read[..., None, :] + f32(k_t)[..., :, None] * f32(v_t)[..., None, :]
  return jnp.einsum("bhk,bhkv->bhv", f32(q_t), state), state
