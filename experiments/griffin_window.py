"""Griffin's local-attention window study: RG-LRU + SWA against global and local-only attention, tokens fixed.

Reproduces De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models", Appendix E (local attention window size): Griffin — the pattern (RG-LRU, RG-LRU,
SWA) — with windows {128, 256, 512, 1024, 2048}, against an MQA transformer with global attention and
against a local-attention-only transformer with the same windows, trained at sequence lengths
2048 / 4096 / 8192 on the same number of tokens (the batch shrinks as the sequence grows). The paper's
finding: Griffin with a 1024 window beats the global-attention transformer at every length, even when
the window is 8× shorter than the sequence, and local-only attention falls behind as the window
shrinks. All models are matched in size (``model.size``, ``hybrids/sizes.py``), MQA (one KV head) as
in the paper.

Data: the byte-level GCIDE dictionary corpus as prepared shards (vocab 257). Prepare it once:

    python -m hybrids.data.prepare --input '/usr/share/dictd/gcide.dict.dz' --tokenizer bytes --output data/gcide-bytes

Commands (then the loss by position inside the context, per run):

    python -m launch sweep experiments/griffin_window.py --backend local          # 33 runs (cluster)
    python -m launch sweep experiments/griffin_window.py:small --backend local    # 9 runs
    python -m launch sweep experiments/griffin_window.py:gpu --backend local --runs-per-device 3 --mps  # 9 runs, one H100
    python -m hybrids.evaluate --workdir runs/griffin_window/RUN --eval position --lengths 2048,4096,8192
    python -m launch report runs/griffin_window        # a variant's runs: runs/griffin_window-VARIANT

Variants:

- ``None`` (full): size 125m, 3 lengths × (5 Griffin windows + global + 5 local-only windows) = 33 runs,
  2^19 tokens a step, 20 tokens/param (~3.5k steps each); days of GPU time.
- ``small``: size 5m, 3 lengths × (Griffin-1024, global, local-1024) = 9 runs, 2^17 tokens a step,
  20 tokens/param (~780 steps); ~30 min on one GPU.
- ``gpu``: size 5m, 3 lengths × (Griffin-128, Griffin-1024, global) = 9 runs of 250 steps × 2^16
  tokens, bf16, the XLA scan (the Pallas scan compiles for minutes); about 7.5 min on one H200 three at
  a time without MPS (2026-12-07; ``--mps`` halves that where the host's MPS serves clients, see
  ``launch/local.py``). Expected: Griffin's eval loss below global attention's at 2k, 4k and 8k with
  either window, and the window mattering little (the paper's finding at 1024 vs 2048; 128 is the
  smallest of its grid).
- ``tiny``: a few-second CPU smoke test (2 points, used by ``tests/test_experiments.py``).
"""

from __future__ import annotations

from hybrids.config import base_config, check_variant, smoke_test
from hybrids.sizes import chinchilla_steps

DATA_PATH = "data/gcide-bytes"
SEQ_LENS = (2048, 4096, 8192)
WINDOWS = (128, 256, 512, 1024, 2048)
GRIFFIN = ("rglru", "rglru", "swa")
VARIANTS = ("small", "gpu", "tiny")
# Per variant: (size, tokens per step, steps or None for 20 tokens/param).
BUDGET = {None: ("125m", 2**19, None), "small": ("5m", 2**17, None), "gpu": ("5m", 2**16, 250)}


def get_config(arg: str | None = None):
  """Griffin with a 1024 window at seq_len 2048 for variant ``arg``; points set length, batch, pattern, window."""
  check_variant("griffin_window", arg, VARIANTS)
  c = base_config("shards")
  c.data.path = DATA_PATH
  c.data.seq_len = 2048
  c.model.pattern = GRIFFIN
  c.model.window = 1024
  c.model.num_kv_heads = 1  # MQA, as Griffin's baselines
  c.train.warmup_steps = 100
  c.train.eval_every = 1000
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.log_every = 20
  if arg == "tiny":
    return smoke_test(c, steps=2, batch_size=2, n_layers=3, num_heads=2, window=8)
  size, tokens_per_step, steps = BUDGET[arg]
  c.model.size = size
  c.train.batch_size = tokens_per_step // c.data.seq_len
  c.train.steps = steps or chinchilla_steps(c.model, size, tokens_per_step=tokens_per_step)
  c.train.lr = {"125m": 1e-3, "5m": 2e-3}[size]
  if arg == "gpu":
    c.model.dtype = "bfloat16"
    c.model.scan_impl = "xla"
    c.train.warmup_steps = 25
    c.train.eval_every = 0
    c.train.eval_batches = 4
    c.train.checkpoint_every = steps
  return c


def get_sweep(h, arg: str | None = None):
  """Points of variant ``arg`` (module docstring); the batch keeps tokens per step fixed across lengths."""
  check_variant("griffin_window", arg, VARIANTS)
  variant = [h.sweep("config", [arg])] if arg else []
  if arg == "tiny":
    return h.product(variant + [h.sweep("model.pattern", [GRIFFIN, ("attention",)])])
  _, tokens_per_step, _ = BUDGET[arg]
  lengths = h.zip([h.sweep("data.seq_len", SEQ_LENS), h.sweep("train.batch_size", [tokens_per_step // s for s in SEQ_LENS])])
  windows = {None: WINDOWS, "small": (1024,), "gpu": (128, 1024)}[arg]
  models = [h.product([h.sweep("model.pattern", [GRIFFIN]), h.sweep("model.window", windows)]),
            h.sweep("model.pattern", [("attention",)])]
  if arg != "gpu":
    models.append(h.product([h.sweep("model.pattern", [("swa",)]), h.sweep("model.window", windows)]))
  return h.product(variant + [lengths, h.chain(models)])
