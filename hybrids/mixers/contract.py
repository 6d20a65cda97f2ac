"""What every registered mixer declares about itself, so that nothing outside its file names it.

A mixer class (registered in ``hybrids.mixers.MIXERS``) has:

- both faces: ``__call__(x, *, return_state=False, max_len=None)``, ``init_state(batch, *, max_len=None)``
  (its decode-state shape) and ``step(x_t, state)``;
- ``check_config(model_config, *, seq_len)`` (classmethod): rejects impossible settings naming the field;
- ``flops(seq_len) -> hybrids.cost.Flops``: forward FLOPs per token of what its ``nnx.Linear`` /
  ``BlockDiagonalLinear`` and short-conv layers do not account for (``hybrids.flops`` counts those
  from the module itself, ``2 ×`` their weights), i.e. its sequence-mixing core;
- ``NO_WEIGHT_DECAY``: names of its parameters that AdamW must not decay (its dynamics: decay rates,
  poles, residues, skips, token-shift mixes — decay would pull them toward a different model, not a
  smaller one); parameters with ``ndim < 2`` and norms' ``scale`` are never decayed anyway;
- ``SETTINGS``: the ``model.*`` fields it reads that no code outside the mixers reads, as
  ``{field: Setting(default, doc, lo)}``; :func:`hybrids.config.model_config` collects them. A field
  several mixers read (``chunk_size``, ``d_state``, ``conv_width``, …) is declared by each of them, with
  an equal ``Setting``;
- a module docstring naming its paper (authors and year).

Optional: ``TENSOR_PARALLEL = True`` where its ``q/k/v_proj`` and ``o_proj`` follow Megatron's column /
row split (``hybrids.sharding`` then shards them over ``tensor``; attention and SWA); a ``window``
entry in ``SETTINGS`` marks a windowed mixer (``HybridLM.set_window`` sets its band; SWAX).
``SEGMENTS = True`` (declared in the class body, not inherited) where its parallel face takes
``segment_ids: int [batch, time]`` (a keyword of ``__call__``; equal ids are one document, a change
of id starts the next) and treats each document of a packed row as if it ran alone (issue 23);
``__call__(…, return_state=True, segment_ids=…)`` then returns the state after the row's last
document alone. A mixer without it is never given ``segment_ids``: the model refuses
(:func:`check_segments`) rather than let state cross documents silently.

``NO_WEIGHT_DECAY`` and ``SETTINGS`` are declared in the class body itself, not inherited, so that a
subclass says explicitly what it adds (``swa``'s window, Gated DeltaNet's decay parameters).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

FACES = ("__call__", "init_state", "step", "check_config", "flops")
DECLARED = ("NO_WEIGHT_DECAY", "SETTINGS")
_PAPER = re.compile(r"[A-Z][\w'-]+.{0,200}?\b(19|20)\d\d\b", re.S)  # "Gu & Dao 2023", "Sun et al. 2023", …


@dataclasses.dataclass(frozen=True)
class Setting:
  """One ``model.*`` field of a mixer: its default, a one-line description and the lower bound that
  every value must meet, whether or not a layer reads it (``lo_open``: strictly above ``lo``)."""
  default: Any
  doc: str
  lo: float | None = None
  lo_open: bool = False


# Fields several mixers read: each of them declares the same Setting (imported from here).
CHUNK_SIZE = Setting(16, "chunk of the chunked linear-attention forms", 1)
CONV_WIDTH = Setting(4, "width of the short causal convolutions", 1)
D_STATE = Setting(16, "state size / filter modes", 1)
SSM_EXPAND = Setting(2, "inner width = ssm_expand · d_model", 1)
HEAD_DIM = Setting(0, "0: model.d_model // model.num_heads", 0)
ROPE_BASE = Setting(10_000.0, "RoPE's base", 0, lo_open=True)
LONGCONV_IMPL = Setting("auto", "kernels.modal implementation of the long convolutions with packed documents: "
                        "auto (xla), xla, reference or pallas (streaming kernels: Triton on GPU, Mosaic on TPU)")


def missing(cls) -> list[str]:
  """The parts of the contract that mixer class ``cls`` lacks (empty: it honours it)."""
  out = [f"method {face}" for face in FACES if not callable(getattr(cls, face, None))]
  for attr in DECLARED:
    if attr not in vars(cls):
      out.append(f"{attr} declared in the class body")
  if "NO_WEIGHT_DECAY" in vars(cls) and not (isinstance(cls.NO_WEIGHT_DECAY, frozenset)
                                             and all(isinstance(n, str) for n in cls.NO_WEIGHT_DECAY)):
    out.append("NO_WEIGHT_DECAY as a frozenset of parameter names")
  if "SETTINGS" in vars(cls) and not (isinstance(cls.SETTINGS, dict)
                                      and all(isinstance(s, Setting) and s.doc for s in cls.SETTINGS.values())):
    out.append("SETTINGS as {field: Setting(default, doc, …)}")
  module = sys.modules.get(cls.__module__)
  if not _PAPER.search((module.__doc__ if module else None) or ""):
    out.append("a module docstring naming its paper (authors and year)")
  return out


def collect_settings(mixers: dict) -> dict[str, Setting]:
  """``{field: Setting}`` of every mixer in ``mixers`` (name → class); a field declared by several
  mixers must be declared alike (ValueError naming both otherwise)."""
  out: dict[str, Setting] = {}
  owner: dict[str, str] = {}
  for name, cls in mixers.items():
    for field, setting in cls.SETTINGS.items():
      if field in out and out[field] != setting:
        raise ValueError(f"mixers {owner[field]!r} and {name!r} declare model.{field} differently: "
                         f"{out[field]} != {setting}")
      out.setdefault(field, setting)
      owner.setdefault(field, name)
  return out


def tensor_parallel(cls) -> bool:
  """Whether ``hybrids.sharding`` splits the mixer's projections over the ``tensor`` axis."""
  return bool(getattr(cls, "TENSOR_PARALLEL", False))


def windowed(cls) -> bool:
  """Whether the mixer attends within a band of ``model.window`` positions (its ``window`` is settable)."""
  return "window" in getattr(cls, "SETTINGS", {})


def supports_segments(cls) -> bool:
  """Whether the mixer's parallel face takes ``segment_ids`` (``SEGMENTS = True`` in its class body)."""
  return bool(vars(cls).get("SEGMENTS", False))


def check_segments(name: str, cls) -> None:
  """ValueError naming mixer ``name`` unless it supports ``segment_ids`` (documents packed in a row)."""
  if not supports_segments(cls):
    raise ValueError(f"mixer {name!r} does not support segment_ids (packed documents) yet: its state would "
                     "cross document boundaries; set data.document_boundaries=False or use mixers that declare "
                     "SEGMENTS = True")
