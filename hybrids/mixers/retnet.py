"""Multi-scale retention (RetNet).

Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models".

    γ_h = 1 − 2^(−5−h)                                  fixed decay of head h
    q_t = R_t W_q x_t,  k_t = R_t W_k x_t / √d_head,  v_t = W_v x_t   (R_t: rotation, as xPos/RoPE)
    S_t = γ_h S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t
      ⇔ parallel form  O = (Q Kᵀ ⊙ D) V,  D_{ts} = γ^{t−s} [t ≥ s]
    y_t = W_o (swish(W_g x_t) ⊙ GroupNorm_h(o_t))

The recurrence is ``kernels.gla`` with a scalar log-decay per head. RoPE stands in for xPos
(xPos's extra length-extrapolation scaling is omitted). State ``[batch, heads, d_head, d_head]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import HeadNorm, apply_rope, document_positions, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, HEAD_DIM, ROPE_BASE
from kernels.gla import gla, gla_step


def head_decays(heads: int):
  """``log γ_h`` for ``γ_h = 1 − 2^(−5−h)``."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32))))


class RetNet(nnx.Module):
  NO_WEIGHT_DECAY = frozenset()  # the decays γ_h are fixed, not parameters
  SETTINGS = {"head_dim": HEAD_DIM, "rope_base": ROPE_BASE, "chunk_size": CHUNK_SIZE}
  SEGMENTS = True  # packed documents: the rotation's positions and the state restart at each start

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.heads = cfg.num_heads
    self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    self.rope_base, self.chunk_size, self.impl = cfg.rope_base, cfg.chunk_size, cfg.gla_impl
    self.dtype = dtype_of(cfg.dtype)
    inner = self.heads * self.head_dim
    self.q_proj = linear(cfg, cfg.d_model, inner, rngs=rngs)
    self.k_proj = linear(cfg, cfg.d_model, inner, rngs=rngs)
    self.v_proj = linear(cfg, cfg.d_model, inner, rngs=rngs)
    self.g_proj = linear(cfg, cfg.d_model, inner, rngs=rngs)
    self.norm = HeadNorm(self.heads, self.head_dim, param_dtype=dtype_of(cfg.param_dtype))
    self.o_proj = linear(cfg, inner, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int, check_number
    check_int(cfg.head_dim, "model.head_dim", 0, note=" (0: model.d_model // model.num_heads)")
    check_number(cfg.rope_base, "model.rope_base", 0, lo_open=True)
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    if (not cfg.head_dim and cfg.d_model % cfg.num_heads) or head_dim % 2:
      raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model} into an even head dim")

  def _qkv(self, x, positions):
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    q = apply_rope(split(self.q_proj(x)), positions, base=self.rope_base)
    k = apply_rope(split(self.k_proj(x)), positions, base=self.rope_base) / jnp.sqrt(float(self.head_dim)).astype(x.dtype)
    return q, k, split(self.v_proj(x))

  def _out(self, x, o):
    o = self.norm(o.astype(jnp.float32))
    return self.o_proj(jax.nn.swish(self.g_proj(x)) * rearrange(o, "... h d -> ... (h d)").astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]`` → ``y`` (and ``{"S", "pos"}``, ``pos`` the next
    token's position: ``int32 []``). ``segment_ids: int [batch, time]`` (optional): packed documents,
    each run as if alone: positions restart at each start, the state is the last document's and
    ``pos`` is ``int32 [batch]``, each row's length of its last document."""
    batch, time, _ = x.shape
    positions = jnp.arange(time) if segment_ids is None else document_positions(segment_ids)
    q, k, v = self._qkv(x, positions)
    log_decay = jnp.broadcast_to(head_decays(self.heads), (batch, time, self.heads))
    o, state = gla(q, k, v, log_decay, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(x, o)
    if not return_state:
      return y
    pos = jnp.asarray(time, jnp.int32) if segment_ids is None else positions[:, -1].astype(jnp.int32) + 1
    return y, {"S": state, "pos": pos}

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}

  def step(self, x_t, state):
    # pos: [] (one position for the batch) → [1]; [batch] (after a packed prefill) → [batch, 1].
    q, k, v = self._qkv(x_t[:, None], state["pos"][..., None])
    log_decay = jnp.broadcast_to(head_decays(self.heads), (x_t.shape[0], self.heads))
    o, s = gla_step(q[:, 0], k[:, 0], v[:, 0], log_decay, state["S"])
    return self._out(x_t, o), {"S": s, "pos": state["pos"] + 1}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.gla`` form with a scalar decay per head."""
    return Flops(recurrence=gla_flops(self.heads, self.head_dim, self.head_dim, self.chunk_size, seq_len))
