"""Multi-query associative recall (MQAR), as defined in Zoology, generated vectorized.

Arora, Eyuboglu, et al., "Zoology: Measuring and Improving Recall in Efficient
Language Models" (2023); reference definition: ``multiquery_ar`` / ``_mqar`` in
HazyResearch/zoology ``zoology/data/associative_recall.py``.

Distribution of one example (Zoology's, kept exactly). For ``seq_len = L``,
``vocab_size = V`` and ``K = num_kv_pairs``:

1. Keys: ``K`` distinct tokens drawn without replacement from ``[1, V // 2)``;
   values: ``K`` distinct tokens from ``[V // 2, V)``, each a uniformly random
   ordered sample, independent of each other. (Token 0 is never a key.)
2. Context: the first ``2K`` tokens are ``k1 v1 k2 v2 ... kK vK``.
3. Queries: with ``space = (L - 2K) // 2``, draw ``K`` distinct gaps from
   ``{0, ..., space - 1}`` with probability proportional to the power law
   ``a * i**(a - 1)`` for ``i = 1..space`` (``a = power_a``; small ``a`` favours
   short gaps, ``a = 1`` is uniform), *sequentially without replacement* (draw a
   gap with probability ∝ p among those not yet drawn, repeat: what Zoology's
   ``np.random.choice(replace=False, p=p)`` does); ``gap_j`` is the ``j``-th
   draw. Key ``kj`` is written at position ``2K + 2 * gap_j`` of a length
   ``L + 1`` zero sequence; its value ``vj`` is the next-token target of that
   position (the value itself is not written into the input).
4. Shift: ``inputs = seq[:L]`` and ``labels[t]`` is the target after reading
   ``inputs[:t+1]``, i.e. ``labels[2K + 2*gap_j] = vj`` and every other label is
   ``IGNORE_LABEL`` (-100). Exactly ``K`` labels per example carry loss, only at
   query positions.
5. If ``random_non_queries``: every remaining 0 in ``inputs`` is replaced by an
   independent token drawn uniformly from ``[0, V)`` (as in Zoology, the noise
   may collide with keys/values; it only makes the task harder to shortcut).

Zoology asserts ``L`` even, ``V > L`` and ``4K <= L``; ``validate`` raises a
ValueError for each.

How it is sampled (``generate_block``), whole blocks of examples at once with
numpy, no per-example Python:

* keys/values: Floyd's algorithm run column by column over all rows (``K``
  vectorized steps; a uniformly random ``K``-subset per row), then each row's
  order is shuffled (``Generator.permuted``), giving a uniformly random ordered
  sample without replacement, as ``rng.choice(replace=False)``;
* gaps: the exponential-race form of Gumbel-top-k: with ``E_i ~ Exp(1)`` i.i.d.,
  the indices of the ``K`` smallest ``E_i / p_i`` in ascending order have
  exactly the distribution of ``K`` sequential weighted draws without replacement
  (``-log(E_i / p_i) = log p_i + Gumbel``); ``argpartition`` + a sort of ``K``
  values per row;
* positions are scattered with fancy indexing, and the noise is one
  ``integers`` draw for all zero positions of the block.

Determinism and random access. Examples are grouped in fixed blocks of
``R = rows_per_block(L) = max(1, 2**18 // L)`` consecutive indices; block ``b`` of
split ``stream`` (0 = train, 1 = eval) is generated from
``np.random.default_rng([seed, stream, b])`` alone. Example ``i`` is row
``i % R`` of block ``i // R``: it does not depend on how a caller chunks the
indices, on the number of examples in the split, or on which other examples
were generated (``generate_examples(start, count)`` and ``MQARSource[i]`` agree).
Zoology seeds its test split with ``seed + 10``; here the splits are independent
streams. Data order during training is defined only by the shuffle in
:mod:`hybrids.data.pipeline`.

``generate_example`` is the earlier per-example implementation of the same
distribution (one ``np.random.default_rng`` per example); it is kept as the
slow reference that the tests compare the vectorized sampler against.

Storage. Zoology's training set is a fixed set of ``num_train_examples``
reused every epoch, so :class:`MQARSource` materialises its split once (block by
block, lazily or in background threads via ``start_materialize``) and serves
batches by fancy indexing (``gather``). It stores only the inputs, as ``uint16``
when ``V <= 65536`` (else ``int32``), and the ``K`` query positions per row
(labels are rebuilt per batch: ``labels[qpos_j] = inputs[2j + 1]``): 100k × 1024
tokens take 205 MB instead of 820 MB for int32 inputs + labels, so even long
sequences fit in host memory, and a batch costs one row gather plus a ``K``-wide
scatter.

Segments (a mixture of cells; Zoology's ``DataConfig(train_configs=[...],
test_configs=[...])``, used by the Based paper's figure 2). ``data.train_segments`` and
``data.eval_segments`` are tuples of ``(seq_len, num_kv_pairs, num_examples)`` triples; ``()``
(or an absent field) means the single cell ``(data.seq_len, data.num_kv_pairs,
data.num_train_examples / num_eval_examples)``. Segment ``s`` of a split is an
:class:`MQARSource` keyed ``[seed, stream, block, s + 1]`` (:func:`block_key`), each segment
validated like a single cell (:func:`validate_segments`). Training: the segments are concatenated
into one fixed set (:class:`MQARMixture`) whose rows are all ``data.seq_len`` long (every training
segment must fit: ``seq_len <= data.seq_len``), a shorter example right-padded with input 0 and
label ``IGNORE_LABEL`` (exact for causal models), and the mixture is shuffled every epoch like a
single cell. Evaluation: each eval segment is batched on its own at its own length
(:func:`hybrids.data.eval_batches`), so a batch never mixes segments.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from hybrids.data.pipeline import IGNORE_LABEL, check_int

TRAIN_STREAM = 0
EVAL_STREAM = 1
BLOCK_TOKENS = 2**18  # tokens per generation block: rows_per_block(L) = BLOCK_TOKENS // L


def validate(*, seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float,
             num_train_examples: int, num_eval_examples: int, random_non_queries: bool,
             seed: int, train_segments=(), eval_segments=()) -> None:
    """Raise ValueError (naming the field, value and valid range) on a bad MQAR config.

    ``data.num_kv_pairs`` is checked against ``seq_len`` only while a split uses the single cell
    (its segments empty); every other field always.
    """
    check_int("seq_len", seq_len, 2)
    if seq_len % 2 != 0:
        raise ValueError(f"seq_len={seq_len} is invalid for MQAR: must be even")
    check_int("data.vocab_size", vocab_size, 1)
    if vocab_size <= seq_len:
        raise ValueError(
            f"data.vocab_size={vocab_size} is invalid for MQAR: must be > seq_len={seq_len}"
        )
    check_int("data.num_kv_pairs", num_kv_pairs, 1)
    single_cell = not (parse_segments("data.train_segments", train_segments)
                       and parse_segments("data.eval_segments", eval_segments))
    if single_cell and 4 * num_kv_pairs > seq_len:
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
    validate_segments("data.train_segments", train_segments, vocab_size=vocab_size,
                      max_seq_len=seq_len)
    validate_segments("data.eval_segments", eval_segments, vocab_size=vocab_size)


def parse_segments(field: str, value: Any) -> tuple[tuple[int, int, int], ...]:
    """``data.train_segments`` / ``data.eval_segments`` → a tuple of ``(seq_len, num_kv_pairs,
    num_examples)`` int triples (a list of lists, as ``config.json`` holds it, is accepted).

    Raises ValueError naming ``field`` (and the segment's index) if it is not a sequence of int
    triples. ``()`` / ``None``: no segments.
    """
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{field}={value!r} is invalid: must be a tuple of "
                         "(seq_len, num_kv_pairs, num_examples) triples, or () for none")
    out = []
    for i, seg in enumerate(value):
        ok = isinstance(seg, (tuple, list)) and len(seg) == 3 and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in seg)
        if not ok:
            raise ValueError(f"{field}[{i}]={seg!r} is invalid: must be a (seq_len, num_kv_pairs, "
                             "num_examples) triple of ints")
        out.append(tuple(int(x) for x in seg))
    return tuple(out)


def validate_segments(field: str, segments, *, vocab_size: int, max_seq_len: int | None = None
                      ) -> tuple[tuple[int, int, int], ...]:
    """Parse ``segments`` (:func:`parse_segments`) and check each against MQAR's own constraints.

    Every segment needs an even ``seq_len >= 2``, ``vocab_size > seq_len``,
    ``1 <= num_kv_pairs <= seq_len // 4`` and ``num_examples >= 1``; ``max_seq_len`` (training:
    ``data.seq_len``, the rows' length) bounds ``seq_len``. Returns the parsed segments.
    """
    segments = parse_segments(field, segments)
    for i, (seq_len, k, n) in enumerate(segments):
        name = f"{field}[{i}]=({seq_len}, {k}, {n})"
        if seq_len < 2 or seq_len % 2:
            raise ValueError(f"{name} is invalid for MQAR: its seq_len must be even and >= 2")
        if max_seq_len is not None and seq_len > max_seq_len:
            raise ValueError(f"{name} is invalid: its seq_len {seq_len} exceeds data.seq_len="
                             f"{max_seq_len}, the length of every training row (set data.seq_len "
                             "to the longest training segment)")
        if vocab_size <= seq_len:
            raise ValueError(f"{name} is invalid for MQAR: data.vocab_size={vocab_size} must be > "
                             f"its seq_len {seq_len}")
        if k < 1 or 4 * k > seq_len:
            raise ValueError(f"{name} is invalid for MQAR: its num_kv_pairs must be in "
                             f"[1, seq_len // 4 = {seq_len // 4}]")
        if n < 1:
            raise ValueError(f"{name} is invalid: its num_examples must be >= 1")
    return segments


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """Power-law distribution over query gaps: p[i-1] ∝ a * i**(a-1), i = 1..space.

    Returns float64 [space], summing to 1.
    """
    i = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1.0)
    return p / p.sum()


def rows_per_block(seq_len: int) -> int:
    """Examples per generation block at ``seq_len`` (part of the data definition)."""
    return max(1, BLOCK_TOKENS // int(seq_len))


# ----------------------------------------------------------------------------- vectorized


def sample_distinct(rng: np.random.Generator, rows: int, k: int, size: int) -> np.ndarray:
    """Per row, a uniformly random ordered sample of ``k`` distinct ints from ``[0, size)``.

    Floyd's algorithm over all rows at once (``k`` steps: draw ``t`` in
    ``[0, j]``; take ``j`` instead if ``t`` is already in the row), then a
    uniform shuffle of each row. Returns int64 [rows, k].
    """
    if not 0 < k <= size:
        raise ValueError(f"cannot draw {k} distinct values from [0, {size})")
    sel = np.empty((rows, k), np.int64)
    for c, j in enumerate(range(size - k, size)):
        t = rng.integers(0, j + 1, size=rows)
        if c:
            t = np.where((sel[:, :c] == t[:, None]).any(axis=1), j, t)
        sel[:, c] = t
    return rng.permuted(sel, axis=1)


def sample_gaps(rng: np.random.Generator, rows: int, k: int, gap_p: np.ndarray) -> np.ndarray:
    """Per row, ``k`` sequential weighted draws without replacement from ``[0, len(gap_p))``.

    Exponential race (Gumbel-top-k): the ``k`` smallest ``Exp(1) / p`` in
    ascending order. Returns int64 [rows, k] in draw order.
    """
    race = rng.standard_exponential(size=(rows, gap_p.shape[0])) / gap_p
    top = np.argpartition(race, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(race, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def block_key(seed: int, stream: int, block: int, segment: int | None = None) -> list[int]:
    """The ``np.random.default_rng`` key of a generation block.

    ``[seed, stream, block]`` for the single-cell split, ``[seed, stream, block, segment + 1]`` for
    segment ``segment`` of a mixture (``data.train_segments`` / ``data.eval_segments``). The ``+ 1``
    matters: ``SeedSequence`` pads a short key with zeros, so ``[s, t, b, 0]`` would repeat
    ``[s, t, b]``'s stream.
    """
    key = [int(seed), int(stream), int(block)]
    return key if segment is None else key + [int(segment) + 1]


def generate_block(seed: int, stream: int, block: int, *, seq_len: int, vocab_size: int,
                   num_kv_pairs: int, gap_p: np.ndarray, random_non_queries: bool,
                   segment: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Examples ``[block * R, (block + 1) * R)`` of split ``stream`` (``R = rows_per_block``).

    ``segment``: which segment of a mixture (None: the single-cell split); see :func:`block_key`.
    Returns ``(inputs, query_pos)``: int32 [R, seq_len] and int64 [R, K], where
    ``query_pos[:, j] = 2K + 2 * gap_j`` is where key ``j`` is queried (so
    ``labels = labels_from(inputs, query_pos)``).
    """
    rows, k, v = rows_per_block(seq_len), int(num_kv_pairs), int(vocab_size)
    rng = np.random.default_rng(block_key(seed, stream, block, segment))
    half = v // 2
    keys = sample_distinct(rng, rows, k, half - 1) + 1  # from [1, V/2)
    values = sample_distinct(rng, rows, k, v - half) + half  # from [V/2, V)
    query_pos = 2 * k + 2 * sample_gaps(rng, rows, k, gap_p)
    inputs = np.zeros((rows, seq_len), np.int32)
    inputs[:, 0:2 * k:2] = keys
    inputs[:, 1:2 * k:2] = values
    inputs[np.arange(rows)[:, None], query_pos] = keys
    if random_non_queries:
        zero = inputs == 0
        inputs[zero] = rng.integers(0, v, size=int(np.count_nonzero(zero)), dtype=np.int32)
    return inputs, query_pos


def labels_from(inputs: np.ndarray, query_pos: np.ndarray) -> np.ndarray:
    """Labels of examples ``inputs`` [n, L] with queries at ``query_pos`` [n, K]: int32 [n, L]."""
    n, k = query_pos.shape
    labels = np.full(inputs.shape, IGNORE_LABEL, np.int32)
    flat = (np.arange(n, dtype=np.intp) * inputs.shape[1])[:, None] + query_pos
    labels.reshape(-1)[flat] = inputs[:, 1:2 * k:2]
    return labels


def generate_examples(seed: int, stream: int, start: int, count: int, *, seq_len: int,
                      vocab_size: int, num_kv_pairs: int, power_a: float,
                      random_non_queries: bool, segment: int | None = None
                      ) -> dict[str, np.ndarray]:
    """Examples ``[start, start + count)`` of split ``stream``, from the blocks that hold them.

    Returns ``{"inputs": int32 [count, seq_len], "labels": int32 [count, seq_len]}``;
    row ``r`` equals ``MQARSource(...)[start + r]`` for the same parameters.
    """
    start, count = int(start), int(count)
    if start < 0 or count < 0:
        raise ValueError(f"start={start} and count={count} must be >= 0")
    rows = rows_per_block(seq_len)
    gap_p = gap_probabilities((seq_len - 2 * num_kv_pairs) // 2, float(power_a))
    first, last = start // rows, -(-(start + count) // rows)
    parts = [generate_block(seed, stream, b, seq_len=seq_len, vocab_size=vocab_size,
                            num_kv_pairs=num_kv_pairs, gap_p=gap_p,
                            random_non_queries=random_non_queries, segment=segment)
             for b in range(first, last)]
    lo = start - first * rows
    if parts:
        inputs = np.concatenate([p[0] for p in parts])[lo:lo + count]
        qpos = np.concatenate([p[1] for p in parts])[lo:lo + count]
    else:
        inputs = np.zeros((0, seq_len), np.int32)
        qpos = np.zeros((0, num_kv_pairs), np.int64)
    return {"inputs": inputs, "labels": labels_from(inputs, qpos)}


# ----------------------------------------------------------------------------- reference


def generate_example(
    rng: np.random.Generator,
    *,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    gap_p: np.ndarray,
    random_non_queries: bool,
) -> dict[str, np.ndarray]:
    """One MQAR example (see module docstring): the per-example reference sampler.

    Slow (Python per example); the training/eval data come from ``generate_block``.

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
    # Weighted sampling without replacement has the same distribution as the
    # top-k of log(p) + Gumbel noise, in descending order (Gumbel-top-k trick).
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


# ----------------------------------------------------------------------------- source


class MQARSource:
    """Random-access MQAR split: ``source[i]`` = example ``i``; ``source.gather(idx)`` = a batch.

    Example ``i`` is row ``i % R`` of block ``i // R``, generated from
    ``np.random.default_rng([seed, stream, i // R])`` (``stream`` 0 = train,
    1 = eval; see the module docstring; segment ``s`` of a mixture appends ``s + 1``
    to the key). Blocks are generated on first use (or
    all at once by ``materialize`` / ``start_materialize``) and kept, compactly,
    for the life of the source; access is thread-safe.
    """

    def __init__(self, *, num_examples: int, seq_len: int, vocab_size: int,
                 num_kv_pairs: int, power_a: float, random_non_queries: bool,
                 seed: int, stream: int, segment: int | None = None):
        self._n = int(num_examples)
        self._seq_len, self._k = int(seq_len), int(num_kv_pairs)
        self._kwargs = dict(seq_len=self._seq_len, vocab_size=int(vocab_size),
                            num_kv_pairs=self._k,
                            random_non_queries=bool(random_non_queries),
                            segment=None if segment is None else int(segment))
        space = (self._seq_len - 2 * self._k) // 2
        self._gap_p = gap_probabilities(space, float(power_a))
        self._seed = int(seed)
        self._stream = int(stream)
        self._rows = rows_per_block(self._seq_len)
        self._num_blocks = -(-self._n // self._rows)
        token_dtype = np.uint16 if int(vocab_size) <= 2**16 else np.int32
        pos_dtype = np.uint16 if self._seq_len <= 2**16 else np.int32
        self._inputs = np.empty((self._n, self._seq_len), token_dtype)
        self._qpos = np.empty((self._n, self._k), pos_dtype)
        self._ready = np.zeros(self._num_blocks, bool)
        self._all_ready = False
        self._block_locks = [threading.Lock() for _ in range(self._num_blocks)]
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def num_kv_pairs(self) -> int:
        return self._k

    def _fill(self, block: int) -> None:
        with self._block_locks[block]:
            if self._ready[block]:
                return
            inputs, qpos = generate_block(self._seed, self._stream, block, gap_p=self._gap_p,
                                          **self._kwargs)
            lo, hi = block * self._rows, min(self._n, (block + 1) * self._rows)
            self._inputs[lo:hi] = inputs[:hi - lo]
            self._qpos[lo:hi] = qpos[:hi - lo]
            self._ready[block] = True

    def materialize(self, num_threads: int | None = None) -> "MQARSource":
        """Generate every block now (``num_threads`` workers; default ``min(8, cpus)``)."""
        if not self._all_ready:
            workers = num_threads or min(8, os.cpu_count() or 1)
            if workers > 1 and self._num_blocks > 1:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(self._fill, range(self._num_blocks)))
            else:
                for b in range(self._num_blocks):
                    self._fill(b)
            self._all_ready = True
        return self

    def start_materialize(self, num_threads: int | None = None) -> "MQARSource":
        """``materialize`` in a background thread (e.g. while the model compiles); idempotent."""
        if self._thread is None and not self._all_ready:
            self._thread = threading.Thread(target=self.materialize, args=(num_threads,),
                                            name="mqar-materialize", daemon=True)
            self._thread.start()
        return self

    def gather(self, indices) -> dict[str, np.ndarray]:
        """The examples ``indices`` (int array [n]) as a batch of int32 [n, seq_len] arrays."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            bad = idx[(idx < 0) | (idx >= self._n)][0]
            raise IndexError(f"MQAR index {bad} out of range [0, {self._n})")
        if not self._all_ready:
            blocks = np.unique(idx // self._rows)
            for b in blocks[~self._ready[blocks]]:
                self._fill(int(b))
            if self._ready.all():
                self._all_ready = True
        inputs = self._inputs[idx].astype(np.int32)
        return {"inputs": inputs, "labels": labels_from(inputs, self._qpos[idx])}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._n:
            raise IndexError(f"MQAR index {index} out of range [0, {self._n})")
        batch = self.gather([index])
        return {k: v[0] for k, v in batch.items()}

    def __repr__(self) -> str:
        return (f"MQARSource(n={self._n}, seed={self._seed}, stream={self._stream}, "
                f"{self._kwargs})")


# ----------------------------------------------------------------------------- mixture


class MQARMixture:
    """Training segments of several cells as one random-access split of ``seq_len``-long rows.

    ``segments`` are :class:`MQARSource` s (segment ``s`` generated from the keys
    ``[seed, stream, block, s + 1]``); example ``i`` of the mixture is example
    ``i - offsets[s]`` of the segment ``s`` that holds it (segments concatenated in order), right-
    padded to ``seq_len`` with input 0 and label ``IGNORE_LABEL``. For a causal model the padding is
    exact: tokens after an example cannot change its predictions, and they carry no loss. Every row
    keeps exactly its segment's ``K`` labels. The training order is the shuffle of
    :class:`hybrids.data.pipeline.StepBatches` over the whole mixture (Zoology iterates its segments'
    batches in order, unshuffled: every batch one segment).
    """

    def __init__(self, segments: list[MQARSource], seq_len: int):
        if not segments:
            raise ValueError("MQARMixture needs at least one segment")
        self._segments = list(segments)
        self._seq_len = int(seq_len)
        for s in self._segments:
            if s.seq_len > self._seq_len:
                raise ValueError(f"segment {s!r} is longer than the rows (seq_len={self._seq_len})")
        self.offsets = np.cumsum([0] + [len(s) for s in self._segments])

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def materialize(self, num_threads: int | None = None) -> "MQARMixture":
        for s in self._segments:
            s.materialize(num_threads)
        return self

    def start_materialize(self, num_threads: int | None = None) -> "MQARMixture":
        for s in self._segments:
            s.start_materialize(num_threads)
        return self

    def gather(self, indices) -> dict[str, np.ndarray]:
        """The examples ``indices`` (int array [n]) as int32 [n, seq_len] arrays, padded rows."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][0]
            raise IndexError(f"MQAR mixture index {bad} out of range [0, {n})")
        seg = np.searchsorted(self.offsets, idx, side="right") - 1
        inputs = np.zeros((idx.size, self._seq_len), np.int32)
        labels = np.full((idx.size, self._seq_len), IGNORE_LABEL, np.int32)
        for s in np.unique(seg):
            rows = seg == s
            part = self._segments[s].gather(idx[rows] - self.offsets[s])
            length = part["inputs"].shape[1]
            inputs[rows, :length] = part["inputs"]
            labels[rows, :length] = part["labels"]
        return {"inputs": inputs, "labels": labels}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"MQAR mixture index {index} out of range [0, {len(self)})")
        return {k: v[0] for k, v in self.gather([index]).items()}

    def __repr__(self) -> str:
        return f"MQARMixture(seq_len={self._seq_len}, segments={self._segments!r})"
