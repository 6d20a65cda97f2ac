"""kernels.dplr, the generalized delta rule ``S_t = (Diag(α_t) − a_t b_tᵀ) S_{t−1} + k_t v_tᵀ`` (issue 24),
and the mixers on it (``kda``, ``rwkv7``, ``gated_deltaproduct``).

The chunked form against the token recurrence (outputs, final state and the gradient of every
argument; per-key-channel, per-head and no decay; odd lengths; document starts inside a chunk, two in
one chunk and on a chunk edge; decays near 0 and near 1); the recurrence against float64 numpy and
each packed document alone; the special cases (the (gated) delta rule equals ``kernels.delta``, ``a = 0``
is gated linear attention, α = 1 and ``a = 0`` is linear attention); the dispatch; and each mixer
against its equations written out in numpy. The registry-driven tests (test_mixers, test_contract,
test_segments) cover the mixers' faces, contract and packed documents.

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_dplr.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import model_config
from hybrids.mixers import get_mixer
from kernels.delta import delta_rule
from kernels.dplr import choice, delta_rule_as_dplr, dplr
from kernels.gla import gla

BATCH, TIME, HEADS, D_K, D_V, CHUNK = 2, 13, 2, 4, 3, 4
# Documents of each row (TIME tokens, chunks of 4): starts at t = 5 and t = 6 (two inside one chunk, a
# one-token document), on chunk edges (t = 12, t = 4) and a one-token document on the row's last position.
ROWS = ((5, 1, 6, 1), (4, 9))
DECAYS = ("channel", "head", "none")
# Tiny programs: compile them without LLVM optimisation (CI time is mostly compiling).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(f, *args):
  """``jit(f)(*args)``, compiled with :data:`_FAST_COMPILE`."""
  return jax.jit(f).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _segment_ids():
  return np.stack([np.repeat(3 * np.arange(len(r)) + 7, r) for r in ROWS]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _inputs(decay: str, regime: str = "mixed"):
  """(q, k, v, a, b, log α | None, S₀) and cotangents (of o, of the final state), drawn with numpy
  (eager jax.random would compile every op). ``a, b`` of the delta rule's size (β k and α k with unit
  k) plus a perturbation, so that the transition stays near a contraction. ``regime``: log α spread
  over [−20, −1e-4] with two sevenths of the entries at each end and one at −200 (``"mixed"``), or
  ``"extreme"``: −20 everywhere in the first row and −1e-4 everywhere in the second (so that the
  first row's tiny gradients are measured against the second's, as the delta rule's tests do)."""
  rng = np.random.default_rng(DECAYS.index(decay) + 10 * ("mixed", "extreme").index(regime))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, v = normal(BATCH, TIME, HEADS, D_K), normal(BATCH, TIME, HEADS, D_V)
  k = normal(BATCH, TIME, HEADS, D_K)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = 1 / (1 + np.exp(-2.0 * normal(BATCH, TIME, HEADS, 1)))
  a = (beta * k + 0.2 * normal(BATCH, TIME, HEADS, D_K)).astype(np.float32)
  b = (k + 0.2 * normal(BATCH, TIME, HEADS, D_K)).astype(np.float32)
  shape = {"channel": (BATCH, TIME, HEADS, D_K), "head": (BATCH, TIME, HEADS), "none": (BATCH, TIME, HEADS)}[decay]
  spread = -np.exp(rng.uniform(np.log(1e-4), np.log(20.0), shape))
  ends = rng.integers(0, 7, shape)
  mixed = np.select([ends < 2, ends < 4, ends == 4], [-20.0, -1e-4, -200.0], spread)
  extreme = np.where(np.arange(BATCH).reshape((BATCH,) + (1,) * (len(shape) - 1)) == 0, -20.0, -1e-4)
  log_decay = {"mixed": mixed, "extreme": np.broadcast_to(extreme, shape)}[regime]
  args = (q, k, v, a, b, None if decay == "none" else log_decay.astype(np.float32), normal(BATCH, HEADS, D_K, D_V))
  return args, (normal(BATCH, TIME, HEADS, D_V), normal(BATCH, HEADS, D_K, D_V))


@functools.lru_cache(maxsize=None)
def _value_and_grads(impl: str, decay: str, regime: str, packed: bool, chunk: int):
  """(o, final state, gradients of every argument) of ``dplr`` under the cotangents of :func:`_inputs`."""
  args, (cot_o, cot_s) = _inputs(decay, regime)
  segment_ids = _segment_ids() if packed else None
  present = [i for i, x in enumerate(args) if x is not None]

  def run(*xs):
    def f(*xs):
      full = list(args)
      for i, x in zip(present, xs):
        full[i] = x
      return dplr(*full, segment_ids=segment_ids, chunk_size=chunk, impl=impl)
    (o, s), pullback = jax.vjp(f, *xs)
    return o, s, pullback((jnp.asarray(cot_o), jnp.asarray(cot_s)))

  return jax.tree.map(np.asarray, _compiled(run, *[args[i] for i in present]))


@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_equals_recurrence_with_documents(decay):
  """Packed rows, ``initial_state``, chunks of 4 with starts inside, two in one and on the edge: the
  XLA chunked form equals the token recurrence in outputs, final state and every gradient."""
  (o, s, grads), (o_ref, s_ref, grads_ref) = (_value_and_grads(impl, decay, "mixed", True, CHUNK)
                                              for impl in ("xla", "reference"))
  assert _rel_err(o, o_ref) < 1e-5 and _rel_err(s, s_ref) < 1e-5
  for g, g_ref in zip(grads, grads_ref):
    assert np.all(np.isfinite(g)) and _rel_err(g, g_ref) < 1e-5


def test_chunked_equals_recurrence_at_extreme_decays():
  """One sequence a row, chunks of 5 (the last one padded), α = e^{−20} on every key channel of one
  row and e^{−1e-4} on the other: no exponent overflows, every gradient is finite and equal to the
  recurrence's."""
  (o, s, grads), (o_ref, s_ref, grads_ref) = (_value_and_grads(impl, "channel", "extreme", False, 5)
                                              for impl in ("xla", "reference"))
  assert _rel_err(o, o_ref) < 1e-5 and _rel_err(s, s_ref) < 1e-5
  for g, g_ref in zip(grads, grads_ref):
    assert np.all(np.isfinite(g)) and _rel_err(g, g_ref) < 1e-5


def _numpy_dplr(q, k, v, a, b, log_decay, state):
  """The recurrence for one row ``[time, heads, d]`` in float64: ``(o, final state)``."""
  q, k, v, a, b, state = (np.asarray(x, np.float64) for x in (q, k, v, a, b, state))
  decay = np.exp(np.asarray(log_decay, np.float64))
  if decay.ndim == 2:
    decay = np.broadcast_to(decay[..., None], q.shape)
  outs = []
  for t in range(q.shape[0]):
    read = np.einsum("hk,hkv->hv", b[t], state)
    state = decay[t][..., None] * state - a[t][..., None] * read[:, None, :] + k[t][..., None] * v[t][:, None, :]
    outs.append(np.einsum("hk,hkv->hv", q[t], state))
  return np.stack(outs), state


@pytest.mark.parametrize("decay", ["channel", "head"])
def test_recurrence_is_each_document_alone(decay):
  """The token recurrence on a packed row equals float64 numpy on each document alone: the row's
  ``initial_state`` enters its first document only, later ones start from zero, the final state is
  the last document's."""
  (q, k, v, a, b, log_decay, h0), _ = _inputs(decay)
  o, s, _ = _value_and_grads("reference", decay, "mixed", True, CHUNK)
  for row, lengths in enumerate(ROWS):
    bounds = np.cumsum((0,) + lengths)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      start = h0[row] if i == 0 else np.zeros_like(h0[row])
      o_doc, s_doc = _numpy_dplr(*(x[row, lo:hi] for x in (q, k, v, a, b, log_decay)), start)
      assert _rel_err(o[row, lo:hi], o_doc) < 1e-5
    assert _rel_err(s[row], s_doc) < 1e-5


@pytest.mark.parametrize("decay", ["head", "none"])
def test_delta_rule_is_a_special_case(decay):
  """``a = β k, b = α k``, keys ``β k`` (:func:`delta_rule_as_dplr`) give ``kernels.delta.delta_rule``
  (Gated DeltaNet, DeltaNet) with documents and ``initial_state``: outputs, final state and the
  gradients of q, k, v, β, log α and S₀."""
  (q, k, _, _, _, log_decay, h0), (cot_o, cot_s) = _inputs(decay)
  v = _inputs(decay)[0][2]
  rng = np.random.default_rng(3)
  beta = (1 / (1 + np.exp(-rng.standard_normal((BATCH, TIME, HEADS))))).astype(np.float32)
  segment_ids = _segment_ids()

  def via_dplr(q, k, v, beta, log_decay, h0):
    keys, a, b = delta_rule_as_dplr(k, beta, log_decay)
    return dplr(q, keys, v, a, b, log_decay, h0, segment_ids=segment_ids, chunk_size=CHUNK, impl="xla")

  def via_delta(q, k, v, beta, log_decay, h0):
    return delta_rule(q, k, v, beta, log_decay, h0, segment_ids=segment_ids, chunk_size=CHUNK, impl="xla")

  def both(*xs):
    out = []
    for f in (via_dplr, via_delta):
      fixed = (lambda *ys: f(*ys[:4], None, ys[4])) if decay == "none" else f
      (o, s), pullback = jax.vjp(fixed, *xs)
      out.append((o, s, pullback((jnp.asarray(cot_o), jnp.asarray(cot_s)))))
    return out

  args = (q, k, v, beta) + ((h0,) if decay == "none" else (log_decay, h0))
  (o, s, grads), (o_ref, s_ref, grads_ref) = jax.tree.map(np.asarray, _compiled(both, *args))
  assert _rel_err(o, o_ref) < 1e-5 and _rel_err(s, s_ref) < 1e-5
  for g, g_ref in zip(grads, grads_ref):
    assert _rel_err(g, g_ref) < 1e-5


def test_closed_forms_without_the_rank_one_part():
  """``a = 0``: gated linear attention (``kernels.gla``) with a per-key-channel decay; and with α = 1 too,
  linear attention ``o_t = S₀ᵀ q_t + Σ_{s≤t} (q_t·k_s) v_s`` written out in numpy."""
  (q, k, v, _, b, log_decay, h0), _ = _inputs("channel")
  zeros = np.zeros_like(q)

  def forms(q, k, v, b, log_decay, h0):
    return (dplr(q, k, v, zeros, b, log_decay, h0, chunk_size=5), gla(q, k, v, log_decay, h0, chunk_size=5,
                                                                      impl="xla"),
            dplr(q, k, v, zeros, b, None, h0, chunk_size=5))

  (o, s), (o_gla, s_gla), (o_lin, s_lin) = _compiled(forms, q, k, v, b, log_decay, h0)
  assert _rel_err(o, o_gla) < 1e-5 and _rel_err(s, s_gla) < 1e-5
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("bthk,bshk->bhts", q64, k64) * np.tril(np.ones((TIME, TIME)))
  o_ref = np.einsum("bhts,bshv->bthv", scores, v64) + np.einsum("bthk,bhkv->bthv", q64, h0)
  assert _rel_err(o_lin, o_ref) < 1e-5
  assert _rel_err(s_lin, h0 + np.einsum("bthk,bthv->bhkv", k64, v64)) < 1e-5


def test_dispatch_and_argument_errors():
  taken = choice("auto")
  assert taken.impl == "xla" and "pallas" in dict(taken.rejected)  # (the Pallas path: test_dplr_pallas.py)
  (q, k, v, a, b, log_decay, h0), _ = _inputs("channel")
  with pytest.raises(ValueError, match=rf"dplr: chunk_size={CHUNK} must be a power of two ≥ 16 for impl='pallas'"):
    dplr(q, k, v, a, b, log_decay, chunk_size=CHUNK, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match=r"dplr: unknown impl 'triton'"):
    dplr(q, k, v, a, b, log_decay, impl="triton")
  with pytest.raises(ValueError, match=r"chunk_size=0 must be a positive integer"):
    dplr(q, k, v, a, b, log_decay, chunk_size=0)
  with pytest.raises(ValueError, match=r"log_decay\(2, 13, 2, 3\) must be"):
    dplr(q, k, v, a, b, log_decay[..., :3])
  with pytest.raises(ValueError, match=r"expected q, k, a, b"):
    dplr(q, k, v, a[..., :3], b)
  with pytest.raises(ValueError, match=r"segment_ids must be None or integer"):
    dplr(q, k, v, a, b, segment_ids=np.zeros((BATCH, TIME), np.float32))
  from hybrids.config import ConfigError
  for name in ("kda", "rwkv7", "gated_deltaproduct"):
    with pytest.raises(ConfigError, match=r"model.dplr_impl='triton'; valid: auto, xla, reference, pallas"):
      get_mixer(name).check_config(_config(dplr_impl="triton"), seq_len=16)
    with pytest.raises(ValueError, match=r"model.chunk_size=8 must be a power of two ≥ 16 with model.dplr_impl='pallas'"):
      get_mixer(name).check_config(_config(dplr_impl="pallas", chunk_size=8), seq_len=16)
    get_mixer(name).check_config(_config(dplr_impl="pallas", chunk_size=16), seq_len=16)
  with pytest.raises(ConfigError, match=r"model.householder_steps=0 must be a positive integer"):
    get_mixer("gated_deltaproduct").check_config(_config(householder_steps=0), seq_len=16)


# ----------------------------------------------------------------------------- the mixers' equations


def _config(**overrides):
  c = model_config()
  c.d_model, c.num_heads, c.chunk_size = 16, 4, 4
  for key, value in overrides.items():
    c[key] = value
  return c


def _mixer(name, randomise=(), **overrides):
  """The mixer, its parameters in float64 numpy, and its jitted parallel face. ``randomise``: parameters
  (paths of attribute names) drawn at random, where the initialisation would hide a term (LoRA
  down-projections start at zero)."""
  module = get_mixer(name)(_config(**overrides), rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(5)
  for path in randomise:
    param = functools.reduce(getattr, path.split("."), module)
    param[...] = jnp.asarray(0.5 * rng.standard_normal(param[...].shape), jnp.float32)
  graphdef, params = nnx.split(module)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(params))
  return p, lambda x: _compiled(lambda params, x: nnx.merge(graphdef, params)(x), params, x)


def _short_conv(u, p):
  width = p["kernel"].shape[0]
  padded = np.concatenate([np.zeros((width - 1, u.shape[1])), u])
  return np.stack([np.sum(p["kernel"] * padded[t:t + width], 0) for t in range(u.shape[0])]) + p["bias"]


_sig = lambda z: 1 / (1 + np.exp(-z))
_silu = lambda z: z * _sig(z)
_softplus = lambda z: np.logaddexp(0.0, z)
_unit = lambda z: z / np.sqrt(np.sum(z * z, -1, keepdims=True) + 1e-6)


def _head_norm(o, scale, rms, eps):
  if not rms:
    o = o - o.mean(-1, keepdims=True)
  return o / np.sqrt((o * o).mean(-1, keepdims=True) + eps) * scale


def test_kda_matches_its_equations():
  """KDA in float64 numpy, one token at a time (fla's naive recurrence): decay each key channel, then
  the delta rule, ``S = Diag(α) S;  S += β k (v − Sᵀk)ᵀ``; per-head RMSNorm times σ(low-rank gate); W_o."""
  p, forward = _mixer("kda")
  x = np.random.default_rng(11).standard_normal((9, 16))
  heads, d_h = 4, 4
  qkv = _silu(_short_conv(x @ p["qkv_proj"]["kernel"], p["conv"])).reshape(9, 3, heads, d_h)
  q, k, v = _unit(qkv[:, 0]), _unit(qkv[:, 1]), qkv[:, 2]
  beta = _sig(x @ p["beta_proj"]["kernel"])
  raw = (x @ p["decay_down"]["kernel"] @ p["decay_up"]["kernel"] + p["dt_bias"]).reshape(9, heads, d_h)
  log_alpha = -_softplus(raw) * np.exp(p["a_log"])[:, None]
  gate = _sig(x @ p["gate_down"]["kernel"] @ p["gate_up"]["kernel"])
  state, outs = np.zeros((heads, d_h, d_h)), []
  for t in range(9):
    state = np.exp(log_alpha[t])[..., None] * state
    error = v[t] - np.einsum("hk,hkv->hv", k[t], state)
    state = state + (beta[t][:, None] * k[t])[..., None] * error[:, None, :]
    outs.append(np.einsum("hk,hkv->hv", q[t], state))
  o = _head_norm(np.stack(outs), p["norm"]["scale"], True, 1e-5).reshape(9, 16)
  y = forward(jnp.asarray(x[None], jnp.float32))[0]
  assert _rel_err(y, (o * gate) @ p["o_proj"]["kernel"]) < 1e-5


def test_rwkv7_matches_its_equations():
  """RWKV-7 in float64 numpy as the authors' ``rwkv_v7_numpy.py`` writes it, with the state ``[value,
  key]``: ``S = S·diag(w) − (S κ̂)(a ⊙ κ̂)ᵀ + v k̃ᵀ``, ``y = S r``; per-head GroupNorm, the bonus
  ``(Σ r ⊙ k̃ ⊙ ρ) v``, the gate and W_o. The LoRA down-projections (zero at init) are random here."""
  p, forward = _mixer("rwkv7", randomise=("decay_down.kernel", "lr_down.kernel", "gate_down.kernel"))
  x = np.random.default_rng(12).standard_normal((9, 16))
  heads, d_h = 4, 4
  last, state, outs = np.zeros(16), np.zeros((heads, d_h, d_h)), []
  lin = lambda name, z: z @ p[name]["kernel"]
  for t in range(9):
    xr, xw, xk, xv, xa, xg = (x[t] + m * (last - x[t]) for m in p["mu"])
    r, k, v = lin("r_proj", xr), lin("k_proj", xk), lin("v_proj", xv)
    w = np.exp(-np.exp(-0.5) * _sig(p["w0"] + lin("decay_up", np.tanh(lin("decay_down", xw)))))
    a = _sig(p["a0"] + lin("lr_up", lin("lr_down", xa)))
    g = lin("gate_up", _sig(lin("gate_down", xg)))
    kk = k * p["removal_scale"]
    k = k * (1 + (a - 1) * p["replacement_mix"])
    r, w, k, v, kk, a = (z.reshape(heads, d_h, 1) for z in (r, w, k, v, kk, a))
    kk = kk / np.sqrt(np.sum(kk * kk, axis=1, keepdims=True) + 1e-6)
    state = state * w.transpose(0, 2, 1) - state @ kk * (kk * a).transpose(0, 2, 1) + v * k.transpose(0, 2, 1)
    y = _head_norm((state @ r)[..., 0], p["norm"]["scale"], False, 1e-5 * d_h)
    y = y + (r[..., 0] * k[..., 0] * p["bonus"]).sum(-1, keepdims=True) * v[..., 0]
    outs.append((y.reshape(16) * g) @ p["o_proj"]["kernel"])
    last = x[t]
  assert _rel_err(forward(jnp.asarray(x[None], jnp.float32))[0], np.stack(outs)) < 1e-5


def test_gated_deltaproduct_matches_its_equations():
  """Gated DeltaProduct (n_h = 3) in float64 numpy: per token, decay once, then three delta-rule steps
  ``S ← (I − β_j k_j k_jᵀ) S + β_j k_j v_jᵀ`` with β ∈ (0, 2); ``o = Sᵀ q``; RMSNorm, SiLU gate, W_o."""
  p, forward = _mixer("gated_deltaproduct", householder_steps=3)
  x = np.random.default_rng(13).standard_normal((9, 16))
  heads, d_h, steps = 4, 4, 3
  qkv = _silu(_short_conv(x @ p["qkv_proj"]["kernel"], p["conv"]))
  q = _unit(qkv[:, :16].reshape(9, heads, d_h))
  k = _unit(qkv[:, 16:16 * (1 + steps)].reshape(9, steps, heads, d_h))
  v = qkv[:, 16 * (1 + steps):].reshape(9, steps, heads, d_h)
  beta = 2 * _sig(x @ p["beta_proj"]["kernel"]).reshape(9, steps, heads)
  log_alpha = -_softplus(x @ p["alpha_proj"]["kernel"] + p["dt_bias"]) * np.exp(p["a_log"])
  state, outs = np.zeros((heads, d_h, d_h)), []
  for t in range(9):
    state = np.exp(log_alpha[t])[:, None, None] * state
    for j in range(steps):
      error = v[t, j] - np.einsum("hk,hkv->hv", k[t, j], state)
      state = state + (beta[t, j][:, None] * k[t, j])[..., None] * error[:, None, :]
    outs.append(np.einsum("hk,hkv->hv", q[t], state))
  o = _head_norm(np.stack(outs), p["norm"]["scale"], True, 1e-5).reshape(9, 16)
  ref = (_silu(x @ p["g_proj"]["kernel"]) * o) @ p["o_proj"]["kernel"]
  assert _rel_err(forward(jnp.asarray(x[None], jnp.float32))[0], ref) < 1e-5
