"""Eight mixers against their authors' code (or the reference implementation the authors ship), through
committed fixtures made by ``tests/fixtures/make_peer_fixtures_b.py`` (torch 2.13.0 CPU; torch is not
a test dependency):

    mamba   mamba-ssm 2.3.2.post1: the ``Mamba`` module (mamba_simple.py, its scan the authors'
            ``selective_scan_ref``) and ``selective_scan_ref`` alone
    mamba2  mamba-ssm 2.3.2.post1: ``ssd_minimal_discrete`` (and ``rms_norm_ref``, Mamba2's gated norm)
    mlstm   mlstm-kernels 2.0.6: ``mlstm_parallel_fw`` (parallel, stabilised) and
            ``mlstm_recurrent_sequence__native_fw`` (initial and final states)
    slstm   xlstm 2.0.6: ``sLSTMCell_vanilla``
    based   zoology @ d88d6f5: ``Based``
    hyena   zoology @ d88d6f5: ``Hyena``
    s4d     state-spaces/s4 @ e757cef: ``S4D`` (models/s4/s4d.py)
    mamba3  state-spaces/mamba @ e9594ce: ``Mamba3`` (mamba_ssm/modules/mamba3.py), its Triton, TileLang
            and CuTe kernels replaced by the authors' pure-torch references (``mamba3_siso_fwd_ref``,
            ``mamba3_MIMO_chunk_ref``, ``apply_rotary_qk_inference_reference``,
            ``selective_state_update_fused_ref_v2``; see make_peer_fixtures_b.py); SISO (``mamba3``) and
            MIMO at rank 4 (``mamba3_mimo``)

Levels (each fixture holds the reference's inputs, so every comparison starts from the same numbers):

- intermediates: our mixer, with the fixture's parameters, computes from ``x`` exactly the tensors the
  reference was fed (so the fixture stays tied to what the mixer does today);
- kernel (recurrence-function references): our kernels (``kernels.scan``, ``kernels.gla``, their
  sequential ``"reference"`` form) or the sLSTM cell on the reference's inputs and a random initial
  state give its outputs, final state and every gradient (torch autograd); mlstm: from the zero state
  against the parallel reference, and two packed documents (``segment_ids``) from an initial state
  against the recurrent one;
- mixer: our mixer's parallel face (the chunked / associative ``"xla"`` kernels, what ``"auto"`` runs
  without Pallas) and its step face from the empty state give the reference module's
  output (mamba, based, hyena, s4d, mamba3) or our output stage applied to the reference recurrence's output
  (mamba2, mlstm, slstm), and the reference's final state where it returns one (where it does not, a
  prefill followed by steps checks our parallel face's state instead); two packed documents where
  the mixer declares ``SEGMENTS``. mamba3: also every gradient (input and parameters, torch autograd
  through the release's module), whole rows and two packed documents, and the release's decode step
  from its empty cache (outputs and states).

Differences on purpose (each compared where it is meant to be equal):

- mamba: our conv state keeps the last ``width − 1`` inputs, mamba_ssm's ``conv_state`` the last
  ``width`` (the newest one included): the last ``width − 1`` are compared. mamba_ssm computes its scan
  in float32 whatever the module's dtype.
- mamba2: ``ssd_minimal_discrete`` is the SSD recurrence without D, gate and norm (the block's
  ``mamba_chunk_scan_combined`` is Triton); the mixer level applies our D skip and output projection
  and the authors' ``rms_norm_ref`` (one group, ``norm_before_gate=False``, as ``Mamba2``'s
  ``RMSNormGated``) around it. Ours: ``q = C``, ``k = B``, ``v = Δ·x``, log-decay ``Δ·A``;
  our state is ``[d_state, head_dim]``, the reference's ``[head_dim, d_state]``.
- mlstm: the reference scales ``q·k`` by ``d^(−1/2)``, ours scales k (the same products): its k is ours
  before the scale, and its states ``C, n`` are ours times ``√d``. It adds ``eps = 1e-6`` to the
  normaliser ``max(|nᵀq|, e^−m)``; ours has none (the paper's formula), so the fixture runs it with
  ``eps = 0``. xLSTM's block differs from ours around the cell (our output gate σ(W_o x) where
  xLSTM gates with swish(z), see ``hybrids/mixers/mlstm.py``): the mixer level is our output stage
  on the reference's cell output.
- slstm: xlstm's cell starts from ``m = 0, n = 0`` and takes ``m_1 = ĩ_1`` while ``n`` is 0; ours
  starts from ``m = −10³⁰``, which gives the same ``m_1``. xLSTM's block (head-wise gate projections,
  its up/down projection) differs from ours around the cell: the kernel level is the cell on our
  ``W x``, ``R``, ``b``; the mixer level is our output stage on the reference cell's output.
- based: zoology's Based is the linear attention alone (zoology stacks a separate BaseConv before it);
  ours starts with its short convolution, so zoology's input is our conv output (checked as an
  intermediate). zoology's normaliser guard ``eps`` (default 1e-12) is its constructor argument, set
  to ours (``hybrids.mixers.based.EPS = 1e-6``).
- hyena: zoology's long filter is an implicit MLP on positional features; ours is a modal
  (pole–residue) filter, as StripedHyena's. The fixture replaces zoology's filter by ours,
  materialised (``mixer/in/filter``, checked against ours), and compares the operator around it:
  projections (zoology's biases set to 0: ours has none), short conv, gating, D. zoology's chunks
  ``(x1, x2, v)`` are our ``(k, q, v)``: x1 gates before the long convolution, x2 after.
- s4d: the output projection of the reference's GLU (a ``Conv1d`` with bias) has its bias at 0 (ours
  has none). Both activate with the exact (erf) GELU (ours used jax's tanh approximation until this
  fixture found it, a 2.1e-4 difference; ``S4D_OUTPUT``). The fixture also holds the outputs of the
  authors' module with ``nn.GELU(approximate="tanh")`` (``mixer/y_tanh_gelu``, ``docs/y_tanh_gelu``);
  the distance to them is measured (``deviations``), not asserted.
- mamba3: the release's MIMO kernels rotate state channel pairs ``(i, i + N/2)``, ours ``(2i, 2i+1)`` (SISO:
  both ``(2i, 2i+1)``): a fixed permutation of the state channels (``mamba3_state_order``), applied to
  our B/C projection rows, norm gains and biases on the way in and undone on its states and gradients.
  Its cache keeps the last ``x``, ours ``v = x ⊙ w_x`` (compared as such), and its decode step leaves the
  angle sum unwrapped, ours wraps it mod 2π (compared mod 2π). Its head count is ``d_inner / headdim``
  (headdim 16 here), ours ``num_heads``. The fixture pins a git commit, not mamba-ssm 2.3.2.post1: that
  release computes ``A = −softplus(Ã)``, ours follows the heavy-tail A of commit c69aaab (ours with softplus
  differs from this fixture by up to 2.3e-2), and the recurrence's pure-torch references ship only in the repository's
  tests. It casts B/C's RMSNorm, Δ, AΔ, the angle sums and its cached states to float32.
"""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.longconv import causal_fft_conv, modal_kernel
from hybrids.mixers.contract import supports_segments
from kernels.gla import gla
from kernels.scan import linear_scan

_spec = importlib.util.spec_from_file_location(
    "make_peer_fixtures_b", os.path.join(os.path.dirname(__file__), "fixtures", "make_peer_fixtures_b.py"))
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)  # sizes, the mappings, and make() where torch is installed

TOL = 1e-5  # max |ours − reference| / max |reference|; ours float32, the reference float64 (mamba_ssm float32)
# The mixer level runs what "auto" runs on CPU (and on GPU where no Pallas kernel applies): the chunked
# gla and the associative scan. The kernel level, with gradients, runs our sequential definition (a tenth
# of the compile time); test_kernels.py checks each form against the other, gradients included.
IMPL = "xla"
KERNEL_IMPL = "reference"
# Which reference output our S4D is compared with: "y_tanh_gelu" while S4D._out uses jax.nn.gelu's
# default (the tanh approximation), "y" (the authors' exact GELU) once it passes approximate=False.
S4D_OUTPUT = "y"


@functools.lru_cache(maxsize=None)
def load(name):
  with np.load(maker.fixture_path(name), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def rel_error(ours, ref) -> float:
  """``max |ours − ref| / max |ref|``; the absolute error where ``ref`` is all zeros (a gradient that
  does not flow, e.g. into a first document's normaliser state while its floor holds)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert np.all(np.isfinite(ours)), "non-finite entries in ours"
  scale = np.max(np.abs(ref))
  error = np.max(np.abs(ours - ref))
  return float(error / scale if scale > 0 else error)


def two_documents():
  """``segment_ids [batch, time]``: a second document starting at ``SECOND_DOC``."""
  ids = (np.arange(maker.TIME) >= maker.SECOND_DOC).astype(np.int32)
  return jnp.asarray(np.broadcast_to(ids, (maker.BATCH, maker.TIME)))


def mixer_for(name, f, impl=IMPL):
  """Our mixer holding the fixture's parameters (built abstract: its own init would be thrown away)."""
  return maker.load_params(nnx.eval_shape(lambda: maker.build(name, impl)), f)


def faces(mixer, x, *, prefill: bool = True):
  """Our mixer's parallel face (output, final state), its step face from the empty state (outputs,
  state after the last step) and, with ``prefill``, a prefill of ``PREFILL`` tokens then steps
  (outputs). Where the reference gives the final state, the parallel face's is compared with it, which
  makes the prefill redundant (and it costs a compilation)."""
  parallel = jax.jit(lambda x: mixer(x, return_state=True))
  step = jax.jit(mixer.step)

  def steps(state, start):
    ys = []
    for t in range(start, x.shape[1]):
      y_t, state = step(x[:, t], state)
      ys.append(y_t)
    return jnp.stack(ys, axis=1), state

  y, state = parallel(x)
  y_steps, state_steps = steps(mixer.init_state(x.shape[0]), 0)
  found = {"y": y, "state": state, "y_steps": y_steps, "state_steps": state_steps}
  if prefill:
    found["y_prefill_steps"] = steps(parallel(x[:, :maker.PREFILL])[1], maker.PREFILL)[0]
  return found


def face_errors(out, ref_y, found):
  """``out`` and the errors of the faces' outputs against the reference output ``ref_y`` (the
  prefill-then-step outputs against its positions from ``PREFILL`` on)."""
  errors = {"mixer/y": rel_error(found["y"], ref_y), "mixer/y_steps": rel_error(found["y_steps"], ref_y), **out}
  if "y_prefill_steps" in found:
    errors["mixer/y_prefill_steps"] = rel_error(found["y_prefill_steps"], ref_y[:, maker.PREFILL:])
  return errors


def intermediate_errors(name, mixer, f, prefix="kernel/in/", names=None):
  """Errors of what our mixer computes from ``x`` against the reference's inputs in the fixture."""
  ours = jax.jit(lambda x: maker.intermediates(name, mixer, x))(jnp.asarray(f["x"]))
  return {f"intermediate/{n}": rel_error(ours[n], f[prefix + n]) for n in (names or ours)}


def vjp_errors(fn, inputs, cotangents, f, prefix):
  """Errors of ``fn(**inputs)`` (a dict of named outputs) and of its vjp with ``cotangents`` (by output
  name) against ``f["<prefix>/<output>"]`` and ``f["<prefix>/grad/<input>"]``."""
  names = list(inputs)

  @jax.jit
  def outputs_and_grads(args, cot):
    outs, vjp = jax.vjp(lambda *a: fn(**dict(zip(names, a))), *args)
    return outs, vjp({n: cot[n] for n in outs})

  outs, grads = outputs_and_grads([jnp.asarray(v) for v in inputs.values()],
                                  {n: jnp.asarray(v) for n, v in cotangents.items()})
  errors = {f"{prefix}/{n}": rel_error(o, f[f"{prefix}/{n}"]) for n, o in outs.items()}
  errors.update({f"{prefix}/grad/{n}": rel_error(g, f[f"{prefix}/grad/{n}"]) for n, g in zip(names, grads)})
  return errors


# ---- mamba ----

def selective_scan(u, delta, A, B, C, D, z, delta_bias, *, impl):
  """``selective_scan_ref``'s definition (Δ = softplus(Δ + b), ``h_t = e^{ΔA} h + Δ u B``,
  ``y = (h C + D u) ⊙ SiLU(z)``) on ``kernels.scan``; our layout ``[batch, time, …]``."""
  dt = jax.nn.softplus(delta + delta_bias)
  h, last = linear_scan(jnp.exp(dt[..., None] * A), (dt * u)[..., None] * B[:, :, None, :], impl=impl)
  y = jnp.einsum("btdn,btn->btd", h, C) + D * u
  return {"out": y * jax.nn.silu(z), "last_state": last}


def mamba_errors(f):
  mixer = mixer_for("mamba", f)
  x = jnp.asarray(f["x"])
  found = faces(mixer, x, prefill=False)
  errors = face_errors({
      "mixer/h": rel_error(found["state"]["h"], f["mixer/h"]),
      "mixer/conv": rel_error(found["state"]["conv"], f["mixer/conv"]),
      "mixer/h_steps": rel_error(found["state_steps"]["h"], f["mixer/h_steps"]),
      "mixer/conv_steps": rel_error(found["state_steps"]["conv"], f["mixer/conv_steps"]),
  }, f["mixer/y"], found)
  y, state = jax.jit(lambda x, ids: mixer(x, return_state=True, segment_ids=ids))(x, two_documents())
  errors.update({"docs/y": rel_error(y, f["docs/y"]), "docs/h": rel_error(state["h"], f["docs/h"]),
                 "docs/conv": rel_error(state["conv"], f["docs/conv"])})
  errors.update(intermediate_errors("mamba", mixer, f))
  inputs = {n: f[f"kernel/in/{n}"] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
  cot = {n: f[f"kernel/cot/{n}"] for n in ("out", "last_state")}
  errors.update(vjp_errors(functools.partial(selective_scan, impl=KERNEL_IMPL), inputs, cot, f, "kernel"))
  return errors


# ---- mamba2 ----

def ssd(X, A, B, C, S0, *, impl, segment_ids=None):
  """SSD with ``kernels.gla``: ``q = C``, ``k = B``, ``v = X``, per-head log-decay ``A``."""
  y, s = gla(C, B, X, A, S0, chunk_size=maker.CHUNK, impl=impl, segment_ids=segment_ids)
  return {"Y": y, "S": s}


def mamba2_errors(f):
  mixer = mixer_for("mamba2", f)
  x = jnp.asarray(f["x"])
  found = faces(mixer, x, prefill=False)
  errors = face_errors({"mixer/S": rel_error(found["state"]["S"], f["mixer/S"]),
                        "mixer/S_steps": rel_error(found["state_steps"]["S"], f["mixer/S"])}, f["mixer/y"], found)
  names = ("X", "A", "B", "C")
  errors.update(intermediate_errors("mamba2", mixer, f, names=names))
  inputs = {**{n: f[f"kernel/in/{n}"] for n in names}, "S0": f["kernel/h0/S"]}
  cot = {n: f[f"kernel/cot/{n}"] for n in ("Y", "S")}
  errors.update(vjp_errors(functools.partial(ssd, impl=KERNEL_IMPL), inputs, cot, f, "kernel"))
  return errors


# ---- mlstm ----

def mlstm_cell(q, k, v, i, f, C0=None, n0=None, m0=None, *, impl, segment_ids=None):
  """mlstm_kernels' convention on ``kernels.gla`` (the mixer's use of it): k scaled by ``d^(−1/2)``, a
  ones column for the normaliser, ``h̃ = o / max(|ν|, e^−m)``; states ``C, n`` unscaled by ``√d``."""
  scale = q.shape[-1] ** -0.5
  v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  init = None if C0 is None else (jnp.concatenate([C0, n0[..., None]], axis=-1) * scale, m0)
  o, (s, m_last), m = gla(q, k * scale, v1, jax.nn.log_sigmoid(f), init, log_input_gate=i, chunk_size=maker.CHUNK,
                          impl=impl, segment_ids=segment_ids)
  h = o[..., :-1] / jnp.maximum(jnp.abs(o[..., -1:]), jnp.exp(-m)[..., None])
  return {"o": h, "C": s[..., :-1] / scale, "n": s[..., -1] / scale, "m": m_last}


def mlstm_errors(f):
  mixer = mixer_for("mlstm", f)
  x = jnp.asarray(f["x"])
  found = faces(mixer, x, prefill=False)
  root_d = np.sqrt(mixer.head_dim)
  state_errors = lambda s, tag: {
      f"mixer/C{tag}": rel_error(s["S"][..., :-1] * root_d, f["mixer/C"]),
      f"mixer/n{tag}": rel_error(s["S"][..., -1] * root_d, f["mixer/n"]),
      f"mixer/m{tag}": rel_error(s["m"], f["mixer/m"])}
  errors = face_errors({**state_errors(found["state"], ""), **state_errors(found["state_steps"], "_steps")},
                       f["mixer/y"], found)
  names = ("q", "k", "v", "i", "f")
  errors.update(intermediate_errors("mlstm", mixer, f, names=names))
  inputs = {n: f[f"kernel/in/{n}"] for n in names}
  with_h0 = {**inputs, **{n: f[f"kernel/h0/{n}"] for n in ("C0", "n0", "m0")}}
  cot = {n: f[f"kernel/cot/{n}"] for n in ("o", "C", "n", "m")}
  parallel = lambda **t: {"o": mlstm_cell(**t, impl=KERNEL_IMPL)["o"]}  # the zero state, as mlstm_parallel_fw
  errors.update(vjp_errors(parallel, inputs, cot, f, "parallel"))
  errors.update(vjp_errors(functools.partial(mlstm_cell, impl=KERNEL_IMPL, segment_ids=two_documents()), with_h0,
                           cot, f, "docs"))
  return errors


# ---- slstm ----

def slstm_cell(mixer):
  """xlstm's cell interface on our sLSTM cell: ``(Wx [b, t, 4·d], R, b, state (y, c, n, m) [4, b, d])``
  in xlstm's layouts → ``h [b, t, d]`` and the final state."""
  graphdef, params = nnx.split(mixer)

  def run(Wx, R, b, state):
    wx, recurrent, bias = maker.xlstm_to_slstm(Wx, R, b)
    cell = nnx.merge(graphdef, params)
    cell.recurrent = nnx.Param(recurrent)
    y0, c0, n0, m0 = state
    final, h = jax.lax.scan(cell._cell, {"c": c0, "n": n0, "m": m0, "h": y0}, jnp.moveaxis(wx + bias, 1, 0))
    return {"h": jnp.moveaxis(h, 0, 1), "state": jnp.stack([final["h"], final["c"], final["n"], final["m"]])}

  return run


def slstm_state(state):
  return np.stack([state["h"], state["c"], state["n"], state["m"]])  # xlstm's order (y, c, n, m)


def slstm_errors(f):
  mixer = mixer_for("slstm", f)
  x = jnp.asarray(f["x"])
  found = faces(mixer, x, prefill=False)
  errors = face_errors({"mixer/state": rel_error(slstm_state(found["state"]), f["mixer/state"]),
                        "mixer/state_steps": rel_error(slstm_state(found["state_steps"]), f["mixer/state"])},
                       f["mixer/y"], found)
  assert supports_segments(type(mixer))
  y, state = jax.jit(lambda x, ids: mixer(x, return_state=True, segment_ids=ids))(x, two_documents())
  errors.update({"docs/y": rel_error(y, f["docs/y"]), "docs/state": rel_error(slstm_state(state), f["docs/state"])})
  wx = jax.jit(lambda x: maker.intermediates("slstm", mixer, x))(x)["Wx"]
  ours = maker.slstm_to_xlstm(wx, mixer.recurrent[...], mixer.bias[...], mixer.heads)
  errors.update({f"intermediate/{n}": rel_error(o, f[f"kernel/in/{n}"]) for n, o in zip(("Wx", "R", "b"), ours)})
  inputs = {**{n: f[f"kernel/in/{n}"] for n in ("Wx", "R", "b")}, "state": f["kernel/h0/state"]}
  cot = {n: f[f"kernel/cot/{n}"] for n in ("h", "state")}
  errors.update(vjp_errors(slstm_cell(mixer), inputs, cot, f, "kernel"))
  return errors


# ---- based, hyena, s4d: the reference modules ----

def based_errors(f):
  mixer = mixer_for("based", f)
  errors = face_errors({}, f["mixer/y"], faces(mixer, jnp.asarray(f["x"])))
  errors.update(intermediate_errors("based", mixer, f, prefix="mixer/in/"))
  return errors


def hyena_errors(f):
  mixer = mixer_for("hyena", f)
  x = jnp.asarray(f["x"])
  errors = face_errors({"mixer/in/filter": rel_error(mixer.filter.kernel(maker.TIME), f["mixer/in/filter"])},
                       f["mixer/y"], faces(mixer, x))
  assert supports_segments(type(mixer))
  errors["docs/y"] = rel_error(jax.jit(lambda x, ids: mixer(x, segment_ids=ids))(x, two_documents()), f["docs/y"])
  return errors


def s4d_pre_activation(mixer, u):
  """``K ∗ u + D u``, the input of S4D's GELU (our parallel face's convolution)."""
  log_a_bar, b_bar, c = mixer._zoh()
  y = causal_fft_conv(u, modal_kernel(log_a_bar, 2.0 * c * b_bar, u.shape[1]))
  return y + mixer.d_skip[...] * u


def s4d_errors(f):
  mixer = mixer_for("s4d", f)
  x = jnp.asarray(f["x"])
  pre = jax.jit(lambda x: s4d_pre_activation(mixer, x))(x)
  errors = face_errors({"mixer/pre_gelu": rel_error(pre, f["mixer/pre_gelu"])}, f[f"mixer/{S4D_OUTPUT}"],
                       faces(mixer, x))
  assert supports_segments(type(mixer))
  docs = jax.jit(lambda x, ids: mixer(x, segment_ids=ids))(x, two_documents())
  errors["docs/y"] = rel_error(docs, f[f"docs/{S4D_OUTPUT}"])
  return errors


# ---- mamba3: the release's module ----

def angle_error(ours, ref) -> float:
  """:func:`rel_error` of angles modulo 2π: ``ref`` moved by the multiple of 2π nearest ``ours`` (the
  release's decode step leaves the angle sum unwrapped; ours, and the release's forward, wrap it)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return rel_error(ours, ref + 2 * np.pi * np.round((ours - ref) / (2 * np.pi)))


def mamba3_state_errors(mixer, state, f, tag, suffix=""):
  """Our decode state against the release's (``<tag>/angle, S, k, x_state<suffix>``, already in our
  layouts): the release keeps the last ``x``, ours ``v = x ⊙ w_x`` (SISO: ``w_x = 1``)."""
  w_x = mixer.mimo_x[...] if mixer.rank > 1 else jnp.ones((mixer.heads, 1, mixer.head_dim))
  v = f[f"{tag}/x_state{suffix}"][:, :, None, :] * np.asarray(w_x)
  return {f"{tag}/angle{suffix}": angle_error(state["angle"], f[f"{tag}/angle{suffix}"]),
          f"{tag}/S{suffix}": rel_error(state["S"], f[f"{tag}/S{suffix}"]),
          f"{tag}/k{suffix}": rel_error(state["k"], f[f"{tag}/k{suffix}"]),
          f"{tag}/v{suffix}": rel_error(state["v"], v)}


def mamba3_grad_errors(mixer, f):
  """Our vjp of ``y = mixer(x)`` with the fixture's cotangent against torch autograd through the release's
  module (``<tag>/grad/x``, ``<tag>/grad/param/<path>``), whole rows (``mixer``; one document each, so
  that one compiled program serves both) and two packed documents (``docs``)."""
  graphdef, params = nnx.split(mixer)

  @jax.jit
  def grads(params, x, cot, ids):
    _, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x, segment_ids=ids), params, x)
    return vjp(cot)

  errors = {}
  for tag, ids in (("mixer", jnp.zeros_like(two_documents())), ("docs", two_documents())):
    d_params, d_x = grads(params, jnp.asarray(f["x"]), jnp.asarray(f["mixer/cot/y"]), ids)
    errors[f"{tag}/grad/x"] = rel_error(d_x, f[f"{tag}/grad/x"])
    for path, g in maker.flatten(nnx.to_pure_dict(d_params)).items():
      errors[f"{tag}/grad/param/{path}"] = rel_error(g, f[f"{tag}/grad/param/{path}"])
  return errors


def mamba3_errors(name, f):
  mixer = mixer_for(name, f)
  x = jnp.asarray(f["x"])
  found = faces(mixer, x, prefill=False)
  errors = face_errors({**mamba3_state_errors(mixer, found["state"], f, "mixer"),
                        **mamba3_state_errors(mixer, found["state_steps"], f, "mixer", "_steps")}, f["mixer/y"], found)
  assert supports_segments(type(mixer))
  y, state = jax.jit(lambda x, ids: mixer(x, return_state=True, segment_ids=ids))(x, two_documents())
  errors.update({"docs/y": rel_error(y, f["docs/y"]), **mamba3_state_errors(mixer, state, f, "docs")})
  errors.update(mamba3_grad_errors(mixer, f))
  return errors


ERRORS = {"mamba": mamba_errors, "mamba2": mamba2_errors, "mlstm": mlstm_errors, "slstm": slstm_errors,
          "based": based_errors, "hyena": hyena_errors, "s4d": s4d_errors,
          "mamba3": functools.partial(mamba3_errors, "mamba3"),
          "mamba3_mimo": functools.partial(mamba3_errors, "mamba3_mimo")}
assert tuple(ERRORS) == maker.MIXERS


def all_errors(name, fixture) -> dict[str, float]:
  """Every comparison of mixer ``name`` against ``fixture``: ``{what: max relative error}``."""
  return ERRORS[name](fixture)


def deviations(name, fixture) -> dict[str, float]:
  """Known differences from the authors' code, measured, not asserted (see the module docstring)."""
  if name != "s4d":
    return {}
  mixer = mixer_for("s4d", fixture)
  other = "y" if S4D_OUTPUT == "y_tanh_gelu" else "y_tanh_gelu"
  return {f"mixer/{other}": rel_error(mixer(jnp.asarray(fixture["x"])), fixture[f"mixer/{other}"])}


@pytest.mark.parametrize("name", maker.MIXERS)
def test_matches_reference(name):
  errors = all_errors(name, load(name))
  worse = {k: f"{v:.3g}" for k, v in errors.items() if not v <= TOL}
  assert not worse, f"{name}: max relative error above {TOL} against the reference: {worse}"


@pytest.mark.parametrize("name", maker.MIXERS)
def test_fixture_metadata(name):
  """Each fixture names its reference and the errors measured when it was written (all within TOL)."""
  meta = json.loads(str(load(name)["meta"]))
  source = maker.SOURCE_OF[name]
  if source in maker.DISTRIBUTIONS:
    assert meta["reference"].startswith(f"{source} {maker.DISTRIBUTIONS[source][0]} ")
  else:
    repo, commit = maker.REPOSITORIES[source]
    assert meta["reference"] == f"github.com/{repo} @ {commit}"
  assert meta["files_sha256"] == {f"{s} {m}": digest for (s, m), digest in maker.FILES.items() if s == source}
  assert max(meta["max_rel_error"].values()) <= TOL
