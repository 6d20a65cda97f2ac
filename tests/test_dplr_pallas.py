"""kernels.dplr with impl="pallas" (issue 24): the chunked form with its pass over chunks run by the
delta rule's Pallas state-pass kernel (a per-key-channel decay and an added write), in the Pallas
interpreter on CPU in both kernel layouts, against the token recurrence on fresh random inputs:
outputs, final state and the gradient of every argument (q, k, v, a, b, log α, S₀); per-key, per-head
and no decay; an odd length (the last chunk padded); decays near 0 and near 1 in every row; packed
documents with starts inside a chunk, on a chunk edge and on the row's last token. Then the dispatch,
and the lowering for TPU (Mosaic) and GPU (Triton) from this CPU host with jax.export.

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_dplr_pallas.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.delta.pallas import PallasConfig
from kernels.dplr import choice, dplr

# 37 tokens in chunks of 16: three chunks, the last one padded. d_k 6 and d_v 20 are padded to Triton
# tiles (16, 32) inside; blocks of 16 value columns give two programs per head.
BATCH, TIME, HEADS, D_K, D_V, CHUNK = 2, 37, 2, 6, 20, 16
# Document lengths of each row: starts at 5 and 6 (two inside the first chunk, a one-token document)
# and at 16 (a chunk edge); at 20 (inside the second chunk) and at 36 (the row's last token, in the
# padded chunk).
ROWS = ((5, 1, 10, 21), (20, 16, 1))
NAMES = ("o", "final state", "dq", "dk", "dv", "da", "db", "dlog_decay", "dinitial_state")
# The interpreted kernels are large XLA programs: compile them without LLVM optimisation (CI time).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _segment_ids():
  return np.stack([np.repeat(np.arange(len(r)), r) for r in ROWS]).astype(np.int32)


def _inputs(decay: str, seed: int):
  """(q, k, v, a, b, log α | None, S₀) and cotangents (of o, of the final state), drawn with numpy.
  ``a, b`` of the delta rule's size (β k and k with unit k) plus a perturbation, so that the transition
  stays near a contraction; log α from {−30 (α ≈ 1e-13), −1e-6 (α ≈ 1), log-uniform over [−5, −1e-3]}
  in equal shares, per key channel (``"channel"``), per head (``"head"``) or None."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(normal(BATCH, TIME, HEADS, D_K)), unit(normal(BATCH, TIME, HEADS, D_K))
  v = normal(BATCH, TIME, HEADS, D_V)
  beta = 1 / (1 + np.exp(-2.0 * normal(BATCH, TIME, HEADS, 1)))
  a = (beta * k + 0.2 * normal(BATCH, TIME, HEADS, D_K)).astype(np.float32)
  b = (k + 0.2 * normal(BATCH, TIME, HEADS, D_K)).astype(np.float32)
  shape = (BATCH, TIME, HEADS, D_K) if decay == "channel" else (BATCH, TIME, HEADS)
  spread = -np.exp(rng.uniform(np.log(1e-3), np.log(5.0), shape))
  ends = rng.integers(0, 3, shape)
  log_decay = np.where(ends == 0, -30.0, np.where(ends == 1, -1e-6, spread)).astype(np.float32)
  args = (q, k, v, a, b, None if decay == "none" else log_decay, normal(BATCH, HEADS, D_K, D_V))
  return args, (normal(BATCH, TIME, HEADS, D_V), normal(BATCH, HEADS, D_K, D_V))


def _outputs_and_grads(args, cots, **kwargs):
  """(o, final state, gradients of every argument that is not None) of ``dplr(**kwargs)``."""
  present = [i for i, x in enumerate(args) if x is not None]

  def run(xs, cots):
    def f(*xs):
      full = list(args)
      for i, x in zip(present, xs):
        full[i] = x
      return dplr(*full, **kwargs)
    (o, s), vjp = jax.vjp(f, *xs)
    return o, s, vjp((cots[0].astype(o.dtype), cots[1]))

  xs = tuple(args[i] for i in present)
  o, s, grads = jax.jit(run).lower(xs, cots).compile(compiler_options=_FAST_COMPILE)(xs, cots)
  full = [None] * len(args)
  for i, g in zip(present, grads):
    full[i] = g
  return (o, s) + tuple(full)


CASES = [  # (decay, packed documents, target, block_v)
    ("channel", True, "triton", 16),  # per key channel (KDA, RWKV-7), two value blocks per head
    ("head", True, "triton", 32),     # one decay per head (Gated DeltaNet as a DPLR)
    ("none", False, "triton", 32),    # no decay, one sequence a row
    ("channel", True, "mosaic", 32),  # the TPU kernels' layout (whole, unpadded dims)
]


@pytest.mark.parametrize("decay,packed,target,block_v", CASES)
def test_pallas_matches_reference(decay, packed, target, block_v, assert_named_close):
  """Outputs, final state and the gradients of all seven arguments against the token recurrence."""
  args, cots = _inputs(decay, seed=CASES.index((decay, packed, target, block_v)))
  segment_ids = _segment_ids() if packed else None
  ours = _outputs_and_grads(args, cots, segment_ids=segment_ids, chunk_size=CHUNK, impl="pallas", interpret=True,
                            pallas_target=target, pallas_config=PallasConfig(block_v=block_v))
  ref = _outputs_and_grads(args, cots, segment_ids=segment_ids, impl="reference")
  assert ours[0].dtype == jnp.float32 and ours[1].dtype == jnp.float32
  assert_named_close(NAMES, ours, ref, 1e-4, _rel_err)


def test_pallas_bf16_inputs(assert_named_close):
  """16-bit inputs: the kernel's dots take W, Â and the state in bf16 (f32 accumulation and state);
  against the recurrence on the same rounded inputs in f32."""
  args, cots = _inputs("channel", seed=99)
  rounded = tuple(None if x is None else jnp.asarray(x, jnp.bfloat16) for x in args[:5]) + args[5:]
  ours = _outputs_and_grads(rounded, cots, segment_ids=_segment_ids(), chunk_size=CHUNK, impl="pallas",
                            interpret=True, pallas_target="triton")
  f32 = tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in rounded)
  ref = _outputs_and_grads(f32, cots, segment_ids=_segment_ids(), impl="reference")
  assert ours[0].dtype == jnp.bfloat16
  assert_named_close(NAMES, ours, ref, 2e-2, _rel_err)


def test_dispatch_and_arguments():
  """"auto" stays XLA and says why Pallas is passed over; "pallas" is refused, with the reason, for
  chunks its tiles cannot take and for an unknown target; an interpreted request names its lowering."""
  taken = choice("auto", chunk_size=64)
  assert taken.impl == "xla" and "pallas" in dict(taken.rejected)
  assert choice("pallas", chunk_size=64, interpret=True).name == "pallas/triton"
  assert choice("pallas", chunk_size=64, pallas_target="mosaic_tpu").name == "pallas/mosaic_tpu"
  with pytest.raises(ValueError, match=r"dplr: impl='pallas' needs chunk_size a power of two ≥ 16 \(got 24"):
    choice("pallas", chunk_size=24)
  q = jnp.zeros((1, 8, 2, 16))
  for chunk in (8, 24):
    with pytest.raises(ValueError, match=f"dplr: chunk_size={chunk} must be a power of two"):
      dplr(q, q, q, q, q, chunk_size=chunk, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="dplr: PallasConfig.block_v=24"):
    dplr(q, q, q, q, q, impl="pallas", interpret=True, pallas_config=PallasConfig(block_v=24))
  with pytest.raises(ValueError, match="dplr: pallas_target must be"):
    dplr(q, q, q, q, q, impl="pallas", interpret=True, pallas_target="cuda")
  assert "pallas_call" not in str(jax.make_jaxpr(lambda q: dplr(q, q, q, q, q))(q))


def _lowering_args(per_key: bool):
  shape = (1, 256, 2, 128)  # TPU-legal tiles: chunks of 64 rows, d_k = d_v = 128
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  log_decay = jax.ShapeDtypeStruct(shape if per_key else shape[:3], jnp.float32)
  return (x, x, x, x, x, log_decay, jax.ShapeDtypeStruct((1, 2, 128, 128), jnp.float32))


def _forward_and_grad(**kwargs):
  fwd = lambda *a: dplr(*a, chunk_size=64, impl="pallas", **kwargs)

  def loss(*a):
    o, s = fwd(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  return fwd, jax.grad(loss, argnums=tuple(range(7)))


@pytest.mark.parametrize("per_key", [True, False])
def test_pallas_lowers_for_tpu(per_key):
  """The state pass (forward) and its reverse pass (gradient) lower through Mosaic from this CPU host,
  the platform picked at lowering time (no pallas_target); per-key-channel and per-head decays."""
  for f, kernels in zip(_forward_and_grad(), (1, 2)):
    module = jax.export.export(jax.jit(f), platforms=["tpu"])(*_lowering_args(per_key)).mlir_module()
    assert module.count("tpu_custom_call") == kernels


def test_pallas_lowers_for_gpu(lower_for_gpu):
  """The Triton lowering (jaxpr → Triton IR) from this CPU host: the state pass with a per-key-channel
  decay column and the added write, forward and reverse."""
  for f, kernels in zip(_forward_and_grad(pallas_target="triton"), (1, 2)):
    assert lower_for_gpu(f, *_lowering_args(True)).count("xla.gpu.triton") == kernels
