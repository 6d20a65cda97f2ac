"""Global causal multi-head attention with grouped key/value heads and RoPE.

Vaswani et al. 2017 ("Attention Is All You Need"); MQA: Shazeer 2019; GQA: Ainslie et al. 2023;
RoPE: Su et al. 2021.

    q_t = R_t W_q x_t,  k_t = R_t W_k x_t,  v_t = W_v x_t       (R_t: rotation by position t)
    o_t = Σ_{s ≤ t} softmax_s(q_t·k_s / √d_head) v_s,  y_t = W_o o_t

``num_kv_heads`` key/value heads are shared by groups of ``num_heads // num_kv_heads`` query heads
(1: MQA; ``num_heads``: MHA). RoPE only with ``model.position == "rope"``; with ``"learned"`` (Zoology's
attention) or ``"none"`` the model adds positions at the embedding, or none at all.

Recurrent face: a key/value cache of ``max_len`` slots, so decoding memory grows with the sequence
(O(T)) — the one mixer for which it does; ``swa`` bounds it to the window. After a packed prefill
(``segment_ids``) the cache holds the row's last document alone, at the slots and position it would
have had alone, so ``pos`` is then per row: rows' last documents differ in length.
"""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, window_attention_flops
from hybrids.layers import apply_rope, document_positions, dtype_of, linear
from hybrids.mixers.contract import HEAD_DIM, ROPE_BASE, Setting
from kernels.window_attention import decode_attention, window_attention


def check_head_shapes(cfg) -> None:
  """The query / key-value head layout every softmax-attention mixer shares (ValueError naming the field):
  ``model.head_dim`` (0: d_model // num_heads), ``model.num_kv_heads`` (0: num_heads) dividing num_heads."""
  from hybrids.checks import check_int
  check_int(cfg.head_dim, "model.head_dim", 0, note=" (0: model.d_model // model.num_heads)")
  check_int(cfg.num_kv_heads, "model.num_kv_heads", 0, note=" (0: = model.num_heads)")
  if cfg.num_heads <= 0 or (not cfg.head_dim and cfg.d_model % cfg.num_heads):
    raise ValueError(f"model.num_heads={cfg.num_heads} must be positive and divide model.d_model={cfg.d_model}"
                     " (or set model.head_dim)")
  kv = cfg.num_kv_heads or cfg.num_heads
  if kv <= 0 or cfg.num_heads % kv:
    raise ValueError(f"model.num_kv_heads={cfg.num_kv_heads} must divide model.num_heads={cfg.num_heads}")


class Attention(nnx.Module):
  """Causal attention; ``window`` is None here (global) and set by :class:`SlidingWindowAttention`."""

  NO_WEIGHT_DECAY = frozenset()  # projections only
  SEGMENTS = True  # packed documents: RoPE restarts and attention is masked at each document
  TENSOR_PARALLEL = True  # q/k/v_proj split by heads (columns), o_proj by rows
  SETTINGS = {
      "num_kv_heads": Setting(0, "0: = model.num_heads (MHA); 1: MQA", 0),
      "head_dim": HEAD_DIM,
      "rope_base": ROPE_BASE,
      "attn_softcap": Setting(0.0, "0: off", 0.0),
  }

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
    self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    self.rope_base = cfg.rope_base
    self.rope = cfg.position == "rope"
    self.softcap = cfg.attn_softcap or None
    self.impl = cfg.attention_impl
    self.dtype = dtype_of(cfg.dtype)
    self.window = self._window(cfg)
    self.q_proj = linear(cfg, cfg.d_model, self.num_heads * self.head_dim, rngs=rngs)
    self.k_proj = linear(cfg, cfg.d_model, self.num_kv_heads * self.head_dim, rngs=rngs)
    self.v_proj = linear(cfg, cfg.d_model, self.num_kv_heads * self.head_dim, rngs=rngs)
    self.o_proj = linear(cfg, self.num_heads * self.head_dim, cfg.d_model, rngs=rngs)

  @staticmethod
  def _window(cfg) -> int | None:
    return None

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    """Raise ValueError (naming the field) for settings this mixer cannot run with."""
    from hybrids.checks import check_number
    check_head_shapes(cfg)
    check_number(cfg.rope_base, "model.rope_base", 0, lo_open=True)
    check_number(cfg.attn_softcap, "model.attn_softcap", 0, note=" (0: off)")
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    if head_dim % 2 and cfg.position == "rope":
      raise ValueError(f"head dim {head_dim} (model.head_dim or d_model/num_heads) must be even for RoPE")

  def _project(self, x, positions):
    q = rearrange(self.q_proj(x), "... (h d) -> ... h d", h=self.num_heads)
    k = rearrange(self.k_proj(x), "... (h d) -> ... h d", h=self.num_kv_heads)
    v = rearrange(self.v_proj(x), "... (h d) -> ... h d", h=self.num_kv_heads)
    if not self.rope:
      return q, k, v
    return apply_rope(q, positions, base=self.rope_base), apply_rope(k, positions, base=self.rope_base), v

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]`` → ``[batch, time, d_model]`` (and the decode state).

    ``max_len``: cache slots of the returned state (global attention only; default ``time``).
    ``segment_ids: int [batch, time]``: packed documents; RoPE positions restart at each document
    and no query reads a key of another document; the returned state is the row's last document's
    alone (``pos: int32[batch]``, each row's length of it).
    """
    time = x.shape[1]
    positions = jnp.arange(time) if segment_ids is None else document_positions(segment_ids)
    q, k, v = self._project(x, positions)
    o = window_attention(q, k, v, window=self.window, softcap=self.softcap, impl=self.impl, segment_ids=segment_ids)
    y = self.o_proj(rearrange(o, "b t h d -> b t (h d)"))
    if not return_state:
      return y
    if segment_ids is None:
      return y, self._prefill_state(k, v, max_len)
    return y, self._last_document_state(k, v, max_len, positions)

  def _last_document_state(self, k, v, max_len, positions):
    """The state after each row's last document alone: its keys (RoPE already at its own positions)
    and values at the slots they would have had alone, ``pos`` its length; earlier documents' are
    dropped. ``positions: int32 [batch, time]``, each token's place in its document."""
    time = k.shape[1]
    length = positions[:, -1] + 1  # int32 [batch]
    start = time - length
    own = (jnp.arange(time) >= start[:, None])[..., None, None]
    state = self._prefill_state(jnp.where(own, k, 0), jnp.where(own, v, 0), max_len)
    # _prefill_state puts row position p at slot p mod slots (the growing cache and SWA's ring alike);
    # alone, the document's position p − start would be there: rotate each row's slots back by start.
    slots = state["k"].shape[1]
    source = ((jnp.arange(slots) + start[:, None]) % slots)[..., None, None]
    state["k"] = jnp.take_along_axis(state["k"], source, axis=1)
    state["v"] = jnp.take_along_axis(state["v"], source, axis=1)
    state["pos"] = length
    return state

  def _prefill_state(self, k, v, max_len):
    batch, time = k.shape[:2]
    max_len = max_len or time
    if max_len < time:
      raise ValueError(f"attention: max_len={max_len} is shorter than the prefill ({time} tokens)")
    state = self.init_state(batch, max_len=max_len)
    state["k"] = state["k"].at[:, :time].set(k.astype(self.dtype))
    state["v"] = state["v"].at[:, :time].set(v.astype(self.dtype))
    state["pos"] = jnp.asarray(time, jnp.int32)
    return state

  def init_state(self, batch: int, *, max_len: int | None = None):
    """KV cache ``{"k", "v": [batch, max_len, kv_heads, head_dim], "pos": int32[]}`` (``pos: int32[batch]``
    after a packed prefill)."""
    if not max_len:
      raise ValueError("attention: global attention's decode cache needs max_len (prompt + new tokens)")
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype), "pos": jnp.zeros((), jnp.int32)}

  def _slot_and_valid(self, pos, slots):
    # A growing cache: write at pos, read everything written so far. Decoding past max_len is a
    # caller error (generate sizes the cache); the write past the last slot would be dropped.
    return pos, jnp.arange(slots) <= pos

  def step(self, x_t, state):
    """Recurrent face. ``x_t: [batch, d_model]`` → ``(y_t [batch, d_model], new state)``."""
    pos = state["pos"]
    q, k, v = self._project(x_t[:, None], pos[..., None])
    if pos.ndim:  # after a packed prefill: each row at its own place in its last document
      slot, valid = self._slot_and_valid(pos[:, None], state["k"].shape[1])  # [batch, 1], [batch, slots]
      index = (jnp.arange(x_t.shape[0]), slot[:, 0])
    else:
      slot, valid = self._slot_and_valid(pos, state["k"].shape[1])
      index = (slice(None), slot)
    k_cache = state["k"].at[index].set(k[:, 0].astype(self.dtype))
    v_cache = state["v"].at[index].set(v[:, 0].astype(self.dtype))
    o = decode_attention(q[:, 0], k_cache, v_cache, valid, softcap=self.softcap)
    y = self.o_proj(rearrange(o, "b h d -> b (h d)"))
    return y, {"k": k_cache, "v": v_cache, "pos": pos + 1}

  def flops(self, seq_len: int) -> Flops:
    """Per token: QKᵀ and PV over the scores of the causal band (all ``seq_len`` keys when unbanded)."""
    window = seq_len if self.window is None else self.window
    return Flops(attention=window_attention_flops(self.num_heads, self.head_dim, window, seq_len))
