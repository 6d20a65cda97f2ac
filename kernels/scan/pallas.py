"""The diagonal scan as Pallas kernels: the Triton (GPU) and Mosaic TPU layouts, the GPU layout's
time-split form for problems with few lanes, the ``custom_vjp`` whose backward is the same streaming
pass run the other way, and ``_resolve``, which fills a :class:`PallasConfig` for a call (on a GPU:
the Mosaic GPU kernels of ``kernels/scan/mosaic_gpu.py`` where they take the problem, else Triton).
Measured tilings: ``kernels/BENCHMARKS.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.dispatch import gpu_sm_count, tma_gpu
from kernels.pallas_compat import SQUEEZED, lowered_once, mosaic_params, triton_params
from kernels.scan import mosaic_gpu as scan_mosaic_gpu
from kernels.scan.reference import _check
from kernels.scan.xla import _linear_scan_associative
from kernels.tiling import round_up

# ----------------------------------------------------------------------------------------------------
# Pallas.
#
# The recurrence has only batch·features independent lanes (8·1024 for the benchmark shape), each a
# serial chain over time, so the kernel is latency-bound unless every lane keeps many loads in flight.
# Both layouts below stream time in chunks whose loads are issued well before they are combined, so
# the memory system always has many rows of a and b per lane outstanding, and the serial work is one
# FMA per element in registers.
#
# GPU (Triton lowering): grid (batch, D / block_d), the whole time axis of one column strip per
# program; row loads `ref[t, :]` are [block_d] vectors (a power of two; Triton tensors cannot be
# indexed by row, so a [chunk, block_d] tile load would not help). A `fori_loop` carries the state and
# `depth` slots of `chunk` loaded rows: an explicit software prefetch into registers, since there is
# no scratch memory and Triton's pipeliner targets loads that feed dots. A ragged tail is handled
# in-kernel (clamped loads, masked stores), so time is never padded.
#
# TPU (Mosaic): blocks must be (8, 128)-tiled, so the grid is (batch, D / block_d, T / block_t) with
# time "arbitrary" (sequential) and the state carried in the resident h_last output block; within a
# block, tiles of 8 (f32) or 16 (bf16) rows are loaded and the rows sliced out statically. Time is
# padded to block_t with the identity (a = 1, b = 0), which leaves both h and h_last exact.
#
# Backward (custom_vjp, one more streaming pass in the opposite direction). For the forward scan
# h_t = a_t h_{t-1} + b_t (h_{-1} = h0) with cotangents ḡ_t = ∂L/∂h_t and ḡ_last = ∂L/∂h_last:
#   G_t = ḡ_t + a_{t+1} G_{t+1},  G_{T-1} = ḡ_{T-1} + ḡ_last         (total gradient wrt h_t)
#   ∂b_t = G_t,  ∂a_t = G_t h_{t-1},  ∂h0 = a_0 G_0.
# Carrying U = a_t G_t (what flows into h_{t-1}) turns this into the same diagonal recurrence with
# the decay unshifted: G_t = ḡ_t + U, U ← a_t G_t, U starts at ḡ_last and ends as ∂h0. For
# reverse=True every index flips: G_t = ḡ_t + a_{t-1} G_{t-1}, ∂a_t = G_t h_{t+1} (h_T = h0),
# ∂h0 = a_{T-1} G_{T-1}. ∂a needs the neighbouring h, which is read from the forward output (so
# fwd+bwd moves 3 + 5 arrays: a, b → h; then a, ḡ, h → ∂a, ∂b).
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PallasConfig:
  """Tiling of the Pallas scan; ``None`` fields take the defaults in ``GPU_DEFAULTS`` / ``_resolve``.

  GPU: ``block_d`` lanes per program (a power of two), ``num_warps``; rows are loaded ``chunk`` at a
  time into ``depth`` register slots, about (depth - 1)·chunk rows per lane ahead of the row being
  combined (``depth`` = 0: no prefetch; ``num_stages`` > 1 then leaves pipelining to Triton).
  ``bwd_*`` set the backward kernel's own values. ``segments`` splits time into that many
  independent pieces (a power of two dividing T; 1 = off; None = ``_gpu_segments``): the three-pass
  form below, for problems with too few lanes to fill the GPU. ``gpu_kernel``: ``"triton"`` (the
  kernels here) or ``"mosaic"`` (``kernels/scan/mosaic_gpu.py``: TMA-pipelined tiles of
  ``mosaic_chunk`` rows × 128 lanes, a multiple of 8 up to 256; ``mosaic_stages`` tiles in flight,
  None = as many as fit shared memory; ``mosaic_bwd_*`` for the backward; ``mosaic_out_slots`` 1
  or 2 buffers per output tile, or 0 to write each output tile over an input tile of its step;
  ``mosaic_lanes`` / ``mosaic_bwd_lanes`` 128, or 64 for ``fwd_split`` / ``bwd_split``'s twice as
  many CTAs, each working on both halves of its tiles at once (a chunk that is a multiple of 16);
  None = 64 where 128-lane CTAs would leave SMs idle: the backward, and the forward of 16-bit inputs).
  Mosaic needs Hopper or newer, and a per-segment length that is a multiple of the chunk; otherwise
  Triton runs. TPU: ``tpu_block_t`` × ``tpu_block_d`` is the VMEM
  block (multiples of 16 and 128). Each layout reads only its own fields.
  """
  block_d: int | None = None
  chunk: int | None = None
  depth: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  bwd_block_d: int | None = None
  bwd_chunk: int | None = None
  bwd_depth: int | None = None
  bwd_num_warps: int | None = None
  tpu_block_t: int | None = None
  tpu_block_d: int | None = None
  segments: int | None = None
  gpu_kernel: str | None = None
  mosaic_chunk: int | None = None
  mosaic_stages: int | None = None
  mosaic_bwd_chunk: int | None = None
  mosaic_bwd_stages: int | None = None
  mosaic_out_slots: int | None = None
  mosaic_lanes: int | None = None
  mosaic_bwd_lanes: int | None = None


# One lane per thread (32 per warp, one warp per program) spreads the 8·1024 lanes of the benchmark
# shape over every SM; each loop step loads ``chunk`` rows per lane before combining them (and with
# ``depth`` > 0 carries further slots through the loop as a register prefetch). Triton's compile time
# grows steeply with the rows carried through the loop, and a model holds several such kernels, so
# the default takes wide loop steps without carried slots. The backward loads three rows per step
# (a, ḡ, h) against the forward's two, hence its shorter chunk. On Hopper the Mosaic GPU kernels
# (kernels/scan/mosaic_gpu.py) are the default for problems that are not split in time; their
# backward (and the forward of 16-bit inputs) on 64-lane CTAs where 128-lane ones would leave SMs
# idle. The measurements behind each default: kernels/BENCHMARKS.md, "Scan tiling defaults".
# ``gpu_kernel=None``: Mosaic on a GPU with TMA (compute capability ≥ 9.0) unless interpreting.
GPU_DEFAULTS = dict(block_d=32, chunk=64, depth=0, num_warps=1, num_stages=1, bwd_chunk=32, bwd_depth=0,
                    gpu_kernel=None, mosaic_chunk=32, mosaic_stages=4, mosaic_bwd_chunk=32,
                    mosaic_bwd_stages=None, mosaic_out_slots=2)
GPU_KERNELS = ("triton", "mosaic")


_SQ = SQUEEZED


_round_up = round_up


# --- GPU kernels -------------------------------------------------------------------------------------


def gpu_time_loop(length: int, chunk: int, depth: int, ascending: bool, load_row, step, init):
  """Runs ``state = step(state, t, rows, valid)`` over t in processing order.

  ``load_row(t)`` returns the loaded row(s) at time t. Rows travel in ``depth`` slots of ``chunk``
  rows; a loop step combines the slots in turn and refills each with the rows ``depth`` slots
  ahead right after it is combined, so (depth - 1)·chunk rows per lane stay in flight. Refilling a
  slot only after combining it lets the refill reuse the slot's registers: the loop carry then
  needs no register copies, which would wait for the pending loads. ``depth`` = 0 loads each chunk
  right before combining it.
  """
  span = chunk * max(depth, 1)  # rows per loop step
  n = -(-length // span)
  ragged = length % span != 0

  def position(c, r):  # r-th row of loop step c -> (position in processing order, time index)
    p = c * span + r
    return p, (p if ascending else length - 1 - p)

  def rows_of(c, slot):
    out = []
    for r in range(slot * chunk, (slot + 1) * chunk):
      _, t = position(c, r)
      if ragged:  # the tail of the last step: load a valid row, `step` ignores it
        t = jnp.minimum(t, length - 1) if ascending else jnp.maximum(t, 0)
      out.append(load_row(t))
    return tuple(out)

  def combine(c, slot, state, rows):
    for i, r in enumerate(range(slot * chunk, (slot + 1) * chunk)):
      p, t = position(c, r)
      state = step(state, t, rows[i], (p < length) if ragged else None)
    return state

  if depth == 0:
    return jax.lax.fori_loop(0, n, lambda c, s: combine(c, 0, s, rows_of(c, 0)), init)

  def body(c, carry):
    state, slots = carry
    nxt = jnp.minimum(c + 1, n - 1)  # after the last step: reloads it (from L2), unused
    refilled = []
    for j in range(depth):
      state = combine(c, j, state, slots[j])
      refilled.append(rows_of(nxt, j))
    return state, tuple(refilled)

  state, _ = jax.lax.fori_loop(0, n, body, (init, tuple(rows_of(0, j) for j in range(depth))))
  return state


def store_row(ref, t, value, valid):
  if valid is None:
    ref[t, :] = value.astype(ref.dtype)
  else:
    @pl.when(valid)
    def _():
      ref[t, :] = value.astype(ref.dtype)


def _gpu_fwd_kernel(a_ref, b_ref, h0_ref, h_ref, hlast_ref, *, length, chunk, depth, reverse):
  # a_ref, b_ref, h_ref: [time, block_d]; h0_ref, hlast_ref: [block_d].
  def step(h, t, rows, valid):
    a_t, b_t = rows
    new = a_t.astype(jnp.float32) * h + b_t.astype(jnp.float32)
    h = new if valid is None else jnp.where(valid, new, h)
    store_row(h_ref, t, h, valid)
    return h

  hlast_ref[...] = gpu_time_loop(length, chunk, depth, not reverse,
                                  lambda t: (a_ref[t, :], b_ref[t, :]), step,
                                  h0_ref[...].astype(jnp.float32))


def _gpu_bwd_kernel(a_ref, g_ref, h_ref, h0_ref, glast_ref, da_ref, db_ref, dh0_ref, *,
                    length, chunk, depth, reverse):
  # Runs opposite to the forward; h_ref is the forward output, read one row behind (h_{t∓1}).
  h0 = h0_ref[...].astype(jnp.float32)

  def load(t):
    if reverse:  # h_{t+1}, with h_T = h0
      prev = h_ref[jnp.minimum(t + 1, length - 1), :]
      edge = t == length - 1
    else:        # h_{t-1}, with h_{-1} = h0
      prev = h_ref[jnp.maximum(t - 1, 0), :]
      edge = t == 0
    return a_ref[t, :], g_ref[t, :], prev, edge

  def step(u, t, rows, valid):
    a_t, g_t, prev, edge = rows
    big_g = g_t.astype(jnp.float32) + u
    prev = jnp.where(edge, h0, prev.astype(jnp.float32))
    store_row(db_ref, t, big_g, valid)
    store_row(da_ref, t, big_g * prev, valid)
    new = a_t.astype(jnp.float32) * big_g
    return new if valid is None else jnp.where(valid, new, u)

  dh0_ref[...] = gpu_time_loop(length, chunk, depth, reverse, load, step,
                                glast_ref[...].astype(jnp.float32))


def _gpu_specs(block_d, time):
  strip = pl.BlockSpec((_SQ, time, block_d), lambda i, j: (i, 0, j))
  vec = pl.BlockSpec((_SQ, block_d), lambda i, j: (i, j))
  return strip, vec


def _gpu_fwd(a, b, h0, *, reverse, interpret, cfg):
  batch, time, d = a.shape
  if cfg.gpu_kernel == "mosaic":
    split = cfg.mosaic_lanes == scan_mosaic_gpu.HALF_WIDTH
    return (scan_mosaic_gpu.fwd_split if split else scan_mosaic_gpu.fwd)(
        a, b, h0, reverse=reverse, chunk=cfg.mosaic_chunk, stages=cfg.mosaic_stages,
        out_slots=cfg.mosaic_out_slots, interpret=interpret)
  strip, vec = _gpu_specs(cfg.block_d, time)
  kernel = functools.partial(_gpu_fwd_kernel, length=time, chunk=cfg.chunk, depth=cfg.depth,
                             reverse=reverse)
  return pl.pallas_call(
      kernel, grid=(batch, d // cfg.block_d), in_specs=[strip, strip, vec], out_specs=[strip, vec],
      out_shape=[jax.ShapeDtypeStruct(a.shape, b.dtype), jax.ShapeDtypeStruct((batch, d), jnp.float32)],
      compiler_params=None if interpret else triton_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret, name="linear_scan_fwd")(a, b, h0)


def _gpu_bwd(a, g, h, h0, g_last, *, reverse, interpret, cfg, b_dtype):
  batch, time, d = a.shape
  if cfg.gpu_kernel == "mosaic":
    split = cfg.mosaic_bwd_lanes == scan_mosaic_gpu.HALF_WIDTH
    return (scan_mosaic_gpu.bwd_split if split else scan_mosaic_gpu.bwd)(
        a, g, h, h0, g_last, reverse=reverse, chunk=cfg.mosaic_bwd_chunk, stages=cfg.mosaic_bwd_stages,
        b_dtype=b_dtype, out_slots=cfg.mosaic_out_slots, interpret=interpret)
  strip, vec = _gpu_specs(cfg.bwd_block_d, time)
  kernel = functools.partial(_gpu_bwd_kernel, length=time, chunk=cfg.bwd_chunk, depth=cfg.bwd_depth,
                             reverse=reverse)
  return pl.pallas_call(
      kernel, grid=(batch, d // cfg.bwd_block_d), in_specs=[strip, strip, strip, vec, vec],
      out_specs=[strip, strip, vec],
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape, b_dtype),
                 jax.ShapeDtypeStruct((batch, d), jnp.float32)],
      compiler_params=None if interpret else triton_params(cfg.bwd_num_warps, cfg.num_stages),
      interpret=interpret, name="linear_scan_bwd")(a, g, h, h0, g_last)


# --- GPU: time split into segments ------------------------------------------------------------------
#
# With few lanes (Griffin at T = 32k, batch 1: 768 lanes = 24 one-warp programs for 132 SMs) the
# single-pass kernel leaves most of the GPU idle and each program walks 32k dependent steps. Splitting
# time into S segments gives S·lanes programs at the cost of one more read of the inputs:
#   1. summary: per segment, the affine map it applies to the state entering it, x ↦ P·x + E with
#      P = Π a_t and E the segment's scan from a zero state (reads a, b; writes two [batch·S, D] rows);
#   2. carries: the S maps composed in order from h0 (a tiny associative scan in XLA) give the state
#      entering every segment;
#   3. the single-pass kernel on [batch·S, T/S, D] with those states as h0.
# The backward is the same three passes over its own recurrence U ← a_t (ḡ_t + U) (E from a zero U,
# P = Π a_t), with the h_{t∓1} that each segment's edge row needs taken from its neighbour segment.
# Forward moves 5 arrays instead of 3, backward 7 instead of 5: a loss when lanes alone fill the GPU,
# so ``_gpu_segments`` only splits problems with fewer than ``GPU_SPLIT_BELOW`` programs.

# Measured on an H100 (f32, D 768, one-warp programs; fwd / fwd+bwd ms): B16 T2048 (384 programs)
# unsplit 0.160 / 0.383, in 2 segments 0.212 / 0.474; B4 T8192 (96) unsplit 0.431 / 0.997, 8 segments
# 0.207 / 0.480; B1 T32768 (24) unsplit 1.431 / 3.275, 8 segments 0.427 / 0.919, 32 segments
# 0.217 / 0.473; B8 T4096 D1024 (256) unsplit 0.268 / 0.606, 2 segments 0.305 / 0.687.
GPU_SPLIT_BELOW = 256    # one-warp programs below which time is split ...
GPU_SPLIT_TARGET = 768   # ... into enough segments to reach this many
GPU_MIN_SEGMENT = 512    # rows per segment at least: shorter ones spend more on the summary pass


def _gpu_segments(batch: int, time: int, d: int, block_d: int) -> int:
  """The number S of time segments (a power of two dividing ``time``) for a [batch, time, d] scan."""
  programs = batch * -(-d // block_d)
  segments = 1
  if programs >= GPU_SPLIT_BELOW:
    return segments
  while (programs * segments < GPU_SPLIT_TARGET and time % (2 * segments) == 0
         and time // (2 * segments) >= GPU_MIN_SEGMENT):
    segments *= 2
  return segments


def _gpu_summary_kernel(a_ref, x_ref, p_ref, e_ref, *, length, chunk, depth, ascending, premultiply):
  # a_ref, x_ref: [time, block_d]; p_ref, e_ref: [block_d]. premultiply: E ← a (E + x) (backward).
  def step(state, t, rows, valid):
    p, e = state
    a_t, x_t = (r.astype(jnp.float32) for r in rows)
    new = (p * a_t, a_t * (e + x_t) if premultiply else a_t * e + x_t)
    return new if valid is None else tuple(jnp.where(valid, n, o) for n, o in zip(new, state))

  ones = jnp.ones(p_ref.shape, jnp.float32)
  p, e = gpu_time_loop(length, chunk, depth, ascending, lambda t: (a_ref[t, :], x_ref[t, :]), step,
                        (ones, jnp.zeros_like(ones)))
  p_ref[...] = p
  e_ref[...] = e


def _gpu_summary(a, x, *, ascending, premultiply, interpret, block_d, chunk, depth, num_warps, num_stages):
  rows, time, d = a.shape
  strip, vec = _gpu_specs(block_d, time)
  kernel = functools.partial(_gpu_summary_kernel, length=time, chunk=chunk, depth=depth,
                             ascending=ascending, premultiply=premultiply)
  return pl.pallas_call(
      kernel, grid=(rows, d // block_d), in_specs=[strip, strip], out_specs=[vec, vec],
      out_shape=[jax.ShapeDtypeStruct((rows, d), jnp.float32)] * 2,
      compiler_params=None if interpret else triton_params(num_warps, num_stages),
      interpret=interpret, name="linear_scan_summary")(a, x)


def _entering(p, e, init, descending):
  """State entering each of S segments ``[batch, S, D]`` from the maps ``x ↦ p·x + e`` applied in
  order (``descending``: from the last segment to the first), starting from ``init [batch, D]``."""
  after, _ = _linear_scan_associative(p, e, init, reverse=descending)  # state after each segment
  if descending:
    return jnp.concatenate([after[:, 1:], init[:, None].astype(jnp.float32)], axis=1)
  return jnp.concatenate([init[:, None].astype(jnp.float32), after[:, :-1]], axis=1)


def _gpu_fwd_segmented(a, b, h0, *, reverse, interpret, cfg):
  batch, time, d = a.shape
  segments = cfg.segments
  split = lambda x: x.reshape(batch * segments, time // segments, d)
  p, e = _gpu_summary(split(a), split(b), ascending=not reverse, premultiply=False, interpret=interpret,
                      block_d=cfg.block_d, chunk=cfg.chunk, depth=cfg.depth, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
  per_seg = lambda x: x.reshape(batch, segments, d)
  h0_seg = _entering(per_seg(p), per_seg(e), h0, descending=reverse)
  h, h_last = _gpu_fwd(split(a), split(b), h0_seg.reshape(batch * segments, d), reverse=reverse,
                       interpret=interpret, cfg=dataclasses.replace(cfg, segments=1))
  return h.reshape(batch, time, d), per_seg(h_last)[:, 0 if reverse else -1]


def _gpu_bwd_segmented(a, g, h, h0, g_last, *, reverse, interpret, cfg, b_dtype):
  batch, time, d = a.shape
  segments, length = cfg.segments, time // cfg.segments
  split = lambda x: x.reshape(batch * segments, length, d)
  # The backward runs against the forward's direction: descending in time for a forward scan.
  p, e = _gpu_summary(split(a), split(g), ascending=reverse, premultiply=True, interpret=interpret,
                      block_d=cfg.bwd_block_d, chunk=cfg.bwd_chunk, depth=cfg.bwd_depth,
                      num_warps=cfg.bwd_num_warps, num_stages=cfg.num_stages)
  per_seg = lambda x: x.reshape(batch, segments, d)
  u_seg = _entering(per_seg(p), per_seg(e), g_last, descending=not reverse)
  # The h_{t∓1} each segment's edge row reads: the neighbouring segment's edge row, or h0.
  h4 = h.reshape(batch, segments, length, d).astype(jnp.float32)
  h0f = h0.astype(jnp.float32)[:, None]
  edge = (jnp.concatenate([h4[:, 1:, 0], h0f], axis=1) if reverse
          else jnp.concatenate([h0f, h4[:, :-1, -1]], axis=1))
  da, db, dh0 = _gpu_bwd(split(a), split(g), split(h), edge.reshape(batch * segments, d),
                         u_seg.reshape(batch * segments, d), reverse=reverse, interpret=interpret,
                         cfg=dataclasses.replace(cfg, segments=1), b_dtype=b_dtype)
  return da.reshape(a.shape), db.reshape(a.shape), per_seg(dh0)[:, -1 if reverse else 0]


def _gpu_fwd_any(a, b, h0, *, reverse, interpret, cfg):
  run = _gpu_fwd_segmented if cfg.segments > 1 else _gpu_fwd
  return run(a, b, h0, reverse=reverse, interpret=interpret, cfg=cfg)


def _gpu_bwd_any(a, g, h, h0, g_last, *, reverse, interpret, cfg, b_dtype):
  run = _gpu_bwd_segmented if cfg.segments > 1 else _gpu_bwd
  return run(a, g, h, h0, g_last, reverse=reverse, interpret=interpret, cfg=cfg, b_dtype=b_dtype)


# --- TPU kernels -------------------------------------------------------------------------------------


def _tpu_fwd_kernel(a_ref, b_ref, h0_ref, h_ref, hlast_ref, *, rows, reverse):
  # a_ref, b_ref, h_ref: [block_t, block_d] in VMEM; h0_ref, hlast_ref: [1, block_d] (resident carry).
  block_t, block_d = a_ref.shape
  groups = block_t // rows

  @pl.when(pl.program_id(2) == 0)
  def _():
    hlast_ref[...] = h0_ref[...].astype(jnp.float32)

  row_id = jax.lax.broadcasted_iota(jnp.int32, (rows, block_d), 0)

  def group(g, h):
    start = pl.multiple_of((groups - 1 - g if reverse else g) * rows, rows)
    a = a_ref[pl.ds(start, rows), :].astype(jnp.float32)
    b = b_ref[pl.ds(start, rows), :].astype(jnp.float32)
    out = jnp.zeros((rows, block_d), jnp.float32)
    for r in (reversed(range(rows)) if reverse else range(rows)):
      h = a[r:r + 1] * h + b[r:r + 1]
      out = jnp.where(row_id == r, h, out)  # assemble the tile without sub-tile stores
    h_ref[pl.ds(start, rows), :] = out.astype(h_ref.dtype)
    return h

  hlast_ref[...] = jax.lax.fori_loop(0, groups, group, hlast_ref[...])


def _tpu_bwd_kernel(a_ref, g_ref, h_ref, hnb_ref, h0_ref, glast_ref, da_ref, db_ref, dh0_ref, *,
                    rows, reverse, num_blocks):
  # hnb_ref: the `rows`-row tile of h just outside this time block on the side h_{t∓1} reaches into.
  block_t, block_d = a_ref.shape
  groups = block_t // rows
  k = pl.program_id(2)
  block = k if reverse else num_blocks - 1 - k  # this block's index along time

  @pl.when(k == 0)
  def _():
    dh0_ref[...] = glast_ref[...].astype(jnp.float32)

  h0 = h0_ref[...].astype(jnp.float32)
  row_id = jax.lax.broadcasted_iota(jnp.int32, (rows, block_d), 0)

  def group(i, u):
    gi = i if reverse else groups - 1 - i
    start = pl.multiple_of(gi * rows, rows)
    a = a_ref[pl.ds(start, rows), :].astype(jnp.float32)
    g = g_ref[pl.ds(start, rows), :].astype(jnp.float32)
    h = h_ref[pl.ds(start, rows), :].astype(jnp.float32)
    if reverse:  # h_{t+1} of the group's last row: next group, next block, or h0 past the end
      nxt = pl.multiple_of(jnp.minimum(start + rows, block_t - rows), rows)
      inner = h_ref[pl.ds(nxt, rows), :][0:1].astype(jnp.float32)
      outer = jnp.where(block < num_blocks - 1, hnb_ref[0:1, :].astype(jnp.float32), h0)
      edge = jnp.where(gi < groups - 1, inner, outer)
    else:        # h_{t-1} of the group's first row: previous group, previous block, or h0
      prv = pl.multiple_of(jnp.maximum(start - rows, 0), rows)
      inner = h_ref[pl.ds(prv, rows), :][rows - 1:rows].astype(jnp.float32)
      outer = jnp.where(block > 0, hnb_ref[rows - 1:rows, :].astype(jnp.float32), h0)
      edge = jnp.where(gi > 0, inner, outer)
    da = jnp.zeros((rows, block_d), jnp.float32)
    db = jnp.zeros((rows, block_d), jnp.float32)
    for r in (range(rows) if reverse else reversed(range(rows))):
      if reverse:
        prev = h[r + 1:r + 2] if r < rows - 1 else edge
      else:
        prev = h[r - 1:r] if r > 0 else edge
      big_g = g[r:r + 1] + u
      db = jnp.where(row_id == r, big_g, db)
      da = jnp.where(row_id == r, big_g * prev, da)
      u = a[r:r + 1] * big_g
    da_ref[pl.ds(start, rows), :] = da.astype(da_ref.dtype)
    db_ref[pl.ds(start, rows), :] = db.astype(db_ref.dtype)
    return u

  dh0_ref[...] = jax.lax.fori_loop(0, groups, group, dh0_ref[...])


def _tpu_rows(*dtypes) -> int:
  # Native sublane tiling: 8 rows of 32-bit, 16 of 16-bit (packed) values.
  return 16 if any(jnp.dtype(dt).itemsize < 4 for dt in dtypes) else 8


def _tpu_fwd(a, b, h0, *, reverse, interpret, cfg):
  batch, time, d = a.shape
  block_t, block_d, rows = cfg.tpu_block_t, cfg.tpu_block_d, _tpu_rows(a.dtype, b.dtype)
  nt = time // block_t
  tmap = (lambda k: nt - 1 - k) if reverse else (lambda k: k)
  tile = pl.BlockSpec((_SQ, block_t, block_d), lambda i, j, k: (i, tmap(k), j))
  vec = pl.BlockSpec((_SQ, 1, block_d), lambda i, j, k: (i, 0, j))
  kernel = functools.partial(_tpu_fwd_kernel, rows=rows, reverse=reverse)
  h, h_last = pl.pallas_call(
      kernel, grid=(batch, d // block_d, nt), in_specs=[tile, tile, vec], out_specs=[tile, vec],
      out_shape=[jax.ShapeDtypeStruct(a.shape, b.dtype), jax.ShapeDtypeStruct((batch, 1, d), jnp.float32)],
      compiler_params=None if interpret else mosaic_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="linear_scan_fwd")(a, b, h0[:, None])
  return h, h_last[:, 0]


def _tpu_bwd(a, g, h, h0, g_last, *, reverse, interpret, cfg, b_dtype):
  batch, time, d = a.shape
  block_t, block_d, rows = cfg.tpu_block_t, cfg.tpu_block_d, _tpu_rows(a.dtype, b_dtype, g.dtype, h.dtype)
  nt, per_block, total = time // block_t, block_t // rows, time // rows
  tmap = (lambda k: k) if reverse else (lambda k: nt - 1 - k)
  if reverse:   # first row tile of the next block
    nbmap = lambda k: jnp.minimum((tmap(k) + 1) * per_block, total - 1)
  else:         # last row tile of the previous block
    nbmap = lambda k: jnp.maximum(tmap(k) * per_block - 1, 0)
  tile = pl.BlockSpec((_SQ, block_t, block_d), lambda i, j, k: (i, tmap(k), j))
  nb = pl.BlockSpec((_SQ, rows, block_d), lambda i, j, k: (i, nbmap(k), j))
  vec = pl.BlockSpec((_SQ, 1, block_d), lambda i, j, k: (i, 0, j))
  kernel = functools.partial(_tpu_bwd_kernel, rows=rows, reverse=reverse, num_blocks=nt)
  da, db, dh0 = pl.pallas_call(
      kernel, grid=(batch, d // block_d, nt), in_specs=[tile, tile, tile, nb, vec, vec],
      out_specs=[tile, tile, vec],
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape, b_dtype),
                 jax.ShapeDtypeStruct((batch, 1, d), jnp.float32)],
      compiler_params=None if interpret else mosaic_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="linear_scan_bwd")(a, g, h, h, h0[:, None], g_last[:, None])
  return da, db, dh0[:, 0]


# --- custom_vjp over the padded [batch, time, D] problem -------------------------------------------


_KERNELS = {"gpu": (_gpu_fwd_any, _gpu_bwd_any), "tpu": (_tpu_fwd, _tpu_bwd)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _scan_core(a, b, h0, platform, reverse, interpret, cfg):
  fwd, _ = _KERNELS[platform]
  return fwd(a, b, h0, reverse=reverse, interpret=interpret, cfg=cfg)


def _scan_core_fwd(a, b, h0, platform, reverse, interpret, cfg):
  h, h_last = _scan_core(a, b, h0, platform, reverse, interpret, cfg)
  return (h, h_last), (a, h, h0)


def _scan_core_bwd(platform, reverse, interpret, cfg, res, cotangents):
  a, h, h0 = res
  g, g_last = cotangents
  _, bwd = _KERNELS[platform]
  # h is stored in b's dtype, so it also names the dtype of ∂b.
  da, db, dh0 = bwd(a, g.astype(h.dtype), h, h0, g_last.astype(jnp.float32), reverse=reverse,
                    interpret=interpret, cfg=cfg, b_dtype=h.dtype)
  return da, db, dh0.astype(h0.dtype)


_scan_core.defvjp(_scan_core_fwd, _scan_core_bwd)
_scan_core_shared = lowered_once(_scan_core, static_argnums=(3, 4, 5, 6))


def _resolve(platform: str, cfg: PallasConfig, batch: int, d: int, time: int, dtypes,
             interpret: bool = False) -> PallasConfig:
  """Fills the platform defaults into ``cfg`` for a ``[batch, time, d]`` problem."""
  if platform == "gpu":
    get = lambda field: GPU_DEFAULTS[field] if getattr(cfg, field) is None else getattr(cfg, field)
    # Default: Mosaic where it runs (a Hopper GPU; the CPU tests ask for it by name), else Triton.
    kernel = get("gpu_kernel") or ("mosaic" if not interpret and tma_gpu() else "triton")
    if kernel not in GPU_KERNELS:
      raise ValueError(f"linear_scan: PallasConfig.gpu_kernel={kernel!r}; valid: {GPU_KERNELS}")
    for field in ("mosaic_chunk", "mosaic_bwd_chunk"):
      value = getattr(cfg, field)
      if value is not None and (value <= 0 or value % scan_mosaic_gpu.EDGE or value > 256):
        raise ValueError(f"linear_scan: PallasConfig.{field}={value} must be a multiple of "
                         f"{scan_mosaic_gpu.EDGE} in [8, 256] (the rows of a TMA tile)")
    if cfg.mosaic_out_slots not in (None, 0, 1, 2):
      raise ValueError(f"linear_scan: PallasConfig.mosaic_out_slots={cfg.mosaic_out_slots}; valid: 0, 1, 2")
    half, whole = scan_mosaic_gpu.HALF_WIDTH, scan_mosaic_gpu.LANES
    for lanes_field, chunk_field in (("mosaic_lanes", "mosaic_chunk"), ("mosaic_bwd_lanes", "mosaic_bwd_chunk")):
      lanes, chunk = getattr(cfg, lanes_field), getattr(cfg, chunk_field)
      if lanes not in (None, half, whole):
        raise ValueError(f"linear_scan: PallasConfig.{lanes_field}={lanes}; valid: {half}, {whole}")
      if lanes == half and chunk is not None and chunk % (2 * scan_mosaic_gpu.EDGE):
        raise ValueError(f"linear_scan: PallasConfig.{chunk_field}={chunk} must be a multiple of "
                         f"{2 * scan_mosaic_gpu.EDGE} with {lanes_field}={half}")
    if kernel == "mosaic":
      # Segments are sized by lanes (32 per one-warp Triton program), as for the Triton kernels.
      segments = cfg.segments or _gpu_segments(batch, time, d, 32)
      length = time // segments if time % segments == 0 else time
      # Default tiles hold the same bytes whatever the dtype: 16-bit rows get twice the rows (bf16 at
      # B8 T4096 D1024: chunks 64 / 64 took 0.152 / 0.433 ms against 0.160 / 0.478 at 32 / 32).
      widen = max(1, 4 // jnp.dtype(dtypes[1]).itemsize)
      chunks = (cfg.mosaic_chunk or min(256, GPU_DEFAULTS["mosaic_chunk"] * widen),
                cfg.mosaic_bwd_chunk or min(256, GPU_DEFAULTS["mosaic_bwd_chunk"] * widen))
      if any(scan_mosaic_gpu.supports(_round_up(d, scan_mosaic_gpu.LANES), length, c) for c in chunks):
        kernel = "triton"  # e.g. a ragged length: the Triton kernels take any
      elif segments > 1 and cfg.segments is None:
        # Split problems stay on Triton: at B4 T8192 and B1 T32768 (D 768) the Mosaic kernels behind
        # the Triton summary pass took 0.30 / 0.62 ms against 0.20 / 0.48 (H100, BENCHMARKS.md).
        kernel = "triton"
    if kernel == "mosaic":
      lanes = scan_mosaic_gpu.LANES
      # The backward on 64-lane CTAs where 128-lane ones would leave SMs idle (B8 D1024: 64 CTAs).
      idle = batch * (cfg.segments or 1) * -(-d // lanes) < gpu_sm_count()
      halves = lambda chunk: chunk % (2 * scan_mosaic_gpu.EDGE) == 0
      # The forward too for 16-bit inputs, whose rows cost more time than bytes (bf16 B8 T4096 D1024:
      # 0.153 → 0.098 ms); f32 is bandwidth-bound either way (0.172 / 0.173 ms).
      fwd_lanes = cfg.mosaic_lanes or (half if idle and halves(chunks[0]) and widen > 1 else lanes)
      bwd_lanes = cfg.mosaic_bwd_lanes or (half if idle and halves(chunks[1]) else lanes)
      in_f, in_b = dtypes, (dtypes[0], dtypes[1], dtypes[1])  # (a, b) forward; (a, ḡ, h) backward
      slots = get("mosaic_out_slots")
      fit = lambda chunk, ins, outs, width: scan_mosaic_gpu.fit_stages(
          chunk, ins, outs, edge=len(ins) == 3 and width == lanes, out_slots=slots, lanes=width)
      cfg = dataclasses.replace(
          cfg, mosaic_chunk=chunks[0], mosaic_bwd_chunk=chunks[1], mosaic_out_slots=slots,
          mosaic_lanes=fwd_lanes, mosaic_bwd_lanes=bwd_lanes,
          # a given number of stages is taken as is; a default one is capped by what fits
          mosaic_stages=cfg.mosaic_stages or min(get("mosaic_stages") or 8,
                                                 fit(chunks[0], in_f, (dtypes[1],), fwd_lanes)),
          mosaic_bwd_stages=cfg.mosaic_bwd_stages or min(
              get("mosaic_bwd_stages") or 8, fit(chunks[1], in_b, (dtypes[0], dtypes[1]), bwd_lanes)),
          block_d=fwd_lanes, bwd_block_d=bwd_lanes)
    else:
      segments = None
    # A narrow problem (D < 32) gets one power-of-two block instead of padding D to 32.
    block_d = cfg.block_d or min(GPU_DEFAULTS["block_d"], 1 << (d - 1).bit_length())
    bwd_block_d = cfg.bwd_block_d or block_d
    segments = cfg.segments or segments or _gpu_segments(batch, time, d, block_d)
    if segments & (segments - 1) or time % segments:
      raise ValueError(f"linear_scan: PallasConfig.segments={segments} must be a power of two dividing "
                       f"the length {time}")
    return dataclasses.replace(
        cfg, gpu_kernel=kernel, segments=segments, block_d=block_d, bwd_block_d=bwd_block_d,
        chunk=get("chunk"), depth=get("depth"), bwd_chunk=get("bwd_chunk"), bwd_depth=get("bwd_depth"),
        num_stages=get("num_stages"),
        num_warps=cfg.num_warps or max(1, block_d // 32),  # one lane per thread
        bwd_num_warps=cfg.bwd_num_warps or max(1, bwd_block_d // 32))
  rows = _tpu_rows(*dtypes)
  block_d = cfg.tpu_block_d or min(512, _round_up(d, 128))
  block_t = cfg.tpu_block_t or min(256, _round_up(time, rows))
  if block_d % 128 or block_t % rows:
    raise ValueError(f"linear_scan: TPU blocks must be (multiple of {rows}, multiple of 128); "
                     f"got tpu_block_t={block_t}, tpu_block_d={block_d}")
  return dataclasses.replace(cfg, tpu_block_d=block_d, tpu_block_t=block_t)


def _scan_platform(a, b, h0, *, platform, reverse, interpret, cfg):
  """Flattens features to D, pads D (and, on TPU, time) to the blocks, runs the kernels, undoes it."""
  batch, time = a.shape[:2]
  features = a.shape[2:]
  d = math.prod(features)
  cfg = _resolve(platform, cfg, batch, d, time, (a.dtype, b.dtype), interpret)
  lane_block = cfg.tpu_block_d if platform == "tpu" else math.lcm(cfg.block_d, cfg.bwd_block_d)
  d_pad = _round_up(d, lane_block)
  t_pad = _round_up(time, cfg.tpu_block_t) if platform == "tpu" else time
  a3, b3, h03 = a.reshape(batch, time, d), b.reshape(batch, time, d), h0.reshape(batch, d)
  if (t_pad, d_pad) != (time, d):
    # The identity element (a = 1, b = 0) past the end keeps h_last and, for reverse, h0 exact.
    a3 = jnp.pad(a3, ((0, 0), (0, t_pad - time), (0, d_pad - d)), constant_values=1)
    b3 = jnp.pad(b3, ((0, 0), (0, t_pad - time), (0, d_pad - d)))
    h03 = jnp.pad(h03, ((0, 0), (0, d_pad - d)))
  h, h_last = _scan_core_shared(a3, b3, h03, platform, reverse, interpret, cfg)
  if (t_pad, d_pad) != (time, d):
    h, h_last = h[:, :time, :d], h_last[:, :d]
  return h.reshape(a.shape), h_last.reshape((batch,) + features)


def linear_scan_pallas(a, b, h0=None, *, reverse: bool = False, interpret: bool = False,
                       platform: Literal["gpu", "tpu"] | None = None, config: PallasConfig | None = None):
  """The Pallas scan (same contract as ``linear_scan``), differentiable through its own kernels.

  ``platform`` picks the kernel layout; ``None`` decides at lowering time (TPU layout when lowered
  for TPU, the Triton layout otherwise), so ``jax.export(..., platforms=["tpu"])`` from any host
  gets the TPU kernel. ``interpret=True`` runs either layout on CPU (tests); there ``None`` means GPU.
  """
  _check(a, b, h0)
  cfg = config or PallasConfig()
  h0 = jnp.zeros((a.shape[0],) + a.shape[2:], jnp.float32) if h0 is None else h0
  run = lambda p: functools.partial(_scan_platform, platform=p, reverse=reverse, interpret=interpret, cfg=cfg)
  if platform is not None or interpret:
    return run(platform or "gpu")(a, b, h0)
  return jax.lax.platform_dependent(a, b, h0, tpu=run("tpu"), default=run("gpu"))
