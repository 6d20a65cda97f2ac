"""The Forgetting Transformer: ``kernels.forgetting_attention`` and the ``fox`` mixer.

Kernel: the dense reference and the blocked band against the definition written out in float64
numpy (GQA, odd lengths, windows shorter and longer than the row, blocks that do not divide it,
documents packed with boundaries inside a block and one-token documents at both ends of a row), every
gradient of the band against the reference's, a packed row against its documents alone, and the
numerics the band is built for: a long row of strong gates where a row-long cumulative sum loses the
bias to cancellation. Mixer: the windowed face's ring buffer (parallel == recurrent past the window,
prefill then step), decoding on from a packed prefill as from its last document alone, RoPE left out,
and the config checks. The registry tests (test_mixers, test_contract, test_segments, test_learning)
cover the global face.

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_fox.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import ConfigError, get_config, model_config
from hybrids.mixers import get_mixer
from hybrids.train import resolve
from kernels.forgetting_attention import cumulative_log_forget, forgetting_attention
from kernels.window_attention import window_attention

BATCH, TIME, HEADS, KV_HEADS, DIM = 2, 13, 4, 2, 8
# Per batch row, its documents' lengths: boundaries inside and on the edges of blocks of 2 and 4,
# one-token documents first and last, and an id that recurs (row 1: ids 0, 1, 0).
DOCUMENTS = [(1, 5, 6, 1), (4, 3, 6)]


def _segment_ids(rows=DOCUMENTS):
  out = []
  for lengths in rows:
    ids = [i % 2 for i in range(len(lengths))]  # recurring ids name new documents all the same
    out.append(np.concatenate([np.full(n, i, np.int32) for i, n in zip(ids, lengths)]))
  return jnp.asarray(np.stack(out))


def _inputs(key=0, time=TIME, log_scale=2.0):
  keys = jax.random.split(jax.random.key(key), 4)
  q = jax.random.normal(keys[0], (BATCH, time, HEADS, DIM))
  k = jax.random.normal(keys[1], (BATCH, time, KV_HEADS, DIM))
  v = jax.random.normal(keys[2], (BATCH, time, KV_HEADS, DIM))
  log_f = jax.nn.log_sigmoid(log_scale * jax.random.normal(keys[3], (BATCH, time, HEADS)) + 1.0)
  return q, k, v, log_f


def _numpy_definition(q, k, v, log_f, window=None, rows=None):
  """o_i = Σ_j softmax_j(q_i·k_j/√d + Σ_{j<l≤i} log f_l) v_j over j in i's band and document, float64
  loops (the bias summed term by term, no cumulative sums)."""
  q, k, v, log_f = (np.asarray(a, np.float64) for a in (q, k, v, log_f))
  batch, time, heads, dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    doc = np.repeat(np.arange(len(rows[b])), rows[b]) if rows else np.zeros(time, int)
    for h in range(heads):
      for i in range(time):
        keys = [j for j in range(i + 1) if (window is None or i - j < window) and doc[j] == doc[i]]
        logits = np.array([q[b, i, h] @ k[b, j, h // group] / np.sqrt(dim) + log_f[b, j + 1:i + 1, h].sum()
                           for j in keys])
        p = np.exp(logits - logits.max())
        out[b, i, h] = (p / p.sum()) @ v[b, keys, h // group]
  return out


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


# ------------------------------------------------------------------------------------------ kernel

def test_kernel_matches_the_definition():
  q, k, v, log_f = _inputs()
  seg = _segment_ids()
  # (window, block, packed): global (the dense form either way), bands with blocks that do not divide
  # the row, the one-key band.
  cases = [(None, None, False), (None, None, True), (3, 2, False), (5, 4, True), (1, 1, True)]

  @jax.jit
  def run(q, k, v, log_f, seg):
    return [forgetting_attention(q, k, v, log_f, window=w, segment_ids=seg if packed else None, block_size=b)
            for w, b, packed in cases]

  for (window, _, packed), out in zip(cases, run(q, k, v, log_f, seg)):
    _close(out, _numpy_definition(q, k, v, log_f, window, DOCUMENTS if packed else None))


def test_band_gradients_equal_the_references():
  """Every gradient (q, k, v, log f) of the blocked band equals the dense reference's, packed or not."""
  q, k, v, log_f = _inputs(1)
  cot = jax.random.normal(jax.random.key(9), q.shape)
  seg = _segment_ids()

  def grads(impl, window, block, seg):
    loss = lambda *a: jnp.sum(cot * forgetting_attention(*a, window=window, segment_ids=seg, impl=impl,
                                                         block_size=block))
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, log_f)

  @jax.jit
  def run(seg):
    return [(grads("xla", w, b, s), grads("reference", w, None, s)) for w, b, s in ((3, 2, None), (6, 4, seg))]

  for band, dense in run(seg):
    for g, g_ref in zip(band, dense):
      _close(g, g_ref)


def test_packed_row_equals_its_documents_alone():
  """Outputs and gradients of a packed row through the band = each document alone (first and last
  positions included; the global face's: tests/test_segments.py through the mixer)."""
  q, k, v, log_f = _inputs(2)
  lengths = DOCUMENTS[1]
  seg = _segment_ids([lengths, lengths])
  bounds = np.cumsum((0,) + lengths)

  def loss(args, seg, window):
    return jnp.sum(jnp.sin(forgetting_attention(*args, window=window, segment_ids=seg, impl="xla", block_size=2)))

  @jax.jit
  def run(args, seg):
    packed = jax.value_and_grad(loss)(args, seg, 3)
    alone = [jax.value_and_grad(loss)(tuple(a[:, t0:t1] for a in args), None, 3)
             for t0, t1 in zip(bounds[:-1], bounds[1:])]
    return packed, alone

  for (value, grads), alone in [run((q, k, v, log_f), seg)]:
    _close(value, sum(a[0] for a in alone), 1e-5)
    for i, g in enumerate(grads):
      _close(g, jnp.concatenate([a[1][i] for a in alone], axis=1))


def test_gates_at_one_are_softmax_attention():
  """f = 1 (log f = 0): no bias, plain causal attention (kernels.window_attention)."""
  q, k, v, _ = _inputs(3)

  @jax.jit
  def run(q, k, v):
    zero = jnp.zeros(q.shape[:3])
    return [(forgetting_attention(q, k, v, zero, window=w, block_size=2), window_attention(q, k, v, window=w,
                                                                                           impl="reference"))
            for w in (None, 4)]

  for fox, attention in run(q, k, v):
    _close(fox, attention)


def test_cumulative_log_forget_restarts_at_each_document():
  log_f = -jnp.arange(1.0, 14.0)[None, :, None] * jnp.ones((BATCH, 1, 1))
  c = jax.jit(cumulative_log_forget)(log_f, _segment_ids())
  for b, lengths in enumerate(DOCUMENTS):
    bounds = np.cumsum((0,) + lengths)
    expected = np.concatenate([np.cumsum(np.asarray(log_f[b, t0:t1, 0])) for t0, t1 in zip(bounds[:-1], bounds[1:])])
    _close(c[b, :, 0], expected)


def test_band_keeps_the_bias_exact_along_a_long_row():
  """Strong gates (log f ≈ −3) over 1537 steps: a row-long cumulative sum reaches |c| ≈ 5000, where
  float32 spacing is ~5e-4 and c_i − c_j loses the bias; the band sums block-local gates only and
  keeps 1e-5 of the float64 definition (the band written out directly, both ways to its end)."""
  time, window = 1537, 3
  keys = jax.random.split(jax.random.key(4), 4)
  q = jax.random.normal(keys[0], (1, time, 1, 4))
  k, v = (jax.random.normal(key, (1, time, 1, 4)) for key in keys[1:3])
  log_f = -3.0 + 0.5 * jax.random.normal(keys[3], (1, time, 1))
  out = jax.jit(lambda *a: forgetting_attention(*a, window=window, impl="xla", block_size=2))(q, k, v, log_f)
  qn, kn, vn, fn = (np.asarray(a, np.float64)[0, :, 0] for a in (q, k, v, log_f))
  expected = np.zeros_like(qn)
  for i in range(time):
    js = np.arange(max(0, i - window + 1), i + 1)
    logits = np.array([qn[i] @ kn[j] / 2.0 + fn[j + 1:i + 1].sum() for j in js])
    p = np.exp(logits - logits.max())
    expected[i] = (p / p.sum()) @ vn[js]
  assert np.all(np.isfinite(np.asarray(out)))
  _close(out[0, :, 0], expected)


def test_kernel_rejects_bad_arguments():
  q, k, v, log_f = _inputs()
  with pytest.raises(ValueError, match="log_forget"):
    forgetting_attention(q, k, v, log_f[..., :1])
  with pytest.raises(ValueError, match="window"):
    forgetting_attention(q, k, v, log_f, window=0)
  with pytest.raises(ValueError, match="impl='pallas' needs a GPU or TPU .* pass interpret=True"):
    forgetting_attention(q, k, v, log_f, impl="pallas")  # on CPU the kernel runs only interpreted
  with pytest.raises(ValueError, match="unknown impl 'triton'"):
    forgetting_attention(q, k, v, log_f, impl="triton")
  with pytest.raises(ValueError, match="segment_ids"):
    forgetting_attention(q, k, v, log_f, segment_ids=jnp.zeros((BATCH, TIME), jnp.float32))


# ------------------------------------------------------------------------------------------- mixer

def _mixer(**overrides):
  c = model_config()
  c.d_model, c.num_heads, c.num_kv_heads = 16, 4, 2
  for key, value in overrides.items():
    c[key] = value
  module = get_mixer("fox")(c, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(module)
  return module, graphdef, params


def _steps(graphdef, params, x, state):
  def body(state, x_t):
    y, state = nnx.merge(graphdef, params).step(x_t, state)
    return state, y
  state, ys = jax.lax.scan(body, state, jnp.moveaxis(x, 1, 0))
  return jnp.moveaxis(ys, 0, 1), state


def test_windowed_faces_agree_past_the_window():
  """Ring buffer of W = 4 slots over 11 steps: steps == parallel; prefill of 6 then 5 steps == parallel."""
  module, graphdef, params = _mixer(fox_window=4)
  x = jax.random.normal(jax.random.key(5), (2, 11, 16))

  @jax.jit
  def run(params, x):
    mixer = nnx.merge(graphdef, params)
    y = mixer(x)
    y_steps, state_steps = _steps(graphdef, params, x, mixer.init_state(2))
    _, state_parallel = mixer(x, return_state=True)
    _, prefill = mixer(x[:, :6], return_state=True)
    y_rest, _ = _steps(graphdef, params, x[:, 6:], prefill)
    return y, y_steps, state_steps, state_parallel, y_rest

  y, y_steps, state_steps, state_parallel, y_rest = run(params, x)
  assert state_steps["k"].shape == (2, 4, 2, 4)
  _close(y_steps, y)
  _close(y_rest, y[:, 6:])
  for key in ("k", "v", "log_forget", "pos"):
    _close(state_steps[key], state_parallel[key])


@pytest.mark.parametrize("window", [0, 3])
def test_decoding_from_a_packed_prefill_continues_its_last_document(window):
  """The state after a packed row [A; B] decodes on exactly as the state after B alone."""
  module, graphdef, params = _mixer(fox_window=window)
  x = jax.random.normal(jax.random.key(6), (2, 12, 16))
  more = jax.random.normal(jax.random.key(7), (2, 4, 16))
  seg = jnp.asarray([[0] * 7 + [1] * 5] * 2, jnp.int32)

  @jax.jit
  def run(params):
    mixer = nnx.merge(graphdef, params)
    _, packed = mixer(x, return_state=True, max_len=16, segment_ids=seg)
    _, alone = mixer(x[:, 7:], return_state=True, max_len=9)
    return _steps(graphdef, params, more, packed)[0], _steps(graphdef, params, more, alone)[0]

  y_packed, y_alone = run(params)
  _close(y_packed, y_alone)


def test_rope_is_left_out():
  """FoX has no positional encoding: model.position does not change a fox layer."""
  x = jax.random.normal(jax.random.key(8), (1, 9, 16))
  outputs = []
  for position in ("rope", "none"):
    _, graphdef, params = _mixer(position=position)
    outputs.append(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x))
  _close(outputs[0], outputs[1], 0.0)


@pytest.mark.parametrize("overrides,message", [
    ({"model.fox_window": 65}, "model.fox_window=65 exceeds data.seq_len=64"),
    ({"model.fox_window": -1}, "model.fox_window=-1"),
])
def test_config_checks_name_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message):
    resolve(get_config("experiments/quickstart.py:fox", overrides))
