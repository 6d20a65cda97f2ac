"""Sliding-window flash attention as Mosaic GPU kernels (Hopper and newer: TMA and wgmma).

The same computation as ``kernels/window_attention/pallas.py``'s Triton kernels (Dao 2023's online softmax over the
key blocks of the band ``0 ≤ t − s < window``, and the two-kernel backward), with the same residuals
(``o [batch, time, heads, dim]`` and ``lse [batch, heads, time]``, the base-2 log-sum-exp of the
scaled logits), so either backward takes either forward. Only the tensor-core path differs. Triton's
dots on Hopper are synchronous, and the softmax waits on them. Here each CTA is three warpgroups:
two compute warpgroups own 64 rows each and issue their products as wgmma from shared memory; a
memory warpgroup streams the band's blocks by TMA, ``stages`` blocks ahead, into slots the compute
warpgroups free once their products have read them. Each compute warpgroup runs only the blocks its
own 64 rows reach (``own_band``). The forward is persistent: one CTA per SM loops over the (query
block, head, batch) tiles, so the next tile's keys stream in while the last tile's outputs are stored.

Packed documents (``doc_start`` / ``doc_end``, see ``pallas.document_bounds``): each warpgroup reads
its rows' document bounds from global memory into registers and masks every block of the band (which
is streamed as without documents). With ``skip_outside_documents`` the band is cut instead to the
blocks that meet the tile's documents (``band._document_key_blocks`` / ``_document_query_blocks``,
from the first and last row's bound, read as scalars from global memory by every warpgroup, the
memory one included, so all three count the same blocks per tile), and only the blocks a boundary or
the band's edge cuts are masked (``PallasBlocks.mgpu_skip_outside_documents``, the default; checked
against the reference on an H100).

Causal and GQA/MQA (a query head reads key/value head ``h // group``); no soft-cap, 16-bit inputs,
``dim`` a multiple of 64 up to 128, ``time`` a multiple of 128 (``supports``; the caller runs Triton
otherwise). Mosaic GPU's interpreter has no wgmma: these kernels run on a GPU only (the CPU tests
build them for CUDA; the GPU benchmark checks them against the reference before timing them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.dispatch import gpu_sm_count
from kernels.pallas_compat import mgpu_load
from kernels.tiling import swizzled as _swizzled
from kernels.window_attention.band import (_band_loops, _document_key_blocks, _document_query_blocks, _key_blocks,
                                           _query_blocks)

BLOCK_Q = 64  # query rows per compute warpgroup (one wgmma's M)
CTA_ROWS = 2 * BLOCK_Q
_LOG2E = math.log2(math.e)
SMEM_BUDGET = 226 * 1024  # of the H100's 227 KB per block
_MASKED = -1e30  # finite: a row whose keys are all masked in a block keeps alpha = 1 and p = 0


def supports(q, k, softcap) -> str | None:
  """Why this kernel cannot run the call (None: it can)."""
  if softcap is not None:
    return "no soft-cap"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f"needs bfloat16 or float16 q, k, v (got {q.dtype})"
  if q.shape[-1] % 64 or q.shape[-1] > 128:
    return f"needs head_dim a multiple of 64 up to 128 (got {q.shape[-1]})"
  if q.shape[1] % CTA_ROWS:
    return f"needs time a multiple of {CTA_ROWS} (got {q.shape[1]})"
  return None


def _own_band(cta_bounds, own_bounds, step, skip, carry):
  """``step`` over this warpgroup's own band (``_band_loops``), ``skip(j)`` over the CTA's other blocks.

  The memory warpgroup streams the band of the CTA's 128 rows; with 64-row blocks each warpgroup's 64
  rows need one block fewer (the first or the last). A skipped block still waits on its slot (barrier
  phases are counted per thread) and releases it, without a product.
  """
  def skip_range(start, stop):
    jax.lax.fori_loop(start, stop, lambda j, _: skip(j), None)
  skip_range(cta_bounds[0], own_bounds[0])
  carry = _band_loops(own_bounds, step, carry, True)
  skip_range(own_bounds[-1], cta_bounds[-1])
  return carry


def _tile_key_blocks(q_start, rows: int, block_kv: int, window: int, starts_ref=None, b=None):
  """Key blocks ``(lo, full_lo, full_hi, hi)`` of query rows ``[q_start, q_start + rows)``; given
  ``starts_ref`` (``doc_start [batch, time]`` in global memory) and the row of the batch ``b``, only
  those that meet the rows' documents (two scalar loads: starts never decrease along a row)."""
  bounds = _key_blocks(q_start, rows, block_kv, window)
  if starts_ref is None:
    return bounds
  return _document_key_blocks(bounds, starts_ref[b, q_start], starts_ref[b, q_start + (rows - 1)], block_kv)


def _tile_query_blocks(k_start, rows: int, block_q: int, window: int, n_q_blocks: int, ends_ref=None, b=None):
  """Query blocks ``(lo, full_lo, full_hi, hi)`` that read key rows ``[k_start, k_start + rows)``;
  given ``ends_ref`` (``doc_end [batch, time]``) and ``b``, only those that meet the keys' documents."""
  bounds = _query_blocks(k_start, block_q, rows, window, n_q_blocks)
  if ends_ref is None:
    return bounds
  return _document_query_blocks(bounds, ends_ref[b, k_start], ends_ref[b, k_start + (rows - 1)], block_q)


def _tiles(n_tiles: int, ctas: int, blocks: int, heads: int):
  """This CTA's tile count and ``tile(i)``: its i-th tile's (batch, head, first row), tiles being
  (block of CTA_ROWS rows, head, batch) with the row block fastest, taken ``cta, cta + ctas, …``."""
  cta = jax.lax.axis_index("ctas")

  def tile(i):
    t = cta + i * ctas
    rest = jax.lax.div(t, jnp.int32(blocks))
    return jax.lax.div(rest, jnp.int32(heads)), jax.lax.rem(rest, jnp.int32(heads)), jax.lax.rem(t, jnp.int32(blocks)) * CTA_ROWS
  return jax.lax.div(n_tiles - 1 - cta, jnp.int32(ctas)) + 1, tile


def _ctas(n_tiles: int, persistent: bool) -> int:
  """CTAs of the grid: one per SM, each looping over tiles (``persistent``), or one per tile."""
  return min(n_tiles, gpu_sm_count()) if persistent else n_tiles


def _store_tile(stores):
  """This tile's results, ``(value, shared buffer, global destination)`` triples, out by TMA through
  their own buffers once the previous tile's stores have read them (a persistent CTA reuses them)."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  for value, smem, _ in stores:
    smem[...] = value
  plgpu.commit_smem()
  for _, smem, gmem in stores:
    plgpu.copy_smem_to_gmem(smem, gmem, commit_group=False)
  plgpu.commit_smem_to_gmem_group()


def forward(q, k, v, *, window: int, scale: float, block_kv: int = 128, stages: int = 2,
            pingpong: bool = False, own_band: bool = True, softmax_fence: bool = True, persistent: bool = True,
            doc_start=None, skip_outside_documents: bool = False):
  """``(o, lse)`` of causal attention over the band of ``window`` keys (see the module docstring).

  q: ``[batch, time, heads, dim]``; k, v: ``[batch, time, kv_heads, dim]``. ``pingpong``: the two
  compute warpgroups meet at a barrier twice a step, half a step apart, so that one issues its
  products while the other runs its softmax (FlashAttention-3's inter-warpgroup schedule).
  ``own_band``: each compute warpgroup skips the key blocks its own 64 rows do not reach (one of
  the CTA's blocks when ``block_kv`` is 64). ``softmax_fence``: an optimization barrier ends the
  softmax before the warpgroup hands over the tensor cores, so its instructions are not scheduled
  past that point. ``persistent``: one CTA per SM loops over the (query block, head, batch) tiles;
  its memory warpgroup streams the next tile's keys while the compute warpgroups finish the last
  one, and each loads its next rows of Q once its last product has read the current ones.
  ``doc_start``: None, or int32 ``[batch, time]``, each position's document start (packed
  documents): each warpgroup reads its rows' starts from global memory into registers (64 words a
  tile, no shared memory or barrier) and masks every block of its band with ``key ≥ start``; the
  streamed band is the same as without documents. ``skip_outside_documents`` (with ``doc_start``):
  the band of each tile (the memory warpgroup's stream and each compute warpgroup's own band)
  starts at the block of its first row's document start instead, and only blocks that a boundary
  or the band's edge cuts are masked; a CTA's blocks per tile then vary, and all three warpgroups
  count them from the same two starts.
  """
  batch, time, heads, dim = q.shape
  group = heads // k.shape[2]
  dtype = q.dtype
  c = scale * _LOG2E
  f32 = jnp.float32
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = wgmma_layout.reduce(1)
  blocks = time // CTA_ROWS
  n_tiles = blocks * heads * batch
  ctas = _ctas(n_tiles, persistent)

  documents = doc_start is not None
  cut = documents and skip_outside_documents

  def kernel(q_ref, k_ref, v_ref, starts_ref, o_ref, lse_ref, scoped):
    (q_smem, o_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
    wg = jax.lax.axis_index("wg")
    n_mine, tile_at = _tiles(n_tiles, ctas, blocks, heads)
    cut_ref = starts_ref if cut else None  # the band narrowed to the documents (read per tile)

    def meet():  # both compute warpgroups arrive; each goes on once the other has
      if pingpong:
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      own_q, own_o, own_lse = q_smem.at[wg], o_smem.at[wg], lse_smem.at[wg]

      def load_q(i):
        b, h, q_cta = tile_at(i)
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_cta + wg * BLOCK_Q, BLOCK_Q), h], own_q, q_ready.at[wg])

      def hand_over(slot):  # done with the softmax; wait for the values and for the tensor cores' turn
        if pingpong:
          plgpu.barrier_arrive(turn)
          plgpu.barrier_wait(v_ready.at[slot])
          plgpu.barrier_wait(turn)
        else:
          plgpu.barrier_wait(v_ready.at[slot])

      def one_tile(i, base):  # base: blocks streamed before this tile (slots turn over across tiles)
        b, h, q_cta = tile_at(i)
        bounds = _tile_key_blocks(q_cta, CTA_ROWS, block_kv, window, cut_ref, b)
        lo, hi = bounds[0], bounds[-1]
        q_start = q_cta + wg * BLOCK_Q
        own_bounds = _tile_key_blocks(q_start, BLOCK_Q, block_kv, window, cut_ref, b) if own_band else bounds
        slot_of = lambda j: jax.lax.rem(base + j - lo, stages)
        plgpu.barrier_wait(q_ready.at[wg])
        starts = None
        if documents:
          if not cut:  # a boundary may cut any block of the band: every step masks
            own_bounds = _all_masked(own_bounds)
          starts = mgpu_load(starts_ref.at[b, pl.ds(q_start, BLOCK_Q)], row_layout, optimized=False)

        def skip(j):
          slot = slot_of(j)
          plgpu.barrier_wait(k_ready.at[slot])
          meet()
          plgpu.barrier_arrive(k_free.at[slot])
          hand_over(slot)
          plgpu.barrier_arrive(v_free.at[slot])

        def step(j, carry, masked: bool):
          acc, m, l = carry
          slot = slot_of(j)
          plgpu.barrier_wait(k_ready.at[slot])

          def scores(acc_ref):
            plgpu.wgmma(acc_ref, own_q, k_smem.at[slot].T)
            meet()  # (the product runs on while the other warpgroup takes its turn)
            return acc_ref[...]
          s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, block_kv), f32))
          plgpu.barrier_arrive(k_free.at[slot])

          @pl.when(j == own_bounds[-1] - 1)  # this tile's rows of Q are read for the last time
          def _():
            pl.when(i + 1 < n_mine)(lambda: load_q(i + 1))
          if masked:
            s = _masked(s, q_start, j * block_kv, window, keys_first=False, bound=starts)
          m_new = jnp.maximum(m, s.max(axis=1) * c)
          alpha = jnp.exp2(m - m_new)
          p = jnp.exp2(s * c - jax.lax.broadcast_in_dim(m_new, s.shape, [0]))
          l = l * alpha + p.sum(axis=1)
          acc = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0])
          p = p.astype(dtype)
          if softmax_fence:
            acc, m_new, l, p = jax.lax.optimization_barrier((acc, m_new, l, p))
          hand_over(slot)

          def values(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem.at[slot])
          acc = pl.run_state(values)(plgpu.ACC.init(acc))
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m_new, l

        carry = (plgpu.layout_cast(jnp.zeros((BLOCK_Q, dim), f32), wgmma_layout),
                 plgpu.layout_cast(jnp.full((BLOCK_Q,), _MASKED, f32), row_layout),
                 plgpu.layout_cast(jnp.zeros((BLOCK_Q,), f32), row_layout))
        # masked edge, unmasked interior, masked diagonal
        acc, m, l = _own_band(bounds, own_bounds, step, skip, carry)
        _store_tile([((acc / jax.lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype), own_o,
                      o_ref.at[b, pl.ds(q_start, BLOCK_Q), h]),
                     (m + jnp.log(l) * _LOG2E, own_lse, lse_ref.at[b, h, pl.ds(q_start, BLOCK_Q)])])  # log₂ l
        return base + hi - lo

      load_q(0)
      pl.when(wg == 1)(meet)  # half a step behind warpgroup 0
      jax.lax.fori_loop(0, n_mine, one_tile, jnp.int32(0))
      pl.when(wg == 0)(meet)  # (the matching last meeting)
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      _stream_key_blocks(n_mine, tile_at, block_kv=block_kv, window=window, group=group, kv_refs=(k_ref, v_ref),
                         kv_slots=(k_smem, v_smem), stages=stages, barriers=((k_ready, k_free), (v_ready, v_free)),
                         starts_ref=cut_ref)

  def entry(*refs):
    (q_ref, k_ref, v_ref), starts_ref, (o_ref, lse_ref) = refs[:3], (refs[3] if documents else None), refs[-2:]
    smem = [_swizzled((2, BLOCK_Q, dim), dtype), _swizzled((2, BLOCK_Q, dim), dtype),
            _swizzled((stages, block_kv, dim), dtype), _swizzled((stages, block_kv, dim), dtype),
            plgpu.SMEM((2, BLOCK_Q), f32)]
    ready = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2))
    free = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
    pl.run_scoped(lambda *scoped: kernel(q_ref, k_ref, v_ref, starts_ref, o_ref, lse_ref, scoped),
                  smem, ready, free, plgpu.Barrier(num_arrivals=2), collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, heads, time), f32))
  return _kernel_call(entry, out_type, (ctas,), ("ctas",))(q, k, v, *([doc_start] if documents else []))


# --- backward ---------------------------------------------------------------------------------------
# Two kernels, as the Triton backward, each CTA again two compute warpgroups of 64 rows and a memory
# warpgroup that streams the other side's blocks (``_stream_blocks``) through ``stages`` slots:
#   dK/dV  per 128 keys of one kv head: its 64 keys' rows resident per warpgroup; streams every query
#          head of the group × the band's 64-query blocks (q, dO, lse, Δ). With p = exp2(s·c − lse)
#          (transposed tiles: keys × queries, so lse and Δ broadcast along rows):
#          dV += pᵀ dO,  dpᵀ = V dOᵀ,  dsᵀ = pᵀ ⊙ (dpᵀ − Δ),  dK += scale · dsᵀ Q.
#   dQ     per 128 queries of one head: Q and dO resident; streams the band's key/value blocks:
#          dp = dO Vᵀ,  ds = p ⊙ (dp − Δ),  dQ += scale · ds K.
# Δ = rowsum(O ⊙ dO) comes from XLA. Every product reads shared memory and completes before its slot is
# released (its result is read), so the two warpgroups free a slot with one arrival each.

def _stream_blocks(base, steps, stages: int, copies, barriers):
  """The memory warpgroup: step i's copies into slot ``(base + i) % stages`` (``base``: blocks
  streamed before, by this CTA's earlier tiles). ``barriers``: (ready, free) pairs of slot barriers;
  ``copies(i, slot)`` gives one list of (source, destination) pairs per pair, each issued once both
  compute warpgroups have released that pair's slot (the forward frees K before V). Returns
  ``base + steps``."""
  def fetch(i, _):
    index = base + i
    slot = jax.lax.rem(index, stages)
    for (ready, free), pairs in zip(barriers, copies(i, slot)):
      @pl.when(index >= stages)
      def _():
        plgpu.barrier_wait(free.at[slot])
      for src, dst in pairs:
        plgpu.copy_gmem_to_smem(src, dst, ready.at[slot])
  jax.lax.fori_loop(0, steps, fetch, None)
  return base + steps


def _stream_key_blocks(n_mine, tile_at, *, block_kv: int, window: int, group: int, kv_refs, kv_slots,
                       stages: int, barriers, starts_ref=None):
  """The memory warpgroup of a query-block kernel (forward, dQ): for each of this CTA's tiles, the
  key and value blocks of its band (of kv head ``h // group``) into ``kv_slots``. ``barriers``: one
  (ready, free) pair for K and V together, or one each. ``starts_ref``: the band cut to the tile's
  documents (``_tile_key_blocks``, as its compute warpgroups cut it)."""
  def one_tile(i, base):
    b, h, q_cta = tile_at(i)
    lo, *_, hi = _tile_key_blocks(q_cta, CTA_ROWS, block_kv, window, starts_ref, b)
    kv_head = jax.lax.div(h, jnp.int32(group))

    def copies(i, slot):
      rows = (b, pl.ds((lo + i) * block_kv, block_kv), kv_head)
      pairs = [(ref.at[rows], buf.at[slot]) for ref, buf in zip(kv_refs, kv_slots)]
      return [pairs] if len(barriers) == 1 else [[pair] for pair in pairs]
    return _stream_blocks(base, hi - lo, stages, copies, barriers)
  jax.lax.fori_loop(0, n_mine, one_tile, jnp.int32(0))


def _masked(scores, rows, cols, window: int, *, keys_first: bool, bound=None):
  """``scores`` with −inf outside the band ``0 ≤ t − s < window`` (rows, cols: traced offsets) and,
  given the rows' document ``bound`` (int32, the row layout), outside their documents: queries on
  rows, ``bound`` = their ``doc_start`` and key ``cols + j ≥ bound``; keys on rows (``keys_first``),
  ``bound`` = their ``doc_end`` and query ``cols + j < bound`` (causality given by the band)."""
  iota = lambda d: plgpu.broadcasted_iota(jnp.int32, scores.shape, d, layout=plgpu.Layout.WGMMA)
  offset = (iota(0) + rows) - (iota(1) + cols)  # t − s, or s − t for key-major tiles
  if keys_first:
    offset = -offset
  # (nested selects: a bool & bool is a conversion the Mosaic GPU lowering rejects)
  scores = jnp.where(offset >= 0, jnp.where(offset < window, scores, -jnp.inf), -jnp.inf)
  if bound is None:
    return scores
  col, bound = iota(1) + cols, jax.lax.broadcast_in_dim(bound, scores.shape, [0])
  return jnp.where(col < bound, scores, -jnp.inf) if keys_first else jnp.where(col >= bound, scores, -jnp.inf)


def _all_masked(bounds):
  """``(lo, full_lo, full_hi, hi)`` with no unmasked interior: ``_band_loops`` masks every block."""
  lo, *_, hi = bounds
  return lo, hi, hi, hi


def _kernel_call(body, out_type, grid, grid_names):
  return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=3, thread_name="wg",
                      compiler_params=plgpu.CompilerParams(approx_math=True))


def _resident_tiles(n_mine, load_own, one_tile):
  """A backward compute warpgroup's loop over its CTA's tiles. ``one_tile(i, base)`` returns the
  stream position after tile i and its ``_store_tile`` triples; the next tile's resident rows
  (``load_own(i + 1)``) load while those go out."""
  def body(i, base):
    base, stores = one_tile(i, base)
    pl.when(i + 1 < n_mine)(lambda: load_own(i + 1))
    _store_tile(stores)
    return base
  load_own(0)
  jax.lax.fori_loop(0, n_mine, body, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, o, lse, do, *, window: int, scale: float, block_q: int = 64, block_kv: int = 64,
             stages: int = 2, own_band: bool = True, persistent: bool = False, doc_start=None, doc_end=None,
             skip_outside_documents: bool = False):
  """``(dq, dk, dv)`` from the forward's ``o`` and ``lse`` (see the section comment); shapes as ``forward``.

  ``own_band`` and ``persistent`` as ``forward``'s: each warpgroup skips the blocks its 64 rows do not
  reach; one CTA per SM loops over the tiles, loading the next tile's resident rows while it stores
  the last one's gradients (from their own shared-memory buffers). Persistence, unlike in the
  forward, did not speed the backward up on an H100 (kernels/BENCHMARKS.md).
  ``doc_start``, ``doc_end`` (packed documents; both or neither): int32 ``[batch, time]``, each
  position's document start and end. Each kernel reads them for its resident rows from global
  memory into registers (dK/dV: its keys' ends, masking query ``< end``; dQ: its queries' starts,
  masking key ``≥ start``) and masks every block it visits. ``skip_outside_documents`` (with
  documents): as ``forward``'s, the dQ kernel's key blocks start at its tile's first document start,
  and the dK/dV kernel's query blocks (per query head of the group) end at the block of its tile's
  last document end; only blocks a boundary or the band's edge cuts are masked.
  """
  batch, time, heads, dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  dtype = q.dtype
  c = scale * _LOG2E
  f32 = jnp.float32
  wgmma_layout = plgpu.Layout.WGMMA
  delta = jnp.einsum("bthd,bthd->bht", o.astype(f32), do.astype(f32))
  blocks = time // CTA_ROWS
  tile_bytes = BLOCK_Q * dim * q.dtype.itemsize
  # dQ keeps Q, dO and its output rows resident beside its key/value slots: as many slots as fit (≥ 2).
  documents = doc_start is not None
  if documents != (doc_end is not None):
    raise ValueError("window_attention_mgpu.backward: pass both doc_start and doc_end, or neither")
  cut = documents and skip_outside_documents
  dq_stages = max(2, min(stages, (SMEM_BUDGET - 6 * tile_bytes - 2 * 2 * BLOCK_Q * 4) // (2 * block_kv * dim * q.dtype.itemsize)))
  dkv_tiles, dq_tiles = blocks * kv_heads * batch, blocks * heads * batch
  dkv_ctas, dq_ctas = _ctas(dkv_tiles, persistent), _ctas(dq_tiles, persistent)

  def dkv_body(*refs):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (dk_ref, dv_ref) = refs[:6], refs[-2:]
    ends_ref = refs[6] if documents else None

    def kernel(*scoped):
      (k_res, v_res, dk_out, dv_out, q_s, do_s, lse_s, delta_s), (ready, free, own) = scoped
      wg = jax.lax.axis_index("wg")
      n_mine, tile_at = _tiles(dkv_tiles, dkv_ctas, blocks, kv_heads)
      cut_ref = ends_ref if cut else None  # the band narrowed to the documents (read per tile)

      def tile_bounds(i):  # (the compute and memory warpgroups' shared count of the tile's blocks)
        b, kv_head, k_cta = tile_at(i)
        bounds = _tile_query_blocks(k_cta, CTA_ROWS, block_q, window, time // block_q, cut_ref, b)
        return b, kv_head, k_cta, bounds, bounds[-1] - bounds[0]

      @pl.when(wg < 2)
      def _compute():
        plgpu.set_max_registers(240, action="increase")

        def load_own(i):
          b, kv_head, k_cta = tile_at(i)
          rows = (b, pl.ds(k_cta + wg * BLOCK_Q, BLOCK_Q), kv_head)
          plgpu.copy_gmem_to_smem(k_ref.at[rows], k_res.at[wg], own.at[wg])
          plgpu.copy_gmem_to_smem(v_ref.at[rows], v_res.at[wg], own.at[wg])

        def one_tile(i, base):
          b, kv_head, k_cta, bounds, per_head = tile_bounds(i)
          lo = bounds[0]
          k_start = k_cta + wg * BLOCK_Q
          rows = (b, pl.ds(k_start, BLOCK_Q), kv_head)
          own_bounds = (_tile_query_blocks(k_start, BLOCK_Q, block_q, window, time // block_q, cut_ref, b)
                        if own_band else bounds)
          plgpu.barrier_wait(own.at[wg])
          ends = None
          if documents:
            if not cut:  # a boundary may cut any block of the band: every step masks
              own_bounds = _all_masked(own_bounds)
            ends = mgpu_load(ends_ref.at[b, pl.ds(k_start, BLOCK_Q)], wgmma_layout.reduce(1), optimized=False)

          def step(qb, carry, g, masked: bool):
            dk, dv = carry
            slot = jax.lax.rem(base + g * per_head + qb - lo, stages)
            plgpu.barrier_wait(ready.at[slot])

            def scores(acc_ref):
              plgpu.wgmma(acc_ref, k_res.at[wg], q_s.at[slot].T)
              return acc_ref[...]
            s_t = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, block_q), f32))
            if masked:
              s_t = _masked(s_t, k_start, qb * block_q, window, keys_first=True, bound=ends)
            lse_t = mgpu_load(lse_s.at[slot], wgmma_layout.reduce(0))
            p_t = jnp.exp2(s_t * c - jax.lax.broadcast_in_dim(lse_t, s_t.shape, [1]))

            def values(refs):
              dv_ref_acc, dp_ref_acc = refs
              plgpu.wgmma(dv_ref_acc, p_t.astype(dtype), do_s.at[slot])
              plgpu.wgmma(dp_ref_acc, v_res.at[wg], do_s.at[slot].T)
            zeros = plgpu.layout_cast(jnp.zeros(s_t.shape, f32), wgmma_layout)
            dv, dp_t = pl.run_state(values)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
            delta_t = mgpu_load(delta_s.at[slot], wgmma_layout.reduce(0))
            ds_t = p_t * (dp_t - jax.lax.broadcast_in_dim(delta_t, s_t.shape, [1]))

            def keys(acc_ref):
              plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_s.at[slot])
            dk = pl.run_state(keys)(plgpu.ACC.init(dk))
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

          def skip(qb, g):
            slot = jax.lax.rem(base + g * per_head + qb - lo, stages)
            plgpu.barrier_wait(ready.at[slot])
            plgpu.barrier_arrive(free.at[slot])

          def one_head(g, carry):
            return _own_band(bounds, own_bounds, lambda qb, cr, masked: step(qb, cr, g, masked),
                             lambda qb: skip(qb, g), carry)

          zeros = plgpu.layout_cast(jnp.zeros((BLOCK_Q, dim), f32), wgmma_layout)
          dk, dv = jax.lax.fori_loop(0, group, one_head, (zeros, zeros))
          return base + group * per_head, [((dk * scale).astype(dtype), dk_out.at[wg], dk_ref.at[rows]),
                                           (dv.astype(dtype), dv_out.at[wg], dv_ref.at[rows])]

        _resident_tiles(n_mine, load_own, one_tile)

      @pl.when(wg == 2)
      def _memory():
        plgpu.set_max_registers(24, action="decrease")

        def one_tile(i, base):
          b, kv_head, _, bounds, per_head = tile_bounds(i)
          lo = bounds[0]

          def copies(i, slot):
            h = kv_head * group + jax.lax.div(i, per_head)
            start = (lo + jax.lax.rem(i, per_head)) * block_q
            rows = (b, pl.ds(start, block_q), h)
            vec = (b, h, pl.ds(start, block_q))
            return [[(q_ref.at[rows], q_s.at[slot]), (do_ref.at[rows], do_s.at[slot]),
                     (lse_ref.at[vec], lse_s.at[slot]), (delta_ref.at[vec], delta_s.at[slot])]]
          return _stream_blocks(base, group * per_head, stages, copies, ((ready, free),))
        jax.lax.fori_loop(0, n_mine, one_tile, jnp.int32(0))

    rows_smem = _swizzled((2, BLOCK_Q, dim), dtype)
    pl.run_scoped(kernel, (rows_smem, rows_smem, rows_smem, rows_smem,
                           _swizzled((stages, block_q, dim), dtype), _swizzled((stages, block_q, dim), dtype),
                           plgpu.SMEM((stages, block_q), f32), plgpu.SMEM((stages, block_q), f32)),
                  (plgpu.Barrier(num_arrivals=4, num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                   plgpu.Barrier(num_arrivals=2, num_barriers=2)),
                  collective_axes="wg")

  def dq_body(*refs):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), dq_ref = refs[:6], refs[-1]
    starts_ref = refs[6] if documents else None

    def kernel(*scoped):
      (q_res, do_res, dq_out, vec_s, k_s, v_s), (ready, free, own) = scoped
      wg = jax.lax.axis_index("wg")
      n_mine, tile_at = _tiles(dq_tiles, dq_ctas, blocks, heads)
      cut_ref = starts_ref if cut else None  # the band narrowed to the documents (read per tile)

      @pl.when(wg < 2)
      def _compute():
        plgpu.set_max_registers(240, action="increase")
        row = wgmma_layout.reduce(1)

        def load_own(i):
          b, h, q_cta = tile_at(i)
          q_start = q_cta + wg * BLOCK_Q
          rows, vec = (b, pl.ds(q_start, BLOCK_Q), h), (b, h, pl.ds(q_start, BLOCK_Q))
          for src, dst in ((q_ref.at[rows], q_res.at[wg]), (do_ref.at[rows], do_res.at[wg]),
                           (lse_ref.at[vec], vec_s.at[wg, 0]), (delta_ref.at[vec], vec_s.at[wg, 1])):
            plgpu.copy_gmem_to_smem(src, dst, own.at[wg])

        def one_tile(i, base):
          b, h, q_cta = tile_at(i)
          bounds = _tile_key_blocks(q_cta, CTA_ROWS, block_kv, window, cut_ref, b)
          lo, hi = bounds[0], bounds[-1]
          q_start = q_cta + wg * BLOCK_Q
          own_bounds = _tile_key_blocks(q_start, BLOCK_Q, block_kv, window, cut_ref, b) if own_band else bounds
          plgpu.barrier_wait(own.at[wg])
          lse_q, delta_q = mgpu_load(vec_s.at[wg, 0], row), mgpu_load(vec_s.at[wg, 1], row)
          starts = None
          if documents:
            if not cut:  # a boundary may cut any block of the band: every step masks
              own_bounds = _all_masked(own_bounds)
            starts = mgpu_load(starts_ref.at[b, pl.ds(q_start, BLOCK_Q)], row, optimized=False)

          def step(j, dq, masked: bool):
            slot = jax.lax.rem(base + j - lo, dq_stages)
            plgpu.barrier_wait(ready.at[slot])

            def products(refs):
              s_ref, dp_ref = refs
              plgpu.wgmma(s_ref, q_res.at[wg], k_s.at[slot].T)
              plgpu.wgmma(dp_ref, do_res.at[wg], v_s.at[slot].T)
            zeros = plgpu.layout_cast(jnp.zeros((BLOCK_Q, block_kv), f32), wgmma_layout)
            s, dp = pl.run_state(products)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
            if masked:
              s = _masked(s, q_start, j * block_kv, window, keys_first=False, bound=starts)
            p = jnp.exp2(s * c - jax.lax.broadcast_in_dim(lse_q, s.shape, [0]))
            ds = p * (dp - jax.lax.broadcast_in_dim(delta_q, s.shape, [0]))

            def queries(acc_ref):
              plgpu.wgmma(acc_ref, ds.astype(dtype), k_s.at[slot])
            dq = pl.run_state(queries)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(free.at[slot])
            return dq

          def skip(j):
            slot = jax.lax.rem(base + j - lo, dq_stages)
            plgpu.barrier_wait(ready.at[slot])
            plgpu.barrier_arrive(free.at[slot])

          dq = _own_band(bounds, own_bounds, step, skip,
                         plgpu.layout_cast(jnp.zeros((BLOCK_Q, dim), f32), wgmma_layout))
          return base + hi - lo, [((dq * scale).astype(dtype), dq_out.at[wg], dq_ref.at[b, pl.ds(q_start, BLOCK_Q), h])]

        _resident_tiles(n_mine, load_own, one_tile)

      @pl.when(wg == 2)
      def _memory():
        plgpu.set_max_registers(24, action="decrease")

        _stream_key_blocks(n_mine, tile_at, block_kv=block_kv, window=window, group=group, kv_refs=(k_ref, v_ref),
                           kv_slots=(k_s, v_s), stages=dq_stages, barriers=((ready, free),), starts_ref=cut_ref)

    rows_smem = _swizzled((2, BLOCK_Q, dim), dtype)
    pl.run_scoped(kernel, (rows_smem, rows_smem, rows_smem, plgpu.SMEM((2, 2, BLOCK_Q), f32),
                           _swizzled((dq_stages, block_kv, dim), dtype), _swizzled((dq_stages, block_kv, dim), dtype)),
                  (plgpu.Barrier(num_arrivals=2, num_barriers=dq_stages),
                   plgpu.Barrier(num_arrivals=2, num_barriers=dq_stages), plgpu.Barrier(num_arrivals=4, num_barriers=2)),
                  collective_axes="wg")

  args = (q, k, v, do, lse, delta)
  kv_shape = jax.ShapeDtypeStruct(k.shape, dtype)
  dk, dv = _kernel_call(dkv_body, (kv_shape, kv_shape), (dkv_ctas,), ("ctas",))(*args, *([doc_end] if documents else []))
  dq = _kernel_call(dq_body, jax.ShapeDtypeStruct(q.shape, dtype), (dq_ctas,), ("ctas",))(
      *args, *([doc_start] if documents else []))
  return dq, dk, dv
