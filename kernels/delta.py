"""The (gated) delta rule: the matrix-state recurrence of DeltaNet and Gated DeltaNet.

Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length";
Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule".

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ          S_t ∈ R^{d_k × d_v} per head
    o_t = S_tᵀ q_t

i.e. decay the state, then move the value stored under key ``k_t`` a fraction ``β_t`` of the way
towards ``v_t``: with ``S' = α_t S_{t−1}``, ``S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ``. ``β_t ∈ (0, 1)`` is
one scalar per head, ``log_decay = log α_t ≤ 0`` one scalar per head (Gated DeltaNet) or None (α = 1,
DeltaNet). The mixer L2-normalises ``k`` (so ``I − β k kᵀ`` is a contraction); the kernel does not.

Shapes: ``q, k: [batch, time, heads, d_k]``, ``v: [batch, time, heads, d_v]``,
``beta, log_decay: [batch, time, heads]``, ``initial_state: [batch, heads, d_k, d_v]``. Returns
``(o [batch, time, heads, d_v] in v.dtype, final_state f32 [batch, heads, d_k, d_v])``.

Implementations:
- ``"reference"``: the recurrence above, one ``lax.scan`` step per token (f32).
- ``"xla"``: chunked WY / UT-transform form (Yang et al. 2024 §3; gated: Yang et al. 2025 §3.3).
  Writing the update as ``S_t = α_t S_{t−1} + k_t u_tᵀ`` with ``u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t)``
  makes it gated linear attention on pseudo-values ``u``. Inside a chunk entered with state ``S₀``
  and cumulative log-decay ``b_t`` (``γ_t = e^{b_t}``), the ``u`` solve the unit-lower-triangular
  system

      (I + A) U = diag(β) V − diag(β γ) K S₀,     A_ts = β_t e^{b_t − b_s} k_tᵀ k_s   (s < t)

  so ``U = Ũ − W S₀`` with ``[Ũ, W] = (I + A)⁻¹ [diag(β) V, diag(βγ) K]`` — computed for all chunks at
  once. A scan over chunks then carries ``S_next = γ_C S₀ + Σ_s e^{b_C − b_s} k_s u_sᵀ``, and outputs
  are ``o_t = γ_t S₀ᵀ q_t + Σ_{s≤t} e^{b_t − b_s} (q_t·k_s) u_s``. Every decay factor is ``exp`` of a
  difference of cumulative log-decays with ``s ≤ t`` (or of ``b_t ≤ 0`` itself), so no exponent is
  positive however strong the decay.
- ``"pallas"``: the same chunked form with the scan over chunks replaced by a Pallas kernel (Triton on
  GPU, Mosaic on TPU) and its hand-derived backward by a second one (``kernels/delta_pallas.py``); the
  WY factors are a Pallas kernel too (its backward is XLA: :func:`solve_cotangents` and JAX's
  transpose of :func:`wy_system`). The rest of the precompute
  and the output einsums stay XLA. ``chunk_size`` must be a power of two ≥ 16 (fla uses 64). For
  16-bit inputs the kernels' dots take k, W, K̂ and the state rounded to that dtype (f32
  accumulation and state).
- ``"auto"``: ``"pallas"`` on GPU for chunks of 2^n ≥ 16 and head dims ≤ 128 (H100, B4 T8192 H16
  d128 bf16, chunk 16: 3.8 / 14.6 ms fwd / fwd+bwd gated, sixth session; the XLA form took
  15.8 / 42.1 ms in the fourth; ``kernels/BENCHMARKS.md``), ``"xla"`` elsewhere.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels.delta_pallas import PallasConfig, PallasTarget
from kernels.delta_pallas import _is_pow2_tile as is_pallas_chunk
from kernels.delta_pallas import check_arguments as check_pallas_arguments
from kernels.delta_pallas import state_pass as pallas_state_pass
from kernels.delta_pallas import unit_lower_inverse
from kernels.delta_pallas import wy_factors as pallas_wy_factors

Impl = Literal["auto", "xla", "reference", "pallas"]
IMPLS = ("auto", "xla", "reference", "pallas")
_NEG = -1e30


def _check(q, k, v, beta, log_decay, initial_state):
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


def _state0(initial_state, batch, heads, d_k, d_v):
  if initial_state is None:
    return jnp.zeros((batch, heads, d_k, d_v), jnp.float32)
  return initial_state.astype(jnp.float32)


def delta_rule_reference(q, k, v, beta, log_decay=None, initial_state=None):
  """The recurrence, token by token, in float32."""
  _check(q, k, v, beta, log_decay, initial_state)
  batch, time, heads, d_k = q.shape
  state = _state0(initial_state, batch, heads, d_k, v.shape[-1])
  ld = jnp.zeros(q.shape[:3], jnp.float32) if log_decay is None else log_decay

  def step(state, inputs):
    q_t, k_t, v_t, b_t, ld_t = inputs
    o_t, state = delta_rule_step(q_t, k_t, v_t, b_t, ld_t, state)
    return state, o_t

  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, beta, ld))
  final, o = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final


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
  """The sequential pass over chunks as a ``lax.scan`` (see :func:`kernels.delta_pallas.state_pass` for
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
  gain: jax.Array         # [b n h t s]  e^{b_t − b_s} for s ≤ t, else 0


def wy_factors_xla(k, v, b, beta):
  """``(W, Ũ) = (I + A)⁻¹ [diag(βγ) K, diag(β) V]`` per chunk, ``A_ts = β_t e^{b_t − b_s} k_tᵀ k_s``
  (s < t), in XLA. k ``[b n h c d_k]``, v ``[b n h c d_v]``, b (within-chunk cumulative log-decay) and
  β ``[b n h c]``, all f32. (:func:`kernels.delta_pallas.wy_factors` is the same as a Pallas kernel.)"""
  d_v = v.shape[-1]
  a, rhs_v, rhs_k = wy_system(k, v, b, beta)
  solved = wy_solve(a, jnp.concatenate([rhs_v, rhs_k], axis=-1))  # one inverse for both right-hand sides
  return solved[..., d_v:], solved[..., :d_v]


def wy_system(k, v, b, beta):
  """The unit-lower system of the WY factors (shapes as :func:`wy_factors_xla`): ``(A [b n h c c]``,
  strictly lower, ``diag(β) V, diag(βγ) K)``. The Pallas kernel's backward differentiates this."""
  t_idx = jnp.arange(k.shape[-2])
  lower = t_idx[:, None] > t_idx[None, :]
  # Mask before exp: for s > t the difference is positive and could overflow.
  gain = jnp.where(lower, jnp.exp(jnp.where(lower, b[..., :, None] - b[..., None, :], _NEG)), 0.0)
  a = beta[..., :, None] * jnp.einsum("...tk,...sk->...ts", k, k) * gain
  return a, v * beta[..., None], k * (beta * jnp.exp(b))[..., None]


def _precompute(q, k, v, beta, log_decay, chunk_size: int, wy_factors=wy_factors_xla) -> _Chunks:
  """Chunks, cumulative log-decays and the WY factors ``[Ũ | W] = (I + A)⁻¹ [diag(β) V | diag(βγ) K]``
  (``wy_factors``: :func:`wy_factors_xla` or the Pallas kernel, same signature)."""
  batch, time, heads, d_k = q.shape
  n = -(-time // chunk_size)
  pad = n * chunk_size - time
  # Padding: β = 0 and k = v = 0 give u = 0 and leave the state untouched; log-decay 0 keeps γ;
  # padded outputs are dropped.
  pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
  chunks = lambda x: rearrange(jnp.pad(x.astype(jnp.float32), pad4[:x.ndim]), "b (n c) h ... -> b n h c ...",
                               c=chunk_size)
  q_h, k_h, v_h, beta_h = chunks(q), chunks(k), chunks(v), chunks(beta)  # [b n h c (d)]
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


def _outputs(c: _Chunks, entering, u, time: int):
  """``o_t = γ_t S₀ᵀ q_t + Σ_{s≤t} e^{b_t − b_s} (q_t·k_s) u_s`` in each chunk (``S₀``: the state
  entering it), as ``[batch, time, heads, d_v]``."""
  scores = jnp.einsum("bnhtk,bnhsk->bnhts", c.q, c.k) * c.gain
  o = (jnp.einsum("bnhts,bnhsv->bnhtv", scores, u)
       + jnp.einsum("bnhtk,bnhkv->bnhtv", c.q * jnp.exp(c.log_gain)[..., None], entering))
  return rearrange(o, "b n h c v -> b (n c) h v")[:, :time]


def _delta_chunked(q, k, v, beta, log_decay, initial_state, chunk_size: int, state_pass=_scan_pass,
                   wy_factors=None):
  batch, time, heads, d_k = q.shape
  c = _precompute(q, k, v, beta, log_decay, chunk_size, wy_factors or wy_factors_xla)
  state0 = _state0(initial_state, batch, heads, d_k, v.shape[-1])
  entering, u, final = state_pass(c.w, c.u_tilde, c.k_to_end, c.chunk_decay, state0)  # [b n h k v], [b n h c v]
  return _outputs(c, entering, u, time).astype(v.dtype), final


def auto_impl(chunk_size: int, d_k: int, d_v: int) -> str:
  """What ``impl="auto"`` runs: the Pallas state pass on GPU for chunks the Triton tiles take (powers
  of two ≥ 16) and head dims ≤ 128 (those measured), the XLA form otherwise."""
  fits = max(d_k, d_v) <= 128
  return "pallas" if jax.default_backend() == "gpu" and is_pallas_chunk(chunk_size) and fits else "xla"


def delta_rule(q, k, v, beta, log_decay=None, initial_state=None, *, chunk_size: int = 16, impl: Impl = "auto",
               interpret: bool = False, pallas_target: PallasTarget | None = None,
               pallas_config: PallasConfig | None = None):
  """``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` (see the module docstring).

  Args:
    q, k: ``[batch, time, heads, d_k]``; v: ``[batch, time, heads, d_v]``.
    beta: ``[batch, time, heads]``, the write strength in (0, 1).
    log_decay: ``[batch, time, heads]`` (values ≤ 0) or None (no decay).
    initial_state: ``[batch, heads, d_k, d_v]`` or None (zeros).
    chunk_size: tokens per chunk of the chunked forms (``"pallas"``: a power of two ≥ 16; 64 is what
      fla uses).
    impl: ``"reference"``, ``"xla"`` (chunked), ``"pallas"`` (chunked, Pallas state pass) or ``"auto"``
      (:func:`auto_impl`: Pallas on GPU where its tiles fit, else XLA).
    interpret: run the Pallas kernels in the Pallas interpreter (CPU tests); only with ``"pallas"``.
    pallas_target: ``"triton"`` or ``"mosaic"`` kernels (default: by platform at lowering time; Triton
      when interpreting).
    pallas_config: Triton launch parameters of the Pallas kernels (default
      :class:`kernels.delta_pallas.PallasConfig`).
  Returns:
    ``(o [batch, time, heads, d_v] in v.dtype, final_state f32 [batch, heads, d_k, d_v])``.
  """
  _check(q, k, v, beta, log_decay, initial_state)
  if impl not in IMPLS:
    raise ValueError(f"delta_rule: unknown impl {impl!r}; valid: {IMPLS}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"delta_rule: chunk_size={chunk_size!r} must be a positive integer")
  if impl == "reference":
    return delta_rule_reference(q, k, v, beta, log_decay, initial_state)
  if impl == "auto":
    impl = auto_impl(chunk_size, q.shape[-1], v.shape[-1])
  if impl == "pallas":
    check_pallas_arguments(chunk_size, pallas_target, pallas_config)
    dtype = jnp.dtype(jnp.result_type(q.dtype, k.dtype, v.dtype))
    # 16-bit inputs: the kernel's dots run in that dtype (tensor cores), f32 otherwise.
    dot_dtype = dtype.name if dtype.itemsize == 2 else "float32"
    state_pass = functools.partial(pallas_state_pass, dot_dtype=dot_dtype, interpret=interpret,
                                   target=pallas_target, config=pallas_config)
    return _delta_chunked(q, k, v, beta, log_decay, initial_state, chunk_size, state_pass,
                          _pallas_wy(dot_dtype, interpret, pallas_target, pallas_config))
  return _delta_chunked(q, k, v, beta, log_decay, initial_state, chunk_size)


# The Triton WY kernel against the XLA form, H100, B4 T8192 H16 d128 bf16, delta_rule fwd / fwd+bwd ms
# (kernels/BENCHMARKS.md, sixth session): C = 64 gated 4.58 / 11.69 against 4.73 / 11.89, ungated
# 4.32 / 10.09 against 4.58 / 10.41; C = 16 precompute stage 1.08 / 4.16 against 2.02 / 4.61.
def _pallas_wy(dot_dtype: str, interpret: bool, target: PallasTarget | None, config: PallasConfig | None):
  """The WY factors for impl="pallas": the Pallas kernel for the same target as the state pass."""
  return functools.partial(pallas_wy_factors, dot_dtype=dot_dtype, interpret=interpret, target=target,
                           config=config)


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
