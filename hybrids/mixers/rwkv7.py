"""RWKV-7 ("Goose") time mixing: the generalized delta rule with a vector decay, an in-context learning
rate and separate removal and replacement keys.

Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution" (arXiv 2503.14456); the
authors' ``RWKV-LM/RWKV-v7`` training code and fla's ``RWKV7Attention``.

    x̄_t = x_{t−1}  (0 at the start),  x_• = x_t + (x̄_t − x_t) ⊙ μ_•      token shift, • ∈ {r, w, k, v, a, g}
    r_t = W_r x_r,  k_t = W_k x_k,  v_t = W_v x_v
    log w_t = −e^{−1/2} · σ(w_0 + tanh(x_w W_w↓) W_w↑)               decay per key channel, w ∈ (0.545, 1)
    a_t = σ(a_0 + x_a W_a↓ W_a↑)                                      in-context learning rate, per channel
    g_t = σ(x_g W_g↓) W_g↑                                            output gate
    κ̂_t = L2Norm_h(k_t ⊙ ξ)                                           removal key (unit per head)
    k̃_t = k_t ⊙ (1 + (a_t − 1) ⊙ ζ)                                   replacement key
    S_t = (Diag(w_t) − (a_t ⊙ κ̂_t) κ̂_tᵀ) S_{t−1} + k̃_t v_tᵀ          per head, S ∈ R^{d_h × d_h}
    o_t = GroupNorm_h(S_tᵀ r_t) + (Σ_i r_ti k̃_ti ρ_hi) v_t              the bonus: the current token's own pair
    y_t = W_o (o_t ⊙ g_t)

The paper writes the state transposed, ``wkv_t = wkv_{t−1} (diag(w_t) − κ̂_tᵀ (a_t ⊙ κ̂_t)) + v_tᵀ k̃_t``:
the state is read with ``κ̂`` (what it holds under the removal key) and that reading is removed along
``a ⊙ κ̂``, so in ``kernels.dplr``'s ``Diag(α) − a bᵀ`` the rank-one part is ``a = a_t ⊙ κ̂_t`` and
``b = κ̂_t`` (the RWKV kernels and fla pass the same as ``a = −κ̂, b = κ̂ ⊙ a_t`` of ``wkv (Diag(w) + aᵀ b)``);
the keys are ``k̃``. With ``a_t = 1`` the old value under ``κ̂`` is fully replaced (the delta rule at
β = 1), with ``a_t → 0`` it is kept (gated linear attention). (RWKV's channel mixing is the block's
MLP here.) State: the last input ``[batch, d_model]`` and ``S [batch, heads, d_h, d_h]``.

Initialisation as the authors' for a layer in the middle of the stack (the mixer does not know its
depth: ``layer_id / (n_layer − 1) = 1 − layer_id / n_layer = 0.5``): the token-shift ramps, the
decay base ``w_0`` (the −6…0 ramp plus the per-head zigzag), ``a_0``, ``ξ = 0.71 − 0.1·linear``,
``ζ = 1.02``, ``ρ = −0.04``, the LoRA down-projections at 0 and the up-projections orthogonal × 0.1,
``W_r, W_v ~ U(±0.5/√d)``, ``W_k ~ U(±0.05/√d)``; LoRA ranks ``max(32, round(2.5√d/32)·32)`` (decay,
learning rate) and ``max(32, round(5√d/32)·32)`` (gate).

Where ours differs on purpose: no value residual (the authors' layers after the first mix in the first
layer's values, ``v ← v + (v_first − v) σ(…)``: a cross-layer input the block structure does not
pass); ``W_o`` starts at the model's default init (the authors zero it, which would make the mixer
the zero function at initialisation); the per-head GroupNorm has a gain and no bias, at eps
``1e-5·d_h`` (fla's; the authors' 64e-5 at d_h = 64); the LoRA matrices are decayed like every other
matrix (as our RWKV-6).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops
from hybrids.layers import HeadNorm, document_starts, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE
from hybrids.mixers.deltanet import l2_normalize
from hybrids.mixers.kda import DPLR_IMPL, check_dplr_config, dplr_flops
from kernels.dplr import dplr, dplr_step

BRANCHES = 6  # token-shift mixes: r, w, k, v, a, g
DECAY_SCALE = math.exp(-0.5)  # log w ∈ (−e^{−1/2}, 0): the authors' soft clamp of the decay


def lora_rank(d_model: int, factor: float) -> int:
  """The authors' LoRA widths: ``max(32, round(factor·√d / 32)·32)``."""
  return max(32, int(round(factor * math.sqrt(d_model) / 32) * 32))


class RWKV7(nnx.Module):
  # Token-shift mixes, decay and learning-rate bases, removal-key scale, replacement mix, bonus ρ.
  NO_WEIGHT_DECAY = frozenset({"mu", "w0", "a0", "removal_scale", "replacement_mix", "bonus"})
  SETTINGS = {"chunk_size": CHUNK_SIZE, "dplr_impl": DPLR_IMPL}
  # Packed documents: the token shift reads 0 (not the previous document's last token) at a start,
  # and the state restarts from 0 there.
  SEGMENTS = True

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.heads = cfg.num_heads
    self.head_dim = d // cfg.num_heads
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.dplr_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    # The authors' per-channel ramps, for a layer in the middle of the stack (module docstring).
    depth, shallowness = 0.5, 0.5  # layer_id / (n_layer − 1), 1 − layer_id / n_layer
    n = jnp.arange(d, dtype=jnp.float32)
    ramp = n / d
    lin = n / max(d - 1, 1) - 0.5
    half = max(self.head_dim - 1, 1) / 2
    zigzag = ((n % self.head_dim) - half) / half
    zigzag = zigzag * jnp.abs(zigzag)
    powers = jnp.asarray([0.2, 0.9, 0.7, 0.7, 0.9, 0.2]) * shallowness  # r, w, k, v, a, g
    self.mu = nnx.Param((1.0 - ramp[None, :] ** powers[:, None]).astype(param_dtype))
    w_ramp = -6.0 + 6.0 * (n / max(d - 1, 1)) ** (1.0 + depth ** 0.3)
    self.w0 = nnx.Param((w_ramp + 0.5 + 2.5 * zigzag).astype(param_dtype))
    self.a0 = nnx.Param((-0.19 + 0.3 * zigzag + 0.4 * lin).astype(param_dtype))
    self.removal_scale = nnx.Param((0.71 - 0.1 * lin).astype(param_dtype))  # ξ
    self.replacement_mix = nnx.Param(jnp.full((d,), 1.02, param_dtype))  # ζ
    self.bonus = nnx.Param(jnp.full((self.heads, self.head_dim), -0.04, param_dtype))  # ρ

    def lora(rank):
      """LoRA down (zeros) and up (orthogonal × 0.1, times √(rank/d) when wider than d), as the authors'."""
      up_scale = 0.1 * (math.sqrt(rank / d) if rank > d else 1.0)
      return (linear(cfg, d, rank, rngs=rngs, kernel_init=nnx.initializers.zeros_init()),
              linear(cfg, rank, d, rngs=rngs, kernel_init=nnx.initializers.orthogonal(scale=up_scale)))

    self.decay_down, self.decay_up = lora(lora_rank(d, 2.5))
    self.lr_down, self.lr_up = lora(lora_rank(d, 2.5))
    self.gate_down, self.gate_up = lora(lora_rank(d, 5.0))
    self.r_proj = linear(cfg, d, d, rngs=rngs, kernel_init=_centered_uniform(0.5 / math.sqrt(d)))
    self.k_proj = linear(cfg, d, d, rngs=rngs, kernel_init=_centered_uniform(0.05 / math.sqrt(d)))
    self.v_proj = linear(cfg, d, d, rngs=rngs, kernel_init=_centered_uniform(0.5 / math.sqrt(d)))
    self.norm = HeadNorm(self.heads, self.head_dim, param_dtype=param_dtype, eps=1e-5 * self.head_dim)
    self.o_proj = linear(cfg, d, d, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    check_dplr_config(cfg)

  def _inputs(self, x, x_prev):
    """``x, x_prev: [..., d]`` → the kernel's ``(r, k̃, v, a ⊙ κ̂, κ̂, log w)`` ``[..., heads, d_h]`` f32 and
    the gate ``g [..., d]``."""
    x = x.astype(jnp.float32)
    delta = x_prev.astype(jnp.float32) - x
    mu = self.mu[...].astype(jnp.float32)
    xr, xw, xk, xv, xa, xg = (x + delta * mu[i] for i in range(BRANCHES))
    cast = lambda z: z.astype(self.dtype)
    f32 = lambda z: z.astype(jnp.float32)
    split = lambda z: rearrange(z, "... (h d) -> ... h d", h=self.heads)
    r, k, v = f32(self.r_proj(cast(xr))), f32(self.k_proj(cast(xk))), f32(self.v_proj(cast(xv)))
    decay_in = f32(self.decay_up(jnp.tanh(f32(self.decay_down(cast(xw))))))
    log_decay = -DECAY_SCALE * jax.nn.sigmoid(self.w0[...].astype(jnp.float32) + decay_in)
    rate = jax.nn.sigmoid(self.a0[...].astype(jnp.float32) + f32(self.lr_up(self.lr_down(cast(xa)))))
    gate = f32(self.gate_up(jax.nn.sigmoid(f32(self.gate_down(cast(xg)))).astype(self.dtype)))
    removal = l2_normalize(split(k * self.removal_scale[...].astype(jnp.float32)))  # κ̂
    k = k * (1.0 + (rate - 1.0) * self.replacement_mix[...].astype(jnp.float32))  # k̃
    rate = split(rate)
    return split(r), split(k), split(v), rate * removal, removal, split(log_decay), gate

  def _out(self, o, r, k, v, gate):
    """Kernel output ``[..., heads, d_h]`` → ``[..., d_model]``: group norm, the bonus, the gate, ``W_o``."""
    bonus = jnp.sum(r * k * self.bonus[...].astype(jnp.float32), axis=-1, keepdims=True) * v
    o = self.norm(o.astype(jnp.float32)) + bonus
    return self.o_proj((rearrange(o, "... h d -> ... (h d)") * gate).astype(self.dtype))

  def __call__(self, x, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``x: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the token shift reads 0 at a start; the state is the last
    document's)."""
    x_prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    if segment_ids is not None:
      x_prev = jnp.where(document_starts(segment_ids)[..., None], jnp.zeros_like(x_prev), x_prev)
    r, k, v, a, b, log_decay, gate = self._inputs(x, x_prev)
    o, state = dplr(r, k, v, a, b, log_decay, segment_ids=segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    y = self._out(o, r, k, v, gate)
    # The row's last token belongs to its last document: the shift state is its input either way.
    return (y, {"shift": x[:, -1].astype(self.dtype), "S": state}) if return_state else y

  def init_state(self, batch: int, *, max_len: int | None = None):
    return {"shift": jnp.zeros((batch, self.heads * self.head_dim), self.dtype),
            "S": jnp.zeros((batch, self.heads, self.head_dim, self.head_dim), jnp.float32)}

  def step(self, x_t, state):
    r, k, v, a, b, log_decay, gate = self._inputs(x_t, state["shift"])
    o, s = dplr_step(r, k, v, a, b, log_decay, state["S"])
    return self._out(o, r, k, v, gate), {"shift": x_t.astype(self.dtype), "S": s}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.dplr`` form with a per-key-channel decay (``d_k = d_v = d_h``);
    the LoRAs are ``nnx.Linear`` layers, counted from their weights."""
    return Flops(recurrence=dplr_flops(self.heads, self.head_dim, self.head_dim, self.chunk_size, seq_len,
                                       per_key_decay=True))


def _centered_uniform(bound: float):
  """An initializer drawing ``U(−bound, bound)``."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init
