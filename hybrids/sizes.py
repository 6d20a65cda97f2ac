"""Size presets matched across mixers: ``model.size`` picks the shape, then the MLP width is set so
every pattern has the non-embedding parameters of the global-attention transformer of that size.

    python -m hybrids.sizes            # table of actual counts per size × mixer

Size names are nominal (the total with a 32k vocabulary, roughly). The baseline of a size is a stack of
``hybrids.mixers.SIZE_BASELINE`` (the global-attention transformer) with ``mlp_expansion = 3``. Other
patterns keep ``d_model``, ``n_layers`` and heads, and get the ``mlp_expansion`` that matches the
baseline's non-embedding count (counts are linear in it, so two abstract builds solve it exactly,
before rounding the hidden width to a multiple of 8). A pattern whose mixers alone exceed the budget
is an error rather than a silently unmatched point.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import ml_collections
from flax import nnx

# name → (d_model, n_layers, num_heads)
LADDER = {
    "1m": (128, 4, 4), "2m": (128, 8, 4), "5m": (256, 6, 4), "10m": (384, 6, 6), "20m": (384, 10, 6), "50m": (512, 14, 8),
    "125m": (768, 12, 12), "350m": (1024, 24, 16), "760m": (1536, 24, 16), "1b": (2048, 24, 16),
}
BASE_EXPANSION = 3.0
TOLERANCE = 0.10


def non_embedding_params(model_cfg) -> int:
  """Non-embedding parameters of ``HybridLM(model_cfg)``, from shapes only (nothing is allocated).

  A block's parameters depend only on its pattern entry and whether its MLP is a MoE, which repeat
  with period lcm(len(pattern), moe_every); one abstract build of a single period (tracing an NNX
  model costs ~1 s a layer on a small CPU) gives every layer's count.
  """
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.vocab_size = cfg.vocab_size or 256
  return _non_embedding_params(json.dumps(cfg.to_dict(), sort_keys=True, default=list))


@functools.lru_cache(maxsize=256)
def _non_embedding_params(cfg_json: str) -> int:
  model = _abstract_period(cfg_json)
  blocks = [param_count(block) for block in model.blocks]
  n_layers = json.loads(cfg_json)["n_layers"]
  return param_count(model.final_norm) + sum(blocks[i % len(blocks)] for i in range(n_layers))


def param_count(module: nnx.Module) -> int:
  """Parameters of ``module`` (abstract or concrete)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def abstract_period(model_cfg):
  """``HybridLM(model_cfg)`` built for one period of its layers, shapes only (nothing is allocated).

  Layer ``i`` of the full model is ``blocks[i % len(blocks)]`` of the result (see
  :func:`non_embedding_params`); ``model_cfg.vocab_size`` must be set. Cached: do not mutate it.
  """
  return _abstract_period(json.dumps(model_cfg.to_dict(), sort_keys=True, default=list))


@functools.lru_cache(maxsize=64)
def _abstract_period(cfg_json: str):
  from hybrids.model import HybridLM

  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  period = math.lcm(len(tuple(cfg.pattern)), max(int(cfg.moe_every), 1))
  cfg.n_layers = min(cfg.n_layers, period)
  return nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(params=0)))


def apply_size(model_cfg) -> ml_collections.ConfigDict:
  """``model_cfg`` with the shape of ``model_cfg.size`` and a matched ``mlp_expansion`` (no-op if unset)."""
  if not model_cfg.size:
    return model_cfg
  if model_cfg.size not in LADDER:
    raise ValueError(f"model.size={model_cfg.size!r}; valid: {', '.join(LADDER)}")
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.d_model, cfg.n_layers, cfg.num_heads = LADDER[cfg.size]
  cfg.num_kv_heads = 0 if cfg.num_heads % max(cfg.num_kv_heads, 1) else cfg.num_kv_heads
  from hybrids.mixers import SIZE_BASELINE  # here: the mixers import hybrids.flops, which imports this module

  baseline = ml_collections.ConfigDict(cfg.to_dict())
  baseline.pattern, baseline.mlp_expansion, baseline.moe_every = (SIZE_BASELINE,), BASE_EXPANSION, 0
  target = non_embedding_params(baseline)
  counts = {}
  for expansion in (1.0, 2.0):
    cfg.mlp_expansion = expansion
    counts[expansion] = non_embedding_params(cfg)
  per_unit = counts[2.0] - counts[1.0]
  hidden = round((1.0 + (target - counts[1.0]) / per_unit) * cfg.d_model / 8) * 8
  cfg.mlp_expansion = max(hidden, 8) / cfg.d_model
  actual = non_embedding_params(cfg)
  if abs(actual - target) > TOLERANCE * target:
    raise ValueError(f"model.size={cfg.size!r}: pattern {tuple(cfg.pattern)} has {actual:,} non-embedding parameters "
                     f"even with the smallest MLP; the attention baseline has {target:,} (±{TOLERANCE:.0%})")
  return cfg


def main() -> None:
  from hybrids.defaults import model_config
  from hybrids.mixers import MIXERS

  names = sorted(MIXERS)
  print("size  " + "  ".join(f"{n:>16}" for n in names))
  for size in list(LADDER)[:5]:
    row = []
    for name in names:
      c = model_config()
      c.size, c.pattern = size, (name,)
      try:
        row.append(f"{non_embedding_params(apply_size(c)):>16,}")
      except ValueError:
        row.append(f"{'unmatched':>16}")
    print(f"{size:<5} " + "  ".join(row))


def chinchilla_steps(model_cfg, size: str, *, tokens_per_step: int, tokens_per_param: float = 20) -> int:
  """Training steps that give ``tokens_per_param`` tokens per non-embedding parameter of ``size``.

  Counted on ``size``'s attention baseline, so every pattern of one size sees the same tokens (the
  presets match their parameters to that baseline within ±10%). Hoffmann et al. 2022: ≈ 20.
  """
  from hybrids.mixers import SIZE_BASELINE

  baseline = model_cfg.copy_and_resolve_references()
  baseline.size, baseline.pattern = size, (SIZE_BASELINE,)
  return max(1, round(tokens_per_param * non_embedding_params(apply_size(baseline)) / tokens_per_step))


if __name__ == "__main__":
  main()
