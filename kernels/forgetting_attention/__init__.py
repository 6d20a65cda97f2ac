"""Forgetting attention: causal softmax attention with a forget gate (Lin et al. 2025, "Forgetting
Transformer: Softmax Attention with a Forget Gate", ICLR 2025).

    o_i = Σ_{j ∈ band(i)} softmax_j(q_i·k_j/√d + D_ij) v_j,   D_ij = Σ_{j<l≤i} log f_l = c_i − c_j

with ``f_t ∈ (0, 1]`` one gate per query head and step, ``c_t = Σ_{l≤t} log f_l`` and
``band(i) = {j : 0 ≤ i − j < window}`` (``window=None``: every ``j ≤ i``). ``D_ij ≤ 0`` for ``j ≤ i``:
a key's weight decays by the gates of every later step, so recent keys count more (FoX uses no
positional encoding: the gate plays that role). GQA/MQA: query head ``h`` reads key/value head
``h // (heads // kv_heads)``; the gate is the query head's own.

Shapes: ``q: [batch, time, heads, head_dim]``, ``k, v: [batch, time, kv_heads, head_dim]``,
``log_forget: [batch, time, heads]`` (``log f``, ≤ 0; read in float32).

Implementations:
- ``"reference"``: dense ``[time, time]`` scores plus the bias ``c_i − c_j`` and a band mask, in
  float32 — the definition, O(T²).
- ``"xla"``: with a window shorter than the sequence, the blocked band of ``kernels.window_attention``
  (query block ``n`` reads key blocks ``n − ⌈(W−1)/block⌉ … n``; O(T·(W + block))), its bias formed
  from block-local sums of ``log f`` (``xla.py``: its rounding does not grow along the row). Global
  attention (``window`` None or ≥ time) has no band to exploit: the dense form, as ``"reference"``.
- ``"pallas"``: flash attention, O(T·W) with a window and O(T²/2) without, never forming a score
  matrix: the sliding-window flash kernels of ``kernels/window_attention/pallas.py`` (forward, dQ and
  dK/dV kernels with lse residuals, band block ranges, document bounds) with their optional decay
  bias, which adds ``c_i − c_j`` to each logit tile. Its backward also returns ``dc`` (row sums of the
  tiles' ``dS`` in the dQ kernel, minus column sums in the dK/dV kernel); ``d log f`` is the reverse,
  document-restarting cumulative sum of ``dc``, in XLA. Lowerings: Triton on GPU (the Hopper Mosaic
  GPU window kernels take no bias, so Hopper runs Triton too), Mosaic on TPU (lowering tested only),
  the Pallas interpreter on CPU with ``interpret=True``. Rounding (issue 24): ``|c|`` grows along a
  document (``T·|log f|``), and one float32 ``c`` per position (as in the authors' Triton kernel)
  would lose about ``|c|·2⁻²⁴`` of each bias; so ``c`` reaches the kernels as two float32 parts
  ``hi + lo`` from a compensated cumulative sum, and they form ``(hi_i − hi_j) + (lo_i − lo_j)``,
  whose rounding is that of the bias itself, as in ``"xla"`` (``pallas.py`` says why this and not a
  per-block reference).
- ``"auto"``: ``"xla"`` on every platform until a GPU benchmark (``bench.py``) shows ``"pallas"``
  faster; :func:`choice` (``kernels.dispatch.forgetting_attention``) records why each other
  candidate was passed over.

Packed documents (``segment_ids [batch, time]``, issue 23): a new document starts at t = 0 and
wherever the id changes; a query reads only keys of its own document (ids renumbered by
``kernels.window_attention.document_index``, so an id that recurs names a new document), and the
cumulative log-forget restarts at each start (only pairs of one document are read, so the restart
changes rounding, not the definition).

Decoding (:func:`decode_forgetting_attention`): a key/value cache plus, per slot and query head,
the log-forget accumulated since that slot's key was written (``Σ_{j<l≤t} log f_l``, which the
caller adds ``log f_t`` to at every step and sets to 0 for the key it writes): each slot carries its
own bias, so decoding never forms a difference of two long cumulative sums.

Files: ``reference.py`` (the definition, the checks, the restarting cumulative sum, decode),
``xla.py`` (the blocked band), ``pallas.py`` (the flash path over the window-attention kernels),
``bench.py`` (``python -m kernels.forgetting_attention.bench``: ours, Pallas and XLA, against the
authors' Triton kernel where it imports).
"""

from __future__ import annotations

from typing import Literal

from kernels import dispatch
from kernels.forgetting_attention.pallas import flash_forgetting_attention
from kernels.forgetting_attention.reference import (MASKED, check, cumulative_log_forget,
                                                    decode_forgetting_attention, document_starts,
                                                    forgetting_attention_reference)
from kernels.forgetting_attention.xla import banded
from kernels.window_attention import document_index
from kernels.window_attention.pallas import PallasBlocks, PallasTarget
from kernels.window_attention.xla import default_block_size

Impl = Literal["auto", "xla", "reference", "pallas"]
IMPLS = ("auto", "xla", "reference", "pallas")

__all__ = ["IMPLS", "MASKED", "PallasBlocks", "choice", "cumulative_log_forget", "decode_forgetting_attention",
           "document_starts", "forgetting_attention", "forgetting_attention_reference"]


def choice(requested: str = "auto", *, interpret: bool = False, pallas_target: str | None = None) -> dispatch.Choice:
  """What runs ``forgetting_attention`` here (:func:`kernels.dispatch.forgetting_attention`)."""
  return dispatch.forgetting_attention(requested, IMPLS, interpret=interpret,
                                       layout=dispatch.pallas_layout(pallas_target, "forgetting_attention"))


def forgetting_attention(q, k, v, log_forget, *, window: int | None = None, segment_ids=None,
                         impl: Impl = "auto", block_size: int | None = None, interpret: bool = False,
                         pallas_target: PallasTarget | None = None, pallas_blocks: PallasBlocks | None = None):
  """Causal softmax attention with the forget-gate bias ``Σ_{j<l≤i} log f_l`` (module docstring).

  Args:
    q: ``[batch, time, heads, head_dim]``; k, v: ``[batch, time, kv_heads, head_dim]``.
    log_forget: ``[batch, time, heads]``, ``log f_t ≤ 0`` per query head.
    window: band width W ≥ 1 (position t reads t−W+1 … t) or None for global causal attention.
    segment_ids: optional ``int [batch, time]``: packed documents; a query reads only keys of its
      own document.
    impl: ``"reference"`` (dense), ``"xla"`` (blocked band when windowed), ``"pallas"`` (flash
      attention) or ``"auto"`` (``"xla"``; :func:`choice`). A request that cannot run here is a
      ValueError naming why.
    block_size: query/key block of the banded ``"xla"`` path (default: ``min(window, 128)``).
    interpret: run the Pallas kernels in the Pallas interpreter (CPU tests).
    pallas_target: ``"triton"`` or ``"mosaic_tpu"`` lowering (default: by platform; Triton when
      interpreting).
    pallas_blocks: tile sizes of the Pallas kernels (``kernels.window_attention.PallasBlocks``; the
      ``mgpu_*`` and ``*_kernel`` fields do not apply: Triton always runs on a GPU).
  Returns:
    ``[batch, time, heads, head_dim]`` in ``q.dtype``.
  """
  check(q, k, v, log_forget, window, segment_ids)
  if impl not in IMPLS:
    raise ValueError(f"forgetting_attention: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
    raise ValueError(f"forgetting_attention: block_size must be a positive int or None, got {block_size!r}")
  impl = dispatch.called(choice(impl, interpret=interpret, pallas_target=pallas_target), q=q).impl
  ids = None if segment_ids is None else document_index(segment_ids)
  if impl == "pallas":
    return flash_forgetting_attention(q, k, v, log_forget, window=window, segment_ids=ids, interpret=interpret,
                                      target=pallas_target, blocks=pallas_blocks)
  if impl == "reference" or window is None or window >= q.shape[1]:
    # Global causal attention has no band to exploit; the dense form is the O(T²) it must be.
    return forgetting_attention_reference(q, k, v, log_forget, window=window, segment_ids=segment_ids)
  return banded(q, k, v, log_forget, window, block_size or default_block_size(window), ids)
