"""FLOPs per token as numbers, with no model in sight: the ``Flops`` record of one layer and the
formulas of the kernel families that several mixers share.

A leaf module: the mixers count their own FLOPs with it (``Mixer.flops``), and ``hybrids.flops``
adds the layers counted from their weights and accounts whole models.
"""

from __future__ import annotations

import dataclasses
import math

COMPONENTS = ("projections", "conv", "attention", "recurrence", "mlp")


@dataclasses.dataclass
class Flops:
  """Forward FLOPs per token of one layer, by component (see the module docstring)."""
  projections: float = 0.0
  conv: float = 0.0
  attention: float = 0.0
  recurrence: float = 0.0
  mlp: float = 0.0

  def __add__(self, other: Flops) -> Flops:
    return Flops(*(getattr(self, c) + getattr(other, c) for c in COMPONENTS))

  def total(self) -> float:
    return sum(getattr(self, c) for c in COMPONENTS)


# ------------------------------------------------------------------------------- kernel families

def window_attention_flops(heads: int, head_dim: int, window: int, seq_len: int) -> float:
  """Per token: ``4·(T·W − W²/2)·H·d_h / T`` (QKᵀ and PV inside the causal band of ``W`` keys)."""
  w = min(window, seq_len)
  return 4.0 * (seq_len * w - w * w / 2.0) * heads * head_dim / seq_len


def _padding(chunk: int, seq_len: int) -> float:
  """Chunked kernels pad the sequence to whole chunks and compute the padding too."""
  return -(-seq_len // chunk) * chunk / seq_len


def gla_flops(heads: int, d_k: int, d_v: int, chunk: int, seq_len: int, *, per_key_decay: bool = False) -> float:
  """Per token, the chunked ``kernels.gla`` form (module docstring); ``K = d_k``, ``V = d_v``."""
  # Intra-chunk scores q_t·k_s over the full c × c block, and the decay gain of each pair (its exponent
  # b_t − b_s and its product): per key dim with a per-key decay (a three-factor product-sum), else per pair.
  scores = 4.0 * chunk * d_k if per_key_decay else 2.0 * chunk * d_k + 2.0 * chunk
  per_head = 4.0 * d_k * d_v + 2.0 * d_k * d_v / chunk + scores + 2.0 * chunk * d_v
  return heads * per_head * _padding(chunk, seq_len)


def delta_flops(heads: int, d_k: int, d_v: int, chunk: int, seq_len: int) -> float:
  """Per token, the chunked WY form of ``kernels.delta``: per chunk ``K Kᵀ`` (2c²K), ``(I + A)⁻¹`` by
  ``2·(⌈log₂ c⌉ − 1)`` c×c matmuls, the solve ``[Ũ | W]`` (2c²(V + K)), ``W S₀`` and ``Kᵀ U`` (4cKV),
  ``Q Kᵀ`` (2c²K), the outputs (2c²V + 2cKV) and the pair gains (4c²: exponent, ``β·KKᵀ·gain``, ``QKᵀ·gain``)."""
  c = chunk
  inverse_matmuls = 2 * (max(c - 1, 1).bit_length() - 1)
  per_chunk = (2 * c * c * d_k + inverse_matmuls * 2 * c ** 3 + 2 * c * c * (d_v + d_k) + 4 * c * d_k * d_v
               + 2 * c * c * d_k + 2 * c * c * d_v + 2 * c * d_k * d_v + 4 * c * c)
  return heads * per_chunk / c * _padding(chunk, seq_len)


def fft_conv_flops(channels: int, seq_len: int) -> float:
  """Per token, ``hybrids.longconv.causal_fft_conv`` of the input (the filter's FFT is per batch)."""
  n = 1 << (2 * seq_len - 1).bit_length()
  per_channel = 2 * 2.5 * n * math.log2(n) + 6.0 * (n // 2 + 1)
  return channels * per_channel / seq_len
