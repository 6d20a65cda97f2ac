"""Dataset-agnostic grain plumbing: shuffling, process sharding, batching, iterators.

Every dataset in :mod:`hybrids.data` is a *random-access source*: a sequence whose
item ``i`` is a dict ``{"inputs": int32 [seq_len], "labels": int32 [seq_len]}``
computed deterministically from ``i`` alone (packed text sources asked for them also carry
``"segment_ids": int32 [seq_len]``, :func:`segment_ids_from_eod`). All data order is therefore defined
by the index arithmetic here, which makes iterator checkpoints a single integer
and makes restored runs bit-identical to uninterrupted ones.

Training stream (``shard_and_batch``)::

    source --shuffle(seed)--> --repeat()--> global example stream g = 0, 1, 2, ...
           --batch(B / P)--> chunks c = 0, 1, 2, ...  (chunk c = examples [c*b, (c+1)*b))
           --[p::P]-->       process p, step s reads chunk s*P + p

so the global batch of step ``s`` is examples ``[s*B, (s+1)*B)`` of the stream and
process ``p`` holds rows ``[p*b, (p+1)*b)`` of it (``b = B // P``). Concatenating
the per-process batches of a step in process order gives exactly the
single-process batch of that step, whatever ``P`` is. Each process only
reads its own rows (for per-record sources, no wasted generation / reads; a
``gather`` source such as MQAR's fixed training set is materialised once per
process and indexed).

Two implementations of that stream, chosen by the source:

* per-record sources (``__getitem__`` only; text, shards): grain's
  ``shuffle(seed) -> repeat -> batch -> [p::P]`` chain, epoch ``e`` permuted by
  grain's index shuffle from ``(seed, e)``;
* batch sources (those with a vectorized ``gather(indices) -> batch``; MQAR):
  a grain source whose item ``s`` *is* step ``s``'s process batch
  (:class:`StepBatches`): stream position ``g`` is example
  ``perm_e[g % n]`` with ``e = g // n`` and ``perm_e =
  np.random.default_rng([seed, e]).permutation(n)``, and the batch is one
  ``gather`` of those indices (numpy fancy indexing, no per-example Python).

Either way the iterator state is the next step index, so resume is
bit-identical, and ``make_iterator``'s threads compute batches ahead.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

IGNORE_LABEL = -100

Example = dict[str, np.ndarray]


def shard_and_batch(
    source: Sequence[Example],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite, per-epoch shuffled, batched and process-sharded training dataset.

    Args:
      source: random-access sequence of examples (``__len__``/``__getitem__``); if
        it also has ``gather(indices) -> batch``, batches are gathered whole
        (:class:`StepBatches`, see the module docstring).
      batch_size: GLOBAL batch size ``B`` (summed over processes).
      seed: shuffle seed, in ``[0, 2**32)``. Epoch ``e`` is shuffled with a
        permutation derived from ``(seed, e)`` (by grain, or by numpy for a
        ``gather`` source).
      process_index, process_count: this process and the number of processes.

    Returns:
      ``grain.MapDataset`` whose item ``s`` is the batch of step ``s`` for this
      process: ``{"inputs": int32 [B // P, seq_len], "labels": int32 [B // P, seq_len]}``.
      It has ``sys.maxsize // ...`` items (infinite for practical purposes).
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if not isinstance(process_count, int) or process_count <= 0:
        raise ValueError(f"process_count={process_count!r} must be a positive int")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r} must be an int in [0, process_count={process_count})"
        )
    if batch_size % process_count != 0:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}; "
            "every process must get the same number of examples per step"
        )
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**32)")
    if len(source) == 0:
        raise ValueError("the training source has no examples")
    per_process = batch_size // process_count
    if hasattr(source, "gather"):
        return grain.MapDataset.source(StepBatches(
            source, batch_size=batch_size, seed=seed, process_index=process_index,
            process_count=process_count))
    ds = grain.MapDataset.source(source)
    # Shuffle before repeat: grain then reshuffles each epoch with a seed folded
    # with the epoch number, and batches may straddle epoch boundaries (the stream
    # is infinite, so no example is ever dropped).
    ds = ds.shuffle(seed=seed).repeat(None)
    # Batch in per-process chunks, then take every P-th chunk: see module docstring.
    ds = ds.batch(per_process, drop_remainder=True)
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds


class StepBatches:
    """Random-access source of whole batches: item ``s`` = step ``s``'s batch for one process.

    ``source.gather(indices)`` must return ``{"inputs": int32 [len(indices), L],
    "labels": ...}`` for an int array of example indices. Step ``s`` of process
    ``p`` reads stream positions ``g = s*B + p*b + [0, b)`` (``b = B // P``),
    i.e. examples ``perm_{g // n}[g % n]`` with ``perm_e =
    np.random.default_rng([seed, e]).permutation(n)`` (epochs straddled by a batch
    are handled). Thread-safe; the last few epoch permutations are cached.
    """

    def __init__(self, source, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        self._source = source
        self._n = len(source)
        self._batch_size = int(batch_size)
        self._per_process = self._batch_size // int(process_count)
        self._offset = int(process_index) * self._per_process
        self._seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize // self._batch_size  # infinite for practical purposes

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the source's examples in epoch ``epoch`` (int64 [n])."""
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self._seed, int(epoch)]).permutation(self._n)
                self._perms[epoch] = perm
                while len(self._perms) > 4:
                    del self._perms[min(self._perms)]
            return perm

    def indices(self, step: int) -> np.ndarray:
        """Example indices (int64 [B // P]) of this process's batch at ``step``."""
        g = int(step) * self._batch_size + self._offset + np.arange(self._per_process,
                                                                     dtype=np.int64)
        first, last = int(g[0]) // self._n, int(g[-1]) // self._n
        if first == last:
            return self.permutation(first)[g - first * self._n]
        epoch, pos = np.divmod(g, self._n)
        out = np.empty_like(g)
        for e in range(first, last + 1):
            mask = epoch == e
            out[mask] = self.permutation(e)[pos[mask]]
        return out

    def __getitem__(self, step: int) -> Example:
        step = int(step)
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range")
        return self._source.gather(self.indices(step))

    def __repr__(self) -> str:
        return (f"StepBatches({self._source!r}, batch_size={self._batch_size}, "
                f"per_process={self._per_process}, offset={self._offset}, seed={self._seed})")


def make_iterator(
    dataset: grain.MapDataset,
    *,
    num_threads: int = 1,
    prefetch_buffer_size: int = 4,
) -> grain.DatasetIterator:
    """Checkpointable iterator over a dataset from ``train_dataset``.

    Usage in the training loop::

        it = make_iterator(train_dataset(cfg.data, seq_len=..., batch_size=..., seed=...))
        batch = next(it)                       # dict of int32 numpy arrays
        state = it.get_state()                 # JSON-serializable, e.g. {"next_index": 12}
        ...
        it = make_iterator(train_dataset(...same args...))
        it.set_state(state)                    # continues bit-identically

    Elements are *whole batches*; ``num_threads`` background threads compute the
    next batches ahead of time (in-process, no multiprocessing). Output order is
    the dataset order regardless of thread timing, so results are deterministic;
    ``num_threads=0`` computes batches synchronously in ``next``.
    """
    options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
    )
    return iter(dataset.to_iter_dataset(options))


SEGMENT_IDS = "segment_ids"


def segment_ids_from_eod(inputs, eod: int, xp=np):
    """Document ids of packed rows whose documents each end with the token ``eod``.

    ``inputs: int [..., seq_len]`` → ``int32 [..., seq_len]``: 0 from the start of the row, +1 after
    each ``eod`` (the ``eod`` itself closes its document, so it keeps that document's id). Equal ids
    are one document; a change of id starts a new one. ``xp``: ``numpy`` or ``jax.numpy``.
    """
    ends = (inputs[..., :-1] == eod).astype(xp.int32)
    return xp.concatenate([xp.zeros_like(ends[..., :1]), xp.cumsum(ends, axis=-1, dtype=xp.int32)], axis=-1)


def stack_examples(examples: Sequence[Example]) -> Example:
    """Stack examples into a batch dict of int32 arrays [len(examples), seq_len] (``segment_ids``
    too when the examples carry them)."""
    keys = ("inputs", "labels") + ((SEGMENT_IDS,) if examples and SEGMENT_IDS in examples[0] else ())
    return {
        k: np.stack([np.asarray(e[k], dtype=np.int32) for e in examples])
        for k in keys
    }


def finite_batches(
    source: Sequence[Example], *, batch_size: int, num_batches: int | None = None
) -> list[Example]:
    """Deterministic, in-order, finite batches of ``source`` (for evaluation).

    Every batch has the full static shape [batch_size, seq_len] (so the eval step
    compiles once; a source with ``gather(indices)`` is read a batch at a time,
    others an example at a time): the last, partial batch is padded with rows whose inputs are
    0 and whose labels are all ``IGNORE_LABEL``, so padding carries no loss and
    every real example is evaluated exactly once. ``num_batches`` (if given)
    keeps only the first ``num_batches`` batches.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
        raise ValueError(f"num_batches={num_batches!r} must be a positive int or None")
    n = len(source)
    total = -(-n // batch_size)
    if num_batches is not None:
        total = min(total, num_batches)
    batches = []
    for b in range(total):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        if hasattr(source, "gather"):
            batch = source.gather(np.arange(lo, hi))
        else:
            batch = stack_examples([source[i] for i in range(lo, hi)])
        pad = batch_size - (hi - lo)
        if pad:
            seq_len = batch["inputs"].shape[1]
            batch = {
                "inputs": np.concatenate(
                    [batch["inputs"], np.zeros((pad, seq_len), np.int32)]
                ),
                "labels": np.concatenate(
                    [batch["labels"], np.full((pad, seq_len), IGNORE_LABEL, np.int32)]
                ),
                **({SEGMENT_IDS: np.concatenate([batch[SEGMENT_IDS], np.zeros((pad, seq_len), np.int32)])}
                   if SEGMENT_IDS in batch else {}),
            }
        batches.append(batch)
    return batches


def get_field(config: Any, name: str, default: Any) -> Any:
    """Read ``config.name``, falling back to ``default`` when the field is absent."""
    try:
        return getattr(config, name)
    except (AttributeError, KeyError):
        return default


def check_int(field: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an int in ``[lo, hi]``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok:
        ok = value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{field}={value!r} is invalid: must be an int {rng}")
