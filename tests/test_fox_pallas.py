"""Forgetting attention's Pallas path (``impl="pallas"``: the window-attention flash kernels with their
decay bias ``c_i − c_j``) against ``forgetting_attention_reference``.

Both lowerings (Triton for GPU, Mosaic for TPU) run in the Pallas interpreter on CPU with tiny tiles,
so every case crosses several blocks: outputs and the gradients of q, k, v and log_forget on fresh
random inputs, odd lengths (padding), windows shorter and longer than the row and None, GQA/MQA, gates
near 0 (log f ≈ −20) and near 1, documents whose boundaries cut blocks. Long documents of strong
gates (issue 24): the two float32 parts of c and the output and gradients of a 1537-step row against
float64, at the XLA band's tolerance. The Mosaic kernels are also lowered for TPU and the Triton
kernels for CUDA from this host; the dispatch's verdicts and the fox mixer's ``model.fox_impl`` are
checked last. (The window-attention kernels without a bias keep their
own tests: tests/test_pallas_window_attention.py, tests/test_window_segments.py.)

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_fox_pallas.py
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import ConfigError, get_config, model_config
from hybrids.mixers import fox as fox_mixer
from hybrids.mixers import get_mixer
from hybrids.train import resolve
from kernels import dispatch
from kernels.forgetting_attention import (choice, cumulative_log_forget, forgetting_attention,
                                      forgetting_attention_reference)
from kernels.forgetting_attention.pallas import cumulative_log_forget_parts
from kernels.window_attention import PallasBlocks
from kernels.window_attention.pallas import NO_DECAY_BIAS, flash_window_attention

# Tiles far below the real ones so a 37-step row spans 5–10 blocks.
TINY = PallasBlocks(fwd_q=8, fwd_k=4, dkv_q=4, dkv_k=8, dq_q=8, dq_k=4, block=8)
DIM = 8


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _log_forget(rng, shape, gates):
  """``log f`` of the regime: "mixed" (σ of a normal draw, as a fresh layer's), "near0" (f ≈ e⁻²⁰:
  each query reads little beyond itself) or "near1" (f ≈ 1: plain causal attention)."""
  if gates == "near0":
    return -20.0 + rng.uniform(-1.0, 1.0, shape)
  if gates == "near1":
    return -rng.uniform(0.0, 1e-3, shape)
  return -np.log1p(np.exp(-rng.standard_normal(shape) - 1.0))


def _segment_ids(time, lengths_per_row):
  """``int32 [rows, time]`` from each row's document lengths (the last runs to the end); ids alternate
  0, 1, 0, …, so a recurring id names a new document."""
  rows = []
  for lengths in lengths_per_row:
    ids = np.zeros(time, np.int32)
    start = 0
    for n, length in enumerate(lengths):
      ids[start:start + length] = n % 2
      start += length
    ids[start:] = len(lengths) % 2
    rows.append(ids)
  return jnp.asarray(np.stack(rows))


def _inputs(time, heads, kv_heads, gates, dtype, seed):
  rng = np.random.default_rng(seed)
  q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in
                 [(2, time, heads, DIM), (2, time, kv_heads, DIM), (2, time, kv_heads, DIM), (2, time, heads, DIM)])
  log_f = jnp.asarray(_log_forget(rng, (2, time, heads), gates), jnp.float32)
  return q, k, v, log_f, do


def _value_and_grads(attend, q, k, v, log_f, do):
  """(out, dq, dk, dv, dlog_f) of ``attend(q, k, v, log_f)`` against the cotangent ``do``, one jit."""
  def run(q, k, v, log_f, do):
    out, vjp = jax.vjp(attend, q, k, v, log_f)
    return (out, *vjp(do))
  return jax.jit(run)(q, k, v, log_f, do)


# Documents: row 0 cuts blocks of 4 and 8 off their edges and has a one-token document; row 1 one
# boundary on a block edge (8), one inside.
DOCS = [(3, 1, 7, 13), (8, 6)]

CASES = [  # (target, time, window, heads, kv_heads, gates, documents, dtype, split_mask, tolerance)
    ("triton", 37, 5, 4, 2, "mixed", False, jnp.float32, True, 1e-5),   # GQA, T not a multiple of any tile
    ("triton", 37, 11, 4, 1, "near0", True, jnp.float32, True, 1e-5),   # MQA, strong gates, documents
    ("triton", 13, 20, 2, 2, "near1", False, jnp.float32, True, 1e-5),  # window ≥ T, gates ≈ 1
    ("triton", 37, None, 4, 2, "mixed", True, jnp.float32, False, 1e-5),  # global, documents, one masked loop
    ("triton", 37, 11, 4, 2, "mixed", False, jnp.bfloat16, True, 1e-2),  # bf16 inputs
    ("mosaic", 37, 11, 4, 2, "mixed", True, jnp.float32, True, 1e-5),   # TPU structure: band as a grid axis
    ("mosaic", 13, None, 2, 1, "near0", False, jnp.float32, True, 1e-5),  # global, MQA, strong gates
]


@pytest.mark.parametrize("target,time,window,heads,kv_heads,gates,documents,dtype,split,tol", CASES)
def test_pallas_matches_reference(target, time, window, heads, kv_heads, gates, documents, dtype, split, tol):
  q, k, v, log_f, do = _inputs(time, heads, kv_heads, gates, dtype, seed=time + heads + kv_heads)
  segment_ids = _segment_ids(time, DOCS) if documents else None
  blocks = dataclasses.replace(TINY, split_mask=split)
  ours = _value_and_grads(functools.partial(forgetting_attention, window=window, segment_ids=segment_ids,
                                            impl="pallas", interpret=True, pallas_target=target,
                                            pallas_blocks=blocks), q, k, v, log_f, do)
  # The reference in float32 from the same (rounded) inputs.
  up = lambda x: x.astype(jnp.float32)
  ref = _value_and_grads(functools.partial(forgetting_attention_reference, window=window, segment_ids=segment_ids),
                         up(q), up(k), up(v), log_f, up(do))
  assert ours[0].shape == q.shape and ours[0].dtype == dtype
  assert [x.shape for x in ours[1:]] == [q.shape, k.shape, v.shape, log_f.shape]
  for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_forget"), ours, ref):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    if gates == "near0" and name in ("dq", "dk"):
      # f ≈ e⁻²⁰: a row's probability sits on its own key, so dq and dk are of rounding size, and
      # flash's Δ = o·dO (against the reference's Σ p·dP) rounds differently; as for W = 1 in the
      # window-attention tests, both must vanish relative to the cotangent.
      scale = np.linalg.norm(np.asarray(do, np.float64))
      assert np.linalg.norm(np.asarray(b, np.float64)) < 1e-5 * scale, name
      assert np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) < tol * scale, name
    else:
      assert _rel(a, b) < tol, (name, _rel(a, b))


def test_documents_are_independent_rows():
  """A packed row's outputs and log-forget gradients equal each document run alone (the cumulative
  sum restarts; no key of another document is read), Triton interpreted."""
  time, lengths = 21, (6, 9, 6)
  q, k, v, log_f, do = _inputs(time, 2, 1, "mixed", jnp.float32, seed=5)
  segment_ids = _segment_ids(time, [lengths[:-1]] * 2)
  attend = functools.partial(forgetting_attention, window=7, impl="pallas", interpret=True, pallas_blocks=TINY)
  packed = _value_and_grads(functools.partial(attend, segment_ids=segment_ids), q, k, v, log_f, do)
  start = 0
  for length in lengths:
    piece = slice(start, start + length)
    alone = _value_and_grads(attend, *(x[:, piece] for x in (q, k, v, log_f, do)))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_forget"), packed, alone):
      np.testing.assert_allclose(a[:, piece], b, rtol=2e-5, atol=2e-6, err_msg=name)
    start += length


def test_pallas_lowers_for_tpu():
  """Forward and gradient lower through Mosaic from the CPU host (TPU-legal tiles: T = 256, D = 128),
  windowed with documents and global."""
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  log_f = jax.ShapeDtypeStruct((1, 256, 4), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  for window in (100, None):
    f = lambda q, k, v, log_f, ids: forgetting_attention(q, k, v, log_f, window=window, segment_ids=ids,
                                                         impl="pallas", pallas_target="mosaic_tpu")
    grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
    export = lambda fn: jax.export.export(jax.jit(fn), platforms=["tpu"])(q, kv, kv, log_f, ids).mlir_module()
    assert export(f).count("tpu_custom_call") == 1
    assert export(grad).count("tpu_custom_call") == 3  # fwd, dK/dV, dQ


def test_pallas_lowers_for_gpu(lower_for_gpu):
  """The Triton lowering (jaxpr → Triton IR) from this CPU host, GQA, documents, head_dim 80 padded."""
  q = jax.ShapeDtypeStruct((1, 300, 4, 80), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 300, 2, 80), jnp.bfloat16)
  log_f = jax.ShapeDtypeStruct((1, 300, 4), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 300), jnp.int32)
  f = lambda q, k, v, log_f, ids: forgetting_attention(q, k, v, log_f, window=100, segment_ids=ids,
                                                       impl="pallas", pallas_target="triton")
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  assert lower_for_gpu(grad, q, kv, kv, log_f, ids).count("xla.gpu.triton") == 3


def test_bias_keeps_the_mosaic_gpu_kernels_out():
  """The Hopper Mosaic GPU window kernels take no bias: asking for them with one is an error saying so."""
  x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  c = jax.ShapeDtypeStruct((1, 256, 2), jnp.float32)
  for field in ("fwd_kernel", "bwd_kernel"):
    attend = functools.partial(flash_window_attention, window=4, target="triton",
                               blocks=PallasBlocks(**{field: "mosaic_gpu"}))
    with pytest.raises(ValueError, match=re.escape(f"{field}='mosaic_gpu' {NO_DECAY_BIAS}")):
      jax.eval_shape(lambda x, c: attend(x, x, x, decay_bias=c), x, c)
  with pytest.raises(ValueError, match="soft-cap"):
    jax.eval_shape(lambda x, c: flash_window_attention(x, x, x, softcap=5.0, target="triton", decay_bias=c), x, c)


def test_dispatch_records_why(monkeypatch):
  # CPU: auto is xla; "pallas" needs interpret=True (or a pallas_target, for lowering elsewhere).
  auto = choice()
  assert auto.impl == "xla" and "interpret=True" in dict(auto.rejected)["pallas"]
  q = jnp.zeros((1, 16, 2, DIM))
  log_f = jnp.zeros((1, 16, 2))
  with pytest.raises(ValueError, match="interpret=True"):
    forgetting_attention(q, q, q, log_f, window=4, impl="pallas")
  assert choice("pallas", interpret=True).name == "pallas/triton"
  assert choice("pallas", pallas_target="mosaic_tpu").name == "pallas/mosaic_tpu"
  # GPU: auto stays xla until measured; "pallas" is Triton, Mosaic GPU rejected for the bias.
  monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
  auto = choice()
  assert auto.impl == "xla"
  assert "no bias" in dict(auto.rejected)["pallas/mosaic_gpu"]
  assert "not yet measured" in dict(auto.rejected)["pallas/triton"]
  explicit = choice("pallas")
  assert explicit.name == "pallas/triton" and "no bias" in dict(explicit.rejected)["pallas/mosaic_gpu"]
  monkeypatch.setattr(dispatch, "backend", lambda: "tpu")
  assert choice().impl == "xla" and choice("pallas").name == "pallas/mosaic_tpu"
  with pytest.raises(ValueError, match="pallas_target"):
    choice("pallas", pallas_target="cuda")


# ----------------------------------------------------------------- long documents (issue 24)
# 1537 steps of log f ≈ −3 put |c| near 4600, where float32's spacing is ~5e-4: one float32 c per
# position loses that much of every bias c_i − c_j. The kernels get c as two float32 parts.

LONG_TIME, LONG_WINDOW = 1537, 3
LONG_DOCS = (700, 1, 836)  # a one-token document between two long ones
# Tiles of 16 and 32 rows: the band of width 3 crosses a block edge every few rows.
LONG_TILES = PallasBlocks(fwd_q=32, fwd_k=16, dkv_q=16, dkv_k=32, dq_q=32, dq_k=16, block=32)


def _long_row(seed):
  """``q, k, v, log_f, do`` of one head, head_dim 4, over ``LONG_TIME`` steps of strong gates."""
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v, do = (jax.random.normal(key, (1, LONG_TIME, 1, 4)) for key in keys[:4])
  log_f = -3.0 + 0.5 * jax.random.normal(keys[4], (1, LONG_TIME, 1))
  return q, k, v, jnp.minimum(log_f, 0.0), do


def _documents(time, lengths):
  """Document number of each step, ``int [time]`` (lengths in order; they must cover ``time``)."""
  assert sum(lengths) == time
  return np.repeat(np.arange(len(lengths)), lengths)


def _cumsum_f64(log_f, doc):
  """The document-restarting cumulative sum in float64, ``[time]`` (``doc`` non-decreasing)."""
  c = np.cumsum(log_f)
  first = np.searchsorted(doc, doc)  # each step's document start
  return c - np.concatenate([[0.0], c])[first]


def _band_f64(q, k, v, log_f, do, window, doc):
  """Windowed forgetting attention and its gradients in float64 (one head; ``doc`` the document of
  each step): ``(out, dq, dk, dv, dlog_f)``, written out from the definition, independent of the
  kernels' algebra."""
  q, k, v, log_f, do = (np.asarray(a, np.float64)[0, :, 0] for a in (q, k, v, log_f, do))
  time, scale = q.shape[0], 1.0 / np.sqrt(q.shape[-1])
  c = _cumsum_f64(log_f, doc)
  rows = np.arange(time)[:, None]
  cols = rows - np.arange(window)[None]  # key of each (row, offset)
  allowed = (cols >= 0) & (doc[np.maximum(cols, 0)] == doc[rows])
  cols = np.maximum(cols, 0)
  logits = np.einsum("td,twd->tw", q, k[cols]) * scale + c[rows] - c[cols]
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  out = np.einsum("tw,twd->td", p, v[cols])
  dp = np.einsum("td,twd->tw", do, v[cols])
  ds = p * (dp - np.sum(p * dp, axis=1, keepdims=True))  # the logits' gradient; 0 where not allowed
  dq = np.einsum("tw,twd->td", ds, k[cols]) * scale
  dk, dv = np.zeros_like(k), np.zeros_like(v)
  np.add.at(dk, cols, ds[..., None] * q[:, None] * scale)
  np.add.at(dv, cols, p[..., None] * do[:, None])
  dlog_f = np.zeros(time)  # the pair (i, i − w) reads log f of steps i − w + 1 … i
  for w in range(1, window):
    for m in range(w):
      dlog_f[:time - m] += ds[m:, w]
  return out, dq, dk, dv, dlog_f


def test_bias_parts_hold_the_cumulative_sum_exactly():
  """``cumulative_log_forget_parts``: ``hi`` is c rounded to float32 and ``hi + lo`` is c to ~1e-12
  (float32 alone: ~1e-4 here), restarting at documents; its gradient is the reverse
  document-restarting sum of the cotangent (float64), as for the one-part sum."""
  rng = np.random.default_rng(7)
  log_f = jnp.asarray(-3.0 + 0.5 * rng.standard_normal((1, LONG_TIME, 2)), jnp.float32)
  doc = _documents(LONG_TIME, LONG_DOCS)
  segment_ids = jnp.asarray(doc[None] % 2, jnp.int32)  # recurring ids: the renumbering's job
  cotangent = rng.standard_normal(log_f.shape).astype(np.float32)

  @jax.jit
  def run(log_f):
    (hi, lo), vjp = jax.vjp(lambda x: cumulative_log_forget_parts(x, segment_ids), log_f)
    return hi, lo, cumulative_log_forget(log_f, segment_ids), vjp((cotangent, cotangent))[0]
  hi, lo, one_part, grad = run(log_f)
  exact = np.stack([_cumsum_f64(np.asarray(log_f, np.float64)[0, :, h], doc) for h in range(2)], axis=-1)
  np.testing.assert_array_equal(np.asarray(hi)[0], exact.astype(np.float32))
  two_parts = np.asarray(hi, np.float64)[0] + np.asarray(lo, np.float64)[0]
  assert np.max(np.abs(two_parts - exact)) <= 1e-12 * np.max(np.abs(exact))
  assert np.max(np.abs(np.asarray(one_part, np.float64)[0] - exact)) > 1e-5  # what the second part is for

  # Both parts get the cotangent of c (as the kernels give them): it counts once.
  # Reversed, the documents run backwards: −doc numbers them in increasing order again.
  expected = np.stack([_cumsum_f64(np.asarray(cotangent, np.float64)[0, ::-1, h], -doc[::-1])[::-1]
                       for h in range(2)], axis=-1)
  np.testing.assert_allclose(np.asarray(grad)[0], expected, rtol=0, atol=1e-5 * np.max(np.abs(expected)))


@pytest.mark.parametrize("target,documents", [("triton", False), ("mosaic", True)])
def test_long_row_keeps_the_bias_exact(target, documents):
  """The setup of tests/test_fox.py::test_band_keeps_the_bias_exact_along_a_long_row, gradients too:
  against float64, the Pallas path (interpreted) keeps the tolerance the XLA band keeps (checked
  beside it), for the output and every gradient (none is rounding-sized: with log f ≈ −3 a query's
  previous key still has weight ~e⁻³); a one-part c would miss it by far (3.7e-4 on the output)."""
  q, k, v, log_f, do = _long_row(seed=4)
  doc = _documents(LONG_TIME, LONG_DOCS) if documents else np.zeros(LONG_TIME, int)
  segment_ids = jnp.asarray(doc[None] % 2, jnp.int32) if documents else None
  expected = _band_f64(q, k, v, log_f, do, LONG_WINDOW, doc)
  pallas = dict(impl="pallas", interpret=True, pallas_target=target, pallas_blocks=LONG_TILES)
  for options in (dict(impl="xla", block_size=2), pallas):
    got = _value_and_grads(functools.partial(forgetting_attention, window=LONG_WINDOW, segment_ids=segment_ids,
                                             **options), q, k, v, log_f, do)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_forget"), got, expected):
      error = np.max(np.abs(np.asarray(a, np.float64)[0, :, 0] - b))
      assert error <= 1e-5 * max(1.0, np.max(np.abs(b))), (options["impl"], name, error)


# ------------------------------------------------------------------------------------------- mixer

def test_mixer_runs_the_pallas_kernels(monkeypatch):
  """``model.fox_impl="pallas"`` reaches the kernels (interpreted here) and agrees with ``"xla"``."""
  calls = []

  def interpreted(*args, impl, **kw):
    calls.append(impl)
    if impl == "pallas":
      kw.update(interpret=True, pallas_blocks=TINY)
    return forgetting_attention(*args, impl=impl, **kw)
  monkeypatch.setattr(fox_mixer, "forgetting_attention", interpreted)
  x = jax.random.normal(jax.random.key(0), (2, 11, 16))
  outputs = []
  for impl in ("pallas", "xla"):
    c = model_config()
    c.d_model, c.num_heads, c.num_kv_heads, c.fox_window, c.fox_impl = 16, 4, 2, 4, impl
    module = get_mixer("fox")(c, rngs=nnx.Rngs(params=0))
    outputs.append(module(x))
  assert calls == ["pallas", "xla"]
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_config_checks_the_impl():
  resolve(get_config("experiments/quickstart.py:fox", {"model.fox_impl": "pallas"}))
  with pytest.raises(ConfigError, match="model.fox_impl='cuda'; valid: auto, xla, reference, pallas"):
    resolve(get_config("experiments/quickstart.py:fox", {"model.fox_impl": "cuda"}))
