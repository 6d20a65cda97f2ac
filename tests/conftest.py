import os
import tempfile

# Tests run on CPU with deterministic, single-threaded-friendly settings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most test time is XLA compiling the same tiny train steps again: resumed runs, reruns after SIGTERM
# and subprocess sweeps rebuild identical programs. A persistent cache shared by the xdist workers and
# their subprocesses (env vars are inherited) compiles each program once per machine. It is keyed on
# the program, flags and jax version, so it cannot hand back a different computation.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"hybrids-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def on_cuda(lowering):
  """``lowering()`` (a lowering for CUDA) from this CPU host on every jax: jax ≥ 0.12 lowers Pallas-Triton
  only for a GPU it knows, so where no CUDA device is present the lowering is retried for an abstract
  H100 (the device the GPU benchmarks run on), as jax's own ahead-of-time lowering does."""
  try:
    return lowering()
  except RuntimeError as e:
    if "AbstractDevice" not in str(e) and "No supported GPU" not in str(e):
      raise
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
  h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
    return lowering()


@pytest.fixture
def cuda_lowering():
  """:func:`on_cuda` as a fixture."""
  return on_cuda


@pytest.fixture
def lower_for_gpu():
  """``lower(f, *args) -> str``: the module of ``jit(f)`` exported for CUDA, its Pallas kernels
  lowered to Triton IR from this CPU host (tile shapes, dot shapes, power-of-two blocks); on jax ≥ 0.12
  for an abstract H100 (:func:`on_cuda`)."""
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

  def lower(f, *args):
    return on_cuda(lambda: jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args)
                   .mlir_module())

  return lower


@pytest.fixture
def assert_named_close():
  """``check(names, ours, ref, tol, rel)``: for each named pair, None where the reference has None,
  else the same shape, all finite and ``rel(ours, ref) < tol`` (one assertion per output and
  gradient, so a bad small one is not hidden by a norm over all)."""
  def check(names, ours, ref, tol, rel):
    for name, a, b in zip(names, ours, ref):
      if b is None:
        assert a is None, name
        continue
      assert a.shape == b.shape, (name, a.shape, b.shape)
      assert np.all(np.isfinite(np.asarray(a, np.float32))), name
      assert rel(a, b) < tol, (name, rel(a, b))

  return check
