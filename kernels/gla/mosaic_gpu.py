"""The GLA forward's output stage as a Mosaic GPU kernel (Hopper and newer: TMA and wgmma).

The same output as ``kernels/gla/pallas.py``'s Triton output kernel, for one chunk of C = 64 rows per CTA:

    o_t = (q_t ⊙ e^{b_t}) S  +  Σ_{s ≤ t in the chunk} A_ts v_s,   A_ts = Σ_d q_td k_sd e^{b_td − b_sd}

with ``b`` the chunk-local inclusive cumulative log-decay (per key dim, each log α capped at
``min_log_decay``) and ``S`` the state entering the chunk (stored transposed, Sᵀ [d_v, d_k], in the
16-bit input dtype by the states kernel). The Triton kernel carries the state through four 16-row
sub-chunks in registers (a [d_v, d_k] f32 tile, which spills); here every product is a 64-row wgmma
with f32 accumulation, and the decays go into its operands as factors e^{±(b − r)} for a reference
row r chosen per pair of row blocks so that no factor overflows:

* across 16-row blocks (s in block J < block of t), r = b at block J's last row: the factors
  q e^{b_t − r} and k e^{r − b_s} are both ≤ 1 (one product per J, its columns J kept);
* within a block, pairs in the same half of 8 rows use the half's middle μ (between rows 3 and 4),
  so |b − μ| ≤ 3.5 · 20 = 70 and the factors stay within e^{±70}, inside bf16's range;
* within a block, rows 8–15 against rows 0–7 use r = b at row 7: both factors ≤ 1.

Products for pairs outside their own mask may overflow; selects drop them. Every exponent b_t − r(t)
is itself a product, Σ_s ([s ≤ t] − [s ≤ r(t)]) log α_s (μ: weights ½), whose weights 0, ±½, ±1 and
bf16 log-decays are exact tensor-core operands, summed in f32: no cumulative sum in XLA, no row
broadcasts. Any other log-decay dtype (the mixers' f32) is capped and split by XLA into bf16 hi + lo
(16 significant bits: each log α off by at most 2⁻¹⁷ of itself), stacked along the contraction:
[w w] @ [hi; lo], still one product per exponent. (Two products chained on one accumulator, or
unstacked parts, gave wrong values on an H100; see kernels/BENCHMARKS.md.) The kernel
also writes each chunk's masked score matrix A (f32), which the dv kernel reads instead of
recomputing the diagonal blocks.

Packed documents (``ell``, ``kernels/gla/pallas.py``'s ℓ, read as :func:`document_firsts`):
the kernel applies the masks of the Triton output stage to whole chunks. Each CTA reads its 64 rows'
``first`` (int32: the chunk-local row where the row's document starts, −1 where no start lies in the
chunk up to the row) from global memory into registers, as the window-attention
kernels read their document bounds; a start's own log α is left as it is (pallas.py), so every exponent
and factor is the one the same call without documents computes. Then the state entering the chunk reaches row t only if ``first_t < 0``
(no start in the chunk up to t: q e^{b} is zeroed on the other rows), and a pair (t, s ≤ t) counts only
if ``s ≥ first_t`` (one select on the assembled A, which the output product and the stored residual
both read, so the dv kernel gets the masked diagonal blocks too). The rest of the backward (states,
dq/dk, dv's carried state) is the Triton kernels', which take ℓ themselves. These masks were checked
against the reference on an H100 (``kernels.gla.bench --segments``), so documents take this output
stage like any other call it supports.

Inputs: q, k ``[batch, time, heads, d_k]`` and v ``[batch, time, heads, d_v]`` (bf16), the
log-decay parts (``decay_parts``), the entering states ``[batch, heads, chunks, d_v, d_k]``, and with
documents ``first_rows`` int32 ``[batch, time]``. Mosaic GPU's interpreter has no wgmma: this kernel
runs on a GPU only (the CPU tests build it for CUDA, check the mask arithmetic and the dv kernel's
reading of A in the interpreter; the GPU check compares it with the reference).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.pallas_compat import mgpu_load
from kernels.tiling import swizzled as _swizzled

CHUNK = 64  # rows per CTA: one wgmma's M
_BLOCK = 16  # rows per block of the reference scheme (module docstring)


def supports(q, v, g, chunk: int) -> str | None:
  """Why this kernel cannot run the call (None: it can), with or without documents (``segment_ids``)."""
  if chunk != CHUNK:
    return f"needs PallasConfig.chunk={CHUNK} (got {chunk})"
  if q.dtype != jnp.bfloat16 or v.dtype != q.dtype:  # (f16's range cannot hold the e^{±70} factors)
    return f"needs bfloat16 q, k, v (got {q.dtype})"
  if g is None or g.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"needs a bfloat16, float16 or float32 log-decay (got {None if g is None else g.dtype})"
  if q.shape[-1] not in (64, 128) or v.shape[-1] not in (64, 128):
    return f"needs d_k and d_v of 64 or 128 (got {q.shape[-1]}, {v.shape[-1]})"
  if q.shape[1] % CHUNK:
    return f"needs time a multiple of {CHUNK} (got {q.shape[1]})"
  return None


def document_firsts(ell):
  """``first_rows`` int32 ``[batch, time]`` from ℓ ``f32 [batch, time, 1]`` (pallas.py: the document
  starts counted from each 64-row chunk's first row up to each row): the chunk-local row where each
  row's document starts, or −1 where no start lies in the chunk up to the row (the state entering the
  chunk reaches it). ℓ steps up by one exactly at a start."""
  batch, time = ell.shape[:2]
  counts = ell[..., 0].reshape(batch, time // CHUNK, CHUNK)
  before = jnp.pad(counts[:, :, :-1], ((0, 0), (0, 0), (1, 0)))  # ℓ of the previous row (0 before the chunk)
  marks = jnp.where(counts != before, jnp.arange(CHUNK, dtype=jnp.int32), -1)
  return jax.lax.cummax(marks, axis=2).reshape(batch, time)


def entering_state_reaches(first):
  """Whether the state entering the chunk reaches a row whose document starts at chunk row ``first``
  (−1: before the chunk); any shape, in the kernel a WGMMA-layout tile."""
  return first < 0


def same_document(first, s):
  """Whether key row ``s`` (≤ the query row t, chunk-local) lies in t's document, ``first`` = t's."""
  return s >= first


def decay_parts(g, min_log_decay: float):
  """The kernel's log-decay operands: a bf16 ``g`` as it is (capped in the kernel), any other dtype
  capped here and split into bf16 hi + lo (16 significant bits)."""
  if g.dtype == jnp.bfloat16:
    return (g,)
  capped = jnp.maximum(g.astype(jnp.float32), min_log_decay)
  hi = capped.astype(jnp.bfloat16)
  return hi, (capped - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def output(q, k, v, g_parts, states, *, min_log_decay: float, ell=None):
  """``(o [batch, time, heads, d_v], scores f32 [batch, time, heads, 64])``: the output in v's dtype
  and each chunk's masked intra-chunk scores A (row t: A_t,s for the chunk's 64 s), which the dv
  kernel reads back (see the module docstring). ``g_parts``: ``decay_parts(g, min_log_decay)``;
  ``ell``: None, or pallas.py's ℓ ``f32 [batch, time, 1]`` for packed documents (the kernel reads
  their :func:`document_firsts`)."""
  n_parts = len(g_parts)
  documents = ell is not None
  first_rows = document_firsts(ell) if documents else None
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  dtype = q.dtype
  f32 = jnp.float32
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = wgmma_layout.reduce(1)
  chunks = time // CHUNK
  s_shape = (CHUNK, CHUNK)

  def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

  def product(a, b_ref, shape, init=None):
    def run(acc_ref):
      plgpu.wgmma(acc_ref, a, b_ref)
    zeros = plgpu.layout_cast(jnp.zeros(shape, f32), wgmma_layout) if init is None else init
    return pl.run_state(run)(plgpu.ACC.init(zeros))

  def body(q_ref, k_ref, v_ref, *refs):
    g_refs, first_ref = refs[:n_parts], (refs[n_parts] if documents else None)
    st_ref, o_ref, a_ref = refs[n_parts + documents:]

    def kernel(q_s, k_s, v_s, g_s, st_s, a_s, loaded):  # g_s: the parts stacked along rows
      n, h, bi = (jax.lax.axis_index(name) for name in ("chunk", "head", "batch"))
      rows = (bi, pl.ds(n * CHUNK, CHUNK), h)
      parts = [(g.at[rows], g_s.at[pl.ds(p * CHUNK, CHUNK)]) for p, g in enumerate(g_refs)]
      for src, dst in ((q_ref.at[rows], q_s), (k_ref.at[rows], k_s), (v_ref.at[rows], v_s), *parts,
                       (st_ref.at[bi, h, n], st_s)):
        plgpu.copy_gmem_to_smem(src, dst, loaded)
      # The rows' document firsts (64 words) load while the copies are in flight.
      first = mgpu_load(first_ref.at[bi, pl.ds(n * CHUNK, CHUNK)], row_layout, optimized=False) if documents else None
      plgpu.barrier_wait(loaded)
      if n_parts == 1:  # capped here (exact in bf16)
        g_s[...] = jnp.maximum(g_s[...].astype(f32), min_log_decay).astype(g_s.dtype)
        plgpu.commit_smem()

      # Exponents as exact products: b_t − b_r(t) = Σ_s ([s ≤ t] − [s ≤ r(t)]) log α_s, whose 0, ±½, ±1
      # weights are exact in bf16 and whose sum accumulates in f32.
      ts, ss = iota(s_shape, 0), iota(s_shape, 1)
      # The weights' columns repeat once per part: [chunk, parts · chunk], s = column mod chunk.
      w_shape = (CHUNK, n_parts * CHUNK)
      ws = jax.lax.rem(iota(w_shape, 1), CHUNK) if n_parts > 1 else ss
      wt = iota(w_shape, 0) if n_parts > 1 else ts
      causal = jnp.where(ws <= wt, 1.0, 0.0)
      up_to = lambda r: jnp.where(ws <= r, 1.0, 0.0)
      block_start, half_start = wt - jax.lax.rem(wt, _BLOCK), wt - jax.lax.rem(wt, _BLOCK // 2)  # of row t

      def exponent(weights):  # [chunk, d_k] f32: [w … w] @ [hi; lo], one product
        return product(weights.astype(jnp.bfloat16), g_s, (CHUNK, dk))

      shape = (CHUNK, dk)
      t = iota(shape, 0)
      blk, upper = jax.lax.div(t, _BLOCK), jax.lax.rem(t, _BLOCK) >= _BLOCK // 2
      bt, bs = jax.lax.div(ts, _BLOCK), jax.lax.div(ss, _BLOCK)
      ht, hs = jax.lax.div(ts, _BLOCK // 2), jax.lax.div(ss, _BLOCK // 2)  # halves of 8 rows
      q = q_s[...].astype(f32)
      k = k_s[...]

      def keys(value):  # K̂ into k's buffer (its last product has completed), then fenced
        k_s[...] = value.astype(dtype)
        plgpu.commit_smem()

      # Across blocks: K̂ = k e^{r(s) − b_s} with r(s) = b at the last row of s's block (≤ 1).
      e = exponent(causal - up_to(block_start + _BLOCK - 1))
      keys(k.astype(f32) * jnp.exp(jnp.minimum(-e, 0.0)))
      scores = plgpu.layout_cast(jnp.zeros(s_shape, f32), wgmma_layout)
      for j in range(CHUNK // _BLOCK - 1):  # Q̂ = q e^{b_t − r} with r = b at block j's last row (≤ 1)
        e = exponent(causal - up_to(_BLOCK * j + _BLOCK - 1))
        p = product(jnp.where(blk > j, q * jnp.exp(jnp.minimum(e, 0.0)), 0.0).astype(dtype), k_s.T, s_shape)
        scores = jnp.where(bs == j, jnp.where(bt > j, p, 0.0), scores)

      # Within a block, rows 8–15 against rows 0–7: r = b at row 7 of the block (both factors ≤ 1).
      e = exponent(causal - up_to(block_start + _BLOCK // 2 - 1))
      x = jnp.exp(jnp.where(upper, jnp.minimum(e, 0.0), jnp.minimum(-e, 0.0)))
      keys(jnp.where(upper, 0.0, k.astype(f32) * x))
      p = product(jnp.where(upper, q * x, 0.0).astype(dtype), k_s.T, s_shape)
      cross = jnp.where(bt == bs, jnp.where(jax.lax.rem(ht, 2) == 1, hs == ht - 1, False), False)
      scores = jnp.where(cross, p, scores)

      # Within a half of 8 rows: μ between its rows 3 and 4 (|b − μ| ≤ 3.5 · 20).
      e = exponent(causal - 0.5 * up_to(half_start + 3) - 0.5 * up_to(half_start + 4))
      keys(k.astype(f32) * jnp.exp(-e))
      p = product((q * jnp.exp(e)).astype(dtype), k_s.T, s_shape)
      scores = jnp.where(hs == ht, jnp.where(ss <= ts, p, 0.0), scores)

      q_hat = q * jnp.exp(exponent(causal))  # q e^{b_t}: reads the entering state
      if documents:  # pairs across a start drop out of A; rows after a start do not read the state
        scores = jnp.where(same_document(jax.lax.broadcast_in_dim(first, s_shape, [0]), ss), scores, 0.0)
        q_hat = jnp.where(entering_state_reaches(jax.lax.broadcast_in_dim(first, shape, [0])), q_hat, 0.0)
      a_s[...] = scores
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(a_s, a_ref.at[rows])
      o = product(q_hat.astype(dtype), st_s.T, (CHUNK, dv))
      o = product(scores.astype(dtype), v_s, (CHUNK, dv), init=o)
      v_s[...] = o.astype(dtype)  # v's buffer holds the output on its way out
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(v_s, o_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(kernel, _swizzled((CHUNK, dk), dtype), _swizzled((CHUNK, dk), dtype),
                  _swizzled((CHUNK, dv), dtype), _swizzled((n_parts * CHUNK, dk), jnp.bfloat16),
                  _swizzled((dv, dk), dtype), _swizzled(s_shape, f32), plgpu.Barrier(num_arrivals=4 + n_parts))

  out_type = (jax.ShapeDtypeStruct(v.shape, dtype), jax.ShapeDtypeStruct((batch, time, heads, CHUNK), f32))
  return plgpu.kernel(body, out_type=out_type, grid=(chunks, heads, batch), grid_names=("chunk", "head", "batch"),
                      compiler_params=plgpu.CompilerParams(approx_math=True))(
                          q, k, v, *g_parts, *([first_rows] if documents else []), states)
