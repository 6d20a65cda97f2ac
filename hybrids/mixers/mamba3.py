"""Mamba-3: exponential-trapezoidal discretisation, a complex-valued state as data-dependent rotary
embeddings of B and C, and optional MIMO.

Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu 2026, "Mamba-3: Improved Sequence Modeling using State
Space Principles" (ICLR 2026, arXiv 2603.15569); the released module is ``mamba_ssm/modules/mamba3.py``
of github.com/state-spaces/mamba, whose reference recurrences (``tests/ops/triton/test_mamba3_siso.py``,
``tests/ops/tilelang/test_mamba3_mimo.py``) fix the details the paper leaves open
(``tests/test_peer_b.py`` checks this mixer, SISO and MIMO, both faces, states, gradients and packed
documents, against that module at commit e9594ce with its kernels replaced by those references,
through a committed fixture). Per token, with
``R = model.mamba3_mimo_rank`` (1: SISO), heads ``h`` of ``P = d_inner / num_heads`` channels and
state size ``N = model.d_state``:

    [z, x, B, C, Δ̃, Ã, λ̃, θ̃] = W_in u_t     (B, C: R × N, shared by the heads; Δ̃, Ã, λ̃: one per head;
                                               θ̃: M = ⌊N · rope_fraction⌋ // 2 angles, shared by the heads)
    Δ_t = softplus(Δ̃ + b_Δ),  A_t = −max(f(Ã), 10⁻⁴),  λ_t = σ(λ̃)      f(a) = 1 + a (a ≥ 0), 1/(1 − a) (a < 0)
    B_{t,r} = RMSNorm(B) + b_B[h, r],  C_{t,r} = RMSNorm(C) + b_C[h, r]  (BC norm; biases start at 1)
    φ_t = (φ_{t−1} + Δ_t · π tanh(θ̃_t)) mod 2π                           (per head, M angles)
    k_{t,r} = Rot(φ_t) B_{t,r},  q_{t,r} = Rot(φ_t) C_{t,r}              (pairs (2i, 2i+1), i < M, rotated)
    v_{t,r} = x_t ⊙ w_x[h, r]                                            (SISO: v = x)
    α_t = exp(Δ_t A_t),  β_t = (1 − λ_t) Δ_t α_t,  γ_t = λ_t Δ_t
    S_t = α_t S_{t−1} + β_t Σ_r k_{t−1,r} v_{t−1,r}ᵀ + γ_t Σ_r k_{t,r} v_{t,r}ᵀ   (state N × P per head)
    y_{t,r} = (S_tᵀ q_{t,r} + D_h v_{t,r}) ⊙ SiLU(z_t ⊙ w_z[h, r])
    out_t = W_out Σ_r w_o[h, r] ⊙ y_{t,r}                                  (SISO: W_out y_t)

Trapezoid: ``β`` weighs the previous token's input, ``γ`` the current one's; λ = 1 is Mamba-2's
exponential-Euler rule. Complex state: a complex diagonal transition ``α_t e^{−iΔ_t θ_t}`` (this
file's sign of rotation) on the M rotated pairs of ``S`` equals the real recurrence above on
``Rot(φ)``-rotated keys and queries (the "RoPE trick"; ``tests/test_mamba3.py`` checks the two
against each other). MIMO: the state takes a rank-R update ``Σ_r k_r v_rᵀ`` per token and is read
by R queries, more FLOPs per byte of state at decode. There is no short convolution: the paper finds
it redundant next to the trapezoid's two-tap input and the B/C biases.

Parallel face: ``kernels.gla`` with the per-head scalar log-decay ``Δ_t A_t``. Unrolling,
``S_t = Σ_{s≤t} (Π_{s<u≤t} α_u) (γ_s + [s<t] β'_{s+1}) Σ_r k_{s,r} v_{s,r}ᵀ`` with
``β'_{s+1} = (1 − λ_{s+1}) Δ_{s+1}`` (the α of β is the decay of step s+1), so the keys are scaled by
``γ_s + β'_{s+1}`` (``β'`` is 0 after a document's last token and the row's) and the diagonal pair
``s = t``, which must carry ``γ_t`` alone, is corrected token by token. MIMO runs the chunked kernel
over R sub-steps per token (time ``T·R``; the decay on the first, keys ``k_{t,r}`` on each, queries
``q_{t,r}``), so a query misses its own token's later sub-steps ``r' > r``; the same per-token
correction adds them: ``y_{t,r} += Σ_{r'} ([r' > r](γ_t + β'_{t+1}) − β'_{t+1}) (q_{t,r}·k_{t,r'}) v_{t,r'}``.
Each GLA chunk of ``model.chunk_size`` sub-steps holds ``chunk_size / R`` tokens.

Packed documents (``segment_ids``): at a start the state, the previous token's term (``β'`` of the
last token before it is 0) and the cumulative angle ``φ`` all restart.

Decode state: ``{"S": f32 [batch, heads, N, P], "angle": f32 [batch, heads, M] (φ in [0, 2π)),
"k": f32 [batch, heads, R, N] (the last rotated keys), "v": f32 [batch, heads, R, P]}``.

Where this differs from the paper and the released code:
- heads: ``model.num_heads`` heads of ``d_inner / num_heads`` channels (the release fixes
  ``headdim = 64``); one B/C group (the release's default ``ngroups = 1``);
- A: the release's current heavy-tail activation ``f`` (state-spaces/mamba c69aaab, a stability fix
  after publication); the first release used softplus;
- rotation pairs: adjacent channels ``(2i, 2i+1)`` for SISO and MIMO (the release's MIMO kernel pairs
  ``i`` with ``i + N/2``: a fixed permutation of the state channels, the same model family, which the
  peer fixture applies to the B/C weights to match the release exactly);
  ``rope_fraction`` any value in (0, 1] (the release allows 0.5 and 1);
- no RMSNorm before ``W_out`` (the release's default ``is_outproj_norm=False``; its option is not offered);
- kernels: ``kernels.gla`` with the trapezoid folded into the keys and a per-token correction, MIMO as
  sub-steps of time (the release has dedicated Triton/TileLang/CuTe kernels);
- weight decay: ``b_B``, ``b_C`` (``b_bias``, ``c_bias``) are exempt besides ``b_Δ`` and ``D`` (the
  release marks only ``dt_bias`` and ``D``): decaying them toward 0 removes B and C's data-independent
  part, a different model; the MIMO weights ``w_x, w_z, w_o`` are decayed as in the release;
- initialisation: projections as every mixer's here (``nnx.Linear``'s LeCun normal), not PyTorch's;
  ``b_Δ`` as Mamba-2 (Δ log-uniform in [10⁻³, 0.1]), ``D = 1``, biases 1, ``w_x = w_o = 1/R``,
  ``w_z = 1`` as the release;
- the decode state keeps ``k, v`` in float32 (the release: the model dtype) and ``S`` as N × P.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybrids.cost import Flops, gla_flops
from hybrids.layers import document_starts, dtype_of, linear
from hybrids.mixers.contract import CHUNK_SIZE, D_STATE, SSM_EXPAND, Setting
from kernels.gla import gla

A_FLOOR = 1e-4  # the release's A_floor: every head decays at least this fast per unit Δ
TWO_PI = 2.0 * math.pi


def heavy_tail(a):
  """``1 + a`` for ``a ≥ 0``, ``1 / (1 − a)`` below: positive, continuous, slow to vanish as a → −∞."""
  return jnp.maximum(a, 0.0) + 1.0 / (1.0 - jnp.minimum(a, 0.0))


def wrap_angle(angle):
  """``angle mod 2π`` in [0, 2π) (its gradient is 1)."""
  return angle - TWO_PI * jnp.floor(angle / TWO_PI)


def cumulative_angles(steps, starts=None):
  """``φ_t = (φ_{t−1} + steps_t) mod 2π`` along axis 1, restarting from 0 where ``starts`` is True.

  ``steps: f32 [batch, time, heads, angles]``, ``starts: bool [batch, time]`` or None. An associative
  scan that wraps every partial sum, so no sum outgrows [0, 2π) and precision does not decay with time."""
  if starts is None:
    return jax.lax.associative_scan(lambda a, b: wrap_angle(a + b), wrap_angle(steps), axis=1)

  def combine(left, right):
    restart_l, angle_l = left
    restart_r, angle_r = right
    return restart_l | restart_r, jnp.where(restart_r, angle_r, wrap_angle(angle_l + angle_r))

  flags = jnp.broadcast_to(starts[:, :, None, None], steps.shape)
  return jax.lax.associative_scan(combine, (flags, wrap_angle(steps)), axis=1)[1]


def rotate(x, angle):
  """Rotates channel pairs ``(2i, 2i+1)``, ``i < M``, of ``x: [..., N]`` by ``angle: [..., M]`` (broadcast
  over ``x``'s leading axes); channels ``2M..N−1`` pass unchanged."""
  pairs = angle.shape[-1]
  head = rearrange(x[..., :2 * pairs], "... (m two) -> ... m two", two=2)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  first = head[..., 0] * cos - head[..., 1] * sin
  second = head[..., 0] * sin + head[..., 1] * cos
  rotated = rearrange(jnp.stack([first, second], axis=-1), "... m two -> ... (m two)")
  return jnp.concatenate([rotated, x[..., 2 * pairs:]], axis=-1)


def rope_angles(d_state: int, rope_fraction: float) -> int:
  """M: how many channel pairs of the state rotate (the release's ``num_rope_angles``)."""
  return int(d_state * rope_fraction) // 2


class Mamba3(nnx.Module):
  NO_WEIGHT_DECAY = frozenset({"dt_bias", "d_skip", "b_bias", "c_bias"})  # b_Δ, D, B's and C's biases
  SETTINGS = {
      "d_state": D_STATE,
      "ssm_expand": SSM_EXPAND,
      "chunk_size": CHUNK_SIZE,
      "mamba3_rope_fraction": Setting(0.5, "Mamba-3: fraction of the state channels rotated (complex); in (0, 1]",
                                      0, lo_open=True),
      "mamba3_mimo_rank": Setting(1, "Mamba-3: MIMO rank R (1: SISO)", 1),
  }
  SEGMENTS = True  # packed documents: the state, the trapezoid's previous-token term and the angles restart

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.d_inner = int(cfg.ssm_expand * cfg.d_model)
    self.heads = cfg.num_heads
    self.head_dim = self.d_inner // self.heads
    self.d_state = cfg.d_state
    self.rank = cfg.mamba3_mimo_rank
    self.angles = rope_angles(cfg.d_state, cfg.mamba3_rope_fraction)
    self.chunk_size, self.impl, self.dtype = cfg.chunk_size, cfg.gla_impl, dtype_of(cfg.dtype)
    param_dtype = dtype_of(cfg.param_dtype)
    bc = self.rank * self.d_state
    self.in_proj = linear(cfg, cfg.d_model, 2 * self.d_inner + 2 * bc + 3 * self.heads + self.angles, rngs=rngs)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, math.log(1e-3), math.log(0.1)))
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus⁻¹(Δ)
    self.d_skip = nnx.Param(jnp.ones((self.heads,), param_dtype))
    self.b_bias = nnx.Param(jnp.ones((self.heads, self.rank, self.d_state), param_dtype))
    self.c_bias = nnx.Param(jnp.ones((self.heads, self.rank, self.d_state), param_dtype))
    # The release normalises B and C in float32 (RMSNorm with a gain, eps 1e-5) before the biases.
    norm = lambda: nnx.RMSNorm(self.d_state, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    self.b_norm, self.c_norm = norm(), norm()
    if self.rank > 1:
      mimo = lambda value: nnx.Param(jnp.full((self.heads, self.rank, self.head_dim), value, param_dtype))
      self.mimo_x, self.mimo_z, self.mimo_o = mimo(1.0 / self.rank), mimo(1.0), mimo(1.0 / self.rank)
    self.out_proj = linear(cfg, self.d_inner, cfg.d_model, rngs=rngs)

  @classmethod
  def check_config(cls, cfg, *, seq_len: int) -> None:
    from hybrids.checks import check_int, check_number
    check_int(cfg.ssm_expand, "model.ssm_expand", 1, note=" (Mamba-3's inner width = ssm_expand · d_model)")
    check_int(cfg.d_state, "model.d_state", 1, note=" (Mamba-3's state size N)")
    check_int(cfg.chunk_size, "model.chunk_size", 1, note=" (chunk of the chunked linear-attention form)")
    check_int(cfg.mamba3_mimo_rank, "model.mamba3_mimo_rank", 1, note=" (Mamba-3's MIMO rank; 1: SISO)")
    check_number(cfg.mamba3_rope_fraction, "model.mamba3_rope_fraction", 0.0, 1.0, lo_open=True,
                 note=" (fraction of Mamba-3's state channels rotated)")
    if rope_angles(cfg.d_state, cfg.mamba3_rope_fraction) < 1:
      raise ValueError(f"model.mamba3_rope_fraction={cfg.mamba3_rope_fraction} of model.d_state={cfg.d_state} "
                       "rotates no channel pair: Mamba-3 needs int(d_state · rope_fraction) ≥ 2")
    d_inner = int(cfg.ssm_expand * cfg.d_model)
    if cfg.num_heads <= 0 or d_inner % cfg.num_heads:
      raise ValueError(f"model.num_heads={cfg.num_heads} must be positive and divide Mamba-3's inner width "
                       f"model.ssm_expand·d_model={d_inner}")

  # ------------------------------------------------------------------------------------- shared

  def _inputs(self, u):
    """``u: [..., d_model]`` → the per-token quantities of the module docstring, f32, before rotation:
    ``z, x [..., heads, P]``, ``b, c [..., R, heads, N]`` (biased), ``dt, log_decay, lam [..., heads]``,
    ``angle_step [..., heads, M]`` (``Δ_t · π tanh θ̃_t``)."""
    proj = self.in_proj(u).astype(jnp.float32)
    bc = self.rank * self.d_state
    widths = (self.d_inner, self.d_inner, bc, bc, self.heads, self.heads, self.heads)
    z, x, b, c, dt, a, lam, theta = jnp.split(proj, list(itertools.accumulate(widths)), axis=-1)
    heads = lambda t: rearrange(t, "... (h p) -> ... h p", h=self.heads)
    by_rank = lambda t, norm, bias: (norm(rearrange(t, "... (r n) -> ... r n", r=self.rank))[..., None, :]
                                     + jnp.swapaxes(bias[...].astype(jnp.float32), 0, 1))  # [..., R, heads, N]
    dt = jax.nn.softplus(dt + self.dt_bias[...].astype(jnp.float32))
    log_decay = -dt * jnp.maximum(heavy_tail(a), A_FLOOR)
    angle_step = dt[..., None] * (math.pi * jnp.tanh(theta))[..., None, :]
    return (heads(z), heads(x), by_rank(b, self.b_norm, self.b_bias), by_rank(c, self.c_norm, self.c_bias),
            dt, log_decay, jax.nn.sigmoid(lam), angle_step)

  def _values(self, x):
    """``x [..., heads, P]`` → ``v [..., R, heads, P]`` (MIMO's up-projection; SISO: x)."""
    if self.rank == 1:
      return x[..., None, :, :]
    return x[..., None, :, :] * jnp.swapaxes(self.mimo_x[...].astype(jnp.float32), 0, 1)

  def _out(self, y, v, z):
    """``y, v [..., R, heads, P]``, ``z [..., heads, P]`` → ``[..., d_model]``."""
    y = y + self.d_skip[...].astype(jnp.float32)[:, None] * v
    if self.rank == 1:
      y = y[..., 0, :, :] * jax.nn.silu(z)
    else:
      gate = jax.nn.silu(z[..., None, :, :] * jnp.swapaxes(self.mimo_z[...].astype(jnp.float32), 0, 1))
      y = jnp.einsum("...rhp,rhp->...hp", y * gate, jnp.swapaxes(self.mimo_o[...].astype(jnp.float32), 0, 1))
    return self.out_proj(rearrange(y, "... h p -> ... (h p)").astype(self.dtype))

  # ------------------------------------------------------------------------------------- faces

  def __call__(self, u, *, return_state: bool = False, max_len: int | None = None, segment_ids=None):
    """Parallel face. ``u: [batch, time, d_model]``; ``segment_ids: int [batch, time]`` (optional):
    packed documents, each run as if alone (the state is the last document's)."""
    batch, time, _ = u.shape
    z, x, b, c, dt, log_decay, lam, angle_step = self._inputs(u)
    starts = None if segment_ids is None else document_starts(segment_ids)
    angle = cumulative_angles(angle_step, starts)  # [batch, time, heads, M]
    k, q = rotate(b, angle[:, :, None]), rotate(c, angle[:, :, None])  # [batch, time, R, heads, N]
    v = self._values(x)  # [batch, time, R, heads, P]
    gamma = lam * dt
    # β'_{t+1} = (1 − λ_{t+1}) Δ_{t+1}: weighs token t's input in the next step; 0 after the row's last
    # token (the returned state must hold γ_T alone there) and before a document start (the next
    # document never reads this one; the kernel's document masks drop that pair too).
    prev_weight = jnp.pad(((1.0 - lam) * dt)[:, 1:], ((0, 0), (0, 1), (0, 0)))
    if starts is not None:
      prev_weight = jnp.where(jnp.pad(starts[:, 1:], ((0, 0), (0, 1)))[..., None], 0.0, prev_weight)
    key_scale = gamma + prev_weight  # [batch, time, heads]

    sub_steps = lambda t: rearrange(t, "b t r ... -> b (t r) ...")
    first = jnp.arange(self.rank) == 0  # the token's decay acts on its first sub-step only
    decay = jnp.where(first[None, None, :, None], log_decay[:, :, None], 0.0)
    ids = None if segment_ids is None else jnp.repeat(segment_ids, self.rank, axis=1)
    y, state = gla(sub_steps(q), sub_steps(k * key_scale[:, :, None, :, None]), sub_steps(v), sub_steps(decay),
                   segment_ids=ids, chunk_size=self.chunk_size, impl=self.impl)
    y = rearrange(y.astype(jnp.float32), "b (t r) h p -> b t r h p", r=self.rank)
    # Per-token correction (module docstring): the diagonal carries γ_t alone, and MIMO's query r also
    # reads its token's later sub-steps r' > r.
    later = jnp.arange(self.rank)[None, :] > jnp.arange(self.rank)[:, None]  # [r, r']
    weight = (jnp.where(later, 1.0, 0.0)[None, None, None] * key_scale[..., None, None]
              - prev_weight[..., None, None])  # [batch, time, heads, r, r']
    scores = jnp.einsum("btrhn,btshn->bthrs", q, k) * weight
    y = y + jnp.einsum("bthrs,btshp->btrhp", scores, v)
    out = self._out(y, v, z)
    if not return_state:
      return out
    return out, {"S": state, "angle": angle[:, -1], "k": jnp.swapaxes(k[:, -1], 1, 2),
                 "v": jnp.swapaxes(v[:, -1], 1, 2)}

  def init_state(self, batch: int, *, max_len: int | None = None):
    zeros = lambda *shape: jnp.zeros((batch, self.heads) + shape, jnp.float32)
    return {"S": zeros(self.d_state, self.head_dim), "angle": zeros(self.angles),
            "k": zeros(self.rank, self.d_state), "v": zeros(self.rank, self.head_dim)}

  def step(self, u_t, state):
    """``u_t: [batch, d_model]``; ``state``: :meth:`init_state`'s dict."""
    z, x, b, c, dt, log_decay, lam, angle_step = self._inputs(u_t)
    angle = wrap_angle(state["angle"] + angle_step)  # [batch, heads, M]
    k = jnp.swapaxes(rotate(b, angle[:, None]), 1, 2)  # [batch, heads, R, N]
    q = jnp.swapaxes(rotate(c, angle[:, None]), 1, 2)
    v = jnp.swapaxes(self._values(x), 1, 2)  # [batch, heads, R, P]
    alpha = jnp.exp(log_decay)
    beta, gamma = (1.0 - lam) * dt * alpha, lam * dt
    outer = lambda keys, values: jnp.einsum("bhrn,bhrp->bhnp", keys, values)
    s = (alpha[..., None, None] * state["S"] + beta[..., None, None] * outer(state["k"], state["v"])
         + gamma[..., None, None] * outer(k, v))
    y = jnp.swapaxes(jnp.einsum("bhrn,bhnp->bhrp", q, s), 1, 2)  # [batch, R, heads, P]
    return self._out(y, jnp.swapaxes(v, 1, 2), z), {"S": s, "angle": angle, "k": k, "v": v}

  def flops(self, seq_len: int) -> Flops:
    """Per token: the chunked ``kernels.gla`` form over ``R`` sub-steps a token (keys ``B``, ``N``; values
    ``v``, head dim), the per-token ``R × R`` correction (scores and their values), the rotations of
    ``R`` keys and queries, and MIMO's up- and down-projections."""
    n, p, r, h = self.d_state, self.head_dim, self.rank, self.heads
    chunked = r * gla_flops(h, n, p, self.chunk_size, seq_len * r)
    correction = h * r * r * (2.0 * n + 2.0 * p)
    rotations = 2 * r * h * self.angles * 6.0
    mimo = 0.0 if r == 1 else 3 * 2.0 * r * h * p
    return Flops(recurrence=chunked + correction + rotations + mimo)
