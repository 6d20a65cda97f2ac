"""Every registered mixer: shapes, causality, parallel face == recurrent face, prefill-then-step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import model_config
from hybrids.mixers import MIXERS, get_mixer


def small_config(**overrides):
  c = model_config()
  c.d_model, c.num_heads, c.num_kv_heads, c.window = 16, 4, 2, 5
  for k, v in overrides.items():
    c[k] = v
  return c


class Jitted:
  """A mixer's two faces, each compiled once (eager dispatch would dominate the test time)."""

  def __init__(self, module):
    self.module = module
    graphdef, params = nnx.split(module)
    self.params = params
    self._call = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    self._prefill = jax.jit(lambda p, x, max_len: nnx.merge(graphdef, p)(x, return_state=True, max_len=max_len),
                            static_argnums=2)
    self._step = jax.jit(lambda p, x, s: nnx.merge(graphdef, p).step(x, s))

  def __call__(self, x, *, return_state=False, max_len=None):
    return self._prefill(self.params, x, max_len) if return_state else self._call(self.params, x)

  def step(self, x_t, state):
    return self._step(self.params, x_t, state)

  def __getattr__(self, name):
    return getattr(self.module, name)


def make(name, **overrides):
  """A jitted mixer; the default ones are shared by every test, so each face compiles once per shape."""
  if not overrides:
    return _default_mixer(name)
  return Jitted(get_mixer(name)(small_config(**overrides), rngs=nnx.Rngs(params=0)))


@functools.lru_cache(maxsize=None)
def _default_mixer(name):
  return Jitted(get_mixer(name)(small_config(), rngs=nnx.Rngs(params=0)))


def run_steps(mixer, x, state):
  ys = []
  for t in range(x.shape[1]):
    y, state = mixer.step(x[:, t], state)
    ys.append(y)
  return jnp.stack(ys, axis=1), state


def _close(a, b, tol=1e-5):
  kind = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
  a, b = np.asarray(a, kind), np.asarray(b, kind)
  if a.size == 0:
    assert b.size == 0
    return
  assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


# One odd length for every test below, so each mixer's parallel face compiles once per shape in all.
T_ODD = 13


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_shapes(name):
  mixer = make(name)
  y = mixer(jnp.ones((2, T_ODD, 16)))
  assert y.shape == (2, T_ODD, 16) and y.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_causal(name):
  mixer = make(name)
  x = jax.random.normal(jax.random.key(1), (2, T_ODD, 16))
  y = mixer(x)
  for t in (0, 6, T_ODD - 1):
    y2 = mixer(x.at[:, t].add(3.0))
    # Within float rounding: FFT convolutions (S4D) mix rounding across positions, a leak is O(1).
    _close(y2[:, :t], y[:, :t], tol=1e-6)
    assert np.max(np.abs(y2[:, t] - y[:, t])) > 1e-3


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("time", [1, T_ODD])
def test_parallel_equals_recurrent(name, time):
  mixer = make(name)
  x = jax.random.normal(jax.random.key(time), (2, time, 16))
  y_parallel, state_parallel = mixer(x, return_state=True, max_len=time)
  y_steps, state_steps = run_steps(mixer, x, mixer.init_state(2, max_len=time))
  _close(y_steps, y_parallel)
  for a, b in zip(jax.tree.leaves(state_steps), jax.tree.leaves(state_parallel)):
    _close(a, b)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_prefill_then_step_equals_parallel(name):
  mixer = make(name)
  x = jax.random.normal(jax.random.key(7), (2, T_ODD, 16))
  y_full = mixer(x)
  _, state = mixer(x[:, :7], return_state=True, max_len=T_ODD)
  y_rest, _ = run_steps(mixer, x[:, 7:], state)
  _close(y_rest, y_full[:, 7:])


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_gradients_finite(name):
  mixer = make(name)
  x = jax.random.normal(jax.random.key(3), (2, T_ODD, 16))
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(mixer._call(p, x) ** 2), argnums=(0, 1)))(mixer.params, x)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads[0]))


def test_swa_decoding_memory_is_the_window():
  swa = make("swa", window=5)
  state = swa.init_state(2)
  assert state["k"].shape == (2, 5, 2, 4)
  x = jax.random.normal(jax.random.key(0), (2, 40, 16))
  y_steps, state = run_steps(swa, x, state)
  assert state["k"].shape == (2, 5, 2, 4)  # constant after 40 > window steps
  _close(y_steps, swa(x))


def test_swa_window_equals_attention_when_window_covers_sequence():
  x = jax.random.normal(jax.random.key(0), (1, 9, 16))
  _close(make("swa", window=9)(x), make("attention")(x))


def test_swa_window_one_reads_only_itself():
  """W=1: softmax over a single key, so the output ignores every other position's key/value."""
  swa = make("swa", window=1)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))
  y = swa(x)
  for t in range(6):
    _close(swa(x[:, t:t + 1])[:, 0], y[:, t])


def test_rglru_initial_decay_range():
  """σ(Λ) starts on recurrentgemma's ring [0.9, 0.999] (its released init; the paper's §2.4 puts a^c
  there instead — issue 23 follows the released code)."""
  block = make("rglru", d_model=256)
  a = jax.nn.sigmoid(block.module.a_param[...])
  assert float(a.min()) >= 0.9 - 1e-5 and float(a.max()) <= 0.999 + 1e-5
  assert float(a.max() - a.min()) > 0.05


def test_rglru_matches_its_equations():
  """The block against the paper's equations written out with numpy, one step at a time."""
  from hybrids.mixers.rglru import C
  block = make("rglru")
  x = np.asarray(jax.random.normal(jax.random.key(4), (1, 6, 16)), np.float64)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(block.params))
  gelu = lambda z: np.asarray(jax.nn.gelu(jnp.asarray(z)), np.float64)
  sig = lambda z: 1 / (1 + np.exp(-z))
  bd = lambda z, q: np.einsum("hi,hij->hj", z.reshape(q["kernel"].shape[0], -1), q["kernel"]).ravel() + q["bias"].ravel()
  conv_in = x[0] @ p["in_proj"]["kernel"]
  h = np.zeros(16)
  outs = []
  for t in range(6):
    window = [conv_in[t - 3 + i] if t - 3 + i >= 0 else np.zeros(16) for i in range(4)]
    u = sum(p["conv"]["kernel"][i] * window[i] for i in range(4)) + p["conv"]["bias"]
    r, i_gate = sig(bd(u, p["recurrence_gate"])), sig(bd(u, p["input_gate"]))
    a = sig(p["a_param"]) ** (C * r)
    # recurrentgemma's reset: the document's first token enters undamped (a = 0, multiplier 1).
    h = (i_gate * u) if t == 0 else a * h + np.sqrt(1 - a ** 2) * (i_gate * u)
    outs.append((h * gelu(x[0, t] @ p["gate_proj"]["kernel"])) @ p["out_proj"]["kernel"])
  _close(block(jnp.asarray(x, jnp.float32))[0], np.stack(outs), tol=1e-5)


def test_unknown_mixer_lists_valid_ones():
  with pytest.raises(ValueError) as error:
    get_mixer("mamba9")
  assert str(error.value) == "unknown mixer 'mamba9'; valid mixers: " + ", ".join(sorted(MIXERS))
  assert {"attention", "swa", "rglru", "mamba2", "gla"} <= set(MIXERS)


def test_retnet_matches_its_parallel_closed_form():
  """RetNet's O = (Q Kᵀ ⊙ D) V with D_ts = γ^(t−s), before the group norm and gate."""
  from hybrids.mixers.retnet import head_decays
  retnet = make("retnet").module
  x = jax.random.normal(jax.random.key(5), (1, 10, 16))
  q, k, v = retnet._qkv(x, jnp.arange(10))
  gamma = jnp.exp(head_decays(4))
  t = jnp.arange(10)
  d = jnp.where(t[:, None] >= t[None, :], gamma[:, None, None] ** (t[:, None] - t[None, :]), 0.0)  # [h t s]
  o = jnp.einsum("thd,shd,hts,she->the", q[0], k[0], d, v[0])
  from kernels.gla import gla
  o_kernel, _ = gla(q, k, v, jnp.broadcast_to(head_decays(4), (1, 10, 4)), chunk_size=4, impl="xla")
  _close(o_kernel[0], o, tol=1e-5)
  assert np.allclose(gamma, 1 - 2.0 ** (-5 - np.arange(4)))


def test_linear_attention_is_normalised_feature_map_attention():
  """o_t = Σ_s φ(q_t)·φ(k_s) v_s / Σ_s φ(q_t)·φ(k_s), written out directly."""
  from hybrids.mixers.linear_attention import feature_map
  mixer = make("linear_attention").module
  x = jax.random.normal(jax.random.key(6), (1, 9, 16))
  split = lambda z: z.reshape(1, 9, 4, 4)
  q, k, v = feature_map(split(mixer.q_proj(x))), feature_map(split(mixer.k_proj(x))), split(mixer.v_proj(x))
  w = jnp.einsum("thd,shd->hts", q[0], k[0]) * jnp.tril(jnp.ones((9, 9)))
  o = jnp.einsum("hts,she->the", w, v[0]) / (w.sum(-1).T[..., None] + 1e-6)
  _close(mixer(x)[0], mixer.o_proj(o.reshape(9, 16)), tol=1e-5)


def test_based_taylor_kernel_closed_form():
  """φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) (Based §3.1)."""
  from hybrids.mixers.based import taylor_feature_map
  q, k = jax.random.normal(jax.random.key(0), (2, 5, 16))
  dot = jnp.sum(q * k, -1)
  _close(jnp.sum(taylor_feature_map(q) * taylor_feature_map(k), -1), 1 + dot / 4.0 + dot ** 2 / 32.0)


def test_based_quadratic_form_is_the_chunked_form():
  """``model.based_form="quadratic"`` (the Taylor kernel of q·k as a T × T product) computes what the
  chunked feature form computes, from the same parameters: outputs, the final state (the last
  document's), every gradient, at an odd length, with packed documents; and the step face continues it."""
  x = jax.random.normal(jax.random.key(11), (2, T_ODD, 16))
  # an id that recurs after another is a new document (kernels.documents)
  segments = jnp.asarray([[0] * 5 + [1] * 6 + [0] * 2, [0] * T_ODD], jnp.int32)
  chunk = get_mixer("based")(small_config(feature_dim=4, chunk_size=4, based_form="chunk"), rngs=nnx.Rngs(params=3))
  quad = get_mixer("based")(small_config(feature_dim=4, chunk_size=4, based_form="quadratic"), rngs=nnx.Rngs(params=3))
  for segment_ids in (None, segments):
    (y_c, s_c), (y_q, s_q) = (m(x, return_state=True, segment_ids=segment_ids) for m in (chunk, quad))
    _close(y_q, y_c, tol=1e-6)
    _close(s_q["S"], s_c["S"], tol=1e-6)
    loss = lambda m: jnp.sum(jnp.sin(m(x, segment_ids=segment_ids)))
    g_c, g_q = nnx.grad(loss)(chunk), nnx.grad(loss)(quad)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_q), nnx.to_flat_state(g_c)):
      _close(a[...], b[...], tol=1e-6)
  # the decoding state the quadratic prefill hands over continues exactly as the chunked one's does
  _, state = quad(x[:, :-1], return_state=True)
  y_step, _ = quad.step(x[:, -1], state)
  _close(y_step, chunk(x)[:, -1], tol=1e-6)
  assert quad.flops(T_ODD).total() > 0 and quad.flops(64).recurrence > quad.flops(32).recurrence


def test_based_auto_form_takes_the_form_with_fewer_flops_at_each_length():
  """``model.based_form="auto"`` (the default) runs, per call, the form that does fewer FLOPs at the call's
  length: quadratic for Zoology's short rows (T 256, d' 8, where it was measured faster), chunked for long
  ones; its outputs and FLOP count are that form's."""
  auto, chunk, quad = (get_mixer("based")(small_config(d_model=64, num_heads=1, feature_dim=8, based_form=form),
                                          rngs=nnx.Rngs(params=3)) for form in ("auto", "chunk", "quadratic"))
  assert small_config().based_form == "auto"
  assert [auto.form_for(t) for t in (64, 256, 512, 2048)] == ["quadratic", "quadratic", "chunk", "chunk"]
  assert chunk.form_for(64) == "chunk" and quad.form_for(4096) == "quadratic"
  for t, same in ((64, quad), (512, chunk)):
    assert auto.flops(t) == same.flops(t)
    assert auto.flops(t).total() == min(chunk.flops(t).total(), quad.flops(t).total())
    x = jax.random.normal(jax.random.key(t), (1, t, 64))
    assert jnp.array_equal(auto(x), same(x))
  with pytest.raises(ValueError, match=r"model.based_form='fast'; valid: auto, chunk, quadratic"):
    get_mixer("based").check_config(small_config(based_form="fast"), seq_len=8)


def test_mamba_recurrence_matches_selective_scan_definition():
  """Mamba's parallel face against h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t B_t, y_t = C_t·h_t, looped in numpy."""
  mamba = make("mamba").module
  u = jax.random.normal(jax.random.key(2), (1, 7, 16))
  x, z = jnp.split(mamba.in_proj(u), 2, axis=-1)
  x = jax.nn.silu(mamba.conv(x))
  decay, inputs, c = mamba._scan_inputs(x)
  h = np.zeros(decay.shape[2:])
  ys = []
  for t in range(7):
    h = np.asarray(decay[0, t]) * h + np.asarray(inputs[0, t])
    ys.append(h @ np.asarray(c[0, t]))
  y = np.stack(ys) + np.asarray(mamba.d_skip[...] * x[0])
  ref = mamba.out_proj(jnp.asarray(y * np.asarray(jax.nn.silu(z[0])), jnp.float32))
  _close(mamba(u)[0], ref, tol=1e-5)


def test_s4d_convolution_kernel_is_the_unrolled_recurrence():
  """The filter S4D's parallel face convolves with (``S4D.kernel``) is the impulse response of the
  discretised system, h_t = Ā h_{t−1} + B̄ δ_t, K_t = 2 Re(C·h_t), unrolled in float64 numpy from the
  raw parameters (ZOH: Ā = exp(ΔA), B̄ = (Ā − 1)/A)."""
  time = 13
  s4d = get_mixer("s4d")(small_config(d_state=8), rngs=nnx.Rngs(params=0))
  # Random poles, not the S4D-Lin init's shared real part and integer multiples of π.
  rng = np.random.default_rng(8)
  s4d.log_neg_a_real[...] = jnp.asarray(rng.uniform(-3.0, 1.0, s4d.log_neg_a_real.shape), jnp.float32)
  s4d.a_imag[...] = jnp.asarray(rng.uniform(0.0, 10.0, s4d.a_imag.shape), jnp.float32)
  kernel = s4d.kernel(time)
  assert kernel.shape == (16, time)

  p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(s4d)))
  a = -np.exp(p["log_neg_a_real"]) + 1j * p["a_imag"]
  a_bar = np.exp(np.exp(p["log_dt"])[:, None] * a)
  b_bar, c = (a_bar - 1) / a, p["c"][0] + 1j * p["c"][1]
  h = np.zeros(a.shape, np.complex128)
  impulse = []
  for t in range(time):
    h = a_bar * h + b_bar * (1.0 if t == 0 else 0.0)
    impulse.append(2 * np.real(np.sum(c * h, -1)))
  _close(kernel.T, np.stack(impulse), tol=1e-5)


def _numpy_modal_filter(p, length):
  """h_l = Re Σ_n R_n λ_n^l from ModalLongConv's parameters, with log λ = −exp(ν) + iθ, in float64."""
  log_poles = -np.exp(p["log_rate"]) + 1j * p["angle"]
  residues = p["residues"][0] + 1j * p["residues"][1]
  return np.real(np.einsum("cn,cnl->cl", residues, np.exp(log_poles[..., None] * np.arange(length))))


def _numpy_causal_conv(u, h):
  """y_t = Σ_{l≤t} h_l u_{t−l}, the O(T²) definition; u [time, channels], h [channels, time]."""
  return np.stack([sum(h[:, l] * u[t - l] for l in range(t + 1)) for t in range(u.shape[0])])


def _numpy_short_conv(u, p):
  width = p["kernel"].shape[0]
  padded = np.concatenate([np.zeros((width - 1, u.shape[1])), u])
  return np.stack([np.sum(p["kernel"] * padded[t:t + width], 0) for t in range(u.shape[0])]) + p["bias"]


def test_modal_long_conv_is_a_causal_convolution_with_the_recurrence_impulse_response():
  """FFT face == direct O(T²) causal convolution with the materialised filter (odd T, not a power of 2);
  filter == impulse response of the recurrent face; the filter never grows (|λ| < 1)."""
  graphdef, params = nnx.split(make("hyena").module.filter)  # ModalLongConv, 16 channels × 16 modes
  u = jnp.asarray(np.random.default_rng(0).standard_normal((2, 37, 16)), jnp.float32)  # no per-shape RNG compile

  @jax.jit
  def faces(params, u):
    conv = nnx.merge(graphdef, params)
    impulse = jnp.zeros((1, 37, 16)).at[:, 0].set(1.0)
    _, response = jax.lax.scan(lambda s, u_t: conv.step(u_t, s)[::-1], conv.init_state(1), jnp.moveaxis(impulse, 1, 0))
    return conv(u), conv.kernel(37), response[:, 0]

  y, kernel, response = faces(params, u)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(params))
  _close(kernel, _numpy_modal_filter(p, 37))
  _close(response.T, kernel)
  for b in range(2):
    _close(y[b], _numpy_causal_conv(np.asarray(u[b], np.float64), np.asarray(kernel, np.float64)))
  assert np.all(np.exp(-np.exp(p["log_rate"])) < 1.0)


def _mixer_with_numpy_params(name, **random_params):
  """``make(name)`` after overwriting the named parameters with random values, and its params in float64."""
  module = get_mixer(name)(small_config(), rngs=nnx.Rngs(params=0))
  for i, (field, shape) in enumerate(random_params.items()):
    getattr(module, field)[...] = jnp.asarray(np.random.default_rng(100 + i).standard_normal(shape), jnp.float32)
  mixer = Jitted(module)
  return mixer, jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(mixer.params))


def test_hyena_matches_its_equations():
  """y = W_o(q ⊙ (h ∗ (k ⊙ v) + D ⊙ k ⊙ v)), (q, k, v) = ShortConv(W_in x), written out with numpy."""
  mixer, p = _mixer_with_numpy_params("hyena", d_skip=(16,))  # D starts at 0: make it count
  x = np.random.default_rng(8).standard_normal((1, 9, 16))
  q, k, v = np.split(_numpy_short_conv(x[0] @ p["in_proj"]["kernel"], p["conv"]), 3, axis=-1)
  z = k * v
  y = q * (_numpy_causal_conv(z, _numpy_modal_filter(p["filter"], 9)) + p["d_skip"] * z)
  _close(mixer(jnp.asarray(x, jnp.float32))[0], y @ p["out_proj"]["kernel"])


def test_baseconv_matches_its_equations():
  """y = W_out((W_proj x + b₁) ⊙ (ShortConv(u) + h ∗ u)), u = W_in x, written out with numpy."""
  mixer, p = _mixer_with_numpy_params("baseconv")
  x = np.random.default_rng(9).standard_normal((1, 9, 16))
  u = x[0] @ p["in_proj"]["kernel"]
  gate = x[0] @ p["gate_proj"]["kernel"] + p["gate_proj"]["bias"]
  c = _numpy_short_conv(u, p["conv"]) + _numpy_causal_conv(u, _numpy_modal_filter(p["filter"], 9))
  _close(mixer(jnp.asarray(x, jnp.float32))[0], (gate * c) @ p["out_proj"]["kernel"])


def _numpy_group_norm(h, heads, scale, eps=1e-5):
  """Per-head LayerNorm (GroupNorm with one group a head) of ``h [..., heads·d]``, float64."""
  g = h.reshape(h.shape[:-1] + (heads, -1))
  g = g - g.mean(-1, keepdims=True)
  g = g / np.sqrt((g * g).mean(-1, keepdims=True) + eps)
  return (g * scale).reshape(h.shape)


def test_mlstm_matches_its_unstabilised_recurrence():
  """mLSTM block against the paper's eqs. (§2.3) in float64 numpy, without stabiliser (mild gates):
  C_t = f_t C_{t−1} + i_t v_t k_tᵀ, n_t = f_t n_{t−1} + i_t k_t, h̃_t = C_t q_t / max(|n_tᵀq_t|, 1),
  y_t = W_down(σ(z_t) ⊙ (GroupNorm(h̃_t) + s ⊙ c_t))."""
  mixer = make("mlstm")
  graphdef = nnx.graphdef(mixer.module)
  x = jax.random.normal(jax.random.key(8), (1, 11, 16))

  @jax.jit
  def parts(params, x):
    m = nnx.merge(graphdef, params)
    u, z = jnp.split(m.up_proj(x), 2, axis=-1)
    c = jax.nn.silu(m.conv(u))
    q, k, v, log_i, log_f = m._inputs(x, u, c)
    return m(x), (q, k, v[..., :-1], jnp.exp(log_i), jnp.exp(log_f), c, z)

  y, inputs = parts(mixer.params, x)
  q, k, v, i, f, c, z = (np.asarray(a[0], np.float64) for a in inputs)
  assert 1e-2 < i.min() and i.max() < 1e2  # mild: the unstabilised formula is exact in float64
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(mixer.params))
  heads, d_h = q.shape[1:]
  C, n, hs = np.zeros((heads, d_h, d_h)), np.zeros((heads, d_h)), []
  for t in range(11):
    C = f[t, :, None, None] * C + i[t, :, None, None] * np.einsum("hv,hk->hvk", v[t], k[t])
    n = f[t, :, None] * n + i[t, :, None] * k[t]
    hs.append(np.einsum("hvk,hk->hv", C, q[t]) / np.maximum(np.abs(np.einsum("hk,hk->h", n, q[t])), 1.0)[:, None])
  h = _numpy_group_norm(np.stack(hs).reshape(11, -1), heads, p["norm"]["scale"]) + p["skip"] * c
  ref = (h / (1 + np.exp(-z))) @ p["down_proj"]["kernel"]
  _close(y[0], ref, tol=1e-5)


def test_slstm_matches_its_equations():
  """sLSTM against the paper's eqs. (§2.2) in float64 numpy, without stabiliser: gates from W x (i, f
  from the conv path), block-diagonal R h_{t−1} and biases; c, n, h = o ⊙ c / n; GroupNorm; W_out."""
  mixer = make("slstm")
  x = np.asarray(jax.random.normal(jax.random.key(9), (1, 9, 16)), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(mixer.params))
  sig = lambda a: 1 / (1 + np.exp(-a))
  heads = p["recurrent"].shape[1]
  assert np.abs(p["recurrent"]).max() > 0.1  # the memory mixing is exercised
  x_hat = _numpy_short_conv(x[0], p["conv"])
  x_hat = x_hat * sig(x_hat)
  w_z, w_o = np.split(p["zo_proj"]["kernel"], 2, axis=1)
  w_i, w_f = np.split(p["if_proj"]["kernel"], 2, axis=1)
  c, n, h, hs = np.zeros(16), np.zeros(16), np.zeros(16), []
  for t in range(9):
    rec = np.einsum("hi,ghij->ghj", h.reshape(heads, -1), p["recurrent"]).reshape(4, 16) + p["bias"]
    z = np.tanh(x[0, t] @ w_z + rec[0])
    i = np.exp(x_hat[t] @ w_i + rec[1])
    f = sig(x_hat[t] @ w_f + rec[2])
    o = sig(x[0, t] @ w_o + rec[3])
    c, n = f * c + i * z, f * n + i
    h = o * c / n
    hs.append(h)
  ref = _numpy_group_norm(np.stack(hs), heads, p["norm"]["scale"]) @ p["out_proj"]["kernel"]
  _close(mixer(jnp.asarray(x, jnp.float32))[0], ref, tol=1e-5)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_deltanet_matches_the_delta_rule_written_out(name):
  """(Gated) DeltaNet against its equations in float64 numpy: SiLU(ShortConv(W_qkv x)), unit q and k,
  β = σ(W_β x), α = exp(−softplus(W_α x + b_Δ)·e^{A_log}) (gated; else 1), one step at a time
  S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t, per-head RMSNorm, gate, W_o."""
  mixer = make(name)
  x = np.random.default_rng(10).standard_normal((11, 16))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(mixer.params))
  heads, d_h, width = 4, 4, p["conv"]["kernel"].shape[0]
  sig = lambda a: 1 / (1 + np.exp(-a))
  u = np.concatenate([np.zeros((width - 1, 48)), x @ p["qkv_proj"]["kernel"]])
  u = np.stack([np.sum(p["conv"]["kernel"] * u[t:t + width], 0) for t in range(11)]) + p["conv"]["bias"]
  q, k, v = (z.reshape(11, heads, d_h) for z in np.split(u * sig(u), 3, axis=-1))
  q, k = (z / np.sqrt(np.sum(z * z, -1, keepdims=True) + 1e-6) for z in (q, k))
  beta = sig(x @ p["beta_proj"]["kernel"])
  alpha = np.ones((11, heads))
  if name == "gated_deltanet":
    alpha = np.exp(-np.logaddexp(0, x @ p["alpha_proj"]["kernel"] + p["dt_bias"]) * np.exp(p["a_log"]))
    assert alpha.min() < 0.9  # the decay is exercised
  state, o = np.zeros((heads, d_h, d_h)), np.zeros((11, heads, d_h))
  for t in range(11):
    for h in range(heads):
      kt = k[t, h][:, None]
      state[h] = alpha[t, h] * (np.eye(d_h) - beta[t, h] * kt @ kt.T) @ state[h] + beta[t, h] * kt @ v[t, h][None]
      o[t, h] = state[h].T @ q[t, h]
  y = (o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-5) * p["norm"]["scale"]).reshape(11, 16)
  if name == "gated_deltanet":
    g = x @ p["g_proj"]["kernel"]
    y = y * g * sig(g)
  _close(mixer(jnp.asarray(x[None], jnp.float32))[0], y @ p["o_proj"]["kernel"], tol=1e-5)
