"""Causal (sliding-window) softmax attention with grouped key/value heads.

``o_t = Σ_{s ∈ band(t)} softmax_s(q_t · k_s / √d) v_s`` where ``band(t) = {s : 0 ≤ t − s < window}``
(``window=None``: every ``s ≤ t``, i.e. global causal attention). GQA/MQA: query head ``h`` reads
key/value head ``h // (heads // kv_heads)``. An optional logit soft-cap ``c·tanh(s/c)`` (Gemma 2).

Shapes: ``q: [batch, time, heads, head_dim]``, ``k, v: [batch, time, kv_heads, head_dim]``.

Implementations:
- ``"reference"``: dense ``[time, time]`` scores with a band mask — the definition, O(T²).
- ``"xla"``: blocked band; query block ``i`` of ``block_size`` rows reads only key blocks
  ``i − ⌈(window−1)/block⌉ … i``, so time and memory are O(T·(W + block)), not O(T²).
- ``"pallas"``: flash attention (Dao 2023, "FlashAttention-2") as a ``jax.custom_vjp``. The forward
  keeps running f32 softmax statistics ``m, l`` per query row and saves only ``lse = m + log l``; the
  backward recomputes the probabilities ``p = exp(s − lse)`` block by block, with
  ``Δ_t = Σ_d o_td · do_td`` (so ``ds = p ⊙ (dp − Δ)``), in two kernels: one per query block
  (dQ, and on GPU Δ for the next) and one per key block (dK, dV, summed over the query heads of its
  group, so GQA needs no ``[.., heads, ..]`` dK buffer). Only key blocks
  that intersect the band are visited, so the cost is O(T·W). With a soft-cap ``s = c·tanh(x/c)``
  the backward multiplies ``ds`` by ``∂s/∂x = 1 − tanh²(x/c)``. Lengths that are not a multiple of
  the block are zero-padded: a padded key sits after every real query (the causal mask drops it),
  and a padded query row has ``do = 0``, so it adds nothing to dK, dV.
  Lowerings, chosen by platform (``pallas_target``):
  * ``"triton"`` (GPU): on Hopper, for bf16/f16, head_dim 64 or 128 and no soft-cap, the forward
    and both backward kernels are Mosaic GPU kernels on wgmma (``kernels/window_attention/mosaic_gpu.py``:
    two compute warpgroups of 64 rows, each running only its own rows' band, a memory warpgroup
    streaming the band's blocks by TMA, a FlashAttention-3 ping-pong in the forward, which is
    persistent: one CTA per SM; ``PallasBlocks.fwd_kernel`` / ``bwd_kernel``).
    Elsewhere, and when interpreting, Triton kernels:
    the grid is (query block, batch, head); each program holds its query block
    and loops over the band's key blocks (the key/value "block" is the whole sequence, a pointer in
    Triton, so nothing is copied). Blocks are powers of two (head_dim is zero-padded up to one);
    the loop is split into the masked edge blocks and the unmasked interior, and runs in base 2
    (``exp2``, the scale folded with log₂e). No scratch, no scalar prefetch.
  * ``"mosaic_tpu"`` (TPU; ``pallas_target="mosaic"`` is its older name): inputs are laid out ``[batch, heads, time, head_dim]`` (Mosaic tiles the
    last two dims by (8, 128)); the band is a trailing "arbitrary" grid axis whose index map picks
    key block ``i − lookback + j`` (clamped, so skipped steps re-use the resident block and no DMA is
    issued), with f32 accumulators in VMEM scratch.
  ``interpret=True`` runs either lowering in the Pallas interpreter (how CPU tests check them).
- ``"cudnn"``: ``jax.nn.dot_product_attention(..., local_window_size=(W−1, 0),
  implementation="cudnn")`` — NVIDIA's fused kernel (GPU, bf16/fp16, no soft-cap, no packed documents:
  jax passes cuDNN a document mask only as a dense ``[T, T]`` bias).
- ``"auto"``: the rule of :func:`kernels.dispatch.attention`: on GPU our Pallas kernels where the
  Mosaic GPU ones run (above) at head_dim 64 or 128, then cuDNN where it is valid, then the Triton
  kernels; Pallas on TPU; ``"xla"`` on CPU (where Pallas only interprets). The measurements behind it
  (ours ahead of cuDNN at every measured shape) are in ``kernels/BENCHMARKS.md``.

Packed documents (``segment_ids [batch, time]``, issue 23): a new document starts at t = 0 and
wherever the id changes, and a query reads only keys of its own document (ids are first renumbered by
:func:`document_index`, so every path agrees when an id recurs). The reference and XLA paths mask
by id; the Pallas kernels (Triton, Mosaic TPU, Mosaic GPU) take each position's document start and
end (``pallas.document_bounds``) and mask in-kernel: in the forward and dQ kernels query ``t`` reads
key ``s`` only if ``s ≥ start(t)``, in the dK/dV kernel only if ``t < end(s)`` (the band gives
causality). Triton also skips the key (query) blocks wholly outside the documents of its query (key)
block and masks only the blocks a boundary cuts, and so do the Mosaic GPU kernels
(``PallasBlocks.mgpu_skip_outside_documents``, the default); Mosaic TPU visits the band as without
documents and masks every block. cuDNN takes no document mask through jax (``"auto"`` passes it over
and records why).

Files: ``reference.py`` (the definition, decode), ``xla.py`` (the blocked band), ``band.py`` (the
band arithmetic the lowerings share), ``pallas.py`` (Triton and Mosaic TPU, the ``custom_vjp`` core),
``mosaic_gpu.py`` (the wgmma kernels), ``cudnn.py``, ``bench.py`` (``python -m kernels.bench``).
"""

from __future__ import annotations

from typing import Literal

import jax

from kernels import dispatch, documents
from kernels.dispatch import tma_gpu
from kernels.tiling import next_pow2, round_up
from kernels.window_attention import cudnn
from kernels.window_attention import mosaic_gpu as window_attention_mgpu
from kernels.window_attention.cudnn import problem as _cudnn_problem
from kernels.window_attention.pallas import PallasBlocks, flash_window_attention
from kernels.window_attention.reference import _check, decode_attention, window_attention_reference
from kernels.window_attention.xla import _banded, default_block_size

Impl = Literal["auto", "xla", "reference", "pallas", "cudnn"]
IMPLS = ("auto", "xla", "reference", "pallas", "cudnn")
PallasTarget = Literal["triton", "mosaic_tpu", "mosaic"]

__all__ = ["IMPLS", "PallasBlocks", "choice", "decode_attention", "default_block_size", "document_index",
           "flash_window_attention", "pallas_kernels", "window_attention", "window_attention_reference"]


def document_index(segment_ids):
  """``segment_ids: int [batch, time]`` → int32 ``[batch, time]``: each position's document, counted
  from 0 along the row, a new one at every change of id (so an id that recurs after another one
  names a new document, not the earlier one)."""
  return documents.document_index(segment_ids)


def _mosaic_gpu_problem(q, softcap) -> str | None:
  """Why our Mosaic GPU kernels cannot run such a call here (None: they can): a Hopper GPU, bf16/f16,
  head_dim padded to 64 or 128, no soft-cap, sequences of 65 tokens or more (shorter ones get
  Triton's smaller tiles)."""
  if backend_is_tpu():
    return "the TPU runs the Mosaic TPU kernels"
  if not tma_gpu():
    return "needs a Hopper GPU (TMA and wgmma)"
  padded = (q.shape[0], round_up(q.shape[1], window_attention_mgpu.CTA_ROWS), q.shape[2],
            max(16, next_pow2(q.shape[3])))
  return window_attention_mgpu.supports(jax.ShapeDtypeStruct(padded, q.dtype), q, softcap)


def backend_is_tpu() -> bool:
  return dispatch.backend() == "tpu"


def pallas_kernels(q, softcap=None) -> str:
  """The lowering ``impl="pallas"`` runs for such a call here (not interpreting): "mosaic_gpu",
  "triton", or "mosaic_tpu" on TPU (with or without segment ids)."""
  if backend_is_tpu():
    return "mosaic_tpu"
  return "triton" if _mosaic_gpu_problem(q, softcap) else "mosaic_gpu"


def choice(q, softcap=None, requested: str = "auto", *, interpret: bool = False,
           pallas_target: str | None = None, segments: bool = False) -> dispatch.Choice:
  """What runs ``window_attention`` for queries shaped like ``q`` (:func:`kernels.dispatch.attention`
  over each implementation's verdict for the call); ``segments``: the call has ``segment_ids``."""
  cudnn_problem = cudnn.NO_SEGMENTS if segments else _cudnn_problem(q, softcap)
  mosaic_gpu_problem = _mosaic_gpu_problem(q, softcap)
  return dispatch.attention(requested, IMPLS, head_dim=q.shape[-1],
                            mosaic_gpu_problem=mosaic_gpu_problem,
                            cudnn_problem=cudnn_problem, interpret=interpret,
                            layout=dispatch.pallas_layout(pallas_target, "attention"), dtype=q.dtype)


def _auto_impl(q, softcap) -> str:
  """The implementation ``impl="auto"`` runs for such a call here."""
  return choice(q, softcap).impl


def window_attention(q, k, v, *, window: int | None = None, softcap: float | None = None,
                     impl: Impl = "auto", block_size: int | None = None, interpret: bool = False,
                     pallas_target: PallasTarget | None = None, pallas_blocks: PallasBlocks | None = None,
                     segment_ids=None):
  """Causal attention restricted to the last ``window`` positions (``None``: global).

  Args:
    q: ``[batch, time, heads, head_dim]``; k, v: ``[batch, time, kv_heads, head_dim]``.
    window: band width W ≥ 1 (position t reads t−W+1 … t) or None for global causal attention.
    softcap: optional logit soft-cap.
    impl: ``"reference"`` (dense mask), ``"xla"`` (blocked band, O(T·W)), ``"pallas"`` (flash
      attention kernel), ``"cudnn"`` (NVIDIA's, via ``jax.nn.dot_product_attention``) or ``"auto"``
      (:func:`kernels.dispatch.attention`; see the module docstring). A request that cannot run the
      call is a ValueError naming why.
    block_size: query/key block of the banded ``"xla"`` path (default: ``min(window, 128)``).
    interpret: run the Pallas kernel in the interpreter (CPU tests).
    pallas_target: ``"triton"`` or ``"mosaic_tpu"`` lowering (default: by platform; Triton when
      interpreting).
    pallas_blocks: tile sizes of the Pallas kernel (default :class:`PallasBlocks`).
    segment_ids: optional ``int [batch, time]``, packed documents: a new one starts wherever the id
      changes, and a query reads only keys of its own document. Every path but ``"cudnn"`` takes
      them (an explicit ``"cudnn"`` is a ValueError saying why; ``"auto"`` passes cuDNN over).
  Returns:
    ``[batch, time, heads, head_dim]`` in ``q.dtype``.
  """
  _check(q, k, v, window)
  if segment_ids is not None:
    if segment_ids.shape != q.shape[:2]:
      raise ValueError(f"window_attention: segment_ids{segment_ids.shape} must be [batch, time] = {q.shape[:2]}")
    segment_ids = document_index(segment_ids)
  taken = choice(q, softcap, impl, interpret=interpret, pallas_target=pallas_target, segments=segment_ids is not None)
  impl = dispatch.called(taken, q=q, softcap=softcap, segment_ids=segment_ids).impl
  if impl == "cudnn":
    return cudnn.attention(q, k, v, window, softcap)
  if impl == "pallas":
    return flash_window_attention(q, k, v, window=window, softcap=softcap, interpret=interpret,
                                  target=pallas_target, blocks=pallas_blocks, segment_ids=segment_ids)
  time = q.shape[1]
  if impl == "reference" or window is None or window >= time:
    # Global causal attention has no band to exploit; the dense form is the O(T²) it must be.
    return window_attention_reference(q, k, v, window=window, softcap=softcap, segment_ids=segment_ids)
  return _banded(q, k, v, window, softcap, block_size or default_block_size(window), segment_ids)
