"""The residual block: pre-norm mixer sublayer, then pre-norm gated-MLP sublayer.

    x = x + Mixer(RMSNorm(x))
    x = x + MLP(RMSNorm(x))
"""

from __future__ import annotations

from flax import nnx

from hybrids.layers import GatedMLP, rms_norm
from hybrids.mixers import get_mixer


class ResidualBlock(nnx.Module):
  """One layer of the hybrid stack, with the mixer named ``mixer_name`` in the registry."""

  def __init__(self, mixer_name: str, cfg, *, rngs: nnx.Rngs):
    self.mixer_name = mixer_name
    self.mixer_norm = rms_norm(cfg, cfg.d_model, rngs=rngs)
    self.mixer = get_mixer(mixer_name)(cfg, rngs=rngs)
    self.mlp_norm = rms_norm(cfg, cfg.d_model, rngs=rngs)
    self.mlp = GatedMLP(cfg, rngs=rngs)

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None):
    """``x: [batch, time, d_model]`` → same shape (and the mixer's decode state)."""
    mixed = self.mixer(self.mixer_norm(x), return_state=return_state, max_len=max_len)
    state = None
    if return_state:
      mixed, state = mixed
    x = x + mixed.astype(x.dtype)
    x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
    return (x, state) if return_state else x

  def init_state(self, batch: int, *, max_len: int | None = None):
    return self.mixer.init_state(batch, max_len=max_len)

  def step(self, x_t, state):
    """``x_t: [batch, d_model]`` → ``(y_t, state)``."""
    mixed, state = self.mixer.step(self.mixer_norm(x_t), state)
    x_t = x_t + mixed.astype(x_t.dtype)
    x_t = x_t + self.mlp(self.mlp_norm(x_t)).astype(x_t.dtype)
    return x_t, state
