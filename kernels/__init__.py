"""Sequence-mixing kernels shared by many mixers.

Each kernel is a plain function over arrays with an ``impl`` argument:
``"xla"`` (the pure-jnp path, the CPU default), ``"reference"`` (the slow, obviously-correct
definition used by tests) and ``"auto"`` (the fastest implementation known for the platform).
Pallas implementations are added behind the same signatures; mixers never change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.scan import linear_scan, linear_scan_reference
from kernels.window_attention import window_attention, window_attention_reference

__all__ = ["linear_scan", "linear_scan_reference", "window_attention", "window_attention_reference",
           "resolve_impls"]


def resolve_impls(model_cfg) -> dict[str, str]:
  """What each kernel family runs on this platform for a model config (``"auto"`` resolved), as the
  run summary records it: ``{"attention": "pallas/mosaic_gpu", "scan": "pallas", "gla": "pallas",
  "delta": "xla"}`` (attention's Pallas path names its kernels: mosaic_gpu, triton, or mosaic on TPU).

  Calls each kernel's own ``"auto"`` rule at the model's shapes: attention for its head_dim,
  compute dtype and soft-cap; the delta rule for its chunk size.
  """
  from kernels.delta import auto_impl as delta_auto
  from kernels.gla import auto_impl as gla_auto
  from kernels.window_attention import _auto_impl as attention_auto  # the package name is the function
  from kernels.window_attention import pallas_kernels

  m = model_cfg
  head_dim = m.get("head_dim") or m.d_model // m.num_heads
  q = jax.ShapeDtypeStruct((1, 1, m.num_heads, head_dim), jnp.dtype(m.dtype))
  # The kernels' own rules at the model's head dim; per call GLA and the delta rule also fall back
  # to XLA for wider heads (Based's feature map) and GLA for the mLSTM's input gate.
  auto = {
      "attention": attention_auto(q, m.get("attn_softcap") or None),
      "scan": "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla",
      "gla": gla_auto(head_dim, head_dim),
      "delta": delta_auto(int(m.get("chunk_size", 16)), head_dim, head_dim),
  }
  impls = {family: auto[family] if m[f"{family}_impl"] == "auto" else m[f"{family}_impl"] for family in auto}
  if impls["attention"] == "pallas":
    impls["attention"] = f"pallas/{pallas_kernels(q, m.get('attn_softcap') or None)}"
  return impls
