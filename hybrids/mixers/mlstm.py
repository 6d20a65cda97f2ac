"""mLSTM: the matrix-memory LSTM of xLSTM, in its pre-up-projection block.

Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory" (§2.3 mLSTM, appendix: mLSTM block).

Cell, per head (``d_h = head_dim``), eqs. of §2.3 with the sigmoid forget gate (the paper's default):
    C_t = f_t C_{t−1} + i_t v_t k_tᵀ          n_t = f_t n_{t−1} + i_t k_t
    h̃_t = C_t q_t / max(|n_tᵀ q_t|, 1)
    i_t = exp(ĩ_t),  f_t = σ(f̃_t),  [ĩ_t, f̃_t] = W_g x_t + b_g        (one scalar per head)
    k_t = W_k x_t / √d_h

Block (pre-up-projection, inner width ``E = ssm_expand · d_model``, the paper's projection factor 2):
    [u_t, z_t] = W_up x_t                                   u, z ∈ R^E
    c_t = SiLU(Conv1D_4(u_t))                               causal conv on the q/k path only
    q_t = W_q c_t,  k_t = W_k c_t,  v_t = W_v u_t           W_q, W_k, W_v block-diagonal, one block a head
    y_t = W_down(σ(z_t) ⊙ (GroupNorm_h(h̃_t) + s ⊙ c_t))     learnable skip s, output gate o = σ(W_o x)

The output gate o_t = σ(W_o x_t) of the cell is applied after the norm and skip, with W_o the gate half
of the up-projection (the reference code gates with swish(z) in this place). The gates read the block
input ``x`` (a ``d_model → 2·heads`` map). Initialisation as the paper: forget-gate biases
``linspace(3, 6)`` over heads (f starts near 1), input-gate biases N(0, 0.1²), skip s = 1.

The recurrence is ``kernels.gla`` with ``log_decay = log σ(f̃)``, ``log_input_gate = ĩ`` and a ones
column appended to ``v`` so that the last output column is the normaliser ``n_tᵀq_t``; the kernel
carries the state scaled by ``exp(−m_t)`` (stabiliser ``m_t = max(log f_t + m_{t−1}, ĩ_t)``), so
``h̃_t = o_t / max(|ν_t|, exp(−m_t))`` with ``o, ν`` the scaled numerator and normaliser, the same
value as the unscaled formula. Decode state: the conv's last inputs, ``S [batch, heads, d_h, d_h + 1]``
and ``m [batch, heads]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import BlockDiagonalLinear, CausalConv1D, HeadNorm, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, CONV_WIDTH, SSM_EXPAND
from kernels.gla import gla, gla_step

FORGET_BIAS_RANGE = (3.0, 6.0)
# exp(−m) only enters as the floor of the normaliser; capping it keeps exp finite when m ≪ 0 (the
# output is then ≤ e^−80 · |C q|, i.e. zero in f32, exactly as without the cap).
_MAX_NEG_M = 80.0


class MLSTM(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"skip"})  # the learnable skip s
  SETTINGS = {"ssm_expand": SSM_EXPAND, "chunk_size": CHUNK_SIZE, "conv_width": CONV_WIDTH}
  # Packed documents: the conv reads no earlier document; the memory, normaliser and stabiliser
  # restart from (S, m) = (0, 0) at each start (kernels.gla's segment_ids).
  SEGMENTS = True

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.inner = int(cfg.ssm_expand * cfg.d_model)
    self.heads = cfg.num_heads
    self.head_dim = self.inner // self.heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.up_proj = linear(cfg, cfg.d_model, 2 * self.inner, rngs=rngs)
    self.conv = CausalConv1D(self.inner, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    block = lambda: BlockDiagonalLinear(self.inner, self.heads, param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = block(), block(), block()
    self.gate_proj = linear(cfg, cfg.d_model, 2 * self.heads, rngs=rngs, use_bias=True)
    input_bias = 0.1 * jax.random.normal(rngs.params(), (self.heads,), jnp.float32)
    forget_bias = jnp.linspace(*FORGET_BIAS_RANGE, self.heads, dtype=jnp.float32)
    self.gate_proj.bias = nnx.Param(jnp.concatenate([input_bias, forget_bias]).astype(param_dtype))
    self.skip = nnx.Param(jnp.ones((self.inner,), param_dtype))
    self.norm = HeadNorm(self.heads, self.head_dim, param_dtype=param_dtype)
    self.down_proj = linear(cfg, self.inner, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int
    check_int(cfg.ssm_expand, "model.ssm_expand", 1, note=" (mLSTM's inner width = ssm_expand · d_model)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked mLSTM form)")
    inner = int(cfg.ssm_expand * cfg.d_model)
    if inner <= 0 or inner % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide the mLSTM inner width "
                       f"model.ssm_expand·d_model={inner}")
    if cfg.chunk_size <= 0:
      raise ValueError(f"model.chunk_size={cfg.chunk_size} must be positive")

  def _inputs(self, x, u, c):
    """Cell inputs from the block input ``x``, the up-projected ``u`` and the conv path ``c``:
    ``q, k, v [..., heads, d_h]`` (f32, ``v`` with the ones column) and ``ĩ, log f [..., heads]``."""
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads).astype(jnp.float32)
    q = split(self.q_proj(c))
    k = split(self.k_proj(c)) / jnp.sqrt(float(self.head_dim))
    v = split(self.v_proj(u))
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    log_i, f = jnp.split(self.gate_proj(x).astype(jnp.float32), 2, axis=-1)
    return q, k, v, log_i, jax.nn.log_sigmoid(f)

  def _out(self, o, m, c, z):
    """``h̃ = C q / max(|nᵀq|, 1)`` from the scaled kernel output ``o [..., heads, d_h + 1]`` and ``m``."""
    floor = jnp.exp(-jnp.maximum(m, -_MAX_NEG_M))[..., None]
    h = o[..., :-1] / jnp.maximum(jnp.abs(o[..., -1:]), floor)
    h = rearrange(self.norm(h), "... h d -> ... (h d)")
    h = h + self.skip[...].astype(jnp.float32) * c.astype(jnp.float32)
    return self.down_proj((jax.nn.sigmoid(z.astype(jnp.float32)) * h).astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    u, z = jnp.split(self.up_proj(x), 2, axis=-1)
    c, conv_state = self.conv(u, return_state=True, segment_ids=segment_ids)
    c = jax.nn.silu(c)
    q, k, v, log_i, log_f = self._inputs(x, u, c)
    o, (s, m_last), m = gla(q, k, v, log_f, log_input_gate=log_i, segment_ids=segment_ids,
                            chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(o, m, c, z)
    return (y, {"conv": conv_state, "S": s, "m": m_last}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch),
            "S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim + 1), jnp.float32),
            "m": jnp.zeros((batch, self.heads), jnp.float32)}

  def step(self, x_t, state):
    u, z = jnp.split(self.up_proj(x_t), 2, axis=-1)
    c, conv_state = self.conv.step(u, state["conv"])
    c = jax.nn.silu(c)
    q, k, v, log_i, log_f = self._inputs(x_t, u, c)
    o, (s, m) = gla_step(q, k, v, log_f, (state["S"], state["m"]), log_input_gate_t=log_i)
    return self._out(o, m, c, z), {"conv": conv_state, "S": s, "m": m}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.gla`` form, ``d_h + 1`` value columns (the normaliser)."""
    return Flops(recurrence=gla_flops(self.heads, self.head_dim, self.head_dim + 1, self.chunk_size, seq_len))
