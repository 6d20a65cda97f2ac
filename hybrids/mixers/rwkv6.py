"""RWKV-6 ("Finch") time mixing: token shift with data-dependent interpolation, data-dependent decay,
and a bonus for the current token.

Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence".

    x̄_t = x_{t−1}                                              token shift (0 before the start)
    m_• = LoRA_•(x_t + (x̄_t − x_t) ⊙ μ_x)                       ddlerp offsets, • ∈ {r, k, v, w, g}
    x_• = x_t + (x̄_t − x_t) ⊙ (μ_• + m_•)
    r_t = W_r x_r,  k_t = W_k x_k,  v_t = W_v x_v,  g_t = SiLU(W_g x_g)
    w_t = exp(−exp(w_0 + LoRA_w(x_w)))                          per-channel decay in (0, 1)
    S_t = diag(w_t) S_{t−1} + k_t v_tᵀ                          per head
    o_t = r_tᵀ (S_{t−1} + diag(u) k_t v_tᵀ)                     reads the state *before* the update
    y_t = W_o (GroupNorm_h(o_t) ⊙ g_t)

The recurrence is ``kernels.gla``: feeding it keys, values and decays shifted by one step gives
``S_{t−1}`` read by ``r_t``; the bonus term is a per-head dot product. (RWKV's channel mixing is the
block's MLP here.) State: the last input ``[batch, d_model]`` and ``S [batch, heads, d_head, d_head]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import HeadNorm, document_starts, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE
from kernels.gla import gla, gla_step

MIX_RANK, DECAY_RANK = 32, 64  # LoRA ranks of the paper's 1.6B+ models
BRANCHES = 5  # r, k, v, w, g


class RWKV6(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"mu_x", "mu", "w0", "bonus"})  # token-shift mixes, decay base, bonus u
  SETTINGS = {"chunk_size": CHUNK_SIZE}
  # Packed documents: the token shift reads 0 (not the previous document's last token) at a start,
  # and the state restarts from 0 there.
  SEGMENTS = True

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.heads = cfg.num_heads
    self.head_dim = d // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    ramp = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
    self.mu_x = nnx.Param((1.0 - ramp ** 0.5).astype(param_dtype))
    self.mu = nnx.Param(jnp.broadcast_to(1.0 - ramp ** 0.5, (BRANCHES, d)).astype(param_dtype))
    self.mix_down = linear(cfg, d, BRANCHES * MIX_RANK, rngs=rngs)
    self.mix_up = nnx.Param(jnp.zeros((BRANCHES, MIX_RANK, d), param_dtype))  # ddlerp starts at μ
    self.w0 = nnx.Param((-6.0 + 5.0 * ramp ** 0.85).astype(param_dtype))  # RWKV's decay-speed ramp
    self.decay_down = linear(cfg, d, DECAY_RANK, rngs=rngs)
    self.decay_up = nnx.Param(jnp.zeros((DECAY_RANK, d), param_dtype))
    self.bonus = nnx.Param((0.5 * (1.0 - ramp) + 0.1).reshape(self.heads, self.head_dim).astype(param_dtype))
    self.r_proj = linear(cfg, d, d, rngs=rngs)
    self.k_proj = linear(cfg, d, d, rngs=rngs)
    self.v_proj = linear(cfg, d, d, rngs=rngs)
    self.g_proj = linear(cfg, d, d, rngs=rngs)
    self.norm = HeadNorm(self.heads, self.head_dim, param_dtype=param_dtype)
    self.o_proj = linear(cfg, d, d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    if cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model}")
    from hybrids.checks import check_int
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")

  def _inputs(self, x, x_prev):
    """``x, x_prev: [..., d]`` → r, k, v ``[..., heads, d_head]``, log-decay, gate ``[..., d]``."""
    x = x.astype(jnp.float32)
    delta = x_prev.astype(jnp.float32) - x
    xxx = x + delta * self.mu_x[...]
    lora = jnp.tanh(rearrange(self.mix_down(xxx), "... (n r) -> ... n r", n=BRANCHES).astype(jnp.float32))
    offsets = jnp.einsum("...nr,nrd->...nd", lora, self.mix_up[...].astype(jnp.float32))
    xr, xk, xv, xw, xg = [x + delta * (self.mu[...][i] + offsets[..., i, :]) for i in range(BRANCHES)]
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    decay_in = jnp.tanh(self.decay_down(xw.astype(self.dtype)).astype(jnp.float32)) @ self.decay_up[...]
    log_decay = -jnp.exp(self.w0[...] + decay_in)  # log w_t
    cast = lambda z: z.astype(self.dtype)
    r, k, v = split(self.r_proj(cast(xr))), split(self.k_proj(cast(xk))), split(self.v_proj(cast(xv)))
    return r, k, v, split(log_decay), jax.nn.silu(self.g_proj(cast(xg)))

  def _bonus(self, r, k, v):
    weight = jnp.sum(r.astype(jnp.float32) * self.bonus[...] * k.astype(jnp.float32), axis=-1, keepdims=True)
    return weight * v.astype(jnp.float32)

  def _out(self, o, g):
    o = rearrange(self.norm(o), "... h d -> ... (h d)")
    return self.o_proj((o * g.astype(jnp.float32)).astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    x_prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    starts = None if segment_ids is None else document_starts(segment_ids)
    if starts is not None:
      x_prev = jnp.where(starts[..., None], jnp.zeros_like(x_prev), x_prev)
    r, k, v, log_decay, g = self._inputs(x, x_prev)
    shift = lambda z: jnp.pad(z, ((0, 0), (1, 0)) + ((0, 0),) * (z.ndim - 2))[:, :-1]
    # Shifted by one step, the kernel's inclusive read r_t·S''_t is r_t·S_{t−1}.
    k_prev = shift(k)
    if starts is not None:
      # The kernel zeroes the state entering a start t₀, but its shifted key there is the previous
      # document's last one: zero it too, so that S''_{t₀} = S_{t₀−1} = 0 as for the document alone.
      k_prev = jnp.where(starts[..., None, None], jnp.zeros_like(k_prev), k_prev)
    o, s_prev = gla(r, k_prev, shift(v), shift(log_decay), segment_ids=segment_ids, chunk_size=self.chunk_size,
                    impl=self.impl)
    o = o.astype(jnp.float32) + self._bonus(r, k, v)
    y = self._out(o, g)
    if not return_state:
      return y
    _, s_last = gla_step(r[:, -1], k[:, -1], v[:, -1], log_decay[:, -1], s_prev)  # S_{T−1} → S_T
    return y, {"shift": x[:, -1], "S": s_last}

  def init_state(self, batch: int, *, max_len: int | None = None):
    d = self.heads * self.head_dim
    return {"shift": jnp.zeros((batch, d), self.dtype),
            "S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)}

  def step(self, x_t, state):
    r, k, v, log_decay, g = self._inputs(x_t, state["shift"])
    o_prev = jnp.einsum("bhk,bhkv->bhv", r.astype(jnp.float32), state["S"])
    o = o_prev + self._bonus(r, k, v)
    _, s = gla_step(r, k, v, log_decay, state["S"])
    return self._out(o, g), {"shift": x_t.astype(self.dtype), "S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the LoRA up-projections (raw parameters, one use each) and the chunked ``kernels.gla``
    form with a per-key decay."""
    lora_up = 2.0 * (self.mix_up.size + self.decay_up.size)
    return Flops(projections=lora_up, recurrence=gla_flops(self.heads, self.head_dim, self.head_dim, self.chunk_size,
                                                           seq_len, per_key_decay=True))
