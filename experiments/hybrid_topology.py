"""Sequential against parallel hybrids of a recurrent mixer and sliding-window attention, at equal size.

Reproduces the inter-layer vs intra-layer comparison of Lee et al. 2025 (systematic analysis of hybrid
linear-attention / attention architectures; ``parallel_mamba2`` in ``hybrids/topologies.py``): the
same two mixers either alternate layer by layer (sequential, pattern ``(m, swa)``) or read the same
input inside every layer and are merged (parallel, pattern ``("m|swa",)``, ``model.parallel_merge`` ∈
{sum, gate, concat}). Every model is matched in non-embedding parameters (``model.size``, the MLP
absorbs the difference, ``hybrids/sizes.py``) and trained on the same tokens (Chinchilla's 20 per
parameter), so the report's loss-vs-FLOPs curves compare topologies, not sizes. Global attention and
SWA alone are the reference lines.

Grid: recurrent mixers Mamba-2, GLA, RG-LRU × {sequential, parallel-sum, parallel-gate,
parallel-concat} + attention + SWA, × sizes 5m, 20m, 50m = 42 runs; seq_len 2048, window 256, 2^17
tokens a step.

Data: the byte-level GCIDE dictionary corpus as prepared shards (vocab 257). Prepare it once:

    python -m hybrids.data.prepare --input '/usr/share/dictd/gcide.dict.dz' --tokenizer bytes --output data/gcide-bytes

Commands:

    python -m launch sweep experiments/hybrid_topology.py --backend local          # 42 runs (cluster)
    python -m launch sweep experiments/hybrid_topology.py:small --backend local    # 4 runs
    python -m launch report runs/hybrid_topology        # a variant's runs: runs/hybrid_topology-VARIANT

Variants: ``None`` (full, above; days of GPU time); ``small`` (Mamba-2 at 5m: sequential,
parallel-sum, parallel-gate, and attention — 4 runs, ~25 min on one GPU); ``tiny`` (a few-second CPU
smoke test, 2 points, used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

from hybrids.config import base_config, check_variant, smoke_test
from hybrids.sizes import chinchilla_steps

DATA_PATH = "data/gcide-bytes"
RECURRENT = ("mamba2", "gla", "rglru")
MERGES = ("sum", "gate", "concat")
SIZES = ("5m", "20m", "50m")
TOKENS_PER_STEP = 2**17
LR = {"5m": 2e-3, "20m": 1.5e-3, "50m": 1e-3}
VARIANTS = ("small", "tiny")


def get_config(arg: str | None = None):
  """The parallel Mamba-2 | SWA hybrid (gated merge) at 5m; points set pattern, merge, size, steps."""
  check_variant("hybrid_topology", arg, VARIANTS)
  c = base_config("shards")
  c.data.path = DATA_PATH
  c.data.seq_len = 2048
  c.model.size = "5m"
  c.model.pattern = ("mamba2|swa",)
  c.model.parallel_merge = "gate"
  c.model.window = 256
  c.train.batch_size = TOKENS_PER_STEP // c.data.seq_len
  c.train.lr = LR["5m"]
  c.train.steps = 1000
  c.train.warmup_steps = 100
  c.train.eval_every = 1000
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.log_every = 20
  if arg == "tiny":
    smoke_test(c, steps=2, batch_size=2, n_layers=2, num_heads=2, window=8)
  return c


def topologies(h, mixer: str, merges) -> list[dict]:
  """Sequential ``(m, swa)`` and parallel ``("m|swa",)`` with each merge in ``merges``."""
  return h.chain([h.sweep("model.pattern", [(mixer, "swa")]),
                  h.product([h.sweep("model.pattern", [(f"{mixer}|swa",)]), h.sweep("model.parallel_merge", merges)])])


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring)."""
  check_variant("hybrid_topology", arg, VARIANTS)
  variant = [h.sweep("config", [arg])] if arg else []
  if arg == "tiny":
    return h.product(variant + [h.sweep("model.pattern", [("mamba2|swa",), ("mamba2", "swa")])])
  if arg == "small":
    models, sizes = h.chain([topologies(h, "mamba2", ("sum", "gate")), h.sweep("model.pattern", [("attention",)])]), ("5m",)
  else:
    models = h.chain([topologies(h, m, MERGES) for m in RECURRENT] + [h.sweep("model.pattern", [("attention",), ("swa",)])])
    sizes = SIZES
  base = get_config(arg)
  rungs = []
  for size in sizes:
    steps = chinchilla_steps(base.model, size, tokens_per_step=TOKENS_PER_STEP)
    rungs.append({"model.size": size, "train.steps": steps, "train.lr": LR[size],
                  "train.warmup_steps": min(100, steps // 10), "train.eval_every": max(steps // 4, 1),
                  "train.checkpoint_every": max(steps // 4, 1)})
  return h.product(variant + [rungs, models])
