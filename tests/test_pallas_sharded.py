"""Pallas kernels on a batch-sharded mesh: under ``kernels.pallas_compat.batch_parallel`` each kernel
core runs per batch shard (``shard_map``), and outputs and gradients equal the unsharded run.

Runs ``python tests/test_pallas_sharded.py`` in a subprocess with 4 fake CPU devices (pytest workers
already hold a 1-device jax); the kernels run in interpret mode.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_run_per_batch_shard_and_match_the_unsharded_run():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  for name in ("scan", "gla", "delta", "window attention"):
    assert f"{name}: sharded per batch shard, equal" in done.stdout, done.stdout
  assert "batch of 2 on 4 shards: unsplit, equal" in done.stdout, done.stdout


def test_an_unsplit_batch_is_warned_about_once_per_shape_and_shard_count():
  """A stand-in core under a 4-shard abstract mesh: batches 4 and 8 split (shard_map, no warning);
  batches 2 and 6 run whole on every device, each shape warned about once however often it is traced."""
  import warnings

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AbstractMesh

  from kernels import pallas_compat

  def stand_in_core(x, scale):
    return jnp.sin(x) * scale

  core = pallas_compat.lowered_once(stand_in_core, static_argnums=(1,))
  mesh = AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))

  def traced(batch):
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, 3))
    with pallas_compat.batch_parallel(mesh, ("data", "fsdp")):
      jaxpr = str(jax.make_jaxpr(lambda x: core(x, 2.0))(x))
    return x, jaxpr

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for batch in (4, 2, 8, 2, 6, 6):
      x, jaxpr = traced(batch)
      assert ("shard_map" in jaxpr) == (batch % 4 == 0), (batch, jaxpr)
      if batch % 4:  # the unsplit path still computes the kernel on the whole batch
        np.testing.assert_allclose(np.asarray(core(x, 2.0)), np.asarray(stand_in_core(x, 2.0)), rtol=1e-6)
  messages = [str(w.message) for w in caught if "batch_parallel" in str(w.message)]
  assert len(messages) == 2, messages
  for batch, message in zip((2, 6), messages):
    assert "stand_in_core" in message and f"batch of {batch} rows" in message and "the 4 shards" in message
    assert "every device computes the whole batch" in message


def _main():
  import warnings

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from kernels.delta import delta_rule
  from kernels.gla import PallasConfig, gla_pallas
  from kernels.pallas_compat import batch_parallel
  from kernels.scan import linear_scan_pallas
  from kernels.window_attention import flash_window_attention

  jax.config.update("jax_default_matmul_precision", "highest")
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2, 1), ("data", "fsdp", "tensor"))
  axes = ("data", "fsdp")
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 32))
  normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
  gla_config = PallasConfig(chunk=16, states_block=16, out_block=16, dqk_block=16, dv_block=16)

  def cases(batch):
    q, k, v = normal(batch, 21, 2, 16), normal(batch, 21, 2, 16), normal(batch, 21, 2, 16)
    decay = -jax.nn.softplus(normal(batch, 21, 2, 16))
    beta = jax.nn.sigmoid(normal(batch, 21, 2))
    k_unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return {
        "scan": (lambda a, b: linear_scan_pallas(jax.nn.sigmoid(a), b, interpret=True)[0],
                 (normal(batch, 21, 24), normal(batch, 21, 24))),
        "gla": (lambda q, k, v, g: gla_pallas(q, k, v, g, interpret=True, config=gla_config)[0], (q, k, v, decay)),
        "delta": (lambda q, k, v, b: delta_rule(q, k, v, b, impl="pallas", interpret=True)[0], (q, k_unit, v, beta)),
        "window attention": (lambda q, k, v: flash_window_attention(q, k, v, window=8, interpret=True), (q, k, v)),
    }

  def loss_and_grads(fn, n):
    return jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(n)))

  def check(name, fn, args, expect_split):
    plain = jax.jit(loss_and_grads(fn, len(args)))(*args)

    def under_mesh(*a):
      with batch_parallel(mesh, axes):
        return loss_and_grads(fn, len(a))(*a)

    split = "shard_map" in str(jax.make_jaxpr(under_mesh)(*args))
    assert split == expect_split, (name, split)
    placed = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(axes) if expect_split else PartitionSpec()))
              for x in args]
    sharded = jax.jit(under_mesh)(*placed)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)

  for name, (fn, args) in cases(4).items():
    check(name, fn, args, expect_split=True)
    print(f"{name}: sharded per batch shard, equal", flush=True)
  fn, args = cases(2)["scan"]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    check("scan, batch 2", fn, args, expect_split=False)
  unsplit = [str(w.message) for w in caught if "batch_parallel" in str(w.message)]
  # Traced twice (jaxpr, jit); the custom_vjp core holds forward and backward: one warning, naming it.
  assert len(unsplit) == 1 and "_scan_core" in unsplit[0] and "batch of 2 rows" in unsplit[0], unsplit
  print("batch of 2 on 4 shards: unsplit, equal", flush=True)


if __name__ == "__main__":
  _main()
