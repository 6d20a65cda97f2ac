"""Twelve mixers (eleven recurrent, and FoX's forgetting attention) against fla's pure-torch
references (flash-linear-attention's ``fla-core`` 0.6.0), through committed fixtures made by ``tests/fixtures/make_peer_fixtures_a.py``
(torch 2.13.0 CPU, float32; torch is not a test dependency).

fla's ``naive_*`` functions are recurrences, not layers, so each fixture holds the tensors our mixer
computes (q, k, v, gates: ``kernel/in``) and what fla's function returns for them. Two levels, each
also on two documents packed in a row (the second starting mid-chunk), each document as if alone:

- kernel: our kernels (``kernels.gla``, ``kernels.delta``, ``kernels.scan``, ``kernels.dplr``,
  ``kernels.forgetting_attention``) on fla's inputs and a
  random initial state give fla's outputs, final state and gradients (of every input and the initial
  state, against torch autograd); documents through the kernels' ``segment_ids``, the initial state
  entering the first only;
- mixer: with the fixture's parameters, our mixer's parallel face (with ``segment_ids`` for the
  documents) and its step face from the empty state give ``mixer/y`` and fla's final state. ``mixer/y``
  is our output stage applied to fla's recurrence output: the projections, norms and gates around the
  recurrence are ours, so this level checks how the mixer drives the recurrence (shifts, bonus,
  scales, the normaliser column, resets, the final state).

Each run uses the kernels' definition (``impl="reference"``); the fixture script also measures the
chunked and Pallas paths (where the kernel has one: not ``kernels.dplr`` nor
``kernels.forgetting_attention``) against fla and records every error in the fixture's metadata.

Differences on purpose (each compared where it is meant to be equal):

- gla: fla's ``naive_recurrent_gla`` multiplies q by d_k^(−1/2) itself; ``GatedLinearAttention``
  divides q by √d_k before the kernel. fla's GLA layer (flash-linear-attention 0.6.0) has an RMSNorm
  output norm, ours the paper's per-head GroupNorm (fla's RWKV6 layer has that one): outside the
  recurrence, ours on both sides.
- rwkv6: fla reads the state before the update plus the bonus u directly; ours runs ``kernels.gla``
  on keys, values and decays shifted by one step and adds the bonus per head. ``scale=1`` as fla's
  RWKV6 layer passes.
- retnet: fla scales q by d^(−1/2), ours scales k (the same q·k). fla's ``naive_retention`` is the
  parallel form ``(QKᵀ ⊙ D)V`` and returns no state, so the state is checked through the step face
  (each step's output reads it); the rotation (our RoPE for xPos) is applied before both.
- deltanet: fla's ``delta_rule_recurrence`` multiplies q by d_k^(−1/2) (no argument to turn it off);
  DeltaNet has no q scale, the head RMSNorm after it making a constant factor irrelevant. The kernel
  level applies the scale to our kernel's q; the mixer level multiplies fla's output by √d_k (exact:
  d_k = 16).
- gated_deltanet: ``scale=1``; the same recurrence.
- linear_attention: fla normalises by ``q·Σk + 1e-10``, ours by ``q·Σk + 1e-6`` (``EPS``, a guard
  against a zero denominator; φ = elu + 1 > 0 keeps the denominator ≥ q·k_t). The kernel level
  applies fla's 1e-10 to our kernel's two outputs (the value columns and the normaliser column);
  the mixer level compares ours (1e-6) with fla's (1e-10) as they are, a difference of at most
  1e-6 / (q·Σk) relative, below the tolerance here. Our state is fla's ``(S, z)`` as one matrix,
  z its last value column.
- rglru: HGRN's gates differ from the RG-LRU's, so the comparison is at the recurrence only:
  fla's ``naive_recurrent_hgrn`` (``h = exp(g) ⊙ h + x``) on the RG-LRU's ``x = b``,
  ``g = log a`` (−∞ at a reset). The kernel level runs the block continuing from a state (no reset
  at position 0, as ``RGLRUBlock.forward``'s ``h0``) so that the initial state matters; the block
  against the Griffin authors' code is ``tests/test_recurrentgemma.py``.
- kda: fla's ``naive_recurrent_kda`` at ``scale=1`` (ours has no q scale); the same recurrence, ours
  through ``kernels.dplr`` with :func:`kernels.dplr.delta_rule_as_dplr`.
- rwkv7: fla's ``dplr_recurrence`` (``S_t = Diag(e^gk) S + β (αᵀ S) + k vᵀ``) on the inputs fla's
  RWKV7 layer passes, ``α = −κ̂``, ``β = κ̂ ⊙ a_t``; ours is ``Diag(w) S − a (bᵀ S)`` with ``a = a_t ⊙ κ̂``,
  ``b = κ̂`` (the same product). ``dplr_recurrence`` multiplies q by d_k^(−1/2) (no argument to turn it
  off): the kernel level applies it to our kernel's r, the mixer level multiplies fla's output by √d_k
  (exact: d_k = 16) before our GroupNorm and bonus.
- hgrn2: fla's ``naive_recurrent_gla`` on ``k = 1 − f``, ``gk = log f`` (fla's HGRN2 layer calls the GLA
  kernels so); fla scales q by d_k^(−1/2) itself, ours divides q by √d_k before the kernel.
- fox: fla's ``naive_forgetting_attn`` (dense, global, ``scale`` d^(−1/2) as ours); attention returns
  no recurrent state (ours is a key/value cache), so only outputs and gradients are compared.
- gated_deltaproduct: fla's ``naive_recurrent_gated_delta_product`` at ``scale=1``, n_h = 2, keys,
  values and β one row per Householder sub-step (fla's layout, token t's rows ``t·n_h … t·n_h + n_h − 1``);
  the kernel level expands q (read on the last sub-step) and the decay (on the first) as the mixer does,
  with a chunk of ``SUB_STEP_CHUNK`` = 5 sub-steps so that the second document (sub-step 12) starts
  mid-chunk.
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

from hybrids.layers import document_starts
from hybrids.mixers import MIXERS, get_mixer
from hybrids.mixers.contract import supports_segments
from hybrids.mixers.retnet import head_decays
from kernels.delta import delta_rule
from kernels.dplr import delta_rule_as_dplr, dplr
from kernels.forgetting_attention import forgetting_attention
from kernels.gla import gla, gla_step
from kernels.scan import linear_scan

_spec = importlib.util.spec_from_file_location(
    "make_peer_fixtures_a", os.path.join(os.path.dirname(__file__), "fixtures", "make_peer_fixtures_a.py"))
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)  # sizes, the parameter mapping, and make() where torch is installed

TOL = 1e-5  # max |ours − fla| / max |fla|, float32 on both sides
FLA_EPS = 1e-10  # fla's linear-attention normaliser guard
KERNEL_IMPLS = ("reference", "xla", "pallas")  # Pallas in interpret mode
# Each test run checks the kernels' definition against fla, at the kernel level and inside the mixers
# (which compose the same way on every implementation); the chunked and Pallas paths are checked against
# the definition (outputs, state, every gradient) in test_kernels.py, test_delta.py, test_*_segments.py
# and test_pallas_*.py. The fixture script measures all three against fla (its metadata).
CI_IMPL = "reference"
DELTA_PALLAS_CHUNK = 16  # the delta rule's Pallas tiles need chunks of 2^n ≥ 16


@functools.lru_cache(maxsize=None)
def load(name):
  with np.load(maker.fixture_path(name), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def rel_error(ours, ref) -> float:
  """``max |ours − ref| / max |ref|`` over the finite entries of ``ref`` (rglru's g is −∞ at a reset)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  finite = np.isfinite(ref)
  assert np.array_equal(np.isfinite(ours), finite), "non-finite entries differ"
  return float(np.max(np.abs(ours - ref)[finite]) / np.max(np.abs(ref[finite])))


def two_documents():
  """``segment_ids [batch, time]``: the fixture's second document starts at ``SECOND_DOC`` (mid-chunk)."""
  return jnp.broadcast_to((jnp.arange(maker.TIME) >= maker.SECOND_DOC).astype(jnp.int32), (maker.BATCH, maker.TIME))


def ours_kernel(name, t, h0, impl, segment_ids=None):
  """Our kernels on fla's inputs ``t`` (our layout) → ``(o,)`` or ``(o, final state)`` in fla's convention.
  ``segment_ids``: documents (rglru: None, its resets being a = 0 in ``t``)."""
  interpret = impl == "pallas"
  seg = {} if segment_ids is None else {"segment_ids": segment_ids}
  run_gla = functools.partial(gla, chunk_size=maker.CHUNK, impl=impl, interpret=interpret, **seg)
  chunk = DELTA_PALLAS_CHUNK if interpret else maker.CHUNK  # the delta rule's (and dplr's) Pallas tiles
  if name == "gla":
    d_k = t["q"].shape[-1]
    return run_gla(t["q"] * d_k ** -0.5, t["k"], t["v"], t["gk"], h0)  # fla's scale on q
  if name == "rwkv6":
    # fla: o_t = r_tᵀ(S_{t−1} + diag(u) k_t v_tᵀ), S_t = diag(w_t) S_{t−1} + k_t v_tᵀ. Ours, as the mixer:
    # the inclusive gla on k, v, w shifted by one step reads S_{t−1}; the bonus is a per-head dot product.
    # At a document start the shifted key reads the previous document: zero it (S_{t−1} = 0 there).
    shift = lambda z: jnp.pad(z, ((0, 0), (1, 0)) + ((0, 0),) * (z.ndim - 2))[:, :-1]
    r, k, v, w, u = (t[n] for n in "rkvwu")
    k_prev = shift(k) if segment_ids is None else jnp.where(document_starts(segment_ids)[..., None, None], 0, shift(k))
    o, s_prev = run_gla(r, k_prev, shift(v), shift(w), h0)
    o = o + jnp.sum(r * u * k, axis=-1, keepdims=True) * v
    _, s = gla_step(r[:, -1], k[:, -1], v[:, -1], w[:, -1], s_prev)
    return o, s
  if name == "retnet":
    batch, time, heads, d = t["q"].shape
    log_decay = jnp.broadcast_to(head_decays(heads), (batch, time, heads))  # ours; fla computes its own γ_h
    o, _ = run_gla(t["q"], t["k"] * d ** -0.5, t["v"], log_decay)  # fla scales q, ours k: same q·k
    return (o,)
  if name in ("deltanet", "gated_deltanet"):
    q = t["q"] * t["q"].shape[-1] ** -0.5 if name == "deltanet" else t["q"]  # fla's fixed q scale
    return delta_rule(q, t["k"], t["v"], t["beta"], t.get("g"), h0, chunk_size=chunk, impl=impl,
                      interpret=interpret, **seg)
  if name == "linear_attention":
    v = jnp.concatenate([t["v"], jnp.ones(t["v"].shape[:-1] + (1,), t["v"].dtype)], axis=-1)  # the normaliser
    o, s = run_gla(t["q"], t["k"], v, None, h0)
    return o[..., :-1] / (o[..., -1:] + FLA_EPS), s
  if name == "rglru":
    return linear_scan(jnp.exp(t["g"]), t["x"], h0, impl=impl, interpret=interpret)
  if name == "kda":
    keys, a, b = delta_rule_as_dplr(t["k"], t["beta"], t["g"])
    return dplr(t["q"], keys, t["v"], a, b, t["g"], h0, chunk_size=chunk, impl=impl, interpret=interpret, **seg)
  if name == "rwkv7":
    # fla: S_t = Diag(e^gk) S + β (αᵀ S) + k vᵀ; ours: Diag(e^gk) S − a (bᵀ S) + k vᵀ, so a = β, b = −α.
    q = t["q"] * t["q"].shape[-1] ** -0.5  # dplr_recurrence's fixed q scale
    return dplr(q, t["k"], t["v"], t["beta"], -t["alpha"], t["gk"], h0, chunk_size=chunk, impl=impl,
                interpret=interpret, **seg)
  if name == "hgrn2":
    d_k = t["q"].shape[-1]
    return run_gla(t["q"] * d_k ** -0.5, t["k"], t["v"], t["gk"], h0)  # fla's scale on q
  if name == "fox":
    return (forgetting_attention(t["q"], t["k"], t["v"], t["g"], impl=impl, interpret=interpret, **seg),)
  if name == "gated_deltaproduct":
    # Token t as sub-steps (t, 1) … (t, n_h): the decay on the first, q_t read on the last (as the mixer).
    batch, time, heads, _ = t["q"].shape
    steps = t["k"].shape[1] // time
    on = lambda z, j: jnp.stack([z if i == j else jnp.zeros_like(z) for i in range(steps)], axis=2).reshape(
        (batch, time * steps) + z.shape[2:])
    q, log_decay = on(t["q"], steps - 1), on(t["g"], 0)
    keys, a, b = delta_rule_as_dplr(t["k"], t["beta"], log_decay)
    sub_seg = {} if segment_ids is None else {"segment_ids": jnp.repeat(segment_ids, steps, axis=1)}
    o, s = dplr(q, keys, t["v"], a, b, log_decay, h0, chunk_size=DELTA_PALLAS_CHUNK if interpret else maker.SUB_STEP_CHUNK,
                impl=impl, interpret=interpret, **sub_seg)
    return o.reshape((batch, time, steps) + o.shape[2:])[:, :, -1], s
  raise ValueError(f"ours_kernel: unknown mixer {name!r}; valid: {maker.MIXERS}")


def kernel_errors(name, fixture, impl) -> dict[str, float]:
  """Outputs, final state and every gradient (inputs and ``h0``) of our kernels on ``impl`` against fla's,
  in one row (``kernel/``) and in two documents (``docs/``, ``h0`` into the first)."""
  inputs = {level: {k.split("/")[-1]: jnp.asarray(v) for k, v in fixture.items() if k.startswith(f"{level}/in/")}
            for level in ("kernel", "docs")}
  h0 = jnp.asarray(fixture["kernel/h0"]) if "kernel/h0" in fixture else None
  cots = (jnp.asarray(fixture["kernel/cot/o"]),) + (
      (jnp.asarray(fixture["kernel/cot/S"]),) if "kernel/cot/S" in fixture else ())

  @jax.jit
  def outputs_and_grads(inputs, h0):
    results = {}
    for level, t in inputs.items():
      segment_ids = two_documents() if level == "docs" and name != "rglru" else None
      outs, vjp = jax.vjp(lambda t, h0: ours_kernel(name, t, h0, impl, segment_ids)[:len(cots)], t, h0)
      results[level] = outs, vjp(cots)
    return results

  errors = {}
  for level, (outs, (grad_t, grad_h0)) in outputs_and_grads(inputs, h0).items():
    errors[f"{level}[{impl}] o"] = rel_error(outs[0], fixture[f"{level}/o"])
    if len(outs) > 1:
      errors[f"{level}[{impl}] S"] = rel_error(outs[1], fixture[f"{level}/S"])
    for n, g in grad_t.items():
      errors[f"{level}[{impl}] grad {n}"] = rel_error(g, fixture[f"{level}/grad/{n}"])
    if h0 is not None:
      ref = fixture[f"{level}/grad/h0"]
      if np.any(ref):
        errors[f"{level}[{impl}] grad h0"] = rel_error(grad_h0, ref)
      else:  # rglru's documents reset at position 0, where h0 is forgotten
        errors[f"{level}[{impl}] grad h0 (zero)"] = float(np.max(np.abs(grad_h0)))
  return errors


def state_of(name, state):
  return state["h" if name == "rglru" else "S"]


def mixer_errors(name, fixture, impl=CI_IMPL) -> dict[str, float]:
  """With the fixture's parameters and kernels on ``impl``: the parallel face, the step face from the
  empty state and (where the mixer declares ``SEGMENTS``) two packed documents against fla."""
  module = maker.load_params(nnx.eval_shape(lambda: maker.build(name, impl)), fixture)
  graphdef, params = nnx.split(module)
  documents = supports_segments(type(module))

  @jax.jit
  def faces(params, x):
    m = nnx.merge(graphdef, params)
    out = {"mixer": m(x, return_state=True)}

    def step(state, x_t):
      y_t, state = m.step(x_t, state)
      return state, y_t

    # max_len: the cache of FoX's global attention (the recurrent mixers ignore it)
    state, ys = jax.lax.scan(step, m.init_state(x.shape[0], max_len=maker.TIME), jnp.moveaxis(x, 1, 0))
    out["step"] = jnp.moveaxis(ys, 0, 1), state
    if documents:
      out["docs"] = m(x, return_state=True, segment_ids=two_documents())
    return out

  errors = {}
  for level, (y, state) in faces(params, jnp.asarray(fixture["x"])).items():
    ref = "docs" if level == "docs" else "mixer"
    errors[f"{level} y"] = rel_error(y, fixture[f"{ref}/y"])
    if f"{ref}/S" in fixture:
      errors[f"{level} S"] = rel_error(state_of(name, state), fixture[f"{ref}/S"])
  return errors


def all_errors(name, fixture) -> dict[str, float]:
  """Every comparison for mixer ``name``, on every implementation (the fixture script records these)."""
  errors = {}
  for impl in KERNEL_IMPLS:
    errors.update(kernel_errors(name, fixture, impl))
    if impl != "pallas":  # the mixers' chunk of 4 is below the delta rule's Pallas tiles; same kernels as above
      errors.update({f"{k} [{impl}]": v for k, v in mixer_errors(name, fixture, impl).items()})
  return errors


def assert_within(errors):
  worst = {k: f"{v:.3g}" for k, v in errors.items() if not v <= TOL}
  assert not worst, f"max relative error above {TOL}: {worst}"


@pytest.mark.parametrize("name", maker.MIXERS)
def test_kernel_matches_fla(name):
  assert_within(kernel_errors(name, load(name), CI_IMPL))


@pytest.mark.parametrize("name", [n for n in ("kda", "rwkv7", "gated_deltaproduct") if n in maker.MIXERS])
def test_dplr_pallas_kernel_matches_fla(name):
  """The generalized delta rule's Pallas path (interpreted, chunks of 16) on fla's own inputs and outputs."""
  assert_within(kernel_errors(name, load(name), "pallas"))


@pytest.mark.parametrize("name", maker.MIXERS)
def test_mixer_matches_fla(name):
  """Parallel and step faces; two packed documents too where the mixer declares ``SEGMENTS``."""
  assert_within(mixer_errors(name, load(name)))


def test_every_mixer_is_checked_with_packed_documents():
  """:func:`test_mixer_matches_fla` checks two packed documents for every mixer here: all take them."""
  missing = [name for name in maker.MIXERS if not supports_segments(MIXERS[name])]
  assert not missing, f"documents not checked against fla at the mixer level (no SEGMENTS): {', '.join(missing)}"


@pytest.mark.parametrize("name", maker.MIXERS)
def test_fixture_metadata(name):
  """Each fixture names its reference exactly, and the errors measured when it was written are within TOL."""
  meta = json.loads(str(load(name)["meta"]))
  member, function = maker.FLA_FUNCTIONS[name]
  assert meta["reference"] == f"fla-core {maker.FLA_VERSION} ({maker.FLA_WHEEL}, sha256 {maker.FLA_WHEEL_SHA256})"
  assert (meta["file"], meta["function"]) == (member, function)
  assert meta["torch"].startswith(maker.TORCH_VERSION)
  assert meta["max_rel_error"] and max(meta["max_rel_error"].values()) <= TOL


def test_fixtures_are_fla():
  """The fixtures are what fla computes (where torch and the fla-core wheel are here: set
  ``PEER_A_FLA_WHEEL`` to the downloaded wheel)."""
  why = ("rebuilding the fixtures from fla needs torch and the fla-core wheel, which CI leaves out on "
         "purpose (the committed fixtures are checked on every run); see tests/fixtures/make_peer_fixtures_a.py")
  pytest.importorskip("torch", reason=why)
  wheel = os.environ.get("PEER_A_FLA_WHEEL")
  if not wheel:
    pytest.skip(f"PEER_A_FLA_WHEEL not set: {why}")
  import hashlib
  import tempfile
  assert hashlib.sha256(open(wheel, "rb").read()).hexdigest() == maker.FLA_WHEEL_SHA256
  with tempfile.TemporaryDirectory() as tmp:
    functions, _ = maker.load_fla(wheel, tmp)
    for name in maker.MIXERS:
      fresh, saved = maker.make(name, functions[name]), load(name)
      assert set(fresh) == set(saved) - {"meta"}, name
      for k in fresh:
        np.testing.assert_allclose(fresh[k], saved[k], rtol=1e-6, atol=1e-6, err_msg=f"{name}: {k}")
