"""The residual block: pre-norm mixer sublayer, then pre-norm gated-MLP sublayer.

    x = x + Mixer(RMSNorm(x))
    x = x + MLP(RMSNorm(x))          (left out when ``model.mlp_expansion == 0``, as Zoology's MQAR models)

A pattern entry ``"a|b"`` is a *parallel* hybrid (Lee et al. 2025, "Understanding and Enhancing
Mamba-Transformer Hybrids"): mixers ``a`` and ``b`` read the same normalised input and their outputs
are merged by ``model.parallel_merge``:

    sum:     y = a(x) + b(x)
    gate:    y = g ⊙ a(x) + (1 − g) ⊙ b(x),  g = σ(W_g x)     (per channel, data dependent)
    concat:  y = W_p [a(x); b(x)]

A pattern entry ``"a>b"`` is a *sequential* composition inside one layer (Zoology's ``Hybrid`` mixer:
its "Based" and "SWA" rows are ``baseconv>based`` and ``baseconv>swa``): ``y = b(a(x))``, no norm or
residual between the two. The separators do not mix: an entry is one mixer, a parallel group or a
sequential chain. Both kinds hold their mixers in ``parts`` (so parameter paths, sharding rules and
FLOPs treat them alike), their decode state is the tuple of the parts' states and their FLOPs per token
the sum of the parts' (the merge's projection is counted from its weights, as every Linear).

Packed documents: ``segment_ids: int [batch, time]`` reaches every mixer's parallel face as a keyword
(only when given, so a mixer that does not take them keeps its signature); a block whose mixers do
not all declare ``SEGMENTS`` refuses them (:func:`hybrids.mixers.contract.check_segments`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.layers import GatedMLP, MoE, block_norm, linear
from hybrids.mixers import get_mixer
from hybrids.mixers.contract import check_segments

PARALLEL = "|"
SEQUENTIAL = ">"
MERGES = ("sum", "gate", "concat")


def _segments(segment_ids) -> dict:
  """The keyword a mixer's parallel face gets for packed documents: none when there are none."""
  return {} if segment_ids is None else {"segment_ids": segment_ids}


def check_entry_segments(entry: str) -> None:
  """ValueError naming the first mixer of pattern entry ``entry`` that does not take ``segment_ids``."""
  for name in mixer_names(entry):
    check_segments(name, get_mixer(name))


def composition(entry: str) -> str | None:
  """``"a|b"`` → ``"|"`` (parallel), ``"a>b"`` → ``">"`` (sequential), ``"a"`` → None."""
  if PARALLEL in entry and SEQUENTIAL in entry:
    raise ValueError(f"pattern entry {entry!r} mixes {PARALLEL!r} (parallel) and {SEQUENTIAL!r} (sequential); "
                     "an entry is one mixer, 'a|b' or 'a>b'")
  return PARALLEL if PARALLEL in entry else SEQUENTIAL if SEQUENTIAL in entry else None


def mixer_names(entry: str) -> tuple[str, ...]:
  """``"mamba2|swa"`` → ``("mamba2", "swa")``; ``"baseconv>based"`` → ``("baseconv", "based")``;
  ``"swa"`` → ``("swa",)``."""
  separator = composition(entry)
  return tuple(entry.split(separator)) if separator else (entry,)


class ParallelMixer(nnx.Module):
  """Several mixers on the same input, merged; itself a mixer (both faces, state = tuple of states)."""

  def __init__(self, names: tuple[str, ...], cfg, *, rngs: nnx.Rngs):
    self.merge = cfg.parallel_merge
    self.parts = nnx.List([get_mixer(name)(cfg, rngs=rngs) for name in names])
    n = len(names)
    if self.merge == "gate":
      if n != 2:
        raise ValueError(f"model.parallel_merge='gate' merges exactly 2 mixers, got {names}")
      self.gate = linear(cfg, cfg.d_model, cfg.d_model, rngs=rngs, use_bias=True)
    if self.merge == "concat":
      self.proj = linear(cfg, n * cfg.d_model, cfg.d_model, rngs=rngs)

  def _merge(self, x, outputs):
    if self.merge == "sum":
      return sum(outputs)
    if self.merge == "gate":
      g = jax.nn.sigmoid(self.gate(x).astype(jnp.float32))
      return (g * outputs[0] + (1.0 - g) * outputs[1]).astype(outputs[0].dtype)
    return self.proj(jnp.concatenate(outputs, axis=-1))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    results = [m(x, return_state=return_state, max_len=max_len, **_segments(segment_ids)) for m in self.parts]
    if not return_state:
      return self._merge(x, results)
    return self._merge(x, [y for y, _ in results]), tuple(s for _, s in results)

  def init_state(self, batch: int, *, max_len: int | None = None):
    return tuple(m.init_state(batch, max_len=max_len) for m in self.parts)

  def step(self, x_t, state):
    results = [m.step(x_t, s) for m, s in zip(self.parts, state)]
    return self._merge(x_t, [y for y, _ in results]), tuple(s for _, s in results)

  def flops(self, seq_len: int):
    return _sum_flops(self.parts, seq_len)


class SequentialMixer(nnx.Module):
  """Mixers applied one after another, ``y = m_n(… m_1(x))``; itself a mixer (both faces, state = tuple)."""

  def __init__(self, names: tuple[str, ...], cfg, *, rngs: nnx.Rngs):
    self.parts = nnx.List([get_mixer(name)(cfg, rngs=rngs) for name in names])

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    states = []
    for m in self.parts:
      x = m(x, return_state=return_state, max_len=max_len, **_segments(segment_ids))
      if return_state:
        x, state = x
        states.append(state)
    return (x, tuple(states)) if return_state else x

  def init_state(self, batch: int, *, max_len: int | None = None):
    return tuple(m.init_state(batch, max_len=max_len) for m in self.parts)

  def step(self, x_t, state):
    states = []
    for m, s in zip(self.parts, state):
      x_t, s = m.step(x_t, s)
      states.append(s)
    return x_t, tuple(states)

  def flops(self, seq_len: int):
    return _sum_flops(self.parts, seq_len)


def _sum_flops(parts, seq_len: int):
  """The parts' own FLOPs per token (``hybrids.flops.Flops``), summed."""
  first, *rest = list(parts)
  total = first.flops(seq_len)
  for part in rest:
    total = total + part.flops(seq_len)
  return total


def owning_mixer(path: tuple, layer_mixers) -> str | None:
  """The registered mixer that holds parameter ``path`` (plain keys ``('blocks', i, 'mixer', …)``, with
  ``'parts', j`` inside a parallel or sequential entry), given each layer's pattern entry
  ``layer_mixers``; None outside a registered mixer (embeddings, norms, MLPs, a parallel merge)."""
  if len(path) < 4 or path[0] != "blocks" or path[2] != "mixer" or not isinstance(path[1], int):
    return None
  if path[1] >= len(layer_mixers):
    return None
  names = mixer_names(layer_mixers[path[1]])
  if len(names) == 1:
    return names[0]
  if path[3] == "parts" and len(path) > 5 and isinstance(path[4], int) and path[4] < len(names):
    return names[path[4]]
  return None


def build_mixer(entry: str, cfg, *, rngs: nnx.Rngs) -> nnx.Module:
  """The mixer of pattern entry ``entry``: one registered mixer, a parallel group or a sequential chain."""
  names, separator = mixer_names(entry), composition(entry)
  if separator is None:
    return get_mixer(names[0])(cfg, rngs=rngs)
  return (ParallelMixer if separator == PARALLEL else SequentialMixer)(names, cfg, rngs=rngs)


class ResidualBlock(nnx.Module):
  """One layer of the hybrid stack, with the mixer named ``mixer_name`` in the registry."""

  def __init__(self, mixer_name: str, cfg, *, rngs: nnx.Rngs, moe: bool = False):
    self.mixer_name = mixer_name
    self.is_moe = moe
    self.mixer_norm = block_norm(cfg, cfg.d_model, rngs=rngs)
    self.mixer = build_mixer(mixer_name, cfg, rngs=rngs)
    # mlp_expansion == 0: no MLP sublayer at all (no norm, no parameters), x + Mixer(Norm(x)) only.
    self.has_mlp = moe or cfg.mlp_expansion > 0
    if self.has_mlp:
      self.mlp_norm = block_norm(cfg, cfg.d_model, rngs=rngs)
      self.mlp = MoE(cfg, rngs=rngs) if moe else GatedMLP(cfg, rngs=rngs)
    else:
      self.mlp_norm = self.mlp = None

  def _feed_forward(self, x):
    """MLP or MoE sublayer → ``(update, load-balancing loss)`` (0 for a dense MLP)."""
    if self.is_moe:
      return self.mlp(self.mlp_norm(x))
    return self.mlp(self.mlp_norm(x)), jnp.zeros((), jnp.float32)

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, return_aux: bool = False,
               segment_ids=None):
    """``x: [batch, time, d_model]`` → same shape (and the mixer's decode state, and the MoE loss).

    ``segment_ids: int [batch, time]`` (optional): packed documents, passed to the mixer (which must
    declare ``SEGMENTS``; a ValueError naming it otherwise). Norms and MLPs act per position.
    """
    if segment_ids is not None:
      check_entry_segments(self.mixer_name)
    mixed = self.mixer(self.mixer_norm(x), return_state=return_state, max_len=max_len, **_segments(segment_ids))
    state = None
    if return_state:
      mixed, state = mixed
    x = x + mixed.astype(x.dtype)
    balance = jnp.zeros((), jnp.float32)
    if self.has_mlp:
      update, balance = self._feed_forward(x)
      x = x + update.astype(x.dtype)
    out = (x, state) if return_state else x
    return (out, balance) if return_aux else out

  def init_state(self, batch: int, *, max_len: int | None = None):
    return self.mixer.init_state(batch, max_len=max_len)

  def step(self, x_t, state):
    """``x_t: [batch, d_model]`` → ``(y_t, state)``."""
    mixed, state = self.mixer.step(self.mixer_norm(x_t), state)
    x_t = x_t + mixed.astype(x_t.dtype)
    if self.has_mlp:
      x_t = x_t + self._feed_forward(x_t)[0].astype(x_t.dtype)
    return x_t, state
