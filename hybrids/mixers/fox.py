"""The Forgetting Transformer (FoX): softmax attention with a data-dependent forget gate.

Lin et al. 2025, "Forgetting Transformer: Softmax Attention with a Forget Gate" (ICLR 2025), the
basic ("LLaMA") FoX of the authors' ``ForgettingAttentionLayer`` (``fgate_type="full"``):

    q_t = W_q x_t,  k_t = W_k x_t,  v_t = W_v x_t          (no RoPE, no biases)
    f_t = σ(w_fᵀ x_t + b_f)                                 one forget gate per query head
    o_i = Σ_{j ≤ i} softmax_j(q_i·k_j/√d_head + Σ_{j<l≤i} log f_l) v_j,   y_t = W_o o_t

``kernels.forgetting_attention`` computes it (``model.fox_impl``: ``"auto"``, ``"xla"``, ``"reference"``
or ``"pallas"``, its flash kernels on GPU or TPU). ``num_kv_heads`` key/value heads serve groups of query
heads as in attention (GQA/MQA; the authors' layer leaves GQA untested); each query head keeps its
own gate. ``model.fox_window`` W > 0 restricts keys to ``i − W < j ≤ i`` (the blocked band, O(T·W));
0 is global causal attention. (A field of its own: the shared ``model.window`` must be ≥ 1 and
marks a mixer whose band SWAX resets, ``HybridLM.set_window``; FoX's default is global.)

Positions: FoX uses no positional encoding — the forget gate's decay is its recency bias — so
``model.position="rope"`` rotates attention's and SWA's queries and keys but not these; a
``"learned"`` table is the model's, added at the embedding, as for every mixer.

Left out (the authors' "Pro" block): QK-norm, the output gate and output norm, the data-dependent
key/value token shift, and the optional pruning of keys whose bias falls below a tolerance.
Parameters start as every mixer's here (``nnx.Linear``: LeCun normal, zero bias, so ``f ≈ σ(noise)``
at initialisation, as the authors' ``fgate_bias_init=False``).

Recurrent face: a key/value cache — ``max_len`` slots when global (memory O(T), as attention), a ring
buffer of W slots when windowed (slot ``p mod W`` holds position ``p``) — and, per slot and query
head, ``Σ log f`` over the steps since its key was written: each step adds ``log f_t`` to every slot
and writes 0 for its own key. Unwritten slots, and after a packed prefill the slots of earlier
documents, hold ``kernels.forgetting_attention.MASKED``: FoX has no positions, so a packed row's
state is its last document's alone, read where that document sits in the row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, window_attention_flops
from hybrids.layers import dtype_of, linear
from hybrids.mixers.attention import Attention, check_head_shapes
from hybrids.mixers.contract import HEAD_DIM, Setting
from kernels.forgetting_attention import IMPLS as FOX_IMPLS
from kernels.forgetting_attention import MASKED, decode_forgetting_attention, forgetting_attention
from kernels.window_attention import document_index


class ForgettingTransformer(nnx.Module):
  """FoX attention, global (``model.fox_window == 0``) or over a band of ``fox_window`` positions."""

  NO_WEIGHT_DECAY = frozenset()  # projections only (the gate's bias is 1-D, never decayed)
  SEGMENTS = True  # packed documents: attention is masked at each start and the log-forget sum restarts
  SETTINGS = {
      "num_kv_heads": Attention.SETTINGS["num_kv_heads"],
      "head_dim": HEAD_DIM,
      "fox_window": Setting(0, "FoX's band; 0: global causal attention", 0),
      "fox_impl": Setting("auto", "kernels.forgetting_attention implementation: auto (xla), xla, reference or "
                          "pallas (flash kernels: Triton on GPU, Mosaic on TPU)"),
  }

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
    self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    self.window = int(cfg.fox_window) or None
    self.impl = cfg.fox_impl
    self.dtype = dtype_of(cfg.dtype)
    self.q_proj = linear(cfg, cfg.d_model, self.num_heads * self.head_dim, rngs=rngs)
    self.k_proj = linear(cfg, cfg.d_model, self.num_kv_heads * self.head_dim, rngs=rngs)
    self.v_proj = linear(cfg, cfg.d_model, self.num_kv_heads * self.head_dim, rngs=rngs)
    self.forget_proj = linear(cfg, cfg.d_model, self.num_heads, rngs=rngs, use_bias=True)
    self.o_proj = linear(cfg, self.num_heads * self.head_dim, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    """Raise ValueError (naming the field) for settings this mixer cannot run with."""
    from hybrids.checks import check_choice, check_int
    check_int(cfg.fox_window, "model.fox_window", 0, note=" (FoX's band; 0: global causal attention)")
    check_choice(cfg.fox_impl, "model.fox_impl", FOX_IMPLS)
    if cfg.fox_window > seq_len:
      raise ValueError(f"model.fox_window={cfg.fox_window} exceeds data.seq_len={seq_len}: the band would be "
                       "global attention; set model.fox_window=0 (global) or a window ≤ seq_len")
    check_head_shapes(cfg)

  def _project(self, x):
    """``x: [..., d_model]`` → q ``[..., heads, d]``, k, v ``[..., kv_heads, d]``, log f f32 ``[..., heads]``."""
    q = rearrange(self.q_proj(x), "... (h d) -> ... h d", h=self.num_heads)
    k = rearrange(self.k_proj(x), "... (h d) -> ... h d", h=self.num_kv_heads)
    v = rearrange(self.v_proj(x), "... (h d) -> ... h d", h=self.num_kv_heads)
    return q, k, v, jax.nn.log_sigmoid(self.forget_proj(x).astype(jnp.float32))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]`` → ``[batch, time, d_model]`` (and the decode state).

    ``max_len``: cache slots of the returned state (global only; default ``time``).
    ``segment_ids: int [batch, time]``: packed documents; no query reads a key of another document,
    and the returned state is the last document's alone.
    """
    q, k, v, log_f = self._project(x)
    o = forgetting_attention(q, k, v, log_f, window=self.window, segment_ids=segment_ids, impl=self.impl)
    y = self.o_proj(rearrange(o, "b t h d -> b t (h d)"))
    if not return_state:
      return y
    return y, self._prefill_state(k, v, log_f, max_len, segment_ids)

  def _prefill_state(self, k, v, log_f, max_len, segment_ids):
    batch, time = k.shape[:2]
    # Σ_{s<l<time} log f_l for each s: a suffix sum, so recent keys' biases are small sums, not
    # differences of two row-long cumulative sums.
    suffix = jnp.cumsum(log_f[:, ::-1], axis=1)[:, ::-1]
    since = jnp.concatenate([suffix[:, 1:], jnp.zeros_like(suffix[:, :1])], axis=1)
    if segment_ids is not None:  # earlier documents' keys stay in the cache, unreadable
      doc = document_index(segment_ids)
      since = jnp.where((doc == doc[:, -1:])[..., None], since, MASKED)
    if self.window is None:
      max_len = max_len or time
      if max_len < time:
        raise ValueError(f"fox: max_len={max_len} is shorter than the prefill ({time} tokens)")
      state = self.init_state(batch, max_len=max_len)
      slots = jnp.arange(time)
    else:
      # The last W positions time−W … time−1 (unreadable where negative) go to slots p mod W.
      window = self.window
      pad = lambda z, value=0.0: jnp.pad(z, ((0, 0), (window, 0)) + ((0, 0),) * (z.ndim - 2),
                                         constant_values=value)[:, -window:]
      k, v, since = pad(k), pad(v), pad(since, MASKED)
      state = self.init_state(batch)
      slots = (time + jnp.arange(window)) % window
    state["k"] = state["k"].at[:, slots].set(k.astype(self.dtype))
    state["v"] = state["v"].at[:, slots].set(v.astype(self.dtype))
    state["log_forget"] = state["log_forget"].at[:, slots].set(since)
    state["pos"] = jnp.asarray(time, jnp.int32)
    return state

  def init_state(self, batch: int, *, max_len: int | None = None):
    """``{"k", "v": [batch, slots, kv_heads, head_dim], "log_forget": f32 [batch, slots, heads],
    "pos": int32[]}``: ``max_len`` slots when global (required), the window's when windowed (``max_len``
    ignored)."""
    if self.window is None and not max_len:
      raise ValueError("fox: global FoX's decode cache needs max_len (prompt + new tokens)")
    slots = max_len if self.window is None else self.window
    shape = (batch, slots, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "log_forget": jnp.full((batch, slots, self.num_heads), MASKED, jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}

  def step(self, x_t, state):
    """Recurrent face. ``x_t: [batch, d_model]`` → ``(y_t [batch, d_model], new state)``."""
    q, k, v, log_f = self._project(x_t)
    pos = state["pos"]
    # A growing cache writes at pos (decoding past max_len is a caller error, as attention's); the
    # ring buffer overwrites position pos − W, which just left the band.
    slot = pos if self.window is None else pos % self.window
    since = (state["log_forget"] + log_f[:, None, :]).at[:, slot].set(0.0)
    k_cache = state["k"].at[:, slot].set(k.astype(self.dtype))
    v_cache = state["v"].at[:, slot].set(v.astype(self.dtype))
    o = decode_forgetting_attention(q, k_cache, v_cache, since)
    y = self.o_proj(rearrange(o, "b h d -> b (h d)"))
    return y, {"k": k_cache, "v": v_cache, "log_forget": since, "pos": pos + 1}

  def flops(self, seq_len: int) -> Flops:
    """Per token: QKᵀ and PV over the scores of the causal band (all ``seq_len`` keys when global);
    the bias adds one add per score, pointwise."""
    window = seq_len if self.window is None else self.window
    return Flops(attention=window_attention_flops(self.num_heads, self.head_dim, window, seq_len))
