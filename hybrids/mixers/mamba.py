"""Mamba (S6): the selective state-space block.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Alg. 2, Fig. 3).

    [x, z] = W_in u_t                        x, z ∈ R^{d_inner},  d_inner = ssm_expand · d_model
    x = SiLU(Conv1D_4(x))
    Δ_t = softplus(W_Δ2 W_Δ1 x_t + b_Δ) ∈ R^{d_inner}     (rank ⌈d_model/16⌉)
    B_t = W_B x_t,  C_t = W_C x_t ∈ R^{N}                 (N = d_state = 16)
    h_t = exp(Δ_t ⊗ A) ⊙ h_{t−1} + (Δ_t ⊙ x_t) ⊗ B_t      h ∈ R^{d_inner × N}, A = −exp(A_log)
    y_t = h_t C_t + D ⊙ x_t
    out_t = W_out (y_t ⊙ SiLU(z_t))

The recurrence is the elementwise scan of ``kernels.scan`` over the ``[d_inner, N]`` state.
Initialisation as the paper: S4D-real ``A_n = n + 1``, ``Δ`` log-uniform in [1e-3, 0.1], ``D = 1``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.cost import Flops
from hybrids.layers import CausalConv1D, document_starts, dtype_of, linear
from hybrids.mixers.contract import CONV_WIDTH, D_STATE, SSM_EXPAND
from kernels.scan import linear_scan


class Mamba(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"a_log", "dt_bias", "d_skip"})  # A, Δ's bias, D
  SETTINGS = {"d_state": D_STATE, "ssm_expand": SSM_EXPAND, "conv_width": CONV_WIDTH}
  SEGMENTS = True  # packed documents: the conv reads no earlier document, the scan restarts from h = 0

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.d_inner = int(cfg.ssm_expand * cfg.d_model)
    self.d_state = cfg.d_state
    self.dt_rank = math.ceil(cfg.d_model / 16)
    self.impl, self.dtype = cfg.scan_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.in_proj = linear(cfg, cfg.d_model, 2 * self.d_inner, rngs=rngs)
    self.conv = CausalConv1D(self.d_inner, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.x_proj = linear(cfg, self.d_inner, self.dt_rank + 2 * self.d_state, rngs=rngs)
    self.dt_proj = linear(cfg, self.dt_rank, self.d_inner, rngs=rngs)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (self.d_inner,), jnp.float32, math.log(1e-3), math.log(0.1)))
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus⁻¹(Δ)
    a = jnp.broadcast_to(jnp.arange(1, self.d_state + 1, dtype=jnp.float32), (self.d_inner, self.d_state))
    self.a_log = nnx.Param(jnp.log(a).astype(param_dtype))
    self.d_skip = nnx.Param(jnp.ones((self.d_inner,), param_dtype))
    self.out_proj = linear(cfg, self.d_inner, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int
    check_int(cfg.d_state, "model.d_state", 1, note=" (Mamba's state size N)")
    check_int(cfg.ssm_expand, "model.ssm_expand", 1, note=" (Mamba's inner width = ssm_expand · d_model)")
    if cfg.d_state <= 0 or cfg.ssm_expand <= 0:
      raise ValueError(f"model.d_state={cfg.d_state} and model.ssm_expand={cfg.ssm_expand} must be positive")

  def _scan_inputs(self, x):
    """``x: [..., d_inner]`` (after conv+SiLU) → decay, input ``[..., d_inner, N]`` and ``C [..., N]``."""
    dt_in, b, c = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
    dt = jax.nn.softplus(self.dt_proj(dt_in).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    a = -jnp.exp(self.a_log[...].astype(jnp.float32))
    decay = jnp.exp(dt[..., None] * a)
    inputs = (dt * x.astype(jnp.float32))[..., None] * b.astype(jnp.float32)[..., None, :]
    return decay, inputs, c.astype(jnp.float32)

  def _out(self, h, c, x, z):
    y = jnp.einsum("...dn,...n->...d", h, c) + self.d_skip[...].astype(jnp.float32) * x.astype(jnp.float32)
    return self.out_proj((y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype))

  def __call__(self, u, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``u: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the decay is 0 at a document start, so the scan restarts
    from the zero state; the returned state is that of the last document)."""
    x, z = jnp.split(self.in_proj(u), 2, axis=-1)
    x, conv_state = self.conv(x, return_state=True, segment_ids=segment_ids)
    x = jax.nn.silu(x)
    decay, inputs, c = self._scan_inputs(x)
    if segment_ids is not None:
      decay = jnp.where(document_starts(segment_ids)[..., None, None], 0.0, decay)
    h, h_last = linear_scan(decay, inputs, impl=self.impl)
    y = self._out(h, c, x, z)
    return (y, {"conv": conv_state, "h": h_last}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch), "h": jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32)}

  def step(self, u_t, state):
    x, z = jnp.split(self.in_proj(u_t), 2, axis=-1)
    x, conv_state = self.conv.step(x, state["conv"])
    x = jax.nn.silu(x)
    decay, inputs, c = self._scan_inputs(x)
    h = decay * state["h"] + inputs
    return self._out(h, c, x, z), {"conv": conv_state, "h": h}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the selective scan, ``6·d_inner·N`` (``Δ⊗A``, ``Δx⊗B``, the update, the ``C`` read-out)."""
    return Flops(recurrence=6.0 * self.d_inner * self.d_state)
