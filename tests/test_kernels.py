"""Fast paths of the shared kernels against their references: outputs, final state, all gradients."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.scan import linear_scan, linear_scan_reference
from kernels.window_attention import window_attention, window_attention_reference


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 33, 5), (1, 64, 2, 3)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_scan_matches_reference(shape, reverse, with_h0):
  ka, kb, kh, kg = jax.random.split(jax.random.key(hash((shape, reverse, with_h0)) % 2**31), 4)
  a = jax.random.uniform(ka, shape, minval=0.0, maxval=1.0)
  b = jax.random.normal(kb, shape)
  h0 = jax.random.normal(kh, (shape[0],) + shape[2:]) if with_h0 else None
  h, last = jax.jit(lambda a, b, h0: linear_scan(a, b, h0, reverse=reverse, impl="xla"))(a, b, h0)
  h_ref, last_ref = jax.jit(lambda a, b, h0: linear_scan_reference(a, b, h0, reverse=reverse))(a, b, h0)
  assert h.shape == b.shape and last.shape == (shape[0],) + shape[2:]
  assert _rel_err(h, h_ref) < 1e-5 and _rel_err(last, last_ref) < 1e-5

  cotangent = jax.random.normal(kg, shape)
  def loss(impl):
    def f(a, b, h0):
      h, last = linear_scan(a, b, h0, reverse=reverse, impl=impl)
      return jnp.sum(h * cotangent) + jnp.sum(last ** 2)
    return f
  args = (a, b, h0 if with_h0 else jnp.zeros((shape[0],) + shape[2:]))
  grads = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(*args)
  grads_ref = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(*args)
  for g, g_ref in zip(grads, grads_ref):
    assert _rel_err(g, g_ref) < 1e-4


def test_linear_scan_decays_near_zero_and_one_stay_finite():
  t = 4096
  a = jnp.concatenate([jnp.full((1, t // 2, 4), 1.0 - 1e-7), jnp.full((1, t // 2, 4), 1e-30)], axis=1)
  b = jnp.ones((1, t, 4))
  h, last = jax.jit(lambda a, b: linear_scan(a, b, impl="xla"))(a, b)
  h_ref, _ = jax.jit(linear_scan_reference)(a, b)
  assert np.all(np.isfinite(h)) and _rel_err(h, h_ref) < 1e-5


def test_linear_scan_bf16_accumulates_in_f32():
  # 0.99 is 0.98828125 in bf16 (0.999 would round to 1.0 and leave the decay untested).
  a = jnp.full((1, 512, 8), 0.99, jnp.bfloat16)
  b = jnp.full((1, 512, 8), 0.01, jnp.bfloat16)
  h, last = linear_scan(a, b, impl="xla")
  h_ref, last_ref = linear_scan_reference(a.astype(jnp.float32), b.astype(jnp.float32))
  assert h.dtype == jnp.bfloat16 and last.dtype == jnp.float32
  # The f32 state differs from the sequential f32 reference only by the parallel scan's reassociation
  # (~7e-7, a few f32 ulps); accumulating in bf16 would be off by ~2e-2.
  assert _rel_err(last, last_ref) < 2e-6
  # h is the f32 result rounded once to bf16 (2⁻⁹ ≈ 2e-3 relative).
  assert _rel_err(h, h_ref) < 1e-2


def test_linear_scan_rejects_bad_shapes():
  with pytest.raises(ValueError, match="same shape"):
    linear_scan(jnp.ones((1, 3, 2)), jnp.ones((1, 3, 3)))
  with pytest.raises(ValueError, match="unknown impl"):
    linear_scan(jnp.ones((1, 3, 2)), jnp.ones((1, 3, 2)), impl="cuda")


ATTN_CASES = [  # (time, window, heads, kv_heads, block, softcap)
    (37, 5, 4, 2, None, None), (64, 16, 4, 1, None, 5.0), (50, 49, 2, 2, 8, None), (9, 3, 2, 1, 4, 5.0),
    (129, 100, 2, 2, None, None), (17, 16, 2, 1, None, None), (33, 1, 2, 2, None, None),
    (31, 30, 4, 2, None, 5.0),
]  # windows below the length: "xla" hands a global or longer window to the reference (tested below)


@pytest.mark.parametrize("time,window,heads,kv_heads,block,softcap", ATTN_CASES)
def test_window_attention_matches_reference(time, window, heads, kv_heads, block, softcap):
  kq, kk, kv, kg = jax.random.split(jax.random.key(time * 1000 + (window or 0)), 4)
  q = jax.random.normal(kq, (2, time, heads, 8))
  k = jax.random.normal(kk, (2, time, kv_heads, 8))
  v = jax.random.normal(kv, (2, time, kv_heads, 8))
  cot = jax.random.normal(kg, q.shape)

  @jax.jit
  def outputs_and_grads(q, k, v):
    results = []
    for impl in ("xla", "reference"):
      f = lambda q, k, v: window_attention(q, k, v, window=window, softcap=softcap, impl=impl, block_size=block)
      out, vjp = jax.vjp(f, q, k, v)
      results.append((out, vjp(cot)))
    return results

  (out, grads), (ref, grads_ref) = outputs_and_grads(q, k, v)
  assert out.shape == q.shape and _rel_err(out, ref) < 1e-5
  for g, g_ref in zip(grads, grads_ref):
    assert _rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("window,softcap", [(4, None), (None, 5.0), (40, None)])
def test_window_attention_is_the_definition(impl, window, softcap):
  """The dense reference, and ``"xla"``, against a per-position numpy loop. For a global window or one
  longer than the sequence ``"xla"`` runs the dense reference (no band to exploit), so this loop, not
  the reference, is what those cases are compared with."""
  rng = np.random.default_rng(0)
  time, d = 11, 8
  q, k, v = (rng.standard_normal((1, time, 1, d)) for _ in range(3))
  attention = (window_attention_reference if impl == "reference"
               else lambda *qkv, **kw: window_attention(*qkv, impl=impl, **kw))
  out = np.asarray(attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                             jnp.asarray(v, jnp.float32), window=window, softcap=softcap))
  for t in range(time):
    s = np.arange(0 if window is None else max(0, t - window + 1), t + 1)
    logits = k[0, s, 0] @ q[0, t, 0] / np.sqrt(d)
    if softcap is not None:
      logits = softcap * np.tanh(logits / softcap)
    p = np.exp(logits - logits.max()); p /= p.sum()
    np.testing.assert_allclose(out[0, t, 0], p @ v[0, s, 0], rtol=1e-5, atol=1e-6)


def test_window_attention_banded_path_never_builds_time_squared_scores():
  """O(T·W): the compiled banded path's largest intermediate is far below T²."""
  time, window = 1024, 16
  q = jnp.zeros((1, time, 1, 8))
  hlo = jax.jit(lambda q: window_attention(q, q, q, window=window, impl="xla")).lower(q).as_text()
  assert f"{time},{time}" not in hlo.replace(" ", "")


def test_window_attention_rejects_bad_input():
  q = jnp.zeros((1, 4, 3, 8)); k = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    window_attention(q, k, k, window=2)
  with pytest.raises(ValueError, match="window must be a positive"):
    window_attention(q, q, q, window=0)


from kernels.gla import gla, gla_reference, gla_step  # noqa: E402

GLA_CASES = [  # (time, chunk, decay kind)
    (1, 16, "dim"), (37, 16, "dim"), (37, 8, "head"), (20, 16, None), (64, 16, "dim"), (13, 4, "head"),
]


def _gla_inputs(time, kind, seed=0, decay_scale=3.0):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (2, time, 3, 4))
  k = jax.random.normal(ks[1], (2, time, 3, 4))
  v = jax.random.normal(ks[2], (2, time, 3, 5))
  shape = {"dim": (2, time, 3, 4), "head": (2, time, 3)}.get(kind)
  log_decay = None if kind is None else jax.nn.log_sigmoid(decay_scale * jax.random.normal(ks[3], shape))
  h0 = jax.random.normal(ks[4], (2, 3, 4, 5))
  return q, k, v, log_decay, h0, jax.random.normal(ks[5], (2, time, 3, 5))


@pytest.mark.parametrize("time,chunk,kind", GLA_CASES)
def test_gla_chunked_matches_reference(time, chunk, kind):
  q, k, v, log_decay, h0, cot = _gla_inputs(time, kind)
  cot_state = jax.random.normal(jax.random.key(9), h0.shape)

  @jax.jit
  def outputs_and_grads(q, k, v, log_decay, h0):
    results = []
    for impl in ("xla", "reference"):
      f = lambda *a: gla(*a, chunk_size=chunk, impl=impl)
      (o, s), vjp = jax.vjp(f, q, k, v, log_decay, h0)
      results.append((o, s, vjp((cot, cot_state))))
    return results

  (o, s, grads), (o_ref, s_ref, grads_ref) = outputs_and_grads(q, k, v, log_decay, h0)
  assert _rel_err(o, o_ref) < 1e-5 and _rel_err(s, s_ref) < 1e-5
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert _rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("kind", ["dim", "head"])
def test_gla_extreme_decays_stay_finite(kind):
  """Decays near 0 (log α = −60) and near 1 (log α = −1e-7): no overflow in the chunked form."""
  q, k, v, _, h0, _ = _gla_inputs(48, kind)
  shape = q.shape if kind == "dim" else q.shape[:3]
  log_decay = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, shape), -60.0, -1e-7)
  o, s = jax.jit(lambda *a: gla(*a, chunk_size=16, impl="xla"))(q, k, v, log_decay, h0)
  o_ref, s_ref = jax.jit(gla_reference)(q, k, v, log_decay, h0)
  grads = jax.jit(jax.grad(lambda ld: jnp.sum(gla(q, k, v, ld, h0, chunk_size=16, impl="xla")[0])))(log_decay)
  assert np.all(np.isfinite(o)) and np.all(np.isfinite(grads))
  assert _rel_err(o, o_ref) < 1e-5 and _rel_err(s, s_ref) < 1e-5


def test_gla_bf16_inputs():
  q, k, v, log_decay, h0, _ = _gla_inputs(40, "dim")
  bf = lambda x: x.astype(jnp.bfloat16)
  o, s = jax.jit(lambda *a: gla(*a, chunk_size=16, impl="xla"))(bf(q), bf(k), bf(v), log_decay, h0)
  o_ref, _ = jax.jit(gla_reference)(bf(q).astype(jnp.float32), bf(k).astype(jnp.float32),
                                    bf(v).astype(jnp.float32), log_decay, h0)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert _rel_err(o, o_ref) < 1e-2


def test_gla_step_matches_reference():
  q, k, v, log_decay, h0, _ = _gla_inputs(6, "dim")
  o_ref, s_ref = gla_reference(q, k, v, log_decay, h0)
  state = h0
  for t in range(6):
    o_t, state = gla_step(q[:, t], k[:, t], v[:, t], log_decay[:, t], state)
    assert _rel_err(o_t, o_ref[:, t]) < 1e-5
  assert _rel_err(state, s_ref) < 1e-5


def test_gla_rejects_bad_shapes():
  q = jnp.zeros((1, 4, 2, 3))
  with pytest.raises(ValueError, match="log_decay"):
    gla(q, q, q, jnp.zeros((1, 4, 3)))
  with pytest.raises(ValueError, match="unknown impl"):
    gla(q, q, q, impl="triton")


def _gated_inputs(time, extreme, seed=0):
  """mLSTM-style inputs: per-head log-decay and input gate ĩ; ``extreme``: ĩ ∈ [−30, 30] and log f down to −30."""
  ks = jax.random.split(jax.random.key(seed), 9)
  q, k = jax.random.normal(ks[0], (2, time, 3, 4)), jax.random.normal(ks[1], (2, time, 3, 4))
  v = jax.random.normal(ks[2], (2, time, 3, 5))
  if extreme:
    strong = jax.random.bernoulli(ks[3], 0.3, (2, time, 3))
    log_f = jnp.where(strong, -30.0 * jax.random.uniform(ks[4], (2, time, 3)),
                      jax.nn.log_sigmoid(3.0 * jax.random.normal(ks[5], (2, time, 3))))
    log_i = jax.random.uniform(ks[6], (2, time, 3), minval=-30.0, maxval=30.0)
  else:
    log_f = jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[4], (2, time, 3)))
    log_i = jax.random.normal(ks[6], (2, time, 3))
  state0 = (jax.random.normal(ks[7], (2, 3, 4, 5)), jax.random.normal(ks[8], (2, 3)))
  return q, k, v, log_f, log_i, state0


def test_gla_input_gate_chunked_matches_reference():
  """Stabilised exponential input gate: chunked == token-by-token for the outputs, the final (S, m),
  the per-step stabiliser and the gradients wrt every input, finite even for ĩ = +30, log f = −30
  (T = 13 in chunks of 4)."""
  time, chunk = 13, 4
  q, k, v, log_f, log_i, state0 = _gated_inputs(time, extreme=True)
  cots = (jax.random.normal(jax.random.key(3), v.shape),
          (jax.random.normal(jax.random.key(4), state0[0].shape), jax.random.normal(jax.random.key(5), (2, 3))),
          jax.random.normal(jax.random.key(6), log_i.shape))

  @jax.jit
  def outputs_and_grads(q, k, v, log_f, log_i, state0):
    results = []
    for impl in ("xla", "reference"):
      f = lambda q, k, v, log_f, log_i, s0: gla(q, k, v, log_f, s0, log_input_gate=log_i, chunk_size=chunk, impl=impl)
      out, vjp = jax.vjp(f, q, k, v, log_f, log_i, state0)
      results.append((out, vjp(cots)))
    return results

  (out, grads), (out_ref, grads_ref) = outputs_and_grads(q, k, v, log_f, log_i, state0)
  o, (s, m_last), m = out
  assert o.shape == v.shape and s.shape == state0[0].shape and m_last.shape == (2, 3) and m.shape == log_i.shape
  np.testing.assert_array_equal(m[:, -1], m_last)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
    assert np.all(np.isfinite(a)) and _rel_err(a, b) < 1e-5
  assert len(jax.tree.leaves(grads)) == 7
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert np.all(np.isfinite(g)) and _rel_err(g, g_ref) < 1e-4


def test_gla_input_gate_is_the_unstabilised_recurrence():
  """On mild values exp(m_t)·o_t and exp(m)·S equal C_t = f_t C_{t−1} + exp(ĩ_t) k_t v_tᵀ (plain ``gla``
  with k scaled by exp(ĩ), starting from exp(m_0)·S_0); ``gla_step`` follows the reference."""
  q, k, v, log_f, log_i, (s0, m0) = _gated_inputs(10, extreme=False)

  @jax.jit
  def both(q, k, v, log_f, log_i, s0, m0):
    gated = gla(q, k, v, log_f, (s0, m0), log_input_gate=log_i, chunk_size=4, impl="xla")
    plain = gla(q, k * jnp.exp(log_i)[..., None], v, log_f, s0 * jnp.exp(m0)[..., None, None], chunk_size=4, impl="xla")
    return gated, plain

  (o, (s, m_last), m), (o_plain, s_plain) = both(q, k, v, log_f, log_i, s0, m0)
  assert _rel_err(o * jnp.exp(m)[..., None], o_plain) < 1e-5
  assert _rel_err(s * jnp.exp(m_last)[..., None, None], s_plain) < 1e-5
  step = jax.jit(lambda q, k, v, f, i, state: gla_step(q, k, v, f, state, log_input_gate_t=i))
  state = (s0, m0)
  for t in range(10):
    o_t, state = step(q[:, t], k[:, t], v[:, t], log_f[:, t], log_i[:, t], state)
    assert _rel_err(o_t, o[:, t]) < 1e-5 and _rel_err(state[1], m[:, t]) < 1e-5
  assert _rel_err(state[0], s) < 1e-5
  # No decay (f = 1), one chunk longer than the sequence: the chunked form against the same formula.
  none = jax.jit(lambda q, k, v, log_i: (gla(q, k, v, None, log_input_gate=log_i, chunk_size=16, impl="xla"),
                                         gla(q, k * jnp.exp(log_i)[..., None], v, chunk_size=16, impl="xla")))
  (o, (s, m_last), m), (o_plain, s_plain) = none(q, k, v, log_i)
  assert _rel_err(o * jnp.exp(m)[..., None], o_plain) < 1e-5
  assert _rel_err(s * jnp.exp(m_last)[..., None, None], s_plain) < 1e-5
  with pytest.raises(ValueError, match="per-head log_decay"):
    gla(q, k, v, jnp.zeros(q.shape), log_input_gate=log_i)
  with pytest.raises(ValueError, match=r"initial_state must be \(S"):
    gla(q, k, v, log_f, s0, log_input_gate=log_i)


def test_resolve_impls_names_what_auto_runs(monkeypatch):
  from hybrids.config import base_config
  from kernels import resolve_impls

  m = base_config("mqar").model
  assert resolve_impls(m) == {"attention": "xla", "scan": "xla", "gla": "xla", "delta": "xla", "dplr": "xla",
                            "forgetting_attention": "xla"}  # CPU
  m.scan_impl = "reference"
  assert resolve_impls(m)["scan"] == "reference"  # an explicit choice is kept
  m.scan_impl = "auto"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the rules as a CUDA host applies them
  m.dtype, m.attn_softcap, m.chunk_size = "bfloat16", 0.0, 16
  assert resolve_impls(m) == {"attention": "cudnn", "scan": "pallas", "gla": "pallas", "delta": "pallas", "dplr": "xla",
                            "forgetting_attention": "xla"}
  m.dtype, m.chunk_size = "float32", 8  # cuDNN needs 16-bit inputs; Pallas delta needs a chunk ≥ 16
  # float32 attention and GLA: XLA (the Pallas kernels were slower there where measured)
  assert resolve_impls(m) == {"attention": "xla", "scan": "pallas", "gla": "xla", "delta": "xla", "dplr": "xla",
                              "forgetting_attention": "xla"}
  assert "float32" in importlib.import_module("kernels").kernel_choices(m)["gla"]["rejected"]["pallas/triton"]
  m.attention_impl = m.gla_impl = "pallas"  # asked for by name, they run
  assert resolve_impls(m) == {"attention": "pallas/triton", "scan": "pallas", "gla": "pallas", "delta": "xla",
                              "dplr": "xla", "forgetting_attention": "xla"}
  m.attention_impl = m.gla_impl = "auto"
  wa = importlib.import_module("kernels.window_attention")  # (the package exports a function of that name)
  monkeypatch.setattr(wa, "tma_gpu", lambda: True)  # a Hopper host: our Mosaic GPU kernels for 16-bit heads
  m.dtype, m.chunk_size = "bfloat16", 16
  assert resolve_impls(m)["attention"] == "cudnn"  # head_dim 16: the Mosaic GPU kernels need 64 or 128
  m.head_dim = 64
  assert resolve_impls(m)["attention"] == "pallas/mosaic_gpu"


def test_gla_and_delta_auto_take_pallas_on_gpu_only_for_measured_head_dims(monkeypatch):
  # H100: Based's 153-dim feature map (padded to 256) overflows the GLA output kernel's shared
  # memory (kernels.check_auto found it), so "auto" keeps such heads on the XLA form.
  from kernels.delta import delta_rule
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  small, based = jnp.zeros((1, 32, 2, 64)), jnp.zeros((1, 32, 2, 153))
  beta = jnp.zeros((1, 32, 2))
  uses_pallas = lambda f, *args: "pallas_call" in str(jax.make_jaxpr(f)(*args))
  small16, based16 = small.astype(jnp.bfloat16), based.astype(jnp.bfloat16)
  assert uses_pallas(lambda q, v: gla(q, q, v, impl="auto"), small16, small16)
  assert not uses_pallas(lambda q, v: gla(q, q, v, impl="auto"), based16, small16)
  assert not uses_pallas(lambda q, v: gla(q, q, v, impl="auto"), small, small)  # float32: XLA
  assert uses_pallas(lambda q, v: delta_rule(q, q, v, beta, impl="auto"), small, small)
  assert not uses_pallas(lambda q, v: delta_rule(q, q, v, beta, impl="auto", chunk_size=8), small, small)
  assert not uses_pallas(lambda q, v: delta_rule(q, q, v, beta, impl="auto"), small, based)
