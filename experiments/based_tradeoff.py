"""Based's recall / state-size trade-off: MQAR accuracy against decode-state bytes, one curve per mixer.

Reproduces Arora, Eyuboglu, Zhang et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff" (Based), Fig. 2 (left), following the authors' released configuration
(``zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py``, which the Based repository's
README points to, with ``zoology/train.py`` and ``zoology/model.py``): every mixer is swept along the
knob that sets its recurrent state, and each run lands at (state bytes per sequence, MQAR accuracy).

Data (Zoology's segments, ``data.train_segments`` / ``data.eval_segments``, see
:mod:`hybrids.data.mqar`): vocabulary 8192, power-law query gaps a = 0.01, random filler tokens
(``random_non_queries=True``).

- train, one fixed mixture of 180k examples reused every epoch: (seq_len, key–value pairs, examples) =
  (64, 4, 100k), (128, 8, 20k), (256, 16, 20k), (256, 32, 20k), (256, 64, 20k);
- test, 1000 examples each: (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256) —
  up to 4× the longest training sequence and 4× its pairs. ``eval.eval_accuracy`` in ``summary.json``
  is Zoology's ``valid/accuracy``: the mean over all 7000 test examples of each example's accuracy on its
  answers (so every cell weighs the same); ``eval_token_accuracy`` pools the answers instead.

Model and training, as Zoology's code: two layers, the block ``x + Mixer(LayerNorm(x))`` with no MLP
(``model.mlp_expansion=0``; Zoology's state mixer is the identity), LayerNorm with bias, a final
LayerNorm, tied embeddings without the √d scale, no position embedding for any model (Zoology's
``max_position_embeddings=0``, ``model.position="none"``), one head; AdamW betas (0.9, 0.999), weight
decay 0.1, lr ∈ logspace(−3, −1.5, 4), cosine to 0, no warmup, no gradient clipping, float32, batch
256, 32 epochs (⌈180k / 256⌉ = 704 steps each), a test every epoch and a stop once the test accuracy
exceeds 0.99. Zoology's ``Hybrid`` takes config ``i % 2`` for layer ``i``, so attention, Based and SWA
are a BaseConv layer (short conv of width 3) followed by the mixer layer: ``pattern=("baseconv",
"based")`` etc.

| curve (Zoology's name) | pattern | knob × d_model |
|---|---|---|
| attention | ``("baseconv", "attention")`` | d ∈ {64, 128} |
| based | ``("baseconv", "based")`` | ``model.feature_dim`` ∈ {8, 16, 24} × d ∈ {48, 64, 128} |
| sliding-window-attention | ``("baseconv", "swa")`` | ``model.window`` ∈ {8, 16, …, 1024} × d = 128 |
| mamba | ``("mamba",)`` | ``model.d_state`` ∈ {8, 16, 24} × d ∈ {64, 128, 256} |
| hyena | ``("hyena",)`` | d ∈ {64, 128, 256} |
| rglru (ours, not in the paper) | ``("rglru",)`` | d ∈ {64, 128, 256} |
| gla (ours, not in the paper) | ``("gla",)`` | d ∈ {64, 128, 256}, ``key_expansion`` 0.5 |

State bytes per sequence: ``state_bytes_per_sequence`` of each ``summary.json`` (:mod:`hybrids.flops`:
every floating-point leaf of the layers' ``init_state``, 4 bytes each in float32, summed over both
layers, at ``data.seq_len``). Only global attention's state depends on the length; Zoology measures
every model at the longest test length, 1024 (``model.state_size(1024) · 4``), so the attention points
train with ``data.seq_len=1024`` and SWA points with ``data.seq_len=max(256, window)`` (a window must fit
``data.seq_len``); every other point trains at 256. Rows are right-padded to ``data.seq_len``, which for
these causal models changes nothing but the compute. :func:`state_bytes` recomputes the number from a
config. The report plots accuracy against state bytes per run, with the Pareto frontier; Zoology's plot
keeps, per (state size, curve), the best of its four learning rates.

What still differs from Zoology (each a known gap; none is measured to move a point):

- Batch composition and weighting. Zoology batches each segment on its own (each epoch: every (64, 4)
  batch, then the (128, 8) ones, …, in order, unshuffled; 707 batches with each segment's partial last
  one) and averages the loss per batch, so a segment's share of the gradient follows its batch count:
  (64, 4) gets 391 / 707 = 55 %. Here the mixture is shuffled every epoch and a batch mixes segments,
  averaging over all its answers, so a segment's share follows its answers (examples × K): (64, 4) gets
  400k / 2.8M = 14 %, (256, 64) 46 %. Each epoch is 704 full batches.
- Initialisation: Zoology draws every Linear and Embedding from N(0, 0.02) (out projections
  0.02/√(2·layers)); ours keep each mixer's own initialisation.
- Zoology's pre-norm residual adds the second LayerNorm's output back into the stream even with the
  identity state mixer (``residual = LN2(residual) + residual`` per layer); ours has no second norm.
  Zoology's Mamba uses its own ``MambaBlock`` (RMSNorm); ours the shared block.
- Dropout: Zoology drops 10 % of the embedding output and of the attention probabilities (SWA: none);
  ours has no dropout.
- Zoology's cosine steps once per epoch (a staircase); ours per step. Zoology decays every parameter;
  ours matrices only.
- BaseConv: Zoology's is a kernel-3 short convolution gated by a projection (its implicit long filter is
  off at kernel size 3). Ours always adds a modal long filter and in/out projections; here it gets
  ``model.conv_width=3`` and ``model.d_state=1`` (one mode, the smallest), so its state (2·d short-conv
  taps + 2·d for the mode, per sequence) stays small next to the swept mixer's.
- Based: Zoology's is one head of Taylor linear attention (feature_dim f, "quadratic" train view) with no
  convolution of its own; ours also runs one head, but carries a short convolution (``conv_width``, 3
  here) before its projections; its state is (1 + f + f²)·(d + 1) floats plus that conv's 2·d.
- Hyena: Zoology's implicit (MLP) filter spans ``l_max=1024``, a state of d·L; ours is a modal filter
  of ``d_state=16`` modes, so its points sit at a much smaller state.
- SWA: Zoology's ``SlidingAttn(block_size=w)`` and our band of ``w`` keys may differ by one key.
- The data's random numbers: Zoology seeds each segment from ``np.random.seed(seed)`` draws; ours
  from ``[data.seed, stream, block, segment + 1]`` (same distribution, other samples). Zoology tests at
  batch 32; ours at 256 (no effect).
- Not run: Zoology's Mamba-2, H3 and the appendix's ScatterBrain / BigBird / Nyströmformer / MRA. The
  released file also filters its list to Based alone (``included = ["based"]``); the figure's other
  curves come from editing that filter, which this grid does for the paper's five curves.

Commands:

    python -m launch sweep experiments/based_tradeoff.py --backend local          # 148 runs
    python -m launch sweep experiments/based_tradeoff.py:small --backend local --runs-per-device 8 --mps  # 22 runs, one GPU
        # add --lr-group 4: each point's learning rates in one process (lockstep groups: README "Sweeps");
        # and --cell-stop: a point's learning rates stop once one passes 0.99 (zoology_mqar.py: "Cells decided early")
    python -m launch report runs/based_tradeoff        # a variant's runs: runs/based_tradeoff-VARIANT

Variants (``get_config(arg)`` and ``get_sweep(h, arg)`` take the same ``arg``):

- ``None`` (full): the table above, 37 configurations × 4 learning rates = 148 runs.
- ``small``: attention d 64; Based d 64 × f {8, 16, 24}; SWA d 128 × window {16, 64, 256}; Mamba d 64
  × d_state {8, 16}; RG-LRU d 128; GLA d 128 — 11 configurations × lr {3.2e−3, 1e−2}, 8 epochs: 22 runs
  on one GPU.
- ``tiny``: a few-second CPU smoke test (2 points, Based and attention, on a three-segment test set up to
  twice the training length; used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

import math

import numpy as np

from hybrids.config import base_config, check_variant, smoke_test, zoology_training

VOCAB_SIZE = 8192
# (seq_len, num_kv_pairs, num_examples), as Zoology's train_configs / test_configs.
TRAIN_SEGMENTS = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
TEST_SEGMENTS = ((64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000), (256, 64, 1000),
                 (512, 128, 1000), (1024, 256, 1000))
TRAIN_SEQ_LEN = max(length for length, _, _ in TRAIN_SEGMENTS)  # 256: every training row's length
STATE_SEQ_LEN = max(length for length, _, _ in TEST_SEGMENTS)   # 1024: where Zoology measures the state
BATCH_SIZE, EPOCHS, SMALL_EPOCHS = 256, 32, 8
LEARNING_RATES = tuple(float(lr) for lr in np.logspace(-3, -1.5, 4))

ATTENTION_D = (64, 128)
BASED_D, FEATURE_DIMS = (48, 64, 128), (8, 16, 24)
SWA_D, WINDOWS = 128, (8, 16, 32, 64, 128, 256, 512, 1024)
MAMBA_D, D_STATES = (64, 128, 256), (8, 16, 24)
PURE_D = (64, 128, 256)  # Hyena, and our RG-LRU and GLA
GLA_KEY_EXPANSION = 0.5

# Zoology's Hybrid puts a BaseConv (kernel 3) layer before attention, Based and SWA; our BaseConv's
# modal long filter gets its smallest state. Pure mixers keep the project's defaults.
BASECONV_HYBRID = {"model.conv_width": 3, "model.d_state": 1}
PURE = {"model.conv_width": 4, "model.d_state": 16}
VARIANTS = ("small", "tiny")

# The tiny variant: two training segments, three test ones (the last twice the training length).
TINY_TRAIN_SEGMENTS = ((16, 2, 48), (32, 4, 16))
TINY_TEST_SEGMENTS = ((16, 2, 8), (32, 4, 8), (64, 8, 8))


def steps_per_epoch(segments=TRAIN_SEGMENTS, batch_size: int = BATCH_SIZE) -> int:
  """Full batches per pass over the training mixture (the last one wraps into the next epoch)."""
  return math.ceil(sum(n for _, _, n in segments) / batch_size)


def _schedule(c, epochs: int) -> None:
  per_epoch = steps_per_epoch(tuple(c.data.train_segments), c.train.batch_size)
  c.train.steps = epochs * per_epoch
  c.train.eval_every = per_epoch  # Zoology tests after every epoch
  c.train.checkpoint_every = 4 * per_epoch
  # Per test segment: the whole segment.
  c.train.eval_batches = math.ceil(max(n for _, _, n in c.data.eval_segments) / c.train.batch_size)


def get_config(arg: str | None = None):
  """The base point: BaseConv then Based (d 64, feature_dim 16) on the mixture; points change the mixer."""
  check_variant("based_tradeoff", arg, VARIANTS)
  c = base_config("mqar")
  d = c.data
  d.vocab_size = VOCAB_SIZE
  d.power_a = 0.01
  d.random_non_queries = True
  d.seq_len = TRAIN_SEQ_LEN
  d.train_segments = TRAIN_SEGMENTS
  d.eval_segments = TEST_SEGMENTS
  # The single-cell fields are unused with segments; set to the longest training cell for clarity.
  d.num_kv_pairs = 64
  d.num_train_examples = sum(n for _, _, n in TRAIN_SEGMENTS)
  d.num_eval_examples = sum(n for _, _, n in TEST_SEGMENTS)
  m = c.model
  m.pattern = ("baseconv", "based")
  m.n_layers = 2
  m.d_model = 64
  m.num_heads = 1
  m.feature_dim = 16
  m.key_expansion = GLA_KEY_EXPANSION
  m.window = 64
  m.mlp_expansion = 0.0
  m.norm = "layer"
  m.position = "none"
  m.embed_scale = False
  m.tie_embeddings = True
  m.conv_width = BASECONV_HYBRID["model.conv_width"]
  m.d_state = BASECONV_HYBRID["model.d_state"]
  t = c.train
  t.batch_size = BATCH_SIZE
  t.lr = LEARNING_RATES[0]
  zoology_training(t)
  t.log_every = 50
  _schedule(c, SMALL_EPOCHS if arg == "small" else EPOCHS)
  if arg == "tiny":
    smoke_test(c, feature_dim=4, window=8)
    d.vocab_size = 128  # > the longest test segment
    d.seq_len = max(length for length, _, _ in TINY_TRAIN_SEGMENTS)
    d.train_segments, d.eval_segments = TINY_TRAIN_SEGMENTS, TINY_TEST_SEGMENTS
    d.num_kv_pairs = 4
  return c


def state_bytes(config, seq_len: int = STATE_SEQ_LEN) -> int:
  """Decode-state bytes per sequence of ``config``'s model at ``seq_len`` (Zoology's length: 1024)."""
  from hybrids import flops
  from hybrids.train import resolve

  return flops.accounting(resolve(config).model, seq_len)["state_bytes_per_sequence"]


def _points(name: str, d_models, knob: str | None = None, values=(None,), state_len: int = STATE_SEQ_LEN):
  """One point per (d_model, knob value) of mixer ``name``, with the fields its pattern needs."""
  pattern = {"attention": ("baseconv", "attention"), "based": ("baseconv", "based"),
             "swa": ("baseconv", "swa")}.get(name, (name,))
  fixed = BASECONV_HYBRID if pattern[0] == "baseconv" else PURE
  points = []
  for d in d_models:
    for v in values:
      p = {"model.pattern": pattern, "model.d_model": d, **fixed}
      if knob:
        p[knob] = v
      if name == "attention":  # the KV cache's bytes at the longest test length
        p["data.seq_len"] = state_len
      if name == "swa":  # a window must fit data.seq_len
        p["data.seq_len"] = max(TRAIN_SEQ_LEN, v)
      points.append(p)
  return points


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring); each names its ``config`` variant explicitly."""
  check_variant("based_tradeoff", arg, VARIANTS)
  if arg == "tiny":
    tiny_len = max(length for length, _, _ in TINY_TEST_SEGMENTS)
    configs = [{**p, "model.d_model": 16} for p in
               _points("based", (16,), "model.feature_dim", (4,)) + _points("attention", (16,), state_len=tiny_len)]
    return h.product([h.sweep("config", ["tiny"]), configs])
  if arg == "small":
    configs = (_points("attention", (64,))
               + _points("based", (64,), "model.feature_dim", FEATURE_DIMS)
               + _points("swa", (SWA_D,), "model.window", (16, 64, 256))
               + _points("mamba", (64,), "model.d_state", (8, 16))
               + _points("rglru", (128,))
               + _points("gla", (128,)))
    return h.product([h.sweep("config", ["small"]), configs, h.sweep("train.lr", LEARNING_RATES[1:3])])
  configs = (_points("attention", ATTENTION_D)
             + _points("based", BASED_D, "model.feature_dim", FEATURE_DIMS)
             + _points("swa", (SWA_D,), "model.window", WINDOWS)
             + _points("mamba", MAMBA_D, "model.d_state", D_STATES)
             + _points("hyena", PURE_D)
             + _points("rglru", PURE_D)
             + _points("gla", PURE_D))
  return h.product([h.sweep("config", [None]), configs, h.sweep("train.lr", LEARNING_RATES)])
