"""Packed documents at the loss (issue 23): with ``data.document_boundaries`` the trainer's loss over a
row ``[A EOD B EOD]`` is the sum of A's and B's losses run alone, and the label after an EOD (the next
document's first token) is not scored; without it the documents leak into each other."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hybrids.config import model_config
from hybrids.data import IGNORE_LABEL
from hybrids.model import HybridLM
from hybrids.train import Trainer

EOD, VOCAB = 0, 32


def trainer(pattern, eod):
  c = model_config()
  c.vocab_size, c.d_model, c.n_layers, c.num_heads, c.window = VOCAB, 16, len(pattern), 2, 4
  c.pattern, c.dtype, c.param_dtype = pattern, "float32", "float32"
  c.attention_impl = c.scan_impl = c.gla_impl = c.delta_impl = "xla"
  model = HybridLM(c, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  return Trainer(graphdef, state, optax.sgd(0.0), scan_layers=False, document_eod=eod), nnx.to_pure_dict(state)


def rows(*documents, tail=5):
  """Inputs and next-token labels of one row (the documents, each closed by EOD)."""
  inputs = np.concatenate([np.append(d, EOD) for d in documents]).astype(np.int32)
  labels = np.append(inputs[1:], tail).astype(np.int32)
  return {"inputs": jnp.asarray(inputs[None]), "labels": jnp.asarray(labels[None])}


@pytest.mark.parametrize("pattern", [("mamba", "swa"), ("rglru", "attention")])
def test_packed_loss_is_the_sum_of_each_documents_loss(pattern):
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, VOCAB, 9), rng.integers(1, VOCAB, 6)
  t, params = trainer(pattern, EOD)
  evaluate = jax.jit(t.eval_step)
  packed = [float(x) for x in evaluate(params, rows(a, b))]
  alone = [sum(float(x) for x in pair) for pair in zip(evaluate(params, rows(a)), evaluate(params, rows(b)))]
  np.testing.assert_allclose(packed[0], alone[0], rtol=2e-5)  # loss sums
  assert packed[1:] == alone[1:]  # correct predictions and scored positions
  assert packed[2] == len(a) + len(b)  # every token of both documents, no label after an EOD
  # Without boundaries the second document reads the first: its loss differs.
  leaky, _ = trainer(pattern, None)
  assert abs(float(jax.jit(leaky.eval_step)(params, rows(a, b))[0]) - packed[0]) > 1e-3


def test_the_label_after_eod_is_not_scored():
  t, params = trainer(("attention",), EOD)
  batch = rows(np.array([3, 4]), np.array([5]))
  logits, labels, _ = t.scored(t.model(params), batch)
  np.testing.assert_array_equal(labels[0], [4, EOD, IGNORE_LABEL, EOD, IGNORE_LABEL])
