"""Analytic accounting of a ``HybridLM`` config: parameters, FLOPs per token, decode-state bytes.

    python -m hybrids.flops --config experiments/quickstart.py:griffin [--config.model.size=125m] \\
        [--config.data.seq_len=2048]

prints a per-layer table and the totals; :func:`accounting` returns them as a dict (``summary.json``
carries ``flops_per_token_forward``, ``flops_per_token_train``, ``train_flops`` and
``state_bytes_per_sequence``: :func:`summary_fields`).

Counting conventions (forward pass, per token of a ``seq_len`` sequence):

- a matmul ``[m, k] × [k, n]`` is ``2·m·k·n``; every ``nnx.Linear`` and ``BlockDiagonalLinear`` of a
  layer is applied once per token, so its projections are ``2 ×`` its weight count (biases, norms,
  activations, gates, RoPE and other per-token pointwise work are not counted: the 6N convention);
- a depthwise causal conv of width ``w`` over ``C`` channels is ``2·w·C``;
- each mixer counts its own sequence-mixing core (``Mixer.flops(seq_len)``, in the mixer's file; the
  contract of :mod:`hybrids.mixers.contract`), with the kernel-family formulas below;
- softmax attention counts only the scores that the band keeps: ``4·(T·W − W²/2)·H·d_h`` per sequence
  (QKᵀ and PV, causal, ``W = min(window, T)``; unbanded attention is ``W = T``, i.e. ``2·T·H·d_h`` a token);
- the matrix-state recurrences of ``kernels.gla`` are counted as the chunked algorithm (``_gla_chunked``,
  chunk ``c = model.chunk_size``) does it, per head and token: ``2·K·V`` (chunk state contribution)
  + ``2·K·V`` (read of the entering state) + ``2·K·V/c`` (carry) + ``2·c·K + 2·c`` (full ``c × c``
  intra-chunk scores and the decay gain of each pair: exponent and product; ``4·c·K`` with a per-key
  decay, whose gain is per key dim in a three-factor product-sum) + ``2·c·V`` (scores × values), times the padding factor ``⌈T/c⌉·c/T``;
  the delta rule (``kernels.delta``, WY form) is counted the same way, ``(I + A)⁻¹`` matmuls included;
- an elementwise recurrence ``h = a ⊙ h + b`` is 2 per state element;
- an FFT long convolution (``hybrids.longconv``) is ``rfft`` + ``irfft`` of ``n = 2^⌈log₂(2T−1)⌉``
  points at ``2.5·n·log₂n`` each plus the ``n/2 + 1`` complex products (6 each), over ``T``; work that
  depends on the parameters only (materialising the filter, its FFT) is once per batch, not counted;
- MLP ``6·d·hidden``; MoE the router plus the ``top_k`` active experts; embedding lookup 0; LM head
  ``2·d·V``. Training is ``3 ×`` the forward (backward = 2 × forward).

``state_bytes_per_sequence``: every floating-point leaf of the layers' ``init_state`` (from
``jax.eval_shape``, so it follows the code), complex counted as two reals, at the size of the model
dtype (``model.dtype``; the kernels keep some states in f32, but the trade-off compares capacity);
integer position counters are bookkeeping and left out. A cache that grows with the sequence is sized
for ``seq_len``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

# Mixers import this module for Flops and the kernel-family formulas: nothing here imports them.
from hybrids.layers import BlockDiagonalLinear, CausalConv1D, MoE, dtype_of
from hybrids.sizes import abstract_period, param_count

# The per-layer record and the kernel-family formulas live in hybrids.cost (a leaf the mixers import).
from hybrids.cost import (COMPONENTS, Flops, _padding, delta_flops, fft_conv_flops, gla_flops,  # noqa: E402,F401
                          window_attention_flops)


# ------------------------------------------------------------------------------------ layers

def _weights(module) -> tuple[int, int]:
  """``(Linear/BlockDiagonalLinear weights, short-conv weights)`` inside ``module``."""
  linear = conv = 0
  for _, node in nnx.iter_graph(module):
    if isinstance(node, (nnx.Linear, BlockDiagonalLinear)):
      linear += node.kernel.size
    elif isinstance(node, CausalConv1D):
      conv += node.kernel.size
  return linear, conv


def mixer_flops(mixer, seq_len: int) -> Flops:
  """Forward FLOPs per token of a block's mixer (one registered mixer, a parallel group or a sequential
  chain): its Linear and short-conv layers from their weights, plus its own ``mixer.flops(seq_len)``
  (a group's and a chain's sum their parts')."""
  for part in getattr(mixer, "parts", None) or [mixer]:
    if not callable(getattr(type(part), "flops", None)):
      raise TypeError(f"mixer {type(part).__name__} declares no flops(seq_len) method: every registered mixer "
                      "counts its own FLOPs per token (see hybrids.mixers.contract)")
  linear, conv = _weights(mixer)  # a parallel entry's merge projection included
  return Flops(projections=2.0 * linear, conv=2.0 * conv) + mixer.flops(seq_len)


def feed_forward_flops(mlp) -> float:
  """Per token: dense gated MLP ``6·d·hidden``; MoE router + ``top_k`` of the ``num_experts`` experts;
  0 for a block without an MLP sublayer (``mlp_expansion == 0``)."""
  if mlp is None:
    return 0.0
  if isinstance(mlp, MoE):
    experts = mlp.w_gate.size + mlp.w_up.size + mlp.w_down.size
    return 2.0 * mlp.router.kernel.size + 2.0 * experts * mlp.top_k / mlp.num_experts
  return 2.0 * _weights(mlp)[0]


def _state_bytes(block, seq_len: int, itemsize: int) -> int:
  graphdef, state = nnx.split(block)
  shapes = jax.eval_shape(lambda s: nnx.merge(graphdef, s).init_state(1, max_len=seq_len), state)
  count = 0
  for leaf in jax.tree.leaves(shapes):
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
      count += 2 * leaf.size
    elif jnp.issubdtype(leaf.dtype, jnp.floating):
      count += leaf.size
  return count * itemsize


def accounting(model_config, seq_len: int) -> dict:
  """Parameters, FLOPs per token and decode-state size of ``HybridLM(model_config)`` at ``seq_len``.

  ``model_config`` is a resolved ``config.model`` (``vocab_size`` set, size preset applied).
  Returns ``params``, ``non_embedding_params``, ``flops_per_token_forward``,
  ``flops_per_token_train`` (3 × forward), ``state_bytes_per_sequence`` (batch 1), ``lm_head_flops``
  (per token, in the forward) and ``per_layer``: one dict per layer with ``layer``, ``mixer``,
  ``params``, ``state_bytes`` and ``flops`` (per token, forward, by component of :data:`COMPONENTS`).
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
    raise ValueError(f"data.seq_len={seq_len!r} must be a positive integer")
  if not model_config.vocab_size:
    raise ValueError("model.vocab_size=0: resolve the config first (hybrids.train.resolve sets it from the data)")
  from hybrids.model import layer_pattern  # here: hybrids.model imports the mixers, which import this module

  model = abstract_period(model_config)
  itemsize = jnp.dtype(dtype_of(model_config.dtype)).itemsize
  d, vocab = model_config.d_model, model_config.vocab_size
  per_block = []
  for block in model.blocks:
    flops = mixer_flops(block.mixer, seq_len)
    flops.mlp = feed_forward_flops(block.mlp)
    per_block.append({"params": param_count(block), "state_bytes": _state_bytes(block, seq_len, itemsize),
                      "flops": dataclasses.asdict(flops)})
  per_layer = [{"layer": i, "mixer": entry, **per_block[i % len(per_block)]}
               for i, entry in enumerate(layer_pattern(model_config))]
  embedding = sum(param_count(m) for m in (model.embed, model.position_embed, model.head) if m is not None)
  non_embedding = param_count(model.final_norm) + sum(layer["params"] for layer in per_layer)
  lm_head = 2.0 * d * vocab
  forward = lm_head + sum(sum(layer["flops"].values()) for layer in per_layer)
  return {
      "params": non_embedding + embedding,
      "non_embedding_params": non_embedding,
      "flops_per_token_forward": forward,
      "flops_per_token_train": 3.0 * forward,
      "state_bytes_per_sequence": sum(layer["state_bytes"] for layer in per_layer),
      "lm_head_flops": lm_head,
      "per_layer": per_layer,
  }


def summary_fields(model_config, seq_len: int, tokens: int = 0) -> dict:
  """The ``summary.json`` fields: FLOPs per token (forward, train), ``train_flops`` for ``tokens``
  tokens seen, and ``state_bytes_per_sequence``."""
  result = accounting(model_config, seq_len)
  keys = ("flops_per_token_forward", "flops_per_token_train", "state_bytes_per_sequence")
  return {**{k: result[k] for k in keys}, "train_flops": result["flops_per_token_train"] * tokens}


# ------------------------------------------------------------------------------ command line

def _si(x: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.0f}"


def format_table(result: dict) -> str:
  """The per-layer table and totals of :func:`accounting`'s ``result``, as text."""
  header = f"{'layer':>5}  {'mixer':<16} {'params':>9} {'state B':>9} " + " ".join(f"{c:>11}" for c in COMPONENTS)
  lines = [header + f" {'total':>11}"]
  for layer in result["per_layer"]:
    flops = layer["flops"]
    lines.append(f"{layer['layer']:>5}  {layer['mixer']:<16} {_si(layer['params']):>9} {_si(layer['state_bytes']):>9} "
                 + " ".join(f"{_si(flops[c]):>11}" for c in COMPONENTS) + f" {_si(sum(flops.values())):>11}")
  lines.append(f"LM head: {_si(result['lm_head_flops'])} FLOPs/token")
  lines.append(f"params {result['params']:,} (non-embedding {result['non_embedding_params']:,}); "
               f"FLOPs/token forward {_si(result['flops_per_token_forward'])}, train "
               f"{_si(result['flops_per_token_train'])}; decode state {result['state_bytes_per_sequence']:,} B/sequence")
  return "\n".join(lines)


def main(argv) -> None:
  import sys

  from absl import flags

  from hybrids import config as config_lib
  from hybrids.config import resolve

  try:
    config = resolve(flags.FLAGS.config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  seq_len = config.data.seq_len
  print(f"{tuple(config.model.pattern)} × {config.model.n_layers} layers, d_model {config.model.d_model}, "
        f"seq_len {seq_len} (FLOPs per token, forward)")
  print(format_table(accounting(config.model, seq_len)))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment file and optional argument, e.g. "
                                  "experiments/quickstart.py:griffin. Override any field with --config.FIELD=VALUE.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])
  app.run(main)
