"""Names that differ between the jax releases we support (0.10.2, 0.11.2, newest), in one place.

Every Pallas kernel names its compiler parameters explicitly through these, so a call means the same
thing on every version: ``CompilerParams`` in the Triton and Mosaic TPU backends (older releases:
``TritonCompilerParams`` / ``TPUCompilerParams``), and ``pl.squeezed`` for a dropped block dimension
(older releases: ``None``). Also :func:`lowered_once`, which every kernel's ``custom_vjp`` core goes
through.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl

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


def lowered_once(core, static_argnums: tuple[int, ...]):
  """``core`` (a kernel's ``custom_vjp`` function) as a nested jit, so a model that calls it once per
  layer lowers its kernels once per shape. Inside one jit every call site would lower them again, and
  Pallas lowers in Python: 8 Griffin layers with remat emitted 23 scan kernels, 9–13 s of lowering
  on the host, against 3 kernels and 2 s this way (XLA inlines the shared function afterwards)."""
  return jax.jit(core, static_argnums=static_argnums)
