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
- ``"auto"``: ``"xla"``. There is no Pallas kernel for this family yet: a flash kernel would add the
  bias tile by tile from ``c`` (the authors' Triton kernel does).

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
``xla.py`` (the blocked band).
"""

from __future__ import annotations

from typing import Literal

from kernels.forgetting_attention.reference import (MASKED, check, cumulative_log_forget,
                                                    decode_forgetting_attention, document_starts,
                                                    forgetting_attention_reference)
from kernels.forgetting_attention.xla import banded
from kernels.window_attention import document_index
from kernels.window_attention.xla import default_block_size

Impl = Literal["auto", "xla", "reference"]
IMPLS = ("auto", "xla", "reference")

__all__ = ["IMPLS", "MASKED", "cumulative_log_forget", "decode_forgetting_attention", "document_starts",
           "forgetting_attention", "forgetting_attention_reference"]


def forgetting_attention(q, k, v, log_forget, *, window: int | None = None, segment_ids=None,
                         impl: Impl = "auto", block_size: int | None = None):
  """Causal softmax attention with the forget-gate bias ``Σ_{j<l≤i} log f_l`` (module docstring).

  Args:
    q: ``[batch, time, heads, head_dim]``; k, v: ``[batch, time, kv_heads, head_dim]``.
    log_forget: ``[batch, time, heads]``, ``log f_t ≤ 0`` per query head.
    window: band width W ≥ 1 (position t reads t−W+1 … t) or None for global causal attention.
    segment_ids: optional ``int [batch, time]``: packed documents; a query reads only keys of its
      own document.
    impl: ``"reference"`` (dense), ``"xla"`` (blocked band when windowed) or ``"auto"`` (``"xla"``).
    block_size: query/key block of the banded ``"xla"`` path (default: ``min(window, 128)``).
  Returns:
    ``[batch, time, heads, head_dim]`` in ``q.dtype``.
  """
  check(q, k, v, log_forget, window, segment_ids)
  if impl not in IMPLS:
    raise ValueError(f"forgetting_attention: unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
    raise ValueError(f"forgetting_attention: block_size must be a positive int or None, got {block_size!r}")
  if impl == "reference" or window is None or window >= q.shape[1]:
    # Global causal attention has no band to exploit; the dense form is the O(T²) it must be.
    return forgetting_attention_reference(q, k, v, log_forget, window=window, segment_ids=segment_ids)
  ids = None if segment_ids is None else document_index(segment_ids)
  return banded(q, k, v, log_forget, window, block_size or default_block_size(window), ids)
