"""Griffin's recurrent block with the Real-Gated Linear Recurrent Unit (RG-LRU).

De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
Models" (Hawk = a stack of these blocks only; Griffin = ``rglru, rglru, swa``).

Block (Fig. 2): two branches of width ``d_rnn``
    gate branch:       g_t = GeLU(W_y x_t + b_y)
    recurrent branch:  u_t = Conv1D_4(W_x x_t + b_x)   (short causal depthwise conv, width 4)
                       h_t = RG-LRU(u_t)
    y_t = W_out (h_t ⊙ g_t) + b_out

RG-LRU (eqs. 1–4), with block-diagonal gate weights (one block per head):
    r_t = σ(W_a u_t + b_a)                        recurrence gate
    i_t = σ(W_i u_t + b_i)                        input gate
    log a_t = c · r_t · log σ(Λ),  c = 8          (computed as −c · r_t · softplus(−Λ))
    h_t = a_t ⊙ h_{t−1} + √(1 − a_t²) ⊙ (i_t ⊙ u_t)

Where the paper and the authors' released code (``recurrentgemma`` 1.0.1, ``recurrentgemma.jax``'s
``RecurrentBlock`` / ``RGLRU`` / ``Conv1D``) differ, this follows the code:

- **reset at a document start.** At a document's first token (``segment_pos == 0`` there) the
  recurrence is reset: ``a_t = 0`` and the multiplier is 1 instead of √(1 − a_t²), so that token
  enters undamped, ``h_t = i_t ⊙ u_t``. The first position of a sequence is a document start (the
  parallel face's position 0, and a step from a state whose ``pos`` is 0). :meth:`RGLRUBlock.forward`
  takes any boolean ``reset [batch, time]`` (see :func:`document_starts`); there the short conv also
  does not read across a start, as ``Conv1D``'s document mask does;
- **biases** on the three dense projections ``linear_y``, ``linear_x``, ``linear_out`` (here
  ``gate_proj``, ``in_proj``, ``out_proj``), zero at initialisation;
- **Λ's initialisation:** σ(Λ) = a (not a^c) is drawn uniformly *in area* on the ring
  0.9 ≤ |a| ≤ 0.999 (``rnn_real_param_init``: a² uniform in [0.81, 0.998]), so a^c starts in
  [0.43, 0.992]; the paper (§2.4) draws a^c uniform in [0.9, 0.999];
- **the other initialisations:** dense kernels normal with variance 1/fan_in (``linear_out``:
  2/(fan_in · n_layers), Griffin's ``final_w_init_variance_scale = 2 / num_layers``); gate kernels
  normal with variance 1/d_rnn (flax's fan-in of a ``[heads, block, block]`` kernel is heads·block);
  conv kernel normal with variance 0.01/conv_width;
- **√(1 − a²) has a bounded derivative** (``sqrt_bound_derivative``, bound 1000): the backward pass
  evaluates √'s derivative at ``max(x, 1/(4·1000²))``.

Parameter names, ours ← ``recurrentgemma`` (``RecurrentBlock`` params): ``gate_proj`` ← ``linear_y``,
``in_proj`` ← ``linear_x``, ``out_proj`` ← ``linear_out`` (``kernel``/``bias``), ``conv`` ← ``conv_1d``
(``kernel`` ← ``w``, ``bias`` ← ``b``), ``input_gate`` ← ``rg_lru/input_gate``, ``recurrence_gate`` ←
``rg_lru/a_gate`` (``kernel`` ← ``w``, ``bias`` ← ``b``), ``a_param`` = **−** ``rg_lru/a_param``
(there a = exp(−c·r·softplus(p)), here a = σ(Λ)^{c r}, the paper's sign). ``tests/test_recurrentgemma.py``
checks the block against the package with these parameters, both faces, to 1e-5 in f32.

The recurrence is the diagonal scan of ``kernels.scan``; the state is ``h [batch, d_rnn]`` (f32), the
conv's last inputs and ``pos``, the number of tokens seen (0: the next token starts a document).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.cost import Flops
from hybrids.layers import BlockDiagonalLinear, CausalConv1D, document_starts, dtype_of, linear
from hybrids.mixers.contract import CONV_WIDTH, Setting
from kernels.scan import linear_scan

C = 8.0  # the fixed scalar c of eq. 4
A_INIT_RANGE = (0.9, 0.999)  # ring of σ(Λ) = a at initialisation (recurrentgemma's min_rad, max_rad)
MAX_SQRT_GRADIENT = 1000.0  # recurrentgemma's bound on d√x/dx in √(1 − a²)
CONV_INIT_SCALE = 0.01  # recurrentgemma's Conv1D w_init_variance_scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bound_derivative(x, max_gradient: float):
  """``√x`` whose derivative is bounded by ``max_gradient`` (recurrentgemma's, for bf16 training)."""
  del max_gradient
  return jnp.sqrt(x)


def _sqrt_fwd(x, max_gradient):
  del max_gradient
  return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient, x, g):
  x_pre = jnp.maximum(x, 1.0 / (4.0 * max_gradient ** 2))
  return (g * 0.5 * jax.lax.rsqrt(x_pre),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def first_position_reset(batch: int, time: int):
  """``reset [batch, time]`` of a sequence that is one document: only position 0 starts one."""
  return jnp.zeros((batch, time), bool).at[:, 0].set(True)


def a_param_init(key, shape, dtype=jnp.float32, lo: float = A_INIT_RANGE[0], hi: float = A_INIT_RANGE[1]):
  """Λ with σ(Λ) uniform in area on the ring ``lo ≤ a ≤ hi`` (recurrentgemma's ``rnn_real_param_init``,
  whose parameter is −Λ)."""
  unif = jax.random.uniform(key, shape, jnp.float32)
  log_a = 0.5 * jnp.log(unif * (hi ** 2 - lo ** 2) + lo ** 2 + 1e-8)
  return (-jnp.log(jnp.exp(-log_a) - 1.0)).astype(dtype)  # Λ = logit(a) = −softplus⁻¹(−log a)


class RGLRUBlock(nnx.Module):
  """The Griffin recurrent block: ``y = W_out(RG-LRU(Conv(W_x x)) ⊙ GeLU(W_y x))``, with biases."""

  NO_WEIGHT_DECAY = frozenset({"a_param"})  # Λ, the recurrence's decay rates
  SEGMENTS = True  # packed documents: the RG-LRU resets and the conv is masked at each start (recurrentgemma)
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
    dense_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    out_scale = 2.0 / max(int(getattr(cfg, "n_layers", 1) or 1), 1)
    out_init = jax.nn.initializers.variance_scaling(out_scale, "fan_in", "normal")
    self.gate_proj = linear(cfg, cfg.d_model, self.d_rnn, use_bias=True, kernel_init=dense_init, rngs=rngs)
    self.in_proj = linear(cfg, cfg.d_model, self.d_rnn, use_bias=True, kernel_init=dense_init, rngs=rngs)
    self.conv = CausalConv1D(self.d_rnn, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    conv_std = math.sqrt(CONV_INIT_SCALE / cfg.conv_width)
    self.conv.kernel = nnx.Param(
        (conv_std * jax.random.normal(rngs.params(), (cfg.conv_width, self.d_rnn), jnp.float32)).astype(param_dtype))
    self.recurrence_gate = BlockDiagonalLinear(self.d_rnn, self.heads, param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
    self.input_gate = BlockDiagonalLinear(self.d_rnn, self.heads, param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
    gate_std = 1.0 / math.sqrt(self.d_rnn)  # flax's fan-in of [heads, block, block] is heads · block
    for gate in (self.recurrence_gate, self.input_gate):
      shape = gate.kernel[...].shape
      gate.kernel = nnx.Param((gate_std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(param_dtype))
    self.a_param = nnx.Param(a_param_init(rngs.params(), (self.d_rnn,), param_dtype))  # Λ, σ(Λ) = a
    self.out_proj = linear(cfg, self.d_rnn, cfg.d_model, use_bias=True, kernel_init=out_init, rngs=rngs)

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

  def _gates(self, u, reset):
    """``u: [..., d_rnn]``, ``reset: [...]`` (bool) → ``(a, b)`` of the scan ``h = a ⊙ h + b``, both f32.

    Where ``reset``: ``a = 0`` and ``b = i ⊙ u`` (multiplier 1), recurrentgemma's document reset."""
    r = jax.nn.sigmoid(self.recurrence_gate(u).astype(jnp.float32))
    i = jax.nn.sigmoid(self.input_gate(u).astype(jnp.float32))
    log_a = -C * r * jax.nn.softplus(-self.a_param[...].astype(jnp.float32))
    # 1 − a² via expm1: a is within 1e-3 of 1 at init, where 1 − exp(2 log a) cancels.
    multiplier = sqrt_bound_derivative(-jnp.expm1(2.0 * log_a), MAX_SQRT_GRADIENT)
    reset = reset[..., None]
    multiplier = jnp.where(reset, 1.0, multiplier)
    a = jnp.where(reset, 0.0, jnp.exp(log_a))
    return a, multiplier * i * u.astype(jnp.float32)

  def _conv(self, x, reset):
    """The causal conv over ``x [batch, time, d_rnn]`` reading no input before the latest document
    start (``Conv1D``'s document mask); ``(y, conv state)``, the state holding the last document's
    inputs only (recurrentgemma keeps earlier documents' there; equal for one document a row)."""
    width = self.conv.width
    kernel = self.conv.kernel[...].astype(self.dtype)
    time = x.shape[1]
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (width - 1, 0), (0, 0)))
    # A start at any of positions t−s+1 … t hides input t−s: count starts in that window.
    starts = jnp.cumsum(jnp.pad(reset.astype(jnp.int32), ((0, 0), (width - 1, 0))), axis=1)
    y = self.conv.bias[...].astype(self.dtype)
    for shift in range(width):  # input t − shift, weight width − 1 − shift
      seen = padded[:, width - 1 - shift:width - 1 - shift + time]
      crossed = starts[:, width - 1:] - starts[:, width - 1 - shift:width - 1 - shift + time]
      y = y + kernel[width - 1 - shift] * jnp.where((crossed == 0)[..., None], seen, 0)
    # The state keeps only the last document's inputs (zeros before its start), as if it ran alone.
    tail = padded.shape[1] - (width - 1)
    crossed = starts[:, -1:] - starts[:, tail:]  # starts after each kept input
    return y, jnp.where((crossed == 0)[..., None], padded[:, tail:], 0)

  def forward(self, x, reset, *, h0=None):
    """Parallel face with explicit document starts. ``x: [batch, time, d_model]``, ``reset: bool[batch,
    time]`` (True where a document starts; see :func:`document_starts`), ``h0``: optional f32 state
    before position 0 (forgotten where ``reset[:, 0]``). → ``(y, {"conv", "h", "pos"})``; ``pos: int32[batch]``
    is each row's position in its last document (> 0, so a step after it does not reset; a row
    whose last document started at ``time − n`` has ``pos = n``, as if that document ran alone)."""
    gate = jax.nn.gelu(self.gate_proj(x))
    u, conv_state = self._conv(self.in_proj(x), reset)
    a, b = self._gates(u, reset)
    h, h_last = linear_scan(a, b, h0, impl=self.impl)
    y = self.out_proj(h.astype(self.dtype) * gate)
    t = jnp.arange(x.shape[1], dtype=jnp.int32)
    last_start = jnp.max(jnp.where(reset, t, 0), axis=1)
    return y, {"conv": conv_state, "h": h_last, "pos": (x.shape[1] - last_start).astype(jnp.int32)}

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]`` → ``[batch, time, d_model]`` (and the state).
    Position 0 starts a document (the RG-LRU reset there); ``segment_ids: int [batch, time]``
    (optional): packed documents, each starting where the id changes, each run as if alone."""
    reset = first_position_reset(x.shape[0], x.shape[1]) if segment_ids is None else document_starts(segment_ids)
    y, state = self.forward(x, reset)
    return (y, state) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    """``{"conv": [batch, conv_width−1, d_rnn], "h": f32[batch, d_rnn], "pos": int32[batch]}``; constant
    in time (``pos`` 0: the row's next token starts a document)."""
    return {"conv": self.conv.init_state(batch), "h": jnp.zeros((batch, self.d_rnn), jnp.float32),
            "pos": jnp.zeros((batch,), jnp.int32)}

  def step(self, x_t, state):
    """Recurrent face. ``x_t: [batch, d_model]`` → ``(y_t [batch, d_model], new state)``; the RG-LRU
    resets when ``state["pos"] == 0``."""
    gate = jax.nn.gelu(self.gate_proj(x_t))
    u, conv_state = self.conv.step(self.in_proj(x_t), state["conv"])
    reset = state["pos"] == 0
    a, b = self._gates(u, reset)
    h = a * state["h"] + b
    y = self.out_proj(h.astype(self.dtype) * gate)
    return y, {"conv": conv_state, "h": h, "pos": state["pos"] + 1}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the elementwise recurrence ``h = a ⊙ h + b``, 2 per state element."""
    return Flops(recurrence=2.0 * self.d_rnn)
