"""The residual block: pre-norm mixer sublayer, then pre-norm gated-MLP sublayer.

    x = x + Mixer(RMSNorm(x))
    x = x + MLP(RMSNorm(x))

A pattern entry ``"a|b"`` is a *parallel* hybrid (Lee et al. 2025, "Understanding and Enhancing
Mamba-Transformer Hybrids"): mixers ``a`` and ``b`` read the same normalised input and their outputs
are merged by ``model.parallel_merge``:

    sum:     y = a(x) + b(x)
    gate:    y = g ⊙ a(x) + (1 − g) ⊙ b(x),  g = σ(W_g x)     (per channel, data dependent)
    concat:  y = W_p [a(x); b(x)]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.layers import GatedMLP, MoE, linear, rms_norm
from hybrids.mixers import get_mixer

PARALLEL = "|"
MERGES = ("sum", "gate", "concat")


def mixer_names(entry: str) -> tuple[str, ...]:
  """``"mamba2|swa"`` → ``("mamba2", "swa")``; ``"swa"`` → ``("swa",)``."""
  return tuple(entry.split(PARALLEL))


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

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None):
    results = [m(x, return_state=return_state, max_len=max_len) for m in self.parts]
    if not return_state:
      return self._merge(x, results)
    return self._merge(x, [y for y, _ in results]), tuple(s for _, s in results)

  def init_state(self, batch: int, *, max_len: int | None = None):
    return tuple(m.init_state(batch, max_len=max_len) for m in self.parts)

  def step(self, x_t, state):
    results = [m.step(x_t, s) for m, s in zip(self.parts, state)]
    return self._merge(x_t, [y for y, _ in results]), tuple(s for _, s in results)


class ResidualBlock(nnx.Module):
  """One layer of the hybrid stack, with the mixer named ``mixer_name`` in the registry."""

  def __init__(self, mixer_name: str, cfg, *, rngs: nnx.Rngs, moe: bool = False):
    self.mixer_name = mixer_name
    self.is_moe = moe
    self.mixer_norm = rms_norm(cfg, cfg.d_model, rngs=rngs)
    names = mixer_names(mixer_name)
    self.mixer = get_mixer(names[0])(cfg, rngs=rngs) if len(names) == 1 else ParallelMixer(names, cfg, rngs=rngs)
    self.mlp_norm = rms_norm(cfg, cfg.d_model, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if moe else GatedMLP(cfg, rngs=rngs)

  def _feed_forward(self, x):
    """MLP or MoE sublayer → ``(update, load-balancing loss)`` (0 for a dense MLP)."""
    if self.is_moe:
      return self.mlp(self.mlp_norm(x))
    return self.mlp(self.mlp_norm(x)), jnp.zeros((), jnp.float32)

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, return_aux: bool = False):
    """``x: [batch, time, d_model]`` → same shape (and the mixer's decode state, and the MoE loss)."""
    mixed = self.mixer(self.mixer_norm(x), return_state=return_state, max_len=max_len)
    state = None
    if return_state:
      mixed, state = mixed
    x = x + mixed.astype(x.dtype)
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
    x_t = x_t + self._feed_forward(x_t)[0].astype(x_t.dtype)
    return x_t, state
