"""Language modelling over prepared token shards (the output of ``python -m hybrids.data.prepare``).

A prepared directory (``data.path``, local or a cloud path such as ``gs://bucket/corpus`` through
``etils.epath``) holds ``manifest.json``, optionally ``tokenizer.json``, and per split a list of
``.npy`` shards of uint16 / uint32 tokens (``[n_tokens]`` each), in order. A split's token stream
``T`` is the concatenation of its shards; example ``i`` is the non-overlapping window
``w = T[i*(L+1) : (i+1)*(L+1)]`` (``L = seq_len``) with ``inputs = w[:-1]`` and
``labels = w[1:]``; the trailing partial window is dropped. Windows may straddle shards.

Shards are read lazily: a local shard is memory-mapped on first use (``np.load(mmap_mode="r")``)
and only the pages of the windows asked for are read; a remote shard is read by byte range
(seek + read on a handle kept open per reading thread). Sharding over processes and resumption come from
:func:`hybrids.data.pipeline.shard_and_batch`, which asks each process's source only for the
rows of its own slice.

Use it with ``--config.data.name=shards --config.data.path=DIR``; train reads split ``train`` and
evaluation reads split ``heldout``. Try it::

    python -m hybrids.data.prepare --input 'corpus/*.txt' --tokenizer bytes --output /tmp/corpus
    python -m hybrids.train --config experiments/quickstart.py:tiny --workdir /tmp/run \\
        --config.data.name=shards --config.data.path=/tmp/corpus
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
from etils import epath

from hybrids.data.pipeline import segment_ids_from_eod

MANIFEST_FILE = "manifest.json"
FORMAT = "hybrids.shards/1"
TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "heldout"
SPLITS = (TRAIN_SPLIT, HELDOUT_SPLIT)


def is_remote(path: str) -> bool:
  """``gs://…``, ``s3://…``: read by byte range rather than memory-mapped."""
  return "://" in str(path)


def read_manifest(path: Any) -> dict[str, Any]:
  """The manifest of the prepared directory ``path``; ValueError naming ``data.path`` if absent."""
  if not isinstance(path, (str, epath.PathLike)) or not str(path):
    raise ValueError(f"data.path={path!r} is invalid: must be the directory written by "
                     "`python -m hybrids.data.prepare --output DIR` (local or gs://…)")
  manifest_path = epath.Path(path) / MANIFEST_FILE
  if not manifest_path.exists():
    raise ValueError(f"data.path={str(path)!r} holds no {MANIFEST_FILE}: prepare it first with "
                     f"`python -m hybrids.data.prepare --input 'FILES' --tokenizer bytes --output {path}`")
  try:
    manifest = json.loads(manifest_path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"data.path={str(path)!r}: cannot read {manifest_path}: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"data.path={str(path)!r}: {manifest_path} is not a {FORMAT!r} manifest "
                     f"(format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
  return manifest


def validate(*, seq_len: int, path: Any) -> dict[str, Any]:
  """Check the manifest and that both splits hold a window of ``seq_len + 1`` tokens; return it.

  Reads only ``manifest.json``. Raises ValueError naming ``data.path`` / ``data.seq_len``.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} is invalid: must be an int >= 1")
  manifest = read_manifest(path)
  splits = manifest.get("splits", {})
  for split in SPLITS:
    if split not in splits:
      raise ValueError(f"data.path={str(path)!r}: the manifest has no split {split!r} "
                       f"(it has {sorted(splits)}; needed: {list(SPLITS)})")
    tokens = int(splits[split]["tokens"])
    if tokens < seq_len + 1:
      raise ValueError(
          f"data.path={str(path)!r}: split {split!r} has {tokens} tokens, fewer than "
          f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or prepare more text"
          + (" (or a larger --heldout-fraction)" if split == HELDOUT_SPLIT else ""))
  return manifest


def vocab_size(path: Any) -> int:
  """The vocabulary the model needs for the prepared directory ``path`` (from its manifest)."""
  return int(read_manifest(path)["vocab_size"])


class _Shard:
  """One ``.npy`` token shard, opened on first read: memory-mapped if local, byte ranges if remote."""

  def __init__(self, path: epath.Path, num_tokens: int, dtype: np.dtype, memory_map: bool):
    self.path = path
    self.num_tokens = num_tokens
    self.dtype = dtype
    self.memory_map = memory_map
    self._array: np.ndarray | None = None   # local: the memory map
    self._data_offset: int | None = None     # remote: where the array's bytes start
    self._lock = threading.Lock()
    # Remote: one open handle per reading thread (a handle's seek + read is not thread-safe, and
    # re-opening an object per window costs a metadata round trip).
    self._handles = threading.local()

  def __getstate__(self):
    # Open maps and locks stay behind when grain pickles the source into a worker process.
    return {"path": self.path, "num_tokens": self.num_tokens, "dtype": self.dtype,
            "memory_map": self.memory_map}

  def __setstate__(self, state):
    self.__init__(**state)

  def _check(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if shape != (self.num_tokens,) or dtype != self.dtype:
      raise ValueError(f"shard {self.path} holds {dtype}{list(shape)}, but the manifest says "
                       f"{self.dtype}[{self.num_tokens}]; the directory was changed after prepare")

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens ``[start, stop)`` of this shard (a copy)."""
    if self.memory_map:
      if self._array is None:
        with self._lock:
          if self._array is None:
            array = np.load(str(self.path), mmap_mode="r")
            self._check(array.shape, array.dtype)
            self._array = array
      return np.array(self._array[start:stop])
    f = getattr(self._handles, "file", None)
    if f is None:
      f = self._handles.file = self.path.open("rb")
    if self._data_offset is None:
      f.seek(0)
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
      self._check(tuple(shape), dtype)
      self._data_offset = f.tell()
    f.seek(self._data_offset + start * self.dtype.itemsize)
    raw = f.read((stop - start) * self.dtype.itemsize)
    return np.frombuffer(raw, dtype=self.dtype).copy()


class ShardWindowSource:
  """``source[i]`` = window ``i`` of a prepared split: ``{"inputs", "labels"}`` int32 [seq_len].

  A grain ``RandomAccessDataSource`` (``__len__``, thread-safe deterministic ``__getitem__``).
  ``force_range_reads`` reads local shards the way remote ones are read (for tests).
  ``segment_ids``: also emit ``segment_ids`` int32 [seq_len], the window's documents (every
  prepared document ends with the manifest's ``eod``;
  :func:`hybrids.data.pipeline.segment_ids_from_eod`).
  """

  def __init__(self, path: Any, split: str, seq_len: int, *, force_range_reads: bool = False,
               segment_ids: bool = False):
    manifest = validate(seq_len=seq_len, path=path)
    self.eod = int(manifest["eod"]) if segment_ids else None
    self.path = str(path)
    self.split = split
    self.seq_len = int(seq_len)
    entry = manifest["splits"][split]
    dtype = np.dtype(manifest["dtype"])
    root = epath.Path(path)
    memory_map = not (is_remote(self.path) or force_range_reads)
    self._shards = [_Shard(root / s["file"], int(s["tokens"]), dtype, memory_map)
                    for s in entry["shards"]]
    # Shard k holds tokens [starts[k], starts[k + 1]) of the split's stream.
    self._starts = np.concatenate([[0], np.cumsum([s.num_tokens for s in self._shards])]).astype(np.int64)
    self._window = self.seq_len + 1
    self._n = int(self._starts[-1]) // self._window

  def __len__(self) -> int:
    return self._n

  def __repr__(self) -> str:
    return (f"ShardWindowSource(path={self.path!r}, split={self.split!r}, seq_len={self.seq_len}, "
            f"len={self._n})")

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """Tokens ``[start, stop)`` of the split's concatenated stream (crossing shards as needed)."""
    parts = []
    k = int(np.searchsorted(self._starts, start, side="right")) - 1
    while start < stop:
      shard_stop = int(self._starts[k + 1])
      end = min(stop, shard_stop)
      parts.append(self._shards[k].read(start - int(self._starts[k]), end - int(self._starts[k])))
      start, k = end, k + 1
    return np.concatenate(parts) if len(parts) > 1 else parts[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"window index {index} out of range [0, {self._n})")
    w = self.tokens(index * self._window, (index + 1) * self._window).astype(np.int32)
    example = {"inputs": w[:-1], "labels": w[1:]}
    if self.eod is not None:
      example["segment_ids"] = segment_ids_from_eod(example["inputs"], self.eod)
    return example


def eod_token(path: Any) -> int:
  """The end-of-document token of the prepared directory ``path`` (from its manifest)."""
  return int(read_manifest(path)["eod"])
