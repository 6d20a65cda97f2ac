"""Every mixer, alone in a tiny model, learns multi-query associative recall above chance on CPU.

Each model trains with the project's own optimizer and train step (``hybrids.train.Trainer``) but all
steps run inside one compiled ``lax.scan``, so a mixer costs one compile plus a fraction of a second.
The run-directory path (``hybrids.train.train``) is exercised for every mixer by test_train.py.
"""

import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx

from hybrids.config import get_config
from hybrids.data import mqar
from hybrids.mixers import MIXERS
from hybrids.model import HybridLM
from hybrids.train import Trainer, make_optimizer, resolve

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "quickstart.py")
SEQ_LEN, VOCAB, PAIRS, BATCH, STEPS = 32, 64, 2, 32, 300
EVAL_BATCHES = 4  # 4 · 32 sequences · 2 queries = 256 answers: chance is 8 ± 2.8 of them
# A model that only learned "a value follows" guesses among VOCAB/2 values.
CHANCE = 1.0 / (VOCAB // 2)


@functools.lru_cache(maxsize=None)  # one data set for every mixer in this process
def mqar_batches(seed: int, count: int) -> dict[str, np.ndarray]:
  gap_p = mqar.gap_probabilities((SEQ_LEN - 2 * PAIRS) // 2, 0.01)
  examples = [mqar.generate_example(np.random.default_rng([seed, i]), seq_len=SEQ_LEN, vocab_size=VOCAB,
                                    num_kv_pairs=PAIRS, gap_p=gap_p, random_non_queries=True)
              for i in range(count * BATCH)]
  return {key: np.stack([e[key] for e in examples]).reshape(count, BATCH, SEQ_LEN) for key in ("inputs", "labels")}


def learned_accuracy(pattern: tuple[str, ...]) -> float:
  config = resolve(get_config(QUICKSTART + ":" + pattern[0], {
      "model.pattern": pattern, "model.d_model": 32, "model.n_layers": 2, "model.window": 8,
      "data.seq_len": SEQ_LEN, "data.vocab_size": VOCAB, "data.num_kv_pairs": PAIRS,
      "train.steps": STEPS, "train.batch_size": BATCH, "train.lr": 1e-2, "train.warmup_steps": 10}))
  model = HybridLM(config.model, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = make_optimizer(config.train)
  trainer = Trainer(graphdef, jax.tree.map(lambda x: x, state), tx)

  @jax.jit
  def train_and_eval(params, train, held_out):
    def step(carry, batch):
      params, opt_state = carry
      params, opt_state, _ = trainer.train_step(params, opt_state, batch)
      return (params, opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), train)
    _, correct, count = trainer.eval_step(params, held_out)
    return correct / count

  held_out = jax.tree.map(lambda x: x.reshape(-1, SEQ_LEN), mqar_batches(seed=1, count=EVAL_BATCHES))
  return float(train_and_eval(params, mqar_batches(seed=0, count=STEPS), held_out))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_learns_mqar_above_chance(name):
  accuracy = learned_accuracy((name,))
  # Twice chance over 256 answers is ~3 standard deviations above guessing among the values.
  assert accuracy > 2 * CHANCE, (name, accuracy)
