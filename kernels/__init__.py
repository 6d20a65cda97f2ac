"""Sequence-mixing kernels shared by many mixers.

Each kernel family is a folder with a plain function over arrays and an ``impl`` argument:
``"xla"`` (the pure-jnp path, the CPU default), ``"reference"`` (the slow, obviously-correct
definition used by tests), ``"pallas"`` (our kernels: Triton, Mosaic GPU or Mosaic TPU), ``"cudnn"``
(attention) and ``"auto"``. Which one runs is decided in one place, :mod:`kernels.dispatch`, from the
platform, the call's shapes and dtypes and what was measured fastest (``kernels/BENCHMARKS.md``).

    scan/              h_t = a_t ⊙ h_{t-1} + b_t (RG-LRU, Mamba, S4D)
    gla/               gated linear attention (linear attention, Based, RetNet, GLA, Mamba-2, Mamba-3, mLSTM,
                       RWKV-6, HGRN2)
    delta/             the (gated) delta rule (DeltaNet, Gated DeltaNet)
    dplr/              the generalized delta rule, diagonal-plus-rank-one (KDA, RWKV-7, Gated DeltaProduct;
                       its Pallas path is the delta rule's state-pass kernel, generalised)
    window_attention/  causal sliding-window softmax attention
    forgetting_attention/  softmax attention with a forget gate (FoX; its Pallas path is the window-attention
                       flash kernels with a decay bias)

Each holds ``reference.py``, ``xla.py``, its Pallas lowerings where it has them and ``bench.py``; ``tiling.py`` and
``pallas_compat.py`` are shared. Nothing here imports the models (``hybrids``) or the launcher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import delta, dispatch, dplr, forgetting_attention as _forgetting, gla, scan
from kernels import window_attention as _attention
from kernels.scan import linear_scan, linear_scan_reference
from kernels.window_attention import window_attention, window_attention_reference

__all__ = ["kernel_choices", "linear_scan", "linear_scan_reference", "resolve_impls", "window_attention",
           "window_attention_reference"]


def _choices(model_cfg, segments: bool = False) -> dict[str, dispatch.Choice]:
  """Each family's :class:`kernels.dispatch.Choice` at the model's shapes: attention for its head_dim,
  compute dtype and soft-cap; GLA for its head dims; the delta rule for its chunk size. (Per call,
  wider heads, e.g. Based's feature map, float32 inputs and the mLSTM's input gate may choose
  differently: :func:`kernels.dispatch.recording` keeps each call's choice, as ``summary.json``'s
  ``kernels_per_call``.) ``segments``: the model is given ``segment_ids`` (packed documents)."""
  m = model_cfg
  head_dim = m.get("head_dim") or m.d_model // m.num_heads
  q = jax.ShapeDtypeStruct((1, 1, m.num_heads, head_dim), jnp.dtype(m.dtype))
  return {
      "attention": _attention.choice(q, m.get("attn_softcap") or None, m.attention_impl, segments=segments),
      "scan": scan.choice(m.scan_impl),
      "gla": gla.choice(head_dim, head_dim, m.gla_impl, dtype=jnp.dtype(m.dtype)),
      "delta": delta.choice(int(m.get("chunk_size", 16)), head_dim, head_dim, m.delta_impl),
      "dplr": dplr.choice(m.get("dplr_impl", "auto")),
      "forgetting_attention": _forgetting.choice(m.get("fox_impl", "auto")),
  }


def resolve_impls(model_cfg, segments: bool = False) -> dict[str, str]:
  """What each kernel family runs on this platform for a model config (``"auto"`` resolved), as the
  run summary's ``impl`` records it: ``{"attention": "pallas/mosaic_gpu", "scan": "pallas", "gla":
  "pallas", "delta": "xla"}`` (attention's Pallas path names its lowering: mosaic_gpu, triton, or
  mosaic_tpu). :func:`kernel_choices` has the lowerings of every family and the rejected candidates."""
  choices = _choices(model_cfg, segments)
  out = {family: c.impl for family, c in choices.items()}
  attention = choices["attention"]
  if attention.impl == "pallas":
    out["attention"] = attention.name
  return out


def kernel_choices(model_cfg, segments: bool = False) -> dict[str, dict]:
  """Each family's choice as ``summary.json`` keeps it: ``{"requested", "impl", "lowering",
  "rejected": {candidate: why}}``, where ``rejected`` names every implementation not taken and why
  (cannot run the call, or not measured fastest here)."""
  return {family: c.record() for family, c in _choices(model_cfg, segments).items()}
