"""The modal recurrence with document resets: the long convolutions' packed-documents face.

A depthwise long convolution whose filter is modal, ``h_l = Re Σ_n R_n λ_n^l`` (Hyena and BaseConv
through ``hybrids.longconv.ModalLongConv``, S4D), is the diagonal recurrence

    s_t = k_t λ ⊙ s_{t−1} + u_t,    y_t = Re Σ_n R_n s_{t,n},    k_t = 0 at a document start, else 1,

so with packed documents each document's convolution is this recurrence restarted at its start. Its
per-position states are ``[batch, time, channels, modes]`` complex (GBs at training shapes), so the XLA
form (``hybrids.longconv.segmented_modal_conv``) is chunked: exact taps inside a chunk, states at chunk
ends only. The Pallas kernels keep the states in registers and stream time once each way.

Shapes: ``u: [batch, time, channels]`` (any float dtype, computed in float32), ``log_poles, residues:
complex [channels, modes]``, ``starts: bool [batch, time]`` or None. Output float32 ``[batch, time,
channels]``.

Implementations (:func:`kernels.dispatch.modal`): ``"reference"`` (sequential ``lax.scan``, the
definition), ``"pallas"`` (``pallas.py``: Triton on a GPU, Mosaic on a TPU, either interpreted on a CPU) and
``"xla"``, which this package does not hold: the caller's chunked form runs (``hybrids.longconv``; kernels
import no models). Files: ``reference.py``, ``pallas.py``; ``python -m hybrids.bench_longconv`` times them.
"""

from __future__ import annotations

from kernels import dispatch
from kernels.modal.pallas import ModalConfig, modal_conv_pallas
from kernels.modal.reference import modal_conv_reference

IMPLS = ("auto", "xla", "reference", "pallas")

__all__ = ["IMPLS", "ModalConfig", "choice", "modal_conv_pallas", "modal_conv_reference"]


def choice(requested: str = "auto", *, interpret: bool = False, u=None, starts=None) -> dispatch.Choice:
  """What runs a modal convolution with documents here (:func:`kernels.dispatch.modal`), noted in any
  active :func:`kernels.dispatch.recording` with the call's arguments."""
  return dispatch.called(dispatch.modal(requested, IMPLS, interpret=interpret), u=u, starts=starts)
