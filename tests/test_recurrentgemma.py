"""``rglru`` against the Griffin authors' code: recurrentgemma 1.0.1's ``RecurrentBlock`` (JAX, f32).

The reference outputs are a committed fixture made by ``tests/fixtures/make_recurrentgemma_fixture.py``
(recurrentgemma pins numpy<2.4 and absl-py<2, so it is not a test dependency); where the package is
importable, :func:`test_fixture_is_recurrentgemma` also checks the block against it live.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import model_config
from hybrids.mixers.rglru import RGLRUBlock, a_param_init, document_starts, sqrt_bound_derivative

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "recurrentgemma_block.npz")
_spec = importlib.util.spec_from_file_location(
    "make_recurrentgemma_fixture", os.path.join(os.path.dirname(__file__), "fixtures", "make_recurrentgemma_fixture.py"))
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)  # sizes, and make() where recurrentgemma is installed
TOL = 1e-5
# ours ← recurrentgemma, and the transform (identity unless named)
PARAM_MAP = {
    ("gate_proj", "kernel"): "linear_y/kernel", ("gate_proj", "bias"): "linear_y/bias",
    ("in_proj", "kernel"): "linear_x/kernel", ("in_proj", "bias"): "linear_x/bias",
    ("out_proj", "kernel"): "linear_out/kernel", ("out_proj", "bias"): "linear_out/bias",
    ("conv", "kernel"): "conv_1d/w", ("conv", "bias"): "conv_1d/b",
    ("input_gate", "kernel"): "rg_lru/input_gate/w", ("input_gate", "bias"): "rg_lru/input_gate/b",
    ("recurrence_gate", "kernel"): "rg_lru/a_gate/w", ("recurrence_gate", "bias"): "rg_lru/a_gate/b",
    ("a_param",): "rg_lru/a_param",  # negated: there a = σ(−p), here a = σ(Λ)
}


def config(width, lru_width, heads, conv, impl="auto"):
  c = model_config()
  c.d_model, c.rnn_width, c.rnn_heads, c.num_heads, c.conv_width, c.n_layers = width, lru_width, heads, heads, conv, 3
  c.dtype = c.param_dtype = "float32"
  c.scan_impl = impl
  return c


def mapped_block(ref, impl="auto"):
  """Our block holding recurrentgemma's parameters ``ref["param/…"]``."""
  block = RGLRUBlock(config(maker.WIDTH, maker.LRU_WIDTH, maker.HEADS, maker.CONV, impl), rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(block)
  pure = nnx.to_pure_dict(params)
  assert sorted(tuple(k) for k, _ in _leaves(pure)) == sorted(PARAM_MAP), "a parameter is not mapped"
  for ours, theirs in PARAM_MAP.items():
    value = np.asarray(ref[f"param/{theirs}"])
    node = pure
    for k in ours[:-1]:
      node = node[k]
    node[ours[-1]] = jnp.asarray(-value if ours == ("a_param",) else value)
    assert node[ours[-1]].shape == np.shape(value)
  nnx.replace_by_pure_dict(params, pure)
  return nnx.merge(graphdef, params)


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    yield from (_leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])


def errors(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = np.max(np.abs(ours - ref))
  return err, err / np.max(np.abs(ref))


def assert_close(ours, ref, what):
  err, rel = errors(ours, ref)
  assert err <= TOL * max(1.0, float(np.max(np.abs(ref)))), f"{what}: max abs error {err:.3g} (rel {rel:.3g})"


def check_block(ref, impl="auto"):
  PREFILL, SECOND_DOC = maker.PREFILL, maker.SECOND_DOC
  block = mapped_block(ref, impl)
  x = jnp.asarray(ref["x"])
  batch, time = x.shape[:2]

  y, state = jax.jit(lambda x: block(x, return_state=True))(x)
  assert_close(y, ref["y"], "parallel y")
  assert_close(state["h"], ref["h"], "parallel final h")
  assert_close(state["conv"], ref["conv"], "parallel conv state")

  step = jax.jit(block.step)
  state, ys = block.init_state(batch), []
  for t in range(time):
    y_t, state = step(x[:, t], state)
    ys.append(y_t)
  assert_close(jnp.stack(ys, 1), ref["y_steps"], "step y")
  assert_close(state["h"], ref["h_steps"], "step final h")
  assert_close(state["conv"], ref["conv_steps"], "step conv state")

  _, state = block(x[:, :PREFILL], return_state=True)
  ys = []
  for t in range(PREFILL, time):
    y_t, state = step(x[:, t], state)
    ys.append(y_t)
  assert_close(jnp.stack(ys, 1), ref["y_prefill_steps"], "prefill then step y")

  segment_ids = jnp.broadcast_to((jnp.arange(time) >= SECOND_DOC).astype(jnp.int32), (batch, time))
  y_docs, state = block.forward(x, document_starts(segment_ids))
  assert_close(y_docs, ref["y_docs"], "two documents y")
  assert_close(state["h"], ref["h_docs"], "two documents final h")


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_block_matches_recurrentgemma(impl):
  check_block(dict(np.load(FIXTURE)), impl)


def test_fixture_is_recurrentgemma():
  """The fixture is what recurrentgemma computes, and Λ's initialiser is its ``rnn_real_param_init``."""
  pytest.importorskip("recurrentgemma.jax", reason="recurrentgemma 1.0.1 not installed (see the fixture script)")
  from recurrentgemma.jax import layers
  jax.config.update("jax_default_matmul_precision", "highest")
  fresh, saved = maker.make(), dict(np.load(FIXTURE))
  for k in saved:
    np.testing.assert_allclose(fresh[k], saved[k], rtol=1e-6, atol=1e-6, err_msg=k)
  check_block(fresh)
  key = jax.random.key(3)
  np.testing.assert_allclose(a_param_init(key, (64,)), -layers.rnn_real_param_init(0.9, 0.999)(key, (64,)), rtol=1e-6)


def test_reset_lets_the_first_token_in_undamped():
  """At a document start h = i ⊙ u (a = 0, multiplier 1), not √(1 − a²) ⊙ i ⊙ u."""
  block = RGLRUBlock(config(16, 16, 4, 4), rngs=nnx.Rngs(params=0))
  u = jax.random.normal(jax.random.key(0), (2, 3, 16))
  reset = jnp.array([[True, False, True]] * 2)
  a, b = block._gates(u, reset)
  i = jax.nn.sigmoid(block.input_gate(u))
  np.testing.assert_allclose(a[:, 0], 0.0)
  np.testing.assert_allclose(b[:, 0], (i * u)[:, 0], rtol=1e-6)
  np.testing.assert_allclose(a[:, 2], 0.0)
  assert np.all(np.abs(b[:, 1]) < np.abs((i * u)[:, 1]) + 1e-7) and np.all(a[:, 1] > 0)


def test_sqrt_derivative_is_bounded():
  g = jax.grad(lambda x: sqrt_bound_derivative(x, 1000.0))
  assert float(g(1e-12)) == pytest.approx(1000.0, rel=1e-5)
  assert float(g(4.0)) == pytest.approx(0.25, rel=1e-6)
  assert float(sqrt_bound_derivative(4.0, 1000.0)) == 2.0


def test_initialisation_follows_recurrentgemma():
  block = RGLRUBlock(config(256, 256, 4, 4), rngs=nnx.Rngs(params=0))
  a = np.asarray(jax.nn.sigmoid(block.a_param[...]), np.float64)
  assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6 and a.max() - a.min() > 0.05
  for proj in (block.gate_proj, block.in_proj, block.out_proj):
    assert np.all(np.asarray(proj.bias[...]) == 0)
  assert np.std(np.asarray(block.conv.kernel[...])) == pytest.approx(np.sqrt(0.01 / 4), rel=0.1)
  assert np.std(np.asarray(block.input_gate.kernel[...])) == pytest.approx(1 / 16, rel=0.1)
  assert np.std(np.asarray(block.out_proj.kernel[...])) == pytest.approx(np.sqrt(2 / 3 / 256), rel=0.1)


def test_documents_run_alone():
  """With two documents in a row, the second one's outputs and the final state are the second one's alone."""
  block = RGLRUBlock(config(16, 16, 4, 4), rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(1), (2, 11, 16))
  segment_ids = jnp.broadcast_to((jnp.arange(11) >= 5).astype(jnp.int32), (2, 11))
  y, state = block.forward(x, document_starts(segment_ids))
  y_alone, state_alone = block(x[:, 5:], return_state=True)
  np.testing.assert_allclose(y[:, 5:], y_alone, atol=1e-6)
  np.testing.assert_allclose(y[:, :5], block(x[:, :5]), atol=1e-6)
  for k in ("h", "conv"):
    np.testing.assert_allclose(state[k], state_alone[k], atol=1e-6)
