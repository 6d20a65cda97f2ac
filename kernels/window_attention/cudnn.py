"""Sliding-window attention through cuDNN's fused kernel (``impl="cudnn"``):
``jax.nn.dot_product_attention(..., local_window_size=(W−1, 0), implementation="cudnn")``, NVIDIA's
(GPU, bf16/fp16, no soft-cap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.dispatch import backend, nvidia_gpu


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

