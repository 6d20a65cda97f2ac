"""Long convolutions with modal (pole–residue) filters: an FFT face for training, a recurrence for decoding.

A depthwise causal convolution ``y_t = Σ_{l≤t} h_l u_{t−l}`` whose filter is, per channel,

    h_l = Re Σ_n R_n λ_n^l,    λ_n = exp(log λ_n) ∈ ℂ with |λ_n| < 1,    n = 1 … modes

is the impulse response of the diagonal linear recurrence (the filter's *modal form*)

    s_t = λ ⊙ s_{t−1} + u_t,    y_t = Re Σ_n R_n s_{t,n},    s: complex64 [batch, channels, modes]

so one set of parameters gives both faces a mixer needs:

- parallel: materialise ``h`` for the sequence length and convolve by FFT, O(T log T). Zero padding to
  at least ``2T − 1`` makes the circular convolution a linear one, so nothing wraps round from the end;
- recurrent: step ``s``, whose size does not depend on how many tokens have been generated.

After a prefill the state is ``s_T = Σ_t λ^{T−1−t} u_t``, a contraction over time (no scan needed).

Packed documents (``segment_ids``, issue 23): one FFT over the packed row would let every document read
the ones before it. :func:`segmented_modal_conv` gives each document exactly its own convolution
``y_t = Σ_{t₀≤s≤t} h_{t−s} u_s`` (``t₀``: the start of t's document) as a chunked modal scan. The row
is cut into chunks of ``chunk_size`` tokens (front-padded with zeros to a whole number of chunks):

- inside a chunk, the exact Toeplitz product over lags ``0 … chunk_size−1``, a tap reading zero where
  it would cross a document start (the short conv's mask, ``chunk_size`` taps);
- across chunks, the modal state ``s`` at chunk ends only: each chunk's own contribution
  ``σ = Σ_j λ^{C−1−j} u_j`` over its last document, then ``s_k = λ^C s_{k−1} + σ_k`` (``0 · s_{k−1}``
  where a document starts inside chunk k) by an associative scan over chunks; a position before the
  chunk's first start reads ``Re Σ_n R_n λ_n^{j+1} s_{k−1,n}``.

Extra memory: the chunk-end states, ``batch · (time / chunk_size) · channels · modes`` complex, i.e.
``2 · modes / chunk_size`` times the input's size, never ``batch · time · channels · modes`` (the
per-position modal states, GBs at training shapes); the backward keeps two input-sized copies (the
taps are recomputed, not stored a lag each). Work per token and channel: ``chunk_size``
multiply-adds for the taps and about ``4 · modes`` for the chunk states and their read-out, the same
order as the FFT's. With ``segment_ids=None`` the FFT face runs unchanged.

This is how StripedHyena (Poli, Wang, Massaroli et al. 2023, "StripedHyena: Moving Beyond Transformers
with Hybrid Signal Processing Models") decodes its Hyena filters; S4D is the same form with
``λ = exp(ΔA)`` and ``R = 2 C B̄``. The functions serve any modal filter; :class:`ModalLongConv` adds
the learnable parametrisation shared by the Hyena and BaseConv mixers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.layers import document_starts
from kernels import modal as modal_kernels
from kernels.documents import document_index

# Tokens a chunk of the segmented face: its taps loop over this many lags, and its chunk-end states
# are 2·modes/SEGMENT_CHUNK times the input's size (one input's worth at the default 16 modes).
SEGMENT_CHUNK = 32
_HIGHEST = jax.lax.Precision.HIGHEST


def modal_kernel(log_poles, residues, length: int):
  """The filter ``h [channels, length]``, ``h_l = Re Σ_n R_n exp(l · log λ_n)``, in float32.

  Args:
    log_poles: complex ``[channels, modes]``, ``log λ`` (taking the log once keeps ``λ^l`` accurate
      for large ``l``: one exp instead of ``l`` products).
    residues: complex ``[channels, modes]``.
  """
  powers = jnp.exp(log_poles[..., None] * jnp.arange(length, dtype=jnp.float32))  # λ^l, [c, n, l]
  return jnp.sum(jnp.real(residues[..., None] * powers), axis=1)


def causal_fft_conv(u, kernel):
  """``y_t = Σ_{l≤t} h_l u_{t−l}`` per channel, by FFT.

  Args:
    u: ``[batch, time, channels]`` (computed in float32).
    kernel: ``[channels, time]``.
  Returns:
    float32 ``[batch, time, channels]``.
  """
  time = u.shape[1]
  # ≥ 2T − 1 points make the product of spectra a linear convolution; a power of two is the fast size.
  n_fft = 1 << (2 * time - 1).bit_length()
  u_f = jnp.fft.rfft(u.astype(jnp.float32), n_fft, axis=1)
  k_f = jnp.fft.rfft(kernel.astype(jnp.float32).T, n_fft, axis=0)
  return jnp.fft.irfft(u_f * k_f[None], n_fft, axis=1)[:, :time]


def modal_final_state(log_poles, u):
  """``s_T = Σ_t λ^{T−1−t} u_t``: the recurrence's state after reading ``u: [batch, time, channels]``.

  Returns complex64 ``[batch, channels, modes]``. ``u`` is real, so the contraction over time is two
  real ones (half the work of a complex one), at full float32 precision since decoding continues
  from this state.
  """
  time = u.shape[1]
  powers = jnp.exp(log_poles[..., None] * jnp.arange(time - 1, -1, -1, dtype=jnp.float32))  # [c, n, t]
  u32 = u.astype(jnp.float32)
  contract = lambda p: jnp.einsum("cnt,btc->bcn", p, u32, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.complex(contract(jnp.real(powers)), contract(jnp.imag(powers)))


def _real_contract(spec: str, real_operand, complex_operand):
  """``einsum(spec, real, complex)`` as two real einsums at full float32 precision."""
  contract = lambda part: jnp.einsum(spec, real_operand, part, precision=_HIGHEST)
  return jax.lax.complex(contract(jnp.real(complex_operand)), contract(jnp.imag(complex_operand)))


def _shifted(x, lag: int):
  """``x_{t−lag}`` along axis 1 (zeros before the row); ``lag < 0`` reads ahead (zeros after it)."""
  if lag == 0:
    return x
  time = x.shape[1]
  widths = [(0, 0)] * x.ndim
  widths[1] = (lag, 0) if lag > 0 else (0, -lag)
  padded = jnp.pad(x, widths)
  return padded[:, :time] if lag > 0 else padded[:, -lag:]


def chunk_taps_scan(u, reach, kernel):
  """The short part of the segmented convolution: ``y_t = Σ_{l ≤ reach_t} h_l u_{t−l}``, one lag per
  step of a ``lax.scan`` (each step re-reads and re-writes ``y``: ``lags`` passes over the input).

  Args:
    u: float32 ``[batch, time, channels]``.
    reach: int32 ``[batch, time]``: the last lag position t may read (its offset in its chunk's part of
      its document, so no lag crosses a chunk or document start).
    kernel: float32 ``[channels, lags]``, ``h``.
  Returns float32 ``[batch, time, channels]``.
  """
  lags = kernel.shape[1]
  time = u.shape[1]
  u_pad = jnp.pad(u, ((0, 0), (lags, 0), (0, 0)))

  @jax.checkpoint  # the backward recomputes each lag's tap: no per-lag copy of the input is kept
  def tap(y, lag):
    seen = jax.lax.dynamic_slice_in_dim(u_pad, lags - lag, time, axis=1)
    weight = jax.lax.dynamic_index_in_dim(kernel, lag, axis=1, keepdims=False)
    return y + weight * jnp.where((reach >= lag)[..., None], seen, 0.0), None

  return jax.lax.scan(tap, jnp.zeros_like(u), jnp.arange(lags))[0]


@jax.custom_vjp
def chunk_taps_unrolled(u, reach, kernel):
  """:func:`chunk_taps_scan`'s result with the lags unrolled, so that XLA can fuse all of them into one
  pass over the input (forward and ``∂u``); its own backward, so that no per-lag copy is kept."""
  reach = jax.lax.optimization_barrier(reach)  # computed once, not again inside every lag's fusion
  y = jnp.zeros_like(u)
  for lag in range(kernel.shape[1]):
    y = y + kernel[:, lag] * jnp.where((reach >= lag)[..., None], _shifted(u, lag), 0.0)
  return y


def _chunk_taps_unrolled_fwd(u, reach, kernel):
  return chunk_taps_unrolled(u, reach, kernel), (u, reach, kernel)


def _chunk_taps_unrolled_bwd(residuals, cotangent):
  """``∂u_s = Σ_l h_l [l ≤ reach_{s+l}] ∂y_{s+l}``, ``∂h_l = Σ_{b,t} [l ≤ reach_t] ∂y_t u_{t−l}``."""
  u, reach, kernel = residuals
  d_u, d_kernel = jnp.zeros_like(u), []
  for lag in range(kernel.shape[1]):
    read = jnp.where((reach >= lag)[..., None], cotangent, 0.0)
    d_u = d_u + kernel[:, lag] * _shifted(read, -lag)
    d_kernel.append(jnp.sum(read * _shifted(u, lag), axis=(0, 1)))
  return d_u, None, jnp.stack(d_kernel, axis=1)


chunk_taps_unrolled.defvjp(_chunk_taps_unrolled_fwd, _chunk_taps_unrolled_bwd)


def _chunk_toeplitz(reach, kernel, chunks: int):
  """The pieces of :func:`chunk_taps_reduce`: ``T [chunk, chunk, channels]`` (``T_{ji} = h_{j−i}`` for
  ``i ≤ j``, else 0) and the mask ``M [batch, chunks, chunk, chunk]`` (``M_{ji} = [0 ≤ j − i ≤ reach_j]``)."""
  lags = kernel.shape[1]
  j = jnp.arange(lags)[:, None]
  i = jnp.arange(lags)[None, :]
  toeplitz = jnp.where((i <= j)[..., None], kernel.T[jnp.clip(j - i, 0, lags - 1)], 0.0)
  keep = ((j - i) <= reach.reshape(reach.shape[0], chunks, lags, 1)) & (i <= j)
  return toeplitz, keep.astype(kernel.dtype)[..., None]


@jax.custom_vjp
def chunk_taps_reduce(u, reach, kernel):
  """:func:`chunk_taps_scan`'s result as one multiply-and-sum over each chunk's positions, ``y_j = Σ_i
  T_{ji} M_{ji} u_i`` (:func:`_chunk_toeplitz`), written as a broadcast product summed over ``i``, which
  XLA can fuse into one reduction that reads the input once rather than once a lag. Its own backward,
  two reductions of the same form (``∂u`` over ``j``, ``∂T`` over the chunks), so that the product
  (``chunk`` times the input's size) is never kept.

  Unlike the other forms it needs ``time`` to be whole chunks of ``lags`` positions (the segmented face
  pads to them): ``reach`` never crosses a chunk start there.
  """
  batch, time, channels = u.shape
  lags = kernel.shape[1]
  if time % lags:
    raise ValueError(f"chunk_taps_reduce: time={time} is not a multiple of the chunk's {lags} lags")
  toeplitz, keep = _chunk_toeplitz(reach, kernel, time // lags)
  u_c = u.reshape(batch, time // lags, 1, lags, channels)
  return jnp.sum(toeplitz * keep * u_c, axis=3).reshape(batch, time, channels)


def _chunk_taps_reduce_fwd(u, reach, kernel):
  return chunk_taps_reduce(u, reach, kernel), (u, reach, kernel)


def _chunk_taps_reduce_bwd(residuals, cotangent):
  """``∂u_i = Σ_j T_{ji} M_{ji} ∂y_j``; ``∂h_l = Σ_{j − i = l} ∂T_{ji}``, ``∂T_{ji} = Σ_chunks M_{ji} u_i ∂y_j``."""
  u, reach, kernel = residuals
  batch, time, channels = u.shape
  lags = kernel.shape[1]
  toeplitz, keep = _chunk_toeplitz(reach, kernel, time // lags)
  u_c = u.reshape(batch, time // lags, 1, lags, channels)
  dy_c = cotangent.reshape(batch, time // lags, lags, 1, channels)
  d_u = jnp.sum(toeplitz * keep * dy_c, axis=2).reshape(u.shape)
  d_toeplitz = jnp.sum(keep * u_c * dy_c, axis=(0, 1))  # [j, i, channels]
  diagonal = (jnp.arange(lags)[:, None] - jnp.arange(lags)[None, :])[None] == jnp.arange(lags)[:, None, None]
  d_kernel = jnp.einsum("jic,lji->cl", d_toeplitz, diagonal.astype(d_toeplitz.dtype), precision=_HIGHEST)
  return d_u, None, d_kernel


chunk_taps_reduce.defvjp(_chunk_taps_reduce_fwd, _chunk_taps_reduce_bwd)


# How the segmented face computes its in-chunk taps (the same numbers; which is faster depends on what
# XLA fuses: `python -m hybrids.bench_longconv` times each).
CHUNK_TAPS = {"scan": chunk_taps_scan, "unrolled": chunk_taps_unrolled, "reduce": chunk_taps_reduce}


def segmented_modal_conv(u, log_poles, residues, segment_ids, *, chunk_size: int = SEGMENT_CHUNK,
                         taps: str = "scan", impl: str = "auto", interpret: bool = False):
  """The modal convolution of each document of a packed row alone: by the chunked modal scan of the
  module docstring (``impl="xla"``), the streaming Pallas kernels of :mod:`kernels.modal` (``"pallas"``;
  ``interpret`` runs them on a CPU) or the token recurrence (``"reference"``); ``"auto"`` asks
  :func:`kernels.dispatch.modal`, which records why.

  Args:
    u: ``[batch, time, channels]`` (computed in float32).
    log_poles, residues: complex ``[channels, modes]`` (``log λ`` and ``R`` of ``h_l = Re Σ_n R_n λ_n^l``).
    segment_ids: ``int [batch, time]``; equal consecutive ids are one document, a change of id starts
      the next (position 0 starts one).
    chunk_size: tokens a chunk (see :data:`SEGMENT_CHUNK`).
    taps: how the in-chunk taps run, a key of :data:`CHUNK_TAPS` (``impl="xla"`` only).
  Returns:
    ``(y float32 [batch, time, channels], s complex64 [batch, channels, modes])``: ``y_t = Σ_{t₀≤s≤t}
    h_{t−s} u_s`` and the state after the row's last document alone, ``s = Σ_{s≥t₀} λ^{T−1−s} u_s``.
  """
  if chunk_size <= 0:
    raise ValueError(f"segmented_modal_conv: chunk_size={chunk_size} must be positive")
  if taps not in CHUNK_TAPS:
    raise ValueError(f"segmented_modal_conv: taps={taps!r} is not one of {sorted(CHUNK_TAPS)}")
  chosen = modal_kernels.choice(impl, interpret=interpret, u=u, starts=segment_ids).impl
  if chosen == "reference":
    return modal_kernels.modal_conv_reference(u, log_poles, residues, document_starts(segment_ids))
  if chosen == "pallas":
    starts = document_starts(segment_ids)
    y = modal_kernels.modal_conv_pallas(u, log_poles, residues, starts, interpret=interpret)
    # The last document's state (a decode continues from it; unused, XLA drops it): the prefill's
    # contraction over time, on the input of that document alone.
    doc = document_index(segment_ids)
    in_last = (doc == doc[:, -1:]).astype(jnp.float32)[..., None]
    return y, modal_final_state(log_poles, u.astype(jnp.float32) * in_last)
  batch, time, channels = u.shape
  pad = -time % chunk_size
  n_chunks = (time + pad) // chunk_size
  # Front padding keeps position time−1 at a chunk end (its state is the one returned); padded
  # positions hold zeros and count as starts, so they reach nothing.
  u32 = jnp.pad(u.astype(jnp.float32), ((0, 0), (pad, 0), (0, 0)))
  u_c = u32.reshape(batch, n_chunks, chunk_size, channels)
  starts = jnp.pad(document_starts(segment_ids), ((0, 0), (pad, 0)), constant_values=True)
  # count: starts at or before each position of its chunk; equal counts = one document of that chunk.
  count = jnp.cumsum(starts.reshape(batch, n_chunks, chunk_size).astype(jnp.int32), axis=2)

  # Inside a chunk: lag l reads u_{t−l} when t−l is in t's chunk and in t's document, i.e. l ≤ reach_t.
  t = jnp.arange(n_chunks * chunk_size, dtype=jnp.int32)
  since_start = t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
  reach = jnp.minimum(since_start, t % chunk_size)
  intra = CHUNK_TAPS[taps](u32, reach, modal_kernel(log_poles, residues, chunk_size))
  intra = intra.reshape(u_c.shape)

  # Across chunks: the state at each chunk end, from the chunk's last document and the state before.
  lags = jnp.arange(chunk_size, dtype=jnp.float32)
  powers = jnp.exp(log_poles[..., None] * lags)  # λ^j, [channels, modes, chunk_size]
  # Masks as float factors [..., 1] (not broadcast selects): the backward then keeps them at their size.
  in_last = (count == count[..., -1:]).astype(jnp.float32)[..., None]
  own = _real_contract("bkjc,cnj->bkcn", u_c * in_last, powers[..., ::-1])  # Σ λ^{C−1−j} u_j
  through = jnp.where((count[:, :, -1] == 0)[..., None, None], jnp.exp(log_poles * chunk_size), 0.0)

  def combine(earlier, later):
    (a1, b1), (a2, b2) = earlier, later
    return a1 * a2, a2 * b1 + b2

  _, ends = jax.lax.associative_scan(combine, (through, own), axis=1)  # [batch, n_chunks, channels, modes]
  entering = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
  # Positions before their chunk's first start read the entering state: Re Σ_n R_n λ_n^{j+1} s_{k−1,n}.
  readout = residues[..., None] * powers * jnp.exp(log_poles)[..., None]  # [channels, modes, chunk_size]
  contract = lambda a, b: jnp.einsum("bkcn,cnj->bkjc", a, b, precision=_HIGHEST)
  inter = contract(jnp.real(entering), jnp.real(readout)) - contract(jnp.imag(entering), jnp.imag(readout))
  y = intra + (count == 0).astype(jnp.float32)[..., None] * inter
  return y.reshape(batch, n_chunks * chunk_size, channels)[:, pad:], ends[:, -1]


class ModalLongConv(nnx.Module):
  """A learnable modal long filter per channel, ``h_l = Re Σ_n R_n λ_n^l`` (``modes`` poles a channel).

  Parametrisation (the exponential one of the LRU, Orvieto et al. 2023, "Resurrecting Recurrent Neural
  Networks for Long Sequences"): ``log λ = −exp(ν) + iθ``, so ``|λ| = exp(−exp(ν)) < 1`` for every
  ``ν`` and the filter can never grow. At init the decay rates ``exp(ν)`` are log-uniform in
  ``[min_rate, max_rate]`` (memory of ~10 to ~1000 tokens by default; the mixers' short convolutions
  cover the first few lags), phases ``θ`` uniform in ``[0, π]`` (``−θ`` with conjugate residues gives
  the same real filter), and residues ``R ~ CN(0, 2(1 − |λ|²)/modes)`` so that ``E Σ_l h_l² = 1``:
  the convolution roughly preserves the variance of white input.

  Parameters ``[channels, modes]``: ``log_rate`` (ν), ``angle`` (θ); ``residues`` ``[2, channels,
  modes]`` (real and imaginary parts). ``impl``: how packed documents run (:func:`segmented_modal_conv`).
  """

  def __init__(self, channels: int, modes: int, *, param_dtype, rngs: nnx.Rngs, min_rate: float = 1e-3,
               max_rate: float = 1e-1, impl: str = "auto"):
    self.channels, self.modes, self.impl = channels, modes, impl  # impl: segmented_modal_conv's
    log_rate = jax.random.uniform(rngs.params(), (channels, modes), jnp.float32, math.log(min_rate),
                                  math.log(max_rate))
    self.log_rate = nnx.Param(log_rate.astype(param_dtype))
    self.angle = nnx.Param(jax.random.uniform(rngs.params(), (channels, modes), jnp.float32, 0.0,
                                              math.pi).astype(param_dtype))
    scale = jnp.sqrt(-jnp.expm1(-2.0 * jnp.exp(log_rate)) / modes)  # √((1 − |λ|²) / modes)
    residues = jax.random.normal(rngs.params(), (2, channels, modes), jnp.float32) * scale
    self.residues = nnx.Param(residues.astype(param_dtype))

  def log_poles(self):
    """complex64 ``[channels, modes]``: ``log λ = −exp(ν) + iθ``."""
    return jax.lax.complex(-jnp.exp(self.log_rate[...].astype(jnp.float32)), self.angle[...].astype(jnp.float32))

  def complex_residues(self):
    """complex64 ``[channels, modes]``."""
    r = self.residues[...].astype(jnp.float32)
    return jax.lax.complex(r[0], r[1])

  def kernel(self, length: int):
    """The filter materialised for ``length`` lags, float32 ``[channels, length]``."""
    return modal_kernel(self.log_poles(), self.complex_residues(), length)

  def __call__(self, u, *, return_state: bool = False, segment_ids=None):
    """Convolution face. ``u: [batch, time, channels]`` → float32 ``y`` (and the state after the last step).

    ``segment_ids: int [batch, time]`` (optional): packed documents, each convolved alone
    (:func:`segmented_modal_conv`); the state is then the last document's alone."""
    log_poles = self.log_poles()
    if segment_ids is not None:
      y, state = segmented_modal_conv(u, log_poles, self.complex_residues(), segment_ids, impl=self.impl)
      return (y, state) if return_state else y
    y = causal_fft_conv(u, modal_kernel(log_poles, self.complex_residues(), u.shape[1]))
    return (y, modal_final_state(log_poles, u)) if return_state else y

  def init_state(self, batch: int):
    return jnp.zeros((batch, self.channels, self.modes), jnp.complex64)

  def step(self, u_t, state):
    """Recurrent face. ``u_t: [batch, channels]``, ``state: complex64 [batch, channels, modes]``."""
    state = jnp.exp(self.log_poles()) * state + u_t.astype(jnp.float32)[..., None]
    return jnp.real(jnp.sum(self.complex_residues() * state, axis=-1)), state
