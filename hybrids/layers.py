"""Building blocks shared by the model and the mixers: gated MLP, short causal conv, RoPE, dtypes.

RMSNorm, Linear and Embed come from ``flax.nnx`` directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from kernels import documents

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  """``"bfloat16"`` → ``jnp.bfloat16``; names are what configs hold."""
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; valid: {tuple(DTYPES)}") from None


def linear(cfg, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = False, **kwargs) -> nnx.Linear:
  """An ``nnx.Linear`` computing in ``cfg.dtype`` with ``cfg.param_dtype`` parameters."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype_of(cfg.dtype),
                    param_dtype=dtype_of(cfg.param_dtype), rngs=rngs, **kwargs)


def rms_norm(cfg, d: int, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(d, epsilon=1e-6, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)


NORMS = ("rms", "layer")


def block_norm(cfg, d: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The residual stream's norm, ``model.norm``: RMSNorm (Griffin, Llama) or LayerNorm with a bias
  (GPT-2, Zoology's MQAR models)."""
  if cfg.norm == "layer":
    return nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)
  return rms_norm(cfg, d, rngs=rngs)


class GatedMLP(nnx.Module):
  """``down(gelu(gate(x)) ⊙ up(x))`` (GeGLU, as in Griffin/Gemma); hidden = ``mlp_expansion · d_model``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    hidden = int(cfg.mlp_expansion * cfg.d_model)
    self.gate = linear(cfg, cfg.d_model, hidden, rngs=rngs)
    self.up = linear(cfg, cfg.d_model, hidden, rngs=rngs)
    self.down = linear(cfg, hidden, cfg.d_model, rngs=rngs)

  def __call__(self, x):
    """``x: [..., d_model]`` → ``[..., d_model]``."""
    return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class CausalConv1D(nnx.Module):
  """Depthwise causal convolution ``y_t = b + Σ_{i<w} W_i ⊙ x_{t−w+1+i}`` (Griffin/Mamba short conv).

  Recurrent state: the last ``width − 1`` inputs, ``[batch, width − 1, channels]``, oldest first.
  """

  def __init__(self, channels: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.width = width
    self.dtype = dtype
    bound = 1.0 / math.sqrt(width)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), param_dtype, -bound, bound))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x, *, return_state: bool = False, segment_ids=None):
    """``x: [batch, time, channels]`` → ``y`` (and the state after the last step).

    ``segment_ids: int [batch, time]`` (optional): packed documents; a tap that reads an input of an
    earlier document reads zero instead, as if the document ran alone (and the state keeps only the
    last document's inputs).
    """
    time = x.shape[1]
    kernel = self.kernel[...].astype(self.dtype)
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (self.width - 1, 0), (0, 0)))
    if segment_ids is None:
      taps = [padded[:, i:i + time] for i in range(self.width)]
    else:
      # Padding has id -1, so it never matches (the inputs there are zeros anyway).
      ids = jnp.pad(segment_ids, ((0, 0), (self.width - 1, 0)), constant_values=-1)
      same = lambda i: (ids[:, i:i + time] == segment_ids)[..., None]
      taps = [jnp.where(same(i), padded[:, i:i + time], 0) for i in range(self.width)]
    y = sum(kernel[i] * taps[i] for i in range(self.width)) + self.bias[...].astype(self.dtype)
    if not return_state:
      return y
    state = padded[:, padded.shape[1] - (self.width - 1):]
    if segment_ids is not None:
      last = ids[:, ids.shape[1] - (self.width - 1):] == segment_ids[:, -1:]
      state = jnp.where(last[..., None], state, 0)
    return y, state

  def init_state(self, batch: int):
    return jnp.zeros((batch, self.width - 1, self.kernel[...].shape[1]), self.dtype)

  def step(self, x_t, state):
    """``x_t: [batch, channels]``, ``state: [batch, width−1, channels]``."""
    window = jnp.concatenate([state, x_t[:, None].astype(self.dtype)], axis=1)
    kernel = self.kernel[...].astype(self.dtype)
    y = jnp.einsum("bwc,wc->bc", window, kernel) + self.bias[...].astype(self.dtype)
    return y, window[:, 1:]


def document_starts(segment_ids):
  """``segment_ids: int [batch, time]`` → bool ``[batch, time]``, True where a document starts (t = 0 or
  the id changes)."""
  return documents.starts(segment_ids, first=True)


def document_positions(segment_ids):
  """``segment_ids: int [batch, time]`` → ``int32 [batch, time]``: each position's offset in its own
  document (positions restart at 0 at every document start)."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  start = jax.lax.cummax(jnp.where(document_starts(segment_ids), t, 0), axis=1)
  return t - start


def apply_rope(x, positions, *, base: float = 10_000.0):
  """Rotary position embedding (Su et al. 2021), rotating the two halves of the head dim.

  Args:
    x: ``[batch, time, heads, head_dim]`` (head_dim even).
    positions: ``[time]`` or ``[batch, time]`` absolute positions.
  """
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None] * freq  # [..., time, half]
  if angle.ndim == 2:
    angle = angle[None]
  cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class HeadNorm(nnx.Module):
  """Per-head normalisation ``[..., heads, head_dim]`` (RetNet/GLA's GroupNorm with one group a head).

  Normalises over ``head_dim`` only, so it is causal (flax's GroupNorm would also reduce over time).
  ``rms=True`` skips centring (Mamba-2's gated RMSNorm).
  """

  def __init__(self, heads: int, head_dim: int, *, rms: bool = False, param_dtype=jnp.float32, eps: float = 1e-5):
    self.rms = rms
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((heads, head_dim), param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if not self.rms:
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class MoE(nnx.Module):
  """Top-k routed mixture of gated-MLP experts, dropless (Shazeer et al. 2017; Mixtral; Jamba).

  Every token reaches its ``top_k`` experts — no capacity, so nothing is dropped: tokens are sorted
  by expert and each expert's contiguous group is multiplied by ``lax.ragged_dot``. Routing weights
  are the softmax probabilities of the chosen experts, renormalised over the top k. The
  load-balancing loss (Switch Transformer, Fedus et al. 2022) is ``E · Σ_e f_e · P_e`` with ``f_e``
  the fraction of routed slots sent to expert e and ``P_e`` its mean router probability (1 when
  balanced).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, hidden, experts = cfg.d_model, int(cfg.mlp_expansion * cfg.d_model), cfg.num_experts
    self.num_experts, self.top_k, self.dtype = experts, cfg.moe_top_k, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.router = nnx.Linear(d, experts, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2)
    self.w_gate = nnx.Param(init(rngs.params(), (experts, d, hidden), param_dtype))
    self.w_up = nnx.Param(init(rngs.params(), (experts, d, hidden), param_dtype))
    self.w_down = nnx.Param(init(rngs.params(), (experts, hidden, d), param_dtype))

  def __call__(self, x):
    """``x: [..., d_model]`` → ``(y [..., d_model], load-balancing loss f32[])``."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    probs = jax.nn.softmax(self.router(tokens.astype(jnp.float32)), axis=-1)  # [n, E]
    gates, experts = jax.lax.top_k(probs, self.top_k)  # [n, k]
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
    routed = tokens[order // self.top_k].astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    hidden = jax.nn.gelu(jax.lax.ragged_dot(routed, w(self.w_gate), group_sizes)) * jax.lax.ragged_dot(
        routed, w(self.w_up), group_sizes)
    out_sorted = jax.lax.ragged_dot(hidden, w(self.w_down), group_sizes)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(-1, self.top_k, shape[-1])
    y = jnp.einsum("nk,nkd->nd", gates, out.astype(jnp.float32)).astype(x.dtype)
    balance = self.num_experts * jnp.sum(group_sizes / flat.shape[0] * jnp.mean(probs, axis=0))
    return y.reshape(shape), balance


class BlockDiagonalLinear(nnx.Module):
  """``y = x W + b`` with ``W`` block-diagonal in ``heads`` blocks: ``[heads, width/heads, width/heads]``."""

  def __init__(self, width: int, heads: int, *, param_dtype, dtype, rngs: nnx.Rngs):
    block = width // heads
    self.heads = heads
    self.dtype = dtype
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2)
    self.kernel = nnx.Param(init(rngs.params(), (heads, block, block), param_dtype))
    self.bias = nnx.Param(jnp.zeros((heads, block), param_dtype))

  def __call__(self, x):
    """``x: [..., width]`` → ``[..., width]``."""
    xh = rearrange(x.astype(self.dtype), "... (h i) -> ... h i", h=self.heads)
    y = jnp.einsum("...hi,hij->...hj", xh, self.kernel[...].astype(self.dtype)) + self.bias[...].astype(self.dtype)
    return rearrange(y, "... h j -> ... (h j)")
