"""Based: linear attention with a 2nd-order Taylor feature map, plus a short convolution.

Arora et al. 2024, "Simple linear attention language models balance the recall-throughput tradeoff".

    x̃ = Conv1D_4(x)                                              short causal conv (local mixing)
    q_t = W_q x̃_t,  k_t = W_k x̃_t ∈ R^{d'} per head (d' = feature_dim = 16),  v_t = W_v x̃_t
    φ(x) = [1, x / d'^¼, vec(x xᵀ) / √(2d')]        ⇒ φ(q)·φ(k) = 1 + q·k/√d' + (q·k)²/(2d')
    o_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)
    y_t = W_o o_t

The Taylor kernel is a 2nd-order approximation of exp(q·k/√d') and is always positive
(1 + a + a²/2 > 0), so the normaliser never vanishes. Runs on ``kernels.gla`` without decay; the
normaliser is a column of ones appended to ``v``. State ``[batch, heads, 1 + d' + d'², d_head + 1]``.
"""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import CausalConv1D, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, CONV_WIDTH, Setting
from kernels.gla import gla, gla_step

EPS = 1e-6


def taylor_feature_map(x):
  """``[..., d]`` → ``[..., 1 + d + d²]`` with ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``."""
  d = x.shape[-1]
  x = x.astype(jnp.float32)
  outer = rearrange(x[..., :, None] * x[..., None, :], "... i j -> ... (i j)")
  return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), jnp.float32), x / d ** 0.25, outer / (2 * d) ** 0.5], axis=-1)


class Based(nnx.Module):
  NO_WEIGHT_DECAY = frozenset()  # projections and a short conv only
  SETTINGS = {
      "feature_dim": Setting(16, "Based's q/k width per head", 1),
      "chunk_size": CHUNK_SIZE,
      "conv_width": CONV_WIDTH,
  }
  # Packed documents: the short conv reads no earlier document and the linear-attention state (with
  # its normaliser) restarts from 0 at each start; the feature map is per token.
  SEGMENTS = True

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.heads = cfg.num_heads
    self.feature_dim = cfg.feature_dim
    self.head_dim = cfg.d_model // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    self.conv = CausalConv1D(cfg.d_model, cfg.conv_width, dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype),
                             rngs=rngs)
    self.q_proj = linear(cfg, cfg.d_model, self.heads * self.feature_dim, rngs=rngs)
    self.k_proj = linear(cfg, cfg.d_model, self.heads * self.feature_dim, rngs=rngs)
    self.v_proj = linear(cfg, cfg.d_model, self.heads * self.head_dim, rngs=rngs)
    self.o_proj = linear(cfg, self.heads * self.head_dim, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    if cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model}")
    if cfg.feature_dim <= 0:
      raise ValueError(f"model.feature_dim={cfg.feature_dim} must be positive")
    from hybrids.checks import check_int
    check_int(cfg.feature_dim, "model.feature_dim", 1, note=" (Based's q/k width per head)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")

  def _qkv(self, x):
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    q, k = taylor_feature_map(split(self.q_proj(x))), taylor_feature_map(split(self.k_proj(x)))
    v = split(self.v_proj(x)).astype(jnp.float32)
    return q, k, jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)

  def _out(self, o):
    o = o[..., :-1] / (o[..., -1:] + EPS)
    return self.o_proj(rearrange(o, "... h d -> ... (h d)").astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    x, conv_state = self.conv(x, return_state=True, segment_ids=segment_ids)
    q, k, v = self._qkv(x)
    o, state = gla(q, k, v, None, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(o)
    return (y, {"conv": conv_state, "S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    features = 1 + self.feature_dim + self.feature_dim ** 2
    return {"conv": self.conv.init_state(batch),
            "S": jnp.zeros((batch, self.heads, features, self.head_dim + 1), jnp.float32)}

  def step(self, x_t, state):
    x_t, conv_state = self.conv.step(x_t, state["conv"])
    q, k, v = self._qkv(x_t)
    o, s = gla_step(q, k, v, None, state["S"])
    return self._out(o), {"conv": conv_state, "S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the q and k outer products of the Taylor map, then the chunked ``kernels.gla`` form on
    ``1 + d' + d'²`` features and ``d_head + 1`` value columns (the normaliser)."""
    f = self.feature_dim
    feature_map = 2.0 * self.heads * f * f
    return Flops(recurrence=feature_map + gla_flops(self.heads, 1 + f + f * f, self.head_dim + 1, self.chunk_size,
                                                    seq_len))
