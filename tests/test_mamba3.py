"""Mamba-3 (``mamba3``): the parallel face (``kernels.gla`` with the trapezoid folded into the keys, the
rotations as RoPE on B and C, MIMO as sub-steps of time) against the paper's complex-valued recurrence
written out token by token here (outputs, final state, every gradient; packed documents with starts
inside a chunk, on a chunk edge and one-token documents), the step face against the parallel one for
MIMO, the wrapped angle sum, and the config checks. The registry tests (test_mixers, test_contract,
test_segments) cover SISO's two faces and packed rows; tests/test_peer_b.py compares SISO and MIMO with
the authors' released module (fixtures ``peer_b_mamba3*.npz``).

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_mamba3.py
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import ConfigError, get_config, model_config
from hybrids.mixers import get_mixer
from hybrids.mixers.mamba3 import cumulative_angles
from hybrids.train import resolve

D_MODEL, HEADS, D_STATE = 16, 2, 8
LENGTHS = ((3, 1, 5, 2), (11,))  # row 0: starts inside a chunk (3, 9), on its edge (4), a one-token document
TIME = 11
# Many small programs, each compiled once: without LLVM optimisation (CI time), as tests/test_segments.py.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _config(**overrides):
  c = model_config()
  c.d_model, c.num_heads, c.d_state, c.chunk_size, c.gla_impl = D_MODEL, HEADS, D_STATE, 4, "xla"
  for key, value in overrides.items():
    c[key] = value
  return c


def _mixer(rank):
  """A mixer whose every parameter is random (biases, gains, D and the MIMO weights too)."""
  mixer = get_mixer("mamba3")(_config(mamba3_mimo_rank=rank), rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(mixer)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  leaves = [p + 0.5 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(tree, leaves)


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def _close_angles(a, b, tol=1e-5):
  """Angles equal modulo 2π."""
  difference = np.angle(np.exp(1j * (np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  assert np.max(np.abs(difference)) <= tol, np.max(np.abs(difference))


def _segment_ids():
  return jnp.asarray([np.repeat(np.arange(len(row)), row) for row in LENGTHS], jnp.int32)


def complex_recurrence(p, u, starts, *, rank):
  """The paper's complex-valued SSM, token by token, from the raw parameters ``p`` (``nnx.to_pure_dict``).

  The first ``M`` channel pairs of the state are complex numbers ``s_{2i} + i·s_{2i+1}`` with the
  transition ``α_t e^{−iΔ_t θ_t}``; the rest are real with ``α_t``; B and C are never rotated. The
  trapezoid ``h_t = T_t α_t (h_{t−1} + β'_t Σ_r B_{t−1,r} v_{t−1,r}ᵀ) + γ_t Σ_r B_{t,r} v_{t,r}ᵀ`` with
  ``T_t = e^{−iΔ_tθ_t}`` on the complex pairs and ``β'_t = (1 − λ_t)Δ_t`` (the paper's β_t = β'_t α_t);
  at a document start ``h`` and the previous token's term are zero. Returns the output and the mixer's decode state
  (the state in the rotated frame: ``S = e^{iφ_T} h_T`` per pair)."""
  batch, time, _ = u.shape
  d_inner, n, heads = 2 * D_MODEL, D_STATE, HEADS
  pairs = int(n * 0.5) // 2
  head_dim = d_inner // heads
  widths = np.cumsum([d_inner, d_inner, rank * n, rank * n, heads, heads, heads])
  z, x, b, c, dt, a, lam, theta = jnp.split(u @ p["in_proj"]["kernel"], widths, axis=-1)
  rms = lambda t, scale: t / jnp.sqrt(jnp.mean(t * t, axis=-1, keepdims=True) + 1e-5) * scale
  # [batch, time, heads, rank, n]
  b = rms(b.reshape(batch, time, 1, rank, n), p["b_norm"]["scale"]) + p["b_bias"]
  c = rms(c.reshape(batch, time, 1, rank, n), p["c_norm"]["scale"]) + p["c_bias"]
  dt = jax.nn.softplus(dt + p["dt_bias"])
  a_rate = jnp.maximum(jnp.where(a >= 0, 1.0 + a, 1.0 / (1.0 - a)), 1e-4)
  alpha, lam = jnp.exp(-dt * a_rate), jax.nn.sigmoid(lam)
  turn = dt[..., None] * math.pi * jnp.tanh(theta)[:, :, None, :]  # Δ_t θ_t, [batch, time, heads, pairs]
  x, z = x.reshape(batch, time, heads, head_dim), z.reshape(batch, time, heads, head_dim)
  mimo = lambda name: p[name] if rank > 1 else jnp.ones((heads, 1, head_dim))
  v = x[:, :, :, None] * mimo("mimo_x")  # [batch, time, heads, rank, head_dim]
  as_complex = lambda t: t[..., 0:2 * pairs:2] + 1j * t[..., 1:2 * pairs:2]

  outer_c = lambda keys, values: jnp.einsum("bhrm,bhrp->bhmp", as_complex(keys), values)
  outer_r = lambda keys, values: jnp.einsum("bhrm,bhrp->bhmp", keys[..., 2 * pairs:], values)
  gamma, prev_weight = lam * dt, (1 - lam) * dt

  def token(carry, inputs):
    h_c, h_r, prev_b, prev_v, phi = carry
    start, turn_t, a_t, g_t, w_t, b_t, c_t, v_t, z_t = inputs
    keep = ~start[:, None, None, None]
    h_c, h_r, prev_b, prev_v = h_c * keep, h_r * keep, prev_b * keep, prev_v * keep
    phi = phi * keep[..., 0] + turn_t
    a_t, g_t, w_t = (w[:, :, None, None] for w in (a_t, g_t, w_t))
    h_c = jnp.exp(-1j * turn_t)[..., None] * a_t * (h_c + w_t * outer_c(prev_b, prev_v)) + g_t * outer_c(b_t, v_t)
    h_r = a_t * (h_r + w_t * outer_r(prev_b, prev_v)) + g_t * outer_r(b_t, v_t)
    y = (jnp.real(jnp.einsum("bhrm,bhmp->bhrp", jnp.conj(as_complex(c_t)), h_c))
         + jnp.einsum("bhrm,bhmp->bhrp", c_t[..., 2 * pairs:], h_r))
    y = (y + p["d_skip"][:, None, None] * v_t) * jax.nn.silu(z_t[:, :, None] * mimo("mimo_z"))
    out = jnp.sum(y * mimo("mimo_o"), axis=2).reshape(batch, d_inner) @ p["out_proj"]["kernel"]
    return (h_c, h_r, b_t, v_t, phi), out

  zeros = lambda *shape: jnp.zeros((batch, heads) + shape)
  carry = (zeros(pairs, head_dim).astype(jnp.complex64), zeros(n - 2 * pairs, head_dim), zeros(rank, n),
           zeros(rank, head_dim), zeros(pairs))
  inputs = tuple(jnp.moveaxis(t, 1, 0) for t in (starts, turn, alpha, gamma, prev_weight, b, c, v, z))
  (h_c, h_r, prev_b, prev_v, phi), outs = jax.lax.scan(token, carry, inputs)
  # The decode state in the rotated frame, pairs interleaved back into channels.
  frame = jnp.exp(1j * phi)
  s_c = frame[..., None] * h_c
  s = jnp.concatenate([jnp.stack([s_c.real, s_c.imag], axis=3).reshape(batch, heads, 2 * pairs, head_dim), h_r], 2)
  k_c = frame[:, :, None] * as_complex(prev_b)
  k = jnp.concatenate([jnp.stack([k_c.real, k_c.imag], -1).reshape(batch, heads, rank, 2 * pairs),
                       prev_b[..., 2 * pairs:]], -1)
  return jnp.moveaxis(outs, 0, 1), {"S": s, "angle": phi, "k": k, "v": prev_v}


def _loss(y, state):
  """Reads every output and every part of the state (the angle through sin: a function of φ mod 2π)."""
  return (jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(state["S"])) + jnp.sum(jnp.sin(3.0 * state["angle"]))
          + jnp.sum(state["k"] * state["k"]) + jnp.sum(jnp.tanh(state["v"])))


@pytest.mark.parametrize("rank", [1, 2])
def test_parallel_face_is_the_complex_recurrence(rank):
  """Packed rows with documents of 3, 1, 5, 2 tokens and one of 11 (chunk_size 4: starts inside a chunk
  and on its edge; MIMO's two sub-steps a token make 2 tokens a chunk): outputs, the last document's state
  and every gradient (parameters and input) equal the complex recurrence."""
  graphdef, params = _mixer(rank)
  u = jax.random.normal(jax.random.key(1), (2, TIME, D_MODEL))
  seg = _segment_ids()
  starts = jnp.concatenate([jnp.ones((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)

  def mixer(p, u):
    out = nnx.merge(graphdef, p)(u, return_state=True, segment_ids=seg)
    return _loss(*out), out

  def reference(p, u):
    out = complex_recurrence(nnx.to_pure_dict(p), u, starts, rank=rank)
    return _loss(*out), out

  def both(p, u):
    return [jax.grad(f, argnums=(0, 1), has_aux=True)(p, u) for f in (mixer, reference)]

  (grads, (y, state)), (grads_ref, (y_ref, state_ref)) = compiled(both, params, u)
  _close(y, y_ref)
  for key in ("S", "k", "v"):
    _close(state[key], state_ref[key])
  _close_angles(state["angle"], state_ref["angle"])
  jax.tree.map(lambda g, g_ref: _close(g, g_ref, 1e-4), grads, grads_ref)


def test_mimo_step_face_equals_parallel_face():
  """MIMO (R = 2): token-by-token decoding from zero equals the parallel face (outputs and state), and
  decoding on from a prefill equals the parallel face's later outputs, at an odd length."""
  graphdef, params = _mixer(2)
  u = jax.random.normal(jax.random.key(2), (2, 9, D_MODEL))

  def faces(p, u):
    mixer = nnx.merge(graphdef, p)
    y, state = mixer(u, return_state=True)
    steps, s = [], mixer.init_state(2)
    for t in range(u.shape[1]):
      y_t, s = mixer.step(u[:, t], s)
      steps.append(y_t)
    _, prefilled = mixer(u[:, :4], return_state=True)
    rest = []
    for t in range(4, u.shape[1]):
      y_t, prefilled = mixer.step(u[:, t], prefilled)
      rest.append(y_t)
    return y, state, jnp.stack(steps, 1), s, jnp.stack(rest, 1)

  y, state, y_steps, state_steps, y_rest = compiled(faces, params, u)
  _close(y_steps, y)
  _close(y_rest, y[:, 4:])
  for key in ("S", "k", "v"):
    _close(state_steps[key], state[key])
  _close_angles(state_steps["angle"], state["angle"])


def test_cumulative_angles_wrap_and_restart():
  """A long sum of turns stays in [0, 2π) and equals the float64 sum mod 2π; it restarts at each start."""
  time = 4096
  steps = jax.random.uniform(jax.random.key(3), (1, time, 1, 2), minval=-math.pi, maxval=math.pi) * 3.0
  starts = jnp.zeros((1, time), bool).at[0, 3000].set(True)
  angles, unsegmented = compiled(lambda s, f: (cumulative_angles(s, f), cumulative_angles(s)), steps, starts)
  angles = np.asarray(angles)
  assert angles.min() >= 0.0 and angles.max() < 2 * math.pi
  exact = np.asarray(steps, np.float64)
  exact = np.concatenate([np.cumsum(exact[:, :3000], 1), np.cumsum(exact[:, 3000:], 1)], 1)
  _close_angles(angles, exact, 1e-4)
  _close_angles(unsegmented, np.cumsum(np.asarray(steps, np.float64), 1), 1e-4)


@pytest.mark.parametrize("override,message", [
    ({"model.mamba3_rope_fraction": 0.0}, r"model.mamba3_rope_fraction=0.0 must be a finite number in \(0"),
    ({"model.mamba3_rope_fraction": 1.5}, r"model.mamba3_rope_fraction=1.5 must be a finite number in \(0"),
    ({"model.mamba3_rope_fraction": 0.1}, r"rotates no channel pair"),
    ({"model.mamba3_mimo_rank": 0}, r"model.mamba3_mimo_rank=0 must be a positive integer"),
])
def test_config_is_checked(override, message):
  import os
  quickstart = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "quickstart.py")
  with pytest.raises((ConfigError, ValueError), match=message):
    resolve(get_config(quickstart + ":tiny", {"model.pattern": ("mamba3",), **override}))
