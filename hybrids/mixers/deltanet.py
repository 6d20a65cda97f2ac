"""DeltaNet: linear attention whose state is edited by the delta rule instead of only added to.

Yang, Wang, Zhang, Shen & Kim 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (the final architecture of §3.3: short convolutions, SiLU, L2-normalised q and k,
output normalisation).

    [q, k, v]_t = SiLU(Conv1D_w(W_qkv x)_t)          per head: q, k, v ∈ R^{d_h},  d_h = d_model / heads
    q_t ← q_t / ‖q_t‖,  k_t ← k_t / ‖k_t‖
    β_t = σ(W_β x_t)                                  one write strength per head
    S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ  S_t ∈ R^{d_h × d_h} per head
    o_t = S_tᵀ q_t
    y_t = W_o RMSNorm_h(o_t)                          per-head RMSNorm

Read as online regression: ``S_t = S_{t−1} − β_t ∇_S ½‖Sᵀk_t − v_t‖²``, one SGD step that replaces
the value stored under ``k_t`` rather than piling a new one on top (better recall than linear
attention at the same state size). With ‖k‖ = 1 and β ∈ (0, 1), ``I − β k kᵀ`` is a contraction,
so the state stays bounded without any decay. No 1/√d scale on q: the head RMSNorm that follows
makes any constant factor irrelevant. The recurrence is ``kernels.delta`` (chunked WY form);
state ``{"conv": [batch, width − 1, 3·d_model], "S": [batch, heads, d_h, d_h]}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, delta_flops
from hybrids.layers import CausalConv1D, HeadNorm, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, CONV_WIDTH
from kernels.delta import delta_rule, delta_rule_step

L2_EPS = 1e-6


def l2_normalize(x):
  """``x / ‖x‖`` over the last axis, in float32 (eps inside the root keeps the gradient finite at 0)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


class DeltaNet(nnx.Module):
  NO_WEIGHT_DECAY = frozenset()  # projections and a short conv only
  SETTINGS = {"chunk_size": CHUNK_SIZE, "conv_width": CONV_WIDTH}
  SEGMENTS = True  # packed documents: the conv reads no earlier document, the state restarts from 0

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.d_model = cfg.d_model
    self.heads = cfg.num_heads
    self.head_dim = cfg.d_model // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.delta_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.qkv_proj = linear(cfg, cfg.d_model, 3 * cfg.d_model, rngs=rngs)
    # One depthwise conv over [q, k, v] is the paper's three separate short convs.
    self.conv = CausalConv1D(3 * cfg.d_model, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.beta_proj = linear(cfg, cfg.d_model, self.heads, rngs=rngs)
    self.norm = HeadNorm(self.heads, self.head_dim, rms=True, param_dtype=param_dtype)
    self.o_proj = linear(cfg, cfg.d_model, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    if cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model}")
    if cfg.chunk_size <= 0:
      raise ValueError(f"model.chunk_size={cfg.chunk_size} must be positive")
    from hybrids.checks import check_int
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")

  def _qkv(self, qkv):
    """Conv output ``[..., 3·d_model]`` → q, k (unit norm), v ``[..., heads, d_h]`` f32."""
    qkv = rearrange(jax.nn.silu(qkv.astype(jnp.float32)), "... (n h d) -> n ... h d", n=3, h=self.heads)
    return l2_normalize(qkv[0]), l2_normalize(qkv[1]), qkv[2]

  def _gates(self, x):
    """``(β [..., heads], log α [..., heads] or None)``; DeltaNet has no decay."""
    return jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32)), None

  def _out(self, o, x):
    """Kernel output ``[..., heads, d_h]`` → ``[..., d_model]``."""
    o = rearrange(self.norm(o.astype(jnp.float32)), "... h d -> ... (h d)")
    return self.o_proj(o.astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    qkv, conv_state = self.conv(self.qkv_proj(x), return_state=True, segment_ids=segment_ids)
    q, k, v = self._qkv(qkv)
    beta, log_decay = self._gates(x)
    o, state = delta_rule(q, k, v, beta, log_decay, segment_ids=segment_ids, chunk_size=self.chunk_size,
                          impl=self.impl)
    y = self._out(o, x)
    return (y, {"conv": conv_state, "S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch),
            "S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)}

  def step(self, x_t, state):
    qkv, conv_state = self.conv.step(self.qkv_proj(x_t), state["conv"])
    q, k, v = self._qkv(qkv)
    beta, log_decay = self._gates(x_t)
    o, s = delta_rule_step(q, k, v, beta, log_decay, state["S"])
    return self._out(o, x_t), {"conv": conv_state, "S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked WY form of ``kernels.delta`` (``d_k = d_v = d_h``)."""
    return Flops(recurrence=delta_flops(self.heads, self.head_dim, self.head_dim, self.chunk_size, seq_len))
