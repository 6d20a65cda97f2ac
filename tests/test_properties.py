"""Properties over generated inputs (hypothesis), where a list of hand-picked cases could miss one:
packed documents of any lengths and positions against each document alone, the segmented scans
against a loop, the labelled positions the loss gathers, the document ids of packed rows, the Pareto
frontier of the state plots.

Examples are derandomized (the same ones every run, a fixed cost) and no example database is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrids.data import pipeline
from hybrids.layers import document_positions
from hybrids.longconv import CHUNK_TAPS, causal_fft_conv, modal_final_state, modal_kernel, segmented_modal_conv
from hybrids.train import label_positions
from kernels import documents
from launch.report import pareto_frontier

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None)
TIME = 23  # odd, and not a multiple of any chunk size drawn below


@st.composite
def packed_rows(draw, rows: int = 2, time: int = TIME):
  """``[rows, time]`` segment ids: each row cut into documents of 1 to ``time`` tokens."""
  ids = []
  for _ in range(rows):
    cuts = draw(st.sets(st.integers(1, time - 1), max_size=time // 2))
    ids.append(np.searchsorted(np.sort(np.fromiter(cuts, int, len(cuts))), np.arange(time), side="right"))
  return np.stack(ids).astype(np.int32)


def _documents(row_ids):
  """(start, end) of each document of one row of segment ids."""
  starts = [0] + [t for t in range(1, len(row_ids)) if row_ids[t] != row_ids[t - 1]] + [len(row_ids)]
  return list(zip(starts[:-1], starts[1:]))


_FILTER = {}


def _filter(channels: int = 3, modes: int = 4):
  """One fixed modal filter (decays from ~150 tokens to under one), made once."""
  if not _FILTER:
    keys = jax.random.split(jax.random.key(11), 4)
    rate = jnp.exp(jax.random.uniform(keys[0], (channels, modes), minval=-5.0, maxval=0.5))
    log_poles = jax.lax.complex(-rate, jax.random.uniform(keys[1], (channels, modes), maxval=jnp.pi))
    residues = jax.lax.complex(*jax.random.normal(keys[2], (2, channels, modes)))
    _FILTER.update(log_poles=log_poles, residues=residues, u=jax.random.normal(keys[3], (2, TIME, channels)))
  return _FILTER["log_poles"], _FILTER["residues"], _FILTER["u"]


_SEGMENTED = {}


@PROPERTY
@given(packed_rows(), st.sampled_from([1, 3, 4, 8, 32]), st.sampled_from(sorted(CHUNK_TAPS)))
def test_segmented_modal_conv_is_each_document_alone(segment_ids, chunk_size, taps):
  """Any packing, any chunk size, either form of the taps: each document's output is its own FFT
  convolution, and the state is the last document's alone."""
  log_poles, residues, u = _filter()
  key = (chunk_size, taps)
  if key not in _SEGMENTED:  # one compile per (chunk size, taps); the ids are data
    _SEGMENTED[key] = jax.jit(lambda u, ids: segmented_modal_conv(u, log_poles, residues, ids, chunk_size=chunk_size,
                                                                  taps=taps))
  y, state = _SEGMENTED[key](u, jnp.asarray(segment_ids))
  for b in range(u.shape[0]):
    spans = _documents(segment_ids[b])
    for t0, t1 in spans:
      alone = causal_fft_conv(u[b:b + 1, t0:t1], modal_kernel(log_poles, residues, t1 - t0))[0]
      np.testing.assert_allclose(y[b, t0:t1], alone, rtol=1e-4, atol=1e-4)
    t0 = spans[-1][0]
    np.testing.assert_allclose(state[b], modal_final_state(log_poles, u[b:b + 1, t0:])[0], rtol=1e-4, atol=1e-4)


@PROPERTY
@given(packed_rows(rows=3), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_segmented_scan_restarts_at_every_start(segment_ids, reverse, seed):
  """``kernels.documents.segmented_scan`` (a running sum here) equals a loop that restarts at each
  document, from either end."""
  values = np.random.default_rng(seed).normal(size=segment_ids.shape).astype(np.float32)
  starts = np.asarray(documents.starts(jnp.asarray(segment_ids), first=True))
  if reverse:  # from the end: each document's last position restarts
    starts = np.concatenate([segment_ids[:, 1:] != segment_ids[:, :-1], np.ones((len(segment_ids), 1), bool)], 1)
  got = np.asarray(documents.segmented_scan(jnp.add, jnp.asarray(values), jnp.asarray(starts), axis=1, reverse=reverse))
  expected = np.zeros_like(values)
  for b, row in enumerate(segment_ids):
    for t0, t1 in _documents(row):
      part = values[b, t0:t1]
      expected[b, t0:t1] = np.cumsum(part[::-1])[::-1] if reverse else np.cumsum(part)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@PROPERTY
@given(packed_rows(rows=3))
def test_document_positions_restart_at_every_document(segment_ids):
  got = np.asarray(document_positions(jnp.asarray(segment_ids)))
  for b, row in enumerate(segment_ids):
    for t0, t1 in _documents(row):
      np.testing.assert_array_equal(got[b, t0:t1], np.arange(t1 - t0))


@PROPERTY
@given(st.lists(st.lists(st.integers(0, 20), min_size=TIME, max_size=TIME), min_size=1, max_size=4))
def test_segment_ids_from_eod_close_each_document_with_its_eod(rows):
  """An EOD (token 0 here) ends its document: the next token starts the next id; numpy and jax agree."""
  inputs = np.asarray(rows, np.int32)
  ids = pipeline.segment_ids_from_eod(inputs, 0)
  np.testing.assert_array_equal(np.asarray(pipeline.segment_ids_from_eod(jnp.asarray(inputs), 0, xp=jnp)), ids)
  assert (ids[:, 0] == 0).all()
  np.testing.assert_array_equal(np.diff(ids, axis=1), (inputs[:, :-1] == 0).astype(np.int32))


@PROPERTY
@given(st.lists(st.lists(st.booleans(), min_size=TIME, max_size=TIME), min_size=1, max_size=4), st.integers(0, 4))
def test_label_positions_gather_every_label_in_order(labelled, spare):
  """The loss's gathered positions: every labelled position of a row, in order, then only unlabelled
  ones (whose label is ignored), for any label layout and any spare slots."""
  mask = np.asarray(labelled)
  labels = np.where(mask, np.arange(TIME)[None] + 1, pipeline.IGNORE_LABEL).astype(np.int32)
  slots = min(TIME, int(mask.sum(axis=1).max()) + spare)
  if slots == 0:
    return
  positions = np.asarray(label_positions(jnp.asarray(labels), slots))
  for b in range(len(labels)):
    n = int(mask[b].sum())
    np.testing.assert_array_equal(positions[b, :n], np.flatnonzero(mask[b]))
    assert not mask[b, positions[b, n:]].any()


@PROPERTY
@given(st.lists(st.tuples(st.floats(1.0, 1e6), st.floats(0.0, 1.0)), min_size=1, max_size=30))
def test_pareto_frontier_is_undominated_and_dominates_the_rest(points):
  """Every frontier point is beaten by no point of smaller-or-equal state; every point is matched or
  beaten by a frontier point of smaller-or-equal state."""
  frontier = pareto_frontier(points)
  assert [s for s, _ in frontier] == sorted(s for s, _ in frontier)
  for s, a in frontier:
    assert not any(s2 <= s and a2 > a for s2, a2 in points)
  for s, a in points:
    assert any(fs <= s and fa >= a for fs, fa in frontier)
