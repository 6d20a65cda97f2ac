"""Decoding: prefill with every mixer's parallel face, then one recurrent step per new token.

    tokens = generate(model, prompt, max_new_tokens=64, temperature=0.8, top_k=40, rng=jax.random.key(0))

The decode state of every mixer but global attention has a size independent of the generated length
(SWA: a ring buffer of ``window`` keys/values; recurrent mixers: their fixed state); global
attention's KV cache is sized to ``prompt + max_new_tokens``. The whole loop is one compiled
``lax.scan``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample(logits, rng, *, temperature: float, top_k: int):
  """``logits: [batch, vocab]`` → ``int32 [batch]``; greedy when ``temperature == 0``."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, params, prompt, rng, *, max_new_tokens: int, temperature: float, top_k: int):
  model = nnx.merge(graphdef, params)
  logits, states = model.prefill(prompt, max_len=prompt.shape[1] + max_new_tokens)

  def body(carry, rng_t):
    last_logits, states = carry
    token = sample(last_logits, rng_t, temperature=temperature, top_k=top_k)
    logits, states = model.step(token, states)
    return (logits, states), token

  rngs = jax.random.split(rng, max_new_tokens)
  _, tokens = jax.lax.scan(body, (logits[:, -1], states), rngs)
  return jnp.concatenate([prompt, tokens.T.astype(prompt.dtype)], axis=1)


def generate(model, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0, rng=None):
  """Extend ``prompt: int [batch, prompt_len]`` by ``max_new_tokens`` tokens → ``[batch, prompt_len + new]``.

  ``temperature = 0``: greedy; otherwise sampling at that temperature, restricted to the ``top_k``
  most likely tokens when ``top_k > 0``.
  """
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
  if temperature < 0 or top_k < 0:
    raise ValueError(f"temperature={temperature} and top_k={top_k} must be ≥ 0")
  graphdef, params = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, params, jnp.asarray(prompt, jnp.int32), rng, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k))


def state_bytes(model, batch: int = 1, *, max_len: int) -> int:
  """Bytes of the decode state for ``batch`` sequences decoded to ``max_len`` tokens (no allocation)."""
  shapes = jax.eval_shape(lambda: model.init_state(batch, max_len=max_len))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
