"""The delta rule in XLA: the chunked WY / UT-transform form (Yang et al. 2024 §3; gated: Yang et
al. 2025 §3.3; derivation in ``kernels/delta/__init__.py``). Its WY pieces (``wy_system``,
``solve_cotangents``, ``unit_lower_inverse``) are shared with the Pallas path, which swaps in its own
WY factors and sequential chunk pass (``kernels/delta/pallas.py``)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels.delta.reference import _state0, state_resets
from kernels.documents import segmented_cumsum

_NEG = -1e30


def unit_lower_inverse(a, matmul=jnp.matmul):
  """``(I + A)⁻¹`` for strictly lower-triangular ``A [..., c, c]``, by matmuls only.

  ``A`` is nilpotent (``A^c = 0``), so ``(I + A)⁻¹ = Σ_{m<c} (−A)^m = Π_j (I + (−A)^{2^j})`` over
  ``j < ⌈log₂ c⌉``: 2·⌈log₂ c⌉ − 1 small matmuls that run on tensor cores and batch well, where a
  batched triangular solve is a sequential custom call (and, nested inside two scans on the XLA CPU
  runtime, was seen to deadlock). ``matmul``: the product to use (the WY kernel passes its tf32x3 dot).
  """
  c = a.shape[-1]
  eye = jax.lax.broadcasted_iota(jnp.int32, a.shape, a.ndim - 2) == jax.lax.broadcasted_iota(
      jnp.int32, a.shape, a.ndim - 1)
  power = -a
  inverse = eye.astype(a.dtype) + power
  for _ in range(max(c - 1, 1).bit_length() - 1):
    power = matmul(power, power)
    inverse = inverse + matmul(inverse, power)  # inverse · (I + power)
  return inverse



@jax.custom_vjp
def wy_solve(a, rhs):
  """``(I + A)⁻¹ rhs`` for strictly lower-triangular ``A [..., c, c]`` and ``rhs [..., c, d]``.

  Its own backward, rather than autodiff through the ``2·⌈log₂ c⌉ − 1`` products of
  :func:`unit_lower_inverse` (which keeps every power of ``A`` and transposes each product): with
  ``T = (I + A)⁻¹`` and ``X = T rhs``,  ``∂rhs = Tᵀ ∂X`` and ``∂A = −Tᵀ ∂X Xᵀ = −∂rhs Xᵀ``, kept on
  the strictly lower triangle (``A`` is structurally zero elsewhere). Two products per chunk.
  """
  return jnp.einsum("...ts,...sd->...td", unit_lower_inverse(a), rhs)


def _wy_solve_fwd(a, rhs):
  inverse = unit_lower_inverse(a)
  solved = jnp.einsum("...ts,...sd->...td", inverse, rhs)
  return solved, (inverse, solved)


def solve_cotangents(inverse, solved_parts, d_solved_parts):
  """The backward of ``X = T rhs`` with ``T = (I + A)⁻¹`` (see :func:`wy_solve`), for ``X`` and
  ``∂X`` given as matching column blocks: ``(∂A [..., c, c], [∂rhs per block])``."""
  d_rhs = [jnp.einsum("...ts,...td->...sd", inverse, d_x) for d_x in d_solved_parts]
  c = inverse.shape[-1]
  strictly_lower = jnp.arange(c)[:, None] > jnp.arange(c)[None, :]
  outer = functools.reduce(jnp.add, [jnp.einsum("...td,...sd->...ts", d_r, x)
                                     for d_r, x in zip(d_rhs, solved_parts)])
  return jnp.where(strictly_lower, -outer, 0.0).astype(inverse.dtype), d_rhs


def _wy_solve_bwd(residuals, d_solved):
  inverse, solved = residuals
  d_a, (d_rhs,) = solve_cotangents(inverse, [solved], [d_solved])
  return d_a, d_rhs


wy_solve.defvjp(_wy_solve_fwd, _wy_solve_bwd)


def _scan_pass(w, u_tilde, k_to_end, chunk_decay, state0):
  """The sequential pass over chunks as a ``lax.scan`` (see :func:`kernels.delta.pallas.state_pass` for
  shapes and the Pallas version)."""

  def carry(state, inputs):
    w_n, u_n, k_n, g_n = inputs
    u = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, state)
    # Emit the state entering the chunk and the pseudo-values; outputs are formed outside the scan.
    return g_n[..., None, None] * state + jnp.einsum("bhck,bhcv->bhkv", k_n, u), (state, u)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (w, u_tilde, k_to_end, chunk_decay))
  final, (entering, u) = jax.lax.scan(carry, state0, xs)
  return jnp.moveaxis(entering, 0, 1), jnp.moveaxis(u, 0, 1), final  # [b n h k v], [b n h c v]


class _Chunks(NamedTuple):
  """The chunk-parallel work before the sequential pass (``[b n h c …]``: batch, chunk, head, row)."""
  q: jax.Array            # [b n h c k]
  k: jax.Array            # [b n h c k]
  w: jax.Array            # [b n h c k]  (I + A)⁻¹ diag(βγ) K
  u_tilde: jax.Array      # [b n h c v]  (I + A)⁻¹ diag(β) V
  k_to_end: jax.Array     # [b n h c k]  k_s e^{b_C − b_s}
  chunk_decay: jax.Array  # [b n h]      γ_C
  log_gain: jax.Array     # [b n h c]    b_t, the within-chunk cumulative log-decay
  gain: jax.Array         # [b n h t s]  e^{b_t − b_s} for s ≤ t (and the same document), else 0
  # With segment ids only: [b n 1 c] bool, True where the state entering the chunk reaches row t
  # (no document starts in the chunk at or before t).
  reaches: jax.Array | None = None


def chunk_documents(segment_ids, chunk_size: int):
  """``segment_ids: int [batch, time]`` → ``(starts bool, doc int32)``, both ``[batch, chunks, 1, chunk]``
  (padded to whole chunks, the padding in the last document): ``starts`` where the id changes from the
  previous token (never at t = 0: ``initial_state`` flows into the first document), ``doc`` the number
  of starts in the chunk up to and including each row. Rows t, s of a chunk share a document iff their
  ``doc`` is equal; the state entering the chunk reaches row t iff ``doc_t == 0``."""
  time = segment_ids.shape[1]
  pad = -time % chunk_size
  starts = jnp.pad(state_resets(segment_ids), ((0, 0), (0, pad)))
  starts = rearrange(starts, "b (n c) -> b n 1 c", c=chunk_size)
  return starts, jnp.cumsum(starts.astype(jnp.int32), axis=-1)


def wy_factors_xla(k, v, b, beta, doc=None):
  """``(W, Ũ) = (I + A)⁻¹ [diag(βγ) K, diag(β) V]`` per chunk, ``A_ts = β_t e^{b_t − b_s} k_tᵀ k_s``
  (s < t), in XLA. k ``[b n h c d_k]``, v ``[b n h c d_v]``, b (within-chunk cumulative log-decay) and
  β ``[b n h c]``, all f32; doc: None or int32 ``[b n 1 c]`` (:func:`chunk_documents`; see
  :func:`wy_system`). (:func:`kernels.delta.pallas.wy_factors` is the same as a Pallas kernel.)"""
  d_v = v.shape[-1]
  a, rhs_v, rhs_k = wy_system(k, v, b, beta, doc)
  solved = wy_solve(a, jnp.concatenate([rhs_v, rhs_k], axis=-1))  # one inverse for both right-hand sides
  return solved[..., d_v:], solved[..., :d_v]


def wy_system(k, v, b, beta, doc=None):
  """The unit-lower system of the WY factors (shapes as :func:`wy_factors_xla`): ``(A [b n h c c]``,
  strictly lower, ``diag(β) V, diag(βγ) K)``. The Pallas kernel's backward differentiates this.

  With ``doc`` (int32 ``[b n 1 c]``, the document index of each row within its chunk): ``A_ts = 0``
  unless rows t and s share a document, and the ``βγ K`` rows are zero where the state entering the
  chunk does not reach (``doc_t > 0``), so each document is solved from its own start."""
  t_idx = jnp.arange(k.shape[-2])
  lower = t_idx[:, None] > t_idx[None, :]
  if doc is not None:
    lower = lower & (doc[..., :, None] == doc[..., None, :])
  # Mask before exp: for s > t (or s in an earlier document) the difference can be positive and overflow.
  gain = jnp.where(lower, jnp.exp(jnp.where(lower, b[..., :, None] - b[..., None, :], _NEG)), 0.0)
  a = beta[..., :, None] * jnp.einsum("...tk,...sk->...ts", k, k) * gain
  scale = beta * jnp.exp(b)
  if doc is not None:
    scale = jnp.where(doc == 0, scale, 0.0)
  return a, v * beta[..., None], k * scale[..., None]


def to_chunks(x, chunk_size: int):
  """``[batch, time, heads, ...]`` → f32 ``[batch, chunks, heads, chunk_size, ...]``, the time axis
  zero-padded at the end to whole chunks (the callers make zero rows write and read nothing)."""
  pad = -x.shape[1] % chunk_size
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  return rearrange(x, "b (n c) h ... -> b n h c ...", c=chunk_size)


def _precompute(q, k, v, beta, log_decay, chunk_size: int, wy_factors=wy_factors_xla, *,
                segment_ids=None) -> _Chunks:
  """Chunks, cumulative log-decays and the WY factors ``[Ũ | W] = (I + A)⁻¹ [diag(β) V | diag(βγ) K]``
  (``wy_factors``: :func:`wy_factors_xla` or the Pallas kernel, same signature). ``segment_ids``:
  None or int ``[batch, time]`` (:func:`_segment_chunks`)."""
  batch, time, heads, d_k = q.shape
  n = -(-time // chunk_size)
  # Padding: β = 0 and k = v = 0 give u = 0 and leave the state untouched; log-decay 0 keeps γ;
  # padded outputs are dropped.
  chunks = lambda x: to_chunks(x, chunk_size)
  q_h, k_h, v_h, beta_h = chunks(q), chunks(k), chunks(v), chunks(beta)  # [b n h c (d)]
  if segment_ids is not None:
    log_decay_h = None if log_decay is None else chunks(log_decay)
    return _segment_chunks(q_h, k_h, v_h, beta_h, log_decay_h, chunk_documents(segment_ids, chunk_size), wy_factors)
  if log_decay is None:  # (a cumsum of zeros would be constant-folded by XLA, for seconds)
    b_h = jnp.zeros((batch, n, heads, chunk_size), jnp.float32)
  else:
    b_h = jnp.cumsum(chunks(log_decay), axis=-1)  # within-chunk cumulative log-decay ≤ 0

  t_idx = jnp.arange(chunk_size)
  diff = b_h[..., :, None] - b_h[..., None, :]  # b_t − b_s, [b n h t s]
  gain_incl = jnp.exp(jnp.where(t_idx[:, None] >= t_idx[None, :], diff, _NEG))
  w, u_tilde = wy_factors(k_h, v_h, b_h, beta_h)
  return _Chunks(q=q_h, k=k_h, w=w, u_tilde=u_tilde,
                 k_to_end=k_h * jnp.exp(b_h[..., -1:] - b_h)[..., None],  # decay from s to the chunk's end, ≤ 1
                 chunk_decay=jnp.exp(b_h[..., -1]), log_gain=b_h, gain=gain_incl)


def _segment_chunks(q_h, k_h, v_h, beta_h, log_decay_h, documents, wy_factors) -> _Chunks:
  """:func:`_precompute` for packed documents, from the chunked inputs (``[b n h c (d)]`` f32,
  ``log_decay_h`` None or ``[b n h c]``) and ``documents = (starts, doc)`` of :func:`chunk_documents`.
  With ``doc`` the document index of each row within its chunk, every term that would carry something
  across a document start is masked, none is given an infinite decay:

  - ``b`` restarts at each start (the start's own log-decay, which only multiplies the discarded
    state, is dropped), so every ``e^{b_t − b_s}`` of one document is the same as the document alone;
  - pairs (t, s) of different documents are zero in ``A`` (the WY system) and in the output's ``gain``;
  - the entering state ``S₀`` reaches row t (``γ_t K S₀`` in the WY right-hand side, ``γ_t S₀ᵀ q_t`` in
    the output) only if ``doc_t = 0``;
  - the chunk passes on ``γ_C S₀ [doc_C = 0] + Σ_s [doc_s = doc_C] e^{b_C − b_s} k_s u_sᵀ``: the
    masks are folded into ``γ_C`` and ``K̂``, so the pass over chunks is the unsegmented one.

  Every exponent is ``≤ 0`` where it is not masked, and masked before ``exp`` where it could be positive."""
  starts, doc = documents  # [b n 1 c]
  if log_decay_h is None:
    b_h = jnp.zeros(beta_h.shape, jnp.float32)
  else:
    b_h = segmented_cumsum(jnp.where(starts, 0.0, log_decay_h), starts, axis=-1)

  t_idx = jnp.arange(beta_h.shape[-1])
  same = (t_idx[:, None] >= t_idx[None, :]) & (doc[..., :, None] == doc[..., None, :])  # [b n 1 t s]
  gain_incl = jnp.exp(jnp.where(same, b_h[..., :, None] - b_h[..., None, :], _NEG))
  w, u_tilde = wy_factors(k_h, v_h, b_h, beta_h, doc=doc)
  in_last = doc == doc[..., -1:]  # rows of the chunk's last document: the only ones it passes on
  to_end = jnp.where(in_last, jnp.exp(jnp.where(in_last, b_h[..., -1:] - b_h, 0.0)), 0.0)
  return _Chunks(q=q_h, k=k_h, w=w, u_tilde=u_tilde, k_to_end=k_h * to_end[..., None],
                 chunk_decay=jnp.where(doc[..., -1] == 0, jnp.exp(b_h[..., -1]), 0.0), log_gain=b_h,
                 gain=gain_incl, reaches=doc == 0)


def _outputs(c: _Chunks, entering, u, time: int):
  """``o_t = γ_t S₀ᵀ q_t + Σ_{s≤t} e^{b_t − b_s} (q_t·k_s) u_s`` in each chunk (``S₀``: the state
  entering it; with segment ids the first term only where ``S₀`` reaches t and the sum over t's
  document: ``c.gain`` is zero elsewhere), as ``[batch, time, heads, d_v]``."""
  scores = jnp.einsum("bnhtk,bnhsk->bnhts", c.q, c.k) * c.gain
  entering_gain = jnp.exp(c.log_gain)
  if c.reaches is not None:
    entering_gain = jnp.where(c.reaches, entering_gain, 0.0)
  o = (jnp.einsum("bnhts,bnhsv->bnhtv", scores, u)
       + jnp.einsum("bnhtk,bnhkv->bnhtv", c.q * entering_gain[..., None], entering))
  return rearrange(o, "b n h c v -> b (n c) h v")[:, :time]


def _delta_chunked(q, k, v, beta, log_decay, initial_state, chunk_size: int, state_pass=_scan_pass,
                   wy_factors=None, segment_ids=None):
  batch, time, heads, d_k = q.shape
  c = _precompute(q, k, v, beta, log_decay, chunk_size, wy_factors or wy_factors_xla, segment_ids=segment_ids)
  state0 = _state0(initial_state, batch, heads, d_k, v.shape[-1])
  entering, u, final = state_pass(c.w, c.u_tilde, c.k_to_end, c.chunk_decay, state0)  # [b n h k v], [b n h c v]
  return _outputs(c, entering, u, time).astype(v.dtype), final

