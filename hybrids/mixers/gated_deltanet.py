"""Gated DeltaNet: DeltaNet with a Mamba-2-style decay gate and an output gate.

Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025).

    [q, k, v]_t = SiLU(Conv1D_w(W_qkv x)_t),  q_t, k_t L2-normalised     (as DeltaNet; d_h = d_model / heads)
    β_t = σ(W_β x_t)                                                       write strength, one per head
    α_t = exp(−softplus(W_α x_t + b_Δ) · exp(A_log))                      decay, one per head (Mamba-2's Δ·A)
    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
    o_t = S_tᵀ q_t
    y_t = W_o (SiLU(W_g x_t) ⊙ RMSNorm_h(o_t))

The gate α lets the layer erase the whole memory at once (context switches), which the delta rule's
key-by-key edits alone cannot; the delta rule gives precise overwrites, which a decay alone cannot.
Initialisation of the decay as Mamba-2: ``A = exp(A_log) ∈ [1, 16]``, ``softplus(b_Δ) ∈ [1e-3, 0.1]``
(log-uniform). Same widths as DeltaNet (key = value = d_model) plus the gate, so ≈ 5·d_model²
parameters. The recurrence is ``kernels.delta`` with a scalar log-decay per head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.layers import dtype_of, linear
from hybrids.mixers.deltanet import DeltaNet


class GatedDeltaNet(DeltaNet):
  NO_WEIGHT_DECAY = DeltaNet.NO_WEIGHT_DECAY | {"a_log", "dt_bias"}  # A and Δ's bias of the decay gate
  SETTINGS = DeltaNet.SETTINGS  # the decay gate adds no field
  SEGMENTS = True  # as DeltaNet's: the conv is masked and the decayed state restarts from 0 at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    param_dtype = dtype_of(cfg.param_dtype)
    self.alpha_proj = linear(cfg, cfg.d_model, self.heads, rngs=rngs)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, math.log(1e-3), math.log(0.1)))
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus⁻¹(Δ)
    a = jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, 1.0, 16.0)
    self.a_log = nnx.Param(jnp.log(a).astype(param_dtype))
    self.g_proj = linear(cfg, cfg.d_model, cfg.d_model, rngs=rngs)

  def _gates(self, x):
    beta, _ = super()._gates(x)
    dt = jax.nn.softplus(self.alpha_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    return beta, -dt * jnp.exp(self.a_log[...].astype(jnp.float32))  # log α ≤ 0

  def _out(self, o, x):
    o = rearrange(self.norm(o.astype(jnp.float32)), "... h d -> ... (h d)")
    return self.o_proj((jax.nn.silu(self.g_proj(x).astype(jnp.float32)) * o).astype(self.dtype))
