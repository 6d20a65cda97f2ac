"""The modal recurrence as streaming Pallas kernels (Triton for GPUs, Mosaic for TPUs): the states in
registers, one pass over the input forward and one backward, a ``custom_vjp`` between them.

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
inputs. On a GPU both passes use :func:`kernels.scan.pallas.gpu_time_loop` (rows loaded ``chunk`` at a
time); the TPU layout is below its own heading.

Modes are padded to a power of two with ``R = 0``, ``λ = 0`` (they add nothing) and channels to a
multiple of ``block_c``; per-batch partial sums of ``∂R`` and ``∂λ`` come out of the kernel and are
summed in XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.modal.reference import check
from kernels.pallas_compat import SQUEEZED, lowered_once, mosaic_params, triton_params
from kernels.scan.pallas import gpu_time_loop, store_row
from kernels.tiling import round_up


@dataclasses.dataclass(frozen=True)
class ModalConfig:
  """Tiling. GPU: ``block_c`` channels a program (a power of two), rows loaded ``chunk`` at a time,
  ``num_warps`` per program; ``bwd_*`` for the backward pass (None: as the forward). TPU:
  ``tpu_block_t`` rows × 128·k channels (``tpu_block_c``) a VMEM block, time sequential in the grid."""
  block_c: int = 8
  chunk: int = 16
  num_warps: int = 1
  bwd_block_c: int | None = None
  bwd_chunk: int | None = None
  bwd_num_warps: int | None = None
  tpu_block_t: int = 256
  tpu_block_c: int = 128

  def backward(self) -> "ModalConfig":
    return dataclasses.replace(self, block_c=self.bwd_block_c or self.block_c, chunk=self.bwd_chunk or self.chunk,
                               num_warps=self.bwd_num_warps or self.num_warps)


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


# One step of each pass, shared by both layouts. ``params = (Re λ, Im λ, Re R, Im R)`` and the states are
# [channels, modes] (GPU) or [modes, channels] (TPU); ``u_t``, ``g_t`` arrive broadcastable against them,
# ``keep_t`` is 0 at a document start, else 1; ``readout`` sums over the modes axis.


def _fwd_step(params, state, u_t, keep_t, readout):
  """``s ← k λ s + u``; returns ``(s, y = Re Σ R s)``."""
  lr, li, rr, ri = params
  sr, si = state
  ar, ai = lr * keep_t, li * keep_t
  sr, si = ar * sr - ai * si + u_t, ar * si + ai * sr
  return (sr, si), readout(rr * sr - ri * si)


def _bwd_step(params, state, u_t, g_t, keep_t, readout):
  """Row t of the backward (module doc); returns ``(what flows into row t − 1, ∂u_t)``."""
  lr, li, rr, ri = params
  ubr, ubi, upr, upi, arr, ari, aqr, aqi = state
  br, bi = ubr + g_t, ubi  # B_t; P_t is (upr, upi)
  du = readout(rr * br + ri * bi)
  lpr, lpi = lr * upr + li * upi, lr * upi - li * upr  # λ̄ P_t
  return (keep_t * (lr * br + li * bi), keep_t * (lr * bi - li * br),  # k_t λ̄ B_t
          keep_t * (lpr + br), keep_t * (lpi + bi),  # k_t (λ̄ P_t + B_t)
          arr + u_t * br, ari + u_t * bi, aqr + u_t * upr, aqi + u_t * upi), du


def _fwd_kernel(u_ref, keep_ref, lr_ref, li_ref, rr_ref, ri_ref, y_ref, *, length, chunk):
  # u_ref, y_ref: [time, block_c]; keep_ref: [time]; the rest [block_c, modes].
  params = (lr_ref[...], li_ref[...], rr_ref[...], ri_ref[...])

  def step(state, t, rows, valid):
    u_t, keep_t = rows
    new, y = _fwd_step(params, state, u_t.astype(jnp.float32)[:, None], keep_t, lambda x: jnp.sum(x, axis=1))
    store_row(y_ref, t, y, valid)
    return new if valid is None else tuple(jnp.where(valid, n, o) for n, o in zip(new, state))

  zeros = jnp.zeros(params[0].shape, jnp.float32)
  gpu_time_loop(length, chunk, 0, True, lambda t: (u_ref[t, :], keep_ref[t]), step, (zeros, zeros))


def _bwd_kernel(u_ref, g_ref, keep_ref, lr_ref, li_ref, rr_ref, ri_ref, du_ref, dr_r_ref, dr_i_ref,
                dq_r_ref, dq_i_ref, *, length, chunk):
  # Runs from the end. Carries what flows into row t−1: U_B = k_t λ̄ B_t, U_P = k_t (λ̄ P_t + B_t),
  # and the sums Σ u_t B_t, Σ u_t P_t.
  params = (lr_ref[...], li_ref[...], rr_ref[...], ri_ref[...])

  def step(state, t, rows, valid):
    u_t, g_t, keep_t = rows
    new, du = _bwd_step(params, state, u_t.astype(jnp.float32)[:, None], g_t.astype(jnp.float32)[:, None],
                        keep_t, lambda x: jnp.sum(x, axis=1))
    store_row(du_ref, t, du, valid)
    return new if valid is None else tuple(jnp.where(valid, n, o) for n, o in zip(new, state))

  zeros = jnp.zeros(params[0].shape, jnp.float32)
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


# --- TPU (Mosaic): channels on the 128 lanes, modes on sublanes -------------------------------------
#
# Blocks must be (8, 128)-tiled, so the states are [modes, block_c] (modes padded to a multiple of 8),
# a row of u or y is [1, block_c], and the read-out sums over sublanes. Grid (batch, channels / block_c,
# time / block_t) with time sequential; the states travel between time blocks in resident output blocks
# (as the scan's h_last does), and inside a block rows are combined 8 at a time, sliced statically from
# the loaded tile. ``keep`` is a [time, 1] column (a full-width block of one lane).

_TPU_ROWS = 8


def _tpu_fwd_kernel(u_ref, keep_ref, lr_ref, li_ref, rr_ref, ri_ref, y_ref, sr_ref, si_ref):
  block_t, block_c = u_ref.shape
  params = (lr_ref[...], li_ref[...], rr_ref[...], ri_ref[...])
  readout = lambda x: jnp.sum(x, axis=0, keepdims=True)

  @pl.when(pl.program_id(2) == 0)
  def _():
    sr_ref[...] = jnp.zeros_like(sr_ref)
    si_ref[...] = jnp.zeros_like(si_ref)

  row_id = jax.lax.broadcasted_iota(jnp.int32, (_TPU_ROWS, block_c), 0)

  def group(g, state):
    start = pl.multiple_of(g * _TPU_ROWS, _TPU_ROWS)
    u = u_ref[pl.ds(start, _TPU_ROWS), :].astype(jnp.float32)
    keep = keep_ref[pl.ds(start, _TPU_ROWS), :]
    out = jnp.zeros((_TPU_ROWS, block_c), jnp.float32)
    for r in range(_TPU_ROWS):
      state, y = _fwd_step(params, state, u[r:r + 1], keep[r:r + 1], readout)
      out = jnp.where(row_id == r, y, out)  # assemble the tile without sub-tile stores
    y_ref[pl.ds(start, _TPU_ROWS), :] = out
    return state

  sr_ref[...], si_ref[...] = jax.lax.fori_loop(0, block_t // _TPU_ROWS, group, (sr_ref[...], si_ref[...]))


def _tpu_bwd_kernel(u_ref, g_ref, keep_ref, lr_ref, li_ref, rr_ref, ri_ref, du_ref, *carry_refs):
  # carry_refs: U_B (re, im), U_P (re, im), Σ u B (re, im), Σ u P (re, im): resident across time blocks.
  block_t, block_c = u_ref.shape
  params = (lr_ref[...], li_ref[...], rr_ref[...], ri_ref[...])
  readout = lambda x: jnp.sum(x, axis=0, keepdims=True)

  @pl.when(pl.program_id(2) == 0)
  def _():
    for ref in carry_refs:
      ref[...] = jnp.zeros_like(ref)

  row_id = jax.lax.broadcasted_iota(jnp.int32, (_TPU_ROWS, block_c), 0)
  groups = block_t // _TPU_ROWS

  def group(i, state):
    start = pl.multiple_of((groups - 1 - i) * _TPU_ROWS, _TPU_ROWS)
    u = u_ref[pl.ds(start, _TPU_ROWS), :].astype(jnp.float32)
    g = g_ref[pl.ds(start, _TPU_ROWS), :].astype(jnp.float32)
    keep = keep_ref[pl.ds(start, _TPU_ROWS), :]
    du = jnp.zeros((_TPU_ROWS, block_c), jnp.float32)
    for r in reversed(range(_TPU_ROWS)):
      state, du_t = _bwd_step(params, state, u[r:r + 1], g[r:r + 1], keep[r:r + 1], readout)
      du = jnp.where(row_id == r, du_t, du)
    du_ref[pl.ds(start, _TPU_ROWS), :] = du
    return state

  out = jax.lax.fori_loop(0, groups, group, tuple(ref[...] for ref in carry_refs))
  for ref, value in zip(carry_refs, out):
    ref[...] = value


def _tpu_specs(cfg: ModalConfig, nt: int, modes: int, reverse: bool):
  tmap = (lambda k: nt - 1 - k) if reverse else (lambda k: k)
  tile = pl.BlockSpec((SQUEEZED, cfg.tpu_block_t, cfg.tpu_block_c), lambda b, c, k: (b, tmap(k), c))
  column = pl.BlockSpec((SQUEEZED, cfg.tpu_block_t, 1), lambda b, c, k: (b, tmap(k), 0))
  param = pl.BlockSpec((modes, cfg.tpu_block_c), lambda b, c, k: (0, c))
  state = pl.BlockSpec((SQUEEZED, modes, cfg.tpu_block_c), lambda b, c, k: (b, 0, c))
  return tile, column, param, state


def _tpu_forward(u, keep, lr, li, rr, ri, cfg: ModalConfig, interpret: bool):
  batch, time, channels = u.shape
  modes, nt = lr.shape[0], time // cfg.tpu_block_t
  tile, column, param, state = _tpu_specs(cfg, nt, modes, reverse=False)
  state_shape = jax.ShapeDtypeStruct((batch, modes, channels), jnp.float32)
  y, _, _ = pl.pallas_call(
      _tpu_fwd_kernel, grid=(batch, channels // cfg.tpu_block_c, nt),
      in_specs=[tile, column, param, param, param, param], out_specs=[tile, state, state],
      out_shape=[jax.ShapeDtypeStruct(u.shape, jnp.float32), state_shape, state_shape],
      compiler_params=None if interpret else mosaic_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="modal_conv_fwd")(u, keep, lr, li, rr, ri)
  return y


def _tpu_backward(u, g, keep, lr, li, rr, ri, cfg: ModalConfig, interpret: bool):
  batch, time, channels = u.shape
  modes, nt = lr.shape[0], time // cfg.tpu_block_t
  tile, column, param, state = _tpu_specs(cfg, nt, modes, reverse=True)
  state_shape = jax.ShapeDtypeStruct((batch, modes, channels), jnp.float32)
  du, *carries = pl.pallas_call(
      _tpu_bwd_kernel, grid=(batch, channels // cfg.tpu_block_c, nt),
      in_specs=[tile, tile, column, param, param, param, param], out_specs=[tile] + [state] * 8,
      out_shape=[jax.ShapeDtypeStruct(u.shape, jnp.float32)] + [state_shape] * 8,
      compiler_params=None if interpret else mosaic_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="modal_conv_bwd")(u, g, keep, lr, li, rr, ri)
  return (du, *carries[4:])


# --- the custom_vjp over the padded problem, in each layout's own arrangement ------------------------
#
# GPU: u [batch, time, channels], keep [batch, time], parameters [channels, modes].
# TPU: the same u, keep [batch, time, 1], parameters [modes, channels]; time padded to tpu_block_t at the
# front (zero input; the padded rows stay zero and are cut off).


def _layout_forward(u, keep, lr, li, rr, ri, cfg, interpret, platform):
  if platform == "tpu":
    return _tpu_forward(u, keep[..., None], *(p.T for p in (lr, li, rr, ri)), cfg, interpret)
  return _forward(u, keep, lr, li, rr, ri, cfg, interpret)


def _layout_backward(u, g, keep, lr, li, rr, ri, cfg, interpret, platform):
  if platform == "tpu":
    du, *sums = _tpu_backward(u, g, keep[..., None], *(p.T for p in (lr, li, rr, ri)), cfg, interpret)
    return (du, *(jnp.swapaxes(x, 1, 2) for x in sums))  # [batch, modes, channels] → [batch, channels, modes]
  return _backward(u, g, keep, lr, li, rr, ri, cfg, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _modal_core(u, keep, log_poles, residues, cfg, interpret, platform):
  return _layout_forward(u, keep, *_params(log_poles, residues), cfg, interpret, platform)


def _modal_core_fwd(u, keep, log_poles, residues, cfg, interpret, platform):
  return _modal_core(u, keep, log_poles, residues, cfg, interpret, platform), (u, keep, log_poles, residues)


def _modal_core_bwd(cfg, interpret, platform, saved, g):
  u, keep, log_poles, residues = saved
  lr, li, rr, ri = _params(log_poles, residues)
  du, dr_r, dr_i, dq_r, dq_i = _layout_backward(u, g, keep, lr, li, rr, ri, cfg.backward(), interpret, platform)
  d_res = jax.lax.complex(jnp.sum(dr_r, 0), jnp.sum(dr_i, 0))  # pair ∂/∂Re + i ∂/∂Im
  d_poles = jnp.conj(residues) * jax.lax.complex(jnp.sum(dq_r, 0), jnp.sum(dq_i, 0))
  d_log_poles = jnp.conj(jnp.exp(log_poles)) * d_poles
  # JAX's cotangent of a complex primal is the conjugate of the pair; keep gets none (a mask).
  return du.astype(u.dtype), jnp.zeros_like(keep), jnp.conj(d_log_poles), jnp.conj(d_res)


_modal_core.defvjp(_modal_core_fwd, _modal_core_bwd)
_modal_core_once = lowered_once(_modal_core, static_argnums=(4, 5, 6))


def _padded_call(u, log_poles, residues, keep, cfg: ModalConfig, interpret: bool, platform: str):
  """Pads to the layout's tiles, runs the kernels, cuts the padding off again."""
  batch, time, channels = u.shape
  modes = log_poles.shape[1]
  if platform == "tpu":
    mode_to, channel_to, time_pad = round_up(modes, _TPU_ROWS), round_up(channels, cfg.tpu_block_c), (
        -time % cfg.tpu_block_t)
  else:
    mode_to, time_pad = _pow2(modes), 0
    channel_to = round_up(channels, max(cfg.block_c, cfg.backward().block_c))  # both passes: one problem
  # Padded modes: λ = exp(−inf) = 0 and R = 0; padded channels and rows: zero input, so zero output.
  widths = ((0, channel_to - channels), (0, mode_to - modes))
  log_poles = jnp.pad(log_poles.astype(jnp.complex64), widths, constant_values=-jnp.inf)
  residues = jnp.pad(residues.astype(jnp.complex64), widths)
  u = jnp.pad(u, ((0, 0), (time_pad, 0), (0, channel_to - channels)))
  keep = jnp.pad(keep, ((0, 0), (time_pad, 0)), constant_values=1.0)
  y = _modal_core_once(u, keep, log_poles, residues, cfg, interpret, platform)
  return y[:, time_pad:, :channels]


def modal_conv_pallas(u, log_poles, residues, starts=None, *, config: ModalConfig | None = None,
                      interpret: bool = False, platform: Literal["gpu", "tpu"] | None = None):
  """:func:`kernels.modal.reference.modal_conv_reference`'s output ``y`` (float32 ``[batch, time,
  channels]``) by the streaming kernels, differentiable in ``u``, ``log_poles`` and ``residues``.

  ``platform`` picks the layout; None decides at lowering time (the TPU layout when lowered for a TPU,
  Triton otherwise), so ``jax.export(..., platforms=["tpu"])`` from any host gets the TPU kernels;
  ``interpret=True`` runs either layout on a CPU (None there means the GPU layout)."""
  check(u, log_poles, residues, starts)  # the shapes every implementation takes (reference.py)
  cfg = config or ModalConfig()
  if cfg.block_c & (cfg.block_c - 1) or cfg.chunk < 1:
    raise ValueError(f"modal_conv: block_c={cfg.block_c} must be a power of two and chunk={cfg.chunk} ≥ 1")
  if cfg.tpu_block_t % _TPU_ROWS or cfg.tpu_block_t < _TPU_ROWS or cfg.tpu_block_c % 128 or cfg.tpu_block_c < 128:
    raise ValueError(f"modal_conv: tpu_block_t={cfg.tpu_block_t} must be a multiple of {_TPU_ROWS} and "
                     f"tpu_block_c={cfg.tpu_block_c} a multiple of 128")
  keep = jnp.ones(u.shape[:2], jnp.float32) if starts is None else 1.0 - starts.astype(jnp.float32)
  run = lambda p: functools.partial(_padded_call, cfg=cfg, interpret=interpret, platform=p)
  if platform is not None or interpret:
    return run(platform or "gpu")(u, log_poles, residues, keep)
  return jax.lax.platform_dependent(u, log_poles, residues, keep, tpu=run("tpu"), default=run("gpu"))
