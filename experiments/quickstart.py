"""Quickstart: attention vs sliding-window attention vs Griffin's RG-LRU on MQAR, on a laptop CPU.

Multi-query associative recall (Zoology, Arora et al. 2023): each sequence lists key→value pairs,
then queries the keys; the model must answer with the values. Global attention solves it easily;
a small window cannot see pairs outside it; a recurrent state must compress them.

Run one point:

    python -m hybrids.train --config experiments/quickstart.py:rglru --workdir runs/quickstart/rglru

Run the comparison (prints an accuracy table):

    python -m launch sweep experiments/quickstart.py --root runs/quickstart

Zoology uses a vocabulary of 8192; the quickstart uses 256 so that three models learn in minutes on a
laptop CPU (at 8192 the logit matmul dominates each step). Everything else is Zoology's MQAR.

``get_config(arg)``: ``arg`` is a mixer name (any of ``hybrids.mixers.MIXERS``; a one-mixer stack), a
named topology of ``hybrids.topologies`` (``griffin``, ``hawk``, ``jamba``, ``based_hybrid``, ``swax``,
``parallel_mamba2``; as many layers as the topology's pattern), or ``tiny`` (a few-second Griffin smoke
test, used by the tests).
"""

from hybrids.config import base_config
from hybrids.mixers import MIXERS
from hybrids.topologies import TOPOLOGIES, apply_topology

VARIANTS = tuple(sorted(TOPOLOGIES)) + ("tiny",)


def get_config(arg: str | None = None):
  arg = arg or "griffin"
  if arg not in MIXERS and arg not in VARIANTS:
    raise ValueError(f"quickstart: unknown variant {arg!r}; valid: {', '.join(sorted(MIXERS) + list(VARIANTS))}")
  c = base_config("mqar")
  c.data.seq_len = 64
  c.data.vocab_size = 256
  c.data.num_kv_pairs = 4
  c.model.d_model = 64
  c.model.n_layers = 2
  c.model.num_heads = 2
  c.model.window = 16  # shorter than the 8-token kv prefix + query gaps: SWA must miss some pairs
  if arg in MIXERS:
    c.model.pattern = (arg,)
  else:
    apply_topology(c, "griffin" if arg == "tiny" else arg)
    c.model.n_layers = max(2, len(c.model.pattern))
    if arg == "swax":
      c.train.window_choices = (8, 32)  # the paper's {128, 2048} scaled to seq_len 64
  c.train.steps = 700  # attention's induction head forms at ~400 steps (eval accuracy 0.29 → 0.88)
  c.train.batch_size = 64
  c.train.lr = 1e-2
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.log_every = 20
  c.train.eval_every = 250
  c.train.eval_batches = 4
  c.train.checkpoint_every = 250
  if arg == "tiny":
    c.data.seq_len = 32
    c.data.num_kv_pairs = 2
    c.data.vocab_size = 64
    c.model.d_model = 32
    c.model.window = 8
    c.train.steps = 12
    c.train.batch_size = 4
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 6
    c.train.eval_batches = 1
    c.train.checkpoint_every = 4
  return c


def get_sweep(h):
  """The README comparison: one run per mixer."""
  return h.sweep("config", ["attention", "swa", "rglru"])
