"""The mixer survey: every recurrent mixer hybridized with a small sliding window — which beat Mamba?

The study this project exists for. Griffin (De et al. 2024), Based (Arora et al. 2024), SWAX (Cabannes
et al. 2025) and Jamba (Lieber et al. 2024) each pair one recurrent block with (sliding-window)
attention; none compares the recurrent blocks once hybridized. Here every recurrent mixer of
``hybrids.mixers.MIXERS`` is put in the Griffin pattern ``(m, m, swa)`` with a small window (128
bytes), matched in non-embedding parameters (``model.size``, ``hybrids/sizes.py``) and trained on the
same tokens (Chinchilla's 20 per parameter) at three sizes, so the report's loss-vs-FLOPs power-law
fits rank the hybrids against the Mamba hybrid ``(mamba, mamba, swa)``; global attention and SWA
alone are the reference lines.

Grid: one pattern per registered mixer (every recurrent one in ``(m, m, swa)``, plus attention and SWA
alone; FoX, softmax attention with a forget gate, counts as attention and runs alone) × sizes 5m, 20m,
50m, i.e. ``3 × len(MIXERS)`` runs; seq_len 2048, 2^17 tokens a step.

Data: the byte-level GCIDE dictionary corpus as prepared shards (vocab 257). Prepare it once:

    python -m hybrids.data.prepare --input '/usr/share/dictd/gcide.dict.dz' --tokenizer bytes --output data/gcide-bytes

Commands:

    python -m launch sweep experiments/mixer_survey.py --backend local          # 3 × len(MIXERS) runs (cluster)
    python -m launch sweep experiments/mixer_survey.py:small --backend local    # len(MIXERS) runs
    python -m launch report runs/mixer_survey        # a variant's runs: runs/mixer_survey-VARIANT

Variants: ``None`` (full, above; days of GPU time); ``small`` (every pattern at 1m only, 20
tokens/param, seq_len 1024: one run per mixer of ~500 steps, ~1 h on one GPU); ``tiny`` (a few-second CPU smoke
test, 2 points, used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

from hybrids.config import base_config, check_variant, smoke_test
from hybrids.mixers import MIXERS
from hybrids.sizes import chinchilla_steps

DATA_PATH = "data/gcide-bytes"
ATTENTION_MIXERS = ("attention", "swa", "fox")  # references: run alone, not in (m, m, swa)
RECURRENT = tuple(name for name in MIXERS if name not in ATTENTION_MIXERS)
WINDOW = 128
SIZES = ("5m", "20m", "50m")
LR = {"1m": 3e-3, "5m": 2e-3, "20m": 1.5e-3, "50m": 1e-3}
VARIANTS = ("small", "tiny")
# Per variant: (sizes, seq_len, tokens per step).
BUDGET = {None: (SIZES, 2048, 2**17), "small": (("1m",), 1024, 2**15)}


def patterns() -> list[tuple[str, ...]]:
  """``(m, m, swa)`` for every recurrent mixer, then the attention-only references."""
  return [(m, m, "swa") for m in RECURRENT] + [(m,) for m in ATTENTION_MIXERS]


def get_config(arg: str | None = None):
  """The Mamba hybrid (mamba, mamba, swa) at 5m; points set pattern, size, steps."""
  check_variant("mixer_survey", arg, VARIANTS)
  c = base_config("shards")
  c.data.path = DATA_PATH
  c.data.seq_len = 2048
  c.model.size = "5m"
  c.model.pattern = ("mamba", "mamba", "swa")
  c.model.window = WINDOW
  c.train.batch_size = 2**17 // c.data.seq_len
  c.train.lr = LR["5m"]
  c.train.steps = 1000
  c.train.warmup_steps = 100
  c.train.eval_every = 1000
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.log_every = 20
  if arg == "small":
    c.data.seq_len = 1024
    c.model.size = "1m"
    c.train.batch_size = 2**15 // c.data.seq_len
    c.train.lr = LR["1m"]
  elif arg == "tiny":
    smoke_test(c, steps=2, batch_size=2, n_layers=3, num_heads=2, window=8)
  return c


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring)."""
  check_variant("mixer_survey", arg, VARIANTS)
  variant = [h.sweep("config", [arg])] if arg else []
  if arg == "tiny":
    return h.product(variant + [h.sweep("model.pattern", [("gla", "gla", "swa"), ("mamba", "mamba", "swa")])])
  sizes, _, tokens_per_step = BUDGET[arg]
  base = get_config(arg)
  rungs = []
  for size in sizes:
    steps = chinchilla_steps(base.model, size, tokens_per_step=tokens_per_step)
    rungs.append({"model.size": size, "train.steps": steps, "train.lr": LR[size],
                  "train.warmup_steps": min(100, steps // 10), "train.eval_every": max(steps // 4, 1),
                  "train.checkpoint_every": max(steps // 4, 1)})
  return h.product(variant + [rungs, h.sweep("model.pattern", patterns())])
