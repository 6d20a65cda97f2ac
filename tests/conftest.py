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

jax.config.update("jax_default_matmul_precision", "highest")
