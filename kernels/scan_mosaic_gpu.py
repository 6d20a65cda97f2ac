"""The diagonal scan ``h_t = a_t ⊙ h_{t-1} + b_t`` as Mosaic GPU kernels (Hopper and newer).

Same contract as the Triton kernels of ``kernels/scan.py`` (``_gpu_fwd`` / ``_gpu_bwd``), which use
these under ``PallasConfig(gpu_kernel="mosaic")`` (the default on Hopper). The scan is
bandwidth-bound: each lane is a serial chain of FMAs, so what decides its speed is how many bytes are
in flight while the chains run. The Triton kernels can only prefetch by carrying rows through their
time loop in registers (Triton's compile time grows steeply with those) and move ~2.1 TB/s. Here
tiles of ``chunk`` rows × 128 lanes stream through shared memory by TMA, ``stages`` tiles ahead
(``_stream``), and the registers hold the 128-lane state and one tile's rows: 2.4 TB/s forward and
2.2 backward on an H100 (kernels/BENCHMARKS.md, seventh session).

Layout: one CTA (one warpgroup, 128 threads, one lane each) per (batch row, 128 lanes) of a
``[batch, time, D]`` problem; ``D`` a multiple of 128 (the caller pads lanes) and ``time`` of
``chunk`` (``supports``; the caller runs Triton otherwise). The backward reads ``h_{t∓1}``: inside a
tile that is the neighbouring row; for the tile's edge row, the nearest row of the next tile in time
order, fetched as an 8-row block beside each tile (8/chunk more reads of h, mostly from L2, where
the alternative was an XLA copy of h shifted by one row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LANES = 128  # one warpgroup, one lane per thread
EDGE = 8     # rows of the block that supplies a tile's edge row in the backward


def supports(d: int, time: int, chunk: int) -> str | None:
  """Why a ``[batch, time, d]`` problem cannot run on these kernels as given (None: it can)."""
  if d % LANES:
    return f"D={d} is not a multiple of {LANES}"
  if chunk % EDGE or chunk > 256:
    return f"chunk={chunk} must be a multiple of {EDGE} and at most 256 (a TMA box)"
  if time % chunk:
    return f"time={time} is not a multiple of chunk={chunk}"
  return None


SMEM_BUDGET = 226 * 1024  # of the H100's 227 KB per block (Mosaic adds only the barriers)


def fit_stages(chunk: int, in_dtypes, out_dtypes, *, edge: bool, out_slots: int = 2, most: int = 8) -> int:
  """The most pipeline stages (≤ ``most``) whose buffers fit ``SMEM_BUDGET``: ``stages`` slots per
  input tile (and edge block), ``out_slots`` per output tile."""
  row = lambda dtypes: sum(LANES * jnp.dtype(t).itemsize for t in dtypes)
  per_stage = chunk * row(in_dtypes) + (EDGE * row(in_dtypes[-1:]) if edge else 0)
  fixed = out_slots * chunk * row(out_dtypes) + 2 * LANES * 4
  return max(2, min(most, (SMEM_BUDGET - fixed) // per_stage))


def _tile_index(steps: int, ascending: bool):
  return (lambda i: i) if ascending else (lambda i: steps - 1 - i)


def _stream(body, *, steps: int, stages: int, out_slots: int, ins, outs, init, in_place=()):
  """Runs ``carry = body(i, in_tiles, out_tiles, carry)`` for i in 0 … steps − 1, with the input tiles
  of step i loaded by TMA ``stages`` steps ahead and the output tiles stored behind it.

  ``ins`` / ``outs``: ``(gmem_ref [rows_total, LANES], rows, block(i))`` — step i reads / writes rows
  ``[block(i)·rows, (block(i) + 1)·rows)``. ``out_slots``: 2 double-buffers the output tiles; 1
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
        src, rows, block = ins[j]
        plgpu.copy_gmem_to_smem(src.at[pl.ds(block(i) * rows, rows)], in_bufs[j].at[slot],
                                barriers.at[slot])

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
      for (dst, rows, block), tile in zip(outs, out_tiles):
        plgpu.copy_smem_to_gmem(tile, dst.at[pl.ds(block(i) * rows, rows)], commit_group=False)
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

  smem = lambda refs, slots: [plgpu.SMEM((slots, rows, LANES), ref.dtype) for ref, rows, _ in refs]
  out_smem = smem(outs, out_slots) if out_slots else []
  return pl.run_scoped(lambda *refs: scoped(refs[:len(ins)], refs[len(ins):-1], refs[-1]),
                       *smem(ins, stages), *out_smem,
                       plgpu.Barrier(num_arrivals=len(ins), num_barriers=stages))


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


def _launch(kernel, out_type, batch: int, d: int, interpret: bool):
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(batch, d // LANES), grid_names=("batch", "lanes"),
      scratch_types=[plgpu.SMEM((2, LANES), jnp.float32), plgpu.Barrier(num_barriers=2)],
      interpret=_interpret_params() if interpret else None)


def _block_position():
  n = jax.lax.axis_index("batch")
  lanes = pl.ds(jax.lax.axis_index("lanes") * LANES, LANES)
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
      # ~90 cycles of shared-memory latency per row (0.21 ms here against Triton's 0.19).
      a_rows = [a_tile[r].astype(jnp.float32) for r in rows]
      b_rows = [b_tile[r].astype(jnp.float32) for r in rows]
      for r, a_r, b_r in zip(rows, a_rows, b_rows):
        h = a_r * h + b_r
        h_tile[r] = h.astype(h_tile.dtype)
      return h

    at = lambda ref: (ref.at[n, :, lanes], chunk, tile)
    h_last = _stream(body, steps=steps, stages=stages, out_slots=out_slots, ins=[at(a_gmem), at(b_gmem)],
                     outs=[at(h_gmem)], init=h0, in_place=(1,))  # (h over b)
    _store_vector(h_last, vec_smem, hlast_gmem.at[n, lanes])

  out_type = (jax.ShapeDtypeStruct(a.shape, b.dtype), jax.ShapeDtypeStruct((batch, d), jnp.float32))
  return _launch(kernel, out_type, batch, d, interpret)(a, b, h0.astype(jnp.float32))


def bwd(a, g, h, h0, g_last, *, reverse: bool, chunk: int, stages: int, b_dtype, out_slots: int = 2,
        interpret: bool = False):
  """``(∂a, ∂b, ∂h0)`` of the scan from the forward output ``h`` and cotangents ``g``, ``g_last``.

  Runs against the forward's direction with ``U`` (what flows into ``h_{t∓1}``), as ``scan.py``'s
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

    at = lambda ref: (ref.at[n, :, lanes], chunk, tile)
    edges = (h_gmem.at[n, :, lanes], EDGE, edge_block)
    dh0 = _stream(body, steps=steps, stages=stages, out_slots=out_slots,
                  ins=[at(a_gmem), at(g_gmem), at(h_gmem), edges], outs=[at(da_gmem), at(db_gmem)],
                  init=g_last, in_place=(0, 1))  # (∂a over a, ∂b over ḡ)
    _store_vector(dh0, vec_smem, dh0_gmem.at[n, lanes])

  out_type = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape, b_dtype),
              jax.ShapeDtypeStruct((batch, d), jnp.float32))
  return _launch(kernel, out_type, batch, d, interpret)(a, g, h, h0.astype(jnp.float32),
                                                        g_last.astype(jnp.float32))
