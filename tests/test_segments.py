"""Packed documents (issue 23): ``segment_ids`` make every document of a row run as if alone.

For every mixer that declares ``SEGMENTS`` (all registered ones) and for ``HybridLM`` over them: a
row ``[A; B]`` packed with segment ids gives A's and B's outputs alone (and, for the recurrent faces,
the state after B alone), at odd lengths, with equal gradients. A mixer that does not declare it
refuses the ids (a test subclass stands in for one). The long convolutions' segmented face is checked
against a direct FFT convolution of each document.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import model_config
from hybrids.data import pipeline
from hybrids.data.shards import ShardWindowSource
from hybrids.data.text import TokenWindowSource
from hybrids.layers import CausalConv1D, document_positions, document_starts
from hybrids.longconv import CHUNK_TAPS, causal_fft_conv, modal_final_state, modal_kernel, segmented_modal_conv
from hybrids.mixers import MIXERS
from hybrids.mixers.contract import supports_segments
from hybrids.mixers.gla import GatedLinearAttention
from hybrids.model import HybridLM
from kernels.window_attention import window_attention

LEN_A, LEN_B = 7, 5  # odd lengths; the windows below are shorter and longer than either
# The mixer and model tests' two documents: odd and equal, so that A and B alone run as one batch (one
# program fewer to compile); the boundary falls inside a chunk of 4.
LEN_DOC = 7
SUPPORTING = sorted(name for name, cls in MIXERS.items() if supports_segments(cls))
# Decode state = a KV cache: global attention's is sized to the row here (no max_len), so B alone's has
# no slot for a further step (tests/test_attention_state.py decodes on from a packed prefill with room);
# FoX's cache keeps A's keys (unreadable), so only its next decode step is compared with B's alone.
KV_CACHE = ("attention", "fox")
PACKED_CACHE = ("fox",)
# Mixers whose state after a packed row must equal B's alone (and so must the decode step from it).
RECURRENT_STATE = tuple(name for name in SUPPORTING if name not in KV_CACHE)


def cfg(**overrides):
  c = model_config()
  c.vocab_size, c.d_model, c.n_layers, c.num_heads, c.window = 40, 16, 2, 2, 4
  c.attention_impl = c.scan_impl = c.gla_impl = c.delta_impl = "xla"
  c.chunk_size = 4  # document boundaries inside a chunk and on a chunk edge
  for k, v in overrides.items():
    c[k] = v
  return c


def ids(*lengths, batch=2):
  return jnp.broadcast_to(jnp.concatenate([jnp.full((n,), i, jnp.int32) for i, n in enumerate(lengths)]),
                          (batch, sum(lengths)))


# Many small programs, each compiled once: without LLVM optimisation (CI time), as tests/test_delta.py.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(f, *args):
  """``jax.jit(f)(*args)``, compiled with :data:`_FAST_COMPILE` (one program for a whole comparison:
  eager op-by-op dispatch compiles far more on CPU)."""
  return jax.jit(f).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


# Gradient tolerances above the default: over five input seeds the worst entries (|a − b| / (1 + |b|)
# up to 1e-5 for a mixer, 1.5e-5 for the modal convolution, 3.3e-5 for a model) were small entries of
# leaves whose largest are 15–50, i.e. ~1e-6 of the leaf's scale: the packed and the alone rows sum the
# same terms in another order. Each is about 3× the worst seen.
MIXER_GRAD_TOL, MODAL_GRAD_TOL, MODEL_GRAD_TOL = 3e-5, 5e-5, 1e-4


def close(a, b, tol=2e-5):
  a, b = np.asarray(a), np.asarray(b)
  if np.iscomplexobj(a) or np.iscomplexobj(b):  # the modal states: both parts
    close(a.real, b.real, tol)
    close(a.imag, b.imag, tol)
    return
  np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=tol, atol=tol)


class NoSegments(GatedLinearAttention):
  """A mixer that does not declare ``SEGMENTS`` (every registered one does): the refusals' subject."""


@pytest.fixture
def unsupported(monkeypatch):
  """Registers :class:`NoSegments` as mixer ``"no_segments"`` for one test."""
  monkeypatch.setitem(MIXERS, "no_segments", NoSegments)
  return "no_segments"


def test_supporting_mixers_are_declared():
  assert SUPPORTING == sorted(MIXERS)
  assert not supports_segments(NoSegments)  # declared in the class body, not inherited


def test_document_positions_restart():
  seg = jnp.asarray([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(document_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(document_starts(seg)[0], [1, 0, 0, 1, 0, 1])


@pytest.mark.parametrize("impl,window", [
    *(("reference", window) for window in (None, 3, 6, 64)),
    # The "xla" path hands a window of None or ≥ the row's length to the reference (the dense form),
    # so its cases stay below the row's 12: 11 is longer than either document, 6 lies between them.
    *(("xla", window) for window in (3, 6, 11)),
])
def test_window_attention_masks_documents(impl, window):
  keys = jax.random.split(jax.random.key(0), 3)
  t = LEN_A + LEN_B
  q = jax.random.normal(keys[0], (2, t, 4, 8))
  k, v = (jax.random.normal(key, (2, t, 2, 8)) for key in keys[1:])
  packed = window_attention(q, k, v, window=window, impl=impl, segment_ids=ids(LEN_A, LEN_B), block_size=2)
  a = window_attention(q[:, :LEN_A], k[:, :LEN_A], v[:, :LEN_A], window=window, impl="reference")
  b = window_attention(q[:, LEN_A:], k[:, LEN_A:], v[:, LEN_A:], window=window, impl="reference")
  close(packed, jnp.concatenate([a, b], axis=1))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_window_attention_one_position_with_segment_ids(impl):
  """A row of one position is one document: the same output as without ids (not an empty one)."""
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (2, 1, 2, 8)) for key in keys)
  packed = window_attention(q, k, v, window=4, impl=impl, segment_ids=jnp.zeros((2, 1), jnp.int32))
  assert packed.shape == q.shape
  close(packed, window_attention(q, k, v, window=4, impl="reference"))


def test_causal_conv_reads_no_earlier_document():
  conv = CausalConv1D(3, 4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(params=0))
  conv.bias[...] = jnp.ones((3,))
  x = jax.random.normal(jax.random.key(1), (2, LEN_A + LEN_B, 3))
  y, state = conv(x, return_state=True, segment_ids=ids(LEN_A, LEN_B))
  ya = conv(x[:, :LEN_A])
  yb, state_b = conv(x[:, LEN_A:], return_state=True)
  close(y, jnp.concatenate([ya, yb], axis=1))
  close(state, state_b)
  # A last document shorter than the conv's memory: the state holds zeros for the earlier one.
  _, state = conv(x[:, :LEN_A + 2], return_state=True, segment_ids=ids(LEN_A, 2))
  close(state, conv(x[:, LEN_A:LEN_A + 2], return_state=True)[1])


@pytest.mark.parametrize("taps", sorted(CHUNK_TAPS))
def test_segmented_modal_conv_equals_each_document_convolved_alone(taps):
  """Documents of 1 to 12 tokens, different in each row, starting at t = 0, inside chunks of 4 and on
  their edges (the mixers' tests run one padded chunk of 32): outputs, the last document's state and
  every gradient equal a direct FFT convolution of each document alone, with either form of the taps."""
  keys = jax.random.split(jax.random.key(5), 4)
  channels, modes, chunk_size = 3, 4, 4
  # Decay rates exp(ν) from ~0.007 (a memory of ~150 tokens, as the mixers' slowest) to ~1.6 (< 1 token).
  params = {"rate": jax.random.uniform(keys[0], (channels, modes), minval=-5.0, maxval=0.5),
            "angle": jax.random.uniform(keys[1], (channels, modes), maxval=jnp.pi),
            "residues": jax.random.normal(keys[2], (2, channels, modes))}
  u = jax.random.normal(keys[3], (2, 19, channels))
  lengths = [(5, 1, 9, 4), (12, 7)]
  seg = jnp.asarray([np.repeat(np.arange(len(row)) + 3, row) for row in lengths], jnp.int32)
  filters = lambda p: (jax.lax.complex(-jnp.exp(p["rate"]), p["angle"]), jax.lax.complex(*p["residues"]))

  def packed(p, u):
    return segmented_modal_conv(u, *filters(p), seg, chunk_size=chunk_size, taps=taps)

  def alone(p, u):
    log_poles, residues = filters(p)
    rows, states = [], []
    for b, row in enumerate(lengths):
      bounds = np.cumsum((0,) + row)
      rows.append(jnp.concatenate([causal_fft_conv(u[b:b + 1, t0:t1], modal_kernel(log_poles, residues, t1 - t0))
                                   for t0, t1 in zip(bounds[:-1], bounds[1:])], axis=1))
      states.append(modal_final_state(log_poles, u[b:b + 1, bounds[-2]:])[0])
    return jnp.concatenate(rows), jnp.stack(states)

  def loss(f, p, u):
    y, state = f(p, u)
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.real(state) - 0.5 * jnp.imag(state)), (y, state)

  def both(p, u):
    return [jax.grad(functools.partial(loss, f), argnums=(0, 1), has_aux=True)(p, u) for f in (packed, alone)]

  (grads, (y, state)), (grads_ref, (y_ref, state_ref)) = compiled(both, params, u)
  close(y, y_ref)
  close(state, state_ref)
  jax.tree.map(lambda a, b: close(a, b, MODAL_GRAD_TOL), grads, grads_ref)


def test_segmented_modal_conv_refuses_a_bad_chunk_or_taps():
  args = (jnp.zeros((1, 4, 2)), jnp.zeros((2, 3), jnp.complex64), jnp.zeros((2, 3), jnp.complex64),
          jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="chunk_size=0"):
    segmented_modal_conv(*args, chunk_size=0)
  with pytest.raises(ValueError, match=r"taps='fft' is not one of \['reduce', 'scan', 'unrolled'\]"):
    segmented_modal_conv(*args, taps="fft")


def alone(x):
  """``[batch, 2·LEN_DOC, …]`` → A and B as one batch ``[2·batch, LEN_DOC, …]`` (A's rows first)."""
  return jnp.concatenate([x[:, :LEN_DOC], x[:, LEN_DOC:]], axis=0)


def packed_again(x):
  """The inverse of :func:`alone`: ``[2·batch, LEN_DOC, …]`` → ``[batch, 2·LEN_DOC, …]``."""
  return jnp.concatenate(jnp.split(x, 2, axis=0), axis=1)


def b_rows(leaf):
  """B's rows of a decode-state leaf of :func:`alone`'s batch (a leaf without a batch axis: as is)."""
  return leaf if leaf.ndim == 0 else leaf[leaf.shape[0] // 2:]


@pytest.mark.parametrize("name", SUPPORTING)
def test_mixer_packed_equals_documents_alone(name):
  graphdef, params = nnx.split(MIXERS[name](cfg(), rngs=nnx.Rngs(params=0)))
  x = jax.random.normal(jax.random.key(2), (2, 2 * LEN_DOC, 16))
  x_t = jax.random.normal(jax.random.key(3), (2, 16))
  seg = ids(LEN_DOC, LEN_DOC)
  recurrent = name in RECURRENT_STATE or name in PACKED_CACHE

  def loss(p, xs, s):
    """``Σ sin(y)``, with aux ``(y, None)`` or, for a recurrent face, ``(y, (state after the row, one
    decode step from it))``: one forward serves outputs, state and gradients."""
    mixer = nnx.merge(graphdef, p)
    kwargs = {} if s is None else {"segment_ids": s}
    if not recurrent:
      y = mixer(xs, **kwargs)
      return jnp.sum(jnp.sin(y)), (y, None)
    y, state = mixer(xs, return_state=True, **kwargs)
    x_step = jnp.concatenate([x_t] * (xs.shape[0] // x_t.shape[0]))
    return jnp.sum(jnp.sin(y)), (y, (state, mixer.step(x_step, jax.lax.stop_gradient(state))))

  def both(p, x):
    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    return grad(p, x, seg), grad(p, alone(x), None)

  ((g_params, g_x), (y, packed_state)), ((g_params_alone, g_x_alone), (y_alone, alone_state)) = compiled(
      both, params, x)
  close(y, packed_again(y_alone))
  if name in RECURRENT_STATE:
    # The state after the packed row is B's alone, and decoding on from it continues B as if alone.
    jax.tree.map(lambda p, a: close(p, b_rows(a)), packed_state, alone_state)
  elif recurrent:  # a cache that also holds A: decoding on from it continues B as if alone
    close(packed_state[1][0], b_rows(alone_state[1][0]))
  jax.tree.map(lambda p, a: close(p, a, MIXER_GRAD_TOL), g_params, g_params_alone)  # Σ over A's and B's rows
  close(g_x, packed_again(g_x_alone), MIXER_GRAD_TOL)


def test_mixer_without_support_refuses_segment_ids(unsupported):
  model = HybridLM(cfg(pattern=(unsupported,), n_layers=1), rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match=f"mixer '{unsupported}' does not support segment_ids"):
    model(jnp.zeros((1, 6), jnp.int32), segment_ids=jnp.zeros((1, 6), jnp.int32))


@pytest.mark.parametrize("pattern,position,scan,n_layers", [
    (("mamba", "swa"), "rope", False, 4),
    (("attention",), "learned", True, 2),
    (("mamba|swa",), "none", False, 2),
    (("mamba>attention",), "rope", True, 2),
    # Thirteen more mixers once each, four or five side by side a layer.
    (("linear_attention|retnet|gla|mamba2", "based|rwkv6|mlstm|slstm", "deltanet|gated_deltanet|hyena|baseconv|s4d"),
     "none", False, 3),
])
def test_model_packed_equals_documents_alone(pattern, position, scan, n_layers):
  model = HybridLM(cfg(pattern=pattern, position=position, max_len=32, n_layers=n_layers), rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(4), (2, 2 * LEN_DOC), 0, 40)
  seg = ids(LEN_DOC, LEN_DOC)

  def loss(p, t, s, scan_layers=False):
    logits = nnx.merge(graphdef, p)(t, segment_ids=s, scan_layers=scan_layers)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits

  def everything(p, tokens):
    grad = jax.grad(loss, has_aux=True)
    return grad(p, tokens, seg, scan), grad(p, alone(tokens), None), nnx.merge(graphdef, p)(tokens)

  (g_packed, packed), (g_alone, logits_alone), one_document = compiled(everything, params, tokens)
  close(packed, packed_again(logits_alone))
  # Without ids the row is one document: B then reads A (the ids do change something).
  assert not np.allclose(one_document[:, LEN_DOC:], packed[:, LEN_DOC:], atol=1e-4)
  jax.tree.map(lambda p, a: close(p, a, MODEL_GRAD_TOL), g_packed, g_alone)


def test_model_refuses_an_unsupported_mixer_in_a_group(unsupported):
  model = HybridLM(cfg(pattern=(f"mamba|{unsupported}",), n_layers=1), rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match=f"mixer '{unsupported}' does not support segment_ids"):
    model(jnp.zeros((1, 6), jnp.int32), segment_ids=jnp.zeros((1, 6), jnp.int32))


# ----------------------------------------------------------------------------- data


def test_segment_ids_from_eod():
  eod = 9
  inputs = np.array([[1, 2, eod, 3, eod, eod, 4], [eod, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(pipeline.segment_ids_from_eod(inputs, eod),
                                [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(pipeline.segment_ids_from_eod(jnp.asarray(inputs), eod, xp=jnp),
                                pipeline.segment_ids_from_eod(inputs, eod))


def test_text_window_source_emits_segment_ids():
  tokens = np.array([5, 6, 256, 7, 8, 9, 256, 1, 2, 3, 4, 256], np.uint16)
  plain = TokenWindowSource(tokens, 5)
  source = TokenWindowSource(tokens, 5, eod=256)
  assert plain[0].keys() == {"inputs", "labels"}
  row = source[0]
  np.testing.assert_array_equal(row["inputs"], [5, 6, 256, 7, 8])
  np.testing.assert_array_equal(row["segment_ids"], [0, 0, 0, 1, 1])
  batches = pipeline.finite_batches(source, batch_size=3)
  assert batches[0]["segment_ids"].shape == (3, 5) and batches[0]["segment_ids"].dtype == np.int32


def test_shard_window_source_emits_segment_ids(tmp_path):
  import json
  tokens = np.array([5, 6, 256, 7, 8, 9, 256, 1, 2, 3, 4, 256] * 2, np.uint16)
  np.save(tmp_path / "train-00000.npy", tokens)
  split = {"tokens": len(tokens), "shards": [{"file": "train-00000.npy", "tokens": len(tokens)}]}
  (tmp_path / "manifest.json").write_text(json.dumps({
      "format": "hybrids.shards/1", "vocab_size": 257, "eod": 256, "dtype": "uint16",
      "splits": {"train": split, "heldout": split}}))
  source = ShardWindowSource(str(tmp_path), "train", 5, segment_ids=True)
  np.testing.assert_array_equal(source[1]["inputs"], [256, 1, 2, 3, 4])  # windows of seq_len + 1 = 6
  np.testing.assert_array_equal(source[1]["segment_ids"], [0, 1, 1, 1, 1])
  assert ShardWindowSource(str(tmp_path), "train", 5)[1].keys() == {"inputs", "labels"}


# ----------------------------------------------------------------------------- training


def text_config(tmp_path, pattern):
  from hybrids.config import get_config
  for i in range(4):
    (tmp_path / f"doc{i}.txt").write_text(" ".join(["ab", "cde", "f"][(i + j) % 3] for j in range(120)))
  c = get_config("experiments/quickstart.py:tiny", {
      "data.name": "text", "data.files": str(tmp_path / "*.txt"), "model.pattern": pattern,
      "model.n_layers": len(pattern), "train.steps": 3, "train.eval_every": 0, "train.checkpoint_every": 3})
  c.data.document_boundaries = True  # optional field: absent from the defaults, so run ids are unchanged
  return c


def test_document_boundaries_refuses_a_mixer_without_segments(tmp_path, unsupported):
  from hybrids.config import ConfigError
  from hybrids.train import train
  with pytest.raises(ConfigError, match=f"data.document_boundaries=True: mixer '{unsupported}' does not support"):
    train(text_config(tmp_path, (unsupported, "swa")), str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run" / "config.json").exists()


def test_text_run_trains_with_segment_ids(tmp_path, monkeypatch):
  from hybrids import train as train_lib
  seen = []
  original = train_lib.HybridLM.__call__

  def spy(self, tokens, **kwargs):
    seen.append(kwargs.get("segment_ids"))
    return original(self, tokens, **kwargs)

  monkeypatch.setattr(train_lib.HybridLM, "__call__", spy)
  s = train_lib.train(text_config(tmp_path, ("mamba", "swa")), str(tmp_path / "run"), progress=False)
  assert s["status"] == "done" and np.isfinite(s["train_loss"])
  assert seen and all(ids is not None for ids in seen)


def test_bench_longconv_checks_every_row_before_timing_it(tmp_path):
  """``python -m hybrids.bench_longconv --quick``: every form of the taps (at two chunk sizes), one and
  several documents a row, each checked against the FFT of every document alone, rows written to the
  JSON; a bad ``--forms`` item is one line naming it."""
  from hybrids import bench_longconv

  path = tmp_path / "longconv.json"
  forms = [(taps, 32) for taps in sorted(CHUNK_TAPS)] + [("reduce", 128)]
  text = ",".join(f"{taps}:{chunk}" for taps, chunk in forms)
  assert bench_longconv.main(["--quick", "--segments", "3", "--forms", text, "--json", str(path)]) == 0
  rows = json.loads(path.read_text())["rows"]
  form = lambda taps, chunk: f"pallas kernel, block_c {chunk}" if taps == "pallas" else f"{taps} taps, chunk {chunk}"
  assert [r["impl"] for r in rows] == ["fft conv, 1 doc/row"] + [
      f"segmented, {form(taps, chunk)}, {n}" for taps, chunk in forms for n in ("1 doc/row", "3 docs/row")]
  assert all(r["rel_err"] < bench_longconv.TOL and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)
  assert [(t, c) for t, c in bench_longconv.parse_forms(bench_longconv.FORMS)][0] == ("scan", 32)
  # the kernels only by default where they compile (a GPU), never interpreted at the full shape unasked
  assert all(t != "pallas" for t, _ in bench_longconv.parse_forms(bench_longconv.FORMS))
  assert ("pallas", 8) in bench_longconv.parse_forms(bench_longconv.GPU_FORMS)
  for bad in ("fft:32", "scan:0", "scan", ",", "pallas:6", "pallas:0"):
    with pytest.raises(ValueError, match="--forms: "):
      bench_longconv.parse_forms(bad)
