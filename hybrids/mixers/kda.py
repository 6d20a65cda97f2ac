"""Kimi Delta Attention (KDA): Gated DeltaNet with a decay per key channel.

Moonshot AI (Kimi Team) 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture"
(arXiv 2510.26692); its released layer and fla's ``KimiDeltaAttention``.

    [q, k, v]_t = SiLU(Conv1D_w(W_qkv x)_t),  q_t, k_t L2-normalised per head      (d_h = d_model / heads)
    β_t = σ(W_β x_t)                                                 write strength, one per head
    log α_t = −exp(A_log_h) · softplus(W_f↑ W_f↓ x_t + b_Δ)           decay per key channel, [heads, d_h]
    S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ
    o_t = S_tᵀ q_t
    y_t = W_o (RMSNorm_h(o_t) ⊙ σ(W_g↑ W_g↓ x_t))

A fine-grained forget gate (each key channel of the state fades at its own data-dependent rate,
where Gated DeltaNet fades a whole head at once) on top of the delta rule's key-by-key overwrite.
``W_f`` and ``W_g`` are low-rank (rank ``d_h``), as in the release. The recurrence is
``kernels.dplr`` with ``a = β k``, ``b = α ⊙ k`` and keys ``β k``
(:func:`kernels.dplr.delta_rule_as_dplr`); state ``{"conv": [batch, width − 1, 3·d_model],
"S": [batch, heads, d_h, d_h]}``.

Where ours differs on purpose: no ``1/√d_h`` on q (the head RMSNorm that follows makes any constant
factor irrelevant, as in our DeltaNet); one depthwise conv over ``[q, k, v]`` with a bias (the release's
three convs have none); ``b_Δ`` initialised as Mamba-2's and our Gated DeltaNet's ``Δ``
(``softplus(b_Δ)`` log-uniform in ``[1e-3, 0.1]`` per channel, ``A = exp(A_log) ∈ [1, 16]``), where
fla's layer starts ``b_Δ`` at 0, i.e. a memory of about one token; no output-gate bias (as the
release; fla's layer has one). The gated output RMSNorm, σ gate and low ranks are the release's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, _padding
from hybrids.layers import CausalConv1D, HeadNorm, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, CONV_WIDTH, Setting
from hybrids.mixers.deltanet import l2_normalize
from kernels.dplr import IMPLS as DPLR_IMPLS
from kernels.dplr import delta_rule_as_dplr, dplr, dplr_step, is_pallas_chunk

# The kernel field of the three kernels.dplr mixers (kda, rwkv7, gated_deltaproduct), declared alike.
DPLR_IMPL = Setting("auto", "kernels.dplr implementation: auto, xla, reference or pallas (chunk_size a power of two ≥ 16)")


def check_dplr_config(cfg) -> None:
  """The checks every ``kernels.dplr`` mixer shares: heads divide the width, a positive chunk and an
  implementation that exists; ``"pallas"`` tiles chunks of 2^n ≥ 16 (refused here, before compiling)."""
  from hybrids.checks import check_choice, check_int
  if cfg.d_model % cfg.num_heads:
    raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model}")
  check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
  check_choice(cfg.dplr_impl, "model.dplr_impl", DPLR_IMPLS)
  if cfg.dplr_impl == "pallas" and not is_pallas_chunk(cfg.chunk_size):
    raise ValueError(f"model.chunk_size={cfg.chunk_size} must be a power of two ≥ 16 with model.dplr_impl='pallas'")


def dplr_flops(heads: int, d_k: int, d_v: int, chunk: int, seq_len: int, *, per_key_decay: bool) -> float:
  """Per token, the chunked form of ``kernels.dplr`` (module docstring there), per head and chunk of
  ``c`` rows: the two pair gains ``e^{G_t − G_s}``, ``e^{G_{t−1} − G_s}`` (exponent and ``exp`` of each
  pair, ``2c²``; per key channel with a per-key decay, ``2c²K``); the four pair matrices ``M_qk, M_qa,
  M_bk, M_ba`` over the full ``c × c`` block (``2c²K`` and the product with the gain, ``c²``; ``4c²K``
  with a per-key decay: a three-factor product-sum); ``M_bk V`` (2c²V); ``(I + M_ba)⁻¹`` by
  ``2·(⌈log₂ c⌉ − 1)`` c×c matmuls; the solve ``[Ũ | W]`` (2c²(V + K)); ``K̂ᵀ V``, ``W S₀``, ``Âᵀ U``
  and ``Q S₀`` (2cKV each); ``M_qk V`` and ``M_qa U`` (2c²V each)."""
  c = chunk
  if per_key_decay:
    pairs = 2 * 2.0 * c * c * d_k + 4 * 4.0 * c * c * d_k
  else:
    pairs = 2 * 2.0 * c * c + 4 * (2.0 * c * c * d_k + c * c)
  inverse_matmuls = 2 * (max(c - 1, 1).bit_length() - 1)
  per_chunk = (pairs + 2 * c * c * d_v + inverse_matmuls * 2 * c ** 3 + 2 * c * c * (d_v + d_k)
               + 4 * 2 * c * d_k * d_v + 2 * 2 * c * c * d_v)
  return heads * per_chunk / c * _padding(chunk, seq_len)


class KimiDeltaAttention(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"a_log", "dt_bias"})  # A and Δ's bias of the decay gate
  SETTINGS = {"chunk_size": CHUNK_SIZE, "conv_width": CONV_WIDTH, "dplr_impl": DPLR_IMPL}
  SEGMENTS = True  # packed documents: the conv reads no earlier document, the state restarts from 0

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.heads = cfg.num_heads
    self.head_dim = d // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.dplr_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    self.qkv_proj = linear(cfg, d, 3 * d, rngs=rngs)
    # One depthwise conv over [q, k, v] is the release's three separate short convs.
    self.conv = CausalConv1D(3 * d, cfg.conv_width, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.beta_proj = linear(cfg, d, self.heads, rngs=rngs)
    self.decay_down = linear(cfg, d, self.head_dim, rngs=rngs)
    self.decay_up = linear(cfg, self.head_dim, d, rngs=rngs)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (d,), jnp.float32, math.log(1e-3), math.log(0.1)))
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus⁻¹(Δ)
    a = jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, 1.0, 16.0)
    self.a_log = nnx.Param(jnp.log(a).astype(param_dtype))
    self.gate_down = linear(cfg, d, self.head_dim, rngs=rngs)
    self.gate_up = linear(cfg, self.head_dim, d, rngs=rngs)
    self.norm = HeadNorm(self.heads, self.head_dim, rms=True, param_dtype=param_dtype)
    self.o_proj = linear(cfg, d, d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    check_dplr_config(cfg)

  def _inputs(self, qkv, x):
    """Conv output ``[..., 3·d_model]`` and the input ``x [..., d_model]`` → the kernel's ``(q, keys, v, a,
    b, log α)``, ``[..., heads, d_h]`` f32."""
    qkv = rearrange(jax.nn.silu(qkv.astype(jnp.float32)), "... (n h d) -> n ... h d", n=3, h=self.heads)
    q, k, v = l2_normalize(qkv[0]), l2_normalize(qkv[1]), qkv[2]
    beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
    raw = self.decay_up(self.decay_down(x)).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
    log_decay = -jax.nn.softplus(rearrange(raw, "... (h d) -> ... h d", h=self.heads)) * jnp.exp(
        self.a_log[...].astype(jnp.float32))[:, None]  # ≤ 0
    keys, a, b = delta_rule_as_dplr(k, beta, log_decay)
    return q, keys, v, a, b, log_decay

  def _out(self, o, x):
    """Kernel output ``[..., heads, d_h]`` → ``[..., d_model]``."""
    gate = jax.nn.sigmoid(self.gate_up(self.gate_down(x)).astype(jnp.float32))
    o = rearrange(self.norm(o.astype(jnp.float32)), "... h d -> ... (h d)")
    return self.o_proj((o * gate).astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    qkv, conv_state = self.conv(self.qkv_proj(x), return_state=True, segment_ids=segment_ids)
    q, keys, v, a, b, log_decay = self._inputs(qkv, x)
    o, state = dplr(q, keys, v, a, b, log_decay, segment_ids=segment_ids, chunk_size=self.chunk_size,
                    impl=self.impl)
    y = self._out(o, x)
    return (y, {"conv": conv_state, "S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"conv": self.conv.init_state(batch),
            "S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)}

  def step(self, x_t, state):
    qkv, conv_state = self.conv.step(self.qkv_proj(x_t), state["conv"])
    q, keys, v, a, b, log_decay = self._inputs(qkv, x_t)
    o, s = dplr_step(q, keys, v, a, b, log_decay, state["S"])
    return self._out(o, x_t), {"conv": conv_state, "S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.dplr`` form with a per-key-channel decay (``d_k = d_v = d_h``)."""
    return Flops(recurrence=dplr_flops(self.heads, self.head_dim, self.head_dim, self.chunk_size, seq_len,
                                       per_key_decay=True))
