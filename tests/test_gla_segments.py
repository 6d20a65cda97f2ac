"""Document boundaries (``segment_ids``) in ``kernels.gla``: a packed row equals its documents run alone.

Rows of 33 tokens pack documents of 7 + 25 + 1 tokens (the last one starts at the last position),
16 + 1 + 4 + 12 (a start on a chunk edge, a one-token document, starts inside chunks and sub-chunks)
and one document of 33; ids repeat non-adjacently (a document is a run of equal ids). Each
implementation runs the packed rows with ``segment_ids`` and is compared, document by document, with
the definition without segment ids (``impl="reference"``) run on every document as its own row: the
row's first document from the row's initial state, the others from zeros (and m = 0 with the input
gate). Compared: outputs (and the stabiliser m), the final state (the row's last document's), and the
gradients wrt q, k, v, the log-decay, the input gate and the initial state for a random cotangent of
every output. The Pallas kernels run in the interpreter with small tiles (chunks of 16 and 32 rows).
Hopper's Mosaic GPU output stage cannot interpret: it is built for CUDA, its mask arithmetic is checked
against the Triton output stage's, and its routing (Mosaic GPU by default on Hopper, documents or
not) is pinned.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gla import PallasConfig, gla

TIME = 33
DOCS = ((7, 25, 1), (16, 1, 4, 12), (33,))  # document lengths of each row
IDS = ((5, 2, 5), (1, 2, 1, 3), (7,))  # their segment ids
SMALL = PallasConfig(chunk=16, states_block=16, out_block=16, dqk_block=16, dv_block=16)
# Compile the interpreted kernels without LLVM optimisation (as tests/test_pallas_gla.py does).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_NEG = -1e30


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _documents():
  """(row, first position, length, first of its row, last of its row) of every document."""
  out = []
  for row, lengths in enumerate(DOCS):
    start = 0
    for i, n in enumerate(lengths):
      out.append((row, start, n, i == 0, i == len(lengths) - 1))
      start += n
  return out


def _segment_ids():
  return jnp.asarray([np.repeat(ids, lengths) for ids, lengths in zip(IDS, DOCS)], jnp.int32)


def _inputs(kind, gated, *, dk=16, dv=16, seed=0):
  """Arguments ``(q, k, v, log_decay, log_input_gate, initial_state)`` and the cotangents of
  ``(o, final state[, m])`` for rows of ``TIME`` tokens and two heads: head 0 with mild decays
  (log σ(3x)) and input gates ĩ ∈ [−3, 3]; head 1 with a mix of strong (log α ≈ −20) and weak
  (≈ −1e-4) decays and ĩ ∈ [−30, 30]."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  batch, heads = len(DOCS), 2
  q, k, v = normal(batch, TIME, heads, dk), normal(batch, TIME, heads, dk), normal(batch, TIME, heads, dv)
  shape = {"dim": (batch, TIME, heads, dk), "head": (batch, TIME, heads)}.get(kind)
  log_decay = None
  if shape is not None:
    mild = np.log(1 / (1 + np.exp(-3.0 * rng.standard_normal(shape))))
    u = rng.uniform(size=shape)
    extreme = np.where(rng.uniform(size=shape) < 0.5, -20.0 + 0.5 * u, -1e-4 * (1.0 + u))
    log_decay = jnp.asarray(np.where(np.arange(heads).reshape((heads,) + (1,) * (len(shape) - 3)) == 0,
                                     mild, extreme), jnp.float32)
  s0, ds = normal(batch, heads, dk, dv), normal(batch, heads, dk, dv)
  do = normal(batch, TIME, heads, dv)
  if not gated:
    return (q, k, v, log_decay, None, s0), (do, ds)
  log_i = jnp.asarray(rng.uniform(-1.0, 1.0, (batch, TIME, heads)) * np.array([3.0, 30.0]), jnp.float32)
  m0 = normal(batch, heads)
  return (q, k, v, log_decay, log_i, (s0, m0)), (do, (ds, normal(batch, heads)), normal(batch, TIME, heads))


def _vjp(run, args, cotangents):
  """(outputs, gradients wrt every array argument) of ``run(q, k, v, log_decay, log_i, state0)``."""
  def both(args, cotangents):
    out, vjp = jax.vjp(run, *args)
    return out, vjp(cotangents)

  return jax.jit(both).lower(args, cotangents).compile(compiler_options=_FAST_COMPILE)(args, cotangents)


def _packed(impl, args, cotangents, **kwargs):
  seg = _segment_ids()

  def run(q, k, v, log_decay, log_i, state0):
    return gla(q, k, v, log_decay, state0, log_input_gate=log_i, segment_ids=seg, impl=impl, **kwargs)

  return _vjp(run, args, cotangents)


def _alone(args, cotangents):
  """The definition without segment ids on every document as its own row (padded at its end with
  tokens that change nothing: k = v = 0, log α = 0, ĩ = −10³⁰), mapped back to the packed layout."""
  docs = _documents()
  gated = args[4] is not None

  def rows(x, fill=0.0):  # [batch, time, ...] → [documents, time, ...]
    if x is None:
      return None
    x = np.asarray(x)
    out = np.full((len(docs), TIME) + x.shape[2:], fill, x.dtype)
    for i, (row, start, n, _, _) in enumerate(docs):
      out[i, :n] = x[row, start:start + n]
    return jnp.asarray(out)

  def states(x, take):  # [batch, ...] → [documents, ...]: the row's value where ``take``, else 0
    x = np.asarray(x)
    return jnp.asarray(np.stack([x[d[0]] if take(d) else np.zeros_like(x[d[0]]) for d in docs]))

  first, last = (lambda d: d[3]), (lambda d: d[4])
  q, k, v, log_decay, log_i, state0 = args
  doc_args = (rows(q), rows(k), rows(v), rows(log_decay), rows(log_i, _NEG),
              jax.tree.map(lambda x: states(x, first), state0))
  doc_cots = (rows(cotangents[0]), jax.tree.map(lambda x: states(x, last), cotangents[1]))
  if gated:
    doc_cots += (rows(cotangents[2]),)

  def run(q, k, v, log_decay, log_i, state0):
    return gla(q, k, v, log_decay, state0, log_input_gate=log_i, impl="reference")

  out, grads = _vjp(run, doc_args, doc_cots)

  def back(x):  # [documents, time, ...] → [batch, time, ...]
    if x is None:
      return None
    x = np.asarray(x)
    packed = np.zeros((len(DOCS), TIME) + x.shape[2:], x.dtype)
    for i, (row, start, n, _, _) in enumerate(docs):
      packed[row, start:start + n] = x[i, :n]
    return packed

  def pick(x, take):  # [documents, ...] → [batch, ...]: the document ``take`` picks in each row
    x = np.asarray(x)
    return np.stack([x[i] for i, d in enumerate(docs) if take(d)])

  out = (back(out[0]), jax.tree.map(lambda x: pick(x, last), out[1])) + ((back(out[2]),) if gated else ())
  grads = tuple(back(g) for g in grads[:5]) + (jax.tree.map(lambda x: pick(x, first), grads[5]),)
  return out, grads


@functools.cache
def _case(kind, gated, dk=16, dv=16):
  """(arguments, cotangents, the documents run alone) of one decay kind, shared by the implementations."""
  args, cots = _inputs(kind, gated, dk=dk, dv=dv)
  return args, cots, _alone(args, cots)


def _assert_documents_match(ours, ref, tol):
  """Every output and gradient finite; on the mild head 0 within ``tol`` per document (per row for
  states), so a small document is not hidden by a norm over more; on head 1 (decays near e^{−20} and
  near 1) within ``tol`` over the whole array, as the unsegmented extreme-decay tests compare: there
  a document of strong decays has gradients near 0 that the chunked forms' sums reach only to f32
  rounding of the row's larger ones."""
  (out, grads), (out_ref, grads_ref) = ours, ref
  names = ["o", "final state", "m"][:len(out)]
  named = list(zip(names, out, out_ref))
  named += list(zip(("dq", "dk", "dv", "dlog_decay", "dlog_input_gate", "dinitial_state"), grads, grads_ref))
  for name, a, b in named:
    if b is None:
      assert a is None, name
      continue
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b))):
      x, y = np.asarray(x), np.asarray(y)
      assert x.shape == y.shape, (name, x.shape, y.shape)
      assert np.all(np.isfinite(x)), name
      if x.ndim >= 3 and x.shape[1] == TIME:  # [batch, time, heads, ...]
        for row, start, n, _, _ in _documents():
          err = _rel(x[row, start:start + n, 0], y[row, start:start + n, 0])
          assert err < tol, (name, i, "mild head, document", row, start, n, err)
        err = _rel(x[:, :, 1], y[:, :, 1])
      else:  # [batch, heads, ...]
        for row in range(x.shape[0]):
          assert _rel(x[row, 0], y[row, 0]) < tol, (name, i, "mild head, row", row, _rel(x[row, 0], y[row, 0]))
        err = _rel(x[:, 1], y[:, 1])
      assert err < tol, (name, i, "strong and weak head", err)


KINDS = [("dim", False), ("head", False), (None, False), ("head", True), (None, True)]


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("kind,gated", KINDS)
def test_packed_rows_equal_documents_alone(impl, kind, gated):
  """Chunks of 8 in the chunked form: starts inside chunks (7, 17, 20, 32) and on a chunk edge (16)."""
  args, cots, alone = _case(kind, gated, dk=4, dv=5)
  _assert_documents_match(_packed(impl, args, cots, chunk_size=8), alone, 1e-5)


PALLAS_CASES = [  # (decay kind, config, layout)
    ("dim", SMALL, None),  # chunks of 16: starts inside them and on their edge (16)
    # chunks of 32: a start on a sub-chunk edge (16); sub-chunk loops unrolled, dq/dk scores recomputed
    ("head", dataclasses.replace(SMALL, chunk=32, unroll=True, dqk_reuse_scores=False), None),
    (None, SMALL, None),
    ("dim", dataclasses.replace(SMALL, chunk=32), "mosaic"),  # the TPU layout, sub-chunks in a fori_loop
]


@pytest.mark.parametrize("kind,config,target", PALLAS_CASES)
def test_pallas_packed_rows_equal_documents_alone(kind, config, target):
  args, cots, alone = _case(kind, False)
  ours = _packed("pallas", args, cots, interpret=True, pallas_config=config, pallas_target=target)
  _assert_documents_match(ours, alone, 1e-5)


def test_segment_ids_are_validated():
  q = jnp.zeros((2, 8, 2, 4))
  for bad in (jnp.zeros((2, 7), jnp.int32), jnp.zeros((2, 8), jnp.float32), jnp.zeros((2, 8, 1), jnp.int32)):
    for impl in ("reference", "xla", "pallas"):
      with pytest.raises(ValueError, match=r"segment_ids must be an integer array \[batch, time\] = \(2, 8\)"):
        gla(q, q, q, segment_ids=bad, impl=impl, interpret=True)


def _mosaic_gpu_operands(text):
  """The operand count of each Mosaic GPU custom call in a lowered module's text."""
  return [len(args.split(",")) for args in re.findall(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", text)]


def test_segmented_mosaic_gpu_output_lowers_for_cuda(monkeypatch, cuda_lowering):
  """The output kernel with document masks (its rows' firsts read from global memory, the selects on A
  and q e^{b}) builds for CUDA from this host at the benchmark's size and at d_k 64 / d_v 128 with an f32
  log-decay (two bf16 parts), taking one more operand than without documents; and in the whole
  forward and gradient on a Hopper (tma_gpu patched), documents take the Mosaic GPU output kernel by
  default and the Triton one with ``out_kernel="triton"``."""
  from kernels.gla import mosaic_gpu as gla_mgpu
  from kernels.gla import pallas as G
  for batch, time, heads, dk, dv, decay in ((4, 8192, 16, 128, 128, jnp.bfloat16), (1, 256, 2, 64, 128, jnp.float32)):
    q = jax.ShapeDtypeStruct((batch, time, heads, dk), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((batch, time, heads, dv), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((batch, time, heads, dk), decay)
    states = jax.ShapeDtypeStruct((batch, heads, time // 64, dv, dk), jnp.bfloat16)
    ell = jax.ShapeDtypeStruct((batch, time, 1), jnp.float32)

    def f(q, k, v, g, st, ell=None):
      return gla_mgpu.output(q, k, v, gla_mgpu.decay_parts(g, -20.0), st, min_log_decay=-20.0, ell=ell)

    lower = lambda *args: jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    plain = _mosaic_gpu_operands(lower(q, q, v, g, states))
    documents = _mosaic_gpu_operands(lower(q, q, v, g, states, ell))
    assert len(plain) == len(documents) == 1 and documents[0] == plain[0] + 1

  monkeypatch.setattr(G, "tma_gpu", lambda: True)
  shape = (1, 256, 2, 128)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  seg = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
  for config, mosaic_gpu in ((PallasConfig(), True), (PallasConfig(out_kernel="triton"), False)):
    fwd = lambda q, k, v, g, seg, config=config: gla(q, k, v, g, segment_ids=seg, impl="pallas", pallas_target="triton",
                                                      pallas_config=config)[0]
    grad = jax.value_and_grad(lambda *a, fwd=fwd: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
    # forward: states and output | states; + reverse states, dq/dk, dv
    for fn, triton in ((fwd, 1 if mosaic_gpu else 2), (grad, 4 if mosaic_gpu else 5)):
      text = cuda_lowering(lambda fn=fn: jax.jit(fn).trace(x, x, x, x, seg).lower(lowering_platforms=("cuda",)).as_text())
      assert text.count("__gpu$xla.gpu.triton") == triton
      assert len(_mosaic_gpu_operands(text)) == (1 if mosaic_gpu else 0)


def test_mosaic_gpu_document_masks_match_the_triton_output_stage():
  """The Mosaic GPU output stage's mask arithmetic (``document_firsts``, ``entering_state_reaches``,
  ``same_document``: the functions its kernel applies), applied in f64 where the kernel applies them
  (q e^{b} before the entering state, the assembled chunk scores A), gives the interpreted Triton
  output stage's outputs and stored diagonal score blocks with documents; and the dv kernel fed that
  whole masked A (the Mosaic GPU stage's residual) gives what it gives fed the Triton stage's blocks.
  The kernel's own products run on a GPU only (``kernels.gla.bench --segments`` checks them)."""
  from kernels.gla import mosaic_gpu as gla_mgpu
  from kernels.gla import pallas as G
  from kernels.gla.reference import _document_starts
  batch, time, heads, d, c = 2, 128, 2, 16, gla_mgpu.CHUNK
  chunks = time // c
  # Row 0: starts inside sub-chunks (5, 100), a one-token document (20), on a sub-chunk edge (32), on
  # the chunk edge (64) and at the last row; row 1: none in chunk 0 (every row reads the entering state).
  marks = np.zeros((batch, time), np.int32)
  for row, starts in ((0, (5, 20, 21, 32, 64, 100, 127)), (1, (80,))):
    marks[row, list(starts)] = 1
  starts = _document_starts(jnp.asarray(np.cumsum(marks, axis=1)))
  rng = np.random.default_rng(5)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v, do = (normal(batch, time, heads, d) for _ in range(4))
  g = jnp.asarray(np.log(1 / (1 + np.exp(-3.0 * rng.standard_normal((batch, time, heads, d))))), jnp.float32)
  g = jnp.where(starts[:, :, None, None], 0.0, g)  # as gla_pallas hands it to the kernels
  plan = G._Plan(target="triton", interpret=True, cfg=dataclasses.replace(SMALL, chunk=c), heads=heads, chunks=chunks,
                 dk=d, dv=d, decay=True, dot_dtype="float32", segmented=True)
  ell = G._chunk_start_counts(starts, c, time)
  states = G._states_call(plan, k, g, v, normal(batch, heads, d, d), reverse=False, ell=ell)[0]
  o_triton, at_triton = G._output_call(plan, q, k, g, v, states, ell)

  first = np.asarray(gla_mgpu.document_firsts(ell)).reshape(batch, chunks, c)  # [b, n, t]
  reach = np.asarray(gla_mgpu.entering_state_reaches(first))
  rows, cols = np.arange(c)[:, None], np.arange(c)[None, :]
  same = np.asarray(gla_mgpu.same_document(first[..., None], cols)) & (cols <= rows)  # [b, n, t, s]
  assert reach.any() and not reach.all() and (same.sum() < batch * chunks * c * (c + 1) // 2)  # masks that cut
  chunked = lambda x: np.asarray(x, np.float64).reshape(batch, chunks, c, heads, d)
  qc, kc, vc = chunked(q), chunked(k), chunked(v)
  b = np.cumsum(np.maximum(chunked(g), G.MIN_LOG_DECAY), axis=2)
  scores = np.einsum("bnthd,bnshd,bntshd->bnhts", qc, kc, np.exp(np.minimum(b[:, :, :, None] - b[:, :, None], 0.0)))
  s_t = np.asarray(states, np.float64)  # Sᵀ entering each chunk [b, h, n, d_v, d_k]

  def output(reach, same):
    a = np.where(same[:, :, None], scores, 0.0)
    q_hat = np.where(reach[..., None, None], qc * np.exp(b), 0.0)
    o = np.einsum("bnthk,bhnvk->bnthv", q_hat, s_t) + np.einsum("bnhts,bnshv->bnthv", a, vc)
    return o.reshape(batch, time, heads, d), a

  o, a = output(reach, same)
  assert _rel(o_triton, o) < 1e-5
  assert _rel(o_triton, output(np.ones_like(reach), np.broadcast_to(cols <= rows, same.shape))[0]) > 1e-2
  diagonal = [a[..., j * 16:(j + 1) * 16, j * 16:(j + 1) * 16] for j in range(c // 16)]
  blocks = np.stack(diagonal, axis=2)  # [b, n, j, h, t, s]
  at = np.transpose(blocks, (0, 1, 2, 5, 3, 4)).reshape(batch, time, heads, 16)  # A_jjᵀ: row s, column t
  assert _rel(at_triton, at) < 1e-5

  whole = jnp.asarray(np.transpose(a, (0, 1, 3, 2, 4)).reshape(batch, time, heads, c), jnp.float32)  # A [t, s]
  e_states = G._states_call(plan, q, g, do, normal(batch, heads, d, d), reverse=True, ell=ell)[0]
  dv_mgpu = G._dv_call(dataclasses.replace(plan, mgpu_out=True), q, k, g, do, whole, e_states, ell)
  assert _rel(dv_mgpu, G._dv_call(plan, q, k, g, do, at_triton, e_states, ell)) < 1e-5


def test_segmented_kernels_lower_for_gpu(lower_for_gpu):
  """The Triton lowering of the segmented kernels at the benchmark's head dims (masks, ℓ loads, the
  [16, 16] products): forward (states, output) and gradient (five kernels), none on Mosaic GPU."""
  shape = (1, 128, 2, 128)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  seg = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
  fwd = lambda q, k, v, g, seg: gla(q, k, v, g, segment_ids=seg, impl="pallas", pallas_target="triton")[0]
  grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  for f, kernels in ((fwd, 2), (grad, 5)):
    text = lower_for_gpu(f, x, x, x, x, seg)
    assert text.count("xla.gpu.triton") == kernels and "mosaic_gpu" not in text


def test_segmented_kernels_lower_for_tpu():
  shape = (1, 128, 2, 128)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  seg = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
  fwd = lambda q, k, v, g, seg: gla(q, k, v, g, segment_ids=seg, impl="pallas")[0]
  grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  for f in (fwd, grad):
    assert "tpu_custom_call" in jax.export.export(jax.jit(f), platforms=["tpu"])(x, x, x, x, seg).mlir_module()
