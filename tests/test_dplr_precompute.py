"""kernels.dplr's chunk precompute as one Pallas kernel (``dplr(precompute="pallas")``, issue 24), in the
Pallas interpreter on CPU: every array it makes against the XLA ``_precompute`` on fresh random inputs
(per-key, per-head and no decay; decays near 0 and near 1; documents starting inside a chunk, on a chunk
edge and on the row's last token; an odd length; chunks of one and of two row blocks), then the whole
``dplr(impl="pallas", precompute="pallas")`` against the token recurrence (outputs, final state, every
gradient), the arguments it refuses, and its Triton lowering for CUDA from this CPU host.

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_dplr_precompute.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dplr_pallas import _FAST_COMPILE, _inputs, _lowering_args, _outputs_and_grads, _rel_err, _segment_ids

from kernels.dplr import dplr
from kernels.dplr.precompute import precompute
from kernels.dplr.xla import _precompute

CHUNKS = (16, 32)  # one block of 16 rows (the diagonal loop only), two (the factored off-diagonal block)
NAMES = ("o", "final state", "dq", "dk", "dv", "da", "db", "dlog_decay", "dinitial_state")


def _compiled(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


@pytest.mark.parametrize("decay,packed,chunk", [
    ("channel", True, 32), ("channel", False, 16), ("head", True, 16), ("head", False, 32), ("none", True, 32)])
def test_kernel_matches_xla_precompute(decay, packed, chunk):
  """Each array of the kernel (q e^G, V, W, Ũ, Â, X, the chunk decay, M_qk, M_qa) against the XLA
  precompute's, same inputs; decays of e^−30 and 1 − 1e−6 per step among them, so the cumulative
  log-decays reach about −900 inside a chunk and every unmasked exponent must still be ≤ 0."""
  (q, k, v, a, b, log_decay, _), _ = _inputs(decay, seed=7 + chunk + ("channel", "head", "none").index(decay))
  segment_ids = jnp.asarray(_segment_ids()) if packed else None
  run = lambda f: _compiled(lambda *xs: f(*xs, chunk, segment_ids), q, k, v, a, b, log_decay)
  ours = run(lambda *xs: precompute(*xs, interpret=True))
  ref = run(_precompute)
  # 1e-4, the tolerance of the other dplr tests: both forms take e^{G_t − G_s} from cumulative sums that
  # reach about −900 here (f32 spacing 6e-5 there), summed in different orders (a masked matmul here,
  # XLA's associative scan there).
  for name, x, y in zip(ref._fields, ours, ref):
    assert x.shape == y.shape and x.dtype == jnp.float32, name
    assert np.all(np.isfinite(np.asarray(x))), name
    assert _rel_err(x, y) < 1e-4, (name, _rel_err(x, y))


@pytest.mark.parametrize("decay,chunk", [("channel", 32), ("head", 16)])
def test_dplr_with_pallas_precompute_matches_reference(decay, chunk, assert_named_close):
  """The whole chunked form with both Pallas kernels (precompute and state pass) against the token
  recurrence: outputs, final state and the gradients of all seven arguments (the precompute's backward
  is the XLA form's vjp), with packed documents and the last chunk padded."""
  args, cots = _inputs(decay, seed=41 + chunk)
  kwargs = dict(segment_ids=_segment_ids(), chunk_size=chunk, impl="pallas", interpret=True, precompute="pallas")
  ours = _outputs_and_grads(args, cots, **kwargs)
  ref = _outputs_and_grads(args, cots, segment_ids=_segment_ids(), impl="reference")
  assert_named_close(NAMES, ours, ref, 1e-4, _rel_err)


def test_precompute_arguments():
  """The kernel is only behind impl="pallas" with the Triton layout, and takes Triton chunks; the
  default precompute is XLA's."""
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="precompute='pallas' runs with impl='pallas'"):
    dplr(q, q, q, q, q, impl="xla", precompute="pallas")
  with pytest.raises(ValueError, match="precompute='pallas' runs with impl='pallas'"):
    dplr(q, q, q, q, q, impl="pallas", interpret=True, pallas_target="mosaic_tpu", precompute="pallas")
  with pytest.MonkeyPatch.context() as patch:  # a TPU host with no target named: Mosaic, so refused here
    patch.setattr("kernels.dispatch.backend", lambda: "tpu")
    with pytest.raises(ValueError, match="precompute='pallas' runs with .* backend 'tpu'"):
      dplr(q, q, q, q, q, impl="pallas", precompute="pallas")
  with pytest.raises(ValueError, match="precompute='fast' must be"):
    dplr(q, q, q, q, q, impl="pallas", interpret=True, precompute="fast")
  with pytest.raises(ValueError, match="needs chunk_size a power of two"):
    precompute(q, q, q, q, q, None, 24, interpret=True)
  jaxpr = lambda **kw: str(jax.make_jaxpr(lambda q: dplr(q, q, q, q, q, impl="pallas", interpret=True, **kw))(q))
  assert "dplr_precompute" not in jaxpr() and "dplr_precompute" in jaxpr(precompute="pallas")


def test_precompute_lowers_for_gpu(lower_for_gpu):
  """Both kernels lower to Triton IR for CUDA from this CPU host (chunks of 64, d 128, bf16, per-key
  decay): the forward runs the precompute and the state pass; its gradient adds the reverse pass (the
  precompute's backward is XLA)."""
  fwd = lambda *xs: dplr(*xs, chunk_size=64, impl="pallas", pallas_target="triton", precompute="pallas")

  def loss(*xs):
    o, s = fwd(*xs)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  for f, kernels in ((fwd, 2), (jax.grad(loss, argnums=tuple(range(7))), 3)):
    module = lower_for_gpu(f, *_lowering_args(True))
    assert module.count("xla.gpu.triton") == kernels
