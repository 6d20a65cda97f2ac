"""BaseConv: a gated convolution, Zoology's minimal recall-capable convolutional mixer.

Arora, Eyuboglu, Timalsina et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models", §4: ``y = (u W + b₁) ⊙ (h ∗ u + b₂)``, a linear projection gating a depthwise causal convolution.

The variant implemented here:

    u = W_in x,   g = W_proj x + b₁
    c = ShortConv_w(u) + h ∗ u                short filter of width conv_width (its bias is b₂)
                                               + modal long filter h_l = Re Σ_n R_n λ_n^l, n = 1 … d_state
    out = W_out (g ⊙ c)

Choices, and why:

- Short *and* long filter in one layer, summed. Zoology's BaseConv takes, per layer, either a short
  filter or a long (Hyena-style implicit) one, and its stacks alternate the two. Here a pattern entry
  is one mixer and layer patterns are spent on hybridising with attention, so each BaseConv layer
  carries both. Their sum is still a single depthwise causal filter — free first ``conv_width`` taps
  plus a modal tail — so ``c`` is exactly the paper's ``h ∗ u + b₂``. No learned mixing gate between
  the two: the short taps and the residues already set each part's scale, so it would be redundant.
- Modal long filter (as StripedHyena's, :mod:`hybrids.longconv`) instead of Zoology's MLP-implicit
  one, so the layer has a constant-size recurrent face for decoding.
- ``W_in`` and ``W_out`` (Zoology's code has neither; the Based repository's BaseConv has both) give
  the layer a learned read-in and read-out, as every other mixer here has; width stays ``d_model``.
  Zoology's ``+ u`` is the residual connection of the surrounding block. No activation (Zoology's
  default).

State: ``conv`` ``[batch, conv_width − 1, d_model]`` and ``modes`` complex64 ``[batch, d_model, d_state]``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hybrids.cost import Flops, fft_conv_flops
from hybrids.layers import CausalConv1D, dtype_of, linear
from hybrids.longconv import ModalLongConv
from hybrids.mixers.contract import CONV_WIDTH, D_STATE, LONGCONV_IMPL
from kernels.modal import IMPLS as MODAL_IMPLS


class BaseConv(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"log_rate", "angle", "residues"})  # the long filter's poles and residues
  SETTINGS = {"conv_width": CONV_WIDTH, "d_state": D_STATE, "longconv_impl": LONGCONV_IMPL}
  SEGMENTS = True  # packed documents: the short conv and the long filter's modal state restart at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.dtype = dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.in_proj = linear(cfg, d, d, rngs=rngs)
    self.gate_proj = linear(cfg, d, d, rngs=rngs, use_bias=True)
    self.conv = CausalConv1D(d, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.filter = ModalLongConv(d, cfg.d_state, param_dtype=param_dtype, rngs=rngs, impl=cfg.longconv_impl)
    self.out_proj = linear(cfg, d, d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_choice, check_int
    check_int(cfg.d_state, "model.d_state", 1, note=" (modes of each BaseConv long filter)")
    check_choice(cfg.longconv_impl, "model.longconv_impl", MODAL_IMPLS)

  def _out(self, x, short, long):
    gate = self.gate_proj(x).astype(jnp.float32)
    return self.out_proj((gate * (short.astype(jnp.float32) + long)).astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (both filters read no earlier document; the state is the
    last document's)."""
    u = self.in_proj(x)
    short, conv_state = self.conv(u, return_state=True, segment_ids=segment_ids)
    if not return_state:
      return self._out(x, short, self.filter(u, segment_ids=segment_ids))
    long, modes = self.filter(u, return_state=True, segment_ids=segment_ids)
    return self._out(x, short, long), {"conv": conv_state, "modes": modes}

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch), "modes": self.filter.init_state(batch)}

  def step(self, x_t, state):
    """Recurrent face. ``x_t: [batch, d_model]``."""
    u = self.in_proj(x_t)
    short, conv_state = self.conv.step(u, state["conv"])
    long, modes = self.filter.step(u, state["modes"])
    return self._out(x_t, short, long), {"conv": conv_state, "modes": modes}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the FFT convolution with the long filter (materialised once per batch)."""
    return Flops(recurrence=fft_conv_flops(self.filter.channels, seq_len))
