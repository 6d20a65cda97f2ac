"""The modal recurrence's Pallas kernels (kernels/modal, the long convolutions with packed documents)
against the token recurrence, in interpret mode, in both layouts (Triton's and Mosaic TPU's).

Outputs and every gradient (input, poles, residues, through the kernels' own custom_vjp) on fresh
random inputs: odd lengths leaving a ragged tail, document starts at t = 0, inside the row and on
consecutive positions, modes that are no power of two and channels that are no multiple of a
program's block (both padded), decays from near 0 (memory under a token) to near 1 (thousands), a
bfloat16 input; then what ``segmented_modal_conv`` dispatches to and records, and both layouts lowered
for their hardware from this host.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrids.longconv import causal_fft_conv, modal_kernel, segmented_modal_conv
from kernels import dispatch
from kernels.modal import ModalConfig, modal_conv_pallas, modal_conv_reference

CASES = [  # (layout, batch, time, channels, modes, config, input dtype, rate range)
    ("gpu", 2, 37, 12, 5, ModalConfig(block_c=4, chunk=8), "float32", (1e-3, 0.5)),
    ("gpu", 1, 64, 8, 16, ModalConfig(), "float32", (1e-4, 3.0)),
    ("gpu", 2, 19, 3, 3, ModalConfig(block_c=2, chunk=4, bwd_block_c=4, bwd_chunk=3), "bfloat16", (1e-2, 1.0)),
    # TPU: 37 rows front-padded to three 16-row time blocks; 130 channels to two 128-lane blocks.
    ("tpu", 2, 37, 12, 5, ModalConfig(tpu_block_t=16), "float32", (1e-3, 0.5)),
    ("tpu", 1, 40, 130, 16, ModalConfig(tpu_block_t=8), "bfloat16", (1e-4, 3.0)),
]
TOL = 2e-5  # float32 on both sides; sums over up to 64 steps and 16 modes round differently


def _inputs(seed, batch, time, channels, modes, rates):
  ks = jax.random.split(jax.random.key(seed), 7)
  u = jax.random.normal(ks[0], (batch, time, channels))
  rate = jnp.exp(jax.random.uniform(ks[1], (channels, modes), minval=np.log(rates[0]), maxval=np.log(rates[1])))
  log_poles = jax.lax.complex(-rate, jax.random.uniform(ks[2], (channels, modes), maxval=np.pi))
  residues = jax.lax.complex(*jax.random.normal(ks[3], (2, channels, modes))) / np.sqrt(modes)
  starts = jax.random.bernoulli(ks[4], 0.15, (batch, time)).at[:, 0].set(True)
  starts = starts.at[0, 5:7].set(True)  # one-token documents side by side
  cotangent = jax.random.normal(ks[5], (batch, time, channels))
  return u, log_poles, residues, starts, cotangent


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_match_the_token_recurrence(case):
  layout, batch, time, channels, modes, config, dtype, rates = CASES[case]
  u, log_poles, residues, starts, g = _inputs(case, batch, time, channels, modes, rates)
  u = u.astype(dtype)

  def losses(u, log_poles, residues):
    ours = modal_conv_pallas(u, log_poles, residues, starts, config=config, interpret=True, platform=layout)
    ref = modal_conv_reference(u, log_poles, residues, starts)[0]
    return jnp.sum(ours * g), jnp.sum(ref * g), ours, ref

  def both(u, log_poles, residues):
    grads = [jax.grad(lambda *a, i=i: losses(*a)[i], argnums=(0, 1, 2))(u, log_poles, residues) for i in (0, 1)]
    _, _, ours, ref = losses(u, log_poles, residues)
    return ours, ref, grads

  ours, ref, (grads, grads_ref) = jax.jit(both)(u, log_poles, residues)
  assert ours.dtype == jnp.float32 and ours.shape == u.shape
  assert _rel(ours, ref) < TOL
  for name, a, b in zip(("u", "log_poles", "residues"), grads, grads_ref):
    assert a.dtype == b.dtype, name
    assert _rel(a, b) < TOL, (name, _rel(a, b))


def test_no_starts_is_the_fft_convolution_and_a_start_forgets_everything_before():
  u, log_poles, residues, _, _ = _inputs(7, 1, 24, 4, 4, (1e-3, 0.3))
  y = modal_conv_pallas(u, log_poles, residues, None, config=ModalConfig(block_c=4), interpret=True)
  fft = causal_fft_conv(u, modal_kernel(log_poles, residues, 24))
  assert _rel(y, fft) < 1e-4
  starts = jnp.zeros((1, 24), bool).at[0, 10].set(True)
  changed = u.at[:, :10].set(100.0)  # what came before the start cannot reach past it
  a, b = (modal_conv_pallas(x, log_poles, residues, starts, interpret=True) for x in (u, changed))
  np.testing.assert_array_equal(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


def test_segmented_modal_conv_dispatches_and_records_why():
  u, log_poles, residues, _, _ = _inputs(3, 2, 11, 3, 4, (1e-3, 0.3))
  seg = jnp.asarray([[0] * 4 + [1] * 7, [5] * 11], jnp.int32)
  with dispatch.recording() as calls:
    y_xla, s_xla = segmented_modal_conv(u, log_poles, residues, seg, chunk_size=4)
  assert [(c["family"], c["impl"]) for c in calls] == [("modal", "xla")]
  assert "pallas" in dict(calls[0]["rejected"])  # on a CPU: interpret only
  y_pal, s_pal = segmented_modal_conv(u, log_poles, residues, seg, impl="pallas", interpret=True)
  y_ref, s_ref = segmented_modal_conv(u, log_poles, residues, seg, impl="reference")
  for y in (y_xla, y_pal):
    assert _rel(y, y_ref) < 1e-4
  for s in (s_xla, s_pal):  # the last document's state, by every path
    assert _rel(s, s_ref) < 1e-4
  with pytest.raises(ValueError, match="segmented_modal_conv: impl='pallas' needs a GPU or TPU"):
    segmented_modal_conv(u, log_poles, residues, seg, impl="pallas")
  with pytest.raises(ValueError, match="unknown impl 'triton'"):
    segmented_modal_conv(u, log_poles, residues, seg, impl="triton")
  with pytest.raises(ValueError, match="block_c=6 must be a power of two"):
    modal_conv_pallas(u, log_poles, residues, None, config=ModalConfig(block_c=6), interpret=True)


def test_kernels_lower_for_cuda_at_the_benchmark_shape(lower_for_gpu):
  """Both kernels build as Triton for CUDA from this host at B4 T8192 C1024, 16 modes (the benchmark's
  shape), for the tilings the benchmark times: the forward alone, and a training step's value and
  gradient (forward and backward kernel)."""
  u = jax.ShapeDtypeStruct((4, 8192, 1024), jnp.float32)
  params = jax.ShapeDtypeStruct((1024, 16), jnp.complex64)
  starts = jax.ShapeDtypeStruct((4, 8192), jnp.bool_)
  for block_c in (4, 8, 16, 32):
    f = lambda u, p, r, s, block_c=block_c: modal_conv_pallas(u, p, r, s, config=ModalConfig(block_c=block_c))
    step = jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a)), argnums=(0, 1, 2))
    assert lower_for_gpu(f, u, params, params, starts).count("__gpu$xla.gpu.triton") == 1
    assert lower_for_gpu(step, u, params, params, starts).count("__gpu$xla.gpu.triton") == 2


def test_kernels_export_for_tpu_at_the_benchmark_shape():
  """Lowered for a TPU from this host (``platform`` left to lowering time), the call takes the Mosaic
  kernels: one for the forward, two for a training step's value and gradient, no Triton."""
  u = jax.ShapeDtypeStruct((4, 8192, 1024), jnp.float32)
  params = jax.ShapeDtypeStruct((1024, 16), jnp.complex64)
  starts = jax.ShapeDtypeStruct((4, 8192), jnp.bool_)
  f = lambda u, p, r, s: modal_conv_pallas(u, p, r, s)
  step = jax.value_and_grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
  for fn, kernels in ((f, 1), (step, 2)):
    text = jax.export.export(jax.jit(fn), platforms=["tpu"])(u, params, params, starts).mlir_module()
    assert text.count("tpu_custom_call") == kernels and "triton" not in text
  with pytest.raises(ValueError, match="tpu_block_c=64 a multiple of 128"):
    modal_conv_pallas(jnp.zeros((1, 8, 2)), jnp.zeros((2, 1), jnp.complex64), jnp.zeros((2, 1), jnp.complex64),
                      config=ModalConfig(tpu_block_c=64), interpret=True, platform="tpu")


@pytest.mark.parametrize("mixer", ["hyena", "baseconv", "s4d"])
def test_model_longconv_impl_picks_what_packed_documents_run(mixer):
  """``model.longconv_impl`` reaches the long convolution of every mixer that has one: with packed
  documents, "reference" runs the token recurrence (recorded) and gives the chunked form's output; a
  value outside the kernel's list is one line naming the field and the choices."""
  from flax import nnx

  from hybrids.config import ConfigError, get_config, resolve
  from hybrids.mixers import get_mixer

  config = get_config("experiments/quickstart.py:tiny", {"model.pattern": (mixer,), "model.d_model": 16})
  x = jax.random.normal(jax.random.key(0), (1, 9, 16))
  seg = jnp.asarray([[0] * 4 + [1] * 5], jnp.int32)
  outputs = {}
  for impl in ("xla", "reference"):
    config.model.longconv_impl = impl
    layer = get_mixer(mixer)(config.model, rngs=nnx.Rngs(params=0))
    with dispatch.recording() as calls:
      outputs[impl] = layer(x, segment_ids=seg)
    assert [(c["family"], c["impl"]) for c in calls] == [("modal", impl)]
  assert _rel(outputs["xla"], outputs["reference"]) < 1e-4
  config.model.longconv_impl = "fft"
  with pytest.raises(ConfigError, match="model.longconv_impl='fft'.*auto, xla, reference, pallas"):
    resolve(config)
