"""Names that differ between the jax releases we support (0.10.2, 0.11.2, newest), in one place.

Every Pallas kernel names its compiler parameters explicitly through these, so a call means the same
thing on every version: ``CompilerParams`` in the Triton and Mosaic TPU backends (older releases:
``TritonCompilerParams`` / ``TPUCompilerParams``), and ``pl.squeezed`` for a dropped block dimension
(older releases: ``None``). Also :func:`lowered_once`, which every kernel's ``custom_vjp`` core goes
through, and :func:`batch_parallel`, under which those cores run per batch shard of a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import warnings
from collections.abc import Sequence

import jax
from jax.experimental import pallas as pl
from jax.sharding import Mesh, PartitionSpec

SQUEEZED = getattr(pl, "squeezed", None)


def triton_params(num_warps: int, num_stages: int):
  """Launch parameters of a ``pl.pallas_call`` lowered through Triton (GPU)."""
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def mosaic_params(dimension_semantics: tuple[str, ...]):
  """Grid semantics of a ``pl.pallas_call`` lowered through Mosaic (TPU): "parallel" or "arbitrary"."""
  from jax.experimental.pallas import tpu as pltpu
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=tuple(dimension_semantics))


_BATCH_MESH: contextvars.ContextVar = contextvars.ContextVar("batch_mesh", default=None)
# (kernel core, argument shapes, shard count) already warned about: a step retraced for eval, or a
# core called once per layer, would otherwise repeat the same warning.
_WARNED_UNSPLIT: set = set()


@contextlib.contextmanager
def batch_parallel(mesh: Mesh, axes: Sequence[str]):
  """While a step is traced inside this context, every kernel core runs under ``shard_map`` with its
  leading (batch) dimension split over ``axes`` of ``mesh``: each device runs the kernel on its own
  rows. XLA's SPMD partitioner has no rule for a Pallas custom call, so under a plain jit with a
  batch-sharded input it would gather the whole batch onto every device and run it there (MaxText
  wraps its Pallas kernels in ``shard_map`` for the same reason). The kernels are independent per
  batch row, so this changes where they run, not what they compute. A core whose batch the shard count
  does not divide runs unsplit, the whole batch on every device, and says so once (``warnings.warn``)."""
  token = _BATCH_MESH.set((mesh, tuple(axes)))
  try:
    yield
  finally:
    _BATCH_MESH.reset(token)


def lowered_once(core, static_argnums: tuple[int, ...]):
  """``core`` (a kernel's ``custom_vjp`` function, every array argument and result batch-first) as a
  nested jit, so a model that calls it once per layer lowers its kernels once per shape. Inside one
  jit every call site would lower them again, and Pallas lowers in Python: 8 Griffin layers with
  remat emitted 23 scan kernels, 9–13 s of lowering on the host, against 3 kernels and 2 s this way
  (XLA inlines the shared function afterwards). Under :func:`batch_parallel` it runs per batch shard."""
  jitted = jax.jit(core, static_argnums=static_argnums)
  static = frozenset(static_argnums)

  @functools.wraps(core)
  def call(*args):
    context = _BATCH_MESH.get()
    if context is None:
      return jitted(*args)
    mesh, axes = context
    arrays = [i for i, a in enumerate(args) if i not in static and a is not None]
    shards = math.prod(mesh.shape[a] for a in axes)
    if shards == 1:
      return jitted(*args)
    if any(args[i].shape[0] % shards for i in arrays):
      _warn_unsplit(core, [args[i].shape for i in arrays], shards, axes)
      return jitted(*args)  # e.g. a batch of one sequence: nothing to split

    def per_shard(*rows):
      full = list(args)
      for i, x in zip(arrays, rows):
        full[i] = x
      return jitted(*full)

    spec = PartitionSpec(axes)
    # check_vma=False: pallas_call has no replication rule on every jax we support.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(spec for _ in arrays), out_specs=spec,
                         check_vma=False)(*(args[i] for i in arrays))

  return call


def _warn_unsplit(core, shapes: list[tuple[int, ...]], shards: int, axes: tuple[str, ...]) -> None:
  """Say once per (core, shapes, shard count) that a kernel runs unsplit under :func:`batch_parallel`:
  every device then computes the whole batch, which is correct but costs the split's speed-up and memory."""
  name = f"{getattr(core, '__module__', '?')}.{getattr(core, '__qualname__', repr(core))}"
  key = (name, tuple(tuple(s) for s in shapes), shards)
  if key in _WARNED_UNSPLIT:
    return
  _WARNED_UNSPLIT.add(key)
  batch = next(s[0] for s in shapes if s[0] % shards)
  warnings.warn(
      f"batch_parallel: kernel {name} got a batch of {batch} rows, not divisible by the {shards} shards of "
      f"mesh axes {axes}; it runs without shard_map, so every device computes the whole batch of {batch} "
      f"(correct, but no speed-up from the split and the full batch's memory on each device). "
      f"Argument shapes: {[tuple(s) for s in shapes]}", stacklevel=3)


@functools.cache
def _mgpu_load_takes_index() -> bool:
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return "idx" in inspect.signature(plgpu.load).parameters  # jax 0.10: load(ref, idx, ...)


def mgpu_load(ref, layout, *, optimized: bool = True):
  """A vector into Mosaic GPU registers of ``layout``: from shared memory, or from global memory with
  ``optimized=False`` (plain per-thread loads, which Mosaic GPU allows there; its vectorized path reads
  shared memory only). Spelled for every supported jax (0.10's ``load`` takes an index)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if _mgpu_load_takes_index():
    return plgpu.load(ref, (), layout=layout, optimized=optimized)
  return plgpu.load(ref, layout=layout, optimized=optimized)
