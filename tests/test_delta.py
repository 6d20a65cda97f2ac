"""kernels.delta: the chunked WY form against the token-by-token reference, and the reference against
the delta-rule equation written out in numpy. The Pallas path (impl="pallas") runs in the Pallas
interpreter on CPU, in both kernel layouts, and is lowered for TPU (and GPU where this jax allows it)
with jax.export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.delta import delta_rule, wy_factors_xla, wy_solve
from kernels.delta.pallas import wy_factors as pallas_wy_factors
from kernels.delta.pallas import PallasConfig


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


@pytest.mark.parametrize("c", [1, 13, 16])
def test_wy_solve_matches_a_triangular_solve_and_its_autodiff(c):
  """wy_solve's hand-written backward against autodiff of a unit-lower triangular solve, at full f32
  precision; the strictly upper triangle of A gets no gradient (A is zero there by construction)."""
  rng = np.random.default_rng(c)
  a = np.tril(rng.standard_normal((3, c, c)) * 0.3, -1).astype(np.float32)
  rhs, cot = (rng.standard_normal((3, c, 5)).astype(np.float32) for _ in range(2))

  def solve(a, rhs):
    return jax.scipy.linalg.solve_triangular(jnp.eye(c) + a, rhs, lower=True, unit_diagonal=True)

  with jax.default_matmul_precision("highest"):
    x, vjp = jax.vjp(wy_solve, a, rhs)
    x_ref, vjp_ref = jax.vjp(solve, a, rhs)
    (da, drhs), (da_ref, drhs_ref) = vjp(cot), vjp_ref(cot)
  assert _rel_err(x, x_ref) < 1e-5 and _rel_err(drhs, drhs_ref) < 1e-5
  assert _rel_err(da, np.tril(da_ref, -1)) < 1e-5
  assert np.all(np.asarray(da)[:, ~np.tri(c, dtype=bool)] == 0)


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


# --- impl="pallas" -----------------------------------------------------------------------------------

# The interpreted kernels are large XLA programs: compile them without LLVM optimisation (CI time).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _pallas_inputs(time, d_k, d_v, *, decay, seed):
  """L2-normalised q and k, β ∈ (0, 1), log α from {−30 (decay ≈ 1e-13), −1e-6 (≈ 1), log-uniform
  spread over [−5, −1e-3]} in equal shares, initial state, and cotangents for o and the final state."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k, v = unit(normal(2, time, 2, d_k)), unit(normal(2, time, 2, d_k)), normal(2, time, 2, d_v)
  beta = (1 / (1 + np.exp(-2.0 * normal(2, time, 2)))).astype(np.float32)
  spread = -np.exp(rng.uniform(np.log(1e-3), np.log(5.0), (2, time, 2)))
  ends = rng.integers(0, 3, (2, time, 2))
  log_decay = np.where(ends == 0, -30.0, np.where(ends == 1, -1e-6, spread)).astype(np.float32)
  return (q, k, v, beta, log_decay if decay else None, normal(2, 2, d_k, d_v)), (normal(2, time, 2, d_v),
                                                                                normal(2, 2, d_k, d_v))


def _outputs_and_grads(args, cots, **kwargs):
  """(o, final state, (dq, dk, dv, dβ, d log α, dS_0)) of delta_rule(**kwargs), compiled fast."""
  def run(args, cots):
    (o, s), vjp = jax.vjp(lambda *a: delta_rule(*a, **kwargs), *args)
    return o, s, vjp((cots[0].astype(o.dtype), cots[1]))

  return jax.jit(run).lower(args, cots).compile(compiler_options=_FAST_COMPILE)(args, cots)


PALLAS_CASES = [  # (time, d_k, d_v, decay, initial state, dtype, chunk, target, block_v)
    # 3 chunks (the last padded), d_k 24 → 32 and d_v 40 → 64 padded, 4 value blocks of 16
    (37, 24, 40, True, True, jnp.float32, 16, "triton", 16),
    (37, 24, 40, False, False, jnp.float32, 16, "triton", 32),  # DeltaNet: no decay, no initial state
    (37, 24, 40, True, True, jnp.float32, 32, "mosaic", 64),  # TPU kernels (whole, unpadded dims)
    (37, 24, 40, True, True, jnp.bfloat16, 16, "triton", 16),  # bf16 dots in the kernels
    (37, 24, 40, False, True, jnp.bfloat16, 32, "triton", 64),
]


@pytest.mark.parametrize("time,d_k,d_v,decay,with_h0,dtype,chunk,target,block_v", PALLAS_CASES)
def test_pallas_matches_reference(time, d_k, d_v, decay, with_h0, dtype, chunk, target, block_v,
                                   assert_named_close):
  """Outputs, final state and the gradients of all six arguments against the token recurrence (f32,
  on the same rounded inputs for bf16), decays near 0 and near 1 mixed in every sequence."""
  (q, k, v, beta, log_decay, h0), cots = _pallas_inputs(time, d_k, d_v, decay=decay, seed=d_k + chunk + decay)
  h0 = h0 if with_h0 else None
  q, k, v, beta = (jnp.asarray(x, dtype) for x in (q, k, v, beta))
  ours = _outputs_and_grads((q, k, v, beta, log_decay, h0), cots, impl="pallas", chunk_size=chunk,
                            interpret=True, pallas_target=target, pallas_config=PallasConfig(block_v=block_v))
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  ref = _outputs_and_grads(tuple(f32(x) for x in (q, k, v, beta, log_decay, h0)), cots, impl="reference")
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  assert ours[0].dtype == dtype and ours[1].dtype == jnp.float32
  names = ("o", "final state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state")
  assert_named_close(names, ours[:2] + tuple(ours[2]), ref[:2] + tuple(ref[2]), tol, _rel_err)


@pytest.mark.parametrize("chunk,dot_dtype,target,wy_block", [
    (16, "float32", "triton", None), (32, "float32", "triton", None), (16, "bfloat16", "triton", None),
    (32, "float32", "mosaic", None),
    (64, "float32", "triton", 16), (64, "bfloat16", "triton", 16), (64, "float32", "triton", 32),  # blocked T
])
def test_pallas_wy_factors_match_xla(chunk, dot_dtype, target, wy_block):
  """The WY kernel (interpreted) and its hand-written backward against the XLA form and its autodiff:
  W, Ũ and the gradients of k, v, the cumulative log-decay b and β; d_k 24 and d_v 40 (padded to
  tiles inside for Triton, whole for Mosaic), decays from e^{-30} to 1; chunks of 64 also by block
  substitution over blocks of 16 and 32 (``wy_block``). (b from the same log-decays as the delta-rule tests)."""
  (_, k, v, beta, log_decay, _), _ = _pallas_inputs(2 * chunk, 24, 40, decay=True, seed=chunk)
  chunked = lambda x: jnp.moveaxis(jnp.asarray(x).reshape(2, 2, chunk, 2, *x.shape[3:]), 3, 2)  # [b n h c …]
  k, v, beta = chunked(k), chunked(v), chunked(beta)
  b = jnp.cumsum(chunked(log_decay), axis=-1)
  rng = np.random.default_rng(1)
  cots = (rng.standard_normal(k.shape).astype(np.float32), rng.standard_normal(v.shape).astype(np.float32))
  if dot_dtype == "bfloat16":  # the kernel reads k and v rounded; give the XLA form the same values
    k, v = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (k, v))

  def run(f):
    out, vjp = jax.vjp(f, k, v, b, beta)
    return out, vjp(cots)

  with jax.default_matmul_precision("highest"):
    ours = jax.jit(lambda: run(lambda *a: pallas_wy_factors(*a, dot_dtype=dot_dtype, interpret=True, target=target,
                                                            config=PallasConfig(wy_block=wy_block))))()
    ref = jax.jit(lambda: run(wy_factors_xla))()
  for name, x, y in zip(("W", "U~", "dk", "dv", "db", "dbeta"), ours[0] + ours[1], ref[0] + ref[1]):
    assert _rel_err(x, y) < 1e-4, (name, _rel_err(x, y))


def test_pallas_arguments():
  q, beta = jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2))
  for chunk in (8, 24):
    with pytest.raises(ValueError, match=f"chunk_size={chunk} must be a power of two"):
      delta_rule(q, q, q, beta, chunk_size=chunk, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="block_v"):
    delta_rule(q, q, q, beta, impl="pallas", interpret=True, pallas_config=PallasConfig(block_v=24))
  with pytest.raises(ValueError, match=r"wy_block=8 must be None \(the whole chunk\) or a power of two"):
    delta_rule(q, q, q, beta, impl="pallas", interpret=True, pallas_config=PallasConfig(wy_block=8))
  with pytest.raises(ValueError, match="pallas_target"):
    delta_rule(q, q, q, beta, impl="pallas", interpret=True, pallas_target="cuda")
  # "auto" is the XLA form until the Pallas kernels are measured faster.
  assert "pallas_call" not in str(jax.make_jaxpr(lambda q, b: delta_rule(q, q, q, b))(q, beta))


def _lowering_args():
  shape = (1, 256, 2, 128)  # TPU-legal tiles: chunks of 64 rows, d_k = d_v = 128
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  per_head = jax.ShapeDtypeStruct(shape[:3], jnp.float32)
  return (x, x, x, per_head, per_head, jax.ShapeDtypeStruct((1, 2, 128, 128), jnp.float32))


def _forward_and_grad(chunk_size=64, **kwargs):
  fwd = lambda *a: delta_rule(*a, chunk_size=chunk_size, impl="pallas", **kwargs)

  def loss(*a):
    o, s = fwd(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  return fwd, jax.grad(loss, argnums=tuple(range(6)))


def test_pallas_lowers_for_tpu():
  """Forward (the WY kernel and the state pass) and gradient (those and the reverse pass) lower
  through Mosaic from this CPU host, chunks of 64 and 16; the platform is picked at lowering time
  (no pallas_target)."""
  for chunk in (64, 16):
    for f, kernels in zip(_forward_and_grad(chunk), (2, 3)):
      module = jax.export.export(jax.jit(f), platforms=["tpu"])(*_lowering_args()).mlir_module()
      assert module.count("tpu_custom_call") == kernels, chunk


def test_pallas_lowers_for_gpu(lower_for_gpu):
  """The Triton lowering (jaxpr → Triton IR: power-of-two tiles) from this CPU host: the WY kernel and
  the state pass forward, plus the reverse pass for the gradient; chunks of 64 and 16, and the WY
  kernel by blocks of 16 (its sub-tile loads and stores)."""
  for chunk, wy_block in ((64, None), (16, None), (64, 16)):
    fns = _forward_and_grad(chunk, pallas_target="triton", pallas_config=PallasConfig(wy_block=wy_block))
    for f, kernels in zip(fns, (2, 3)):
      assert lower_for_gpu(f, *_lowering_args()).count("xla.gpu.triton") == kernels, chunk
