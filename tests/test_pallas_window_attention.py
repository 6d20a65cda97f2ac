"""The Pallas flash-attention path of ``window_attention`` against the dense reference.

Both lowerings (Triton-style for GPU, Mosaic-style for TPU) run here in the Pallas interpreter on CPU
with tiny tiles, so every case crosses several blocks: band edges, the unmasked interior, padding of
a length that is not a multiple of the block. The TPU kernels are also lowered for TPU from this CPU
host with ``jax.export`` (Mosaic checks tiling there).
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.window_attention import PallasBlocks, window_attention

# Tiles far below the real ones so a 37-step sequence spans 5–10 blocks.
TINY = PallasBlocks(fwd_q=8, fwd_k=4, dkv_q=4, dkv_k=8, dq_q=8, dq_k=4, block=8)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(time, heads, kv_heads, dtype, seed=0, dim=8):
  # numpy draws: eager jax.random would compile several small programs per call.
  rng = np.random.default_rng(seed)
  shapes = [(2, time, heads, dim), (2, time, kv_heads, dim), (2, time, kv_heads, dim), (2, time, heads, dim)]
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


def _pallas(q, k, v, do, *, target, blocks=TINY, **kw):
  """(out, dq, dk, dv) of the interpreted Pallas kernel, one jit."""
  def run(q, k, v, do):
    f = lambda q, k, v: window_attention(q, k, v, impl="pallas", interpret=True, pallas_target=target,
                                         pallas_blocks=blocks, **kw)
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(do))
  return jax.jit(run)(q, k, v, do)


def _reference(q, k, v, do, *, window, softcap):
  """(out, dq, dk, dv) of the definition in float64 numpy, gradients by hand (no compile: CI time)."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  batch, time, heads, dim = q.shape
  group = heads // k.shape[2]
  kh, vh = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # query head h reads kv head h // group
  x = np.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(dim)
  s = x if softcap is None else softcap * np.tanh(x / softcap)
  offset = np.arange(time)[:, None] - np.arange(time)[None, :]
  s = np.where((offset >= 0) & (offset < (window or time)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("bthd,bshd->bhts", do, vh)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  if softcap is not None:
    ds *= 1.0 - np.tanh(x / softcap) ** 2
  ds /= np.sqrt(dim)
  per_group = lambda g: g.reshape(batch, time, heads // group, group, dim).sum(3)
  return (np.einsum("bhts,bshd->bthd", p, vh), np.einsum("bhts,bshd->bthd", ds, kh),
          per_group(np.einsum("bhts,bthd->bshd", ds, q)), per_group(np.einsum("bhts,bthd->bshd", p, do)))


CASES = [  # (target, time, window, heads, kv_heads, softcap, dtype, tolerance, split_mask)
    ("triton", 37, 5, 4, 2, None, jnp.float32, 1e-5, True),      # GQA, T not a multiple of any tile
    ("triton", 13, 20, 2, 1, 5.0, jnp.float32, 1e-5, True),      # MQA, window ≥ T, soft-cap
    ("triton", 37, 11, 4, 2, 5.0, jnp.bfloat16, 1e-2, False),    # bf16 inputs, one masked loop
    ("mosaic", 37, 11, 4, 2, 5.0, jnp.float32, 1e-5, True),      # TPU structure: band as a grid axis
    ("mosaic", 13, None, 2, 1, None, jnp.float32, 1e-5, True),   # global causal, MQA
]


@pytest.mark.parametrize("target,time,window,heads,kv_heads,softcap,dtype,tol,split", CASES)
def test_pallas_matches_reference(target, time, window, heads, kv_heads, softcap, dtype, tol, split):
  q, k, v, do = _inputs(time, heads, kv_heads, dtype, seed=time + heads)
  ours = _pallas(q, k, v, do, window=window, softcap=softcap, target=target,
                 blocks=dataclasses.replace(TINY, split_mask=split))
  ref = _reference(q, k, v, do, window=window, softcap=softcap)
  assert ours[0].shape == q.shape and ours[0].dtype == dtype
  assert [x.shape for x in ours[1:]] == [q.shape, k.shape, v.shape]
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
    assert _rel(a, b) < tol, name


def test_pallas_window_one_copies_values():
  """W = 1: each row attends only to itself, so out = v (per group), dv = Σ_group do, and dq = dk = 0."""
  q, k, v, do = _inputs(37, 4, 2, jnp.float32, seed=1)
  out, dq, dk, dv = _pallas(q, k, v, do, window=1, target="triton")
  np.testing.assert_allclose(out, jnp.repeat(v, 2, axis=2), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dv, do[:, :, 0::2] + do[:, :, 1::2], rtol=1e-5, atol=1e-5)
  # Recomputed probabilities are 1 only up to rounding: dq, dk vanish relative to the cotangent.
  assert np.max(np.abs(dq)) < 1e-5 * np.max(np.abs(do)) and np.max(np.abs(dk)) < 1e-5 * np.max(np.abs(do))


def _tpu_export(fn, *args):
  return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)


def test_pallas_lowers_for_tpu():
  """Forward and gradient lower through Mosaic from the CPU host (TPU-legal tiles: T = 256, D = 128)."""
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  f = lambda q, k, v: window_attention(q, k, v, window=100, softcap=30.0, impl="pallas", pallas_target="mosaic")
  grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  assert _tpu_export(f, q, kv, kv).mlir_module().count("tpu_custom_call") == 1
  assert _tpu_export(grad, q, kv, kv).mlir_module().count("tpu_custom_call") == 3  # fwd, dK/dV, dQ


def test_pallas_lowers_for_gpu(lower_for_gpu):
  """The Triton lowering (jaxpr → Triton IR) from this CPU host."""
  q = jax.ShapeDtypeStruct((1, 300, 4, 80), jnp.bfloat16)  # head_dim 80 is padded to 128 for Triton
  kv = jax.ShapeDtypeStruct((1, 300, 2, 80), jnp.bfloat16)
  f = lambda q, k, v: window_attention(q, k, v, window=100, softcap=30.0, impl="pallas", pallas_target="triton")
  grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  assert lower_for_gpu(grad, q, kv, kv).count("xla.gpu.triton") == 3


def test_impl_selection_and_errors():
  q = jnp.zeros((1, 16, 2, 8))
  # CPU: "auto" is the XLA band (no Pallas call), and the GPU/TPU-only paths refuse clearly.
  jaxpr = str(jax.make_jaxpr(lambda q: window_attention(q, q, q, window=4))(q))
  assert "pallas_call" not in jaxpr
  with pytest.raises(ValueError, match="interpret=True"):
    window_attention(q, q, q, window=4, impl="pallas")
  with pytest.raises(ValueError, match="cudnn"):
    window_attention(q, q, q, window=4, impl="cudnn")
  with pytest.raises(ValueError, match="pallas_target"):
    window_attention(q, q, q, window=4, impl="pallas", interpret=True, pallas_target="cuda")


@pytest.mark.parametrize("pingpong", [False, True])
def test_mosaic_gpu_kernels_lower_for_cuda_at_full_size(pingpong):
  """The wgmma kernels (kernels/window_attention_mgpu.py) cannot run in Mosaic GPU's interpreter (it
  has no wgmma), so here the forward and the gradient (forward, dK/dV, dQ) are built for CUDA from
  this host at the benchmark's size (shared memory, layouts, TMA boxes) and, with GQA and a window
  off the block grid, at a small one. The GPU benchmark checks their values against the reference
  before timing them (kernels/BENCHMARKS.md, eighth and ninth sessions: rel err 2.4e-3 on every shape)."""
  blocks = PallasBlocks(fwd_kernel="mosaic_gpu", bwd_kernel="mosaic_gpu", mgpu_pingpong=pingpong)
  if not pingpong:  # the other schedules: one CTA per tile forward, persistent backward, whole CTA bands
    blocks = dataclasses.replace(blocks, mgpu_persistent=False, mgpu_bwd_persistent=True, mgpu_own_band=False)
  for (batch, time, heads, kv_heads, dim, window) in ((4, 8192, 16, 16, 128, 1024), (1, 256, 4, 1, 64, 100)):
    q = jax.ShapeDtypeStruct((batch, time, heads, dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, time, kv_heads, dim), jnp.bfloat16)
    f = lambda q, k, v: window_attention(q, k, v, window=window, impl="pallas", pallas_target="triton",
                                         pallas_blocks=blocks)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    for fn, kernels in ((f, 1), (grad, 3)):
      text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
      assert "triton" not in text and text.count("mosaic_gpu") >= kernels


def test_auto_prefers_the_mosaic_gpu_kernels_on_hopper(monkeypatch):
  wa = importlib.import_module("kernels.window_attention")  # (the package exports a function of that name)
  monkeypatch.setattr(wa.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(wa, "tma_gpu", lambda: True)
  q = jax.ShapeDtypeStruct((1, 300, 4, 128), jnp.bfloat16)  # 300 rows are padded to 384
  assert wa._auto_impl(q, None) == "pallas"
  assert wa._auto_impl(q, 30.0) == "pallas"  # soft-cap: neither Mosaic GPU nor cuDNN; Triton
  assert wa._auto_impl(jax.ShapeDtypeStruct((1, 300, 4, 80), jnp.bfloat16), None) == "cudnn"  # head_dim 80
  monkeypatch.setattr(wa, "tma_gpu", lambda: False)  # pre-Hopper
  assert wa._auto_impl(q, None) == "cudnn"


def test_mosaic_gpu_forward_selection_and_errors():
  from kernels.window_attention import mosaic_gpu as window_attention_mgpu
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  assert window_attention_mgpu.supports(q, q, None) is None
  assert "soft-cap" in window_attention_mgpu.supports(q, q, 30.0)
  assert "bfloat16 or float16" in window_attention_mgpu.supports(jax.ShapeDtypeStruct(q.shape, jnp.float32), q, None)
  assert "head_dim" in window_attention_mgpu.supports(jax.ShapeDtypeStruct((1, 256, 4, 80), jnp.bfloat16), q, None)
  x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="fwd_kernel='cuda'; valid: 'triton', 'mosaic_gpu'"):
    window_attention(x, x, x, window=4, impl="pallas", interpret=True, pallas_blocks=PallasBlocks(fwd_kernel="cuda"))
  for field in ("fwd_kernel", "bwd_kernel"):  # wgmma kernels: on a GPU only, and never silently swapped
    with pytest.raises(ValueError, match=f"{field}='mosaic_gpu' does not interpret .*; use 'triton'"):
      window_attention(x, x, x, window=4, impl="pallas", interpret=True,
                       pallas_blocks=PallasBlocks(**{field: "mosaic_gpu"}))


def test_cudnn_path_pads_odd_lengths(monkeypatch):
  """cuDNN's masked attention rejects odd sequence lengths on the GPU; the wrapper pads one zero row
  (a key after every real query) and drops its output. Checked against the XLA path, with cuDNN
  stood in for by jax's XLA attention that insists on an even length as cuDNN does."""
  wa = importlib.import_module("kernels.window_attention")
  real = jax.nn.dot_product_attention

  def even_only(q, k, v, *, implementation, **kw):
    assert implementation == "cudnn" and q.shape[1] % 2 == 0, q.shape
    return real(q, k, v, implementation="xla", **kw)
  monkeypatch.setattr(wa, "_cudnn_problem", lambda q, softcap: None)
  monkeypatch.setattr(jax.nn, "dot_product_attention", even_only)
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (2, 37, 4, 16), jnp.float32)
  k, v = (jax.random.normal(kk, (2, 37, 2, 16), jnp.float32) for kk in ks[1:])
  for window in (5, 100):  # a band, and a window past the sequence (plain causal)
    got = window_attention(q, k, v, window=window, impl="cudnn")
    want = window_attention(q, k, v, window=window, impl="xla")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
