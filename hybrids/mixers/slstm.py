"""sLSTM: the scalar-memory LSTM of xLSTM with exponential gating and per-head memory mixing.

Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory" (§2.2 sLSTM, appendix: sLSTM block).

Cell (width ``d = d_model``, ``heads`` blocks; every ``R`` is block-diagonal, one ``d/heads`` block a head):
    z̃_t = W_z x_t + R_z h_{t−1} + b_z        z_t = tanh(z̃_t)
    ĩ_t = W_i x̂_t + R_i h_{t−1} + b_i        i_t = exp(ĩ_t)
    f̃_t = W_f x̂_t + R_f h_{t−1} + b_f        f_t = σ(f̃_t)
    õ_t = W_o x_t + R_o h_{t−1} + b_o        o_t = σ(õ_t)
    c_t = f_t c_{t−1} + i_t z_t,   n_t = f_t n_{t−1} + i_t,   h_t = o_t ⊙ c_t / n_t
with ``x̂_t = SiLU(Conv1D_4(x_t))`` feeding the input and forget gates (the paper's sLSTM block).
Stabilised as in the paper (eqs. 15–17): ``m_t = max(log f_t + m_{t−1}, ĩ_t)``,
``i'_t = exp(ĩ_t − m_t)``, ``f'_t = exp(log f_t + m_{t−1} − m_t)`` replace ``i_t, f_t``, which scales
``c`` and ``n`` alike and leaves ``h`` unchanged. The fresh state has ``m_0 = −10³⁰`` (an empty
memory: ``m_1 = ĩ_1``), which makes ``n_t ≥ 1`` for all t, so ``c_t / n_t`` never divides by ~0.

Block output: ``y_t = W_out GroupNorm_h(h_t)``. The paper follows the cell with a gated
up/down-projection (factor 4/3) inside the same residual block; here that role is played by the
residual block's own gated MLP, so the mixer ends with a plain ``d → d`` output projection.
Initialisation: forget-gate biases ``linspace(3, 6)`` over the channels (f starts near 1), other
biases 0, ``R`` normal with variance ``1/(d/heads)``.

There is no parallel form (``h_{t−1}`` enters every gate): the input projections run for all
positions at once and the parallel face is a ``lax.scan`` of the same cell function the recurrent face
calls. Decode state: the conv's last inputs and ``c, n, m, h [batch, d]`` (f32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops
from hybrids.layers import CausalConv1D, HeadNorm, document_starts, dtype_of, linear
from hybrids.mixers.contract import CONV_WIDTH

FORGET_BIAS_RANGE = (3.0, 6.0)
_EMPTY_M = -1e30  # stabiliser of the empty memory (see the module docstring)


class SLSTM(nnx.Module):
  NO_WEIGHT_DECAY = frozenset()  # the recurrent matrices R and the gate biases are decayed
  SETTINGS = {"conv_width": CONV_WIDTH}
  SEGMENTS = True  # packed documents: the conv is masked and the cell restarts from its fresh state at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.d, self.heads, self.head_dim = d, cfg.num_heads, d // cfg.num_heads
    self.dtype = dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.conv = CausalConv1D(d, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.zo_proj = linear(cfg, d, 2 * d, rngs=rngs)  # W_z, W_o from x
    self.if_proj = linear(cfg, d, 2 * d, rngs=rngs)  # W_i, W_f from the conv path
    # b and R stacked over the gates in the order z, i, f, o.
    bias = jnp.zeros((4, d), jnp.float32).at[2].set(jnp.linspace(*FORGET_BIAS_RANGE, d, dtype=jnp.float32))
    self.bias = nnx.Param(bias.astype(param_dtype))
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=2, out_axis=3)
    self.recurrent = nnx.Param(init(rngs.params(), (4, self.heads, self.head_dim, self.head_dim), param_dtype))
    self.norm = HeadNorm(self.heads, self.head_dim, param_dtype=param_dtype)
    self.out_proj = linear(cfg, d, d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    if cfg.num_heads <= 0 or cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model} "
                       "(sLSTM's block-diagonal recurrent matrices)")

  def _preactivations(self, x, x_conv):
    """``W x + b`` for the gates z, i, f, o: ``[..., 4, d]`` f32 (everything but the recurrent part)."""
    z, o = jnp.split(self.zo_proj(x), 2, axis=-1)
    i, f = jnp.split(self.if_proj(jax.nn.silu(x_conv)), 2, axis=-1)
    return jnp.stack([z, i, f, o], axis=-2).astype(jnp.float32) + self.bias[...].astype(jnp.float32)

  def _cell(self, state, pre_t):
    """One stabilised sLSTM step from ``pre_t = W x_t + b [batch, 4, d]``; returns ``(state, h_t)``."""
    c, n, m, h = state["c"], state["n"], state["m"], state["h"]
    h_heads = rearrange(h, "b (h d) -> b h d", h=self.heads)
    rec = jnp.einsum("bhi,ghij->bghj", h_heads, self.recurrent[...].astype(jnp.float32))
    z, i, f, o = jnp.unstack(pre_t + rearrange(rec, "b g h j -> b g (h j)"), axis=1)
    log_f = jax.nn.log_sigmoid(f)
    m_new = jnp.maximum(log_f + m, i)
    i_gate, f_gate = jnp.exp(i - m_new), jnp.exp(log_f + m - m_new)
    c = f_gate * c + i_gate * jnp.tanh(z)
    n = f_gate * n + i_gate
    h = jax.nn.sigmoid(o) * c / n
    return {"c": c, "n": n, "m": m_new, "h": h}, h

  def _out(self, h):
    h = rearrange(self.norm(rearrange(h, "... (h d) -> ... h d", h=self.heads)), "... h d -> ... (h d)")
    return self.out_proj(h.astype(self.dtype))

  def _cell_state(self, state):
    return {key: state[key] for key in ("c", "n", "m", "h")}

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the conv reads no earlier document and the cell starts
    each document from the fresh state; the returned state is the last document's)."""
    x_conv, conv_state = self.conv(x, return_state=True, segment_ids=segment_ids)
    pre = self._preactivations(x, x_conv)
    cell0 = self._cell_state(self.init_state(x.shape[0]))
    if segment_ids is None:
      cell, h = jax.lax.scan(self._cell, cell0, jnp.moveaxis(pre, 1, 0))
    else:
      def cell_with_restart(state, inputs):
        pre_t, start_t = inputs
        state = jax.tree.map(lambda fresh, s: jnp.where(start_t[:, None], fresh, s), cell0, state)
        return self._cell(state, pre_t)

      starts = jnp.moveaxis(document_starts(segment_ids), 1, 0)
      cell, h = jax.lax.scan(cell_with_restart, cell0, (jnp.moveaxis(pre, 1, 0), starts))
    y = self._out(jnp.moveaxis(h, 0, 1))
    return (y, {"conv": conv_state, **cell}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    zeros = jnp.zeros((batch, self.d), jnp.float32)
    return {"conv": self.conv.init_state(batch), "c": zeros, "n": zeros, "m": jnp.full_like(zeros, _EMPTY_M),
            "h": zeros}

  def step(self, x_t, state):
    x_conv, conv_state = self.conv.step(x_t, state["conv"])
    cell, h = self._cell(self._cell_state(state), self._preactivations(x_t, x_conv))
    return self._out(h), {"conv": conv_state, **cell}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the block-diagonal recurrent matmuls of the four gates, then ``c`` and ``n`` updated
    elementwise (2 per state element)."""
    return Flops(recurrence=2.0 * self.recurrent.size + 2.0 * 2 * self.d)
