"""Gated DeltaProduct: Gated DeltaNet with ``n_h`` Householder steps per token.

Siems, Carstensen, Zela, Hutter, Pontil & Grazzi 2025, "DeltaProduct: Improving State-Tracking in
Linear RNNs via Householder Products" (arXiv 2502.10297); fla's ``GatedDeltaProduct``.

    q_t = SiLU(Conv1D(W_q x)_t),  [k_{t,j}, v_{t,j}] = SiLU(Conv1D(W_kv x)_t)     j = 1 … n_h  (d_h = d_model / heads)
    q_t, k_{t,j} L2-normalised per head;  β_{t,j} = 2 σ(W_β x_t)_j ∈ (0, 2)
    log α_t = −softplus(W_α x_t + b_Δ) · exp(A_log)                       one decay per head and token
    S_{t,0} = S_{t−1},  S_{t,j} = (I − β_{t,j} k_{t,j} k_{t,j}ᵀ) α_{t,j} S_{t,j−1} + β_{t,j} k_{t,j} v_{t,j}ᵀ
                        (α_{t,1} = α_t, α_{t,j>1} = 1),  S_t = S_{t,n_h}
    o_t = S_tᵀ q_t
    y_t = W_o (SiLU(W_g x_t) ⊙ RMSNorm_h(o_t))

The state transition of a token is a product of ``n_h`` generalized Householder reflections (times
the decay): rank ``n_h`` instead of DeltaNet's rank one, and with β up to 2 each factor can have the
eigenvalue −1 (reflections), which is what lets the layer track states (permutations) that
diagonal and rank-one transitions cannot. ``n_h = 1`` is Gated DeltaNet with β ∈ (0, 2).

The recurrence is ``kernels.dplr`` on a sequence ``n_h`` times longer, as the paper and fla do: token
t becomes sub-steps ``(t, 1) … (t, n_h)``, each the delta rule (``a = β k``, ``b = α k``, keys ``β k``:
:func:`kernels.dplr.delta_rule_as_dplr`) with the decay on the first, and only the last sub-step's
output is kept (its query is ``q_t``; the others read nothing). With ``segment_ids`` each token's
sub-steps carry its id, so a document starts at its first token's first sub-step. ``model.chunk_size``
is the kernel's chunk, in sub-steps (``chunk_size / n_h`` tokens): the UT transform's conditioning
depends on the rows of a chunk, and with β up to 2 it degrades sooner than the delta rule's (small
heads and long chunks lose float32 digits first). State ``{"conv": [batch, width − 1, (1 + 2 n_h)·d_model],
"S": [batch, heads, d_h, d_h]}``.

Where ours differs on purpose: key and value widths are ``d_model`` (fla's defaults are
``head_dim = 256`` and values twice as wide) and no ``1/√d_h`` on q (the head RMSNorm that follows
makes any constant factor irrelevant); one depthwise conv over ``[q, k, v]`` with a bias (fla: three,
none); the decay initialised as our Gated DeltaNet's (Mamba-2's ``A ∈ [1, 16]``, fla draws
``A ∈ (0, 16)``). β ∈ (0, 2) (fla's default ``allow_neg_eigval``) and the gated output norm are fla's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops
from hybrids.layers import CausalConv1D, HeadNorm, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, CONV_WIDTH, Setting
from hybrids.mixers.deltanet import l2_normalize
from hybrids.mixers.kda import DPLR_IMPL, check_dplr_config, dplr_flops
from kernels.dplr import delta_rule_as_dplr, dplr, dplr_step


class GatedDeltaProduct(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"a_log", "dt_bias"})  # A and Δ's bias of the decay gate
  SETTINGS = {"chunk_size": CHUNK_SIZE, "conv_width": CONV_WIDTH, "dplr_impl": DPLR_IMPL,
              "householder_steps": Setting(2, "Householder steps per token (Gated DeltaProduct's n_h)", 1)}
  SEGMENTS = True  # packed documents: the conv reads no earlier document, the state restarts from 0

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.heads = cfg.num_heads
    self.head_dim = d // cfg.num_heads
    self.steps = cfg.householder_steps
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.dplr_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    width = (1 + 2 * self.steps) * d  # q, then n_h keys and n_h values
    self.qkv_proj = linear(cfg, d, width, rngs=rngs)
    self.conv = CausalConv1D(width, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.beta_proj = linear(cfg, d, self.steps * self.heads, rngs=rngs)
    self.alpha_proj = linear(cfg, d, self.heads, rngs=rngs)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, math.log(1e-3), math.log(0.1)))
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus⁻¹(Δ)
    a = jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, 1.0, 16.0)
    self.a_log = nnx.Param(jnp.log(a).astype(param_dtype))
    self.g_proj = linear(cfg, d, d, rngs=rngs)
    self.norm = HeadNorm(self.heads, self.head_dim, rms=True, param_dtype=param_dtype)
    self.o_proj = linear(cfg, d, d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int
    check_dplr_config(cfg)
    check_int(cfg.householder_steps, "model.householder_steps", 1, note=" (Householder steps per token)")

  def _inputs(self, qkv, x):
    """Conv output ``[..., (1 + 2 n_h)·d_model]`` and ``x [..., d_model]`` → per sub-step ``[..., n_h, heads,
    d_h]`` f32: queries (``q_t`` on the last sub-step, 0 elsewhere), keys ``β k``, values, ``a``, ``b``,
    and the log-decay ``[..., n_h, heads]`` (``log α_t`` on the first sub-step, 0 elsewhere)."""
    qkv = jax.nn.silu(qkv.astype(jnp.float32))
    d = self.heads * self.head_dim
    q = l2_normalize(rearrange(qkv[..., :d], "... (h e) -> ... h e", h=self.heads))
    k = l2_normalize(rearrange(qkv[..., d:(1 + self.steps) * d], "... (n h e) -> ... n h e", n=self.steps,
                               h=self.heads))
    v = rearrange(qkv[..., (1 + self.steps) * d:], "... (n h e) -> ... n h e", n=self.steps, h=self.heads)
    beta = 2.0 * jax.nn.sigmoid(rearrange(self.beta_proj(x).astype(jnp.float32), "... (n h) -> ... n h",
                                          n=self.steps))
    dt = jax.nn.softplus(self.alpha_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    log_alpha = -dt * jnp.exp(self.a_log[...].astype(jnp.float32))  # [..., heads], ≤ 0
    first = (jnp.arange(self.steps) == 0)[:, None]  # [n_h, 1]
    log_decay = jnp.where(first, log_alpha[..., None, :], 0.0)  # [..., n_h, heads]
    last = (jnp.arange(self.steps) == self.steps - 1)[:, None, None]  # [n_h, 1, 1]
    queries = jnp.where(last, q[..., None, :, :], 0.0)
    keys, a, b = delta_rule_as_dplr(k, beta, log_decay)
    return queries, keys, v, a, b, log_decay

  def _out(self, o, x):
    """Kernel output ``[..., heads, d_h]`` → ``[..., d_model]``."""
    o = rearrange(self.norm(o.astype(jnp.float32)), "... h d -> ... (h d)")
    return self.o_proj((jax.nn.silu(self.g_proj(x).astype(jnp.float32)) * o).astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    qkv, conv_state = self.conv(self.qkv_proj(x), return_state=True, segment_ids=segment_ids)
    inputs = self._inputs(qkv, x)
    # Token t's sub-steps are positions t·n_h … t·n_h + n_h − 1 of one sequence n_h times as long.
    q, keys, v, a, b, log_decay = (rearrange(z, "b t n ... -> b (t n) ...") for z in inputs)
    expanded_ids = None if segment_ids is None else jnp.repeat(segment_ids, self.steps, axis=1)
    o, state = dplr(q, keys, v, a, b, log_decay, segment_ids=expanded_ids, chunk_size=self.chunk_size,
                    impl=self.impl)
    y = self._out(rearrange(o, "b (t n) h e -> b t n h e", n=self.steps)[:, :, -1], x)
    return (y, {"conv": conv_state, "S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch),
            "S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)}

  def step(self, x_t, state):
    qkv, conv_state = self.conv.step(self.qkv_proj(x_t), state["conv"])
    q, keys, v, a, b, log_decay = self._inputs(qkv, x_t)
    s = state["S"]
    for j in range(self.steps):
      o, s = dplr_step(q[:, j], keys[:, j], v[:, j], a[:, j], b[:, j], log_decay[:, j], s)
    return self._out(o, x_t), {"conv": conv_state, "S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.dplr`` form over the ``n_h``-times-longer sequence (chunks of
    ``chunk_size`` sub-steps) with a per-head decay (``d_k = d_v = d_h``), ``n_h`` sub-steps a token."""
    per_step = dplr_flops(self.heads, self.head_dim, self.head_dim, self.chunk_size, seq_len * self.steps,
                          per_key_decay=False)
    return Flops(recurrence=self.steps * per_step)
