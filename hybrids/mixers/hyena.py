"""Hyena (order 2) with modal long filters, as in StripedHyena.

Poli, Massaroli, Nguyen et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models"
(the operator); Poli, Wang, Massaroli et al. 2023, "StripedHyena: Moving Beyond Transformers with Hybrid
Signal Processing Models" (its filters in modal form, which is what makes decoding constant-memory).

    (q, k, v) = ShortConv_w(W_in x)          depthwise causal conv, width conv_width, over all 3·d channels
    z = k ⊙ v
    y = q ⊙ (h ∗ z + D ⊙ z)                  h_l = Re Σ_n R_n λ_n^l per channel, n = 1 … d_state
    out = W_o y

``h ∗ z`` is :class:`hybrids.longconv.ModalLongConv`: an FFT convolution with the materialised filter on
the parallel face, the recurrence ``s_t = λ ⊙ s_{t−1} + z_t``, ``(h ∗ z)_t = Re Σ_n R_n s_{t,n}`` on the
recurrent one. ``D`` starts at zero as in StripedHyena. One head: every channel has its own filter.

State: ``conv`` ``[batch, conv_width − 1, 3·d_model]`` (the short conv's last inputs) and ``modes``
complex64 ``[batch, d_model, d_state]``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hybrids.cost import Flops, fft_conv_flops
from hybrids.layers import CausalConv1D, dtype_of, linear
from hybrids.longconv import ModalLongConv
from hybrids.mixers.contract import CONV_WIDTH, D_STATE, LONGCONV_IMPL
from kernels.modal import IMPLS as MODAL_IMPLS


class Hyena(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"log_rate", "angle", "residues", "d_skip"})  # the filter's poles, residues; D
  SETTINGS = {"conv_width": CONV_WIDTH, "d_state": D_STATE, "longconv_impl": LONGCONV_IMPL}
  SEGMENTS = True  # packed documents: the short conv and the long filter's modal state restart at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.dtype = dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.in_proj = linear(cfg, d, 3 * d, rngs=rngs)
    self.conv = CausalConv1D(3 * d, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.filter = ModalLongConv(d, cfg.d_state, param_dtype=param_dtype, rngs=rngs, impl=cfg.longconv_impl)
    self.d_skip = nnx.Param(jnp.zeros((d,), param_dtype))
    self.out_proj = linear(cfg, d, d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_choice, check_int
    check_int(cfg.d_state, "model.d_state", 1, note=" (modes of each Hyena long filter)")
    check_choice(cfg.longconv_impl, "model.longconv_impl", MODAL_IMPLS)

  def _gate_and_input(self, z):
    """Short-conv output ``[..., 3·d]`` → ``(q, k ⊙ v)`` in float32."""
    q, k, v = jnp.split(z.astype(jnp.float32), 3, axis=-1)
    return q, k * v

  def _out(self, q, long, kv):
    y = q * (long + self.d_skip[...].astype(jnp.float32) * kv)
    return self.out_proj(y.astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (short conv masked, long filter per document:
    :func:`hybrids.longconv.segmented_modal_conv`; the state is the last document's)."""
    z, conv_state = self.conv(self.in_proj(x), return_state=True, segment_ids=segment_ids)
    q, kv = self._gate_and_input(z)
    if not return_state:
      return self._out(q, self.filter(kv, segment_ids=segment_ids), kv)
    long, modes = self.filter(kv, return_state=True, segment_ids=segment_ids)
    return self._out(q, long, kv), {"conv": conv_state, "modes": modes}

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch), "modes": self.filter.init_state(batch)}

  def step(self, x_t, state):
    """Recurrent face. ``x_t: [batch, d_model]``."""
    z, conv_state = self.conv.step(self.in_proj(x_t), state["conv"])
    q, kv = self._gate_and_input(z)
    long, modes = self.filter.step(kv, state["modes"])
    return self._out(q, long, kv), {"conv": conv_state, "modes": modes}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the FFT convolution with the long filter (materialised once per batch)."""
    return Flops(recurrence=fft_conv_flops(self.filter.channels, seq_len))
