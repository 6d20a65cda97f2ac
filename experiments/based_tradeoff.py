"""Based's recall / state-size trade-off: MQAR accuracy against recurrent-state bytes, one curve per mixer.

Reproduces Arora, Eyuboglu, Zhang et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff" (Based), Fig. 2 (left): every mixer is swept along the knob that sets its
decode state, and each run lands at (state bytes per sequence, MQAR accuracy). Sliding-window attention
and Based trace the Pareto frontier from small states to attention's quality; Mamba, RG-LRU and GLA sit
below it at equal state. The knobs:

| mixer | knob | values |
|---|---|---|
| Based (Taylor linear attention) | ``model.feature_dim`` × ``model.d_model`` | {8, 16, 24} × {128, 256} |
| SWA | ``model.window`` × ``model.d_model`` | {8, 16, 32, …, 1024} × {128, 256} |
| Mamba | ``model.d_state`` × ``model.d_model`` | {8, 16, 24} × {128, 256} |
| RG-LRU | ``model.rnn_width`` = {1, 2} × ``model.d_model`` | d_model {128, 256} |
| GLA | ``model.key_expansion`` × ``model.d_model`` | {0.25, 0.5, 1} × {128, 256} |
| attention | the KV cache of the whole sequence (the frontier's right end) | d_model {128, 256} |

Task: MQAR with vocabulary 8192 at seq_len 1024 and 64 key–value pairs (long enough that every window of
the sweep is a real band), two single-head layers, lr ∈ {3e-4, 1e-3, 3e-3} (the report keeps the best
per configuration): 40 configurations × 3 = 120 runs of 20k steps at batch 64. State bytes per sequence
come from ``hybrids/flops.py`` (``state_bytes_per_sequence`` in each ``summary.json``); the report plots
accuracy against them, one curve per mixer, with the Pareto frontier marked.

Commands:

    python -m launch sweep experiments/based_tradeoff.py --backend local          # 120 runs (cluster)
    python -m launch sweep experiments/based_tradeoff.py:small --backend local    # 11 runs
    python -m launch report runs/based_tradeoff        # a variant's runs: runs/based_tradeoff-VARIANT

Variants: ``None`` (full, above); ``small`` (seq_len 256, 16 pairs, d_model 64, one lr, 2000 steps at
batch 64 — 11 runs, ~20 min on one GPU, hours on a CPU); ``tiny`` (a few-second CPU smoke test, 2
points, used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

from hybrids.config import base_config, check_variant, smoke_test

D_MODELS = (128, 256)
WINDOWS = (8, 16, 32, 64, 128, 256, 512, 1024)
FEATURE_DIMS = (8, 16, 24)
D_STATES = (8, 16, 24)
RNN_WIDTH_FACTORS = (1, 2)
KEY_EXPANSIONS = (0.25, 0.5, 1.0)
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
VARIANTS = ("small", "tiny")


def get_config(arg: str | None = None):
  """Two single-head layers of global attention on MQAR (seq_len 1024, 64 pairs); points change the mixer."""
  check_variant("based_tradeoff", arg, VARIANTS)
  c = base_config("mqar")
  c.data.vocab_size = 8192
  c.data.seq_len = 1024
  c.data.num_kv_pairs = 64
  c.data.power_a = 0.01
  c.data.random_non_queries = False
  c.data.num_train_examples = 100_000
  c.data.num_eval_examples = 3000
  c.model.pattern = ("attention",)
  c.model.n_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 1
  c.train.batch_size = 64
  c.train.steps = 20_000
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.eval_every = 2000
  c.train.eval_batches = 47  # ⌈3000 / 64⌉: the whole test set
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  if arg == "small":
    c.data.seq_len = 256
    c.data.num_kv_pairs = 16
    c.model.d_model = 64
    c.train.steps = 2000
    c.train.warmup_steps = 100
    c.train.eval_every = 500
    c.train.eval_batches = 16
    c.train.checkpoint_every = 500
  elif arg == "tiny":
    smoke_test(c)
  return c


def _mixer(h, name: str, knob: str | None = None, values=()) -> list[dict]:
  points = h.sweep("model.pattern", [(name,)])
  return h.product([points, h.sweep(knob, values)]) if knob else points


def _rglru_widths(h, d_models, factors) -> list[dict]:
  return h.chain([h.product([h.sweep("model.d_model", [d]), h.sweep("model.rnn_width", [f * d for f in factors])])
                  for d in d_models])


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring)."""
  check_variant("based_tradeoff", arg, VARIANTS)
  if arg == "tiny":
    return h.product([h.sweep("config", ["tiny"]), h.chain([_mixer(h, "swa", "model.window", (4,)),
                                                            _mixer(h, "based", "model.feature_dim", (4,))])])
  if arg == "small":
    configs = h.chain([
        _mixer(h, "attention"),
        _mixer(h, "swa", "model.window", (8, 32, 128)),
        _mixer(h, "based", "model.feature_dim", (8, 16)),
        _mixer(h, "mamba", "model.d_state", (8, 16)),
        h.product([_mixer(h, "rglru"), _rglru_widths(h, (64,), (1, 2))]),
        _mixer(h, "gla", "model.key_expansion", (0.5,)),
    ])
    return h.product([h.sweep("config", ["small"]), configs])
  widths = h.sweep("model.d_model", D_MODELS)
  configs = h.chain([
      h.product([_mixer(h, "attention"), widths]),
      h.product([_mixer(h, "swa", "model.window", WINDOWS), widths]),
      h.product([_mixer(h, "based", "model.feature_dim", FEATURE_DIMS), widths]),
      h.product([_mixer(h, "mamba", "model.d_state", D_STATES), widths]),
      h.product([_mixer(h, "rglru"), _rglru_widths(h, D_MODELS, RNN_WIDTH_FACTORS)]),
      h.product([_mixer(h, "gla", "model.key_expansion", KEY_EXPANSIONS), widths]),
  ])
  return h.product([configs, h.sweep("train.lr", LEARNING_RATES)])
