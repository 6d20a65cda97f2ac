"""Sequence-mixing kernels shared by many mixers.

Each kernel is a plain function over arrays with an ``impl`` argument:
``"xla"`` (the pure-jnp path, the CPU default), ``"reference"`` (the slow, obviously-correct
definition used by tests) and ``"auto"`` (the fastest implementation known for the platform).
Pallas implementations are added behind the same signatures; mixers never change.
"""

from kernels.scan import linear_scan, linear_scan_reference
from kernels.window_attention import window_attention, window_attention_reference

__all__ = ["linear_scan", "linear_scan_reference", "window_attention", "window_attention_reference"]
