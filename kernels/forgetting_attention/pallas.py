"""Forgetting attention as flash attention (``impl="pallas"``): the sliding-window flash kernels of
``kernels/window_attention/pallas.py`` (Triton on GPU, Mosaic on TPU) with their decay bias.

The kernels add ``c_i − c_j`` to each logit tile by tile, ``c`` the (document-restarting) cumulative
log forget gate in float32, read per query head: query rows their own ``c_i``, key columns ``c_j``.
The band's masks (window, causality, documents) drop a pair before any exp, so the only biases that
reach one are ``Σ_{j<l≤i} log f_l ≤ 0``. The backward returns ``dc`` from the tiles' softmax-logit
gradients ``dS`` (``dc_i = Σ_j dS_ij − Σ_l dS_li``: row sums in the dQ kernel, column sums in the
dK/dV kernel); ``d log f``, the reverse document-restarting cumulative sum of ``dc``, is XLA's
gradient of :func:`cumulative_log_forget`.

Rounding: ``c`` runs the length of a document, so ``c_i − c_j`` loses about ``|c_i|·2⁻²⁴`` (as in the
authors' kernel); the XLA band forms its bias from block-local sums instead (``xla.py``).
"""

from __future__ import annotations

from kernels.forgetting_attention.reference import cumulative_log_forget
from kernels.window_attention.pallas import PallasBlocks, PallasTarget, flash_window_attention


def flash_forgetting_attention(q, k, v, log_forget, *, window: int | None = None, segment_ids=None,
                               interpret: bool = False, target: PallasTarget | None = None,
                               blocks: PallasBlocks | None = None):
  """The Pallas path of :func:`kernels.forgetting_attention.forgetting_attention` (same arguments and
  result; ``segment_ids`` already renumbered by ``document_index``, or None)."""
  c = cumulative_log_forget(log_forget, segment_ids)  # [batch, time, heads], f32
  return flash_window_attention(q, k, v, window=window, interpret=interpret, target=target, blocks=blocks,
                                segment_ids=segment_ids, decay_bias=c)
