"""Gated linear attention: the matrix-state recurrence shared by linear attention, Based, RetNet, GLA,
Mamba-2 (SSD), mLSTM and RWKV-6.

    S_t = diag(α_t) S_{t−1} + k_t v_tᵀ          S_t ∈ R^{d_k × d_v} per head
    o_t = S_tᵀ q_t

``log_decay = log α_t ≤ 0`` is per key dimension ``[batch, time, heads, d_k]`` (GLA, RWKV-6), one
scalar per head ``[batch, time, heads]`` (RetNet, Mamba-2, mLSTM) or None (α = 1: linear attention,
Based). Feature maps, scalings and normalisers belong to the mixers: a normaliser ``Σ φ(k_s)`` is a
column of ones appended to ``v``.

Exponential input gate (mLSTM, Beck et al. 2024, §2.3 and the stabilised form of §2.2). With
``log_input_gate = ĩ_t: [batch, time, heads]`` (unbounded, may be large and positive) the recurrence is

    C_t = α_t C_{t−1} + exp(ĩ_t) k_t v_tᵀ                 (α_t: one scalar per head, or 1)

and ``exp(ĩ_t)`` would overflow, so the state is carried scaled by a running stabiliser:

    m_t = max(log α_t + m_{t−1}, ĩ_t)                     (m_0 = 0 unless given)
    S_t = C_t · exp(−m_t) = exp(log α_t + m_{t−1} − m_t) S_{t−1} + exp(ĩ_t − m_t) k_t v_tᵀ
    o_t = S_tᵀ q_t = exp(−m_t) C_tᵀ q_t

Both exponents are ≤ 0. The unscaled output is ``o_t · exp(m_t)``; the mLSTM forms
``C_tᵀq_t / max(|n_tᵀq_t|, 1) = o_t / max(|ν_t|, exp(−m_t))`` with ``ν_t`` the output of a ones
column appended to ``v`` (its normaliser), so ``m_t`` is returned beside the output.

Packed documents (``segment_ids: int [batch, time]``; a document starts where the id changes from
t − 1 to t): the state entering a start is zero, α_t = 0 there, for every decay kind; with the input
gate the pair entering a start is (S, m) = (0, 0), what a row that begins with that document gets by
default (so m_t = max(log α_t, ĩ_t) there, and a packed row equals its documents run one by one).
``initial_state`` enters the row's first document only (position 0 is no start); the final state is
the last document's alone. No implementation puts −∞ into a cumulative log-decay: the XLA chunked
form sets a start's own log α to 0 (it only multiplies the discarded state), the Pallas kernels leave
it (finite, and every product it would decay is masked) and zero its gradient; both mask: a pair (s ≤ t)
counts only within one document, the state entering a chunk reaches t only if no start lies in
(chunk start, t], and a chunk's outgoing state keeps the entering one only if the chunk has no start
and adds only its last document's tokens. With the input gate the chunked stabiliser's candidates
follow the same masks, and a start p inside the chunk adds the candidate b_t − b_p + log α_p of its
(0, 0) entering pair (a stabiliser-only gate max(ĩ_p, log α_p) at p). ``segment_ids=None`` runs the
code paths without documents unchanged.

Shapes: ``q, k: [batch, time, heads, d_k]``, ``v: [batch, time, heads, d_v]``. Without an input gate
the state is ``S: f32 [batch, heads, d_k, d_v]``; with one it is the pair ``(S, m)`` with
``m: f32 [batch, heads]``, for ``initial_state``, the returned final state and ``gla_step``.

Implementations:
- ``"reference"``: the recurrence above, one ``lax.scan`` step per token (f32).
- ``"xla"``: chunked (Yang et al. 2024, §3): tokens in chunks of ``chunk_size``; inside a chunk the
  output is a masked attention-like product, across chunks the state is carried by a scan over
  chunks. Every decay factor is ``exp`` of a difference ``b_t − b_s`` of within-chunk cumulative
  log-decays with ``s ≤ t``, so exponents are ≤ 0 and nothing overflows however strong the decay —
  the failure mode of the ``q·exp(b)``, ``k·exp(−b)`` factorisation. With an input gate the
  stabiliser has the closed form ``m_t = max(b_t + m_in, max_{s≤t}(b_t − b_s + ĩ_s))`` (``m_in``:
  the stabiliser entering the chunk), i.e. a per-row maximum of the intra-chunk exponents and the
  carried stabiliser; subtracting it keeps every exponent ≤ 0. The chunk scan carries ``(S, m)``,
  each chunk's contribution scaled by its own local maximum ``g = max_s(b_C − b_s + ĩ_s)``.
- ``"pallas"``: the chunked form as Pallas kernels (Triton on GPU, Mosaic TPU) with a
  ``jax.custom_vjp`` whose backward is chunked too; see ``pallas.py``. It caps log α at −20 per
  step (``MIN_LOG_DECAY``). On Hopper its output stage is a Mosaic GPU kernel (``mosaic_gpu.py``).
  With ``log_input_gate`` (mLSTM) there is no kernel: ``"pallas"`` runs ``"xla"``, a choice
  :func:`kernels.dispatch.gla` records. With ``segment_ids`` the kernels apply the document masks
  themselves, the Mosaic GPU output stage's included (checked on an H100; ``bench.py --segments``).
- ``"auto"``: ``"pallas"`` on GPU for head dims ≤ 128 (those measured; ``kernels/BENCHMARKS.md``),
  ``"xla"`` elsewhere (the Mosaic TPU kernels are export-tested only, never timed on a TPU).

Files: ``reference.py`` (the recurrence, ``gla_step``), ``xla.py`` (chunked), ``pallas.py``,
``mosaic_gpu.py``, ``bench.py`` (``python -m kernels.bench --kernels gla``).
"""

from __future__ import annotations

from typing import Literal

from kernels import dispatch
from kernels.gla.pallas import MIN_LOG_DECAY, PallasConfig, PallasTarget, gla_pallas
from kernels.gla.reference import _check, gla_reference, gla_step
from kernels.gla.xla import _gla_chunked

Impl = Literal["auto", "xla", "reference", "pallas"]
IMPLS = ("auto", "xla", "reference", "pallas")
AUTO_MAX_HEAD_DIM = dispatch.AUTO_MAX_HEAD_DIM

__all__ = ["IMPLS", "MIN_LOG_DECAY", "PallasConfig", "choice", "gla", "gla_pallas", "gla_reference", "gla_step"]


def choice(d_k: int, d_v: int, requested: str = "auto", *, gated: bool = False, interpret: bool = False,
           pallas_target: str | None = None, dtype=None) -> dispatch.Choice:
  """What runs ``gla`` for heads of ``d_k`` × ``d_v`` here (:func:`kernels.dispatch.gla`); ``gated``:
  with the mLSTM input gate; ``dtype``: of q, k, v."""
  return dispatch.gla(requested, IMPLS, d_k=d_k, d_v=d_v, gated=gated, interpret=interpret,
                      layout=dispatch.pallas_layout(pallas_target, "gla"), dtype=dtype)


def auto_impl(d_k: int, d_v: int) -> str:
  """What ``impl="auto"`` runs for heads of ``d_k`` × ``d_v``."""
  return choice(d_k, d_v).impl


def gla(q, k, v, log_decay=None, initial_state=None, *, log_input_gate=None, segment_ids=None,
        chunk_size: int = 16, impl: Impl = "auto", interpret: bool = False,
        pallas_target: PallasTarget | None = None, pallas_config: PallasConfig | None = None):
  """``S_t = diag(exp(log_decay_t)) S_{t−1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` (see the module docstring).

  Args:
    q, k: ``[batch, time, heads, d_k]``; v: ``[batch, time, heads, d_v]``.
    log_decay: ``[batch, time, heads, d_k]``, ``[batch, time, heads]`` or None; values ≤ 0.
    initial_state: ``[batch, heads, d_k, d_v]`` or None (zeros); with ``log_input_gate`` the pair
      ``(S [batch, heads, d_k, d_v], m [batch, heads])`` or None (zeros, m = 0).
    log_input_gate: None, or ĩ ``[batch, time, heads]``: the exponential input gate of the mLSTM,
      ``C_t = α_t C_{t−1} + exp(ĩ_t) k_t v_tᵀ``, carried stabilised (needs a per-head or no decay).
    segment_ids: None, or int ``[batch, time]``: packed documents (a new one starts where the id
      changes from t − 1 to t); the state entering a start is zero (``(S, m) = (0, 0)`` with the
      input gate), ``initial_state`` enters the row's first document only, and the final state is
      the last document's alone.
    chunk_size: tokens per chunk of the ``"xla"`` chunked form (the Pallas kernels take theirs from
      ``pallas_config``).
    impl: ``"reference"``, ``"xla"`` (chunked), ``"pallas"`` or ``"auto"`` (:func:`kernels.dispatch.gla`).
    interpret: run the Pallas kernels in the Pallas interpreter (CPU tests); only with ``"pallas"``.
    pallas_target: ``"triton"`` or ``"mosaic_tpu"`` (older name ``"mosaic"``) layout of the Pallas kernels (default: by platform at
      lowering time; Triton when interpreting).
    pallas_config: tiling of the Pallas kernels (default :class:`PallasConfig`).
  Returns:
    ``(o [batch, time, heads, d_v], final_state f32 [batch, heads, d_k, d_v])``; with
    ``log_input_gate``: ``(o, (S, m) final, m [batch, time, heads] f32)`` where ``o_t = exp(−m_t) C_tᵀq_t``
    and ``S = exp(−m) C``.
  """
  _check(q, k, v, log_decay, initial_state, log_input_gate, segment_ids)
  if impl not in IMPLS:
    raise ValueError(f"gla: unknown impl {impl!r}; valid: {IMPLS}")
  if chunk_size <= 0:
    raise ValueError(f"gla: chunk_size={chunk_size} must be positive")
  taken = choice(q.shape[-1], v.shape[-1], impl, gated=log_input_gate is not None, interpret=interpret, dtype=q.dtype,
                 pallas_target=pallas_target)
  impl = dispatch.called(taken, q=q, v=v, log_input_gate=log_input_gate).impl
  if impl == "reference":
    return gla_reference(q, k, v, log_decay, initial_state, log_input_gate=log_input_gate, segment_ids=segment_ids)
  if impl == "pallas":
    return gla_pallas(q, k, v, log_decay, initial_state, segment_ids=segment_ids, interpret=interpret,
                      target=pallas_target, config=pallas_config)
  return _gla_chunked(q, k, v, log_decay, initial_state, chunk_size, log_input_gate, segment_ids)

