"""The ``model`` section's defaults: the shared fields and every registered mixer's own (its
``SETTINGS``). Apart from ``hybrids.config`` so that ``hybrids.sizes`` can build a default model
config without importing the config resolution that applies its presets."""

from __future__ import annotations

import ml_collections

from hybrids.mixers import mixer_settings


def model_config() -> ml_collections.ConfigDict:
  """The ``model`` section: the fields below, and every registered mixer's own fields (its
  ``SETTINGS``: defaults and descriptions in the mixer's file; ``hybrids.mixers.contract``)."""
  c = ml_collections.ConfigDict()
  c.vocab_size = 0            # 0: take the data's vocabulary
  c.size = ""                 # a preset of hybrids.sizes.LADDER ("1m" … "1b"): sets the shape, matches params
  c.d_model = 64
  c.n_layers = 2
  c.pattern = ("rglru", "rglru", "swa")  # tiled to n_layers
  c.num_heads = 4
  c.norm = "rms"              # the residual stream's norms: "rms" (RMSNorm) or "layer" (LayerNorm, Zoology)
  c.mlp_expansion = 3.0        # 0: no MLP sublayer (Zoology's MQAR models: the block is x + Mixer(Norm(x)))
  for field, setting in mixer_settings().items():
    c[field] = setting.default
  c.moe_every = 0             # 0: dense MLPs; k: every k-th layer's MLP is a MoE (Jamba: 2)
  c.num_experts = 8
  c.moe_top_k = 2
  c.parallel_merge = "sum"    # how a parallel pattern entry "a|b" merges: sum, gate, concat
  c.tie_embeddings = True
  c.embed_scale = True        # multiply embeddings by √d_model (Griffin, Gemma)
  c.dtype = "float32"         # compute dtype
  c.param_dtype = "float32"
  c.logits_softcap = 0.0      # 0: off
  # Position encoding: "rope" rotates attention's and SWA's queries and keys; "learned" adds a learned
  # absolute embedding of max_len positions to the token embedding (Zoology, GPT-2); "none": neither.
  c.position = "rope"
  c.max_len = 0               # positions of the "learned" table; 0: data.seq_len
  c.remat = False
  c.attention_impl = "auto"
  c.scan_impl = "auto"
  c.gla_impl = "auto"
  c.delta_impl = "auto"       # kernels.delta (DeltaNet, Gated DeltaNet)
  return c
