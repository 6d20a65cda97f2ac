"""Sliding-window (local) causal attention: attention restricted to the last ``window`` tokens.

Beltagy et al. 2020 (Longformer), as used in Griffin's local-attention layers (De et al. 2024),
Based (Arora et al. 2024) and SWAX.

    o_t = Σ_{t−W < s ≤ t} softmax_s(q_t·k_s / √d_head) v_s

Parallel face: only the band is computed (``kernels.window_attention``, O(T·W)).
Recurrent face: a ring buffer of ``window`` keys/values — slot ``p mod W`` holds position ``p`` — so
decoding memory is O(W) whatever the generated length. Keys are cached after RoPE, so a slot never
needs re-rotating.
"""

from __future__ import annotations

import jax.numpy as jnp

from hybrids.mixers.attention import Attention
from hybrids.mixers.contract import Setting


class SlidingWindowAttention(Attention):
  """Causal attention over a band of ``model.window`` positions; GQA/MQA and RoPE as :class:`Attention`."""

  NO_WEIGHT_DECAY = Attention.NO_WEIGHT_DECAY
  SEGMENTS = True  # as Attention: the band is also cut at each document start
  SETTINGS = {**Attention.SETTINGS, "window": Setting(32, "the SWA band", 1)}

  @staticmethod
  def _window(cfg) -> int:
    return int(cfg.window)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    if cfg.window is None or isinstance(cfg.window, bool) or not isinstance(cfg.window, int) or cfg.window <= 0:
      raise ValueError(f"model.window={cfg.window!r} must be a positive integer (the 'swa' mixer's band)")
    if cfg.window > seq_len:
      raise ValueError(f"model.window={cfg.window} exceeds data.seq_len={seq_len}: the band would be global "
                       "attention; use the 'attention' mixer or a window ≤ seq_len")
    super().check_config(cfg, seq_len=seq_len)

  def init_state(self, batch: int, *, max_len: int | None = None):
    """Ring buffer ``{"k", "v": [batch, window, kv_heads, head_dim], "pos": int32[]}``; ``max_len`` is ignored."""
    shape = (batch, self.window, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype), "pos": jnp.zeros((), jnp.int32)}

  def _prefill_state(self, k, v, max_len):
    batch, time = k.shape[:2]
    window = self.window
    # The last `window` positions time-W … time-1 (zeros where negative) go to slots p mod W.
    pad = ((0, 0), (window, 0), (0, 0), (0, 0))
    last_k = jnp.pad(k, pad)[:, -window:].astype(self.dtype)
    last_v = jnp.pad(v, pad)[:, -window:].astype(self.dtype)
    slots = (time + jnp.arange(window)) % window
    state = self.init_state(batch)
    state["k"] = state["k"].at[:, slots].set(last_k)
    state["v"] = state["v"].at[:, slots].set(last_v)
    state["pos"] = jnp.asarray(time, jnp.int32)
    return state

  def _slot_and_valid(self, pos, slots):
    window = self.window
    slot_ids = jnp.arange(window)
    # Slot s holds the latest position ≤ pos congruent to s mod W; it is readable once written.
    held = pos - (pos - slot_ids) % window
    return pos % window, held >= 0
