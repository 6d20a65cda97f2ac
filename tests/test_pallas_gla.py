"""The Pallas path of ``kernels.gla`` (``impl="pallas"``) against the definition.

The kernels run in the Pallas interpreter on CPU with small tiles (chunks of 16 or 32 tokens, 16-wide
d_k / d_v blocks), so every case crosses several chunks, sub-chunks and dim blocks, and lengths that
are not a multiple of the chunk are padded. The reference is the recurrence itself in float64 numpy
with its gradients by hand (token by token, backwards), which also checks the kernel's closed form
for d log α independently. The TPU (Mosaic) kernels are lowered for TPU from this host with
``jax.export``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gla import PallasConfig, gla

# Small tiles: chunks of 16 (one sub-chunk) or 32 (two), d_k / d_v blocks of 16.
SMALL = PallasConfig(chunk=16, states_block=16, out_block=16, dqk_block=16, dv_block=16)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _reference(q, k, v, log_decay, s0, do, ds_final):
  """(o, S_T, dq, dk, dv, d log α, dS_0) of S_t = diag(α_t) S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ q_t."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  s0, ds_final = np.asarray(s0, np.float64), np.asarray(ds_final, np.float64)
  time = q.shape[1]
  per_head = log_decay is not None and log_decay.ndim == 3
  ld = np.zeros(q.shape) if log_decay is None else np.asarray(log_decay, np.float64)
  a = np.exp(ld[..., None] if per_head else ld)  # broadcastable to [b, t, h, d_k]
  states, s = [s0], s0
  o = np.zeros(v.shape)
  for t in range(time):
    s = a[:, t, ..., None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    states.append(s)
    o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], s)
  dq, dk, dv, da = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape), np.zeros(np.broadcast_shapes(a.shape, q.shape))
  grad = ds_final  # ∂L/∂S_t from later steps (and the final-state cotangent)
  for t in reversed(range(time)):
    d_t = grad + q[:, t, :, :, None] * do[:, t, :, None, :]  # total ∂L/∂S_t
    dq[:, t] = np.einsum("bhkv,bhv->bhk", states[t + 1], do[:, t])
    dk[:, t] = np.einsum("bhkv,bhv->bhk", d_t, v[:, t])
    dv[:, t] = np.einsum("bhkv,bhk->bhv", d_t, k[:, t])
    da[:, t] = np.sum(d_t * states[t][..., :], axis=-1) * np.broadcast_to(a[:, t], q[:, t].shape)  # ∂L/∂log α
    grad = np.broadcast_to(a[:, t], q[:, t].shape)[..., None] * d_t
  dld = None if log_decay is None else (da.sum(-1) if per_head else da)
  return o, states[-1], dq, dk, dv, dld, grad


def _inputs(time, kind, *, dk=16, dv=32, dtype=jnp.float32, seed=0, log_decay=None):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k, v = (jnp.asarray(normal(2, time, 2, d), dtype) for d in (dk, dk, dv))
  if log_decay is None and kind is not None:
    shape = (2, time, 2, dk) if kind == "dim" else (2, time, 2)
    log_decay = np.log(1 / (1 + np.exp(-3.0 * normal(*shape))))  # log σ(3x): decays across (0, 1)
  ld = None if log_decay is None else jnp.asarray(log_decay, jnp.float32)
  return q, k, v, ld, jnp.asarray(normal(2, 2, dk, dv)), jnp.asarray(normal(2, time, 2, dv)), jnp.asarray(normal(2, 2, dk, dv))


# The interpreted kernels are large XLA programs: compile them without LLVM optimisation (CI time)
# and once per (shapes, config).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_COMPILED = {}


def _pallas(*args, config=SMALL, target=None):
  """(o, S_T, dq, dk, dv, d log α, dS_0) of the interpreted kernels for (q, k, v, ld, s0, do, dS_T)."""
  def run(q, k, v, ld, s0, do, ds_final):
    f = lambda *xs: gla(*xs, impl="pallas", interpret=True, pallas_target=target, pallas_config=config)
    (o, s), vjp = jax.vjp(f, q, k, v, ld, s0)
    return (o, s, *vjp((do.astype(o.dtype), ds_final)))

  key = (tuple(None if x is None else (x.shape, x.dtype) for x in args), config, target)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(run).lower(*args).compile(compiler_options=_FAST_COMPILE)
  return _COMPILED[key](*args)


NAMES = ("o", "final state", "dq", "dk", "dv", "dlog_decay", "d initial state")


CASES = [  # (time, decay kind, config, target)
    (37, "dim", SMALL, None),  # 3 chunks (the last padded), 2 d_v blocks
    (37, "dim", PallasConfig(chunk=32), "mosaic"),  # TPU layout, 2 sub-chunks per chunk
    # scalar decay per head, unrolled sub-chunk loops, dq/dk scores recomputed
    (37, "head", PallasConfig(chunk=32, dqk_block=16, unroll=True, dqk_reuse_scores=False), None),
    (37, "dim", dataclasses.replace(SMALL, chunk=64), None),  # 4 sub-chunks: pairs 2 and 3 apart
    (37, None, SMALL, None),  # no decay: the diagonal blocks are plain dots
]


@pytest.mark.parametrize("time,kind,config,target", CASES)
def test_pallas_matches_reference(time, kind, config, target, assert_named_close):
  args = _inputs(time, kind)
  assert_named_close(NAMES, _pallas(*args, config=config, target=target), _reference(*args), 1e-5, _rel)


def test_pallas_extreme_decays(assert_named_close):
  """Per key dim, log α ∈ {−60, −20, −1e-6} and log σ(3x): decays near 0 (the kernels cap log α at
  −20, e^{-20} ≈ 2e-9: invisible at 1e-5) and near 1; no overflow in the factorised diagonal blocks,
  where the cap is reached on every step of a half, nor in the pairs of sub-chunks (chunks of 64)."""
  rng = np.random.default_rng(1)
  mild = np.log(1 / (1 + np.exp(-3.0 * rng.standard_normal((2, 37, 2, 16)))))
  pick = rng.integers(0, 4, (2, 37, 2, 16))
  log_decay = np.choose(pick, [np.full(mild.shape, -60.0), np.full(mild.shape, -20.0),
                               np.full(mild.shape, -1e-6), mild]).astype(np.float32)
  args = _inputs(37, "dim", log_decay=log_decay)
  assert_named_close(NAMES, _pallas(*args, config=dataclasses.replace(SMALL, chunk=64)), _reference(*args), 1e-5, _rel)


def test_pallas_bf16_inputs(assert_named_close):
  """bf16 q, k, v (tensor-core dots, bf16 stored states) against the definition on the same values."""
  args = _inputs(37, "dim", dtype=jnp.bfloat16, seed=2)
  ours = _pallas(*args, config=dataclasses.replace(SMALL, chunk=32))  # 2 sub-chunks per chunk, Triton layout
  assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
  assert_named_close(NAMES, ours, _reference(*args), 1e-2, _rel)


def test_pallas_rejects_bad_chunk_and_defers_input_gate():
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="chunk"):
    gla(q, q, q, impl="pallas", interpret=True, pallas_config=PallasConfig(chunk=24))
  with pytest.raises(ValueError, match=r"exact_dots='tf32'; valid: \('ieee', 'tf32x3'\)"):
    gla(q, q, q, impl="pallas", interpret=True, pallas_config=PallasConfig(exact_dots="tf32"))
  # The mLSTM input gate has no kernel: impl="pallas" runs the xla chunked form (same function), so
  # its program holds no Pallas kernel and its results are bit for bit the xla ones.
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 11, 2, 16)), jnp.float32) for _ in range(3))
  log_decay = jnp.asarray(np.log(rng.uniform(0.5, 1.0, (1, 11, 2))), jnp.float32)  # per head
  log_i = jnp.asarray(rng.standard_normal((1, 11, 2)), jnp.float32)
  run = lambda impl: lambda q, k, v, ld, log_i: gla(q, k, v, ld, log_input_gate=log_i, impl=impl, chunk_size=4)
  args = (q, k, v, log_decay, log_i)
  assert "pallas_call" not in str(jax.make_jaxpr(run("pallas"))(*args))
  assert "pallas_call" in str(jax.make_jaxpr(lambda q, k, v, ld: gla(q, k, v, ld, impl="pallas", interpret=True,
                                                                       pallas_config=SMALL))(*args[:4]))
  ours, xla = jax.jit(lambda *a: [run(impl)(*a) for impl in ("pallas", "xla")])(*args)
  assert len(ours) == 3 and all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla)))
  assert np.max(np.abs(np.asarray(ours[0]))) > 0.1  # a real output, not the zeros of zero inputs


def _lowering_fns(**kwargs):
  """(args, forward, gradient) at the benchmark's head dims with the default tiling."""
  shape = (1, 256, 2, 128)
  q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  ld = jax.ShapeDtypeStruct(shape, jnp.float32)
  s0 = jax.ShapeDtypeStruct((1, 2, 128, 128), jnp.float32)
  fwd = lambda q, k, v, ld, s0: gla(q, k, v, ld, s0, impl="pallas", **kwargs)

  def loss(q, k, v, ld, s0):
    o, s = fwd(q, k, v, ld, s0)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  return (q, q, q, ld, s0), fwd, jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def test_pallas_lowers_for_tpu():
  """Forward and gradient lower through Mosaic for TPU from this CPU host (TPU-legal tiles)."""
  args, fwd, grad = _lowering_fns()
  for f in (fwd, grad):
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()


def test_pallas_lowers_for_gpu(lower_for_gpu):
  """The Triton lowering of the default tiling: forward (states, output) and gradient (those plus the
  reverse states, dq/dk/dlogα and dv kernels)."""
  args, fwd, grad = _lowering_fns(pallas_target="triton")
  for f, kernels in ((fwd, 2), (grad, 5)):
    assert lower_for_gpu(f, *args).count("xla.gpu.triton") == kernels


def test_pallas_tf32x3_exact_dots_lower_for_gpu(lower_for_gpu):
  """The tensor-core form of the exact diagonal-block dots (the default; ``dqk_exact_dots`` sets the
  dq/dk kernel's own) reaches those dots of the GPU kernels (each one leaves the IEEE set: the test session's default
  precision is "highest", so the bf16 dots print HIGHEST too) and lowers to Triton."""
  args, fwd, grad = _lowering_fns(pallas_target="triton")  # the default: tf32x3 in every kernel
  _, _, grad_ieee = _lowering_fns(pallas_target="triton", pallas_config=PallasConfig(exact_dots="ieee"))
  _, _, grad_mixed = _lowering_fns(pallas_target="triton", pallas_config=PallasConfig(dqk_exact_dots="ieee"))
  tf32x3 = str(jax.make_jaxpr(grad)(*args))
  ieee = str(jax.make_jaxpr(grad_ieee)(*args))
  assert "TF32_TF32_F32_X3" not in ieee
  assert tf32x3.count("TF32_TF32_F32_X3") > 0
  assert ieee.count("HIGHEST") - tf32x3.count("HIGHEST") == 2 * tf32x3.count("TF32_TF32_F32_X3")
  mixed = str(jax.make_jaxpr(grad_mixed)(*args))  # IEEE in the dq/dk kernel only
  assert 0 < mixed.count("TF32_TF32_F32_X3") < tf32x3.count("TF32_TF32_F32_X3")
  for f, kernels in ((fwd, 2), (grad, 5)):
    assert lower_for_gpu(f, *args).count("xla.gpu.triton") == kernels


def test_bench_best_config_combines_each_kernels_fastest_tiles():
  from kernels.gla.bench import best_config
  base = dict(states=1.0, states_bwd=1.0, output=2.0, dqk=6.0, dv=1.0)
  results = [
      (PallasConfig(), base),
      (PallasConfig(dqk_warps=8, dv_warps=2), {**base, "dqk": 5.0, "dv": 3.0}),  # only dq/dk is better
      (PallasConfig(out_warps=8), {**base, "output": 1.5, "states": 0.5}),  # the states time counts (its states fields are the defaults)
      (PallasConfig(chunk=32), {**base, "dqk": 4.0}),  # another chunk: judged on its own total
      (PallasConfig(dv_block=64), {**base, "dv": "failed"}),  # a failed kernel leaves the candidate out
  ]
  config, total = best_config(results)
  assert config == PallasConfig(out_warps=8, dqk_warps=8)
  assert total == pytest.approx(0.5 + 1.0 + 1.5 + 5.0 + 1.0)
  config, total = best_config(results[3:4] + results[:1])
  assert config == PallasConfig(chunk=32) and total == pytest.approx(9.0)
  assert best_config([]) is None


# --- the Mosaic GPU output stage (kernels/gla_mgpu.py) -----------------------------------------------


def test_mosaic_gpu_output_lowers_for_cuda():
  """The wgmma output kernel cannot run in Mosaic GPU's interpreter (no wgmma), so it is built for
  CUDA from this host (shared memory, layouts, TMA boxes) at the benchmark's size and at d_k 64 /
  d_v 128; the GPU check (kernels/BENCHMARKS.md, tenth session) compares its values with the
  reference (output rel err 3.3e-3 at bf16, decays mild, strong and capped, bf16 and f32)."""
  from kernels.gla import mosaic_gpu as gla_mgpu
  for batch, time, heads, dk, dv, decay in ((4, 8192, 16, 128, 128, jnp.bfloat16), (1, 256, 2, 64, 128, jnp.float32)):
    q = jax.ShapeDtypeStruct((batch, time, heads, dk), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((batch, time, heads, dv), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((batch, time, heads, dk), decay)  # f32: two bf16 parts, stacked
    states = jax.ShapeDtypeStruct((batch, heads, time // 64, dv, dk), jnp.bfloat16)
    f = lambda q, k, v, g, st: gla_mgpu.output(q, k, v, gla_mgpu.decay_parts(g, -20.0), st, min_log_decay=-20.0)
    text = jax.jit(f).trace(q, q, v, g, states).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1


def test_mosaic_gpu_output_with_the_triton_kernels_lowers_for_cuda(cuda_lowering):
  """The whole forward and gradient with the Mosaic GPU output stage (its score matrices feed the
  dv kernel) lower for CUDA (on jax ≥ 0.12 for an abstract H100)."""
  shape = (1, 256, 2, 128)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  f = lambda *a: gla(*a, impl="pallas", pallas_target="triton", pallas_config=PallasConfig(out_kernel="mosaic_gpu"))[0]
  grad = jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  for fn, triton in ((f, 1), (grad, 4)):  # states | states, reverse states, dq/dk, dv
    text = cuda_lowering(lambda fn=fn: jax.jit(fn).trace(x, x, x, x).lower(lowering_platforms=("cuda",)).as_text())
    assert text.count("__gpu$xla.gpu.triton") == triton and "mosaic_gpu" in text


def test_mosaic_gpu_output_selection_and_errors(monkeypatch):
  """``_output_stage`` gives the stage and why it is not Mosaic GPU; an explicit "mosaic_gpu" that
  cannot run is a ValueError naming why."""
  from kernels.gla import pallas as G
  x = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
  monkeypatch.setattr(G, "tma_gpu", lambda: True)
  assert G._output_stage(x, x, x, PallasConfig(), interpret=False) == ("mosaic_gpu", None)  # the default on Hopper
  assert G._output_stage(x, x, x, PallasConfig(out_kernel="triton"), interpret=False) == (
      "triton", "PallasConfig.out_kernel='triton'")
  f32 = x.astype(jnp.float32)
  assert G._output_stage(x, x, f32, PallasConfig(), interpret=False) == ("mosaic_gpu", None)  # f32 decay: split in two
  for q, g, why in ((x, None, "needs a bfloat16, float16 or float32 log-decay (got None)"),
                    (f32, f32, "needs bfloat16 q, k, v (got float32)"),
                    (x.astype(jnp.float16), x, "needs bfloat16 q, k, v (got float16)")):
    assert G._output_stage(q, q, g, PallasConfig(), interpret=False) == ("triton", why)
  wide = jnp.zeros((1, 128, 2, 256), jnp.bfloat16)
  for cfg, q, g, interpret, why in (
      (PallasConfig(out_kernel="mosaic_gpu"), x, None, False, r"needs a bfloat16, float16 or float32 log-decay \(got None\)"),
      (PallasConfig(out_kernel="mosaic_gpu"), f32, f32, False, r"needs bfloat16 q, k, v \(got float32\)"),
      (PallasConfig(out_kernel="mosaic_gpu", chunk=32), x, x, False, "needs PallasConfig.chunk=64"),
      (PallasConfig(out_kernel="mosaic_gpu"), wide, wide, False, r"needs d_k and d_v of 64 or 128 \(got 256, 128\)"),
      (PallasConfig(out_kernel="mosaic_gpu"), x, x, True, "does not interpret")):
    with pytest.raises(ValueError, match=f"out_kernel='mosaic_gpu' {why}.*use 'triton'"):
      G._output_stage(q, x, g, cfg, interpret=interpret)
  assert G._output_stage(x, x, x, PallasConfig(), interpret=True) == (
      "triton", "does not interpret (Mosaic GPU's interpreter has no wgmma)")
  monkeypatch.setattr(G, "tma_gpu", lambda: False)
  assert G._output_stage(x, x, x, PallasConfig(), interpret=False) == ("triton", "needs a Hopper GPU (TMA and wgmma)")
  with pytest.raises(ValueError, match=r"out_kernel='wgmma'; valid: \(None, 'triton', 'mosaic_gpu'\)"):
    gla(x, x, x, x, impl="pallas", interpret=True, pallas_config=PallasConfig(out_kernel="wgmma"))


def test_decay_parts_split_f32_log_decays_exactly_enough():
  """An f32 log-decay reaches the Mosaic GPU kernel capped and as bf16 hi + lo, which sum back to
  it within 2⁻¹⁷ of itself; a bf16 one passes through (the kernel caps it)."""
  from kernels.gla import mosaic_gpu as gla_mgpu
  g = jnp.asarray(np.random.default_rng(4).standard_normal((2, 64, 3, 8)) * 5 - 10, jnp.float32)
  hi, lo = gla_mgpu.decay_parts(g, -20.0)
  assert hi.dtype == lo.dtype == jnp.bfloat16
  capped = np.maximum(np.asarray(g), -20.0)
  total = np.asarray(hi, np.float32) + np.asarray(lo, np.float32)
  assert np.all(np.abs(total - capped) <= 2.0 ** -17 * np.abs(capped))
  (same,) = gla_mgpu.decay_parts(g.astype(jnp.bfloat16), -20.0)
  assert same.dtype == jnp.bfloat16


def test_dv_kernel_reads_whole_score_matrices():
  """With the Mosaic GPU output stage the dv kernel takes each chunk's whole masked score matrix
  A [t, s] (gla_mgpu's residual) instead of the Triton output kernel's A_jjᵀ blocks; interpreted
  here with A from the definition, against the dv kernel fed by the Triton output kernel."""
  from kernels.gla import pallas as G
  batch, time, heads, d = 1, 128, 2, 16
  rng = np.random.default_rng(3)
  q, k, v, do = (jnp.asarray(rng.standard_normal((batch, time, heads, d)), jnp.float32) for _ in range(4))
  g = jnp.asarray(np.log(1 / (1 + np.exp(-3.0 * rng.standard_normal((batch, time, heads, d))))), jnp.float32)
  cfg = dataclasses.replace(SMALL, chunk=64)
  plan = G._Plan(target="triton", interpret=True, cfg=cfg, heads=heads, chunks=time // 64, dk=d, dv=d, decay=True,
                 dot_dtype="float32")
  s0 = jnp.zeros((batch, heads, d, d), jnp.float32)
  states = G._states_call(plan, k, g, v, s0, reverse=False)[0]
  at = G._output_call(plan, q, k, g, v, states)[1]
  e_states = G._states_call(plan, q, g, do, s0, reverse=True)[0]
  b = np.cumsum(np.asarray(g, np.float64).reshape(batch, time // 64, 64, heads, d), axis=2)
  qc, kc = (np.asarray(x, np.float64).reshape(batch, time // 64, 64, heads, d) for x in (q, k))
  scores = np.einsum("bnthd,bnshd,bntshd->bnths", qc, kc,
                     np.exp(np.minimum(b[:, :, :, None] - b[:, :, None], 0.0)))  # [b, n, t, h, s]
  scores *= np.tril(np.ones((64, 64)))[None, None, :, None, :]
  whole = jnp.asarray(scores.reshape(batch, time, heads, 64), jnp.float32)
  ours = G._dv_call(dataclasses.replace(plan, mgpu_out=True), q, k, g, do, whole, e_states)
  assert _rel(ours, G._dv_call(plan, q, k, g, do, at, e_states)) < 1e-5
