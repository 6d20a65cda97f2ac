"""Sequence mixers: one file per mixer, a registry mapping config names to classes.

Every mixer is an ``nnx.Module`` built as ``Mixer(model_config, rngs=...)`` with two faces computing
the same function:

- parallel: ``y = mixer(x)``, ``x: [batch, time, d_model]``; ``mixer(x, return_state=True)`` also
  returns the decode state after the last position (prefill);
- recurrent: ``state = mixer.init_state(batch)``; ``y_t, state = mixer.step(x_t, state)``,
  ``x_t: [batch, d_model]``.

and a classmethod ``check_config(model_config, seq_len=...)`` that rejects impossible settings with
a message naming the field, before anything is compiled. Each mixer also declares its FLOPs per token
(``flops``), its parameters exempt from weight decay (``NO_WEIGHT_DECAY``) and its config fields
(``SETTINGS``): the contract of :mod:`hybrids.mixers.contract`, which ``tests/test_contract.py`` checks
for every registered mixer. Adding a mixer = one file + one line in ``MIXERS``.
"""

from __future__ import annotations

from hybrids.mixers.attention import Attention
from hybrids.mixers.based import Based
from hybrids.mixers.baseconv import BaseConv
from hybrids.mixers.contract import Setting, collect_settings
from hybrids.mixers.deltanet import DeltaNet
from hybrids.mixers.fox import ForgettingTransformer
from hybrids.mixers.gated_deltanet import GatedDeltaNet
from hybrids.mixers.gated_deltaproduct import GatedDeltaProduct
from hybrids.mixers.gla import GatedLinearAttention
from hybrids.mixers.hgrn2 import HGRN2
from hybrids.mixers.hyena import Hyena
from hybrids.mixers.kda import KimiDeltaAttention
from hybrids.mixers.linear_attention import LinearAttention
from hybrids.mixers.mamba import Mamba
from hybrids.mixers.mamba2 import Mamba2
from hybrids.mixers.mamba3 import Mamba3
from hybrids.mixers.mlstm import MLSTM
from hybrids.mixers.retnet import RetNet
from hybrids.mixers.rglru import RGLRUBlock
from hybrids.mixers.rwkv6 import RWKV6
from hybrids.mixers.rwkv7 import RWKV7
from hybrids.mixers.s4d import S4D
from hybrids.mixers.slstm import SLSTM
from hybrids.mixers.swa import SlidingWindowAttention

MIXERS = {
    "attention": Attention,
    "swa": SlidingWindowAttention,
    "rglru": RGLRUBlock,
    "linear_attention": LinearAttention,
    "retnet": RetNet,
    "gla": GatedLinearAttention,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "mamba3": Mamba3,
    "based": Based,
    "rwkv6": RWKV6,
    "s4d": S4D,
    "mlstm": MLSTM,
    "slstm": SLSTM,
    "baseconv": BaseConv,
    "hyena": Hyena,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "kda": KimiDeltaAttention,
    "rwkv7": RWKV7,
    "gated_deltaproduct": GatedDeltaProduct,
    "hgrn2": HGRN2,
    "fox": ForgettingTransformer,
}

# The reference of hybrids.sizes: a size preset gives every pattern the non-embedding parameters of a
# stack of this mixer at model.mlp_expansion = 3 (the global-attention transformer).
SIZE_BASELINE = "attention"

__all__ = ["MIXERS", "SIZE_BASELINE", "Setting", "get_mixer", "mixer_settings"]


def mixer_settings() -> dict[str, Setting]:
  """The ``model.*`` fields that the registered mixers declare (``SETTINGS``), merged."""
  return collect_settings(MIXERS)


def get_mixer(name: str):
  """The mixer class registered as ``name``."""
  try:
    return MIXERS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(MIXERS))}") from None
