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
- softmax attention counts only the scores that the band keeps: ``4·(T·W − W²/2)·H·d_h`` per sequence
  (QKᵀ and PV, causal, ``W = min(window, T)``; global attention is ``W = T``, i.e. ``2·T·H·d_h`` a token);
- the matrix-state recurrences (``kernels.gla``: linear attention, Based, RetNet, GLA, Mamba-2, mLSTM,
  RWKV-6) are counted as the chunked algorithm (``_gla_chunked``, chunk ``c = model.chunk_size``)
  does it, per head and token: ``2·K·V`` (chunk state contribution) + ``2·K·V`` (read of the entering
  state) + ``2·K·V/c`` (carry) + ``2·c·K + 2·c`` (full ``c × c`` intra-chunk scores and the decay
  gain of each pair: exponent and product; ``4·c·K`` with a per-key decay, whose gain is per key dim
  in a three-factor product-sum) + ``2·c·V`` (scores × values), times the padding factor ``⌈T/c⌉·c/T``;
  the delta rule (``kernels.delta``, WY form) is counted the same way, ``(I + A)⁻¹`` matmuls included;
- an elementwise recurrence ``h = a ⊙ h + b`` is 2 per state element (RG-LRU, sLSTM's ``c, n``);
  Mamba's selective scan is ``6·d_inner·N`` (``Δ⊗A``, ``Δx⊗B``, the update, the ``C`` read-out);
- an FFT long convolution (Hyena, BaseConv, S4D) is ``rfft`` + ``irfft`` of ``n = 2^⌈log₂(2T−1)⌉``
  points at ``2.5·n·log₂n`` each plus the ``n/2 + 1`` complex products (6 each), over ``T``; work that
  depends on the parameters only (materialising the filter, its FFT) is once per batch, not counted;
- MLP ``6·d·hidden``; MoE the router plus the ``top_k`` active experts; embedding lookup 0; LM head
  ``2·d·V``. Training is ``3 ×`` the forward (backward = 2 × forward).

``state_bytes_per_sequence``: every floating-point leaf of the layers' ``init_state`` (from
``jax.eval_shape``, so it follows the code), complex counted as two reals, at the size of the model
dtype (``model.dtype``; the kernels keep some states in f32, but the trade-off compares capacity);
integer position counters are bookkeeping and left out. Global attention's cache is sized for
``seq_len``; SWA's is its ring buffer of ``window`` keys and values.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.blocks import mixer_names
from hybrids.layers import BlockDiagonalLinear, CausalConv1D, MoE, dtype_of
from hybrids.model import layer_pattern
from hybrids.sizes import abstract_period, param_count

COMPONENTS = ("projections", "conv", "attention", "recurrence", "mlp")


@dataclasses.dataclass
class Flops:
  """Forward FLOPs per token of one layer, by component (see the module docstring)."""
  projections: float = 0.0
  conv: float = 0.0
  attention: float = 0.0
  recurrence: float = 0.0
  mlp: float = 0.0

  def __add__(self, other: Flops) -> Flops:
    return Flops(*(getattr(self, c) + getattr(other, c) for c in COMPONENTS))

  def total(self) -> float:
    return sum(getattr(self, c) for c in COMPONENTS)


# ------------------------------------------------------------------------------- kernel families

def window_attention_flops(heads: int, head_dim: int, window: int, seq_len: int) -> float:
  """Per token: ``4·(T·W − W²/2)·H·d_h / T`` (QKᵀ and PV inside the causal band of ``W`` keys)."""
  w = min(window, seq_len)
  return 4.0 * (seq_len * w - w * w / 2.0) * heads * head_dim / seq_len


def _padding(chunk: int, seq_len: int) -> float:
  """Chunked kernels pad the sequence to whole chunks and compute the padding too."""
  return -(-seq_len // chunk) * chunk / seq_len


def gla_flops(heads: int, d_k: int, d_v: int, chunk: int, seq_len: int, *, per_key_decay: bool = False) -> float:
  """Per token, the chunked ``kernels.gla`` form (module docstring); ``K = d_k``, ``V = d_v``."""
  # Intra-chunk scores q_t·k_s over the full c × c block, and the decay gain of each pair (its exponent
  # b_t − b_s and its product): per key dim with a per-key decay (a three-factor product-sum), else per pair.
  scores = 4.0 * chunk * d_k if per_key_decay else 2.0 * chunk * d_k + 2.0 * chunk
  per_head = 4.0 * d_k * d_v + 2.0 * d_k * d_v / chunk + scores + 2.0 * chunk * d_v
  return heads * per_head * _padding(chunk, seq_len)


def delta_flops(heads: int, d_k: int, d_v: int, chunk: int, seq_len: int) -> float:
  """Per token, the chunked WY form of ``kernels.delta``: per chunk ``K Kᵀ`` (2c²K), ``(I + A)⁻¹`` by
  ``2·(⌈log₂ c⌉ − 1)`` c×c matmuls, the solve ``[Ũ | W]`` (2c²(V + K)), ``W S₀`` and ``Kᵀ U`` (4cKV),
  ``Q Kᵀ`` (2c²K), the outputs (2c²V + 2cKV) and the pair gains (4c²: exponent, ``β·KKᵀ·gain``, ``QKᵀ·gain``)."""
  c = chunk
  inverse_matmuls = 2 * (max(c - 1, 1).bit_length() - 1)
  per_chunk = (2 * c * c * d_k + inverse_matmuls * 2 * c ** 3 + 2 * c * c * (d_v + d_k) + 4 * c * d_k * d_v
               + 2 * c * c * d_k + 2 * c * c * d_v + 2 * c * d_k * d_v + 4 * c * c)
  return heads * per_chunk / c * _padding(chunk, seq_len)


def fft_conv_flops(channels: int, seq_len: int) -> float:
  """Per token, ``hybrids.longconv.causal_fft_conv`` of the input (the filter's FFT is per batch)."""
  n = 1 << (2 * seq_len - 1).bit_length()
  per_channel = 2 * 2.5 * n * math.log2(n) + 6.0 * (n // 2 + 1)
  return channels * per_channel / seq_len


# ----------------------------------------------------------------------------- per-mixer table
# Each entry: (abstract mixer module, seq_len) → the FLOPs of its sequence-mixing core per token.
# Projections and short convolutions are counted from the module's Linear / conv layers (below).

def _attention(m, seq_len):
  window = seq_len if m.window is None else m.window
  return Flops(attention=window_attention_flops(m.num_heads, m.head_dim, window, seq_len))


def _rglru(m, seq_len):
  return Flops(recurrence=2.0 * m.d_rnn)


def _linear_attention(m, seq_len):
  return Flops(recurrence=gla_flops(m.heads, m.head_dim, m.head_dim + 1, m.chunk_size, seq_len))


def _retnet(m, seq_len):
  return Flops(recurrence=gla_flops(m.heads, m.head_dim, m.head_dim, m.chunk_size, seq_len))


def _gla(m, seq_len):
  return Flops(recurrence=gla_flops(m.heads, m.key_dim, m.value_dim, m.chunk_size, seq_len, per_key_decay=True))


def _mamba(m, seq_len):
  return Flops(recurrence=6.0 * m.d_inner * m.d_state)


def _mamba2(m, seq_len):
  return Flops(recurrence=gla_flops(m.heads, m.d_state, m.head_dim, m.chunk_size, seq_len))


def _based(m, seq_len):
  f = m.feature_dim
  feature_map = 2.0 * m.heads * f * f  # the q and k outer products of the Taylor map
  return Flops(recurrence=feature_map + gla_flops(m.heads, 1 + f + f * f, m.head_dim + 1, m.chunk_size, seq_len))


def _rwkv6(m, seq_len):
  # The LoRA up-projections are raw parameters (einsum / matmul), one use per token each.
  lora_up = 2.0 * (m.mix_up.size + m.decay_up.size)
  return Flops(projections=lora_up, recurrence=gla_flops(m.heads, m.head_dim, m.head_dim, m.chunk_size, seq_len,
                                                         per_key_decay=True))


def _mlstm(m, seq_len):
  return Flops(recurrence=gla_flops(m.heads, m.head_dim, m.head_dim + 1, m.chunk_size, seq_len))


def _slstm(m, seq_len):
  # Block-diagonal recurrent matmuls of the four gates, then c and n updated elementwise.
  return Flops(recurrence=2.0 * m.recurrent.size + 2.0 * 2 * m.d)


def _long_conv(m, seq_len):
  channels = m.filter.channels if hasattr(m, "filter") else m.d_skip.size
  return Flops(recurrence=fft_conv_flops(channels, seq_len))


def _delta(m, seq_len):
  return Flops(recurrence=delta_flops(m.heads, m.head_dim, m.head_dim, m.chunk_size, seq_len))


MIXER_FLOPS = {
    "attention": _attention,
    "swa": _attention,
    "rglru": _rglru,
    "linear_attention": _linear_attention,
    "retnet": _retnet,
    "gla": _gla,
    "mamba": _mamba,
    "mamba2": _mamba2,
    "based": _based,
    "rwkv6": _rwkv6,
    "s4d": _long_conv,
    "mlstm": _mlstm,
    "slstm": _slstm,
    "baseconv": _long_conv,
    "hyena": _long_conv,
    "deltanet": _delta,
    "gated_deltanet": _delta,
}


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


def mixer_flops(entry: str, mixer, seq_len: int) -> Flops:
  """Forward FLOPs per token of the mixer of pattern entry ``entry`` (``"a"`` or ``"a|b"``)."""
  linear, conv = _weights(mixer)  # a parallel entry's merge projection included
  flops = Flops(projections=2.0 * linear, conv=2.0 * conv)
  parts = mixer.parts if len(mixer_names(entry)) > 1 else [mixer]
  for name, part in zip(mixer_names(entry), parts):
    flops = flops + MIXER_FLOPS[name](part, seq_len)
  return flops


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
  model = abstract_period(model_config)
  itemsize = jnp.dtype(dtype_of(model_config.dtype)).itemsize
  d, vocab = model_config.d_model, model_config.vocab_size
  per_block = []
  for block in model.blocks:
    flops = mixer_flops(block.mixer_name, block.mixer, seq_len)
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
  from hybrids.train import resolve

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
