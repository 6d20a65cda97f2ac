"""Scaling ladder: loss against training FLOPs per mixer, pure and hybridized with sliding-window attention.

Each recurrent mixer is trained at the ``model.size`` presets of ``hybrids/sizes.py`` (every pattern
matched to the non-embedding parameters of the global-attention transformer of that size) at
Chinchilla's ≈ 20 training tokens per parameter (Hoffmann et al. 2022), both alone (``(m,)``) and as a
Griffin-style hybrid ``(m, m, swa)`` with a 1024-byte window (De et al. 2024, "Griffin", Fig. 2 and
§3: the hybrid's loss-vs-FLOPs curve at or below the transformer's). The report fits a power law
``L(C) = a·C^−b + c`` per pattern to the eval loss against ``train_flops`` of each ``summary.json``.

Data: the byte-level GCIDE dictionary corpus as prepared shards (vocab 257). Prepare it once:

    python -m hybrids.data.prepare --input '/usr/share/dictd/gcide.dict.dz' --tokenizer bytes --output data/gcide-bytes

(``apt-get install dict-gcide`` provides the file.) The larger rungs see the corpus for several
epochs; the report's curves are still comparable across mixers because all see the same tokens.

Commands:

    python -m launch sweep experiments/scaling.py --backend local          # full ladder, 60 runs (cluster)
    python -m launch sweep experiments/scaling.py:small --backend local    # 8 runs
    python -m launch sweep experiments/scaling.py:gpu --backend local      # 4 runs, one H100
    python -m launch report runs/scaling        # a variant's runs: runs/scaling-VARIANT

Steps per size: ``train.steps = tokens_per_param · N / (batch · seq_len)`` with ``N`` the non-embedding
parameters of the size's attention baseline (``hybrids.sizes``), the same for every pattern of a size,
so all patterns of a rung see identical tokens.

Variants:

- ``None`` (full): attention, SWA, and RG-LRU, Mamba-2, GLA, mLSTM, Gated DeltaNet each pure and
  hybrid (12 patterns) × sizes 1m, 5m, 20m, 50m, 125m = 60 runs at seq_len 1024, 20 tokens/param
  (1m: ~1k steps at batch 16 … 125m: ~7k steps at batch 256); days of GPU time.
- ``small``: attention, Griffin (RG-LRU hybrid), Mamba-2 hybrid and pure RG-LRU at 1m and 5m, 20
  tokens/param: 8 runs, ~15 min on one GPU.
- ``gpu``: attention and Griffin at 1m and 5m, 5 tokens/param, seq_len 512, bf16: 4 runs, ~3 min on
  one H100 (estimate: ~20 s compile each; 4M and 26M tokens). Expected: Griffin's loss at or below
  attention's at both sizes, and both lower at 5m.
- ``tiny``: a few-second CPU smoke test (2 points, used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

from hybrids.config import base_config, check_variant, smoke_test
from hybrids.sizes import chinchilla_steps

DATA_PATH = "data/gcide-bytes"
SIZES = ("1m", "5m", "20m", "50m", "125m")
RECURRENT = ("rglru", "mamba2", "gla", "mlstm", "gated_deltanet")
WINDOW = 1024
TOKENS_PER_PARAM = 20
# Per rung: (batch size, peak learning rate); smaller models take larger steps.
BATCH_LR = {"1m": (16, 3e-3), "5m": (32, 2e-3), "20m": (64, 1.5e-3), "50m": (128, 1e-3), "125m": (256, 6e-4)}
VARIANTS = ("small", "gpu", "tiny")


def get_config(arg: str | None = None):
  """The 1m attention rung on byte-level text; points set size, pattern, batch, lr and steps."""
  check_variant("scaling", arg, VARIANTS)
  c = base_config("shards")
  c.data.path = DATA_PATH
  c.data.seq_len = 1024
  c.model.size = "1m"
  c.model.pattern = ("attention",)
  c.model.window = WINDOW
  c.train.batch_size, c.train.lr = BATCH_LR["1m"]
  c.train.steps = 1000
  c.train.warmup_steps = 100
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.train.checkpoint_every = 500
  c.train.log_every = 20
  if arg == "gpu":
    c.data.seq_len = 512
    c.model.window = 256
    c.model.dtype = "bfloat16"
    c.model.scan_impl = "xla"  # the Pallas scan's Triton compile alone costs minutes; compile time dominates here
    c.train.batch_size = 64
    c.train.eval_every = 0
    c.train.eval_batches = 8
    c.train.checkpoint_every = 1000
  elif arg == "tiny":
    smoke_test(c, steps=2, batch_size=2, n_layers=3, num_heads=2, window=8)
  return c


def _ladder(h, arg, patterns, sizes, *, tokens_per_param, batch_lr=None):
  """``patterns × sizes`` with the Chinchilla step count (and batch / lr) of each size."""
  base = get_config(arg)
  rungs = []
  for size in sizes:
    batch, lr = batch_lr[size] if batch_lr else (base.train.batch_size, base.train.lr)
    steps = chinchilla_steps(base.model, size, tokens_per_step=batch * base.data.seq_len,
                             tokens_per_param=tokens_per_param)
    rungs.append({"model.size": size, "train.batch_size": batch, "train.lr": lr, "train.steps": steps,
                  "train.warmup_steps": min(base.train.warmup_steps, steps // 10),
                  "train.eval_every": 0 if base.train.eval_every == 0 else max(steps // 4, 1),
                  "train.checkpoint_every": max(steps // 4, 1)})
  variant = [h.sweep("config", [arg])] if arg else []
  return h.product(variant + [h.sweep("model.pattern", patterns), rungs])


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring)."""
  check_variant("scaling", arg, VARIANTS)
  if arg == "tiny":
    return h.product([h.sweep("config", ["tiny"]), h.sweep("model.pattern", [("attention",), ("rglru", "rglru", "swa")])])
  if arg == "gpu":
    return _ladder(h, arg, [("attention",), ("rglru", "rglru", "swa")], ("1m", "5m"), tokens_per_param=5)
  if arg == "small":
    patterns = [("attention",), ("rglru", "rglru", "swa"), ("mamba2", "mamba2", "swa"), ("rglru",)]
    return _ladder(h, arg, patterns, ("1m", "5m"), tokens_per_param=TOKENS_PER_PARAM, batch_lr=BATCH_LR)
  patterns = ([("attention",), ("swa",)] + [(m,) for m in RECURRENT] + [(m, m, "swa") for m in RECURRENT])
  return _ladder(h, arg, patterns, SIZES, tokens_per_param=TOKENS_PER_PARAM, batch_lr=BATCH_LR)
