"""Sliding-window attention through cuDNN's fused kernel (``impl="cudnn"``):
``jax.nn.dot_product_attention(..., local_window_size=(W−1, 0), implementation="cudnn")``, NVIDIA's
(GPU, bf16/fp16, no soft-cap, no packed documents: ``NO_SEGMENTS``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.dispatch import backend, nvidia_gpu


# jax.nn.dot_product_attention (jax 0.10.2, as its current documentation) takes per-row padding lengths and a dense boolean
# ``mask``, which its cuDNN path turns into a [batch, heads, T, T] bias: O(T²) memory, the cost the
# band avoids. cuDNN's packed-document layout (q_offsets / kv_offsets) is reached only through jax's
# private jax._src.cudnn API, with a static maximum number of documents per row.
NO_SEGMENTS = ("takes packed documents (segment_ids) only as a dense [batch, heads, T, T] mask through "
               "jax.nn.dot_product_attention; the Pallas kernels mask them in the band")


def problem(q, softcap) -> str | None:
  """Why cuDNN's fused attention cannot run this call (None: it can)."""
  if not nvidia_gpu():
    return f"needs an NVIDIA GPU (backend is {backend()!r})"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"needs bfloat16 or float16 inputs, got {q.dtype}"
  if softcap is not None:
    return "has no logit soft-cap"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"needs head_dim a multiple of 8 and ≤ 128, got {q.shape[-1]}"
  return None


def attention(q, k, v, window: int | None, softcap):
  """The call (``kernels.dispatch`` has checked :func:`problem`)."""
  del softcap  # (None: the dispatch rejects a soft-cap)
  time = q.shape[1]
  local = None if window is None or window >= time else (window - 1, 0)
  # cuDNN's masked attention rejects odd lengths ("Unsupported sequence length", H100, jax 0.11.2).
  # A zero row at the end changes nothing: the causal mask hides that key from every real query.
  pad = lambda x: jnp.pad(x, ((0, 0), (0, time % 2), (0, 0), (0, 0)))
  o = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, local_window_size=local,
                                   implementation="cudnn")
  return o[:, :time]

