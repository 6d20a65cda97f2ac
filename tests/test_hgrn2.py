"""HGRN2 (``hgrn2``): the mixer against its equations written out in float64 numpy, its forget gate's
learned lower bound, the chunked path against the per-step reference (outputs and every gradient,
packed documents with boundaries inside a chunk), and the config check. The registry tests
(test_mixers, test_contract, test_segments, test_learning) cover both faces and packed rows.

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_hgrn2.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import ConfigError, get_config, model_config
from hybrids.mixers import get_mixer
from hybrids.train import resolve

D_MODEL, HEADS = 16, 2


def _mixer(**overrides):
  c = model_config()
  c.d_model, c.num_heads, c.chunk_size = D_MODEL, HEADS, 4
  for key, value in overrides.items():
    c[key] = value
  return get_mixer("hgrn2")(c, rngs=nnx.Rngs(params=0))


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def test_matches_its_equations():
  """f = γ + (1 − γ) σ(W_f x), k = 1 − f, q = swish(W_q x)/√d, v = W_i x; S_t = diag(f_t) S_{t−1} + k_t v_tᵀ,
  o_t = S_tᵀ q_t; y = W_o RMSNorm(o) — one step at a time, a random lower bound per channel."""
  mixer = _mixer()
  mixer.lower_bound[...] = jnp.asarray(np.random.default_rng(0).normal(0.0, 2.0, D_MODEL), jnp.float32)
  graphdef, params = nnx.split(mixer)
  x = np.random.default_rng(1).standard_normal((1, 11, D_MODEL))
  y = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, jnp.asarray(x, jnp.float32))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))
  sig = lambda a: 1 / (1 + np.exp(-a))
  gamma = sig(p["lower_bound"])
  d = D_MODEL // HEADS
  split = lambda z: z.reshape(HEADS, d)
  state, outs = np.zeros((HEADS, d, d)), []
  for t in range(11):
    f = split(gamma + (1 - gamma) * sig(x[0, t] @ p["f_proj"]["kernel"]))
    u = x[0, t] @ p["q_proj"]["kernel"]
    q, v = split(u * sig(u)) / np.sqrt(d), split(x[0, t] @ p["i_proj"]["kernel"])
    state = f[:, :, None] * state + np.einsum("hk,hv->hkv", 1 - f, v)
    outs.append(np.einsum("hkv,hk->hv", state, q).reshape(-1))
  o = np.stack(outs)
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * p["norm"]["scale"]
  _close(y[0], o @ p["o_proj"]["kernel"])


def test_forget_gate_lower_bound():
  """f ∈ (γ, 1) with γ = σ(β) starting at model.hgrn2_lower_bound; 0: no bound and no parameter."""
  logits = jnp.asarray([-60.0, -3.0, 0.0, 3.0, 30.0])[:, None] * jnp.ones((1, D_MODEL))
  bounded, free = _mixer(hgrn2_lower_bound=0.25), _mixer(hgrn2_lower_bound=0.0)
  _close(jax.nn.sigmoid(bounded.lower_bound[...]), np.full(D_MODEL, 0.25))
  f = np.exp(np.asarray(bounded.log_forget(logits), np.float64))
  _close(f, 0.25 + 0.75 / (1 + np.exp(-np.asarray(logits, np.float64))))
  assert free.lower_bound is None
  _close(free.log_forget(logits), jax.nn.log_sigmoid(logits))
  assert np.all(np.asarray(bounded.log_forget(logits)) <= 0.0)


def test_chunked_path_equals_the_reference_with_documents():
  """model.gla_impl 'xla' (chunked) == 'reference' (per step): outputs, final state and every gradient,
  documents of 1, 6 and 4 tokens (starts inside a chunk of 4 and on its edge)."""
  seg = jnp.asarray([[0] + [1] * 6 + [2] * 4, [3] * 4 + [4] * 7], jnp.int32)
  x = jax.random.normal(jax.random.key(2), (2, 11, D_MODEL))
  graphdef, params = nnx.split(_mixer())
  graphdef_ref, _ = nnx.split(_mixer(gla_impl="reference"))

  def loss(graphdef, p, x):
    y, state = nnx.merge(graphdef, p)(x, return_state=True, segment_ids=seg)
    return jnp.sum(jnp.sin(y)) + jnp.sum(state["S"] ** 2), (y, state)

  @jax.jit
  def run(params, x):
    return [jax.grad(loss, argnums=(1, 2), has_aux=True)(g, params, x) for g in (graphdef, graphdef_ref)]

  (grads, aux), (grads_ref, aux_ref) = run(params, x)
  jax.tree.map(_close, aux, aux_ref)
  jax.tree.map(_close, grads, grads_ref)


@pytest.mark.parametrize("value", [1.0, -0.5])
def test_config_check_names_the_field(value):
  with pytest.raises(ConfigError, match=f"model.hgrn2_lower_bound={value}"):
    resolve(get_config("experiments/quickstart.py:hgrn2", {"model.hgrn2_lower_bound": value}))
