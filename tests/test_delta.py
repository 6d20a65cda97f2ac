"""kernels.delta: the chunked WY form against the token-by-token reference, and the reference against
the delta-rule equation written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.delta import delta_rule


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _inputs(time, decay=True, seed=0):
  """L2-normalised keys (as the mixers feed them), β ∈ (0, 1), and log α spread log-uniformly over
  [−20, −1e-4] with a third of the entries at each end (decay near 0 and near 1). Drawn with numpy:
  eager jax.random would compile every op, which costs more than the tests themselves."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k, v = normal(2, time, 3, 4), normal(2, time, 3, 4), normal(2, time, 3, 5)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = 1 / (1 + np.exp(-2.0 * normal(2, time, 3)))
  spread = -np.exp(rng.uniform(np.log(1e-4), np.log(20.0), (2, time, 3)))
  ends = rng.integers(0, 3, (2, time, 3))
  log_decay = np.where(ends == 0, -20.0, np.where(ends == 1, -1e-4, spread))
  log_decay = log_decay.astype(np.float32) if decay else None
  return q, k, v, beta, log_decay, normal(2, 3, 4, 5), normal(2, time, 3, 5)


def _numpy_delta_rule(q, k, v, beta, log_decay, h0):
  """S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t, looped in float64."""
  q, k, v, beta, h0 = (np.asarray(x, np.float64) for x in (q, k, v, beta, h0))
  alpha = np.ones(beta.shape) if log_decay is None else np.exp(np.asarray(log_decay, np.float64))
  batch, time, heads, d_k = q.shape
  o, final = np.zeros(v.shape), np.zeros(h0.shape)
  for b in range(batch):
    for h in range(heads):
      state = h0[b, h]
      for t in range(time):
        kt = k[b, t, h][:, None]
        state = (alpha[b, t, h] * (np.eye(d_k) - beta[b, t, h] * kt @ kt.T) @ state
                 + beta[b, t, h] * kt @ v[b, t, h][None, :])
        o[b, t, h] = state.T @ q[b, t, h]
      final[b, h] = state
  return o, final


@pytest.mark.parametrize("time,chunk,decay,with_h0", [(13, 4, True, True), (1, 16, False, False)])
def test_chunked_matches_reference_outputs_state_and_all_gradients(time, chunk, decay, with_h0):
  """T=13, chunk 4: padded last chunk, initial state, decays from −20 to −1e-4. T=1: a chunk that is
  almost all padding, no decay, no initial state. The reference is checked against numpy too."""
  q, k, v, beta, log_decay, h0, cot = _inputs(time, decay)
  cot_state = np.random.default_rng(9).standard_normal(h0.shape).astype(np.float32)
  h0 = h0 if with_h0 else None

  @jax.jit
  def outputs_and_grads(*args):
    results = []
    for impl in ("xla", "reference"):
      (o, s), vjp = jax.vjp(lambda *a: delta_rule(*a, chunk_size=chunk, impl=impl), *args)
      results.append((o, s, vjp((cot, cot_state))))
    return results

  args = (q, k, v, beta, log_decay, h0)
  (o, s, grads), (o_ref, s_ref, grads_ref) = outputs_and_grads(*args)
  o_np, s_np = _numpy_delta_rule(q, k, v, beta, log_decay, np.zeros_like(cot_state) if h0 is None else h0)
  assert _rel_err(o_ref, o_np) < 1e-5 and _rel_err(s_ref, s_np) < 1e-5
  assert o.shape == v.shape and s.shape == cot_state.shape
  assert _rel_err(o, o_ref) < 1e-5 and _rel_err(s, s_ref) < 1e-5
  names = ("q", "k", "v", "beta", "log_decay", "initial_state")
  for name, g, g_ref in zip(names, grads, grads_ref):
    if g is None:
      continue
    assert np.all(np.isfinite(g)), name
    assert _rel_err(g, g_ref) < 1e-5, (name, _rel_err(g, g_ref))
  assert sum(g is not None for g in grads) == 4 + decay + with_h0


def test_bf16_inputs():
  q, k, v, beta, log_decay, h0, _ = _inputs(21)
  q, k, v, beta = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, beta))
  o, s = jax.jit(lambda *a: delta_rule(*a, chunk_size=8, impl="xla"))(q, k, v, beta, log_decay, h0)
  o_np, s_np = _numpy_delta_rule(q, k, v, beta, log_decay, h0)  # the same rounded inputs, in float64
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(o, np.float32)))
  assert _rel_err(o, o_np) < 1e-2 and _rel_err(s, s_np) < 1e-2


def test_rejects_bad_arguments():
  q, beta = jnp.zeros((1, 4, 2, 3)), jnp.zeros((1, 4, 2))
  with pytest.raises(ValueError, match=r"beta\(1, 4, 3\) must be \[batch, time, heads\]"):
    delta_rule(q, q, q, jnp.zeros((1, 4, 3)))
  with pytest.raises(ValueError, match="log_decay"):
    delta_rule(q, q, q, beta, jnp.zeros((1, 4, 2, 3)))
  with pytest.raises(ValueError, match="initial_state"):
    delta_rule(q, q, q, beta, None, jnp.zeros((1, 2, 3, 4)))
  with pytest.raises(ValueError, match="unknown impl"):
    delta_rule(q, q, q, beta, impl="triton")
  with pytest.raises(ValueError, match="chunk_size"):
    delta_rule(q, q, q, beta, chunk_size=0)
