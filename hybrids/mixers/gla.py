"""Gated Linear Attention (GLA).

Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training".

    α_t = σ(W_α2 W_α1 x_t + b_α)^(1/τ),  τ = 16       data-dependent decay per key dim (low rank 16)
    q_t = W_q x_t / √d_k,  k_t = W_k x_t,  v_t = W_v x_t  (key width = key_expansion · d_model = d/2)
    S_t = diag(α_t) S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t
    y_t = W_o (swish(W_r x_t) ⊙ GroupNorm_h(o_t))

The recurrence is ``kernels.gla`` with a per-key-dim log-decay ``log σ(·)/τ``.
State ``[batch, heads, d_k/heads, d_model/heads]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import HeadNorm, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, Setting
from kernels.gla import gla, gla_step

TAU = 16.0  # temperature of the decay gate (paper §4.4)


class GatedLinearAttention(nnx.Module):
  NO_WEIGHT_DECAY = frozenset()  # the decay gate is data dependent: its weights are projections
  SETTINGS = {
      "key_expansion": Setting(0.5, "GLA key width = key_expansion · d_model", 0, lo_open=True),
      "gate_low_rank": Setting(16, "rank of GLA's decay gate", 1),
      "chunk_size": CHUNK_SIZE,
  }
  SEGMENTS = True  # packed documents: the state restarts from 0 at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.heads = cfg.num_heads
    self.key_dim = int(cfg.key_expansion * cfg.d_model) // cfg.num_heads
    self.value_dim = cfg.d_model // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    k_inner, v_inner = self.heads * self.key_dim, self.heads * self.value_dim
    self.q_proj = linear(cfg, cfg.d_model, k_inner, rngs=rngs)
    self.k_proj = linear(cfg, cfg.d_model, k_inner, rngs=rngs)
    self.v_proj = linear(cfg, cfg.d_model, v_inner, rngs=rngs)
    self.gate_down = linear(cfg, cfg.d_model, cfg.gate_low_rank, rngs=rngs)
    self.gate_up = linear(cfg, cfg.gate_low_rank, k_inner, rngs=rngs, use_bias=True)
    self.r_proj = linear(cfg, cfg.d_model, v_inner, rngs=rngs)
    self.norm = HeadNorm(self.heads, self.value_dim, param_dtype=dtype_of(cfg.param_dtype))
    self.o_proj = linear(cfg, v_inner, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int, check_number
    check_number(cfg.key_expansion, "model.key_expansion", 0, lo_open=True, note=" (GLA key width = "
                 "key_expansion · d_model)")
    if int(cfg.key_expansion * cfg.d_model) < cfg.num_heads:
      raise ValueError(f"model.key_expansion={cfg.key_expansion} gives a key width int(key_expansion · d_model)="
                       f"{int(cfg.key_expansion * cfg.d_model)} below model.num_heads={cfg.num_heads}: each head "
                       "needs at least one key dimension")
    check_int(cfg.gate_low_rank, "model.gate_low_rank", 1, note=" (rank of GLA's decay gate)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
    if cfg.d_model % cfg.num_heads or int(cfg.key_expansion * cfg.d_model) % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model} and the key width "
                       f"model.key_expansion·d_model={cfg.key_expansion * cfg.d_model}")
    if cfg.gate_low_rank <= 0:
      raise ValueError(f"model.gate_low_rank={cfg.gate_low_rank} must be positive")

  def _inputs(self, x):
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    q = split(self.q_proj(x)).astype(jnp.float32) / jnp.sqrt(float(self.key_dim))
    k, v = split(self.k_proj(x)), split(self.v_proj(x))
    log_decay = jax.nn.log_sigmoid(split(self.gate_up(self.gate_down(x))).astype(jnp.float32)) / TAU
    return q, k, v, log_decay

  def _out(self, x, o):
    o = rearrange(self.norm(o.astype(jnp.float32)), "... h d -> ... (h d)").astype(self.dtype)
    return self.o_proj(jax.nn.swish(self.r_proj(x)) * o)

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    q, k, v, log_decay = self._inputs(x)
    o, state = gla(q, k, v, log_decay, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(x, o)
    return (y, {"S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"S": jnp.zeros((batch, self.heads, self.key_dim, self.value_dim), jnp.float32)}

  def step(self, x_t, state):
    q, k, v, log_decay = self._inputs(x_t)
    o, s = gla_step(q, k, v, log_decay, state["S"])
    return self._out(x_t, o), {"S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.gla`` form with a per-key decay."""
    return Flops(recurrence=gla_flops(self.heads, self.key_dim, self.value_dim, self.chunk_size, seq_len,
                                      per_key_decay=True))
