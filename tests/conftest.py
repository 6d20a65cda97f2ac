import os

# Tests run on CPU with deterministic, single-threaded-friendly settings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
