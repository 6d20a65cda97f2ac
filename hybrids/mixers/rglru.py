"""Griffin's recurrent block with the Real-Gated Linear Recurrent Unit (RG-LRU).

De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
Models" (Hawk = a stack of these blocks only; Griffin = ``rglru, rglru, swa``).

Block (Fig. 2): two branches of width ``d_rnn``
    gate branch:       g_t = GeLU(W_g x_t)
    recurrent branch:  u_t = Conv1D_4(W_u x_t)   (short causal depthwise conv, width 4)
                       h_t = RG-LRU(u_t)
    y_t = W_o (h_t ⊙ g_t)

RG-LRU (eqs. 1–4), with block-diagonal gate weights (one block per head):
    r_t = σ(W_a u_t + b_a)                        recurrence gate
    i_t = σ(W_x u_t + b_x)                        input gate
    log a_t = c · r_t · log σ(Λ),  c = 8          (computed as −c · r_t · softplus(−Λ))
    h_t = a_t ⊙ h_{t−1} + √(1 − a_t²) ⊙ (i_t ⊙ u_t)

Λ is initialised so that ``a^c = σ(Λ)^c`` is uniform in [0.9, 0.999] (the paper's initialisation).
The recurrence is the diagonal scan of ``kernels.scan``; the state is ``h [batch, d_rnn]`` (f32) and
the conv's last 3 inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.cost import Flops
from hybrids.layers import BlockDiagonalLinear, CausalConv1D, dtype_of, linear
from hybrids.mixers.contract import CONV_WIDTH, Setting
from kernels.scan import linear_scan

C = 8.0  # the fixed scalar c of eq. 4
A_C_INIT_RANGE = (0.9, 0.999)  # range of a^c at initialisation


class RGLRUBlock(nnx.Module):
  """The Griffin recurrent block: ``y = W_o(RG-LRU(Conv(W_u x)) ⊙ GeLU(W_g x))``."""

  NO_WEIGHT_DECAY = frozenset({"a_param"})  # Λ, the recurrence's decay rates
  SETTINGS = {
      "rnn_width": Setting(0, "RG-LRU width; 0: model.d_model", 0),
      "rnn_heads": Setting(0, "RG-LRU gate blocks; 0: model.num_heads", 0),
      "conv_width": CONV_WIDTH,
  }

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.d_rnn = cfg.rnn_width or cfg.d_model
    self.heads = cfg.rnn_heads or cfg.num_heads
    self.dtype = dtype_of(cfg.dtype)
    self.impl = cfg.scan_impl
    param_dtype = dtype_of(cfg.param_dtype)
    self.gate_proj = linear(cfg, cfg.d_model, self.d_rnn, rngs=rngs)
    self.in_proj = linear(cfg, cfg.d_model, self.d_rnn, rngs=rngs)
    self.conv = CausalConv1D(self.d_rnn, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.recurrence_gate = BlockDiagonalLinear(self.d_rnn, self.heads, param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
    self.input_gate = BlockDiagonalLinear(self.d_rnn, self.heads, param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
    lo, hi = A_C_INIT_RANGE
    a_c = jax.random.uniform(rngs.params(), (self.d_rnn,), jnp.float32, lo, hi)
    a = a_c ** (1.0 / C)
    self.a_param = nnx.Param(jnp.log(a / (1.0 - a)).astype(param_dtype))  # Λ = logit(a)
    self.out_proj = linear(cfg, self.d_rnn, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int
    check_int(cfg.rnn_width, "model.rnn_width", 0, note=" (0: model.d_model)")
    check_int(cfg.rnn_heads, "model.rnn_heads", 0, note=" (0: model.num_heads)")
    d_rnn = cfg.rnn_width or cfg.d_model
    heads = cfg.rnn_heads or cfg.num_heads
    if heads <= 0 or d_rnn % heads:
      raise ValueError(f"model.rnn_heads={heads} (default model.num_heads) must divide the RG-LRU width "
                       f"model.rnn_width={d_rnn} (default model.d_model)")
    if cfg.conv_width < 1:
      raise ValueError(f"model.conv_width={cfg.conv_width} must be ≥ 1")

  def _gates(self, u):
    """``u: [..., d_rnn]`` → ``(a, b)`` of the scan ``h = a ⊙ h + b``, both f32."""
    r = jax.nn.sigmoid(self.recurrence_gate(u).astype(jnp.float32))
    i = jax.nn.sigmoid(self.input_gate(u).astype(jnp.float32))
    log_a = -C * r * jax.nn.softplus(-self.a_param[...].astype(jnp.float32))
    # √(1 − a²) via expm1: a is within 1e-4 of 1 at init, where 1 − exp(2 log a) cancels badly.
    normaliser = jnp.sqrt(-jnp.expm1(2.0 * log_a))
    return jnp.exp(log_a), normaliser * i * u.astype(jnp.float32)

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None):
    """Parallel face. ``x: [batch, time, d_model]`` → ``[batch, time, d_model]`` (and the state)."""
    gate = jax.nn.gelu(self.gate_proj(x))
    u, conv_state = self.conv(self.in_proj(x), return_state=True)
    a, b = self._gates(u)
    h, h_last = linear_scan(a, b, impl=self.impl)
    y = self.out_proj(h.astype(self.dtype) * gate)
    if not return_state:
      return y
    return y, {"conv": conv_state, "h": h_last}

  def init_state(self, batch: int, *, max_len: int | None = None):
    """``{"conv": [batch, conv_width−1, d_rnn], "h": f32[batch, d_rnn]}``; constant in time."""
    return {"conv": self.conv.init_state(batch), "h": jnp.zeros((batch, self.d_rnn), jnp.float32)}

  def step(self, x_t, state):
    """Recurrent face. ``x_t: [batch, d_model]`` → ``(y_t [batch, d_model], new state)``."""
    gate = jax.nn.gelu(self.gate_proj(x_t))
    u, conv_state = self.conv.step(self.in_proj(x_t), state["conv"])
    a, b = self._gates(u)
    h = a * state["h"] + b
    y = self.out_proj(h.astype(self.dtype) * gate)
    return y, {"conv": conv_state, "h": h}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the elementwise recurrence ``h = a ⊙ h + b``, 2 per state element."""
    return Flops(recurrence=2.0 * self.d_rnn)
