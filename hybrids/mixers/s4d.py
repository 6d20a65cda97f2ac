"""S4D: a diagonal linear time-invariant state-space model, one SSM per channel.

Gu, Gupta, Goel & Ré 2022, "On the Parameterization and Initialization of Diagonal State Space Models".

Per channel c, with N/2 complex modes n (conjugate pairs, hence the factor 2):
    A_n = −½ + iπn (S4D-Lin),   Δ_c log-uniform in [1e-3, 0.1],   B = 1,   C ~ CN(0, 1)
    Ā = exp(Δ A),   B̄ = (Ā − 1)/A · B                                    (zero-order hold)
    recurrent face:    h_t = Ā ⊙ h_{t−1} + B̄ u_t,   y_t = 2 Re(C · h_t) + D u_t
    convolution face:  y = K ∗ u + D u,   K_l = 2 Re(Σ_n C_n B̄_n Ā_n^l)   (FFT, O(T log T))
    out_t = W_o GLU(W_g GeLU(y_t))

The parallel face never runs the recurrence: it convolves with the materialised kernel, and the
final state is ``B̄ Σ_t Ā^{T−1−t} u_t`` — the modal-filter helpers of :mod:`hybrids.longconv` with
poles ``Ā`` and residues ``2 C B̄``. State: ``h`` complex64 ``[batch, d_model, N/2]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.cost import Flops, fft_conv_flops
from hybrids.layers import dtype_of, linear
from hybrids.longconv import causal_fft_conv, modal_final_state, modal_kernel, segmented_modal_conv
from hybrids.mixers.contract import D_STATE, LONGCONV_IMPL
from kernels.modal import IMPLS as MODAL_IMPLS


class S4D(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"log_dt", "log_neg_a_real", "a_imag", "d_skip"})  # Δ, the poles A, D
  SETTINGS = {"d_state": D_STATE, "longconv_impl": LONGCONV_IMPL}
  SEGMENTS = True  # packed documents: the SSM state restarts from h = 0 at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, modes = cfg.d_model, cfg.d_state // 2
    self.modes, self.dtype, self.impl = modes, dtype_of(cfg.dtype), cfg.longconv_impl
    param_dtype = dtype_of(cfg.param_dtype)
    self.log_dt = nnx.Param(jax.random.uniform(rngs.params(), (d,), jnp.float32, math.log(1e-3), math.log(0.1)).astype(param_dtype))
    self.log_neg_a_real = nnx.Param(jnp.full((d, modes), math.log(0.5), param_dtype))
    self.a_imag = nnx.Param(jnp.broadcast_to(math.pi * jnp.arange(modes, dtype=jnp.float32), (d, modes)).astype(param_dtype))
    c = jax.random.normal(rngs.params(), (2, d, modes), jnp.float32) * math.sqrt(0.5)
    self.c = nnx.Param(c.astype(param_dtype))  # real and imaginary parts
    self.d_skip = nnx.Param(jnp.ones((d,), param_dtype))
    self.glu_proj = linear(cfg, d, 2 * d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_choice, check_int
    check_int(cfg.d_state, "model.d_state", 2, note=" (even: S4D's conjugate pairs)")
    check_choice(cfg.longconv_impl, "model.longconv_impl", MODAL_IMPLS)
    if cfg.d_state < 2 or cfg.d_state % 2:
      raise ValueError(f"model.d_state={cfg.d_state} must be an even number ≥ 2 for S4D (conjugate pairs)")

  def _zoh(self):
    """``(log Ā = ΔA, B̄, C)``, each complex64 ``[d_model, N/2]``."""
    a = -jnp.exp(self.log_neg_a_real[...].astype(jnp.float32)) + 1j * self.a_imag[...].astype(jnp.float32)
    dt_a = jnp.exp(self.log_dt[...].astype(jnp.float32))[:, None] * a
    b_bar = (jnp.exp(dt_a) - 1.0) / a
    c = self.c[...][0].astype(jnp.float32) + 1j * self.c[...][1].astype(jnp.float32)
    return dt_a, b_bar, c

  def _discrete(self):
    """``(Ā, B̄, C)``, each complex64 ``[d_model, N/2]``."""
    dt_a, b_bar, c = self._zoh()
    return jnp.exp(dt_a), b_bar, c

  def kernel(self, length: int):
    """The convolution face's filter ``K [d_model, length]``, ``K_l = Re Σ_n 2 C_n B̄_n Ā_n^l``."""
    log_a_bar, b_bar, c = self._zoh()
    return modal_kernel(log_a_bar, 2.0 * c * b_bar, length)

  def _out(self, y, u):
    y = y + self.d_skip[...].astype(jnp.float32) * u.astype(jnp.float32)
    # The exact (erf) GELU, as the S4 authors' nn.GELU(); jax's default is the tanh approximation.
    gated = self.glu_proj(jax.nn.gelu(y, approximate=False).astype(self.dtype))
    value, gate = jnp.split(gated, 2, axis=-1)
    return value * jax.nn.sigmoid(gate)

  def __call__(self, u, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Convolution face. ``u: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each convolved alone (:func:`hybrids.longconv.segmented_modal_conv`; the state
    is the last document's)."""
    log_a_bar, b_bar, c = self._zoh()
    if segment_ids is not None:
      y, modes = segmented_modal_conv(u, log_a_bar, 2.0 * c * b_bar, segment_ids, impl=self.impl)
      out = self._out(y, u)
      return (out, {"h": b_bar * modes}) if return_state else out
    y = causal_fft_conv(u, self.kernel(u.shape[1]))
    out = self._out(y, u)
    if not return_state:
      return out
    # h_T = Σ_t Ā^{T−1−t} B̄ u_t
    return out, {"h": b_bar * modal_final_state(log_a_bar, u)}

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"h": jnp.zeros((batch, self.d_skip[...].shape[0], self.modes), jnp.complex64)}

  def step(self, u_t, state):
    """Recurrent face. ``u_t: [batch, d_model]``."""
    a_bar, b_bar, c = self._discrete()
    h = a_bar * state["h"] + b_bar * u_t.astype(jnp.float32)[..., None]
    y = 2.0 * jnp.real(jnp.einsum("dn,bdn->bd", c, h))
    return self._out(y, u_t), {"h": h}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the FFT convolution of the ``d_model`` channels (the kernel is materialised per batch)."""
    return Flops(recurrence=fft_conv_flops(self.d_skip.size, seq_len))
