"""Forgetting attention as flash attention (``impl="pallas"``): the sliding-window flash kernels of
``kernels/window_attention/pallas.py`` (Triton on GPU, Mosaic on TPU) with their decay bias.

The kernels add ``c_i − c_j`` to each logit tile by tile, ``c`` the (document-restarting) cumulative
log forget gate, read per query head: query rows their own ``c_i``, key columns ``c_j``. The band's
masks (window, causality, documents) drop a pair before any exp, so the only biases that reach one
are ``Σ_{j<l≤i} log f_l ≤ 0``. The backward returns ``dc`` from the tiles' softmax-logit gradients
``dS`` (``dc_i = Σ_j dS_ij − Σ_l dS_li``: row sums in the dQ kernel, column sums in the dK/dV kernel);
``d log f`` is the reverse, document-restarting cumulative sum of ``dc``, in XLA.

Rounding: ``|c|`` grows along a document (``T·|log f|``), and one float32 ``c`` per position would lose
``|c|·2⁻²⁴`` of every bias (as the authors' kernel does; 1537 steps of ``log f ≈ −3`` put ``|c|`` near
4600 and the output 4e-4 off). So ``c`` goes to the kernels as two float32 parts, ``hi = fl(c)`` and
``lo`` ≈ ``c − hi``, from a compensated cumulative sum (TwoSum in an associative scan: no float64,
which GPUs run slowly and TPUs not at all), and the kernels form ``(hi_i − hi_j) + (lo_i − lo_j)``:
``hi_i − hi_j`` is exact for the nearby ``c`` of one sign a band pairs, so each bias keeps the
rounding of its own size, as the block-local sums of the XLA band (``xla.py``) do. Chosen over
subtracting a per-block reference ``c`` in the kernels because the parts are per position: every
kernel (forward, dQ, dK/dV; Triton's three tilings and Mosaic's one) reads them as it read ``c``, with
one more vector per tile and two more subtractions per logit, and no kernel needs to know a block
structure. The gradient reaches both parts identically (the logits read only ``hi + lo``); ``d log f``
takes it once, as differentiating TwoSum would (``hi`` carries the first-order change, ``lo`` only
rounding), and its reverse sum runs over ``dc``, whose partial sums stay small (a document's ``dc``
sums to zero), so it needs no second part.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.documents import segmented_scan
from kernels.forgetting_attention.reference import document_starts
from kernels.window_attention.pallas import PallasBlocks, PallasTarget, flash_window_attention


def _two_sum(a, b):
  """``(s, e)`` with ``s = fl(a + b)`` and ``e`` its rounding error, exactly (Knuth's TwoSum: no
  branch on which of ``a``, ``b`` is larger)."""
  s = a + b
  b_part = s - a
  return s, (a - (s - b_part)) + (b - b_part)


def _add_parts(x, y):
  """``(hi, lo) + (hi, lo)`` in double-float arithmetic. Both sums of ``log f ≤ 0`` share a sign, so
  nothing cancels and the result keeps about 2⁻⁴⁴ of its size."""
  s, e = _two_sum(x[0], y[0])
  e = e + (x[1] + y[1])
  hi = s + e
  return hi, e - (hi - s)  # |s| ≥ |e|: the error of hi = fl(s + e) in two operations


@jax.custom_vjp
def _cumulative_parts(log_forget, starts):
  """``c = Σ_{document start ≤ l ≤ t} log f_l`` as two float32 parts ``(hi, lo)``, ``hi + lo = c`` to
  about 2⁻⁴⁴·|c|. ``log_forget``: f32 ``[batch, time, heads]``; ``starts``: bool, the same shape."""
  parts = (log_forget, jnp.zeros_like(log_forget))
  return segmented_scan(_add_parts, parts, starts, axis=1)


def _cumulative_parts_fwd(log_forget, starts):
  return _cumulative_parts(log_forget, starts), starts


def _cumulative_parts_bwd(starts, cotangents):
  d_hi, _ = cotangents  # the same dc as d_lo (the flash core's): taken once, for c = hi + lo
  ends = jnp.concatenate([starts[:, 1:], jnp.ones_like(starts[:, :1])], axis=1)  # last step of a document
  d_log_forget = segmented_scan(jnp.add, d_hi, ends, axis=1, reverse=True)
  return d_log_forget, None


_cumulative_parts.defvjp(_cumulative_parts_fwd, _cumulative_parts_bwd)


def cumulative_log_forget_parts(log_forget, segment_ids=None):
  """The cumulative log forget gate of :func:`kernels.forgetting_attention.cumulative_log_forget`
  (restarting at each document of ``segment_ids [batch, time]``) as two float32 parts ``(hi, lo)``,
  each ``[batch, time, heads]``: ``hi`` is ``c`` rounded to float32 and ``lo`` the remainder, so
  ``hi + lo`` keeps ``c`` far beyond float32 (module docstring). Differentiable: the cotangent of
  ``hi`` is taken as that of ``c`` (the kernels give ``lo`` the same one)."""
  log_forget = log_forget.astype(jnp.float32)
  if segment_ids is None:
    starts = jnp.zeros(log_forget.shape[:2], bool).at[:, 0].set(True)
  else:
    starts = document_starts(segment_ids)
  return _cumulative_parts(log_forget, jnp.broadcast_to(starts[..., None], log_forget.shape))


def flash_forgetting_attention(q, k, v, log_forget, *, window: int | None = None, segment_ids=None,
                               interpret: bool = False, target: PallasTarget | None = None,
                               blocks: PallasBlocks | None = None):
  """The Pallas path of :func:`kernels.forgetting_attention.forgetting_attention` (same arguments and
  result; ``segment_ids`` already renumbered by ``document_index``, or None)."""
  c_parts = cumulative_log_forget_parts(log_forget, segment_ids)  # (hi, lo), each [batch, time, heads]
  return flash_window_attention(q, k, v, window=window, interpret=interpret, target=target, blocks=blocks,
                                segment_ids=segment_ids, decay_bias=c_parts)
