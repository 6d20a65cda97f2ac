"""kernels.delta with segment_ids (packed documents, issue 23): every implementation on a packed row
gives what each of its documents gives alone (the token recurrence run on that document by itself,
zero state, ``initial_state`` for the row's first document only): outputs, the final state (the last
document's alone) and the gradients of every argument. The Pallas kernels run in the Pallas
interpreter (the WY kernel alone also in the TPU layout and by blocked substitution) and are lowered
for TPU and GPU."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.delta import delta_rule, wy_factors_xla
from kernels.delta.pallas import wy_factors as pallas_wy_factors
from kernels.delta.pallas import PallasConfig

# The interpreted kernels are large XLA programs: compile them without LLVM optimisation (CI time).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TIME, HEADS, D_K, D_V = 21, 2, 4, 5
# Document lengths of each packed row (TIME tokens). Chunks of 8 and 16: a start inside a chunk (7),
# on a chunk edge (16), two starts in one chunk (3, 12), a start on a chunk's last row (15) and a
# one-token document on the row's last position (20), a row of one document.
ROWS = ((7, 14), (16, 5), (3, 9, 9), (15, 5, 1), (21,), (7, 14), (3, 9, 9))
# log α of each row: spread over [−20, −1e-4] with a third of the tokens at each end, then two rows
# of strong decay everywhere (α = e^{-20}) and two of weak decay everywhere (α = e^{-1e-4}).
REGIMES = ("mixed",) * 5 + ("strong", "weak")
NAMES = ("o", "final state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@functools.lru_cache(maxsize=None)
def _packed(decay: bool, with_h0: bool):
  """((q, k, v, β, log α | None, S₀ | None), (cotangent of o, of the final state), segment_ids) for
  the rows of ``ROWS``: L2-normalised keys, β ∈ (0, 1), arbitrary integer ids (only changes count).
  Drawn with numpy: eager jax.random would compile every op."""
  rng = np.random.default_rng(17 + decay + 2 * with_h0)
  batch = len(ROWS)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k, v = normal(batch, TIME, HEADS, D_K), normal(batch, TIME, HEADS, D_K), normal(batch, TIME, HEADS, D_V)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = (1 / (1 + np.exp(-2.0 * normal(batch, TIME, HEADS)))).astype(np.float32)
  spread = -np.exp(rng.uniform(np.log(1e-4), np.log(20.0), (batch, TIME, HEADS)))
  ends = rng.integers(0, 3, (batch, TIME, HEADS))
  mixed = np.where(ends == 0, -20.0, np.where(ends == 1, -1e-4, spread))
  regime = np.array(REGIMES)[:, None, None]
  log_decay = np.where(regime == "strong", -20.0, np.where(regime == "weak", -1e-4, mixed)).astype(np.float32)
  segment_ids = np.stack([np.repeat(rng.integers(-50, 50) + 3 * np.arange(len(lengths)), lengths)
                          for lengths in ROWS]).astype(np.int32)
  args = (q, k, v, beta, log_decay if decay else None, normal(batch, HEADS, D_K, D_V) if with_h0 else None)
  return args, (normal(batch, TIME, HEADS, D_V), normal(batch, HEADS, D_K, D_V)), segment_ids


class _Document(NamedTuple):
  row: int
  lo: int    # its tokens are lo … hi − 1 of the row
  hi: int
  first: bool  # the row's first document (S₀ flows into it)
  last: bool   # the row's last document (its state is the row's final state)


DOCUMENTS = [_Document(r, lo, lo + n, i == 0, i == len(lengths) - 1) for r, lengths in enumerate(ROWS)
             for i, (lo, n) in enumerate(zip(np.cumsum((0,) + lengths[:-1]), lengths))]


@functools.lru_cache(maxsize=None)
def _alone(decay: bool, with_h0: bool):
  """(o, final state, grads) of the token recurrence run on each document of ``ROWS`` by itself, put
  back in the packed layout. One call: every document is a row of its own, right-aligned behind
  steps that are exact no-ops (k = v = 0, β = 0, log α = 0: the state passes unchanged, bit for bit),
  entered with the packed row's S₀ if it is the row's first document and zeros otherwise. Its state
  cotangent is the row's for the row's last document and zero for the others (their states are not
  returned)."""
  (q, k, v, beta, log_decay, h0), (cot_o, cot_s), _ = _packed(decay, with_h0)

  def aligned(x):  # [rows, TIME, ...] → [documents, TIME, ...], each document at the end of its row
    out = np.zeros((len(DOCUMENTS),) + x.shape[1:], x.dtype)
    for j, d in enumerate(DOCUMENTS):
      out[j, TIME - (d.hi - d.lo):] = x[d.row, d.lo:d.hi]
    return out

  def of_row(x, keep):  # [rows, ...] → [documents, ...]: the row's value where keep(document), else 0
    return np.stack([x[d.row] if keep(d) else np.zeros_like(x[d.row]) for d in DOCUMENTS])

  def packed(x):  # [documents, TIME, ...] → [rows, TIME, ...]
    out = np.zeros((len(ROWS),) + x.shape[1:], np.float32)
    for j, d in enumerate(DOCUMENTS):
      out[d.row, d.lo:d.hi] = np.asarray(x)[j, TIME - (d.hi - d.lo):]
    return out

  def to_row(x, keep):  # [documents, ...] → [rows, ...], from the document of each row that keep() picks
    return np.stack([np.asarray(x)[j] for j, d in enumerate(DOCUMENTS) if keep(d)])

  def run(args, cots):
    (o, s), vjp = jax.vjp(lambda *a: delta_rule(*a, impl="reference"), *args)
    return o, s, vjp(cots)

  args = tuple(None if x is None else aligned(x) for x in (q, k, v, beta, log_decay))
  args += (None if h0 is None else of_row(h0, lambda d: d.first),)
  o, s, grads = _compiled(run, args, (aligned(cot_o), of_row(cot_s, lambda d: d.last)))
  grads = tuple(None if g is None else packed(g) for g in grads[:5]) + (
      None if h0 is None else to_row(grads[5], lambda d: d.first),)
  return packed(o), to_row(s, lambda d: d.last), grads


def _compiled(f, *args):
  """``f(*args)``, compiled without LLVM optimisation."""
  return jax.jit(f).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _outputs_and_grads(args, cots, segment_ids, **kwargs):
  """(o, final state, (dq, dk, dv, dβ, d log α, dS₀)) of delta_rule on the packed rows."""
  def run(args, cots, segment_ids):
    (o, s), vjp = jax.vjp(lambda *a: delta_rule(*a, segment_ids=segment_ids, **kwargs), *args)
    return o, s, vjp(cots)

  return _compiled(run, args, cots, segment_ids)


IMPLS = {  # name: delta_rule arguments
    "reference": dict(impl="reference"),
    "xla c8": dict(impl="xla", chunk_size=8),
    "pallas c16": dict(impl="pallas", chunk_size=16, interpret=True, pallas_target="triton"),
}


@pytest.mark.parametrize("decay,with_h0", [(True, True), (False, False)], ids=["gated", "deltanet"])
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_rows_equal_their_documents_alone(impl, decay, with_h0, assert_named_close):
  """Gated DeltaNet with S₀ and DeltaNet without: outputs, the final state (the last document's
  alone) and the gradients of q, k, v, β, log α and S₀ (through the first document only) against
  each document run alone by the token recurrence, all finite; the start tokens' log α get no
  gradient (they only decay the discarded state)."""
  args, cots, segment_ids = _packed(decay, with_h0)
  ours = _outputs_and_grads(args, cots, segment_ids, **IMPLS[impl])
  ref = _alone(decay, with_h0)
  assert ours[0].shape == (len(ROWS), TIME, HEADS, D_V) and ours[1].shape == (len(ROWS), HEADS, D_K, D_V)
  assert_named_close(NAMES, ours[:2] + tuple(ours[2]), ref[:2] + tuple(ref[2]), 1e-5, _rel_err)
  if decay:
    starts = np.concatenate([np.zeros((len(ROWS), 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    assert np.all(np.asarray(ours[2][4])[starts] == 0)


def test_a_document_after_strong_decay_in_the_same_chunk_keeps_its_precision():
  """48 tokens at α = e^{-20}, then a 16-token document at α ≈ e^{-1e-4}, in one chunk of 64: the
  within-chunk cumulative log-decay restarts at the start, so the second document's decays are not
  differences of sums near −960 (a plain cumsum there misses 1e-5 on this row)."""
  rng = np.random.default_rng(3)
  time, first = 64, 48
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k, v = normal(1, time, 2, 16), normal(1, time, 2, 16), normal(1, time, 2, 16)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = (1 / (1 + np.exp(-normal(1, time, 2)))).astype(np.float32)
  weak = -1e-4 * rng.uniform(0.5, 1.5, (1, time, 2))
  log_decay = np.where(np.arange(time)[None, :, None] < first, -20.0, weak).astype(np.float32)
  segment_ids = (np.arange(time) >= first).astype(np.int32)[None]
  o, s = jax.jit(lambda *a: delta_rule(*a, segment_ids=segment_ids, impl="xla", chunk_size=64))(
      q, k, v, beta, log_decay)
  o_alone, s_alone = delta_rule(*(x[:, first:] for x in (q, k, v, beta, log_decay)), impl="reference")
  assert _rel_err(o[:, first:], o_alone) < 1e-5 and _rel_err(s, s_alone) < 1e-5


def _chunk_documents(starts, log_decay, chunk):
  """numpy: starts bool and log α ``[batch, time, heads]`` → (b, the within-chunk cumulative log-decay
  restarted at each start (the start's own log α dropped), and doc, the number of starts in the chunk
  up to each row), chunked as the WY factors take them: ``[batch, chunks, heads, chunk]`` and
  ``[batch, chunks, 1, chunk]``."""
  batch, time, heads = log_decay.shape
  b = np.zeros(log_decay.shape, np.float32)
  doc = np.zeros((batch, time, 1), np.int32)
  for t in range(time):
    if t % chunk:
      doc[:, t] = doc[:, t - 1] + starts[:, t, None]
      b[:, t] = np.where(starts[:, t, None], 0.0, b[:, t - 1] + log_decay[:, t])
    else:
      doc[:, t] = starts[:, t, None]
      b[:, t] = np.where(starts[:, t, None], 0.0, log_decay[:, t])
  chunked = lambda x: np.moveaxis(x.reshape(batch, time // chunk, chunk, x.shape[-1]), 3, 2)
  return chunked(b), chunked(doc)


@pytest.mark.parametrize("chunk,target,wy_block", [(32, "triton", 16), (16, "mosaic", None)])
def test_pallas_wy_factors_with_documents_match_xla(chunk, target, wy_block):
  """The WY kernel with document indices, interpreted, and its backward against the XLA form with the
  same masks (itself checked end to end above): W, Ũ and the gradients of k, v, b and β. Triton by
  blocks of 16 in chunks of 32 (starts inside the diagonal blocks, on a block edge, on a chunk's last
  row; pairs of documents in off-diagonal blocks) and the TPU layout. W is zero on every row the
  entering state does not reach."""
  (_, k, v, beta, log_decay, _), _, _ = _packed(True, False)
  time = 2 * chunk
  starts = np.zeros((2, time), bool)
  starts[0, [5, 16, 20, chunk - 1, chunk + 8]] = True
  starts[1, [chunk + 1]] = True
  b, doc = _chunk_documents(starts, np.concatenate([log_decay[:2]] * 4, axis=1)[:, :time], chunk)
  chunked = lambda x: jnp.moveaxis(jnp.asarray(np.concatenate([x[:2]] * 4, axis=1)[:, :time]).reshape(
      2, 2, chunk, HEADS, *x.shape[3:]), 3, 2)  # [b n h c …]
  k, v, beta = chunked(k), chunked(v), chunked(beta)
  rng = np.random.default_rng(1)
  cots = (rng.standard_normal(k.shape).astype(np.float32), rng.standard_normal(v.shape).astype(np.float32))

  def run(f):
    def outputs_and_grads(k, v, b, beta, doc, cots):
      out, vjp = jax.vjp(lambda *a: f(*a, doc), k, v, b, beta)
      return out, vjp(cots)
    return _compiled(outputs_and_grads, k, v, b, beta, doc, cots)

  config = PallasConfig(wy_block=wy_block)
  ours = run(lambda *a: pallas_wy_factors(*a, interpret=True, target=target, config=config))
  ref = run(wy_factors_xla)
  for name, x, y in zip(("W", "U~", "dk", "dv", "db", "dbeta"), ours[0] + ours[1], ref[0] + ref[1]):
    assert np.all(np.isfinite(x)), name
    assert _rel_err(x, y) < 1e-5, (name, _rel_err(x, y))
  assert np.all(np.asarray(ours[0][0])[np.broadcast_to(doc > 0, k.shape[:-1])] == 0)


def test_rejects_bad_segment_ids():
  q, beta = jnp.zeros((1, 4, 2, 3)), jnp.zeros((1, 4, 2))
  for bad in (jnp.zeros((1, 5), jnp.int32), jnp.zeros((4,), jnp.int32), jnp.zeros((1, 4), jnp.float32),
              jnp.zeros((1, 4), bool)):
    with pytest.raises(ValueError, match=r"segment_ids must be None or integer \[batch, time\] = \(1, 4\)"):
      delta_rule(q, q, q, beta, segment_ids=bad)


def _lowering_args():
  shape = (1, 256, 2, 128)  # TPU-legal tiles: chunks of 64 rows, d_k = d_v = 128
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  per_head = jax.ShapeDtypeStruct(shape[:3], jnp.float32)
  return (x, x, x, per_head, per_head, jax.ShapeDtypeStruct((1, 2, 128, 128), jnp.float32),
          jax.ShapeDtypeStruct(shape[:2], jnp.int32))


def _forward(**kwargs):
  return lambda *a: delta_rule(*a[:6], segment_ids=a[6], chunk_size=64, impl="pallas", **kwargs)


def test_segmented_pallas_lowers_for_tpu_and_gpu(lower_for_gpu):
  """The forward's two kernels (the WY kernel with its document inputs, and the state pass, which
  segments do not change) lower through Mosaic for TPU and, whole-chunk and by blocks of 16, to
  Triton IR, from this CPU host (platform picked at lowering time for TPU)."""
  module = jax.export.export(jax.jit(_forward()), platforms=["tpu"])(*_lowering_args()).mlir_module()
  assert module.count("tpu_custom_call") == 2
  for wy_block in (None, 16):
    module = lower_for_gpu(_forward(pallas_target="triton", pallas_config=PallasConfig(wy_block=wy_block)),
                           *_lowering_args())
    assert module.count("xla.gpu.triton") == 2, wy_block
