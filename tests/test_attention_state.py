"""Attention's and SWA's decode state after a packed row (the mixer contract's ``return_state`` with
``segment_ids``): the state of each row's last document alone, and decoding on from it as from that.

Rows whose last documents differ in length (5 and 7 tokens after 6 and 4, one row with two earlier
documents and a recurring id), GQA and RoPE in f32; global attention and SWA with a window shorter
and one longer than either last document. tests/test_segments.py checks a packed row's outputs and
gradients, and SWA's state with equal-length documents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import model_config
from hybrids.mixers import MIXERS
from test_segments import close  # the packed-document comparison (f32, 2e-5)

D_MODEL, STEPS = 16, 3
DOCUMENTS = [(2, 4, 5), (4, 7)]  # per row, its documents' lengths; ids 0, 1, 0 in row 0
TIME = sum(DOCUMENTS[0])
MAX_LEN = TIME + STEPS  # global attention's cache slots, packed and alone alike


def _segment_ids():
  rows = [np.concatenate([np.full(n, i % 2, np.int32) for i, n in enumerate(lengths)]) for lengths in DOCUMENTS]
  return jnp.asarray(np.stack(rows))


@pytest.mark.parametrize("name,window", [("attention", None), ("swa", 3), ("swa", 9)])
def test_packed_state_is_the_last_documents_alone(name, window):
  c = model_config()
  c.d_model, c.num_heads, c.num_kv_heads, c.attention_impl = D_MODEL, 4, 2, "xla"
  if window:
    c.window = window
  graphdef, params = nnx.split(MIXERS[name](c, rngs=nnx.Rngs(params=0)))
  x = jax.random.normal(jax.random.key(1), (len(DOCUMENTS), TIME, D_MODEL))
  more = jax.random.normal(jax.random.key(2), (STEPS, len(DOCUMENTS), D_MODEL))

  def decode(mixer, state, xs):
    ys = []
    for x_t in xs:
      y_t, state = mixer.step(x_t, state)
      ys.append(y_t)
    return jnp.stack(ys), state

  @jax.jit
  def run(params):
    mixer = nnx.merge(graphdef, params)
    _, packed = mixer(x, return_state=True, max_len=MAX_LEN, segment_ids=_segment_ids())
    alone = []
    for row, lengths in enumerate(DOCUMENTS):  # each row's last document alone, as a batch of one
      _, state = mixer(x[row:row + 1, TIME - lengths[-1]:], return_state=True, max_len=MAX_LEN)
      alone.append((state, *decode(mixer, state, more[:, row:row + 1])))
    return (packed, *decode(mixer, packed, more)), alone

  (packed, y_packed, after_packed), alone_rows = run(params)
  assert packed["pos"].tolist() == [lengths[-1] for lengths in DOCUMENTS]
  for row in range(len(DOCUMENTS)):
    alone, y_alone, after_alone = alone_rows[row]
    for of_row, of_alone in ((packed, alone), (after_packed, after_alone)):  # before and after decoding
      close(of_row["k"][row], of_alone["k"][0])
      close(of_row["v"][row], of_alone["v"][0])
      assert int(of_row["pos"][row]) == int(of_alone["pos"])
    close(y_packed[:, row], y_alone[:, 0])
