"""The generalized delta rule's sequential pass over chunks as Pallas kernels (``dplr(impl="pallas")``).

The chunked form (``kernels/dplr/xla.py``) leaves one recurrence over chunks n, with per chunk ``W_n``,
``Â_n = a_s e^{G_C − G_s}`` ``[c, d_k]``, ``Ũ_n [c, d_v]``, ``X_n = Σ_s e^{G_C − G_s} ⊙ k_s v_sᵀ
[d_k, d_v]`` and the chunk decay ``γ_n`` (per key channel, per head, or 1):

    entering_n = S;   U_n = Ũ_n + W_n S;   S ← Γ_n S + X_n − Â_nᵀ U_n

This is the delta rule's pass (``kernels.delta.pallas.state_pass``: ``U = Ũ − W S``,
``S ← Γ S + K̂ᵀ U + X``) with ``W → −W`` and ``K̂ → −Â``, so the same kernels run it, forward and
backward (Triton on GPU, Mosaic on TPU, the Pallas interpreter on CPU); the precompute and the outputs
stay XLA. The negations are elementwise and XLA fuses them into the ops that make ``W`` and ``Â``.
"""

from __future__ import annotations

from kernels.delta.pallas import PallasConfig, PallasTarget
from kernels.delta.pallas import state_pass as delta_state_pass

__all__ = ["PallasConfig", "state_pass"]


def state_pass(w, u_tilde, a_to_end, kv_to_end, chunk_decay, state0, *, dot_dtype="float32",
               interpret: bool = False, target: PallasTarget | None = None, config: PallasConfig | None = None):
  """``U_n = Ũ_n + W_n S``, ``S ← Γ_n S + X_n − Â_nᵀ U_n`` over chunks n as the Pallas state pass
  (differentiable; the same signature as :func:`kernels.dplr.xla._scan_pass`).

  Args:
    w, a_to_end: ``[batch, chunks, heads, chunk, d_k]``; u_tilde: ``[batch, chunks, heads, chunk, d_v]``;
      kv_to_end: ``[batch, chunks, heads, d_k, d_v]``; chunk_decay: ``[batch, chunks, heads, d_k]`` (per
      key channel) or ``[batch, chunks, heads]`` (per head); state0: ``[batch, heads, d_k, d_v]``; all f32.
    dot_dtype, interpret, target, config: as :func:`kernels.delta.pallas.state_pass`.
  Returns:
    ``(entering [batch, chunks, heads, d_k, d_v], u [batch, chunks, heads, chunk, d_v],
    final [batch, heads, d_k, d_v])``, f32.
  """
  return delta_state_pass(-w, u_tilde, -a_to_end, chunk_decay, state0, added=kv_to_end, dot_dtype=dot_dtype,
                          interpret=interpret, target=target, config=config)
