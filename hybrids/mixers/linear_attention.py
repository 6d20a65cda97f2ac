"""Linear attention with the elu+1 feature map.

Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention".

    φ(x) = elu(x) + 1
    S_t = S_{t−1} + φ(k_t) v_tᵀ,   z_t = z_{t−1} + φ(k_t)
    o_t = S_tᵀ φ(q_t) / (z_tᵀ φ(q_t) + ε),   y_t = W_o o_t

Runs on the shared recurrence ``kernels.gla`` with no decay; the normaliser ``z`` is a column of ones
appended to ``v``, so numerator and denominator come out of one pass. State ``[batch, heads, d_k, d_v+1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, HEAD_DIM
from kernels.gla import gla, gla_step

EPS = 1e-6


def feature_map(x):
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


class LinearAttention(nnx.Module):
  NO_WEIGHT_DECAY = frozenset()  # projections only
  SETTINGS = {"head_dim": HEAD_DIM, "chunk_size": CHUNK_SIZE}
  SEGMENTS = True  # packed documents: the state (numerator and normaliser) restarts from 0 at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.heads = cfg.num_heads
    self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    inner = self.heads * self.head_dim
    self.q_proj = linear(cfg, cfg.d_model, inner, rngs=rngs)
    self.k_proj = linear(cfg, cfg.d_model, inner, rngs=rngs)
    self.v_proj = linear(cfg, cfg.d_model, inner, rngs=rngs)
    self.o_proj = linear(cfg, inner, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int
    check_int(cfg.head_dim, "model.head_dim", 0, note=" (0: model.d_model // model.num_heads)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
    if not cfg.head_dim and cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model}")

  def _qkv(self, x):
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    q, k, v = feature_map(split(self.q_proj(x))), feature_map(split(self.k_proj(x))), split(self.v_proj(x))
    v = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    return q, k, v

  def _out(self, o):
    o = o[..., :-1] / (o[..., -1:] + EPS)
    return self.o_proj(rearrange(o, "... h d -> ... (h d)").astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """``x: [batch, time, d_model]`` → ``[batch, time, d_model]`` (and ``{"S"}``). ``segment_ids: int
    [batch, time]`` (optional): packed documents, each run as if alone (the state is the last one's)."""
    q, k, v = self._qkv(x)
    o, state = gla(q, k, v, None, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(o)
    return (y, {"S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim + 1), jnp.float32)}

  def step(self, x_t, state):
    q, k, v = self._qkv(x_t)
    o, s = gla_step(q, k, v, None, state["S"])
    return self._out(o), {"S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.gla`` form without decay, ``d_v + 1`` value columns (the normaliser)."""
    return Flops(recurrence=gla_flops(self.heads, self.head_dim, self.head_dim + 1, self.chunk_size, seq_len))
