"""Long-context retrieval probes: passkey, needle-in-a-haystack, and MQAR with its pairs at a depth.

Used by ``python -m hybrids.evaluate --workdir RUN --eval retrieval`` (see :mod:`hybrids.evaluate`);
everything here is numpy and deterministic given a seed. Each probe builds examples of an exact
token length ``L`` in the batch contract of :mod:`hybrids.data`:
``{"inputs": int32 [L], "labels": int32 [L]}``, where ``labels[t]`` is the token to predict after
``inputs[:t+1]`` and ``IGNORE_LABEL`` marks positions that are not scored. Unlike training windows,
``inputs`` is the whole sequence (prompt and answer) and the answer's own tokens are scored through
the labels one position earlier, so one forward pass over ``L`` tokens scores an example.

Tasks (``TASKS``):

* ``passkey`` (Mohtashami & Jaggi 2023, "Landmark Attention"): the paper's instruction, filler text,
  ``" The pass key is 12345. Remember it. 12345 is the pass key."`` at depth ``d`` of the filler, more
  filler, then ``" What is the pass key? The pass key is"`` followed by the answer ``" 12345"`` (a
  random 5-digit key). An example is correct when every answer token is the model's argmax (under
  teacher forcing, which is exactly "greedy decoding reproduces the answer tokens").
* ``niah``: a single needle in the style of RULER's NIAH (Hsieh et al. 2024):
  ``" The special magic number for WORD is: 1234567."`` and the question
  ``" What is the special magic number for WORD? The special magic number for WORD is:"``, answer
  ``" 1234567"``; WORD is drawn from ``NIAH_WORDS``. Scored like passkey.
* ``mqar`` (for models trained on MQAR, whose vocabulary is not text): Zoology's key→value block
  (``2K`` tokens, keys from ``[1, V/2)``, values from ``[V/2, V)``) placed at depth ``d`` of a sequence of
  random filler tokens, and the ``K`` keys queried again, in random order, in the last ``2K``
  positions (key, then a filler token, as in Zoology's layout). Filler tokens are drawn uniformly from
  ``[0, V)`` minus this example's keys, so a filler token never looks like a query. Scored per query
  (the fraction of values predicted), as MQAR accuracy is.

Depth: with ``F`` filler tokens in an example, the needle (or the key→value block) starts after
``round(d · F)`` of them: ``d = 0`` puts it right after the instruction, ``d = 1`` right before the
question. :func:`passkey_example` returns the needle's exact start so tests can check it.

Filler for the text tasks is a token stream (:func:`filler_stream`): the training corpus's held-out
split for text runs (chosen by :mod:`hybrids.evaluate`), else ``BUILTIN_FILLER`` (the paper's
repeated sentences) encoded with the run's tokenizer. Each example reads it from a seeded offset,
cycling when the stream is shorter than the example.

Tokenizers (:func:`load_tokenizer`): ``"bytes"`` (UTF-8 bytes, ids 0..255) or a HuggingFace
``tokenizer.json`` (byte-level BPE of :mod:`hybrids.data.text`). With BPE the prompt pieces are
encoded separately and concatenated, and the answer is scored in its canonical encoding; a model
that spells the key with other tokens counts as wrong.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from hybrids.data import mqar as mqar_lib
from hybrids.data.pipeline import IGNORE_LABEL

TASKS = ("passkey", "niah", "mqar")
TEXT_TASKS = ("passkey", "niah")

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                       "memorize it. I will quiz you about the important information there.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to "
                    "memorize it. I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = " The special magic number for {word} is: {key}."
NIAH_QUESTION = " What is the special magic number for {word}? The special magic number for {word} is:"
NIAH_WORDS = ("apple", "harbor", "violin", "meadow", "lantern", "glacier", "copper", "falcon", "orchid",
              "canyon", "velvet", "saffron", "beacon", "thistle", "quartz", "juniper")
ANSWER = " {key}"
# Mohtashami & Jaggi's filler: the same five sentences repeated.
BUILTIN_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# Streams of np.random.default_rng([seed, TASK_STREAM[task], length, depth_millis, sample]).
TASK_STREAM = {"passkey": 101, "niah": 102, "mqar": 103}


# ----------------------------------------------------------------------------- tokenizers

class Tokenizer(Protocol):
  name: str

  def encode(self, text: str) -> np.ndarray:
    """``text`` → int32 [n_tokens] (no special tokens added)."""


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255 (``data.tokenizer="bytes"``; the EOD token 256 is never produced)."""

  name = "bytes"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


class HFTokenizer:
  """A HuggingFace ``tokenizers`` tokenizer loaded from a ``tokenizer.json``."""

  def __init__(self, path: str, text: str | None = None):
    """``text``: the file's contents, already read (e.g. from ``gs://``; ``tokenizers`` opens local files only)."""
    from tokenizers import Tokenizer as _Tokenizer

    self.name = f"tokenizer.json ({path})"
    self._tokenizer = _Tokenizer.from_file(path) if text is None else _Tokenizer.from_str(text)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def load_tokenizer(spec: str, directories: Sequence[str]) -> Tokenizer:
  """The tokenizer of ``data.tokenizer = spec``: bytes, or the first ``tokenizer.json`` in ``directories``.

  A BPE run keeps its ``tokenizer.json`` in the run directory (the text cache) or beside prepared
  shards; a missing file is a ValueError naming where it was looked for.
  """
  if spec == "bytes":
    return ByteTokenizer()
  if isinstance(spec, str) and spec.startswith("bpe:"):
    for directory in directories:
      path = os.path.join(directory, "tokenizer.json")
      if directory and os.path.isfile(path):
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer={spec!r} but no tokenizer.json in {', '.join(map(repr, directories))}")
  raise ValueError(f"data.tokenizer={spec!r}: retrieval supports 'bytes' and 'bpe:VOCAB'")


def filler_stream(tokenizer: Tokenizer, min_tokens: int = 4096) -> np.ndarray:
  """``BUILTIN_FILLER`` repeated and encoded: int32 [≥ min_tokens] (a whole number of repeats)."""
  one = tokenizer.encode(BUILTIN_FILLER)
  return np.tile(one, -(-min_tokens // len(one)))


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass(frozen=True)
class RetrievalExample:
  """One probe of exact length ``L``.

  ``inputs``/``labels``: int32 [L] (labels ``IGNORE_LABEL`` except where an answer token is scored);
  ``needle_start``: index in ``inputs`` of the needle's first token (MQAR: the first key);
  ``answer``: the answer string (passkey/NIAH) or the values in query order (MQAR).
  """

  inputs: np.ndarray
  labels: np.ndarray
  needle_start: int
  answer: str


def _rng(seed: int, task: str, length: int, depth: float, sample: int) -> np.random.Generator:
  return np.random.default_rng([seed, TASK_STREAM[task], length, int(round(depth * 1000)), sample])


def check_depth(depth: float) -> None:
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth!r} must be in [0, 1] (0: needle first, 1: needle just before the question)")


def _place(instruction, filler, needle, question, answer, *, length, depth, offset) -> RetrievalExample:
  """Lay out instruction | filler[:a] | needle | filler[a:F] | question | answer in exactly ``length`` tokens."""
  fixed = len(instruction) + len(needle) + len(question) + len(answer)
  n_filler = length - fixed
  if n_filler < 0:
    raise ValueError(f"length {length} is too short for this probe: its fixed text alone is {fixed} tokens "
                     "with this tokenizer")
  take = np.resize(np.roll(filler, -offset), n_filler).astype(np.int32)  # cycles a short stream
  before = int(round(depth * n_filler))
  inputs = np.concatenate([instruction, take[:before], needle, take[before:], question, answer]).astype(np.int32)
  labels = np.full(length, IGNORE_LABEL, np.int32)
  answer_start = length - len(answer)
  labels[answer_start - 1:length - 1] = answer  # the answer's tokens, predicted one position earlier
  return RetrievalExample(inputs, labels, len(instruction) + before, "")


def passkey_example(tokenizer: Tokenizer, filler: np.ndarray, *, length: int, depth: float, seed: int = 0,
                    sample: int = 0) -> RetrievalExample:
  """Mohtashami & Jaggi's passkey probe of exactly ``length`` tokens with the needle at ``depth``."""
  check_depth(depth)
  rng = _rng(seed, "passkey", length, depth, sample)
  key = str(int(rng.integers(10_000, 100_000)))
  example = _place(tokenizer.encode(PASSKEY_INSTRUCTION), filler, tokenizer.encode(PASSKEY_NEEDLE.format(key=key)),
                   tokenizer.encode(PASSKEY_QUESTION), tokenizer.encode(ANSWER.format(key=key)),
                   length=length, depth=depth, offset=int(rng.integers(len(filler))))
  return dataclasses.replace(example, answer=key)


def niah_example(tokenizer: Tokenizer, filler: np.ndarray, *, length: int, depth: float, seed: int = 0,
                 sample: int = 0) -> RetrievalExample:
  """A single-needle NIAH probe (RULER style): a magic number for a word, asked for at the end."""
  check_depth(depth)
  rng = _rng(seed, "niah", length, depth, sample)
  word = NIAH_WORDS[int(rng.integers(len(NIAH_WORDS)))]
  key = str(int(rng.integers(1_000_000, 10_000_000)))
  example = _place(tokenizer.encode(NIAH_INSTRUCTION), filler, tokenizer.encode(NIAH_NEEDLE.format(word=word, key=key)),
                   tokenizer.encode(NIAH_QUESTION.format(word=word)), tokenizer.encode(ANSWER.format(key=key)),
                   length=length, depth=depth, offset=int(rng.integers(len(filler))))
  return dataclasses.replace(example, answer=key)


def check_mqar(length: int, num_kv_pairs: int, vocab_size: int) -> None:
  """ValueError unless ``K`` pairs and their ``K`` queries fit in ``length`` and the vocabulary."""
  if num_kv_pairs < 1 or 4 * num_kv_pairs > length:
    raise ValueError(f"MQAR with num_kv_pairs={num_kv_pairs} needs length ≥ 4·num_kv_pairs = "
                     f"{4 * num_kv_pairs} (got {length})")
  if vocab_size // 2 - 1 < num_kv_pairs or vocab_size - vocab_size // 2 < num_kv_pairs:
    raise ValueError(f"vocab_size={vocab_size} has too few keys/values for num_kv_pairs={num_kv_pairs}")


def mqar_depth_example(*, length: int, depth: float, vocab_size: int, num_kv_pairs: int, seed: int = 0,
                       sample: int = 0) -> RetrievalExample:
  """Zoology's key→value block at ``depth`` of random filler, all ``K`` keys queried in the last ``2K`` tokens."""
  check_depth(depth)
  check_mqar(length, num_kv_pairs, vocab_size)
  k, half = num_kv_pairs, vocab_size // 2
  rng = _rng(seed, "mqar", length, depth, sample)
  keys = rng.choice(half - 1, size=k, replace=False) + 1
  values = rng.choice(vocab_size - half, size=k, replace=False) + half
  # Filler excludes the keys: a filler token equal to a key would be an unscored query.
  allowed = np.setdiff1d(np.arange(vocab_size), keys)
  inputs = allowed[rng.integers(len(allowed), size=length)].astype(np.int32)
  n_filler = length - 4 * k
  start = int(round(depth * n_filler))
  inputs[start:start + 2 * k:2] = keys
  inputs[start + 1:start + 2 * k:2] = values
  order = rng.permutation(k)
  query_pos = length - 2 * k + 2 * np.arange(k)
  inputs[query_pos] = keys[order]
  labels = np.full(length, IGNORE_LABEL, np.int32)
  labels[query_pos] = values[order]
  return RetrievalExample(inputs, labels, start, " ".join(str(v) for v in values[order]))


def mqar_source(*, length: int, num_examples: int, vocab_size: int, num_kv_pairs: int, power_a: float,
                random_non_queries: bool, seed: int) -> mqar_lib.MQARSource:
  """Zoology's MQAR at any even ``length``: the eval stream of :mod:`hybrids.data.mqar`.

  Unlike training data this does not require ``vocab_size > length`` (Zoology's assertion, which
  only keeps training sequences from running short of distinct noise); at ``length = data.seq_len``
  item ``i`` is the run's own held-out example ``i``.
  """
  check_mqar(length, num_kv_pairs, vocab_size)
  if length % 2:
    raise ValueError(f"MQAR length {length} must be even")
  return mqar_lib.MQARSource(num_examples=num_examples, seq_len=length, vocab_size=vocab_size,
                             num_kv_pairs=num_kv_pairs, power_a=power_a, random_non_queries=random_non_queries,
                             seed=seed, stream=mqar_lib.EVAL_STREAM)


def make_examples(task: str, *, length: int, depth: float, samples: int, seed: int = 0,
                  tokenizer: Tokenizer | None = None, filler: np.ndarray | None = None, vocab_size: int = 0,
                  num_kv_pairs: int = 0) -> list[RetrievalExample]:
  """``samples`` probes of ``task`` (one of ``TASKS``) at one (length, depth) cell of the grid.

  Text tasks need ``tokenizer`` and ``filler``; ``mqar`` needs ``vocab_size`` and ``num_kv_pairs``.
  """
  if task not in TASKS:
    raise ValueError(f"retrieval task {task!r} is unknown; valid: {', '.join(TASKS)}")
  if task == "mqar":
    return [mqar_depth_example(length=length, depth=depth, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs,
                               seed=seed, sample=i) for i in range(samples)]
  build = passkey_example if task == "passkey" else niah_example
  return [build(tokenizer, filler, length=length, depth=depth, seed=seed, sample=i) for i in range(samples)]


# ----------------------------------------------------------------------------- scoring

def answer_correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """``logits: [batch, L, vocab]``, ``labels: int [batch, L]`` → bool [batch, L]: argmax == label where scored."""
  return (np.argmax(logits, -1) == labels) & (labels != IGNORE_LABEL)


def example_accuracy(correct: np.ndarray, labels: np.ndarray, *, exact_match: bool) -> np.ndarray:
  """Per-example score in [0, 1], float [batch]: all answer tokens right (exact match) or the fraction right.

  Rows without scored labels (batch padding) score NaN, so callers can drop them.
  """
  scored = labels != IGNORE_LABEL
  count = scored.sum(-1)
  right = (correct & scored).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    score = (right == count).astype(np.float64) if exact_match else right / count
  return np.where(count > 0, score, np.nan)


def exact_match(task: str) -> bool:
  """Passkey and NIAH score whole answers; MQAR scores each query."""
  return task in TEXT_TASKS
