"""The dispatch's record of each call's choice (``kernels.dispatch.recording``): what summary.json's
``kernels_per_call`` keeps, since one model's calls may choose differently from its model-wide record."""

import jax
import jax.numpy as jnp
from flax import nnx

from hybrids.config import model_config
from hybrids.model import HybridLM
from kernels import dispatch, gla, scan
from kernels.gla import gla as gla_call


def _array(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_recording_keeps_each_distinct_call_once_and_only_while_active():
  xla = scan.choice("xla")
  dispatch.called(xla, a=_array((2, 3)))  # no recording: nothing kept anywhere
  with dispatch.recording() as outer:
    dispatch.called(xla, a=_array((2, 3)), b=_array((2, 3), jnp.bfloat16), h0=None)
    with dispatch.recording() as inner:
      dispatch.called(xla, a=_array((2, 3)), b=_array((2, 3), jnp.bfloat16))  # the same call: kept once
      dispatch.called(xla, a=_array((4, 3)), b=_array((4, 3), jnp.bfloat16))
    dispatch.called(scan.choice("reference"), a=_array((2, 3)))
  dispatch.called(xla, a=_array((8, 3)))  # after: nothing kept
  first = {"family": "scan", "call": "a=float32[2,3], b=bfloat16[2,3]", **xla.record()}
  second = {"family": "scan", "call": "a=float32[4,3], b=bfloat16[4,3]", **xla.record()}
  assert inner == [first, second]  # the inner recording has only what ran inside it
  assert outer == [first, second, {"family": "scan", "call": "a=float32[2,3]", **scan.choice("reference").record()}]


def test_each_call_records_its_own_choice_and_why(monkeypatch):
  """The reviewer's case: on a GPU, the model-wide GLA record (bf16, head dim 64) says Pallas, while a
  float32 call and a call with d_v 256 each run XLA, and their records say why."""
  monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
  model_wide = gla.choice(64, 64, dtype=jnp.bfloat16)
  assert model_wide.impl == "pallas"

  def two_calls(q32, v32, q16, v256):
    return gla_call(q32, q32, v32)[0], gla_call(q16, q16, v256)[0]

  shapes = (_array((1, 16, 2, 64)), _array((1, 16, 2, 65)), _array((1, 16, 2, 64), jnp.bfloat16),
            _array((1, 16, 2, 256), jnp.bfloat16))
  with dispatch.recording() as calls:
    jax.eval_shape(two_calls, *shapes)
  assert [(c["family"], c["call"], c["impl"]) for c in calls] == [
      ("gla", "q=float32[1,16,2,64], v=float32[1,16,2,65]", "xla"),
      ("gla", "q=bfloat16[1,16,2,64], v=bfloat16[1,16,2,256]", "xla")]
  assert "float32 inputs" in calls[0]["rejected"]["pallas/triton"]
  assert "head dims ≤ 128" in calls[1]["rejected"]["pallas/triton"]


def test_a_models_trace_records_every_familys_calls():
  c = model_config()
  c.vocab_size, c.d_model, c.n_layers, c.num_heads, c.window = 50, 16, 2, 2, 4
  c.pattern, c.dtype = ("linear_attention", "rglru"), "bfloat16"
  graphdef, state = nnx.split(HybridLM(c, rngs=nnx.Rngs(params=0)))
  with dispatch.recording() as calls:
    jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, _array((2, 8), jnp.int32))
  by_family = {call["family"]: call for call in calls}
  assert len(calls) == 2 and set(by_family) == {"gla", "scan"}
  # linear attention in a bf16 model: float32 feature-mapped queries and values with the normaliser's
  # column (d_v 9), not the model-wide record's bf16 at head dim 8
  assert by_family["gla"]["call"] == "q=float32[2,8,2,8], v=float32[2,8,2,9]"
  assert by_family["scan"]["call"].startswith("a=")
  for call in calls:  # "auto" on a CPU: XLA, and the Pallas kernels passed over with the reason
    assert call["requested"] == "auto" and call["impl"] == "xla" and call["lowering"] is None
    assert call["rejected"]["pallas"] == dispatch._CPU_PALLAS
