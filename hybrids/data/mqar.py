"""Multi-query associative recall (MQAR), as defined in Zoology.

Arora, Eyuboglu, et al., "Zoology: Measuring and Improving Recall in Efficient
Language Models" (2023); reference definition: ``multiquery_ar`` / ``_mqar`` in
HazyResearch/zoology ``zoology/data/associative_recall.py``. This module
reimplements that definition per example (so any example index can be generated
independently, as a grain random-access source):

For ``seq_len = L``, ``vocab_size = V`` and ``K = num_kv_pairs``:

1. Keys: ``K`` distinct tokens drawn without replacement from ``[1, V // 2)``;
   values: ``K`` distinct tokens from ``[V // 2, V)``. (Token 0 is never a key.)
2. Context: the first ``2K`` tokens are ``k1 v1 k2 v2 ... kK vK``.
3. Queries: with ``space = (L - 2K) // 2``, draw ``K`` distinct gaps from
   ``{0, ..., space - 1}`` with probability proportional to the power law
   ``a * i**(a - 1)`` for ``i = 1..space`` (``a = power_a``; small ``a`` favours
   short gaps, ``a = 1`` is uniform). Key ``kj`` is written at position
   ``2K + 2 * gap_j`` of a length ``L + 1`` zero sequence; its value ``vj`` is the
   next-token target of that position (the value itself is not written into the
   input).
4. Shift: ``inputs = seq[:L]`` and ``labels[t]`` is the target after reading
   ``inputs[:t+1]``, i.e. ``labels[2K + 2*gap_j] = vj`` and every other label is
   ``IGNORE_LABEL`` (-100). Exactly ``K`` labels per example carry loss.
5. If ``random_non_queries``: every remaining 0 in ``inputs`` is replaced by a
   token drawn uniformly from ``[0, V)`` (as in Zoology, the noise may collide with
   keys/values; it only makes the task harder to shortcut).

Zoology asserts ``L`` even, ``V > L`` and ``4K <= L``; ``validate`` raises a
ValueError for each. Zoology seeds the test split with ``seed + 10``; here train
example ``i`` uses ``np.random.default_rng([seed, 0, i])`` and eval example ``i``
uses ``np.random.default_rng([seed, 1, i])`` (independent streams, so the splits
differ and each example is reproducible in isolation). Data order during
training is defined only by the grain shuffle in :mod:`hybrids.data.pipeline`.
"""

from __future__ import annotations

import numpy as np

from hybrids.data.pipeline import IGNORE_LABEL, check_int

TRAIN_STREAM = 0
EVAL_STREAM = 1


def validate(*, seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float,
             num_train_examples: int, num_eval_examples: int, random_non_queries: bool,
             seed: int) -> None:
    """Raise ValueError (naming the field, value and valid range) on a bad MQAR config."""
    check_int("seq_len", seq_len, 2)
    if seq_len % 2 != 0:
        raise ValueError(f"seq_len={seq_len} is invalid for MQAR: must be even")
    check_int("data.vocab_size", vocab_size, 1)
    if vocab_size <= seq_len:
        raise ValueError(
            f"data.vocab_size={vocab_size} is invalid for MQAR: must be > seq_len={seq_len}"
        )
    check_int("data.num_kv_pairs", num_kv_pairs, 1)
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"seq_len={seq_len} too short for data.num_kv_pairs={num_kv_pairs}: "
            f"MQAR needs 4 * num_kv_pairs <= seq_len (num_kv_pairs <= {seq_len // 4})"
        )
    if (not isinstance(power_a, (int, float)) or isinstance(power_a, bool)
            or not np.isfinite(power_a) or power_a <= 0):
        raise ValueError(f"data.power_a={power_a!r} is invalid: must be a float > 0")
    check_int("data.num_train_examples", num_train_examples, 1)
    check_int("data.num_eval_examples", num_eval_examples, 1)
    if not isinstance(random_non_queries, (bool, np.bool_)):
        raise ValueError(
            f"data.random_non_queries={random_non_queries!r} is invalid: must be True or False"
        )
    check_int("data.seed", seed, 0)


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """Power-law distribution over query gaps: p[i-1] ∝ a * i**(a-1), i = 1..space.

    Returns float64 [space], summing to 1.
    """
    i = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1.0)
    return p / p.sum()


def generate_example(
    rng: np.random.Generator,
    *,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    gap_p: np.ndarray,
    random_non_queries: bool,
) -> dict[str, np.ndarray]:
    """One MQAR example (see module docstring).

    Args:
      rng: generator that fully determines the example.
      gap_p: ``gap_probabilities((seq_len - 2K) // 2, power_a)`` (precomputed).

    Returns:
      ``{"inputs": int32 [seq_len], "labels": int32 [seq_len]}``.
    """
    k = num_kv_pairs
    context = 2 * k
    half = vocab_size // 2
    keys = rng.choice(half - 1, size=k, replace=False) + 1  # from [1, V/2)
    values = rng.choice(vocab_size - half, size=k, replace=False) + half  # from [V/2, V)
    # Weighted sampling without replacement (draw a gap with probability ∝ p among
    # those not yet drawn, repeat; what Zoology's np.random.choice(replace=False,
    # p=p) does) has the same distribution as the top-k of log(p) + Gumbel noise,
    # in descending order (Gumbel-top-k trick). This is ~10x faster for long
    # sequences than the sequential draw.
    perturbed = np.log(gap_p) + rng.gumbel(size=gap_p.shape[0])
    gaps = np.argsort(-perturbed, kind="stable")[:k]

    # Length L + 1 so that the shift below yields L inputs and L next-token labels.
    seq = np.zeros(seq_len + 1, dtype=np.int64)
    seq[0:context:2] = keys
    seq[1:context:2] = values
    query_pos = context + 2 * gaps
    seq[query_pos] = keys
    targets = np.full(seq_len + 1, IGNORE_LABEL, dtype=np.int64)
    targets[query_pos + 1] = values  # the value "follows" its queried key

    inputs = seq[:-1]
    labels = targets[1:]
    if random_non_queries:
        # Zoology draws a full [L] noise vector and uses it where inputs == 0.
        noise = rng.integers(0, vocab_size, size=seq_len)
        inputs = np.where(inputs == 0, noise, inputs)
    return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}


class MQARSource:
    """Random-access MQAR source: ``source[i]`` = example ``i`` of one split.

    Example ``i`` is generated from ``np.random.default_rng([seed, stream, i])``
    (``stream`` 0 = train, 1 = eval), independently of every other index.
    """

    def __init__(self, *, num_examples: int, seq_len: int, vocab_size: int,
                 num_kv_pairs: int, power_a: float, random_non_queries: bool,
                 seed: int, stream: int):
        self._n = int(num_examples)
        self._kwargs = dict(seq_len=int(seq_len), vocab_size=int(vocab_size),
                            num_kv_pairs=int(num_kv_pairs),
                            random_non_queries=bool(random_non_queries))
        space = (seq_len - 2 * num_kv_pairs) // 2
        self._gap_p = gap_probabilities(space, float(power_a))
        self._seed = int(seed)
        self._stream = int(stream)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._n:
            raise IndexError(f"MQAR index {index} out of range [0, {self._n})")
        rng = np.random.default_rng([self._seed, self._stream, index])
        return generate_example(rng, gap_p=self._gap_p, **self._kwargs)

    def __repr__(self) -> str:
        return (f"MQARSource(n={self._n}, seed={self._seed}, stream={self._stream}, "
                f"{self._kwargs})")
