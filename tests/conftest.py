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


@pytest.fixture
def lower_for_gpu():
  """``lower(f, *args) -> str``: the module of ``jit(f)`` exported for CUDA, its Pallas kernels
  lowered to Triton IR from this CPU host (tile shapes, dot shapes, power-of-two blocks). jax ≥ 0.12
  lowers Pallas-Triton only with a CUDA device present, so there the test is skipped; CI's jax
  0.10.2 runs it, and the GPU benchmarks run the kernels for real."""
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

  def lower(f, *args):
    try:
      return jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    except RuntimeError as e:
      if "AbstractDevice" in str(e) or "No supported GPU" in str(e):
        pytest.skip("this jax (>= 0.12) lowers Pallas-Triton only with a CUDA device present; CI's jax "
                    "0.10.2 runs this lowering on CPU and the GPU benchmarks run the kernels for real: "
                    f"{str(e)[:80]}")
      raise

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
