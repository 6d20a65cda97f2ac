"""Decoding: prefill with every mixer's parallel face, then one recurrent step per new token.

    tokens = generate(model, prompt, max_new_tokens=64, temperature=0.8, top_k=40, rng=jax.random.key(0))

From the command line, a trained run's newest checkpoint continues a prompt:

    python -m hybrids.generate --workdir RUN --prompt "Once upon a time" --max-new-tokens 200
    python -m hybrids.generate --workdir RUN --prompt-ids 5,17,3 --temperature 0.8 --top-k 40

``--prompt`` is encoded with the run's tokenizer (``data.tokenizer``: bytes, or the BPE ``tokenizer.json``
in the run directory or beside its prepared shards); runs without one (MQAR) take ``--prompt-ids``.
A bad request (token ids outside the vocabulary, a non-integer id, a NaN temperature, a missing run) is
one ``error:`` line and exit status 2.

The decode state of every mixer but global attention has a size independent of the generated length
(SWA: a ring buffer of ``window`` keys/values; recurrent mixers: their fixed state); global
attention's KV cache is sized to ``prompt + max_new_tokens``. The whole loop is one compiled
``lax.scan``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
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
  prompt = check_request(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k)
  graphdef, params = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, params, prompt, rng, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k))


def check_request(model, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0):
  """``prompt`` as ``int32 [batch, prompt_len]``; ValueError naming the argument for anything that cannot run.

  Token ids must be integers in ``[0, vocab)`` (a float prompt, a negative id or one past the
  vocabulary would be silently clipped by the embedding lookup); the temperature a finite number ≥ 0.
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
  if (isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating))
      or not math.isfinite(temperature) or temperature < 0):
    raise ValueError(f"temperature={temperature!r} must be a finite number ≥ 0 (0: greedy)")
  vocab = int(model.embed.num_embeddings)
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= vocab:
    raise ValueError(f"top_k={top_k!r} must be an integer in [0, vocab={vocab}] (0: no restriction)")
  array = np.asarray(prompt)
  if array.dtype.kind not in "iu":
    raise ValueError(f"prompt must hold integer token ids, not {array.dtype} values")
  if array.ndim != 2 or array.shape[1] == 0 or array.shape[0] == 0:
    raise ValueError(f"prompt must be [batch, prompt_len] with both ≥ 1, not shape {array.shape}")
  bad = array[(array < 0) | (array >= vocab)]
  if bad.size:
    raise ValueError(f"prompt token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
  max_len = getattr(model, "max_len", 0)
  if max_len and array.shape[1] + max_new_tokens > max_len:
    raise ValueError(f"prompt_len {array.shape[1]} + max_new_tokens {max_new_tokens} exceeds the learned position "
                     f"table's model.max_len={max_len}")
  return jnp.asarray(array, jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, params, prompt, *, max_len: int):
  logits, states = nnx.merge(graphdef, params).prefill(prompt, max_len=max_len)
  return logits[:, -1], states


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k"))
def _decode(graphdef, params, last_logits, states, rngs, *, temperature: float, top_k: int):
  model = nnx.merge(graphdef, params)

  def body(carry, rng_t):
    last_logits, states = carry
    token = sample(last_logits, rng_t, temperature=temperature, top_k=top_k)
    logits, states = model.step(token, states)
    return (logits, states), token

  (last_logits, states), tokens = jax.lax.scan(body, (last_logits, states), rngs)
  return last_logits, states, tokens.T


def generate_chunks(model, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0, rng=None,
                    chunk: int = 64):
  """:func:`generate`'s new tokens, ``chunk`` steps at a time: yields ``int32 [batch, ≤ chunk]`` arrays.

  The same per-step keys as :func:`generate` (one split of ``rng`` into ``max_new_tokens`` keys), so
  the concatenated chunks are its output; for a progress bar on long outputs.
  """
  prompt = check_request(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k)
  graphdef, params = nnx.split(model)
  rngs = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)
  last, states = _prefill(graphdef, params, prompt, max_len=prompt.shape[1] + max_new_tokens)
  for start in range(0, max_new_tokens, chunk):
    last, states, tokens = _decode(graphdef, params, last, states, rngs[start:start + chunk],
                                   temperature=float(temperature), top_k=int(top_k))
    yield np.asarray(tokens)


def state_bytes(model, batch: int = 1, *, max_len: int) -> int:
  """Bytes of the decode state for ``batch`` sequences decoded to ``max_len`` tokens (no allocation)."""
  shapes = jax.eval_shape(lambda: model.init_state(batch, max_len=max_len))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


# ----------------------------------------------------------------------------- command line

class GenerateError(ValueError):
  """A request that cannot run; the message names the flag (or the run's file) and the valid choices."""


def parse_prompt_ids(text: str, vocab: int) -> np.ndarray:
  """``"5,17,3"`` → ``int32 [1, 3]``; every id an integer in ``[0, vocab)``."""
  parts = [p.strip() for p in text.split(",") if p.strip()]
  if not parts:
    raise GenerateError(f"--prompt-ids={text!r} is empty: give comma-separated token ids, e.g. --prompt-ids 1,2,3")
  ids = []
  for part in parts:
    try:
      ids.append(int(part, 10))
    except ValueError:
      raise GenerateError(f"--prompt-ids: {part!r} is not an integer token id (ids are integers in [0, {vocab}))") from None
  bad = [i for i in ids if not 0 <= i < vocab]
  if bad:
    raise GenerateError(f"--prompt-ids: token id {bad[0]} is outside the run's vocabulary [0, {vocab})")
  return np.asarray([ids], np.int32)


def _decoder(tokenizer):
  """ids → text for the run's tokenizer (bytes: UTF-8 with invalid bytes replaced; the end-of-document id
  256 as a blank line); None when there is no tokenizer."""
  if tokenizer is None:
    return None
  inner = getattr(tokenizer, "_tokenizer", None)
  if inner is not None:
    return lambda ids: inner.decode([int(i) for i in ids], skip_special_tokens=False)
  return lambda ids: b"".join(bytes([int(i)]) if i < 256 else b"\n\n" for i in ids).decode("utf-8", "replace")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m hybrids.generate",
                              description="Continue a prompt with a trained run's newest checkpoint.")
  p.add_argument("--workdir", required=True, help="run directory (config.json, checkpoints/)")
  prompt = p.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="text, encoded with the run's tokenizer (text and shards runs)")
  prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3 (any run; MQAR runs need these)")
  p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
  p.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, decoded as one batch")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
  p.add_argument("--ids", action="store_true", help="print token ids instead of text")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def _request(args):
  """Check the flags and the run, cheap first; → (config, tokenizer or None, prompt int32 [n, len])."""
  from hybrids import evaluate

  if args.max_new_tokens < 1:
    raise GenerateError(f"--max-new-tokens={args.max_new_tokens} must be a positive integer")
  if not math.isfinite(args.temperature) or args.temperature < 0:
    raise GenerateError(f"--temperature={args.temperature} must be a finite number ≥ 0 (0: greedy)")
  if args.top_k < 0:
    raise GenerateError(f"--top-k={args.top_k} must be ≥ 0 (0: no restriction)")
  if args.num_samples < 1:
    raise GenerateError(f"--num-samples={args.num_samples} must be a positive integer")
  if args.seed < 0:
    raise GenerateError(f"--seed={args.seed} must be an integer ≥ 0")
  config = evaluate.load_config(args.workdir)
  try:
    vocab = int(config.model.vocab_size)
  except (AttributeError, KeyError, TypeError, ValueError):
    raise GenerateError(f"{os.path.join(args.workdir, 'config.json')} is not a usable run config") from None
  if args.top_k > vocab:
    raise GenerateError(f"--top-k={args.top_k} exceeds the run's vocabulary ({vocab})")
  tokenizer = None
  if config.data.name != "mqar":
    try:
      tokenizer = evaluate._tokenizer(config, args.workdir)
    except evaluate.EvalError as e:
      if args.prompt is not None:
        raise GenerateError(f"--prompt needs the run's tokenizer: {e}; or give --prompt-ids") from None
  if args.prompt_ids is not None:
    prompt = parse_prompt_ids(args.prompt_ids, vocab)
  elif tokenizer is None:
    raise GenerateError(f"--prompt: this run (data.name={config.data.name!r}) has no text tokenizer; give token "
                        f"ids in [0, {vocab}) with --prompt-ids, e.g. --prompt-ids 1,2,3")
  else:
    ids = tokenizer.encode(args.prompt)
    if not len(ids):
      raise GenerateError("--prompt is empty: give some text (or --prompt-ids)")
    prompt = np.asarray(ids, np.int32)[None]
  if config.model.get("position") == "learned" and prompt.shape[1] + args.max_new_tokens > int(config.model.max_len):
    raise GenerateError(f"prompt ({prompt.shape[1]} tokens) + --max-new-tokens={args.max_new_tokens} exceeds the "
                        f"learned position table of model.max_len={config.model.max_len}")
  return config, tokenizer, np.repeat(prompt, args.num_samples, axis=0)


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  from hybrids import evaluate

  try:
    config, tokenizer, prompt = _request(args)
    _, graphdef, abstract_state, params = evaluate.restore_params(args.workdir, config)
  except (GenerateError, evaluate.EvalError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, params)  # as hybrids.evaluate.Scorer does
  model = nnx.merge(graphdef, state)
  from tqdm.auto import tqdm

  chunks = []
  total = args.max_new_tokens
  with tqdm(total=total, unit="tok", disable=args.no_progress or total <= 64, file=sys.stderr) as bar:
    for tokens in generate_chunks(model, prompt, total, temperature=args.temperature, top_k=args.top_k,
                                  rng=jax.random.key(args.seed)):
      chunks.append(tokens)
      bar.update(tokens.shape[1])
  out = np.concatenate([prompt, *chunks], axis=1)
  decode = _decoder(tokenizer)
  for row in out:
    if args.ids or decode is None:
      print(",".join(map(str, row.tolist())))
    else:
      print(decode(row))
  return 0


if __name__ == "__main__":
  sys.exit(main())
