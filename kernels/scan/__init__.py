"""Diagonal linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t``.

Serves every mixer whose state evolves elementwise: RG-LRU (Griffin, De et al. 2024), Mamba's S6
(Gu & Dao 2023, state ``[d, n]``) and S4D (Gu et al. 2022).

Shapes: ``a, b: [batch, time, *features]``; ``h0: [batch, *features]``. Returns ``(h, h_last)`` with
``h: [batch, time, *features]`` and ``h_last: [batch, *features]``. Accumulation is in float32 for
lower-precision inputs; ``h`` is returned in ``b``'s dtype, ``h_last`` in float32 so that a decode
loop carries an unrounded state.

Implementations: ``"reference"`` (sequential ``lax.scan``), ``"xla"`` (associative scan, the CPU
default) and ``"pallas"`` (a streaming kernel for GPU via Triton and TPU via Mosaic, with a
``custom_vjp`` whose backward is the same streaming pass run the other way; on GPU a problem with
few lanes, e.g. batch 1 at 32k tokens, is split in time into segments; see the Pallas section).
``"auto"`` picks ``"pallas"`` when the default backend is a GPU or TPU (:func:`kernels.dispatch.scan`;
on Hopper its Mosaic GPU kernels, ``mosaic_gpu.py``, where they take the call).

Files: ``reference.py``, ``xla.py``, ``pallas.py`` (Triton and Mosaic TPU layouts, the tiling
``_resolve``), ``mosaic_gpu.py``, ``bench.py`` (``python -m kernels.bench --kernels scan``).
"""

from __future__ import annotations

from typing import Literal

from kernels import dispatch
from kernels.scan.pallas import PallasConfig, linear_scan_pallas
from kernels.scan.reference import _check, linear_scan_reference
from kernels.scan.xla import _linear_scan_associative

Impl = Literal["auto", "xla", "reference", "pallas"]
IMPLS = ("auto", "xla", "reference", "pallas")

__all__ = ["IMPLS", "PallasConfig", "choice", "linear_scan", "linear_scan_pallas", "linear_scan_reference"]


def choice(requested: str = "auto", *, interpret: bool = False) -> dispatch.Choice:
  """What runs ``linear_scan`` here (:func:`kernels.dispatch.scan`)."""
  return dispatch.scan(requested, IMPLS, interpret=interpret)


def linear_scan(a, b, h0=None, *, reverse: bool = False, impl: Impl = "auto", interpret: bool = False):
  """``h_t = a_t ⊙ h_{t-1} + b_t`` over axis 1 (``reverse`` runs from the end, as a backward pass needs).

  Args:
    a: decay, ``[batch, time, *features]``.
    b: input, same shape as ``a``.
    h0: optional initial state ``[batch, *features]`` (zeros when None).
    reverse: scan from ``t = T-1`` down to 0; ``h_last`` is then the state at ``t = 0``.
    impl: ``"reference"`` (sequential), ``"xla"`` (associative scan), ``"pallas"`` or ``"auto"``
      (``"pallas"`` on GPU/TPU, ``"xla"`` elsewhere: :func:`kernels.dispatch.scan`).
    interpret: run the Pallas kernels in interpret mode (CPU tests); only with ``impl="pallas"``.
  Returns:
    ``(h [batch, time, *features] in b.dtype, h_last [batch, *features] in float32)``.
  """
  _check(a, b, h0)
  impl = dispatch.called(choice(impl, interpret=interpret), a=a, b=b).impl
  if impl == "reference":
    return linear_scan_reference(a, b, h0, reverse=reverse)
  if impl == "pallas":
    return linear_scan_pallas(a, b, h0, reverse=reverse, interpret=interpret)
  return _linear_scan_associative(a, b, h0, reverse=reverse)
