"""Mamba-2: the state-space dual (SSD) layer.

Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality".

    [z, x, B, C, Δ] = W_in u_t          (x: d_inner = ssm_expand · d_model; B, C: d_state, shared by heads)
    x, B, C = SiLU(Conv1D_4([x, B, C]))
    Δ_t = softplus(Δ + b_Δ),  A_h = −exp(A_log_h)                     (one scalar per head)
    h_t = exp(Δ_t A_h) h_{t−1} + Δ_t · B_t x_tᵀ       (per head: state [d_state, head_dim])
    y_t = h_tᵀ C_t + D_h x_t
    out_t = W_out RMSNorm(y_t ⊙ SiLU(z_t))

This is ``kernels.gla`` with ``q = C``, ``k = B``, ``v = Δ·x`` and a scalar log-decay ``Δ A`` per
head. Initialisation as the paper: ``A ∈ [1, 16]``, ``Δ ∈ [1e-3, 0.1]`` (log-uniform), ``D = 1``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import CausalConv1D, HeadNorm, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, CONV_WIDTH, D_STATE, SSM_EXPAND
from kernels.gla import gla, gla_step


class Mamba2(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"a_log", "dt_bias", "d_skip"})  # A, Δ's bias, D
  SETTINGS = {"d_state": D_STATE, "ssm_expand": SSM_EXPAND, "chunk_size": CHUNK_SIZE, "conv_width": CONV_WIDTH}
  SEGMENTS = True  # packed documents: the conv reads no earlier document, the SSD state restarts from 0

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.d_inner = int(cfg.ssm_expand * cfg.d_model)
    self.heads = cfg.num_heads
    self.head_dim = self.d_inner // self.heads
    self.d_state = cfg.d_state
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.in_proj = linear(cfg, cfg.d_model, 2 * self.d_inner + 2 * self.d_state + self.heads, rngs=rngs)
    self.conv = CausalConv1D(self.d_inner + 2 * self.d_state, cfg.conv_width, dtype=self.dtype,
                             param_dtype=param_dtype, rngs=rngs)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, math.log(1e-3), math.log(0.1)))
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus⁻¹(Δ)
    self.a_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, 1.0, 16.0)).astype(param_dtype))
    self.d_skip = nnx.Param(jnp.ones((self.heads,), param_dtype))
    self.norm = HeadNorm(1, self.d_inner, rms=True, param_dtype=param_dtype)
    self.out_proj = linear(cfg, self.d_inner, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int
    check_int(cfg.ssm_expand, "model.ssm_expand", 1, note=" (Mamba-2's inner width = ssm_expand · d_model)")
    check_int(cfg.d_state, "model.d_state", 1, note=" (Mamba-2's state size N)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
    d_inner = int(cfg.ssm_expand * cfg.d_model)
    if d_inner % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide the inner width "
                       f"model.ssm_expand·d_model={d_inner}")
    if cfg.d_state <= 0:
      raise ValueError(f"model.d_state={cfg.d_state} must be positive")

  def _split(self, proj):
    z, xbc, dt = jnp.split(proj, [self.d_inner, 2 * self.d_inner + 2 * self.d_state], axis=-1)
    return z, xbc, dt

  def _ssm_inputs(self, xbc, dt):
    xbc = jax.nn.silu(xbc.astype(jnp.float32))
    x, b, c = jnp.split(xbc, [self.d_inner, self.d_inner + self.d_state], axis=-1)
    x = rearrange(x, "... (h p) -> ... h p", h=self.heads)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))  # [..., heads]
    log_decay = -dt * jnp.exp(self.a_log[...].astype(jnp.float32))
    heads = lambda z: jnp.broadcast_to(z[..., None, :], z.shape[:-1] + (self.heads, self.d_state))
    return heads(c), heads(b), x * dt[..., None], log_decay, x

  def _out(self, y, x, z):
    y = y + self.d_skip[...].astype(jnp.float32)[:, None] * x
    y = rearrange(y, "... h p -> ... (h p)") * jax.nn.silu(z.astype(jnp.float32))
    y = self.norm(y[..., None, :])[..., 0, :]
    return self.out_proj(y.astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    z, xbc, dt = self._split(self.in_proj(x))
    xbc, conv_state = self.conv(xbc, return_state=True, segment_ids=segment_ids)
    q, k, v, log_decay, xs = self._ssm_inputs(xbc, dt)
    y, state = gla(q, k, v, log_decay, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    out = self._out(y, xs, z)
    return (out, {"conv": conv_state, "S": state}) if return_state else out

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch),
            "S": jnp.zeros((batch, self.heads, self.d_state, self.head_dim), jnp.float32)}

  def step(self, x_t, state):
    z, xbc, dt = self._split(self.in_proj(x_t))
    xbc, conv_state = self.conv.step(xbc, state["conv"])
    q, k, v, log_decay, xs = self._ssm_inputs(xbc, dt)
    y, s = gla_step(q, k, v, log_decay, state["S"])
    return self._out(y, xs, z), {"conv": conv_state, "S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.gla`` form, keys ``B`` (``d_state``), values ``Δ·x`` (head dim)."""
    return Flops(recurrence=gla_flops(self.heads, self.d_state, self.head_dim, self.chunk_size, seq_len))
