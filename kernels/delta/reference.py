"""The delta rule's definition, token by token in float32 (``impl="reference"``), the one recurrent
step the decoders run, and the argument checks every implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import documents


def _check(q, k, v, beta, log_decay, initial_state, segment_ids=None):
  if q.ndim != 4 or q.shape != k.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"delta_rule: expected q, k [batch, time, heads, d_k] and v [batch, time, heads, d_v]; "
                     f"got q{q.shape} k{k.shape} v{v.shape}")
  if beta.shape != q.shape[:3]:
    raise ValueError(f"delta_rule: beta{beta.shape} must be [batch, time, heads] = {q.shape[:3]}")
  if log_decay is not None and log_decay.shape != q.shape[:3]:
    raise ValueError(f"delta_rule: log_decay{log_decay.shape} must be [batch, time, heads] = {q.shape[:3]} "
                     "(one scalar per head) or None")
  want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  if initial_state is not None and initial_state.shape != want:
    raise ValueError(f"delta_rule: initial_state{initial_state.shape} must be [batch, heads, d_k, d_v] = {want}")
  if segment_ids is not None and (getattr(segment_ids, "shape", None) != q.shape[:2]
                                  or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"delta_rule: segment_ids must be None or integer [batch, time] = {q.shape[:2]}; got "
                     f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}"
                     f"{tuple(getattr(segment_ids, 'shape', ()))}")


def state_resets(segment_ids):
  """``segment_ids: int [batch, time]`` → bool ``[batch, time]``, True where a document starts inside the
  row (the id changes from t − 1 to t): the state entering t is zero there. Unlike the mixers' document
  starts, position 0 is not one: ``initial_state`` flows into the row's first document."""
  return documents.starts(segment_ids, first=False)


def _state0(initial_state, batch, heads, d_k, d_v):
  if initial_state is None:
    return jnp.zeros((batch, heads, d_k, d_v), jnp.float32)
  return initial_state.astype(jnp.float32)


def delta_rule_reference(q, k, v, beta, log_decay=None, initial_state=None, segment_ids=None):
  """The recurrence, token by token, in float32. ``segment_ids`` (int ``[batch, time]`` or None): where
  the id changes between t − 1 and t the state entering t is zero (a new document)."""
  _check(q, k, v, beta, log_decay, initial_state, segment_ids)
  batch, time, heads, d_k = q.shape
  state = _state0(initial_state, batch, heads, d_k, v.shape[-1])
  ld = jnp.zeros(q.shape[:3], jnp.float32) if log_decay is None else log_decay

  def step(state, inputs):
    q_t, k_t, v_t, b_t, ld_t, *start_t = inputs
    if start_t:
      state = jnp.where(start_t[0][:, None, None, None], 0.0, state)
    o_t, state = delta_rule_step(q_t, k_t, v_t, b_t, ld_t, state)
    return state, o_t

  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, beta, ld))
  if segment_ids is not None:
    xs += (jnp.moveaxis(state_resets(segment_ids), 1, 0),)
  final, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final


def delta_rule_step(q_t, k_t, v_t, beta_t, log_decay_t, state):
  """One recurrent step: ``q_t, k_t: [batch, heads, d_k]``, ``v_t: [batch, heads, d_v]``,
  ``beta_t: [batch, heads]``, ``log_decay_t: [batch, heads] | None``, ``state: f32 [batch, heads, d_k, d_v]``.
  Returns ``(o_t [batch, heads, d_v] f32, state)``."""
  state = state.astype(jnp.float32)
  k_t, v_t = k_t.astype(jnp.float32), v_t.astype(jnp.float32)
  if log_decay_t is not None:
    state = jnp.exp(log_decay_t.astype(jnp.float32))[..., None, None] * state
  # The delta: what the (decayed) memory currently returns for k_t, replaced by v_t at rate β_t.
  error = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, state)
  state = state + (beta_t.astype(jnp.float32)[..., None] * k_t)[..., :, None] * error[..., None, :]
  return jnp.einsum("bhk,bhkv->bhv", q_t.astype(jnp.float32), state), state
