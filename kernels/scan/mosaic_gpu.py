"""The diagonal scan ``h_t = a_t ⊙ h_{t-1} + b_t`` as Mosaic GPU kernels (Hopper and newer).

Same contract as the Triton kernels of ``kernels/scan/pallas.py`` (``_gpu_fwd`` / ``_gpu_bwd``), which use
these under ``PallasConfig(gpu_kernel="mosaic")`` (the default on Hopper). The scan is
bandwidth-bound: each lane is a serial chain of FMAs, so what decides its speed is how many bytes are
in flight while the chains run. The Triton kernels can only prefetch by carrying rows through their
time loop in registers (Triton's compile time grows steeply with those). Here
tiles of ``chunk`` rows × 128 lanes stream through shared memory by TMA, ``stages`` tiles ahead
(``_stream``), and the registers hold the 128-lane state and one tile's rows, so more bytes are in
flight than Triton's kernels manage (measured bandwidths: kernels/BENCHMARKS.md).

Layout (``fwd`` / ``bwd``): one CTA (one warpgroup, 128 threads, one lane each) per (batch row, 128
lanes) of a ``[batch, time, D]`` problem; ``D`` a multiple of 128 (the caller pads lanes) and ``time`` of
``chunk`` (``supports``; the caller runs Triton otherwise). The backward reads ``h_{t∓1}``: inside a
tile that is the neighbouring row; for the tile's edge row, the nearest row of the next tile in time
order, fetched as an 8-row block beside each tile (8/chunk more reads of h, mostly from L2, where
the alternative was an XLA copy of h shifted by one row). ``fwd_split`` / ``bwd_split`` (the
"half-width CTAs" section) run 64 lanes per CTA, for twice the CTAs where 128-lane ones would leave
SMs idle (at B8 D1024, say; measured in kernels/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LANES = 128  # one warpgroup, one lane per thread
EDGE = 8     # rows of the block that supplies a tile's edge row in the backward


def supports(d: int, time: int, chunk: int) -> str | None:
  """Why a ``[batch, time, d]`` problem cannot run on these kernels as given (None: it can; the
  half-width kernels also need a chunk that is a multiple of 16)."""
  if d % LANES:
    return f"D={d} is not a multiple of {LANES}"
  if chunk % EDGE or chunk > 256:
    return f"chunk={chunk} must be a multiple of {EDGE} and at most 256 (a TMA box)"
  if time % chunk:
    return f"time={time} is not a multiple of chunk={chunk}"
  return None


SMEM_BUDGET = 226 * 1024  # of the H100's 227 KB per block (Mosaic adds only the barriers)


def fit_stages(chunk: int, in_dtypes, out_dtypes, *, edge: bool, out_slots: int = 2, most: int = 8,
               lanes: int = LANES) -> int:
  """The most pipeline stages (≤ ``most``) whose buffers fit ``SMEM_BUDGET``: ``stages`` slots per
  input tile (and edge block), ``out_slots`` per output tile, tiles ``lanes`` wide (``HALF_WIDTH``:
  ``bwd_split``'s tiles and scratch)."""
  row = lambda dtypes: sum(lanes * jnp.dtype(t).itemsize for t in dtypes)
  per_stage = chunk * row(in_dtypes) + (EDGE * row(in_dtypes[-1:]) if edge else 0)
  scratch = 2 * LANES * 4 if lanes == LANES else 12 * HALF_WIDTH * 4  # the kernels' f32 vectors
  fixed = out_slots * chunk * row(out_dtypes) + scratch
  return max(2, min(most, (SMEM_BUDGET - fixed) // per_stage))


def _tile_index(steps: int, ascending: bool):
  return (lambda i: i) if ascending else (lambda i: steps - 1 - i)


@dataclasses.dataclass(frozen=True)
class _Tile:
  """One stream of ``_stream``: its shared-memory tile (``shape``, ``dtype``) and ``moves(i, tile)``,
  the ``copies`` TMA copies of step i as (source, destination) pairs: GMEM → views of ``tile`` for
  an input, views of ``tile`` → GMEM for an output."""
  shape: tuple[int, ...]
  dtype: object
  moves: Callable
  copies: int = 1


def _rows(ref, rows: int, block, *, output: bool = False) -> _Tile:
  """Step i moves rows ``[block(i)·rows, (block(i) + 1)·rows)`` of a ``[time, lanes]`` GMEM view."""
  def moves(i, tile):
    gmem = ref.at[pl.ds(block(i) * rows, rows)]
    return [(tile, gmem) if output else (gmem, tile)]
  return _Tile((rows, ref.shape[-1]), ref.dtype, moves)


def _stream(body, *, steps: int, stages: int, out_slots: int, ins, outs, init, in_place=()):
  """Runs ``carry = body(i, in_tiles, out_tiles, carry)`` for i in 0 … steps − 1, with the input tiles
  of step i loaded by TMA ``stages`` steps ahead and the output tiles stored behind it.

  ``ins`` / ``outs``: ``_Tile`` streams. ``out_slots``: 2 double-buffers the output tiles; 1
  waits, before a step writes its outputs, until the previous step's stores have read theirs (issued
  a whole step earlier, so rarely a wait); 0 writes output j over the step's tile of input
  ``in_place[j]`` (the body reads every row before its first store) and refills that slot once the
  store has read it. Fewer output buffers leave the shared memory to more input stages. (Written
  out rather than ``plgpu.emit_pipeline`` so that every store is unconditional: Mosaic GPU's
  interpreter, which the CPU tests run, has no predicated stores.)
  """
  def scoped(in_bufs, out_bufs, barriers):
    def fetch(i, slot, which):
      for j in which:
        for src, dst in ins[j].moves(i, in_bufs[j].at[slot]):
          plgpu.copy_gmem_to_smem(src, dst, barriers.at[slot])

    everything = range(len(ins))
    for i in range(min(stages, steps)):
      fetch(i, i, everything)

    def step(i, carry):
      slot = jax.lax.rem(i, stages)
      plgpu.barrier_wait(barriers.at[slot])
      if out_slots:
        half = jax.lax.rem(i, out_slots)
        plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)  # stores from `half` have read it
        out_tiles = [buf.at[half] for buf in out_bufs]
      else:
        out_tiles = [in_bufs[j].at[slot] for j in in_place]
      carry = body(i, [buf.at[slot] for buf in in_bufs], out_tiles, carry)
      plgpu.commit_smem()  # every thread is done with the slot, and its writes are visible to TMA
      for stream, tile in zip(outs, out_tiles):
        for src, dst in stream.moves(i, tile):
          plgpu.copy_smem_to_gmem(src, dst, commit_group=False)
      plgpu.commit_smem_to_gmem_group()

      @pl.when(i + stages < steps)
      def _():
        if out_slots:
          fetch(i + stages, slot, everything)
        else:  # the other inputs first, then the written-over ones once their stores have read them
          fetch(i + stages, slot, [j for j in everything if j not in in_place])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          fetch(i + stages, slot, in_place)
      return carry

    carry = jax.lax.fori_loop(0, steps, step, init)
    plgpu.wait_smem_to_gmem(0)
    return carry

  arrivals = sum(t.copies for t in ins)  # every copy of a stage arrives on the stage's barrier
  smem = lambda tiles, slots: [plgpu.SMEM((slots,) + t.shape, t.dtype) for t in tiles]
  out_smem = smem(outs, out_slots) if out_slots else []
  return pl.run_scoped(lambda *refs: scoped(refs[:len(ins)], refs[len(ins):-1], refs[-1]),
                       *smem(ins, stages), *out_smem,
                       plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages))


def _load_vectors(sources, smem, barriers):
  """Copies each ``[LANES]`` GMEM vector in ``sources`` to ``smem[i]`` and returns them as f32 values."""
  for i, src in enumerate(sources):
    plgpu.copy_gmem_to_smem(src, smem.at[i], barriers.at[i])
  out = []
  for i in range(len(sources)):
    plgpu.barrier_wait(barriers.at[i])
    out.append(smem[i].astype(jnp.float32))
  return out


def _store_vector(value, smem, dst):
  smem[0] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem.at[0], dst)
  plgpu.wait_smem_to_gmem(0)


def _interpret_params():
  """Mosaic GPU's own interpreter (TMA copies, barriers); public from jax 0.11, internal in 0.10."""
  cls = getattr(plgpu, "InterpretGPUParams", None)
  if cls is None:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
  return cls()


def _launch(kernel, out_type, batch: int, d: int, interpret: bool, *, lanes: int = LANES, scratch=None):
  scratch = scratch or [plgpu.SMEM((2, LANES), jnp.float32), plgpu.Barrier(num_barriers=2)]
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(batch, d // lanes), grid_names=("batch", "lanes"),
      scratch_types=scratch, interpret=_interpret_params() if interpret else None)


def _block_position(width: int = LANES):
  n = jax.lax.axis_index("batch")
  lanes = pl.ds(jax.lax.axis_index("lanes") * width, width)
  return n, lanes


def fwd(a, b, h0, *, reverse: bool, chunk: int, stages: int, out_slots: int = 2, interpret: bool = False):
  """``h [batch, time, D]`` (b's dtype) and ``h_last [batch, D]`` (f32) of the scan from ``h0``."""
  batch, time, d = a.shape
  steps = time // chunk
  ascending = not reverse
  tile = _tile_index(steps, ascending)
  rows = range(chunk) if ascending else range(chunk - 1, -1, -1)

  def kernel(a_gmem, b_gmem, h0_gmem, h_gmem, hlast_gmem, vec_smem, barriers):
    n, lanes = _block_position()
    (h0,) = _load_vectors([h0_gmem.at[n, lanes]], vec_smem, barriers)

    def body(_, ins, outs, h):
      (a_tile, b_tile), (h_tile,) = ins, outs
      # Every row is loaded before the first store: a load placed after a shared-memory store must
      # wait for it (the compiler cannot tell the tiles apart), which serialised the chain on
      # ~90 cycles of shared-memory latency per row, slower than Triton's kernel (kernels/BENCHMARKS.md).
      a_rows = [a_tile[r].astype(jnp.float32) for r in rows]
      b_rows = [b_tile[r].astype(jnp.float32) for r in rows]
      for r, a_r, b_r in zip(rows, a_rows, b_rows):
        h = a_r * h + b_r
        h_tile[r] = h.astype(h_tile.dtype)
      return h

    at = lambda ref, **kw: _rows(ref.at[n, :, lanes], chunk, tile, **kw)
    h_last = _stream(body, steps=steps, stages=stages, out_slots=out_slots, ins=[at(a_gmem), at(b_gmem)],
                     outs=[at(h_gmem, output=True)], init=h0, in_place=(1,))  # (h over b)
    _store_vector(h_last, vec_smem, hlast_gmem.at[n, lanes])

  out_type = (jax.ShapeDtypeStruct(a.shape, b.dtype), jax.ShapeDtypeStruct((batch, d), jnp.float32))
  return _launch(kernel, out_type, batch, d, interpret)(a, b, h0.astype(jnp.float32))


def bwd(a, g, h, h0, g_last, *, reverse: bool, chunk: int, stages: int, b_dtype, out_slots: int = 2,
        interpret: bool = False):
  """``(∂a, ∂b, ∂h0)`` of the scan from the forward output ``h`` and cotangents ``g``, ``g_last``.

  Runs against the forward's direction with ``U`` (what flows into ``h_{t∓1}``), as ``kernels/scan/pallas.py``'s
  section comment derives: ``G_t = ḡ_t + U``, ``∂b_t = G_t``, ``∂a_t = G_t h_{t∓1}``, ``U ← a_t G_t``.
  """
  batch, time, d = a.shape
  steps = time // chunk
  ascending = reverse  # the backward of a forward scan walks time downwards
  tile = _tile_index(steps, ascending)
  per_tile = chunk // EDGE
  last_block = time // EDGE - 1
  if reverse:  # tile c's last row reads h_{t+1}: the first row of the next tile (h0 past the end)
    edge_block = lambda i: jnp.minimum((i + 1) * per_tile, last_block)
    edge_row, rows = 0, range(chunk)
  else:        # tile c's first row reads h_{t-1}: the last row of the previous tile (h0 before it)
    edge_block = lambda i: jnp.maximum((steps - 1 - i) * per_tile - 1, 0)
    edge_row, rows = EDGE - 1, range(chunk - 1, -1, -1)

  def kernel(a_gmem, g_gmem, h_gmem, h0_gmem, glast_gmem, da_gmem, db_gmem, dh0_gmem, vec_smem, barriers):
    n, lanes = _block_position()
    h0, g_last = _load_vectors([h0_gmem.at[n, lanes], glast_gmem.at[n, lanes]], vec_smem, barriers)

    def body(i, ins, outs, u):
      (a_tile, g_tile, h_tile, e_tile), (da_tile, db_tile) = ins, outs
      at_end = i == steps - 1  # processed last: the first tile in time (forward scan) or the last
      # (an explicit broadcast: Mosaic's warpgroup lowering has no select on a scalar predicate)
      edge = jnp.where(jnp.broadcast_to(at_end, h0.shape), h0, e_tile[edge_row].astype(jnp.float32))
      def h_beside(r):  # h_{t∓1} for row r of the tile
        other = r + 1 if reverse else r - 1
        return edge if other in (-1, chunk) else h_tile[other].astype(jnp.float32)

      # Loads first, as in the forward.
      loaded = [(a_tile[r].astype(jnp.float32), g_tile[r].astype(jnp.float32), h_beside(r)) for r in rows]
      for r, (a_r, g_r, prev) in zip(rows, loaded):
        big_g = g_r + u
        db_tile[r] = big_g.astype(db_tile.dtype)
        da_tile[r] = (big_g * prev).astype(da_tile.dtype)
        u = a_r * big_g
      return u

    at = lambda ref, **kw: _rows(ref.at[n, :, lanes], chunk, tile, **kw)
    edges = _rows(h_gmem.at[n, :, lanes], EDGE, edge_block)
    dh0 = _stream(body, steps=steps, stages=stages, out_slots=out_slots,
                  ins=[at(a_gmem), at(g_gmem), at(h_gmem), edges],
                  outs=[at(da_gmem, output=True), at(db_gmem, output=True)],
                  init=g_last, in_place=(0, 1))  # (∂a over a, ∂b over ḡ)
    _store_vector(dh0, vec_smem, dh0_gmem.at[n, lanes])

  out_type = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape, b_dtype),
              jax.ShapeDtypeStruct((batch, d), jnp.float32))
  return _launch(kernel, out_type, batch, d, interpret)(a, g, h, h0.astype(jnp.float32),
                                                        g_last.astype(jnp.float32))


# --- half-width CTAs ------------------------------------------------------------------------------
# With one 128-lane CTA per (batch row, lane block), B8 D1024 is 64 CTAs for the H100's 132 SMs, and
# the backward's five streams then leave bandwidth unused that 128 or more CTAs of the same kernel
# reach (kernels/BENCHMARKS.md, "Diagonal scan: the backward on 64-lane CTAs").
# ``fwd_split`` / ``bwd_split`` double the CTAs without splitting time across them (which
# would cost an extra pass over the inputs): a CTA takes 64 lanes, and its 128 threads work on both
# halves of every tile at once, thread (s, lane) on rows ``[s·half, (s + 1)·half)``. Rows r of the
# two halves form one [2, 64] slab (a strided view of the [2, half, 64] tile). The half the pass
# reaches first (the "lead") runs from the true carry; the other (the "trail") from zero, keeping
# for each row the product of the decays walked so far, so once the lead's outgoing carry has
# crossed to the trail threads through shared memory, each trail row is fixed up with one FMA
# (forward: h_r += (Π_{walked rows ≤ r} a) · h_lead; backward: G_r += (Π_{walked rows < r} a) · U_lead).
# The fixed trail's outgoing carry crosses back to the lead threads for the next tile.

HALF_WIDTH = 64  # lanes per CTA of fwd_split / bwd_split


def _move_row(buf, x, src: int):
  """``y`` with ``y[1 − src] = x[src]`` (its other row is stale), through the [3, width] ``buf``."""
  buf[pl.ds(1 - src, 2)] = x  # x[src] lands on buf[1] ...
  plgpu.commit_smem()  # (a warpgroup barrier: other threads read what these wrote)
  return buf[pl.ds(src, 2)]  # ... which this view puts on row 1 − src


def _halves(ref, chunk: int, tile, *, output: bool = False) -> _Tile:
  """Tile ``[2, chunk/2, 64]`` of a ``[time, 64]`` GMEM view: step i moves the two halves of its tile."""
  half = chunk // 2
  def moves(i, t):
    pairs = [(ref.at[pl.ds(tile(i) * chunk + s * half, half)], t.at[s]) for s in (0, 1)]
    return [(dst, src) for src, dst in pairs] if output else pairs
  return _Tile((2, half, ref.shape[-1]), ref.dtype, moves, copies=2)


class _Split:
  """The shared set-up of the half-width kernels: scratch, the lead-row mask and the carry's way in and
  out. ``vec_smem [3, 2, 64]``: a vector in both rows, the mask, the carry leaving the kernel;
  ``pass_smem`` / ``carry_smem [3, 64]``: the two crossings of ``_move_row`` (separate buffers: a
  crossing's write must not race the other's reads)."""

  def __init__(self, lead: int, pairs: int):
    self.lead, self.trail, self.pairs = lead, 1 - lead, pairs
    self.scratch = [plgpu.SMEM((3, 2, HALF_WIDTH), jnp.float32), plgpu.SMEM((3, HALF_WIDTH), jnp.float32),
                    plgpu.SMEM((3, HALF_WIDTH), jnp.float32), plgpu.Barrier(num_arrivals=2 + pairs, num_barriers=1)]
    self.mask = jnp.zeros((2, HALF_WIDTH), jnp.float32).at[lead].set(1.0)

  def start(self, mask_gmem, carry_gmem, scratch, pair_gmem=None):
    """Loads the mask, the first carry (returned on the lead row, 0 on the trail) and ``pair_gmem``
    into both rows of ``vec_smem[0]``; returns ``(carry, is_lead, is_trail)``."""
    vec_smem, _, carry_smem, barrier = scratch
    copies = [(mask_gmem, vec_smem.at[1]), (carry_gmem, carry_smem.at[1])]
    copies += [(pair_gmem, vec_smem.at[0, s]) for s in range(self.pairs)]
    for src, dst in copies:
      plgpu.copy_gmem_to_smem(src, dst, barrier.at[0])
    plgpu.barrier_wait(barrier.at[0])
    self.is_lead, self.is_trail = vec_smem[1] > 0.5, vec_smem[1] < 0.5
    return self.on_lead(carry_smem[pl.ds(self.trail, 2)])  # (the way _move_row reads buf[1])

  def on_lead(self, x):
    return jnp.where(self.is_lead, x, jnp.zeros_like(x))

  def on_trail(self, x):
    return jnp.where(self.is_trail, x, jnp.zeros_like(x))

  def cross(self, scratch, lead_out, fix_trail):
    """The lead's outgoing carry onto the trail row (``entering``); ``fix_trail(entering)`` returns
    the trail's fixed outgoing carry, which goes back onto the lead row for the next tile."""
    _, pass_smem, carry_smem, _ = scratch
    entering = self.on_trail(_move_row(pass_smem, lead_out, self.lead))
    return self.on_lead(_move_row(carry_smem, fix_trail(entering), self.trail))

  def finish(self, carry, scratch, dst):
    """Stores the lead row of the final carry (the kernel's outgoing vector) to ``dst``."""
    vec_smem = scratch[0]
    vec_smem[2] = carry
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(vec_smem.at[2, self.lead], dst)
    plgpu.wait_smem_to_gmem(0)


def fwd_split(a, b, h0, *, reverse: bool, chunk: int, stages: int, out_slots: int = 2, interpret: bool = False):
  """``fwd`` (same arguments and results) on 64-lane CTAs, each tile's halves side by side (above);
  ``D`` a multiple of 64, ``chunk`` of 16."""
  batch, time, d = a.shape
  steps, half, f32 = time // chunk, chunk // 2, jnp.float32
  tile = _tile_index(steps, not reverse)
  rows = range(half - 1, -1, -1) if reverse else range(half)
  split = _Split(lead=1 if reverse else 0, pairs=0)

  def kernel(a_gmem, b_gmem, h0_gmem, mask_gmem, h_gmem, hlast_gmem, *scratch):
    n, lanes = _block_position(HALF_WIDTH)

    def body(_, ins, outs, h):  # h: the state entering the tile on the lead row, 0 on the trail row
      (a_tile, b_tile), (h_tile,) = ins, outs
      loaded = [(a_tile[:, r, :].astype(f32), b_tile[:, r, :].astype(f32)) for r in rows]  # loads first
      partial, reach = [], jnp.ones(h.shape, f32)
      for a_r, b_r in loaded:
        h = a_r * h + b_r
        reach = reach * a_r
        partial.append((h, reach))

      def fix_trail(entering):
        for r, (h_r, reach_r) in zip(rows, partial):
          h_tile[:, r, :] = (h_r + reach_r * entering).astype(h_tile.dtype)
        return h + reach * entering
      return split.cross(scratch, h, fix_trail)

    at = lambda ref, **kw: _halves(ref.at[n, :, lanes], chunk, tile, **kw)
    h_last = _stream(body, steps=steps, stages=stages, out_slots=out_slots, ins=[at(a_gmem), at(b_gmem)],
                     outs=[at(h_gmem, output=True)], init=split.start(mask_gmem, h0_gmem.at[n, lanes], scratch),
                     in_place=(1,))  # (h over b)
    split.finish(h_last, scratch, hlast_gmem.at[n, lanes])

  out_type = (jax.ShapeDtypeStruct(a.shape, b.dtype), jax.ShapeDtypeStruct((batch, d), f32))
  return _launch(kernel, out_type, batch, d, interpret, lanes=HALF_WIDTH, scratch=split.scratch)(
      a, b, h0.astype(f32), split.mask)


def bwd_split(a, g, h, h0, g_last, *, reverse: bool, chunk: int, stages: int, b_dtype, out_slots: int = 2,
              interpret: bool = False):
  """``bwd`` (same arguments and results) on 64-lane CTAs, each tile's halves side by side (above);
  ``D`` a multiple of 64, ``chunk`` of 16."""
  batch, time, d = a.shape
  steps, half, f32 = time // chunk, chunk // 2, jnp.float32
  tile = _tile_index(steps, reverse)  # the backward of a forward scan walks time downwards
  rows = range(half) if reverse else range(half - 1, -1, -1)
  split = _Split(lead=0 if reverse else 1, pairs=2)

  def shifted(ref):  # row r of half s holds h_{t∓1} for t = start + s·half + r (a stand-in for h0)
    def moves(i, t):
      start = tile(i) * chunk
      if reverse:
        return [(ref.at[pl.ds(start + 1, half)], t.at[0]),
                (ref.at[pl.ds(start + half + 1, half - 1)], t.at[1, pl.ds(0, half - 1)]),
                (ref.at[pl.ds(jnp.minimum(start + chunk, time - 1), 1)], t.at[1, pl.ds(half - 1, 1)])]
      return [(ref.at[pl.ds(jnp.maximum(start - 1, 0), 1)], t.at[0, pl.ds(0, 1)]),
              (ref.at[pl.ds(start, half - 1)], t.at[0, pl.ds(1, half - 1)]),
              (ref.at[pl.ds(start + half - 1, half)], t.at[1])]
    return _Tile((2, half, ref.shape[-1]), ref.dtype, moves, copies=3)

  def kernel(a_gmem, g_gmem, h_gmem, h0_gmem, glast_gmem, mask_gmem, da_gmem, db_gmem, dh0_gmem, *scratch):
    n, lanes = _block_position(HALF_WIDTH)
    u = split.start(mask_gmem, glast_gmem.at[n, lanes], scratch, pair_gmem=h0_gmem.at[n, lanes])
    h0 = scratch[0][0]  # (h0, h0)

    def body(i, ins, outs, u):  # u: U entering the tile on the lead row, 0 on the trail row
      (a_tile, g_tile, h_tile), (da_tile, db_tile) = ins, outs
      slab = lambda t, r: t[:, r, :].astype(f32)
      loaded = [(slab(a_tile, r), slab(g_tile, r), slab(h_tile, r)) for r in rows]  # loads first
      a_r, g_r, prev = loaded[-1]  # the trail's last row of the last tile reads h0
      # (nested selects: jnp.logical_and emits a bool → bool conversion Mosaic GPU cannot lower)
      at_end = jnp.broadcast_to(i == steps - 1, prev.shape)
      loaded[-1] = (a_r, g_r, jnp.where(at_end, jnp.where(split.is_trail, h0, prev), prev))
      partial, reach = [], jnp.ones(u.shape, f32)
      for a_r, g_r, prev in loaded:
        big_g = g_r + u
        partial.append((big_g, reach, prev))
        u = a_r * big_g
        reach = reach * a_r

      def fix_trail(entering):
        for r, (big_g, reach_r, prev) in zip(rows, partial):
          big_g = big_g + reach_r * entering
          db_tile[:, r, :] = big_g.astype(db_tile.dtype)
          da_tile[:, r, :] = (big_g * prev).astype(da_tile.dtype)
        return u + reach * entering
      return split.cross(scratch, u, fix_trail)

    view = lambda ref: ref.at[n, :, lanes]
    dh0 = _stream(body, steps=steps, stages=stages, out_slots=out_slots,
                  ins=[_halves(view(a_gmem), chunk, tile), _halves(view(g_gmem), chunk, tile), shifted(view(h_gmem))],
                  outs=[_halves(view(da_gmem), chunk, tile, output=True),
                        _halves(view(db_gmem), chunk, tile, output=True)],
                  init=u, in_place=(0, 1))  # (∂a over a, ∂b over ḡ)
    split.finish(dh0, scratch, dh0_gmem.at[n, lanes])

  out_type = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape, b_dtype),
              jax.ShapeDtypeStruct((batch, d), f32))
  return _launch(kernel, out_type, batch, d, interpret, lanes=HALF_WIDTH, scratch=split.scratch)(
      a, g, h, h0.astype(f32), g_last.astype(f32), split.mask)
