"""Packed documents (issue 23): ``segment_ids`` make every document of a row run as if alone.

For every mixer that declares ``SEGMENTS`` and for ``HybridLM`` over them: a row ``[A; B]`` packed
with segment ids gives A's and B's outputs alone (and, for the recurrent faces, the state after B
alone), at odd lengths, with equal gradients. A mixer that does not declare it refuses the ids.
"""

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
from hybrids.mixers import MIXERS
from hybrids.mixers.contract import supports_segments
from hybrids.model import HybridLM
from kernels.window_attention import window_attention

LEN_A, LEN_B = 7, 5  # odd lengths; the windows below are shorter and longer than either
SUPPORTING = sorted(name for name, cls in MIXERS.items() if supports_segments(cls))
RECURRENT_STATE = ("mamba", "rglru")  # mixers whose state after a packed row must equal B's alone


def cfg(**overrides):
  c = model_config()
  c.vocab_size, c.d_model, c.n_layers, c.num_heads, c.window = 40, 16, 2, 2, 4
  c.attention_impl = c.scan_impl = "xla"
  for k, v in overrides.items():
    c[k] = v
  return c


def ids(*lengths, batch=2):
  return jnp.broadcast_to(jnp.concatenate([jnp.full((n,), i, jnp.int32) for i, n in enumerate(lengths)]),
                          (batch, sum(lengths)))


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_supporting_mixers_are_declared():
  assert {"attention", "swa", "mamba", "rglru"} <= set(SUPPORTING)


def test_document_positions_restart():
  seg = jnp.asarray([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(document_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(document_starts(seg)[0], [1, 0, 0, 1, 0, 1])


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("window", [None, 3, 6, 64])
def test_window_attention_masks_documents(impl, window):
  keys = jax.random.split(jax.random.key(0), 3)
  t = LEN_A + LEN_B
  q = jax.random.normal(keys[0], (2, t, 4, 8))
  k, v = (jax.random.normal(key, (2, t, 2, 8)) for key in keys[1:])
  packed = window_attention(q, k, v, window=window, impl=impl, segment_ids=ids(LEN_A, LEN_B), block_size=2)
  a = window_attention(q[:, :LEN_A], k[:, :LEN_A], v[:, :LEN_A], window=window, impl="reference")
  b = window_attention(q[:, LEN_A:], k[:, LEN_A:], v[:, LEN_A:], window=window, impl="reference")
  close(packed, jnp.concatenate([a, b], axis=1))


def test_window_attention_refuses_segments_on_kernels():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="segment_ids"):
    window_attention(q, q, q, window=2, impl="pallas", interpret=True, segment_ids=jnp.zeros((1, 4), jnp.int32))


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


@pytest.mark.parametrize("name", SUPPORTING)
def test_mixer_packed_equals_documents_alone(name):
  mixer = MIXERS[name](cfg(), rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(2), (2, LEN_A + LEN_B, 16))
  seg = ids(LEN_A, LEN_B)
  packed = mixer(x, segment_ids=seg)
  close(packed, jnp.concatenate([mixer(x[:, :LEN_A]), mixer(x[:, LEN_A:])], axis=1))
  if name in RECURRENT_STATE:
    _, state = mixer(x, return_state=True, segment_ids=seg)
    _, state_b = mixer(x[:, LEN_A:], return_state=True)
    jax.tree.map(close, state, state_b)
    # Decoding on from the packed state continues B as if it had run alone.
    x_t = jax.random.normal(jax.random.key(3), (2, 16))
    jax.tree.map(close, mixer.step(x_t, state), mixer.step(x_t, state_b))

  graphdef, params = nnx.split(mixer)
  loss = lambda p, xs, s: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(xs, **({} if s is None else {"segment_ids": s}))))
  g_packed = jax.grad(loss, argnums=(0, 1))(params, x, seg)
  g_a = jax.grad(loss, argnums=(0, 1))(params, x[:, :LEN_A], None)
  g_b = jax.grad(loss, argnums=(0, 1))(params, x[:, LEN_A:], None)
  jax.tree.map(lambda p, a, b: close(p, a + b, 1e-4), g_packed[0], g_a[0], g_b[0])
  close(g_packed[1], jnp.concatenate([g_a[1], g_b[1]], axis=1), 1e-4)


@pytest.mark.parametrize("name", sorted(set(MIXERS) - set(SUPPORTING)))
def test_mixer_without_support_refuses_segment_ids(name):
  model = HybridLM(cfg(pattern=(name,), n_layers=1), rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match=f"mixer '{name}' does not support segment_ids"):
    model(jnp.zeros((1, 6), jnp.int32), segment_ids=jnp.zeros((1, 6), jnp.int32))


@pytest.mark.parametrize("pattern,position,scan", [
    (("mamba", "swa"), "rope", False),
    (("attention",), "learned", True),
    (("mamba|swa",), "none", False),
    (("mamba>attention",), "rope", True),
])
def test_model_packed_equals_documents_alone(pattern, position, scan):
  model = HybridLM(cfg(pattern=pattern, position=position, max_len=32, n_layers=2 * len(pattern)),
                   rngs=nnx.Rngs(params=0))
  tokens = jax.random.randint(jax.random.key(4), (2, LEN_A + LEN_B), 0, 40)
  seg = ids(LEN_A, LEN_B)
  packed = model(tokens, segment_ids=seg, scan_layers=scan)
  close(packed, jnp.concatenate([model(tokens[:, :LEN_A]), model(tokens[:, LEN_A:])], axis=1), 1e-4)
  # Without ids the row is one document: B then reads A (the ids do change something).
  assert not np.allclose(model(tokens)[:, LEN_A:], packed[:, LEN_A:], atol=1e-4)

  graphdef, params = nnx.split(model)
  loss = lambda p, t, s: jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, p)(t, segment_ids=s))[..., 0])
  g_packed = jax.grad(loss)(params, tokens, seg)
  g_a = jax.grad(loss)(params, tokens[:, :LEN_A], seg[:, :LEN_A])
  g_b = jax.grad(loss)(params, tokens[:, LEN_A:], seg[:, LEN_A:])
  jax.tree.map(lambda p, a, b: close(p, a + b, 2e-4), g_packed, g_a, g_b)


def test_model_refuses_an_unsupported_mixer_in_a_group():
  model = HybridLM(cfg(pattern=("mamba|gla",), n_layers=1), rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="mixer 'gla' does not support segment_ids"):
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


def test_document_boundaries_refuses_a_mixer_without_segments(tmp_path):
  from hybrids.config import ConfigError
  from hybrids.train import train
  with pytest.raises(ConfigError, match="data.document_boundaries=True: mixer 'gla' does not support"):
    train(text_config(tmp_path, ("gla", "swa")), str(tmp_path / "run"), progress=False)
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
