"""``HybridLM``: token embedding → residual blocks following a mixer pattern → RMSNorm → LM head.

The pattern is tiled to ``n_layers``: Griffin is ``("rglru", "rglru", "swa")``, Hawk ``("rglru",)``,
a transformer ``("attention",)``. Parameters are kept in ``param_dtype`` (f32 by default) and
computed in ``dtype`` (e.g. bf16); the residual stream and logits stay in f32. With
``position="learned"`` a learned table of ``max_len`` absolute positions is added to the token
embedding (Zoology's models); RoPE, when on, lives in the attention mixers.

Packed documents (issue 23): ``__call__(tokens, segment_ids=…)`` with ``segment_ids: int [batch,
time]`` (equal ids: one document; a change of id starts the next) runs every document of a row as if
alone: learned positions restart at each document, and every mixer gets the ids (attention and SWA
mask across documents and restart RoPE, convolutions read no tap of an earlier document, recurrences
restart from the zero state). Every registered mixer declares ``SEGMENTS``; one that did not would be
refused with a ValueError naming it (:func:`check_segments`), never silently run across documents.

Decode state: ``{"layers": [one state per layer], "pos": int32[]}`` (the next position).

``scan_layers=True`` runs the training forward as a ``lax.scan`` over repeats of the layer period
(the pattern, or the least common multiple of the pattern and ``moe_every``), so XLA compiles one
period instead of ``n_layers`` layers: a smaller program, a shorter compile (a period repeated fewer
than twice runs unrolled: ``HybridLM.scan_fallback`` says why). The parameters stay one
module per layer (checkpoints, sharding rules and decoding are unchanged); the period's blocks are
stacked inside the step, a copy of the parameters (and of their gradients) per step, which costs a
small share of the step time (figures: ``kernels/BENCHMARKS.md``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.blocks import ResidualBlock, check_entry_segments
from hybrids.layers import block_norm, document_positions, dtype_of, linear
from hybrids.mixers.contract import windowed


def layer_pattern(cfg) -> tuple[str, ...]:
  """The mixer of every layer: ``cfg.pattern`` repeated (and cut) to ``cfg.n_layers`` entries."""
  pattern = tuple(cfg.pattern)
  return tuple(pattern[i % len(pattern)] for i in range(cfg.n_layers))


class HybridLM(nnx.Module):
  """Decoder-only LM over a hybrid stack. ``tokens: int [batch, time]`` → ``logits: f32 [batch, time, vocab]``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.d_model = cfg.d_model
    self.remat = bool(cfg.remat)
    self.logits_softcap = float(cfg.logits_softcap or 0.0)
    self.embed_scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype_of(cfg.dtype),
                           param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)
    self.max_len = int(cfg.max_len) if cfg.position == "learned" else 0
    if cfg.position == "learned" and not self.max_len:
      raise ValueError("model.position='learned' needs model.max_len > 0 (resolve() sets it to data.seq_len)")
    self.position_embed = nnx.Embed(self.max_len, cfg.d_model, dtype=dtype_of(cfg.dtype),
                                    param_dtype=dtype_of(cfg.param_dtype), rngs=rngs) if self.max_len else None
    moe_every = cfg.moe_every
    self.blocks = nnx.List([ResidualBlock(name, cfg, rngs=rngs, moe=bool(moe_every) and i % moe_every == moe_every - 1)
                            for i, name in enumerate(layer_pattern(cfg))])
    self.period = math.lcm(len(tuple(cfg.pattern)), moe_every or 1)
    self.final_norm = block_norm(cfg, cfg.d_model, rngs=rngs)
    self.head = None if cfg.tie_embeddings else linear(cfg, cfg.d_model, cfg.vocab_size, rngs=rngs)

  def set_window(self, window: int) -> None:
    """Set the band of every windowed layer (SWAX trains with sampled windows and evaluates with another)."""
    for _, node in nnx.iter_graph(self):
      if windowed(type(node)):
        node.window = int(window)

  def _embed(self, tokens, positions):
    """``tokens: int [batch, time]`` (or ``[batch]``), ``positions: int [time]`` (or ``[]``, or
    ``[batch, time]`` per document)."""
    x = self.embed(tokens).astype(jnp.float32) * self.embed_scale
    if self.position_embed is not None:
      x = x + self.position_embed(positions).astype(jnp.float32)
    return x

  def _check_length(self, time: int) -> None:
    if self.max_len and time > self.max_len:
      raise ValueError(f"{time} positions exceed the learned position table (model.max_len={self.max_len})")

  def logits(self, x):
    """The head, per position: final norm, vocabulary projection, softcap. ``x: [..., d_model]`` →
    f32 ``[..., vocab]``."""
    x = self.final_norm(x)
    logits = (self.embed.attend(x) if self.head is None else self.head(x)).astype(jnp.float32)
    if self.logits_softcap:
      logits = self.logits_softcap * jnp.tanh(logits / self.logits_softcap)
    return logits

  def check_segments(self) -> None:
    """ValueError naming the first mixer of the stack that does not take ``segment_ids``."""
    for block in self.blocks:
      check_entry_segments(block.mixer_name)

  def __call__(self, tokens, *, segment_ids=None, return_aux: bool = False, scan_layers: bool = False,
               logits_at=None, return_hidden: bool = False):
    """Training / scoring forward pass (parallel face of every mixer).

    ``return_aux``: also return ``{"moe_balance": mean load-balancing loss over MoE layers}``.
    ``scan_layers``: scan over repeats of the layer period where the stack allows it (:meth:`scans_layers`;
    same values; compiles once per period).
    ``logits_at``: ``int [batch, k]`` positions; the logits are then ``[batch, k, vocab]``, those
    positions' rows only (MQAR scores 16 of 256 positions: the vocabulary head, the largest matmul of
    a small model, then costs 16× less; the norm and head act per position, so the values are the same).
    ``segment_ids``: ``int [batch, time]``, documents packed in each row (see the module docstring);
    None: each row is one document.
    ``return_hidden``: the last block's output ``[batch, time (or k), d_model]`` in place of the logits
    (:meth:`logits` maps it to them), for a loss that computes the head a chunk of positions at a time.
    """
    self._check_length(tokens.shape[1])
    if segment_ids is None:
      positions = jnp.arange(tokens.shape[1])
    else:
      self.check_segments()
      segment_ids = jnp.asarray(segment_ids, jnp.int32)
      if segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids{segment_ids.shape} must be shaped as tokens{tokens.shape}")
      positions = document_positions(segment_ids)
    x = self._embed(tokens, positions)
    x, balances = (self._scanned_blocks(x, segment_ids) if self.scans_layers(scan_layers)
                   else self._unrolled_blocks(x, self.blocks, segment_ids))
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    logits = x if return_hidden else self.logits(x)
    if not return_aux:
      return logits
    return logits, {"moe_balance": sum(balances) / len(balances) if balances else jnp.zeros((), jnp.float32)}

  def _block_forward(self, block, x, segment_ids=None):
    forward = lambda blk, h, ids: blk(h, return_aux=True, segment_ids=ids)
    return nnx.remat(forward)(block, x, segment_ids) if self.remat else forward(block, x, segment_ids)

  def _unrolled_blocks(self, x, blocks, segment_ids=None):
    balances = []
    for block in blocks:
      x, balance = self._block_forward(block, x, segment_ids)
      if block.is_moe:
        balances.append(balance)
    return x, balances

  def scan_fallback(self) -> str | None:
    """Why ``__call__(scan_layers=True)`` runs the layers unrolled instead (None: it scans)."""
    repeats = len(self.blocks) // self.period
    if repeats < 2:
      return f"the layer period ({self.period} layers) repeats {repeats}× in {len(self.blocks)} layers; a scan needs 2"
    for j in range(self.period):
      graphdefs = [nnx.graphdef(self.blocks[r * self.period + j]) for r in range(repeats)]
      if any(g != graphdefs[0] for g in graphdefs):
        return f"layer {j} of the period differs in structure between repeats"
    return None

  def scans_layers(self, scan_layers: bool) -> bool:
    """Whether ``__call__(scan_layers=scan_layers)`` runs a ``lax.scan`` (see :meth:`scan_fallback`)."""
    return bool(scan_layers) and self.scan_fallback() is None

  def _scanned_blocks(self, x, segment_ids=None):
    """``lax.scan`` over the ``n_layers // period`` repeats; the remaining layers run unrolled after.
    Only for a stack that :meth:`scans_layers`."""
    repeats = len(self.blocks) // self.period
    graphdefs, stacked = [], []
    for j in range(self.period):
      splits = [nnx.split(self.blocks[r * self.period + j]) for r in range(repeats)]
      graphdefs.append(splits[0][0])
      stacked.append(jax.tree.map(lambda *leaves: jnp.stack(leaves), *[s for _, s in splits]))
    is_moe = [self.blocks[j].is_moe for j in range(self.period)]

    def apply_block(graphdef, state, h, ids):
      return nnx.merge(graphdef, state)(h, return_aux=True, segment_ids=ids)

    if self.remat:  # as the unrolled form: each block's activations are recomputed in the backward
      apply_block = jax.checkpoint(apply_block, static_argnums=(0,), prevent_cse=False)

    def period(h, states):
      balances = []
      for graphdef, state in zip(graphdefs, states):
        h, balance = apply_block(graphdef, state, h, segment_ids)
        balances.append(balance)
      return h, jnp.stack(balances)

    x, balances = jax.lax.scan(period, x, stacked)  # balances: [repeats, period]
    scanned = [balances[r, j] for r in range(repeats) for j in range(self.period) if is_moe[j]]
    x, rest = self._unrolled_blocks(x, list(self.blocks)[repeats * self.period:], segment_ids)
    return x, scanned + rest

  def prefill(self, tokens, *, max_len: int | None = None):
    """Parallel pass that also returns every layer's decode state.

    ``max_len``: total length to decode to (sizes global attention's cache; other mixers ignore it).
    Returns ``(logits [batch, time, vocab], states)``.
    """
    time = tokens.shape[1]
    self._check_length(max(time, max_len or 0))
    x = self._embed(tokens, jnp.arange(time))
    states = []
    for block in self.blocks:
      x, state = block(x, return_state=True, max_len=max_len)
      states.append(state)
    return self.logits(x), {"layers": states, "pos": jnp.asarray(time, jnp.int32)}

  def init_state(self, batch: int, *, max_len: int | None = None):
    if max_len:
      self._check_length(max_len)
    return {"layers": [block.init_state(batch, max_len=max_len) for block in self.blocks],
            "pos": jnp.zeros((), jnp.int32)}

  def step(self, token, states):
    """One decoding step. ``token: int [batch]`` → ``(logits [batch, vocab], states)``."""
    x = self._embed(token, states["pos"])
    new_states = []
    for block, state in zip(self.blocks, states["layers"]):
      x, state = block.step(x, state)
      new_states.append(state)
    return self.logits(x), {"layers": new_states, "pos": states["pos"] + 1}


def count_params(model: nnx.Module) -> dict[str, int]:
  """``{"params": all, "non_embedding_params": all minus the token embedding (and a learned position
  table, and an untied head)}``."""
  size = lambda module: sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))  # abstract too
  total = size(model)
  embedding = sum(size(m) for m in (model.embed, model.position_embed, model.head) if m is not None)
  return {"params": total, "non_embedding_params": total - embedding}
