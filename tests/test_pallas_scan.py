"""The Pallas diagonal scan (kernels/scan.py) against its sequential reference, in interpret mode.

Both kernel layouts run on CPU: the GPU (Triton) one with a tiny tiling so that T = 13 leaves a
ragged tail and the register prefetch is exercised, and the TPU (Mosaic) one with blocks small
enough for several time blocks and row groups. Outputs, the final state and the gradients wrt a, b
and h0 (through the kernels' own custom_vjp) are compared; a TPU export from this host checks that
the Mosaic lowering accepts the blocks. Each case is one jitted function (interpret mode is slow).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.scan import pallas as scan
from kernels.scan import PallasConfig, linear_scan, linear_scan_pallas, linear_scan_reference

# GPU tilings leave a ragged tail at T = 13 (13 is no multiple of chunk·depth); the last one also
# takes the no-prefetch path in the backward kernel. TPU: 16-row time blocks.
GPU_A = PallasConfig(chunk=2, depth=2, bwd_chunk=3, bwd_depth=2)
GPU_B = PallasConfig(chunk=1, depth=2, bwd_chunk=1, bwd_depth=2)
GPU_C = PallasConfig(chunk=1, depth=3, bwd_chunk=2, bwd_depth=0)
TPU = PallasConfig(tpu_block_t=16)
# Time split into segments (the three-pass form for narrow problems); 3-row segments leave a ragged
# tail in every segment's kernel loop.
SEG_4 = PallasConfig(chunk=2, depth=2, bwd_chunk=1, bwd_depth=2, segments=4)
SEG_2 = PallasConfig(chunk=1, depth=3, bwd_chunk=2, bwd_depth=0, segments=2)

# Mosaic GPU kernels (TMA pipeline) in Mosaic GPU's interpreter: 8-row tiles, so 48 rows are 6 steps
# through 2–3 stages; D is padded to 128 lanes. In segments: 4 × 16 rows.
MOSAIC = PallasConfig(gpu_kernel="mosaic", mosaic_chunk=8, mosaic_bwd_chunk=16, mosaic_stages=3,
                      mosaic_bwd_stages=2, segments=1)
MOSAIC_SEG = PallasConfig(gpu_kernel="mosaic", mosaic_chunk=8, mosaic_bwd_chunk=8, segments=4, mosaic_out_slots=1)
MOSAIC_IN_PLACE = PallasConfig(gpu_kernel="mosaic", mosaic_chunk=8, mosaic_bwd_chunk=8, mosaic_out_slots=0,
                               mosaic_stages=3, mosaic_bwd_stages=3)
# Backward chunks of 16 on these few CTAs take bwd_split (64 lanes, two 8-row halves side by side);
# of 8, the 128-lane bwd. The forward takes fwd_split when asked.
MOSAIC_SPLIT = dataclasses.replace(MOSAIC, mosaic_lanes=64, mosaic_chunk=16)
MOSAIC_SPLIT_IN_PLACE = dataclasses.replace(MOSAIC_IN_PLACE, mosaic_bwd_chunk=16, mosaic_lanes=64, mosaic_chunk=16)

CASES = [  # (layout, config, shape [batch, time, *features], dtype, reverse, with_h0, extreme decays)
    ("gpu", GPU_A, (2, 13, 5), "float32", False, True, True),
    ("gpu", GPU_B, (1, 13, 3, 4), "float32", True, True, False),
    ("gpu", GPU_C, (2, 13, 5), "bfloat16", True, False, False),
    ("gpu", SEG_4, (2, 12, 5), "float32", False, True, True),
    ("gpu", SEG_4, (1, 12, 3, 4), "float32", True, True, True),
    ("gpu", SEG_2, (2, 14, 5), "bfloat16", False, False, False),
    ("gpu", MOSAIC, (2, 48, 5), "float32", False, True, True),
    ("gpu", MOSAIC, (1, 48, 3, 50), "bfloat16", True, True, False),   # D 150: two 128-lane blocks
    ("gpu", MOSAIC_SEG, (1, 64, 5), "float32", True, False, True),
    ("gpu", MOSAIC_IN_PLACE, (2, 48, 5), "float32", False, True, True),
    ("gpu", MOSAIC_IN_PLACE, (1, 40, 3), "bfloat16", True, True, False),
    ("gpu", MOSAIC_SPLIT_IN_PLACE, (2, 48, 70), "float32", True, True, True),  # two 64-lane CTAs per row
    ("gpu", MOSAIC_SPLIT, (1, 64, 3, 20), "bfloat16", False, True, False),
    ("tpu", TPU, (1, 13, 3, 4), "float32", False, True, True),   # one time block, two row groups
    ("tpu", TPU, (1, 40, 5), "float32", True, True, False),      # three time blocks of two row groups
    ("tpu", TPU, (2, 40, 5), "bfloat16", False, False, False),   # three time blocks (16-row groups)
]


def _rel_err(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)


def _inputs(shape, dtype, with_h0, extreme, seed=0):
  ka, kb, kh, kc, kl = jax.random.split(jax.random.key(seed), 5)
  a = jax.random.uniform(ka, shape)
  if extreme:  # every other feature: decay 1 - 1e-7 for the first half of time, 1e-30 after
    t = jnp.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    lane = jnp.arange(shape[-1]) % 2 == 0
    a = jnp.where(lane, jnp.where(t < shape[1] // 2, 1.0 - 1e-7, 1e-30), a)
  b = jax.random.normal(kb, shape)
  h0 = jax.random.normal(kh, (shape[0],) + shape[2:]) if with_h0 else None
  ct = jax.random.normal(kc, shape).astype(dtype)
  ct_last = jax.random.normal(kl, (shape[0],) + shape[2:])
  return a.astype(dtype), b.astype(dtype), h0, ct, ct_last


@pytest.mark.parametrize("layout,config,shape,dtype,reverse,with_h0,extreme", CASES)
def test_pallas_scan_matches_reference(layout, config, shape, dtype, reverse, with_h0, extreme):
  a, b, h0, ct, ct_last = _inputs(shape, jnp.dtype(dtype), with_h0, extreme)

  def both(a, b, h0):
    results = []
    for fn in (lambda a, b, h0: linear_scan_pallas(a, b, h0, reverse=reverse, interpret=True,
                                                   platform=layout, config=config),
               lambda a, b, h0: linear_scan_reference(a, b, h0, reverse=reverse)):
      out, vjp = jax.vjp(fn, a, b, h0)
      results.append((out, vjp((ct, ct_last))))
    return results

  (h, last), grads = (ours := jax.jit(both)(a, b, h0))[0]
  (h_ref, last_ref), grads_ref = ours[1]
  assert h.dtype == b.dtype and h.shape == b.shape
  assert last.dtype == jnp.float32 and last.shape == (shape[0],) + shape[2:]
  tol = 1e-5 if dtype == "float32" else 1e-2
  assert np.all(np.isfinite(np.asarray(h, np.float32)))
  assert _rel_err(h, h_ref) < tol and _rel_err(last, last_ref) < tol
  for name, g, g_ref in zip(("a", "b", "h0"), grads, grads_ref):
    if g_ref is None:  # h0 = None
      continue
    assert g.dtype == g_ref.dtype, name
    assert _rel_err(g, g_ref) < tol, (name, _rel_err(g, g_ref))


def test_public_api_reaches_pallas_and_auto_stays_on_xla_on_cpu(monkeypatch):
  # The defaults are sized for an H100; a small tiling keeps interpret mode quick.
  monkeypatch.setitem(scan.GPU_DEFAULTS, "chunk", 1)
  monkeypatch.setitem(scan.GPU_DEFAULTS, "depth", 2)
  a, b, h0, _, _ = _inputs((1, 13, 5), jnp.float32, True, False, seed=1)
  h, last = jax.jit(lambda a, b, h0: linear_scan(a, b, h0, impl="pallas", interpret=True))(a, b, h0)
  h_ref, last_ref = jax.jit(linear_scan_reference)(a, b, h0)
  assert _rel_err(h, h_ref) < 1e-5 and _rel_err(last, last_ref) < 1e-5
  assert "pallas_call" not in str(jax.make_jaxpr(lambda a, b: linear_scan(a, b, impl="auto"))(a, b))


@pytest.mark.parametrize("dtype,reverse", [("float32", False), ("bfloat16", True)])
def test_pallas_scan_exports_for_tpu(dtype, reverse):
  shape = (2, 40, 3, 48)  # D = 144: padded to one 256-lane block; T = 40 padded to one block
  x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  x0 = jax.ShapeDtypeStruct((shape[0],) + shape[2:], jnp.float32)
  f = lambda a, b, h0: linear_scan_pallas(a, b, h0, reverse=reverse)  # layout chosen at lowering
  def loss(a, b, h0):
    h, last = f(a, b, h0)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(last)
  exported = [jax.export.export(jax.jit(fn), platforms=["tpu"])(x, x, x0)
              for fn in ((f, jax.grad(loss, argnums=(0, 1, 2))) if dtype == "float32"
                         else (jax.grad(loss, argnums=(0, 1, 2)),))]
  for e in exported:
    text = e.mlir_module()
    assert "tpu_custom_call" in text and "triton" not in text


def test_same_shaped_layers_lower_the_kernels_once():
  """A model calls the scan once per layer; each distinct kernel must appear once in the lowered
  module (Pallas lowers in Python, and 8 Griffin layers lowering their own copies took 9–13 s)."""
  x = jax.ShapeDtypeStruct((2, 64, 256), jnp.float32)

  def layers(n):
    def loss(a, b):
      for _ in range(n):
        b = jax.checkpoint(lambda b: linear_scan_pallas(a, b, platform="tpu")[0] * 0.5)(b)
      return jnp.sum(b)
    return jax.grad(loss, argnums=(0, 1))

  count = lambda n: jax.export.export(jax.jit(layers(n)), platforms=["tpu"])(x, x).mlir_module().count(
      "tpu_custom_call")
  # the forward, its recomputation under remat and the backward, however many layers
  assert count(2) == count(6) == 3


def test_segments_must_divide_the_length():
  a, b, h0, _, _ = _inputs((1, 13, 5), jnp.float32, True, False)
  with pytest.raises(ValueError, match="segments=4 must be a power of two dividing the length 13"):
    linear_scan_pallas(a, b, h0, interpret=True, config=PallasConfig(segments=4))


def test_narrow_long_problems_are_split_in_time():
  # Griffin's RG-LRU (D 768 = 24 one-warp programs per sequence) at 32k tokens per batch.
  assert scan._gpu_segments(1, 32768, 768, 32) == 32    # 24 programs -> 768
  assert scan._gpu_segments(4, 8192, 768, 32) == 8      # 96 -> 768
  assert scan._gpu_segments(16, 2048, 768, 32) == 1     # 384: enough lanes already
  assert scan._gpu_segments(8, 4096, 1024, 32) == 1     # 256
  assert scan._gpu_segments(1, 1000, 64, 32) == 1       # too short to split into 512-row segments
  assert scan._gpu_segments(1, 1536, 64, 32) == 2       # 2 x 768 rows; 4 x 384 would be too short
  assert scan._gpu_segments(1, 32769, 768, 32) == 1     # odd: no power of two divides it


@pytest.mark.parametrize("dtype,lanes,bwd_lanes", [("float32", None, None), ("bfloat16", 64, None),
                                                   ("float32", None, 128)])
def test_mosaic_gpu_kernels_lower_for_cuda_at_full_size(dtype, lanes, bwd_lanes):
  # Lowering builds the Mosaic GPU module on this host, which checks the tiles' shared memory
  # (fit_stages) against the H100's 227 KB and every op's layout, as the GPU would. B8 D1024 is 64
  # CTAs of 128 lanes, so the default backward is bwd_split's 64-lane CTAs.
  x = jax.ShapeDtypeStruct((8, 4096, 1024), jnp.dtype(dtype))
  config = PallasConfig(gpu_kernel="mosaic", mosaic_lanes=lanes, mosaic_bwd_lanes=bwd_lanes)
  cfg = scan._resolve("gpu", config, 8, 1024, 4096, (x.dtype, x.dtype))
  assert cfg.gpu_kernel == "mosaic" and cfg.mosaic_stages >= 2 and cfg.mosaic_bwd_stages >= 2
  assert (cfg.mosaic_lanes, cfg.mosaic_bwd_lanes) == (lanes or (128 if dtype == "float32" else 64), bwd_lanes or 64)
  def loss(a, b):
    return jnp.sum(linear_scan_pallas(a, b, platform="gpu", config=config)[0].astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2 and "triton" not in text


def test_mosaic_gpu_falls_back_to_triton_on_ragged_or_split_problems_and_rejects_bad_tiles():
  config = PallasConfig(gpu_kernel="mosaic")
  assert scan._resolve("gpu", config, 8, 1024, 4096, (jnp.float32,) * 2).gpu_kernel == "mosaic"
  assert scan._resolve("gpu", config, 8, 1024, 4100, (jnp.float32,) * 2).gpu_kernel == "triton"
  # problems split in time stay on Triton unless the segments are asked for
  assert scan._resolve("gpu", config, 1, 768, 32768, (jnp.float32,) * 2).gpu_kernel == "triton"
  assert scan._resolve("gpu", dataclasses.replace(config, segments=8), 1, 768, 32768,
                       (jnp.float32,) * 2).gpu_kernel == "mosaic"
  with pytest.raises(ValueError, match="gpu_kernel='cuda'; valid: \\('triton', 'mosaic'\\)"):
    scan._resolve("gpu", PallasConfig(gpu_kernel="cuda"), 8, 1024, 4096, (jnp.float32,) * 2)
  with pytest.raises(ValueError, match="mosaic_bwd_chunk=12 must be a multiple of 8 in \\[8, 256\\]"):
    scan._resolve("gpu", PallasConfig(gpu_kernel="mosaic", mosaic_bwd_chunk=12), 8, 1024, 4096, (jnp.float32,) * 2)
  with pytest.raises(ValueError, match="mosaic_out_slots=3; valid: 0, 1, 2"):
    scan._resolve("gpu", PallasConfig(gpu_kernel="mosaic", mosaic_out_slots=3), 8, 1024, 4096, (jnp.float32,) * 2)
  with pytest.raises(ValueError, match="mosaic_lanes=96; valid: 64, 128"):
    scan._resolve("gpu", PallasConfig(gpu_kernel="mosaic", mosaic_lanes=96), 8, 1024, 4096, (jnp.float32,) * 2)
  with pytest.raises(ValueError, match="mosaic_bwd_lanes=32; valid: 64, 128"):
    scan._resolve("gpu", PallasConfig(gpu_kernel="mosaic", mosaic_bwd_lanes=32), 8, 1024, 4096, (jnp.float32,) * 2)
  with pytest.raises(ValueError, match="mosaic_bwd_chunk=8 must be a multiple of 16 with mosaic_bwd_lanes=64"):
    scan._resolve("gpu", PallasConfig(gpu_kernel="mosaic", mosaic_bwd_lanes=64, mosaic_bwd_chunk=8), 8, 1024,
                  4096, (jnp.float32,) * 2)
  # 64-lane backward CTAs only where 128-lane ones leave SMs idle (the CPU host stands for 132 SMs)
  lanes = lambda batch, d, chunk=None: scan._resolve(
      "gpu", PallasConfig(gpu_kernel="mosaic", mosaic_bwd_chunk=chunk), batch, d, 4096, (jnp.float32,) * 2
  ).mosaic_bwd_lanes
  assert lanes(8, 1024) == 64 and lanes(8, 1024, chunk=8) == 128 and lanes(16, 1024) == 64
  assert lanes(32, 1024) == 128 and lanes(16, 2048) == 128
  fwd_lanes = lambda dtype: scan._resolve("gpu", PallasConfig(gpu_kernel="mosaic"), 8, 1024, 4096,
                                          (dtype,) * 2).mosaic_lanes
  assert fwd_lanes(jnp.float32) == 128 and fwd_lanes(jnp.bfloat16) == 64
