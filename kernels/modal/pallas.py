"""The modal recurrence as streaming Pallas kernels (Triton, GPU): the states in registers, one pass over
the input forward and one backward, a ``custom_vjp`` between them.

Forward, per channel and mode (complex, as real pairs in the kernel): ``s_t = k_t λ s_{t−1} + u_t``,
``y_t = Re Σ_n R_n s_{t,n}`` with ``k_t = 0`` at a document start, else 1. A program holds ``block_c``
channels × ``modes`` states and walks time, reading one row of ``u`` and writing one row of ``y`` a step:
the ``[batch, time, channels, modes]`` states are never written (the XLA forms' problem: GBs at
training shapes).

Backward, one pass from the end. With ``ḡ_t = ∂L/∂y_t``, every gradient follows from two adjoint
recurrences (per channel and mode, within each document):

    B_t = ḡ_t + k_{t+1} λ̄ B_{t+1}                 (so ∂L/∂s_t = R̄ B_t)
    P_t = k_{t+1} (λ̄ P_{t+1} + B_{t+1})           (P_t = Σ_{t'>t} (t'−t) λ̄^{t'−t−1} ḡ_{t'})

    ∂L/∂u_t = Re Σ_n R̄_n B_{t,n}
    ∂L/∂R   = Σ_t u_t B_t          ( = Σ_t ḡ_t s̄_t )
    ∂L/∂λ   = R̄ Σ_t u_t P_t        ( = Σ_t k_t R̄ B_t s̄_{t−1} )

(gradients of a real loss as ``∂/∂Re + i ∂/∂Im`` pairs; JAX's cotangents are their conjugates, and
``∂/∂log λ = λ̄ ∂/∂λ`` in pairs). The second line is the adjoint of ``∂s_t/∂λ`` summed over time, so the
pole gradient needs no forward state in the backward: nothing is stored between the passes but the
inputs. Both passes use :func:`kernels.scan.pallas.gpu_time_loop` (rows loaded ``chunk`` at a time).

Modes are padded to a power of two with ``R = 0``, ``λ = 0`` (they add nothing) and channels to a
multiple of ``block_c``; per-batch partial sums of ``∂R`` and ``∂λ`` come out of the kernel and are
summed in XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.pallas_compat import SQUEEZED, lowered_once, triton_params
from kernels.scan.pallas import gpu_time_loop, store_row
from kernels.tiling import round_up


@dataclasses.dataclass(frozen=True)
class ModalConfig:
  """Tiling: ``block_c`` channels a program (a power of two), rows loaded ``chunk`` at a time,
  ``num_warps`` per program; ``bwd_*`` for the backward pass (None: as the forward)."""
  block_c: int = 8
  chunk: int = 16
  num_warps: int = 1
  bwd_block_c: int | None = None
  bwd_chunk: int | None = None
  bwd_num_warps: int | None = None

  def backward(self) -> "ModalConfig":
    return ModalConfig(self.bwd_block_c or self.block_c, self.bwd_chunk or self.chunk,
                       self.bwd_num_warps or self.num_warps)


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _fwd_kernel(u_ref, keep_ref, lr_ref, li_ref, rr_ref, ri_ref, y_ref, *, length, chunk):
  # u_ref, y_ref: [time, block_c]; keep_ref: [time]; the rest [block_c, modes].
  lr, li, rr, ri = lr_ref[...], li_ref[...], rr_ref[...], ri_ref[...]

  def step(state, t, rows, valid):
    sr, si = state
    u_t, keep_t = rows
    ar, ai = lr * keep_t, li * keep_t
    new = (ar * sr - ai * si + u_t.astype(jnp.float32)[:, None], ar * si + ai * sr)
    store_row(y_ref, t, jnp.sum(rr * new[0] - ri * new[1], axis=1), valid)
    return new if valid is None else tuple(jnp.where(valid, n, o) for n, o in zip(new, state))

  zeros = jnp.zeros(lr.shape, jnp.float32)
  gpu_time_loop(length, chunk, 0, True, lambda t: (u_ref[t, :], keep_ref[t]), step, (zeros, zeros))


def _bwd_kernel(u_ref, g_ref, keep_ref, lr_ref, li_ref, rr_ref, ri_ref, du_ref, dr_r_ref, dr_i_ref,
                dq_r_ref, dq_i_ref, *, length, chunk):
  # Runs from the end. Carries what flows into row t−1: U_B = k_t λ̄ B_t, U_P = k_t (λ̄ P_t + B_t),
  # and the sums Σ u_t B_t, Σ u_t P_t.
  lr, li, rr, ri = lr_ref[...], li_ref[...], rr_ref[...], ri_ref[...]

  def step(state, t, rows, valid):
    ubr, ubi, upr, upi, arr, ari, aqr, aqi = state
    u_t, g_t, keep_t = rows
    u_t = u_t.astype(jnp.float32)[:, None]
    br, bi = ubr + g_t.astype(jnp.float32)[:, None], ubi
    store_row(du_ref, t, jnp.sum(rr * br + ri * bi, axis=1), valid)
    lbr, lbi = lr * br + li * bi, lr * bi - li * br  # λ̄ B
    lpr, lpi = lr * upr + li * upi, lr * upi - li * upr  # λ̄ P (P_t = U_P)
    new = (keep_t * lbr, keep_t * lbi, keep_t * (lpr + br), keep_t * (lpi + bi),
           arr + u_t * br, ari + u_t * bi, aqr + u_t * upr, aqi + u_t * upi)
    return new if valid is None else tuple(jnp.where(valid, n, o) for n, o in zip(new, state))

  zeros = jnp.zeros(lr.shape, jnp.float32)
  out = gpu_time_loop(length, chunk, 0, False, lambda t: (u_ref[t, :], g_ref[t, :], keep_ref[t]), step,
                      (zeros,) * 8)
  dr_r_ref[...], dr_i_ref[...], dq_r_ref[...], dq_i_ref[...] = out[4:]


def _specs(block_c: int, time: int, modes: int):
  strip = pl.BlockSpec((SQUEEZED, time, block_c), lambda b, c: (b, 0, c))
  row = pl.BlockSpec((SQUEEZED, time), lambda b, c: (b, 0))
  param = pl.BlockSpec((block_c, modes), lambda b, c: (c, 0))
  acc = pl.BlockSpec((SQUEEZED, block_c, modes), lambda b, c: (b, c, 0))
  return strip, row, param, acc


def _params(log_poles, residues):
  poles = jnp.exp(log_poles)
  return jnp.real(poles), jnp.imag(poles), jnp.real(residues), jnp.imag(residues)


def _forward(u, keep, lr, li, rr, ri, cfg: ModalConfig, interpret: bool):
  batch, time, channels = u.shape
  modes = lr.shape[1]
  strip, row, param, _ = _specs(cfg.block_c, time, modes)
  kernel = functools.partial(_fwd_kernel, length=time, chunk=cfg.chunk)
  return pl.pallas_call(
      kernel, grid=(batch, channels // cfg.block_c), in_specs=[strip, row, param, param, param, param],
      out_specs=strip, out_shape=jax.ShapeDtypeStruct(u.shape, jnp.float32),
      compiler_params=None if interpret else triton_params(cfg.num_warps, 1),
      interpret=interpret, name="modal_conv_fwd")(u, keep, lr, li, rr, ri)


def _backward(u, g, keep, lr, li, rr, ri, cfg: ModalConfig, interpret: bool):
  batch, time, channels = u.shape
  modes = lr.shape[1]
  strip, row, param, acc = _specs(cfg.block_c, time, modes)
  kernel = functools.partial(_bwd_kernel, length=time, chunk=cfg.chunk)
  acc_shape = jax.ShapeDtypeStruct((batch, channels, modes), jnp.float32)
  return pl.pallas_call(
      kernel, grid=(batch, channels // cfg.block_c), in_specs=[strip, strip, row, param, param, param, param],
      out_specs=[strip, acc, acc, acc, acc],
      out_shape=[jax.ShapeDtypeStruct(u.shape, jnp.float32)] + [acc_shape] * 4,
      compiler_params=None if interpret else triton_params(cfg.num_warps, 1),
      interpret=interpret, name="modal_conv_bwd")(u, g, keep, lr, li, rr, ri)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _modal_core(u, keep, log_poles, residues, cfg, interpret):
  return _forward(u, keep, *_params(log_poles, residues), cfg, interpret)


def _modal_core_fwd(u, keep, log_poles, residues, cfg, interpret):
  return _modal_core(u, keep, log_poles, residues, cfg, interpret), (u, keep, log_poles, residues)


def _modal_core_bwd(cfg, interpret, saved, g):
  u, keep, log_poles, residues = saved
  lr, li, rr, ri = _params(log_poles, residues)
  du, dr_r, dr_i, dq_r, dq_i = _backward(u, g, keep, lr, li, rr, ri, cfg.backward(), interpret)
  d_res = jax.lax.complex(jnp.sum(dr_r, 0), jnp.sum(dr_i, 0))  # pair ∂/∂Re + i ∂/∂Im
  d_poles = jnp.conj(residues) * jax.lax.complex(jnp.sum(dq_r, 0), jnp.sum(dq_i, 0))
  d_log_poles = jnp.conj(jnp.exp(log_poles)) * d_poles
  # JAX's cotangent of a complex primal is the conjugate of the pair; keep gets none (a mask).
  return du.astype(u.dtype), jnp.zeros_like(keep), jnp.conj(d_log_poles), jnp.conj(d_res)


_modal_core.defvjp(_modal_core_fwd, _modal_core_bwd)
_modal_core_once = lowered_once(_modal_core, static_argnums=(4, 5))


def modal_conv_pallas(u, log_poles, residues, starts=None, *, config: ModalConfig | None = None,
                      interpret: bool = False):
  """:func:`kernels.modal.reference.modal_conv_reference`'s output ``y`` (float32 ``[batch, time,
  channels]``) by the streaming kernels, differentiable in ``u``, ``log_poles`` and ``residues``."""
  cfg = config or ModalConfig()
  if cfg.block_c & (cfg.block_c - 1) or cfg.chunk < 1:
    raise ValueError(f"modal_conv: block_c={cfg.block_c} must be a power of two and chunk={cfg.chunk} ≥ 1")
  batch, time, channels = u.shape
  modes = log_poles.shape[1]
  pad_modes, pad_channels = _pow2(modes) - modes, round_up(channels, cfg.block_c) - channels
  pad_bwd = round_up(channels, cfg.backward().block_c) - channels
  if pad_bwd != pad_channels:  # both passes see the same padded problem
    pad_channels = round_up(channels, max(cfg.block_c, cfg.backward().block_c)) - channels
  # Padded modes: λ = exp(−inf) = 0 and R = 0; padded channels: zero input, so zero output.
  log_poles = jnp.pad(log_poles.astype(jnp.complex64), ((0, pad_channels), (0, pad_modes)),
                      constant_values=-jnp.inf)
  residues = jnp.pad(residues.astype(jnp.complex64), ((0, pad_channels), (0, pad_modes)))
  u_p = jnp.pad(u, ((0, 0), (0, 0), (0, pad_channels)))
  keep = (jnp.ones((batch, time), jnp.float32) if starts is None else 1.0 - starts.astype(jnp.float32))
  y = _modal_core_once(u_p, keep, log_poles, residues, cfg, interpret)
  return y[..., :channels]
