"""Long convolutions with modal (pole–residue) filters: an FFT face for training, a recurrence for decoding.

A depthwise causal convolution ``y_t = Σ_{l≤t} h_l u_{t−l}`` whose filter is, per channel,

    h_l = Re Σ_n R_n λ_n^l,    λ_n = exp(log λ_n) ∈ ℂ with |λ_n| < 1,    n = 1 … modes

is the impulse response of the diagonal linear recurrence (the filter's *modal form*)

    s_t = λ ⊙ s_{t−1} + u_t,    y_t = Re Σ_n R_n s_{t,n},    s: complex64 [batch, channels, modes]

so one set of parameters gives both faces a mixer needs:

- parallel: materialise ``h`` for the sequence length and convolve by FFT, O(T log T). Zero padding to
  at least ``2T − 1`` makes the circular convolution a linear one, so nothing wraps round from the end;
- recurrent: step ``s``, whose size does not depend on how many tokens have been generated.

After a prefill the state is ``s_T = Σ_t λ^{T−1−t} u_t``, a contraction over time (no scan needed).

This is how StripedHyena (Poli, Wang, Massaroli et al. 2023, "StripedHyena: Moving Beyond Transformers
with Hybrid Signal Processing Models") decodes its Hyena filters; S4D is the same form with
``λ = exp(ΔA)`` and ``R = 2 C B̄``. The functions serve any modal filter; :class:`ModalLongConv` adds
the learnable parametrisation shared by the Hyena and BaseConv mixers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def modal_kernel(log_poles, residues, length: int):
  """The filter ``h [channels, length]``, ``h_l = Re Σ_n R_n exp(l · log λ_n)``, in float32.

  Args:
    log_poles: complex ``[channels, modes]``, ``log λ`` (taking the log once keeps ``λ^l`` accurate
      for large ``l``: one exp instead of ``l`` products).
    residues: complex ``[channels, modes]``.
  """
  powers = jnp.exp(log_poles[..., None] * jnp.arange(length, dtype=jnp.float32))  # λ^l, [c, n, l]
  return jnp.sum(jnp.real(residues[..., None] * powers), axis=1)


def causal_fft_conv(u, kernel):
  """``y_t = Σ_{l≤t} h_l u_{t−l}`` per channel, by FFT.

  Args:
    u: ``[batch, time, channels]`` (computed in float32).
    kernel: ``[channels, time]``.
  Returns:
    float32 ``[batch, time, channels]``.
  """
  time = u.shape[1]
  # ≥ 2T − 1 points make the product of spectra a linear convolution; a power of two is the fast size.
  n_fft = 1 << (2 * time - 1).bit_length()
  u_f = jnp.fft.rfft(u.astype(jnp.float32), n_fft, axis=1)
  k_f = jnp.fft.rfft(kernel.astype(jnp.float32).T, n_fft, axis=0)
  return jnp.fft.irfft(u_f * k_f[None], n_fft, axis=1)[:, :time]


def modal_final_state(log_poles, u):
  """``s_T = Σ_t λ^{T−1−t} u_t``: the recurrence's state after reading ``u: [batch, time, channels]``.

  Returns complex64 ``[batch, channels, modes]``. ``u`` is real, so the contraction over time is two
  real ones (half the work of a complex one), at full float32 precision since decoding continues
  from this state.
  """
  time = u.shape[1]
  powers = jnp.exp(log_poles[..., None] * jnp.arange(time - 1, -1, -1, dtype=jnp.float32))  # [c, n, t]
  u32 = u.astype(jnp.float32)
  contract = lambda p: jnp.einsum("cnt,btc->bcn", p, u32, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.complex(contract(jnp.real(powers)), contract(jnp.imag(powers)))


class ModalLongConv(nnx.Module):
  """A learnable modal long filter per channel, ``h_l = Re Σ_n R_n λ_n^l`` (``modes`` poles a channel).

  Parametrisation (the exponential one of the LRU, Orvieto et al. 2023, "Resurrecting Recurrent Neural
  Networks for Long Sequences"): ``log λ = −exp(ν) + iθ``, so ``|λ| = exp(−exp(ν)) < 1`` for every
  ``ν`` and the filter can never grow. At init the decay rates ``exp(ν)`` are log-uniform in
  ``[min_rate, max_rate]`` (memory of ~10 to ~1000 tokens by default; the mixers' short convolutions
  cover the first few lags), phases ``θ`` uniform in ``[0, π]`` (``−θ`` with conjugate residues gives
  the same real filter), and residues ``R ~ CN(0, 2(1 − |λ|²)/modes)`` so that ``E Σ_l h_l² = 1``:
  the convolution roughly preserves the variance of white input.

  Parameters ``[channels, modes]``: ``log_rate`` (ν), ``angle`` (θ); ``residues`` ``[2, channels,
  modes]`` (real and imaginary parts).
  """

  def __init__(self, channels: int, modes: int, *, param_dtype, rngs: nnx.Rngs, min_rate: float = 1e-3,
               max_rate: float = 1e-1):
    self.channels, self.modes = channels, modes
    log_rate = jax.random.uniform(rngs.params(), (channels, modes), jnp.float32, math.log(min_rate),
                                  math.log(max_rate))
    self.log_rate = nnx.Param(log_rate.astype(param_dtype))
    self.angle = nnx.Param(jax.random.uniform(rngs.params(), (channels, modes), jnp.float32, 0.0,
                                              math.pi).astype(param_dtype))
    scale = jnp.sqrt(-jnp.expm1(-2.0 * jnp.exp(log_rate)) / modes)  # √((1 − |λ|²) / modes)
    residues = jax.random.normal(rngs.params(), (2, channels, modes), jnp.float32) * scale
    self.residues = nnx.Param(residues.astype(param_dtype))

  def log_poles(self):
    """complex64 ``[channels, modes]``: ``log λ = −exp(ν) + iθ``."""
    return jax.lax.complex(-jnp.exp(self.log_rate[...].astype(jnp.float32)), self.angle[...].astype(jnp.float32))

  def complex_residues(self):
    """complex64 ``[channels, modes]``."""
    r = self.residues[...].astype(jnp.float32)
    return jax.lax.complex(r[0], r[1])

  def kernel(self, length: int):
    """The filter materialised for ``length`` lags, float32 ``[channels, length]``."""
    return modal_kernel(self.log_poles(), self.complex_residues(), length)

  def __call__(self, u, *, return_state: bool = False):
    """Convolution face. ``u: [batch, time, channels]`` → float32 ``y`` (and the state after the last step)."""
    log_poles = self.log_poles()
    y = causal_fft_conv(u, modal_kernel(log_poles, self.complex_residues(), u.shape[1]))
    return (y, modal_final_state(log_poles, u)) if return_state else y

  def init_state(self, batch: int):
    return jnp.zeros((batch, self.channels, self.modes), jnp.complex64)

  def step(self, u_t, state):
    """Recurrent face. ``u_t: [batch, channels]``, ``state: complex64 [batch, channels, modes]``."""
    state = jnp.exp(self.log_poles()) * state + u_t.astype(jnp.float32)[..., None]
    return jnp.real(jnp.sum(self.complex_residues() * state, axis=-1)), state
