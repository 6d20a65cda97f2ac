"""The generalized delta rule: a matrix state whose transition is diagonal plus rank one.

The recurrence of RWKV-7 (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State
Evolution"), Kimi Delta Attention (Moonshot AI 2025, "Kimi Linear: An Expressive, Efficient Attention
Architecture") and, one Householder step at a time, DeltaProduct (Siems et al. 2025); DeltaNet and
Gated DeltaNet are its special case (:func:`delta_rule_as_dplr`). The chunked form follows fla's
``chunk_dplr`` / ``chunk_kda`` (Yang, Zhang et al.), written anew:

    S_t = (Diag(α_t) − a_t b_tᵀ) S_{t−1} + k_t v_tᵀ          S_t ∈ R^{d_k × d_v} per head
    o_t = S_tᵀ q_t

with ``log α_t = log_decay ≤ 0`` per key channel (``[batch, time, heads, d_k]``), one scalar per head
(``[batch, time, heads]``) or None (α = 1). ``b_t`` reads the old state (``u_t = S_{t−1}ᵀ b_t``, what
it holds under ``b_t``) and ``a_t`` is where that reading is removed, so that
``S_t = Diag(α_t) S_{t−1} − a_t u_tᵀ + k_t v_tᵀ``. Special cases:

- the (gated) delta rule ``S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ`` (Kimi Delta
  Attention; with a scalar α it is Gated DeltaNet's ``α_t (I − β k kᵀ) S + β k vᵀ``):
  ``a = β k``, ``b = α ⊙ k``, keys ``β k`` (:func:`delta_rule_as_dplr`);
- RWKV-7, ``wkv_t = wkv_{t−1} (diag(w_t) − κ̂_tᵀ (a_t ⊙ κ̂_t)) + v_tᵀ k̃_t`` in its row-vector
  notation, transposed: ``a = κ̂ ⊙ a_t`` (in-context learning rate times the removal key), ``b = κ̂``,
  keys ``k̃`` (the RWKV kernels and fla's ``chunk_rwkv7`` take the same transition as ``a = −κ̂``,
  ``b = κ̂ ⊙ a_t`` of ``wkv_t = wkv_{t−1} (Diag(w_t) + aᵀ b) + …``, with the roles of a and b swapped);
- ``a = 0`` (or ``b = 0``): gated linear attention; α = 1 too: linear attention.

The kernel neither normalises nor scales anything: the mixers do.

Shapes: ``q, k, a, b: [batch, time, heads, d_k]``, ``v: [batch, time, heads, d_v]``,
``log_decay: [batch, time, heads, d_k] | [batch, time, heads] | None``,
``initial_state: [batch, heads, d_k, d_v]``, ``segment_ids: int [batch, time]``. Returns
``(o [batch, time, heads, d_v] in v.dtype, final_state f32 [batch, heads, d_k, d_v])``.

Chunked form (``"xla"``). Inside a chunk entered with state ``S₀``, with ``G_t`` the within-chunk
cumulative log-decay up to and including t (per key channel) and ``G_{t−1}`` the one the read key of
t meets (``G_0 = 0``), unrolling gives

    S_t = e^{G_t} ⊙ S₀ + Σ_{s≤t} e^{G_t − G_s} ⊙ (k_s v_sᵀ − a_s u_sᵀ)        (⊙: scales row i by e^{G_·,i})
    u_t = B̂_tᵀ S₀ + Σ_{s<t} M_bk[t, s] v_s − Σ_{s<t} M_ba[t, s] u_s,      B̂_t = b_t ⊙ e^{G_{t−1}}
    M_xy[t, s] = Σ_i x_ti y_si e^{G'_ti − G_si}    (G' = G_{t−1} for x = b, s < t;  G' = G_t for x = q, s ≤ t)

so ``U = Ũ + W S₀`` with ``(I + M_ba) [Ũ | W] = [M_bk V | B̂]``: a unit-lower-triangular system solved
for all chunks at once (the UT transform: :func:`kernels.delta.xla.wy_solve`, by matmuls). A scan
over chunks then carries ``S_next = e^{G_C} ⊙ S₀ + Σ_s e^{G_C − G_s} ⊙ (k_s v_sᵀ − a_s u_sᵀ)`` with
``U = Ũ + W S₀``, and outputs are ``o_t = (q_t ⊙ e^{G_t})ᵀ S₀ + Σ_{s≤t} M_qk[t, s] v_s − M_qa[t, s] u_s``.
Every decay factor is ``exp`` of a difference of cumulative log-decays with ``s ≤ t`` in one
document (or of ``G_t ≤ 0`` itself), per key channel, masked before the ``exp`` where it is not used:
no exponent is positive and none is −∞, however strong the decay. With a per-key decay the pair
products are three-factor sums over ``[chunk, chunk, d_k]``; with a per-head decay they are a matmul
times a ``[chunk, chunk]`` gain.

Packed documents (``segment_ids``): where the id changes between t − 1 and t, a new document starts
at t and the state entering t is zero. Position 0 is not a start: ``initial_state`` flows into the
row's first document. The final state is that of the row's last document alone. The chunked form
masks, as ``kernels.delta`` does: ``G`` restarts at each start (the start's own log-decay, which only
multiplies the discarded state, is dropped); pairs (t, s) of different documents are zero in every
``M``; ``S₀`` reaches row t (``B̂_t``, ``q_t ⊙ e^{G_t}``) only in the chunk's first document; the chunk
passes on ``e^{G_C} S₀`` only if no document starts in it, and the sums over its last document only.

Implementations:
- ``"reference"``: the recurrence, one ``lax.scan`` step per token (f32).
- ``"xla"``: the chunked form above (f32 inside; ``chunk_size`` any positive integer).
- ``"pallas"``: the same chunked form with the scan over chunks replaced by the delta rule's Pallas
  state-pass kernel and its hand-derived backward (``kernels/delta/pallas.py``; Triton on GPU, Mosaic
  TPU, the Pallas interpreter with ``interpret=True``): that kernel carries ``S ← Γ S + K̂ᵀ U + X`` with
  ``U = Ũ − W S``, a chunk decay ``Γ`` per key channel or per head and an added write ``X``, and this
  form is it with ``W → −W``, ``K̂ → −Â``, ``X = Σ_s e^{G_C − G_s} ⊙ k_s v_sᵀ`` (``pallas.py``). The
  precompute (pair matrices, the UT solve, masks of packed documents) and the outputs stay XLA; every
  exponent is the chunked form's, ≤ 0. With ``precompute="pallas"`` the precompute too is one Pallas
  (Triton) kernel per (batch, chunk, head) (``precompute.py``; its backward is the XLA precompute's
  vjp, recomputed, so a training step pays the XLA forward again: it can win on forward-only calls —
  prefill, evaluation — only); the default stays ``"xla"`` until a GPU run (``bench.py --rows
  pallas_pre``) measures it faster. ``chunk_size`` must be a power of two ≥ 16 (Triton tiles). For
  16-bit q, k, v, a, b the kernel's two dots take W, Â and the state rounded to that dtype (f32
  accumulation and state).
- ``"auto"``: ``"xla"``, until the Pallas path is measured faster on a GPU (``bench.py``;
  :func:`kernels.dispatch.dplr` records the reason).

Files: ``reference.py`` (the recurrence, :func:`dplr_step`), ``xla.py`` (the chunked form),
``pallas.py`` (the chunk pass on the delta rule's Pallas kernel), ``precompute.py`` (the precompute as
one Pallas kernel), ``bench.py`` (ours against fla's
``chunk_kda``, ``chunk_rwkv7`` and ``chunk_gated_delta_rule``).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax.numpy as jnp

from kernels import dispatch
from kernels.delta.pallas import _is_pow2_tile as is_pallas_chunk
from kernels.delta.pallas import check_arguments as check_pallas_arguments
from kernels.dplr.pallas import PallasConfig, PallasTarget
from kernels.dplr.pallas import state_pass as pallas_state_pass
from kernels.dplr.precompute import precompute as pallas_precompute
from kernels.dplr.reference import _check, dplr_reference, dplr_step
from kernels.dplr.xla import _dplr_chunked

Impl = Literal["auto", "xla", "reference", "pallas"]
Precompute = Literal["xla", "pallas"]
IMPLS = ("auto", "xla", "reference", "pallas")

__all__ = ["IMPLS", "PallasConfig", "choice", "delta_rule_as_dplr", "dplr", "dplr_reference", "dplr_step"]


def choice(requested: str = "auto", *, chunk_size: int = 16, interpret: bool = False,
           pallas_target: str | None = None) -> dispatch.Choice:
  """What runs ``dplr`` with chunks of ``chunk_size`` here (:func:`kernels.dispatch.dplr`)."""
  chunk_problem = None if is_pallas_chunk(chunk_size) else (
      f"needs chunk_size a power of two ≥ 16 (got {chunk_size}; Triton tiles)")
  return dispatch.dplr(requested, IMPLS, chunk_problem=chunk_problem, interpret=interpret,
                       layout=dispatch.pallas_layout(pallas_target, "dplr"))


def dplr(q, k, v, a, b, log_decay=None, initial_state=None, *, segment_ids=None, chunk_size: int = 16,
         impl: Impl = "auto", interpret: bool = False, pallas_target: PallasTarget | None = None,
         pallas_config: PallasConfig | None = None, precompute: Precompute = "xla"):
  """``S_t = (Diag(e^{log_decay_t}) − a_t b_tᵀ) S_{t−1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` (module docstring).

  Args:
    q, k: ``[batch, time, heads, d_k]``; v: ``[batch, time, heads, d_v]``.
    a, b: ``[batch, time, heads, d_k]``: the rank-one part ``a_t b_tᵀ`` of the transition (``b`` reads
      the old state, ``a`` is where the reading is removed).
    log_decay: ``[batch, time, heads, d_k]`` (per key channel), ``[batch, time, heads]`` (per head),
      values ≤ 0, or None (no decay).
    initial_state: ``[batch, heads, d_k, d_v]`` or None (zeros); with ``segment_ids``, the state
      entering the row's first document only.
    segment_ids: int ``[batch, time]`` or None: packed documents (a new one starts where the id changes;
      the state entering it is zero; the final state is the last document's alone). None: one sequence.
    chunk_size: tokens per chunk of the chunked forms (``"pallas"``: a power of two ≥ 16).
    impl: ``"reference"``, ``"xla"`` (chunked), ``"pallas"`` (chunked, Pallas state pass) or ``"auto"``
      (``"xla"``, until the Pallas path is measured faster: :func:`kernels.dispatch.dplr`).
    interpret: run the Pallas kernels in the Pallas interpreter (CPU tests); only with ``"pallas"``.
    pallas_target: ``"triton"`` or ``"mosaic_tpu"`` (older name ``"mosaic"``) kernels (default: by
      platform at lowering time; Triton when interpreting).
    pallas_config: Triton launch parameters (:class:`kernels.delta.pallas.PallasConfig`; the state pass
      reads ``block_v``, ``warps`` and ``stages``; the precompute kernel ``wy_warps``).
    precompute: with ``impl="pallas"`` and a Triton lowering, ``"pallas"`` runs the chunk precompute
      (pair products, UT solve, decays to the chunk end) as one Pallas kernel
      (:func:`kernels.dplr.precompute.precompute`; backward: the XLA form's vjp) instead of XLA
      (``"xla"``, the default until a GPU run measures the kernel faster).
  Returns:
    ``(o [batch, time, heads, d_v] in v.dtype, final_state f32 [batch, heads, d_k, d_v])``.
  """
  _check(q, k, v, a, b, log_decay, initial_state, segment_ids)
  if precompute not in ("xla", "pallas"):
    raise ValueError(f"dplr: precompute={precompute!r} must be 'xla' or 'pallas'")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"dplr: chunk_size={chunk_size!r} must be a positive integer")
  if impl == "pallas":  # (the kernels' own messages for their arguments first)
    check_pallas_arguments(chunk_size, pallas_target, pallas_config, family="dplr")
  taken = dispatch.called(choice(impl, chunk_size=chunk_size, interpret=interpret, pallas_target=pallas_target),
                          q=q, v=v, chunk_size=chunk_size)
  impl = taken.impl
  if precompute == "pallas" and (impl != "pallas" or taken.lowering == "mosaic_tpu"):
    raise ValueError(f"dplr: precompute='pallas' runs with impl='pallas' and the Triton layout only "
                     f"(got impl={impl!r}, pallas_target={pallas_target!r}, backend {dispatch.backend()!r})")
  if impl == "reference":
    return dplr_reference(q, k, v, a, b, log_decay, initial_state, segment_ids)
  if impl == "pallas":
    dtype = jnp.dtype(jnp.result_type(q.dtype, k.dtype, v.dtype, a.dtype, b.dtype))
    # 16-bit inputs: the kernel's dots run in that dtype (tensor cores), f32 otherwise.
    dot_dtype = dtype.name if dtype.itemsize == 2 else "float32"
    state_pass = functools.partial(pallas_state_pass, dot_dtype=dot_dtype, interpret=interpret,
                                   target=pallas_target, config=pallas_config)
    if precompute == "pallas":
      warps = (pallas_config or PallasConfig()).wy_warps
      chunks = functools.partial(pallas_precompute, interpret=interpret, warps=warps)
      return _dplr_chunked(q, k, v, a, b, log_decay, initial_state, chunk_size, segment_ids, state_pass, chunks)
    return _dplr_chunked(q, k, v, a, b, log_decay, initial_state, chunk_size, segment_ids, state_pass)
  return _dplr_chunked(q, k, v, a, b, log_decay, initial_state, chunk_size, segment_ids)


def delta_rule_as_dplr(k, beta, log_decay=None):
  """The (gated) delta rule ``S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ`` as this kernel's
  inputs: ``(keys β k, a = β k, b = α ⊙ k)`` (f32), values unchanged. ``k: [batch, time, heads, d_k]``,
  ``beta: [batch, time, heads]``, ``log_decay = log α``: ``[batch, time, heads, d_k]`` (Kimi Delta
  Attention), ``[batch, time, heads]`` (Gated DeltaNet, where it equals ``α (I − β k kᵀ) S + β k vᵀ``) or
  None (DeltaNet). Pass ``log_decay`` on to :func:`dplr` as well."""
  k = k.astype(jnp.float32)
  written = beta.astype(jnp.float32)[..., None] * k
  if log_decay is None:
    return written, written, k
  decay = jnp.exp(log_decay.astype(jnp.float32))
  return written, written, (decay if decay.ndim == k.ndim else decay[..., None]) * k
