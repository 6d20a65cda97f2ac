"""Zoology's Fig. 2: MQAR accuracy against model width, one curve per mixer, at four sequence lengths.

Reproduces Arora, Eyuboglu et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models", Fig. 2: two-layer models on multi-query associative recall (vocabulary 8192) at
(seq_len, key–value pairs) ∈ {(64, 4), (128, 8), (256, 16), (512, 64)}, widths d_model ∈ {64, 128, 256,
512}, learning rate swept over logspace(−4, −2, 4) and the best one kept per cell. Global attention
solves MQAR at every width; the gated-convolution and recurrent mixers need width (state) to climb.
Mixers: the paper's attention, Based, Mamba, Hyena, RWKV and BaseConv, plus Griffin's RG-LRU (the
project's reference recurrent block). Training follows Zoology's figure-2 setup: 100k training
examples for 64 epochs, batch 512 / 256 / 128 at seq_len ≤ 128 / 256 / 512, power-law query gaps
(a = 0.01), no random filler tokens, 3000 test examples. Differences: one head, and every block keeps
this project's gated MLP (Zoology replaces the MLP by the identity).

Commands (accuracy on the answers is ``eval.eval_accuracy`` of each run's ``summary.json``):

    python -m launch sweep experiments/zoology_mqar.py --backend local          # full grid, 448 runs
    python -m launch sweep experiments/zoology_mqar.py:small --backend local    # 24 runs
    python -m launch sweep experiments/zoology_mqar.py:gpu --backend local      # 6 runs, one H100
    python -m launch report runs/zoology_mqar        # a variant's runs: runs/zoology_mqar-VARIANT

One point by hand: ``python -m hybrids.train --config experiments/zoology_mqar.py:gpu --workdir /tmp/mqar
--config.model.pattern="('based',)"``.

Variants (``get_config(arg)`` and ``get_sweep(h, arg)`` take the same ``arg``):

- ``None`` (full): 7 mixers × 4 widths × 4 (seq_len, pairs) × 4 learning rates = 448 runs; 12.5k–50k
  steps each — a cluster job (days of GPU time in all).
- ``small``: attention, Based, Mamba, RG-LRU × d_model {64, 128, 256} at (256, 16) × lr {1e-3, 3e-3}
  = 24 runs of 3000 steps (batch 128): about an hour on one GPU; too slow for a CPU.
- ``gpu``: attention, Based and Mamba at d_model {64, 256} (lr 1e-2 and 3e-3), Zoology's (64, 4) cell
  at vocabulary 256, 800 steps of batch 64, bf16: 6 runs on one H100. Expected: attention ≈ 1.0 at
  both widths, Based and Mamba lower at 64 and higher at 256.
- ``tiny``: a few-second CPU smoke test (2 points, used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

import math

import numpy as np

from hybrids.config import base_config, check_variant, smoke_test

PAPER_MIXERS = ("attention", "based", "mamba", "hyena", "rwkv6", "baseconv", "rglru")
D_MODELS = (64, 128, 256, 512)
SEQ_LEN_KV = ((64, 4), (128, 8), (256, 16), (512, 64))
LEARNING_RATES = tuple(float(lr) for lr in np.logspace(-4, -2, 4))
# Zoology's figure-2 batch per sequence length; 64 epochs over 100k examples.
BATCH_BY_SEQ_LEN = {64: 512, 128: 512, 256: 256, 512: 128}
TRAIN_EXAMPLES, EPOCHS, TEST_EXAMPLES = 100_000, 64, 3000
VARIANTS = ("small", "gpu", "tiny")


def get_config(arg: str | None = None):
  """The base point of variant ``arg``: two layers on MQAR with Zoology's data (seq_len 256, 16 pairs)."""
  check_variant("zoology_mqar", arg, VARIANTS)
  c = base_config("mqar")
  c.data.vocab_size = 8192
  c.data.seq_len = 256
  c.data.num_kv_pairs = 16
  c.data.power_a = 0.01
  c.data.random_non_queries = False
  c.data.num_train_examples = TRAIN_EXAMPLES
  c.data.num_eval_examples = TEST_EXAMPLES
  c.model.pattern = ("attention",)
  c.model.n_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 1  # Zoology's attention and Based use one head
  c.train.batch_size = BATCH_BY_SEQ_LEN[256]
  c.train.steps = EPOCHS * TRAIN_EXAMPLES // c.train.batch_size
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.eval_every = 2000
  c.train.eval_batches = math.ceil(TEST_EXAMPLES / c.train.batch_size)
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  if arg == "small":
    c.train.batch_size = 128
    c.train.steps = 3000
    c.train.warmup_steps = 100
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    c.train.checkpoint_every = 1000
  elif arg == "gpu":
    # Zoology's first cell (seq_len 64, 4 pairs) at vocabulary 256: 500 steps at 8192 left attention at
    # chance on an H100 (measured 2026-11-23: accuracy 0.035), and the full schedule is 12.5k steps.
    c.data.vocab_size = 256
    c.data.seq_len = 64
    c.data.num_kv_pairs = 4
    c.model.dtype = "bfloat16"
    c.model.scan_impl = "xla"  # the Pallas scan's Triton compile costs minutes; Mamba here is 2 layers of d ≤ 256
    c.train.batch_size = 64
    c.train.steps = 800
    c.train.lr = 1e-2
    c.train.warmup_steps = 50
    c.train.eval_every = 0
    c.train.eval_batches = 4
    c.train.checkpoint_every = 500
  elif arg == "tiny":
    smoke_test(c)
  return c


def _patterns(h, mixers):
  return h.sweep("model.pattern", [(m,) for m in mixers])


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring); each names its ``config`` variant explicitly."""
  check_variant("zoology_mqar", arg, VARIANTS)
  if arg is None:
    batches = [BATCH_BY_SEQ_LEN[s] for s, _ in SEQ_LEN_KV]
    data_axis = h.zip([
        h.sweep("data.seq_len", [s for s, _ in SEQ_LEN_KV]),
        h.sweep("data.num_kv_pairs", [k for _, k in SEQ_LEN_KV]),
        h.sweep("train.batch_size", batches),
        h.sweep("train.steps", [EPOCHS * TRAIN_EXAMPLES // b for b in batches]),
        h.sweep("train.eval_batches", [math.ceil(TEST_EXAMPLES / b) for b in batches]),
    ])
    return h.product([_patterns(h, PAPER_MIXERS), h.sweep("model.d_model", D_MODELS), data_axis,
                      h.sweep("train.lr", LEARNING_RATES)])
  if arg == "small":
    axes = [_patterns(h, ("attention", "based", "mamba", "rglru")), h.sweep("model.d_model", (64, 128, 256)),
            h.sweep("train.lr", (1e-3, 3e-3))]
  elif arg == "gpu":
    axes = [_patterns(h, ("attention", "based", "mamba")),
            h.zip([h.sweep("model.d_model", (64, 256)), h.sweep("train.lr", (1e-2, 3e-3))])]
  else:  # tiny
    axes = [_patterns(h, ("based", "attention"))]
  return h.product([h.sweep("config", [arg])] + axes)
