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
``beta, log_decay: [batch, time, heads]``, ``initial_state: [batch, heads, d_k, d_v]``,
``segment_ids: int [batch, time]``. Returns
``(o [batch, time, heads, d_v] in v.dtype, final_state f32 [batch, heads, d_k, d_v])``.

Packed documents (``segment_ids``): where the id changes between t − 1 and t, a new document starts
at t and the state entering t is zero, so nothing before t reaches t or later. Position 0 is not a
start: ``initial_state`` flows into the row's first document. The final state is that of the row's
last document alone. The chunked forms do this with masks, never with an infinite decay: with
``doc_t`` the number of starts in t's chunk up to and including t, the within-chunk cumulative
log-decay ``b`` restarts at each start (the start's own log-decay, which only multiplies the
discarded state, is dropped); ``A_ts`` and the output's intra-chunk terms vanish unless
``doc_t = doc_s``; ``S₀`` reaches row t (in ``K S₀`` and in ``γ_t S₀ᵀ q_t``) only if ``doc_t = 0``; the
chunk passes on ``γ_C S₀ [doc_C = 0] + Σ_s [doc_s = doc_C] e^{b_C − b_s} k_s u_sᵀ``. Every exponent
stays ``≤ 0`` (``kernels.delta.xla._segment_chunks``).

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
  GPU, Mosaic TPU) and its hand-derived backward by a second one (``pallas.py``); the
  WY factors are a Pallas kernel too (its backward is XLA: ``xla.solve_cotangents`` and JAX's
  transpose of ``xla.wy_system``); with segment ids it takes each row's document index as one more
  input and masks ``A`` and ``βγK`` itself. The rest of the precompute
  and the output einsums stay XLA. ``chunk_size`` must be a power of two ≥ 16 (fla uses 64). For
  16-bit inputs the kernels' dots take k, W, K̂ and the state rounded to that dtype (f32
  accumulation and state).
- ``"auto"``: ``"pallas"`` on GPU for chunks of 2^n ≥ 16 and head dims ≤ 128 (those measured;
  ``kernels/BENCHMARKS.md``), ``"xla"`` elsewhere (:func:`kernels.dispatch.delta`).

Files: ``reference.py`` (the recurrence, ``delta_rule_step``), ``xla.py`` (the chunked WY form and
its WY pieces), ``pallas.py`` (WY factors and the chunk pass), ``bench.py``.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax.numpy as jnp

from kernels import dispatch
from kernels.delta.pallas import PallasConfig, PallasTarget
from kernels.delta.pallas import _is_pow2_tile as is_pallas_chunk
from kernels.delta.pallas import check_arguments as check_pallas_arguments
from kernels.delta.pallas import state_pass as pallas_state_pass
from kernels.delta.pallas import wy_factors as pallas_wy_factors
from kernels.delta.reference import _check, delta_rule_reference, delta_rule_step
from kernels.delta.xla import _delta_chunked, solve_cotangents, unit_lower_inverse, wy_factors_xla, wy_solve, wy_system

Impl = Literal["auto", "xla", "reference", "pallas"]
IMPLS = ("auto", "xla", "reference", "pallas")

__all__ = ["IMPLS", "PallasConfig", "choice", "delta_rule", "delta_rule_reference", "delta_rule_step",
           "solve_cotangents", "unit_lower_inverse", "wy_factors_xla", "wy_solve", "wy_system"]


def choice(chunk_size: int, d_k: int, d_v: int, requested: str = "auto", *, interpret: bool = False,
           pallas_target: str | None = None) -> dispatch.Choice:
  """What runs ``delta_rule`` with chunks of ``chunk_size`` and heads of ``d_k`` × ``d_v`` here
  (:func:`kernels.dispatch.delta`)."""
  chunk_problem = None if is_pallas_chunk(chunk_size) else (
      f"needs chunk_size a power of two ≥ 16 (got {chunk_size}; Triton tiles)")
  return dispatch.delta(requested, IMPLS, chunk_problem=chunk_problem, d_k=d_k, d_v=d_v, interpret=interpret,
                        layout=dispatch.pallas_layout(pallas_target, "delta"))


def auto_impl(chunk_size: int, d_k: int, d_v: int) -> str:
  """What ``impl="auto"`` runs."""
  return choice(chunk_size, d_k, d_v).impl


def delta_rule(q, k, v, beta, log_decay=None, initial_state=None, *, segment_ids=None, chunk_size: int = 16,
               impl: Impl = "auto", interpret: bool = False, pallas_target: PallasTarget | None = None,
               pallas_config: PallasConfig | None = None):
  """``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` (see the module docstring).

  Args:
    q, k: ``[batch, time, heads, d_k]``; v: ``[batch, time, heads, d_v]``.
    beta: ``[batch, time, heads]``, the write strength in (0, 1).
    log_decay: ``[batch, time, heads]`` (values ≤ 0) or None (no decay).
    initial_state: ``[batch, heads, d_k, d_v]`` or None (zeros); with ``segment_ids``, the state
      entering the row's first document only.
    segment_ids: int ``[batch, time]`` or None: packed documents (a new one starts where the id changes;
      the state entering it is zero; the final state is the last document's alone). None: one sequence.
    chunk_size: tokens per chunk of the chunked forms (``"pallas"``: a power of two ≥ 16; 64 is what
      fla uses).
    impl: ``"reference"``, ``"xla"`` (chunked), ``"pallas"`` (chunked, Pallas state pass) or ``"auto"``
      (:func:`auto_impl`: Pallas on GPU where its tiles fit, else XLA).
    interpret: run the Pallas kernels in the Pallas interpreter (CPU tests); only with ``"pallas"``.
    pallas_target: ``"triton"`` or ``"mosaic_tpu"`` (older name ``"mosaic"``) kernels (default: by platform at lowering time; Triton
      when interpreting).
    pallas_config: Triton launch parameters of the Pallas kernels (default
      :class:`kernels.delta.pallas.PallasConfig`).
  Returns:
    ``(o [batch, time, heads, d_v] in v.dtype, final_state f32 [batch, heads, d_k, d_v])``.
  """
  _check(q, k, v, beta, log_decay, initial_state, segment_ids)
  if impl not in IMPLS:
    raise ValueError(f"delta_rule: unknown impl {impl!r}; valid: {IMPLS}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"delta_rule: chunk_size={chunk_size!r} must be a positive integer")
  if impl == "pallas":  # (the kernels' own messages for their arguments first)
    check_pallas_arguments(chunk_size, pallas_target, pallas_config)
  taken = choice(chunk_size, q.shape[-1], v.shape[-1], impl, interpret=interpret, pallas_target=pallas_target)
  impl = dispatch.called(taken, q=q, v=v, chunk_size=chunk_size).impl
  if impl == "reference":
    return delta_rule_reference(q, k, v, beta, log_decay, initial_state, segment_ids)
  if impl == "pallas":
    dtype = jnp.dtype(jnp.result_type(q.dtype, k.dtype, v.dtype))
    # 16-bit inputs: the kernel's dots run in that dtype (tensor cores), f32 otherwise.
    dot_dtype = dtype.name if dtype.itemsize == 2 else "float32"
    state_pass = functools.partial(pallas_state_pass, dot_dtype=dot_dtype, interpret=interpret,
                                   target=pallas_target, config=pallas_config)
    return _delta_chunked(q, k, v, beta, log_decay, initial_state, chunk_size, state_pass,
                          _pallas_wy(dot_dtype, interpret, pallas_target, pallas_config), segment_ids)
  return _delta_chunked(q, k, v, beta, log_decay, initial_state, chunk_size, segment_ids=segment_ids)


def _pallas_wy(dot_dtype: str, interpret: bool, target: PallasTarget | None, config: PallasConfig | None):
  """The WY factors for impl="pallas": the Pallas kernel for the same target as the state pass (faster
  than the XLA form at every measured chunk: kernels/BENCHMARKS.md)."""
  return functools.partial(pallas_wy_factors, dot_dtype=dot_dtype, interpret=interpret, target=target,
                           config=config)

