"""Tiling arithmetic shared by the Pallas kernels of every family, in one place.

Triton tiles are powers of two (dot operands at least 16 wide), Mosaic TPU blocks multiples of
(8, 128), Mosaic GPU shared-memory tiles 128-byte swizzled rows: each kernel pads its dims up to
these with :func:`next_pow2` / :func:`round_up` and allocates its TMA tiles with :func:`swizzled`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def next_pow2(n: int) -> int:
  """The smallest power of two ≥ ``n`` (1 for n ≤ 1)."""
  return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, m: int) -> int:
  """``n`` rounded up to a multiple of ``m``."""
  return -(-n // m) * m


def swizzled(shape, dtype):
  """A Mosaic GPU shared-memory buffer in 128-byte swizzled rows (the layout TMA and wgmma read
  without bank conflicts)."""
  minor = 128 // jnp.dtype(dtype).itemsize  # elements per 128-byte swizzled row
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(128)))
