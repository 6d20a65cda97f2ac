"""Decoding through every mixer: greedy generation equals re-running the full model; bounded memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrids.config import model_config
from hybrids.generate import generate, state_bytes
from hybrids.mixers import MIXERS
from hybrids.model import HybridLM


def tiny_model(pattern):
  c = model_config()
  c.vocab_size, c.d_model, c.n_layers, c.num_heads, c.window = 40, 16, len(pattern), 2, 3
  c.pattern = pattern
  return HybridLM(c, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_greedy_generation_equals_full_forward_argmax(mixer):
  model = tiny_model((mixer, "swa"))
  prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 40)
  out = generate(model, prompt, 4)
  assert out.shape == (2, 9)
  np.testing.assert_array_equal(out[:, :5], prompt)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  logits = forward(params, out)  # one pass: position t's argmax must be token t+1
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:8], -1), out[:, 5:9])


def test_sampling_respects_top_k_and_is_reproducible():
  model = tiny_model(("rglru", "swa"))
  prompt = jnp.zeros((3, 2), jnp.int32)
  a = generate(model, prompt, 6, temperature=1.0, top_k=1, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, generate(model, prompt, 6))  # top-1 sampling is greedy
  b = generate(model, prompt, 6, temperature=1.5, top_k=5, rng=jax.random.key(2))
  np.testing.assert_array_equal(b, generate(model, prompt, 6, temperature=1.5, top_k=5, rng=jax.random.key(2)))
  # Every sampled token is among the 5 most likely after its prefix (the full forward's logits), and
  # the samples are not all greedy (else this would not test the sampling).
  logits = model(b)[:, 1:-1]  # position t predicts token t + 1; tokens 2… were sampled
  rank = jnp.sum(logits > jnp.take_along_axis(logits, b[:, 2:, None], -1), axis=-1)
  assert int(jnp.max(rank)) < 5 and int(jnp.max(rank)) > 0, rank


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_decode_memory_is_independent_of_length_except_global_attention(mixer):
  model = tiny_model((mixer,))
  short, long = state_bytes(model, max_len=64), state_bytes(model, max_len=4096)
  if mixer in ("attention", "fox"):  # global KV caches grow with max_len
    assert long > short
  else:
    assert long == short


def test_generate_rejects_bad_arguments():
  model = tiny_model(("swa",))
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, jnp.zeros((1, 2), jnp.int32), 0)
