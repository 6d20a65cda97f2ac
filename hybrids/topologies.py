"""Named hybrid topologies from the literature, as model-config overrides.

A topology is the layer pattern (tiled to ``n_layers``) plus the few fields that define it in its
paper; everything else (width, depth, window) stays the experiment's choice.

| name | pattern | paper |
|---|---|---|
| ``griffin`` | R, R, SWA | De et al. 2024, "Griffin": two RG-LRU blocks per local-attention block |
| ``hawk`` | R | Hawk, the pure RG-LRU model of the same paper |
| ``jamba`` | 1 attention : 7 Mamba, MoE every other layer | Lieber et al. 2024, "Jamba" (§2: l=8, a:m=1:7, e=2) |
| ``based_hybrid`` | 20% Based linear attention, 20% SWA, 60% BaseConv | Arora et al. 2024, "Based" (§4 architecture) |
| ``swax`` | mLSTM, SWA alternating; stochastic windows {128, 2048} | Cabannes et al. 2025, "SWAX" |
| ``parallel_mamba2`` | Mamba-2 and SWA reading the same input, merged | Lee et al. 2025, parallel hybrid |

``apply_topology(config, name)`` writes these fields into a full config (``model.*`` and, for SWAX,
``train.window_choices``); windows larger than ``data.seq_len`` are dropped from the SWAX set so a
short-sequence smoke test still validates.
"""

from __future__ import annotations

TOPOLOGIES: dict[str, dict] = {
    "griffin": {"model.pattern": ("rglru", "rglru", "swa")},
    "hawk": {"model.pattern": ("rglru",)},
    # Jamba's block: 8 layers, attention in the middle (layer 4 of 8 in the paper), MoE on every other MLP.
    "jamba": {"model.pattern": ("mamba",) * 4 + ("attention",) + ("mamba",) * 3,
              "model.moe_every": 2, "model.num_experts": 16, "model.moe_top_k": 2},
    # 10 layers: 2 Based (Taylor linear attention), 2 SWA, 6 BaseConv, the linear/SWA layers spread out.
    "based_hybrid": {"model.pattern": ("baseconv", "based", "baseconv", "swa", "baseconv",
                                "baseconv", "based", "baseconv", "swa", "baseconv")},
    "swax": {"model.pattern": ("mlstm", "swa"), "train.window_choices": (128, 2048)},
    "parallel_mamba2": {"model.pattern": ("mamba2|swa",), "model.parallel_merge": "gate"},
}


def apply_topology(config, name: str):
  """``config`` (a full base config) with topology ``name``'s fields set; returns it."""
  if name not in TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; valid: {', '.join(sorted(TOPOLOGIES))}")
  for key, value in TOPOLOGIES[name].items():
    section, field = key.split(".")
    if key == "train.window_choices":
      value = tuple(w for w in value if w <= config.data.seq_len) or (config.model.window,)
    config[section][field] = value
  return config
