"""Packed documents (``segment_ids``, issue 23) inside the Pallas window-attention kernels.

A row packing documents ``[A; B; …]`` through the interpreted kernels (Triton and Mosaic TPU layouts,
forward and dQ, dK, dV) equals each document run alone through a float64 reference: odd lengths,
windows shorter and longer than a document, boundaries inside a block and on a block edge, three
documents (one id recurring), one-token documents, GQA and MQA, soft-cap on and off. Tiles are tiny
so every case crosses several blocks, and some query blocks meet key blocks their documents mask
entirely (the row statistics must stay finite). Then the block-range arithmetic that lets Triton
(and the Mosaic GPU kernels with ``mgpu_skip_outside_documents``) skip blocks outside the documents,
against brute force, the dispatch (cuDNN refuses segment ids and says why), and the lowerings for
TPU, Triton and Mosaic GPU (whose wgmma kernels do not interpret: their values are checked on a GPU
by the benchmark).
"""

import dataclasses
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.window_attention import PallasBlocks, choice, window_attention
from kernels.window_attention import mosaic_gpu
from kernels.window_attention.band import _document_key_blocks, _key_blocks
from kernels.window_attention.pallas import document_bounds

# Tiles far below the real ones so a 15–17-step row spans 2–5 blocks on each side.
TINY = PallasBlocks(fwd_q=8, fwd_k=4, dkv_q=4, dkv_k=8, dq_q=8, dq_k=4, block=8)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _segment_ids(rows, ids=None):
  """``rows``: per batch row, its documents' lengths; ``ids``: the id of each document (default
  0, 1, …), the same for every row."""
  out = []
  for lengths in rows:
    doc_ids = ids or range(len(lengths))
    out.append(np.concatenate([np.full(n, i, np.int32) for i, n in zip(doc_ids, lengths)]))
  return jnp.asarray(np.stack(out))


def _alone(q, k, v, do, *, window, softcap):
  """(out, dq, dk, dv) of one document alone (``[time, heads, dim]`` float64 numpy): the dense
  definition, gradients by hand (no compile: CI time)."""
  time, heads, dim = q.shape
  group = heads // k.shape[1]
  kh, vh = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head h reads kv head h // group
  x = np.einsum("thd,shd->hts", q, kh) / np.sqrt(dim)
  s = x if softcap is None else softcap * np.tanh(x / softcap)
  offset = np.arange(time)[:, None] - np.arange(time)[None, :]
  s = np.where((offset >= 0) & (offset < (window or time)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("thd,shd->hts", do, vh)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  if softcap is not None:
    ds *= 1.0 - np.tanh(x / softcap) ** 2
  ds /= np.sqrt(dim)
  per_group = lambda g: g.reshape(time, heads // group, group, dim).sum(2)
  return (np.einsum("hts,shd->thd", p, vh), np.einsum("hts,shd->thd", ds, kh),
          per_group(np.einsum("hts,thd->shd", ds, q)), per_group(np.einsum("hts,thd->shd", p, do)))


def _documents_alone(q, k, v, do, rows, *, window, softcap):
  """(out, dq, dk, dv) of every document of every row run alone, put back in place."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  out = [np.zeros_like(x) for x in (q, q, k, v)]
  for b, lengths in enumerate(rows):
    for start, stop in zip(np.cumsum((0,) + tuple(lengths[:-1])), np.cumsum(lengths)):
      doc = _alone(q[b, start:stop], k[b, start:stop], v[b, start:stop], do[b, start:stop], window=window,
                   softcap=softcap)
      for whole, part in zip(out, doc):
        whole[b, start:stop] = part
  return out


def _inputs(time, heads, kv_heads, dtype, seed, dim=8):
  rng = np.random.default_rng(seed)  # numpy draws: eager jax.random compiles small programs per call
  shapes = [(2, time, heads, dim), (2, time, kv_heads, dim), (2, time, kv_heads, dim), (2, time, heads, dim)]
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


CASES = [  # (target, rows' document lengths, ids, window, heads, kv_heads, softcap, split_mask, dtype, tol)
    # Boundaries inside a block (9; 4); window shorter than every document; rows 4–7 of the second row
    # meet key block 0 wholly masked; GQA; soft-cap; T = 17 pads to 24.
    ("triton", ((9, 8), (4, 13)), None, 4, 4, 2, 5.0, True, jnp.float32, 1e-5),
    # A boundary on the block edge (8); window longer than both documents; a one-token first document;
    # MQA; one masked loop.
    ("triton", ((8, 5), (1, 12)), None, 11, 2, 1, None, False, jnp.float32, 1e-5),
    # Three documents, the first id recurring as the third (a new document: ids are compared where
    # they change), a one-token one in the middle; global causal attention.
    ("triton", ((5, 3, 7), (7, 1, 7)), (0, 1, 0), None, 4, 2, 5.0, True, jnp.float32, 1e-5),
    # bf16 inputs (the neighbouring tests' bf16 tolerance).
    ("triton", ((6, 11), (13, 4)), None, 7, 4, 2, None, True, jnp.bfloat16, 1e-2),
    # Mosaic TPU structure: a boundary on the block edge and one inside, GQA, soft-cap.
    ("mosaic", ((8, 7), (3, 12)), None, 5, 4, 2, 5.0, True, jnp.float32, 1e-5),
    # Three documents, window longer than two of them, MQA.
    ("mosaic", ((3, 9, 5), (11, 6, 0)), None, 12, 2, 1, None, True, jnp.float32, 1e-5),
]


@pytest.mark.parametrize("target,rows,ids,window,heads,kv_heads,softcap,split,dtype,tol", CASES)
def test_packed_documents_equal_documents_alone(target, rows, ids, window, heads, kv_heads, softcap, split, dtype,
                                                tol):
  rows = tuple(tuple(n for n in lengths if n) for lengths in rows)
  time = sum(rows[0])
  segment_ids = _segment_ids(rows, ids)
  q, k, v, do = _inputs(time, heads, kv_heads, dtype, seed=time + heads)
  blocks = dataclasses.replace(TINY, split_mask=split)

  def run(q, k, v, do, segment_ids):
    f = lambda q, k, v: window_attention(q, k, v, window=window, softcap=softcap, impl="pallas", interpret=True,
                                         pallas_target=target, pallas_blocks=blocks, segment_ids=segment_ids)
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(do))

  ours = jax.jit(run)(q, k, v, do, segment_ids)
  ref = _documents_alone(q, k, v, do, rows, window=window, softcap=softcap)
  assert [x.shape for x in ours] == [q.shape, q.shape, k.shape, v.shape]
  assert all(x.dtype == dtype for x in ours)
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    assert _rel(a, b) < tol, (name, _rel(a, b))


def test_xla_path_reads_a_recurring_id_as_a_new_document():
  """The XLA band masks by id; ``window_attention`` renumbers ids where they change first, so an id
  that recurs after another names a new document there too, as in the kernels."""
  rows = ((5, 3, 7), (7, 1, 7))
  q, k, v, do = _inputs(15, 4, 2, jnp.float32, seed=3)
  xla = jax.jit(lambda q, k, v, s: window_attention(q, k, v, window=6, impl="xla", block_size=4, segment_ids=s))
  out = xla(q, k, v, _segment_ids(rows, (0, 1, 0)))
  assert _rel(out, _documents_alone(q, k, v, do, rows, window=6, softcap=None)[0]) < 1e-5


PADDED = 64  # the brute force's row: documents cut 37 or 64 steps, padded to 64 (the padding: one more document)


@st.composite
def _packings(draw):
  """(time, document cuts, window, query block, key block, rows of a tile) for the block-range test."""
  time = draw(st.sampled_from((37, PADDED)))  # padded or not (two lengths: document_bounds compiles per shape)
  cuts = sorted(draw(st.lists(st.integers(1, time - 1), max_size=6, unique=True)))
  window = draw(st.integers(1, PADDED + 8))
  bq, bk, rows = (draw(st.sampled_from((4, 8, 16))) for _ in range(3))
  return time, cuts, window, bq, bk, rows


def _visited(bounds, tile):
  lo, full_lo, full_hi, hi = (int(x[tile]) for x in bounds)
  assert lo <= full_lo <= full_hi <= hi
  return lo, full_lo, full_hi, hi


# derandomize: the same examples every run (a fixed cost of a few seconds); database=None: no .hypothesis/.
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(_packings())
def test_document_block_ranges_are_the_blocks_that_hold_a_pair(packing):
  """The block ranges the kernels visit with packed documents (Triton's, and the Mosaic GPU kernels'
  with ``mgpu_skip_outside_documents``, which read the first and last row's bound), against brute
  force: the blocks that hold a pair (t, s) of one document with 0 ≤ t − s < window. Visited are
  exactly those, every pair of the unmasked interior is such a pair, and a tile's halves (the Mosaic
  GPU compute warpgroups' own bands) lie inside the whole tile's range (the memory warpgroup's)."""
  time, cuts, window, bq, bk, rows = packing
  document = np.searchsorted(np.asarray(cuts, int), np.arange(PADDED), side="right")
  document[time:] = len(cuts) + 1  # the padding
  t, s = np.arange(PADDED)[:, None], np.arange(PADDED)[None, :]
  pairs = (t - s >= 0) & (t - s < window) & (document[:, None] == document[None, :])
  segment_ids = jnp.asarray(np.cumsum(np.isin(np.arange(time), cuts))[None], jnp.int32)
  doc_start, doc_end = document_bounds(segment_ids, PADDED)
  # Fixed-length vectors of tile starts (repeated): one shape, so the eager ops compile once.
  tile_starts = lambda size: jnp.asarray(np.resize(np.arange(0, PADDED, size), PADDED // 4), jnp.int32)

  def key_ranges(size):  # query tiles of ``size`` rows → their key blocks of ``bk`` (numpy [4, tiles])
    bounds = mosaic_gpu._tile_key_blocks(tile_starts(size), size, bk, window, doc_start, 0)
    return np.asarray(tile_starts(size)), np.stack(bounds)

  def query_ranges(size):  # key tiles of ``size`` rows → the query blocks of ``bq`` that read them
    bounds = mosaic_gpu._tile_query_blocks(tile_starts(size), size, bq, window, PADDED // bq, doc_end, 0)
    return np.asarray(tile_starts(size)), np.stack(bounds)

  keys, queries = ({size: f(size) for size in (rows, 2 * rows)} for f in (key_ranges, query_ranges))
  for size in (rows, 2 * rows):
    starts, bounds = keys[size]
    for tile, q_start in enumerate(starts):
      lo, full_lo, full_hi, hi = _visited(bounds, tile)
      held = pairs[q_start:q_start + size].reshape(size, -1, bk)  # [rows, key block, keys]
      assert list(np.flatnonzero(held.any(axis=(0, 2)))) == list(range(lo, hi)), (q_start, lo, hi)
      assert held[:, full_lo:full_hi].all()
    starts, bounds = queries[size]
    for tile, k_start in enumerate(starts):
      lo, full_lo, full_hi, hi = _visited(bounds, tile)
      held = pairs[:, k_start:k_start + size].T.reshape(size, -1, bq)  # [keys, query block, queries]
      assert list(np.flatnonzero(held.any(axis=(0, 2)))) == list(range(lo, hi)), (k_start, lo, hi)
      assert held[:, full_lo:full_hi].all()

  # Triton's loops (from the min and max of a block's bounds) are the same ranges.
  starts, bounds = keys[rows]
  per_tile = np.asarray(doc_start[0]).reshape(-1, rows)
  first, last = (np.resize(f(per_tile, axis=1), starts.shape) for f in (np.min, np.max))
  triton = _document_key_blocks(_key_blocks(jnp.asarray(starts), rows, bk, window), jnp.asarray(first),
                                jnp.asarray(last), bk)
  np.testing.assert_array_equal(np.stack(triton), bounds)
  # A tile's halves (the Mosaic GPU compute warpgroups' own bands: tiles of ``rows``) inside the whole
  # tile's range (the memory warpgroup's: tiles of 2·rows), non-empty.
  for ranges in (keys, queries):
    (_, halves), (_, wholes) = ranges[rows], ranges[2 * rows]
    for half in range(PADDED // rows):
      assert wholes[0][half // 2] <= halves[0][half] < halves[-1][half] <= wholes[-1][half // 2]


def test_document_bounds_with_padding():
  starts, ends = document_bounds(jnp.asarray([[4, 4, 7, 7, 7], [1, 1, 1, 1, 1]]), 8)
  np.testing.assert_array_equal(starts, [[0, 0, 2, 2, 2, 5, 5, 5], [0, 0, 0, 0, 0, 5, 5, 5]])
  np.testing.assert_array_equal(ends, [[2, 2, 5, 5, 5, 8, 8, 8], [5, 5, 5, 5, 5, 8, 8, 8]])
  starts, ends = document_bounds(jnp.asarray([[0, 1, 1]]), 3)  # no padding
  np.testing.assert_array_equal(starts, [[0, 1, 1]])
  np.testing.assert_array_equal(ends, [[1, 3, 3]])


def test_dispatch_with_segments(monkeypatch):
  """On a GPU, segment ids pass cuDNN over (the record says why): on Hopper the Mosaic GPU kernels take
  them (their masks matched the reference on an H100), before Hopper the Triton ones. cuDNN asked for
  by name refuses them."""
  wa = importlib.import_module("kernels.window_attention")  # (the package exports a function of that name)
  monkeypatch.setattr(wa.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(wa, "tma_gpu", lambda: True)
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  assert choice(q).name == "pallas/mosaic_gpu"
  packed = choice(q, segments=True)
  assert packed.name == "pallas/mosaic_gpu" and "segment_ids" in dict(packed.rejected)["cudnn"]
  monkeypatch.setattr(wa, "tma_gpu", lambda: False)  # pre-Hopper
  assert choice(q).name == "cudnn"
  packed = choice(q, segments=True)
  assert packed.name == "pallas/triton" and "segment_ids" in dict(packed.rejected)["cudnn"]

  monkeypatch.undo()
  x = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
  segment_ids = jnp.zeros((1, 16), jnp.int32)
  with pytest.raises(ValueError, match="impl='cudnn' takes packed documents \\(segment_ids\\)"):
    window_attention(x, x, x, window=4, impl="cudnn", segment_ids=segment_ids)
  with pytest.raises(ValueError, match="segment_ids\\(1, 15\\) must be \\[batch, time\\]"):
    window_attention(x, x, x, window=4, impl="pallas", interpret=True, segment_ids=segment_ids[:, 1:])


def _segmented_grad(f):
  return jax.grad(lambda q, k, v, s: jnp.sum(f(q, k, v, s).astype(jnp.float32)), argnums=(0, 1, 2))


def test_segmented_kernels_lower_for_tpu():
  """Forward and gradient with segment ids lower through Mosaic from the CPU host (T = 256, D = 128)."""
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  f = lambda q, k, v, s: window_attention(q, k, v, window=100, softcap=30.0, impl="pallas", pallas_target="mosaic",
                                          segment_ids=s)
  for fn, kernels in ((f, 1), (_segmented_grad(f), 3)):
    module = jax.export.export(jax.jit(fn), platforms=["tpu"])(q, kv, kv, seg).mlir_module()
    assert module.count("tpu_custom_call") == kernels


def test_segmented_kernels_lower_for_gpu(lower_for_gpu):
  """The Triton lowering with segment ids (jaxpr → Triton IR) from this CPU host."""
  q = jax.ShapeDtypeStruct((1, 300, 4, 80), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 300, 2, 80), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 300), jnp.int32)
  f = lambda q, k, v, s: window_attention(q, k, v, window=100, softcap=30.0, impl="pallas", pallas_target="triton",
                                          segment_ids=s)
  assert lower_for_gpu(_segmented_grad(f), q, kv, kv, seg).count("xla.gpu.triton") == 3


def _lower_for_cuda(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("pingpong", [False, True])
def test_segmented_mosaic_gpu_kernels_lower_for_cuda(pingpong, skip):
  """The wgmma kernels with document masks (forward, dK/dV, dQ) built for CUDA from this host: the
  default schedule at the benchmark's size (shared memory: the document bounds go to registers, not
  shared memory) and, with GQA and a window off the block grid, at a small one; the other schedules
  of tests/test_pallas_window_attention.py at the small one. ``skip``: with the band cut to the
  documents (``mgpu_skip_outside_documents``: per-tile block counts from scalar loads of the bounds).
  Mosaic GPU's interpreter has no wgmma: their values are checked on a GPU
  (``python -m kernels.window_attention.bench --segments N`` checks every kernel against the
  reference before timing it)."""
  blocks = PallasBlocks(fwd_kernel="mosaic_gpu", bwd_kernel="mosaic_gpu", mgpu_pingpong=pingpong,
                        mgpu_skip_outside_documents=skip)
  shapes = [(1, 256, 4, 1, 64, 100)]  # (batch, time, heads, kv_heads, dim, window)
  if pingpong:
    shapes.append((4, 8192, 16, 16, 128, 1024))
  else:
    blocks = dataclasses.replace(blocks, mgpu_persistent=False, mgpu_bwd_persistent=True, mgpu_own_band=False)
  for (batch, time, heads, kv_heads, dim, window) in shapes:
    q = jax.ShapeDtypeStruct((batch, time, heads, dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, time, kv_heads, dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((batch, time), jnp.int32)
    f = lambda q, k, v, s: window_attention(q, k, v, window=window, impl="pallas", pallas_target="triton",
                                            pallas_blocks=blocks, segment_ids=s)
    for fn, kernels in ((f, 1), (_segmented_grad(f), 3)):
      text = _lower_for_cuda(fn, q, kv, kv, seg)
      assert "triton" not in text and text.count("mosaic_gpu") >= kernels


def test_mosaic_gpu_skip_outside_documents_reaches_every_kernel():
  """``mgpu_skip_outside_documents`` changes all three Mosaic GPU kernels of a call with segment ids:
  none keeps the module of the whole-band variant (``False``), which streams and masks every block."""
  q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 1, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)

  def kernel_hashes(skip):
    blocks = PallasBlocks(fwd_kernel="mosaic_gpu", bwd_kernel="mosaic_gpu", mgpu_skip_outside_documents=skip)
    f = lambda q, k, v, s: window_attention(q, k, v, window=100, impl="pallas", pallas_target="triton",
                                            pallas_blocks=blocks, segment_ids=s)
    hashes = re.findall(r'kernel_hash = "([^"]*)"', _lower_for_cuda(_segmented_grad(f), q, kv, kv, seg))
    assert len(set(hashes)) == 3, len(hashes)  # forward, dK/dV, dQ
    return set(hashes)

  assert not kernel_hashes(True) & kernel_hashes(False)
