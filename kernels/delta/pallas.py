"""The sequential part of the chunked delta rule as Pallas kernels (``delta_rule(impl="pallas")``), and
of the generalized delta rule (``kernels.dplr``, ``dplr(impl="pallas")``), which runs the same pass.

``kernels/delta/xla.py`` computes, for all chunks at once in XLA, the WY / UT pieces of each chunk n:
``W_n [c, d_k]``, ``Ũ_n [c, d_v]``, ``K̂_n [c, d_k]`` (keys decayed to the chunk's end) and the
chunk decay ``γ_n``; and after the pass it forms the outputs with batched einsums. What is left is a
recurrence over chunks, the only sequential work:

    entering_n = S;   U_n = Ũ_n − W_n S;   S ← Γ_n S + K̂_nᵀ U_n + X_n          (S: f32 [d_k, d_v])

``Γ_n`` is the chunk decay ``γ_n`` (one scalar per head: the delta rule) or ``Diag(γ_n)`` with one
decay per key channel (a row of the state each: the generalized delta rule), and ``X_n [d_k, d_v]`` an
optional write added each chunk (the generalized rule's ``Σ_s e^{G_C − G_s} ⊙ k_s v_sᵀ``; the delta
rule has none, its writes are inside ``U``). ``kernels/dplr`` maps its ``U = Ũ + W S``,
``S ← Γ S + X − Âᵀ U`` onto this with ``W → −W`` and ``K̂ → −Â``.

This module runs it as one Pallas kernel (:func:`state_pass`) and its backward as a second one, under a
``jax.custom_vjp``; everything around it is XLA, differentiated by JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.delta.xla import solve_cotangents, unit_lower_inverse, wy_system
from kernels.dispatch import LABELS, pallas_layout
from kernels.pallas_compat import SQUEEZED, lowered_once, mosaic_params, triton_params
from kernels.tiling import next_pow2

# ----------------------------------------------------------------------------------------------------
# Layout. Every array keeps the chunked layout kernels/delta/xla.py builds, ``[batch, chunks, heads, …]``:
# W, K̂: [b, n, h, c, d_k]; Ũ and U: [b, n, h, c, d_v]; states and X: [b, n, h, d_k, d_v]; a scalar γ
# broadcast over the value columns to [b, n, h, 1, d_v] (a row that multiplies the state's columns, so
# neither backend has to read a scalar out of a tile), a per-key-channel γ as a column [b, n, h, d_k, 1]
# (it multiplies the state's rows; the same for every value block); S_0 and the final state:
# [b, h, d_k, d_v]. No transposes.
#
# Value columns are independent: column j of S only ever meets column j of Ũ (U_n[:, j] = Ũ_n[:, j]
# − W_n S[:, j], S[:, j] ← γ S[:, j] + K̂ᵀ U_n[:, j]), and the same holds backwards. So d_v splits into
# blocks that run as separate programs: parallelism beyond batch·heads at no cost.
#
#   Triton (GPU): grid (d_v / block_v, batch·heads), block_v fastest so the programs that read the same
#     W and K̂ run together. A program holds all chunks of its head (a strided pointer) and loops over
#     them in a fori_loop with the f32 state [d_k, block_v] in registers. Tiles are powers of two ≥ 16:
#     d_k and d_v are zero-padded up (zero key columns of W and K̂ leave the padded state rows at 0;
#     zero value columns stay 0), the chunk is required to be one (kernels.delta checks).
#   Mosaic (TPU): grid (batch, heads, chunks), the chunk axis sequential ("arbitrary"); a block is one
#     chunk's (c, d_k) / (c, d_v) tile (c a multiple of 8, dims whole, so every block is legal) and the
#     state is carried in the final-state output block, which stays resident across the chunk axis
#     because its index does not depend on it.
#
# Dots: for 16-bit inputs W and K̂ are stored in that dtype and the state / U are rounded to it for the
# two dots (tensor cores, f32 accumulation); the state, U and all sums stay f32. For f32 inputs the
# dots run at IEEE f32 precision.
#
# Backward (by hand). Cotangents: dE_n of entering_n, dU_n of U_n, dS_N of the final state. Let D be
# ∂L/∂S after chunk n (the state leaving it, S_{n+1}); start D = dS_N and run n = N−1 … 0:
#     S_{n+1} = Γ_n S_n + K̂_nᵀ U_n + X_n,   U_n = Ũ_n − W_n S_n,   entering_n = S_n
#   ⇒ dU_n^tot = dU_n + K̂_n D                      (U_n reaches the loss directly and through S_{n+1})
#     dŨ_n = dU_n^tot                              dW_n  = −dU_n^tot S_nᵀ
#     dK̂_n = U_n Dᵀ                                dX_n  = D
#     dγ_n = Σ_{k,v} D ⊙ S_n  (per key channel: Σ_v)
#     D ← ∂L/∂S_n = Γ_n D − W_nᵀ dU_n^tot + dE_n   (Γ is diagonal: Γᵀ = Γ; after chunk 0: dS_0 = D)
# The D-update and dU^tot are the same recurrence as the forward with (W, K̂) swapped, the signs
# flipped and dE in the place of X, so one kernel body runs both; the reverse kernel stores D entering
# each step (∂L/∂S_{n+1}) and dU^tot, and the products that need them (dW, dK̂, dγ) are batched einsums
# in XLA, like the rest of the parallel work. A scalar γ arrives broadcast over value columns, so the
# kernel's dγ is per column (Σ_k D ⊙ S_n) and the broadcast's transpose sums it.
# ----------------------------------------------------------------------------------------------------

PallasTarget = Literal["triton", "mosaic_tpu", "mosaic"]  # "mosaic": the older name of "mosaic_tpu"
_SQ = SQUEEZED
_F32 = jnp.float32
MIN_TILE = 16  # the smallest Triton dot tile; chunks and padded dims are powers of two ≥ this


@dataclasses.dataclass(frozen=True)
class PallasConfig:
  """Launch parameters of the Triton kernels (Mosaic takes whole dims and ignores them).

  ``block_v``: value columns per program (a power of two ≥ 16; smaller gives more programs and fewer
  registers per program); ``warps`` / ``stages``: Triton launch values.
  """
  block_v: int = 64
  warps: int = 4
  stages: int = 2
  wy_warps: int = 4  # the WY kernel (one chunk per program)
  # Triton WY kernel: T by block forward substitution over blocks of this many rows (a power of two
  # ≥ 16 dividing the chunk), None = the whole chunk as one block. At C = 64 the whole-chunk form
  # spills registers; blocks of 16 keep only 16 × 16 tiles live, but the precompute took the same time
  # (kernels/BENCHMARKS.md, "Pallas WY kernel"), so the default stays the whole chunk.
  wy_block: int | None = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: a custom_vjp nondiff argument)."""
  target: str
  interpret: bool
  cfg: PallasConfig
  dot_dtype: str  # "float32" (IEEE dots) or the 16-bit input dtype (f32 accumulation)


_next_pow2 = next_pow2


def _is_pow2_tile(n: int) -> bool:
  return n >= MIN_TILE and n == _next_pow2(n)


def _dot(plan: _Plan, a, b, ca: int, cb: int):
  """Contract dim ``ca`` of 2-D ``a`` with dim ``cb`` of ``b``, f32 accumulation."""
  dtype = jnp.dtype(plan.dot_dtype)
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((ca,), (cb,)), ((), ())),
                             precision=precision, preferred_element_type=_F32)


def _step(plan: _Plan, state, x, y, a, g, add, reverse: bool):
  """One chunk on a state [d_k, bv] (f32); x, y: [c, d_k]; a: [c, bv]; g: [1, bv] (scalar decay) or
  [d_k, 1] (per key channel); add: [d_k, bv] | None.

  forward (x = W, y = K̂, a = Ũ, add = X):     rows = Ũ − W S,     S ← Γ S + K̂ᵀ rows (+ X)
  reverse (x = K̂, y = W, a = dU, add = dE):   rows = dU + K̂ D,    D ← Γ D − Wᵀ rows + dE
  Returns (rows [c, bv] f32, new state).
  """
  xs = _dot(plan, x, state, 1, 0)
  rows = a.astype(_F32) + xs if reverse else a.astype(_F32) - xs
  yr = _dot(plan, y, rows, 0, 0)
  state = state * g.astype(_F32) + (-yr if reverse else yr)
  if add is not None:
    state = state + add.astype(_F32)
  return rows, state


def _unpack(refs, added: bool):
  """(x, y, a, g, add | None, s0, states, rows, final): the reverse pass has the extra input dE, the
  forward one X where it is given."""
  refs = list(refs)
  if not added:
    refs.insert(4, None)
  return refs


def _kernel_triton(*refs, plan: _Plan, reverse: bool, added: bool, n_chunks: int):
  # x, y: [n, c, d_k]; a, rows: [n, c, bv]; g: [n, 1, bv] or [n, d_k, 1]; add, states: [n, d_k, bv];
  # s0, final: [d_k, bv]
  x_ref, y_ref, a_ref, g_ref, add_ref, s0_ref, st_ref, rows_ref, sf_ref = _unpack(refs, added)

  def body(i, state):
    n = n_chunks - 1 - i if reverse else i
    st_ref[n] = state  # the state entering chunk n (from its far side when reverse)
    add = None if add_ref is None else add_ref[n]
    rows, state = _step(plan, state, x_ref[n], y_ref[n], a_ref[n], g_ref[n], add, reverse)
    rows_ref[n] = rows
    return state

  sf_ref[...] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(_F32))


def _kernel_mosaic(*refs, plan: _Plan, reverse: bool, added: bool):
  # One chunk per step of the sequential last grid axis; the final-state block carries the state.
  x_ref, y_ref, a_ref, g_ref, add_ref, s0_ref, st_ref, rows_ref, sf_ref = _unpack(refs, added)

  @pl.when(pl.program_id(2) == 0)
  def _():
    sf_ref[...] = s0_ref[...].astype(_F32)

  state = sf_ref[...]
  st_ref[...] = state
  add = None if add_ref is None else add_ref[...]
  rows, state = _step(plan, state, x_ref[...], y_ref[...], a_ref[...], g_ref[...], add, reverse)
  rows_ref[...] = rows
  sf_ref[...] = state


def _state_call(plan: _Plan, x, y, a, g, add, s0, *, reverse: bool):
  """The sequential pass over chunks (forward, optionally with ``add`` = X, or reverse with ``add`` = dE).

  x, y: ``[b, n, h, c, d_k]``; a: ``[b, n, h, c, d_v]``; g: ``[b, n, h, 1, d_v]`` (scalar decay) or
  ``[b, n, h, d_k, 1]`` (per key channel); add: ``[b, n, h, d_k, d_v]`` or None; s0: ``[b, h, d_k,
  d_v]``. Returns (states ``[b, n, h, d_k, d_v]`` (the state entering each step), rows ``[b, n, h, c,
  d_v]``, final ``[b, h, d_k, d_v]``), all f32.
  """
  batch, n_chunks, heads, c, dk = x.shape
  dv = a.shape[-1]
  added = add is not None
  per_key = g.shape[-2:] != (1, dv)  # else [dk, 1] (where dk = dv = 1 the two blocks are one)
  out_shape = [jax.ShapeDtypeStruct((batch, n_chunks, heads, dk, dv), _F32),
               jax.ShapeDtypeStruct((batch, n_chunks, heads, c, dv), _F32),
               jax.ShapeDtypeStruct((batch, heads, dk, dv), _F32)]
  arrays = [x, y, a, g] + ([add] if added else []) + [s0]
  if plan.target == "triton":
    bv = min(plan.cfg.block_v, dv)

    def spec(rows: int, width: int, v_blocked: bool):
      """All chunks of one head: [n, rows, width] (width a d_v block when ``v_blocked``)."""
      def index(iv, bh):
        b, h = jax.lax.div(bh, jnp.int32(heads)), jax.lax.rem(bh, jnp.int32(heads))
        return b, 0, h, 0, (iv if v_blocked else 0)
      return pl.BlockSpec((_SQ, n_chunks, _SQ, rows, width), index)

    def state_index(iv, bh):
      return jax.lax.div(bh, jnp.int32(heads)), jax.lax.rem(bh, jnp.int32(heads)), 0, iv

    xy, av, sv = spec(c, dk, False), spec(c, bv, True), spec(dk, bv, True)
    gv = spec(dk, 1, False) if per_key else spec(1, bv, True)
    s_spec = pl.BlockSpec((_SQ, _SQ, dk, bv), state_index)
    in_specs = [xy, xy, av, gv] + ([sv] if added else []) + [s_spec]
    out_specs = [sv, av, s_spec]
    grid = (dv // bv, batch * heads)
    kernel = functools.partial(_kernel_triton, plan=plan, reverse=reverse, added=added, n_chunks=n_chunks)
    params = None if plan.interpret else triton_params(plan.cfg.warps, plan.cfg.stages)
  else:
    chunk = (lambda n: n_chunks - 1 - n) if reverse else (lambda n: n)
    tile = lambda rows, width: pl.BlockSpec((_SQ, _SQ, _SQ, rows, width), lambda b, h, n: (b, chunk(n), h, 0, 0))
    xy, av, sv = tile(c, dk), tile(c, dv), tile(dk, dv)
    gv = tile(dk, 1) if per_key else tile(1, dv)
    s_spec = pl.BlockSpec((_SQ, _SQ, dk, dv), lambda b, h, n: (b, h, 0, 0))
    in_specs = [xy, xy, av, gv] + ([sv] if added else []) + [s_spec]
    out_specs = [sv, av, s_spec]
    grid = (batch, heads, n_chunks)
    kernel = functools.partial(_kernel_mosaic, plan=plan, reverse=reverse, added=added)
    params = None if plan.interpret else mosaic_params(("parallel", "parallel", "arbitrary"))
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        compiler_params=params, interpret=plan.interpret,
                        name="delta_states_bwd" if reverse else "delta_states")(*arrays)


# --- the differentiable pass -------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pass(w, u_tilde, k_to_end, gamma, added, s0, plan: _Plan):
  return _pass_fwd(w, u_tilde, k_to_end, gamma, added, s0, plan)[0]


def _pass_fwd(w, u_tilde, k_to_end, gamma, added, s0, plan: _Plan):
  # W and K̂ are rounded to the dot dtype here (not before the custom_vjp) so that their cotangents
  # stay f32; the rounded copies are what the backward kernel reads.
  w_d, k_d = w.astype(plan.dot_dtype), k_to_end.astype(plan.dot_dtype)
  entering, u, final = _state_call(plan, w_d, k_d, u_tilde, gamma, added, s0, reverse=False)
  # Whether X was given travels in the residuals' tree structure (None or an empty tuple, no leaves),
  # not as a value, which JAX would turn into a traced array.
  return (entering, u, final), (w_d, k_d, gamma, None if added is None else (), entering, u)


def _pass_bwd(plan: _Plan, residuals, cotangents):
  w_d, k_d, gamma, added_marker, entering, u = residuals
  d_entering, d_u, d_final = (x.astype(_F32) for x in cotangents)
  # `leaving[n]` = D at the start of reverse step n = ∂L/∂S_{n+1}; `d_u_total` = dU^tot (see above).
  leaving, d_u_total, d_s0 = _state_call(plan, k_d, w_d, d_u, gamma, d_entering, d_final, reverse=True)
  d_w = -jnp.einsum("bnhcv,bnhkv->bnhck", d_u_total, entering)
  d_k_to_end = jnp.einsum("bnhcv,bnhkv->bnhck", u, leaving)
  # Summed to γ's shape: a row [b n h 1 v] (scalar γ, per value column) over key rows, a column
  # [b n h k 1] (per key channel) over value columns.
  broadcast = tuple(axis for axis in (-2, -1) if gamma.shape[axis] == 1)
  d_gamma = jnp.sum(leaving * entering, axis=broadcast, keepdims=True)
  return d_w, d_u_total, d_k_to_end, d_gamma, (None if added_marker is None else leaving), d_s0


_pass.defvjp(_pass_fwd, _pass_bwd)
_pass_shared = lowered_once(_pass, static_argnums=(6,))


def _pass_target(w, u_tilde, k_to_end, chunk_decay, s0, added=None, *, target: str, interpret: bool,
                 cfg: PallasConfig, dot_dtype: str):
  batch, n_chunks, heads, c, d_k = w.shape
  d_v = u_tilde.shape[-1]
  if target == "triton":  # Triton tiles: powers of two ≥ 16; zero columns change nothing (see above)
    dk, dv = max(MIN_TILE, _next_pow2(d_k)), max(MIN_TILE, _next_pow2(d_v))
  else:
    dk, dv = d_k, d_v
  last = lambda x, width: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  w, k_to_end, u_tilde = last(w, dk), last(k_to_end, dk), last(u_tilde, dv)
  if chunk_decay.ndim == 4:  # per key channel: a column that scales the state's rows (padded rows: 0)
    gamma = last(chunk_decay, dk)[..., None]
  else:
    gamma = jnp.broadcast_to(chunk_decay[..., None, None], (batch, n_chunks, heads, 1, dv))
  pad_state = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, dk - d_k), (0, dv - d_v)])
  s0 = pad_state(s0)
  added = None if added is None else pad_state(added)
  plan = _Plan(target=target, interpret=interpret, cfg=cfg, dot_dtype=dot_dtype)
  entering, u, final = _pass_shared(w, u_tilde, k_to_end, gamma, added, s0, plan)
  return entering[..., :d_k, :d_v], u[..., :d_v], final[..., :d_k, :d_v]


# --- the WY factors of every chunk ------------------------------------------------------------------------
#
# Per chunk (one program per chunk and head, all of it in registers or VMEM), with b the within-chunk
# cumulative log-decay and γ = e^{b}:
#     A = strictly_lower(β_t e^{b_t − b_s} k_t·k_s),   T = (I + A)⁻¹,   [Ũ | W] = T [β v | βγ k]
# T by the nilpotent product of unit_lower_inverse (2·log₂ c − 1 dots of c × c). The
# dots of T run as three TF32 products (Triton's tf32x3, about f32 accuracy on tensor cores; IEEE in
# the interpreter); k kᵀ takes the input dtype (bf16 products are exact in f32). The kernel also
# stores T for the backward, which is XLA (``_wy_bwd`` below): with X = T R,
#     ∂R = Tᵀ ∂X,   ∂A = −strictly_lower(∂R Xᵀ)          (kernels.delta.xla.solve_cotangents),
# then JAX transposes the XLA construction of A and R = [β v | βγ k] (kernels.delta.xla.wy_system).
# XLA's own form of this stage materialises each power of A for all chunks at once; here a chunk
# stays on chip. On an H100 (B4 T8192 H16 d128 bf16) the kernel takes 0.45 ms at C = 16; at C = 64
# it takes 2.37 ms, at 255 registers per thread and spilling its c × c products (Nsight Compute,
# kernels/BENCHMARKS.md); block substitution (``PallasConfig.wy_block``) did not make it faster.
#
# Packed documents (segment ids): the kernel takes one more input, each row's document index within
# its chunk (``doc``, int32, as a column and as a row, like b). A_ts is zero unless doc_t = doc_s, and the
# βγk rows are zero where doc_t > 0 (the entering state does not reach them); b arrives restarted at
# each document start (kernels.delta.xla._segment_chunks), so every unmasked exponent is ≤ 0 and the
# masked ones are replaced by 0 before exp. The backward applies the same masks (wy_system with doc).
# The state pass needs no mask of its own: its inputs γ_C and K̂ come masked from XLA.



def _strictly_lower(c: int):
  return jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) > jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _wy_kernel(k_ref, v_ref, b_col_ref, b_row_ref, beta_ref, *refs, plan: _Plan, block: int, segmented: bool):
  # k: [c, d_k]; v: [c, d_v] (input dtype); b_col, beta: [c, 1]; b_row: [1, c] (f32); when segmented,
  # doc_col [c, 1] and doc_row [1, c] (int32). Outputs W [c, d_k], Ũ [c, d_v], T [c, c], f32. Blocks of
  # `block` rows (see the section comment).
  doc_col_ref, doc_row_ref, w_ref, u_ref, t_ref = refs if segmented else (None, None) + refs
  c = k_ref.shape[0]
  n_blocks = c // block
  rows = lambda i: pl.ds(i * block, block)
  # T's products: tf32x3 on the GPU; IEEE f32 on TPU and in the interpreter (XLA CPU has no tf32x3).
  gpu = plan.target == "triton" and not plan.interpret
  precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if gpu else jax.lax.Precision.HIGHEST
  dot32 = lambda x, y: jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=precision,
                                           preferred_element_type=_F32)
  lower = _strictly_lower(block)

  def a_block(i, j):  # A_ij = β_t e^{b_t − b_s} k_t·k_s for rows t of block i, s of block j (i ≥ j)
    kk = _dot(plan, k_ref[rows(i), :], k_ref[rows(j), :], 1, 1)
    diff = b_col_ref[rows(i), :].astype(_F32) - b_row_ref[:, rows(j)].astype(_F32)  # ≤ 0 below the diagonal
    a = beta_ref[rows(i), :].astype(_F32) * kk
    mask = lower if i == j else None
    if segmented:  # rows of different documents: their difference of b is not a decay (may be > 0)
      same = doc_col_ref[rows(i), :] == doc_row_ref[:, rows(j)]
      mask = same if mask is None else mask & same
    if mask is None:
      return a * jnp.exp(diff)
    return jnp.where(mask, a * jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)  # masked before exp

  # Block forward substitution: T_ii = (I + A_ii)⁻¹, T_ij = −T_ii Σ_{j ≤ m < i} A_im T_mj (j < i).
  t = {}
  for i in range(n_blocks):
    t[i, i] = unit_lower_inverse(a_block(i, i), dot32)
    a_row = [a_block(i, m) for m in range(i)]
    for j in range(i):
      total = functools.reduce(jnp.add, [dot32(a_row[m], t[m, j]) for m in range(j, i)])
      t[i, j] = -dot32(t[i, i], total)
  zero = jnp.zeros((block, block), _F32)
  for i in range(n_blocks):
    for j in range(n_blocks):
      t_ref[rows(i), rows(j)] = t[i, j] if j <= i else zero
    # [Ũ | W]_i = Σ_{j ≤ i} T_ij [β v | βγ k]_j
    beta_j = lambda j: beta_ref[rows(j), :].astype(_F32)

    def k_scale(j):  # β_s γ_s, zero where the entering state does not reach row s (a later document)
      scale = beta_j(j) * jnp.exp(b_col_ref[rows(j), :].astype(_F32))
      return jnp.where(doc_col_ref[rows(j), :] == 0, scale, 0.0) if segmented else scale

    u_ref[rows(i), :] = functools.reduce(jnp.add, [
        dot32(t[i, j], beta_j(j) * v_ref[rows(j), :].astype(_F32)) for j in range(i + 1)])
    w_ref[rows(i), :] = functools.reduce(jnp.add, [
        dot32(t[i, j], k_scale(j) * k_ref[rows(j), :].astype(_F32)) for j in range(i + 1)])


def _wy_call(plan: _Plan, k, v, b, beta, doc):
  """k ``[b, n, h, c, d_k]``, v ``[b, n, h, c, d_v]``, b and β ``[b, n, h, c]``, doc None or int32 ``[b,
  n, 1, c]`` → (W, Ũ, T ``[b, n, h, c, c]``), f32. One program per (batch, chunk, head); every block is
  a whole chunk with whole dims, so it is a legal Mosaic (TPU) tile as well as a Triton one (dims
  powers of two ≥ 16 there)."""
  batch, n_chunks, heads, c, dk = k.shape
  dv = v.shape[-1]
  spec = lambda rows, width: pl.BlockSpec((_SQ, _SQ, _SQ, rows, width), lambda i, n, h: (i, n, h, 0, 0))
  # The document index is per token: every head of a chunk reads the same block.
  doc_spec = lambda rows, width: pl.BlockSpec((_SQ, _SQ, _SQ, rows, width), lambda i, n, h: (i, n, 0, 0, 0))
  shape = lambda width: jax.ShapeDtypeStruct((batch, n_chunks, heads, c, width), _F32)
  if plan.interpret:
    params = None
  elif plan.target == "triton":
    params = triton_params(plan.cfg.wy_warps, 1)
  else:
    params = mosaic_params(("parallel", "parallel", "parallel"))
  # Mosaic takes the chunk whole (the MXU holds its products; sub-blocks would be unaligned lane slices).
  block = min(plan.cfg.wy_block or c, c) if plan.target == "triton" else c
  arrays = [k, v, b[..., None], b[..., None, :], beta[..., None]]
  in_specs = [spec(c, dk), spec(c, dv), spec(c, 1), spec(1, c), spec(c, 1)]
  if doc is not None:
    arrays += [doc[..., None], doc[..., None, :]]
    in_specs += [doc_spec(c, 1), doc_spec(1, c)]
  return pl.pallas_call(
      functools.partial(_wy_kernel, plan=plan, block=block, segmented=doc is not None),
      grid=(batch, n_chunks, heads), in_specs=in_specs,
      out_specs=[spec(c, dk), spec(c, dv), spec(c, c)], out_shape=[shape(dk), shape(dv), shape(c)],
      compiler_params=params, interpret=plan.interpret, name="delta_wy")(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _wy(k, v, b, beta, doc, plan: _Plan):
  return _wy_fwd(k, v, b, beta, doc, plan)[0]


def _wy_fwd(k, v, b, beta, doc, plan: _Plan):
  # Rounded to the dot dtype inside the custom_vjp, so that the cotangents of k and v stay f32.
  k_d, v_d = k.astype(plan.dot_dtype), v.astype(plan.dot_dtype)
  w, u_tilde, inverse = _wy_call(plan, k_d, v_d, b, beta, doc)
  return (w, u_tilde), (k_d, v_d, b, beta, doc, inverse, w, u_tilde)


def _wy_bwd(plan: _Plan, residuals, cotangents):
  # The solve's backward from the stored T, then JAX's transpose of the system's construction
  # (kernels.delta.xla), with the same document masks as the kernel. doc (integer) has no cotangent.
  del plan
  k, v, b, beta, doc, inverse, w, u_tilde = residuals
  d_w, d_u = (x.astype(_F32) for x in cotangents)
  d_a, (d_rv, d_rk) = solve_cotangents(inverse, [u_tilde, w], [d_u, d_w])
  system = lambda k, v, b, beta: wy_system(k, v, b, beta, doc)
  _, system_vjp = jax.vjp(system, k.astype(_F32), v.astype(_F32), b, beta)
  return system_vjp((d_a, d_rv, d_rk)) + (None,)


_wy.defvjp(_wy_fwd, _wy_bwd)
_wy_shared = lowered_once(_wy, static_argnums=(5,))


def _wy_target(k, v, b, beta, doc=None, *, target: str, interpret: bool, cfg: PallasConfig, dot_dtype: str):
  d_k, d_v = k.shape[-1], v.shape[-1]
  if target == "triton":  # Triton tiles: powers of two ≥ 16; zero columns change nothing
    dk, dv = max(MIN_TILE, _next_pow2(d_k)), max(MIN_TILE, _next_pow2(d_v))
  else:
    dk, dv = d_k, d_v
  last = lambda x, width: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  plan = _Plan(target=target, interpret=interpret, cfg=cfg, dot_dtype=dot_dtype)
  doc = None if doc is None else doc.astype(jnp.int32)
  w, u_tilde = _wy_shared(last(k, dk).astype(_F32), last(v, dv).astype(_F32), b.astype(_F32),
                          beta.astype(_F32), doc, plan)
  return w[..., :d_k], u_tilde[..., :d_v]


def wy_factors(k, v, b, beta, doc=None, *, dot_dtype="float32", interpret: bool = False,
               target: PallasTarget | None = None, config: PallasConfig | None = None):
  """``(W, Ũ) = (I + A)⁻¹ [βγ k | β v]`` of every chunk as one Pallas kernel (differentiable).

  Args:
    k: ``[batch, chunks, heads, chunk, d_k]``; v: ``[batch, chunks, heads, chunk, d_v]`` (read by the
      kernel rounded to ``dot_dtype``, the dtype of its k kᵀ); b: the within-chunk cumulative
      log-decay and beta: β, both ``[batch, chunks, heads, chunk]`` f32.
    doc: None, or int ``[batch, chunks, 1, chunk]``: each row's document index within its chunk
      (``kernels.delta.xla.chunk_documents``; b restarted at each start): A is masked to pairs of one
      document and the βγk rows to ``doc = 0`` (:func:`kernels.delta.xla.wy_system`).
    target: ``"triton"`` or ``"mosaic"``; None decides at lowering time (Mosaic for TPU, else Triton;
      Triton when interpreting).
  Returns:
    ``(W [batch, chunks, heads, chunk, d_k], Ũ [batch, chunks, heads, chunk, d_v])``, f32.
  """
  check_arguments(k.shape[-2], target, config)
  run = lambda t: functools.partial(_wy_target, target=t, interpret=interpret, cfg=config or PallasConfig(),
                                    dot_dtype=jnp.dtype(dot_dtype).name)
  args = (k, v, b, beta) + (() if doc is None else (doc,))
  if target is not None or interpret:
    return run(target or "triton")(*args)
  return jax.lax.platform_dependent(*args, tpu=run("mosaic"), default=run("triton"))


def check_arguments(chunk_size: int, target: PallasTarget | None, config: PallasConfig | None,
                    family: str = "delta"):
  """ValueError for a chunk or tiling the kernels cannot take (called before any work is traced);
  ``family``: whose entry point the messages name (``"delta"``: delta_rule, ``"dplr"``)."""
  label = LABELS.get(family, family)
  if not _is_pow2_tile(chunk_size):
    raise ValueError(f"{label}: chunk_size={chunk_size} must be a power of two ≥ {MIN_TILE} for "
                     "impl='pallas' (Triton tiles; 64 is what fla uses)")
  if config is not None and not _is_pow2_tile(config.block_v):
    raise ValueError(f"{label}: PallasConfig.block_v={config.block_v} must be a power of two ≥ {MIN_TILE}")
  if config is not None and config.wy_block is not None and not _is_pow2_tile(config.wy_block):
    raise ValueError(f"{label}: PallasConfig.wy_block={config.wy_block} must be None (the whole chunk) or "
                     f"a power of two ≥ {MIN_TILE}")
  pallas_layout(target, family)


def state_pass(w, u_tilde, k_to_end, chunk_decay, state0, *, added=None, dot_dtype="float32",
               interpret: bool = False, target: PallasTarget | None = None, config: PallasConfig | None = None):
  """``entering_n = S; U_n = Ũ_n − W_n S; S ← Γ_n S + K̂_nᵀ U_n (+ X_n)`` over chunks n, differentiable.

  Args:
    w, k_to_end: ``[batch, chunks, heads, chunk, d_k]`` f32; u_tilde: ``[batch, chunks, heads, chunk,
      d_v]`` f32; chunk_decay: γ, ``[batch, chunks, heads]`` (one per head: ``Γ = γ``) or ``[batch,
      chunks, heads, d_k]`` (per key channel: ``Γ = Diag(γ)``) f32; state0: ``[batch, heads, d_k, d_v]``
      f32.
    added: X, ``[batch, chunks, heads, d_k, d_v]`` f32 added to the state after each chunk, or None.
    dot_dtype: ``"float32"`` or a 16-bit dtype for the kernel's two dots (f32 accumulation).
    interpret: run in the Pallas interpreter (CPU tests).
    target: ``"triton"`` or ``"mosaic"``; None decides at lowering time (Mosaic for TPU, else Triton;
      Triton when interpreting).
    config: Triton launch parameters (default :class:`PallasConfig`).
  Returns:
    ``(entering [batch, chunks, heads, d_k, d_v], u [batch, chunks, heads, chunk, d_v],
    final [batch, heads, d_k, d_v])``, f32.
  """
  cfg = config or PallasConfig()
  check_arguments(w.shape[3], target, cfg)
  run = lambda t: functools.partial(_pass_target, target=t, interpret=interpret, cfg=cfg,
                                    dot_dtype=jnp.dtype(dot_dtype).name)
  args = (w, u_tilde, k_to_end, chunk_decay, state0) + (() if added is None else (added,))
  if target is not None or interpret:
    return run(target or "triton")(*args)
  return jax.lax.platform_dependent(*args, tpu=run("mosaic"), default=run("triton"))
