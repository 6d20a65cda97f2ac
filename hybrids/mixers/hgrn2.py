"""HGRN2: a gated linear RNN whose state is expanded by an outer product.

Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion" (arXiv 2404.07904), as
flash-linear-attention's ``HGRN2Attention`` implements it (fla is co-maintained by one of the paper's
authors; the paper's own ``Hgru2`` differs in details: σ on q, SiLU on v, LayerNorm, biases). Per
head, with ``d_k = d_v = d_model / num_heads`` (the paper's expand ratio):

    f_t = γ + (1 − γ) ⊙ σ(W_f x_t)                 forget gate, ∈ (γ, 1), per key channel
    k_t = 1 − f_t                                   input gate tied to the forget gate
    q_t = swish(W_q x_t) / √d_k,  v_t = W_i x_t
    S_t = diag(f_t) S_{t−1} + k_t v_tᵀ              the outer product expands the state to d_k × d_v
    o_t = S_tᵀ q_t,   y_t = W_o RMSNorm(o_t)        (RMSNorm over all heads' outputs together)

The recurrence is ``kernels.gla`` with the per-key-channel log-decay
``log f_t = logaddexp(log γ, log(1 − γ) + log σ(W_f x_t))`` (never forms ``f`` before its log).
There is no separate output gate: HGRN1's output gate became the query ``q_t``.

Lower bound γ. HGRN (and fla's HGRN2 model) share one table ``Γ [n_layers, channels]`` across the
stack and give layer ``l`` the bound ``γ_l = Σ_{1≤i≤l} softmax_layers(Γ)_i`` (0 for the first layer,
rising with depth, ``l / n_layers`` at initialisation). A mixer here is built from the model config
alone and knows neither its index nor which other layers are HGRN2 (in a hybrid pattern the
"HGRN2 depth" is not even defined), so each layer learns its own bound instead:
``γ = σ(β)``, ``β: [d_model]`` one per key channel, initialised at ``model.hgrn2_lower_bound``
(0.5: the mean of fla's initial ``l / n_layers`` over a deep stack; 0: no bound and no ``β``, fla's
``use_lower_bound=False``). The depth-monotone coupling of the layers' bounds is what this leaves out.

Also left out: fla's optional short convolutions on q, f, i (off by default there). Parameters start
as every mixer's here (``nnx.Linear``'s LeCun normal), not fla's normal(0.02).

State ``[batch, heads, d_k, d_v]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, Setting
from kernels.gla import gla, gla_step


class HGRN2(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"lower_bound"})  # β of the forget gate's lower bound (1-D: documents intent)
  SEGMENTS = True  # packed documents: the state restarts from 0 at each start (kernels.gla)
  SETTINGS = {
      "hgrn2_lower_bound": Setting(0.5, "HGRN2: initial learned lower bound of the forget gate, in [0, 1); "
                                        "0: none", 0.0),
      "chunk_size": CHUNK_SIZE,
  }

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.heads = cfg.num_heads
    self.head_dim = cfg.d_model // cfg.num_heads  # d_k = d_v: the expand ratio
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    width = self.heads * self.head_dim
    self.q_proj = linear(cfg, cfg.d_model, width, rngs=rngs)
    self.f_proj = linear(cfg, cfg.d_model, width, rngs=rngs)
    self.i_proj = linear(cfg, cfg.d_model, width, rngs=rngs)
    bound = float(cfg.hgrn2_lower_bound)
    self.lower_bound = (nnx.Param(jnp.full((width,), math.log(bound / (1.0 - bound)), dtype_of(cfg.param_dtype)))
                        if bound > 0 else None)
    # fla keeps this norm in float32 whatever the compute dtype.
    self.norm = nnx.RMSNorm(width, epsilon=1e-6, dtype=jnp.float32, param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)
    self.o_proj = linear(cfg, width, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int, check_number
    check_number(cfg.hgrn2_lower_bound, "model.hgrn2_lower_bound", 0.0, 1.0, hi_open=True,
                 note=" (HGRN2's initial forget-gate lower bound; 0: none)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
    if cfg.num_heads <= 0 or cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must be positive and divide model.d_model={cfg.d_model} "
                       "(HGRN2's expand ratio is d_model / num_heads)")

  def log_forget(self, f_logits):
    """``W_f x [..., heads·d_k]`` → ``log f = log(γ + (1 − γ) σ(W_f x))`` (f32, same shape), ≤ 0."""
    log_f = jax.nn.log_sigmoid(f_logits.astype(jnp.float32))
    if self.lower_bound is None:
      return log_f
    beta = self.lower_bound[...].astype(jnp.float32)
    return jnp.logaddexp(jax.nn.log_sigmoid(beta), jax.nn.log_sigmoid(-beta) + log_f)

  def _inputs(self, x):
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    log_f = split(self.log_forget(self.f_proj(x)))
    q = split(jax.nn.swish(self.q_proj(x)).astype(jnp.float32)) / math.sqrt(self.head_dim)
    k = (-jnp.expm1(log_f)).astype(self.dtype)  # 1 − f, without cancelling when f is near 1
    return q, k, split(self.i_proj(x)), log_f

  def _out(self, o):
    return self.o_proj(self.norm(rearrange(o.astype(jnp.float32), "... h d -> ... (h d)")).astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    q, k, v, log_f = self._inputs(x)
    o, state = gla(q, k, v, log_f, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(o)
    return (y, {"S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    """``{"S": f32 [batch, heads, d_k, d_v]}``; ``max_len`` is ignored."""
    return {"S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)}

  def step(self, x_t, state):
    """Recurrent face. ``x_t: [batch, d_model]`` → ``(y_t [batch, d_model], new state)``."""
    q, k, v, log_f = self._inputs(x_t)
    o, s = gla_step(q, k, v, log_f, state["S"])
    return self._out(o), {"S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.gla`` form with a per-key decay."""
    return Flops(recurrence=gla_flops(self.heads, self.head_dim, self.head_dim, self.chunk_size, seq_len,
                                      per_key_decay=True))
