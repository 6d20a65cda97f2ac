"""Dataset-agnostic grain plumbing: shuffling, process sharding, batching, iterators.

Every dataset in :mod:`hybrids.data` is a *random-access source*: a sequence whose
item ``i`` is a dict ``{"inputs": int32 [seq_len], "labels": int32 [seq_len]}``
computed deterministically from ``i`` alone. All data order is therefore defined
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
materialises its own rows (no wasted generation / reads).
"""

from __future__ import annotations

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
      source: random-access sequence of examples (``__len__``/``__getitem__``).
      batch_size: GLOBAL batch size ``B`` (summed over processes).
      seed: shuffle seed, in ``[0, 2**32)``. Epoch ``e`` is shuffled with a
        permutation derived from ``(seed, e)`` by grain.
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


def stack_examples(examples: Sequence[Example]) -> Example:
    """Stack examples into a batch dict of int32 arrays [len(examples), seq_len]."""
    return {
        k: np.stack([np.asarray(e[k], dtype=np.int32) for e in examples])
        for k in ("inputs", "labels")
    }


def finite_batches(
    source: Sequence[Example], *, batch_size: int, num_batches: int | None = None
) -> list[Example]:
    """Deterministic, in-order, finite batches of ``source`` (for evaluation).

    Every batch has the full static shape [batch_size, seq_len] (so the eval step
    compiles once): the last, partial batch is padded with rows whose inputs are
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
        rows = [source[i] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
        batch = stack_examples(rows)
        pad = batch_size - len(rows)
        if pad:
            seq_len = batch["inputs"].shape[1]
            batch = {
                "inputs": np.concatenate(
                    [batch["inputs"], np.zeros((pad, seq_len), np.int32)]
                ),
                "labels": np.concatenate(
                    [batch["labels"], np.full((pad, seq_len), IGNORE_LABEL, np.int32)]
                ),
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
