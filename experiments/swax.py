"""SWAX: mLSTM + sliding-window attention trained with fixed windows against stochastic windows.

Reproduces Cabannes et al. 2025, "Short window attention enables long-term memorization" (SWAX), the
window study (fixed windows vs stochastic {128, 2048}, evaluated on short- and long-context
retrieval): a hybrid of xLSTM's mLSTM and SWA layers (topology ``swax``, ``hybrids/topologies.py``)
trained with a long window (2048) leans on attention and its recurrence learns little long-term
memory; a short window (128) forces the recurrence to remember, which helps retrieval beyond the
window but costs short-context quality. Training with a window drawn per step from {128, 2048}
(``train.window_choices``), then the last 10% of the steps at the evaluation window
(``train.window_anneal_steps``, ``model.window``), aims to get both.

Runs per size: fixed windows 128, 512, 2048, and stochastic {128, 2048} annealed to 128 and to 2048 —
5 runs, at matched size (``model.size``) and Chinchilla's 20 tokens/param, seq_len 4096 (2^18 tokens a
step). Retrieval (passkey / needle at depths) inside the window, at the training length and 4×
beyond it is evaluated after training, per run.

Data: the byte-level GCIDE dictionary corpus as prepared shards (vocab 257). Prepare it once:

    python -m hybrids.data.prepare --input '/usr/share/dictd/gcide.dict.dz' --tokenizer bytes --output data/gcide-bytes

Commands:

    python -m launch sweep experiments/swax.py --backend local          # 10 runs (cluster)
    python -m launch sweep experiments/swax.py:small --backend local    # 3 runs
    python -m hybrids.evaluate --workdir runs/swax/RUN --eval retrieval,position --lengths 512,4096,16384
    python -m launch report runs/swax        # a variant's runs: runs/swax-VARIANT

Variants: ``None`` (full: sizes 20m and 125m, 10 runs, days of GPU time); ``small`` (size 5m,
seq_len 2048 so the long window is global there, 2^17 tokens a step: fixed 128, fixed 2048 and
stochastic annealed to 128 — 3 runs, ~20 min on one GPU); ``tiny`` (a few-second CPU smoke test,
2 points, used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

from hybrids.config import base_config, check_variant, smoke_test
from hybrids.sizes import chinchilla_steps
from hybrids.topologies import apply_topology

DATA_PATH = "data/gcide-bytes"
STOCHASTIC = (128, 2048)  # SWAX's window set
ANNEAL_FRACTION = 0.1
VARIANTS = ("small", "tiny")
# Per variant: (sizes, seq_len, tokens per step).
BUDGET = {None: (("20m", "125m"), 4096, 2**18), "small": (("5m",), 2048, 2**17)}
LR = {"5m": 2e-3, "20m": 1.5e-3, "125m": 1e-3}


def get_config(arg: str | None = None):
  """The SWAX topology (mLSTM, SWA) with a fixed window of 128; points set size, windows and steps."""
  check_variant("swax", arg, VARIANTS)
  c = base_config("shards")
  c.data.path = DATA_PATH
  c.data.seq_len = 4096
  apply_topology(c, "swax")
  c.train.window_choices = ()  # fixed window unless a point sets the stochastic set
  c.model.window = 128
  c.model.size = "20m"
  c.train.batch_size = 2**18 // c.data.seq_len
  c.train.steps = 1000
  c.train.lr = LR["20m"]
  c.train.warmup_steps = 100
  c.train.eval_every = 1000
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.log_every = 20
  if arg == "small":
    c.data.seq_len = 2048
    c.model.size = "5m"
    c.train.batch_size = 2**17 // c.data.seq_len
    c.train.lr = LR["5m"]
  elif arg == "tiny":
    smoke_test(c, steps=3, batch_size=2, n_layers=2, num_heads=2, window=4)
  return c


def _windows(h, steps: int, fixed, stochastic_targets) -> list[dict]:
  """Fixed-window points, then stochastic-window points annealed to each target window."""
  anneal = max(1, round(ANNEAL_FRACTION * steps))
  return h.chain([
      h.product([h.sweep("train.window_choices", [()]), h.sweep("model.window", fixed)]),
      h.product([h.sweep("train.window_choices", [STOCHASTIC]), h.sweep("train.window_anneal_steps", [anneal]),
                 h.sweep("model.window", stochastic_targets)]),
  ])


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring)."""
  check_variant("swax", arg, VARIANTS)
  variant = [h.sweep("config", [arg])] if arg else []
  if arg == "tiny":
    # The stochastic point first: the tests train the first point, and the window draw is SWAX's path.
    return h.product(variant + [h.chain([
        h.product([h.sweep("train.window_choices", [(4, 16)]), h.sweep("train.window_anneal_steps", [1])]),
        h.sweep("train.window_choices", [()])])])
  sizes, seq_len, tokens_per_step = BUDGET[arg]
  base = get_config(arg)
  fixed, targets = ((128, 512, 2048), STOCHASTIC) if arg is None else ((128, 2048), (128,))
  points = []
  for size in sizes:
    steps = chinchilla_steps(base.model, size, tokens_per_step=tokens_per_step)
    rung = {"model.size": size, "train.steps": steps, "train.lr": LR[size],
            "train.warmup_steps": min(100, steps // 10), "train.checkpoint_every": max(steps // 4, 1),
            "train.eval_every": max(steps // 4, 1)}
    points += h.product([[rung], _windows(h, steps, fixed, targets)])
  return h.product(variant + [points])
