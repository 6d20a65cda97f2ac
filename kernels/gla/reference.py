"""Gated linear attention's definition, token by token in float32 (``impl="reference"``), the one
recurrent step the decoders run, and the argument checks every implementation shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import documents



def _check(q, k, v, log_decay, initial_state, log_input_gate=None, segment_ids=None):
  if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"gla: expected q, k [batch, time, heads, d_k] and v [batch, time, heads, d_v]; "
                     f"got q{q.shape} k{k.shape} v{v.shape}")
  if segment_ids is not None and (getattr(segment_ids, "shape", None) != q.shape[:2]
                                  or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"gla: segment_ids must be an integer array [batch, time] = {q.shape[:2]}; got "
                     f"{getattr(segment_ids, 'dtype', type(segment_ids))}{getattr(segment_ids, 'shape', '')}")
  if log_decay is not None and log_decay.shape not in (q.shape, q.shape[:3]):
    raise ValueError(f"gla: log_decay{log_decay.shape} must be {q.shape} (per key dim) or {q.shape[:3]} (per head)")
  want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  if log_input_gate is None:
    if initial_state is not None and getattr(initial_state, "shape", None) != want:
      raise ValueError(f"gla: initial_state{getattr(initial_state, 'shape', type(initial_state))} must be "
                       f"[batch, heads, d_k, d_v] = {want}")
    return
  if log_input_gate.shape != q.shape[:3]:
    raise ValueError(f"gla: log_input_gate{log_input_gate.shape} must be [batch, time, heads] = {q.shape[:3]}")
  if log_decay is not None and log_decay.ndim != 3:
    raise ValueError("gla: log_input_gate needs a per-head log_decay [batch, time, heads] (or None): the "
                     "stabiliser is one scalar per head")
  if initial_state is not None:
    if (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2
        or initial_state[0].shape != want or initial_state[1].shape != want[:2]):
      raise ValueError(f"gla: with log_input_gate, initial_state must be (S {want}, m {want[:2]})")


def _document_starts(segment_ids):
  """``segment_ids: int [batch, time]`` → bool ``[batch, time]``, True where the id changes from t − 1 to t.
  Position 0 is never a start here: ``initial_state`` flows into the row's first document."""
  return documents.starts(segment_ids, first=False)


def _full_decay(log_decay, q):
  """Per-key-dim log-decay ``[batch, time, heads, d_k]`` f32 (zeros for None)."""
  if log_decay is None:
    return jnp.zeros(q.shape, jnp.float32)
  log_decay = log_decay.astype(jnp.float32)
  return jnp.broadcast_to(log_decay[..., None], q.shape) if log_decay.ndim == 3 else log_decay


def _initial(q, v, initial_state, gated):
  """``initial_state`` in f32 (zeros, and m = 0, for None)."""
  batch, _, heads, d_k = q.shape
  if initial_state is None:
    s = jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)
    return (s, jnp.zeros((batch, heads), jnp.float32)) if gated else s
  if gated:
    return initial_state[0].astype(jnp.float32), initial_state[1].astype(jnp.float32)
  return initial_state.astype(jnp.float32)


def gla_reference(q, k, v, log_decay=None, initial_state=None, *, log_input_gate=None, segment_ids=None):
  """The recurrence, token by token, in float32 (see :func:`gla` for arguments and returns).

  At a document start (``segment_ids``) the state entering the token is zero: α_t = 0; with the input
  gate the pair entering it is (S, m) = (0, 0), what a row that begins there gets by default."""
  _check(q, k, v, log_decay, initial_state, log_input_gate, segment_ids)
  state = _initial(q, v, initial_state, log_input_gate is not None)
  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v))
  starts = None if segment_ids is None else _document_starts(segment_ids)
  if log_input_gate is None:
    decay = jnp.exp(_full_decay(log_decay, q))
    if starts is not None:
      decay = jnp.where(starts[:, :, None, None], 0.0, decay)
    decay = jnp.moveaxis(decay, 1, 0)

    def step(state, inputs):
      q_t, k_t, v_t, a_t = inputs
      state = a_t[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
      return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    final, o = jax.lax.scan(step, state, xs + (decay,))
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), final

  ld = jnp.zeros(q.shape[:3], jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  gates = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (ld, log_input_gate))

  def gated_step(carry, inputs):
    q_t, k_t, v_t, a_t, i_t = inputs[:5]
    if starts is not None:
      start = inputs[5][:, None]  # [batch, 1]
      carry = (jnp.where(start[..., None, None], 0.0, carry[0]), jnp.where(start, 0.0, carry[1]))
    o_t, carry = gla_step(q_t, k_t, v_t, a_t, carry, log_input_gate_t=i_t)
    return carry, (o_t, carry[1])

  final, (o, m) = jax.lax.scan(gated_step, state, xs + gates + (() if starts is None else (starts.T,)))
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final, jnp.moveaxis(m, 0, 1)


def gla_step(q_t, k_t, v_t, log_decay_t, state, *, log_input_gate_t=None):
  """One recurrent step: ``q_t, k_t: [batch, heads, d_k]``, ``v_t: [batch, heads, d_v]``,
  ``log_decay_t: [batch, heads, d_k] | [batch, heads] | None``, ``state: f32 [batch, heads, d_k, d_v]``.
  Returns ``(o_t [batch, heads, d_v] f32, state)``.

  With ``log_input_gate_t: [batch, heads]`` (ĩ_t) the state is the pair ``(S, m)`` (``m: [batch, heads]``)
  and the step is the stabilised update of the module docstring; the new ``m_t`` is ``state[1]``."""
  q_t, k_t, v_t = (x.astype(jnp.float32) for x in (q_t, k_t, v_t))
  kv = k_t[..., :, None] * v_t[..., None, :]
  if log_input_gate_t is None:
    state = state.astype(jnp.float32)
    if log_decay_t is not None:
      a = jnp.exp(log_decay_t.astype(jnp.float32))
      state = (a[..., None, None] if a.ndim == 2 else a[..., None]) * state
    state = state + kv
    return jnp.einsum("bhk,bhkv->bhv", q_t, state), state
  s, m = (x.astype(jnp.float32) for x in state)
  log_a = jnp.zeros_like(m) if log_decay_t is None else log_decay_t.astype(jnp.float32)
  i_t = log_input_gate_t.astype(jnp.float32)
  m_new = jnp.maximum(log_a + m, i_t)
  s = jnp.exp(log_a + m - m_new)[..., None, None] * s + jnp.exp(i_t - m_new)[..., None, None] * kv
  return jnp.einsum("bhk,bhkv->bhv", q_t, s), (s, m_new)

