"""Gated linear attention: the matrix-state recurrence shared by linear attention, Based, RetNet, GLA,
Mamba-2 (SSD), mLSTM and RWKV-6.

    S_t = diag(α_t) S_{t−1} + k_t v_tᵀ          S_t ∈ R^{d_k × d_v} per head
    o_t = S_tᵀ q_t

``log_decay = log α_t ≤ 0`` is per key dimension ``[batch, time, heads, d_k]`` (GLA, RWKV-6), one
scalar per head ``[batch, time, heads]`` (RetNet, Mamba-2, mLSTM) or None (α = 1: linear attention,
Based). Feature maps, scalings and normalisers belong to the mixers: a normaliser ``Σ φ(k_s)`` is a
column of ones appended to ``v``.

Shapes: ``q, k: [batch, time, heads, d_k]``, ``v: [batch, time, heads, d_v]``,
``initial_state: [batch, heads, d_k, d_v]``. Returns ``(o [batch, time, heads, d_v] in v.dtype,
final_state f32 [batch, heads, d_k, d_v])``.

Implementations:
- ``"reference"``: the recurrence above, one ``lax.scan`` step per token (f32).
- ``"xla"``: chunked (Yang et al. 2024, §3): tokens in chunks of ``chunk_size``; inside a chunk the
  output is a masked attention-like product, across chunks the state is carried by a scan over
  chunks. Every decay factor is ``exp`` of a difference ``b_t − b_s`` of within-chunk cumulative
  log-decays with ``s ≤ t``, so exponents are ≤ 0 and nothing overflows however strong the decay —
  the failure mode of the ``q·exp(b)``, ``k·exp(−b)`` factorisation.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange

Impl = Literal["auto", "xla", "reference"]
IMPLS = ("auto", "xla", "reference")
_NEG = -1e30


def _check(q, k, v, log_decay, initial_state):
  if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"gla: expected q, k [batch, time, heads, d_k] and v [batch, time, heads, d_v]; "
                     f"got q{q.shape} k{k.shape} v{v.shape}")
  if log_decay is not None and log_decay.shape not in (q.shape, q.shape[:3]):
    raise ValueError(f"gla: log_decay{log_decay.shape} must be {q.shape} (per key dim) or {q.shape[:3]} (per head)")
  want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  if initial_state is not None and initial_state.shape != want:
    raise ValueError(f"gla: initial_state{initial_state.shape} must be [batch, heads, d_k, d_v] = {want}")


def _full_decay(log_decay, q):
  """Per-key-dim log-decay ``[batch, time, heads, d_k]`` f32 (zeros for None)."""
  if log_decay is None:
    return jnp.zeros(q.shape, jnp.float32)
  log_decay = log_decay.astype(jnp.float32)
  return jnp.broadcast_to(log_decay[..., None], q.shape) if log_decay.ndim == 3 else log_decay


def gla_reference(q, k, v, log_decay=None, initial_state=None):
  """The recurrence, token by token, in float32."""
  _check(q, k, v, log_decay, initial_state)
  batch, _, heads, d_k = q.shape
  decay = jnp.exp(_full_decay(log_decay, q))
  state = (jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))

  def step(state, inputs):
    q_t, k_t, v_t, a_t = inputs
    state = a_t[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, decay))
  final, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final


def _gla_chunked(q, k, v, log_decay, initial_state, chunk_size: int):
  batch, time, heads, d_k = q.shape
  d_v = v.shape[-1]
  scalar = log_decay is not None and log_decay.ndim == 3
  n = -(-time // chunk_size)
  pad = n * chunk_size - time
  # Padding: k = v = 0 and log-decay 0 leave the state untouched; padded outputs are dropped.
  pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
  chunks = lambda x: rearrange(jnp.pad(x.astype(jnp.float32), pad4[:x.ndim]), "b (n c) ... -> b n c ...", c=chunk_size)
  qc, kc, vc = chunks(q), chunks(k), chunks(v)
  if log_decay is None:
    ld = jnp.zeros((batch, n, chunk_size, heads), jnp.float32)
    scalar = True
  else:
    ld = chunks(log_decay)
  b = jnp.cumsum(ld, axis=2)  # within-chunk cumulative log-decay, [b n c h (k)]
  causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))

  if scalar:
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # [b n t s h]
    gain = jnp.exp(jnp.where(causal[None, None, :, :, None], diff, _NEG))
    scores = jnp.einsum("bnthk,bnshk->bntsh", qc, kc) * gain
    b_full = b[..., None]
  else:
    diff = b[:, :, :, None] - b[:, :, None]  # [b n t s h k]
    gain = jnp.exp(jnp.where(causal[None, None, :, :, None, None], diff, _NEG))
    scores = jnp.einsum("bnthk,bnshk,bntshk->bntsh", qc, kc, gain)
    b_full = b
  o_intra = jnp.einsum("bntsh,bnshv->bnthv", scores, vc)

  b_last = b_full[:, :, -1:]  # [b n 1 h k]
  k_to_end = kc * jnp.exp(b_last - b_full)  # decay from s to the chunk's end, ≤ 1
  chunk_kv = jnp.einsum("bnshk,bnshv->bnhkv", k_to_end, vc)
  chunk_decay = jnp.broadcast_to(jnp.exp(b_last[:, :, 0]), (batch, n, heads, d_k))

  def carry(state, inputs):
    decay, kv = inputs
    return decay[..., None] * state + kv, state  # emit the state entering the chunk

  state0 = (jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))
  final, entering = jax.lax.scan(carry, state0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_kv, 1, 0)))
  entering = jnp.moveaxis(entering, 0, 1)  # [b n h k v]
  o_inter = jnp.einsum("bnthk,bnhkv->bnthv", qc * jnp.exp(b_full), entering)
  o = rearrange(o_intra + o_inter, "b n c h v -> b (n c) h v")[:, :time]
  return o.astype(v.dtype), final


def gla(q, k, v, log_decay=None, initial_state=None, *, chunk_size: int = 16, impl: Impl = "auto"):
  """``S_t = diag(exp(log_decay_t)) S_{t−1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` (see the module docstring).

  Args:
    q, k: ``[batch, time, heads, d_k]``; v: ``[batch, time, heads, d_v]``.
    log_decay: ``[batch, time, heads, d_k]``, ``[batch, time, heads]`` or None; values ≤ 0.
    initial_state: ``[batch, heads, d_k, d_v]`` or None (zeros).
    chunk_size: tokens per chunk of the chunked form.
    impl: ``"reference"``, ``"xla"`` (chunked) or ``"auto"``.
  Returns:
    ``(o [batch, time, heads, d_v], final_state f32 [batch, heads, d_k, d_v])``.
  """
  _check(q, k, v, log_decay, initial_state)
  if impl not in IMPLS:
    raise ValueError(f"gla: unknown impl {impl!r}; valid: {IMPLS}")
  if chunk_size <= 0:
    raise ValueError(f"gla: chunk_size={chunk_size} must be positive")
  if impl == "reference":
    return gla_reference(q, k, v, log_decay, initial_state)
  return _gla_chunked(q, k, v, log_decay, initial_state, chunk_size)


def gla_step(q_t, k_t, v_t, log_decay_t, state):
  """One recurrent step: ``q_t, k_t: [batch, heads, d_k]``, ``v_t: [batch, heads, d_v]``,
  ``log_decay_t: [batch, heads, d_k] | [batch, heads] | None``, ``state: f32 [batch, heads, d_k, d_v]``.
  Returns ``(o_t [batch, heads, d_v] f32, state)``."""
  state = state.astype(jnp.float32)
  if log_decay_t is not None:
    a = jnp.exp(log_decay_t.astype(jnp.float32))
    state = (a[..., None, None] if a.ndim == 2 else a[..., None]) * state
  state = state + k_t.astype(jnp.float32)[..., :, None] * v_t.astype(jnp.float32)[..., None, :]
  return jnp.einsum("bhk,bhkv->bhv", q_t.astype(jnp.float32), state), state
