"""Language modelling over local text files (byte-level or byte-level BPE tokens).

Corpus: ``data.files`` is a glob pattern or a list of glob patterns (``**`` allowed;
``.gz`` and ``.dz`` (dictzip) files are decompressed). Matches are de-duplicated and
sorted, and each FILE IS ONE DOCUMENT (files are read whole into memory: this is meant
for local corpora of up to a few GB; ``python -m hybrids.data.prepare`` streams larger ones
into shards for the ``shards`` dataset).

Held-out split (deterministic, by document): with ``n >= 2`` documents, a seeded
permutation (``np.random.default_rng([data.seed, 7])``) selects
``clip(round(heldout_fraction * n), 1, n - 1)`` documents for evaluation, so
neither split is ever empty. With a single document, its tail
(``heldout_fraction`` of its bytes, extended back to a line break when one is
near) is held out instead. If, after tokenization, either split has fewer than
``seq_len + 1`` tokens, a ValueError says so.

Tokenizers (``data.tokenizer``):

* ``"bytes"``: token = byte value 0..255, plus end-of-document ``EOD = 256``
  (vocab 257). Lossless on arbitrary bytes.
* ``"bpe:VOCAB"``: a HuggingFace ``tokenizers`` byte-level BPE with at most
  ``VOCAB`` ids (including the special ``<|endoftext|>`` EOD token), trained
  locally on the TRAIN split only (no eval leakage). Text is decoded as UTF-8
  (invalid bytes become U+FFFD). The tokenizer is saved as
  ``<cache>/tokenizer.json`` and reused when present, so resumed runs tokenize
  identically.

Packing: each split's documents are tokenized, each followed by EOD, and
concatenated into one token stream ``T`` (cached as ``.npy``). Example ``i`` is the
non-overlapping window ``w = T[i*(L+1) : (i+1)*(L+1)]`` (``L = seq_len``) with
``inputs = w[:-1]``, ``labels = w[1:]``; the trailing partial window is dropped.
Labels across document boundaries are kept (the model learns to predict EOD and
the start of the next document, as in standard packed LM training). Documents are
recoverable from EOD: ``TokenWindowSource(..., eod=corpus.eod)`` also emits
``segment_ids`` (issue 23; :func:`hybrids.data.pipeline.segment_ids_from_eod`).

Cache directory: ``workdir`` if given, else
``$TMPDIR/hybrids-data-<hash(files, tokenizer, heldout_fraction, seed)>``. Token
arrays are named by a hash of the file list (path, size, mtime), tokenizer spec
and contents, split fraction and seed, so a changed corpus is re-tokenized.
Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hybrids.data.pipeline import segment_ids_from_eod

BYTE_VOCAB = 257
BYTE_EOD = 256
BPE_EOD = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # 256 byte-level symbols + EOD
TOKENIZER_FILE = "tokenizer.json"


# ----------------------------------------------------------------------------
# Config parsing / validation
# ----------------------------------------------------------------------------

def parse_tokenizer(spec: Any, field: str = "data.tokenizer") -> tuple[str, int]:
    """``"bytes"`` -> ("bytes", 257); ``"bpe:4096"`` -> ("bpe", 4096). ValueError naming ``field`` otherwise."""
    if spec == "bytes":
        return "bytes", BYTE_VOCAB
    if isinstance(spec, str) and spec.startswith("bpe:"):
        num = spec[len("bpe:"):]
        if num.isdigit() and int(num) >= MIN_BPE_VOCAB:
            return "bpe", int(num)
    raise ValueError(
        f"{field}={spec!r} is invalid: must be 'bytes' or 'bpe:VOCAB' with an "
        f"integer VOCAB >= {MIN_BPE_VOCAB} (e.g. 'bpe:4096')"
    )


def eod_token(spec: Any) -> int:
    """The end-of-document token of tokenizer ``spec``: 256 for bytes; 0 for BPE (``<|endoftext|>``
    is the trainer's first special token, see :func:`train_bpe`)."""
    return BYTE_EOD if parse_tokenizer(spec)[0] == "bytes" else 0


def resolve_files(files: Any, field: str = "data.files") -> list[str]:
    """Expand ``data.files`` (glob or list of globs) to a sorted list of absolute paths.

    ``field`` names the setting in error messages (``--input`` for ``hybrids.data.prepare``).
    """
    if isinstance(files, str):
        # A comma-separated string is a list of patterns (command-line overrides are strings).
        patterns = [f.strip() for f in files.split(",") if f.strip()]
    elif isinstance(files, Sequence) and files and all(isinstance(f, str) for f in files):
        patterns = list(files)
    else:
        raise ValueError(
            f"{field}={files!r} is invalid: must be a glob pattern string or a "
            "non-empty list of glob pattern strings"
        )
    paths = set()
    for pattern in patterns:
        for p in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isfile(p):
                paths.add(os.path.abspath(p))
    if not paths:
        raise ValueError(f"{field}={files!r} matches no files")
    return sorted(paths)


def validate(*, seq_len: int, files: Any, tokenizer: Any, heldout_fraction: Any,
             seed: Any) -> None:
    """Cheap checks (no reading/tokenizing); raise ValueError naming the bad field."""
    if (not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool)
            or seq_len < 1):
        raise ValueError(f"seq_len={seq_len!r} is invalid: must be an int >= 1")
    parse_tokenizer(tokenizer)
    if (not isinstance(heldout_fraction, (int, float)) or isinstance(heldout_fraction, bool)
            or not 0.0 < heldout_fraction < 1.0):
        raise ValueError(
            f"data.heldout_fraction={heldout_fraction!r} is invalid: must be a float in (0, 1)"
        )
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"data.seed={seed!r} is invalid: must be an int >= 0")
    resolve_files(files)


# ----------------------------------------------------------------------------
# Reading and splitting
# ----------------------------------------------------------------------------

# dictzip (``.dz``, e.g. Debian's dictionaries) is gzip with an index in a header field.
GZIP_SUFFIXES = (".gz", ".dz")


def open_binary(path: str):
    """Open ``path`` for reading bytes, decompressing by extension (``GZIP_SUFFIXES``)."""
    return gzip.open(path, "rb") if path.endswith(GZIP_SUFFIXES) else open(path, "rb")


def read_document(path: str) -> bytes:
    with open_binary(path) as f:
        return f.read()


def split_documents(paths: list[str], heldout_fraction: float,
                    seed: int) -> tuple[list[bytes], list[bytes]]:
    """(train_docs, eval_docs) as raw bytes; see module docstring for the rule."""
    if len(paths) == 1:
        data = read_document(paths[0])
        if len(data) < 2:
            raise ValueError(f"corpus too small: {paths[0]} has {len(data)} bytes")
        cut = len(data) - max(1, int(round(heldout_fraction * len(data))))
        cut = min(max(cut, 1), len(data) - 1)
        # Prefer splitting at a line break (keeps UTF-8 characters / words whole)
        # when one is reasonably close, otherwise split at the exact byte.
        nl = data.rfind(b"\n", 0, cut)
        if nl + 1 >= max(1, cut // 2):
            cut = nl + 1
        return [data[:cut]], [data[cut:]]
    n = len(paths)
    n_eval = int(np.clip(round(heldout_fraction * n), 1, n - 1))
    perm = np.random.default_rng([seed, 7]).permutation(n)
    eval_idx = set(perm[:n_eval].tolist())
    train = [read_document(p) for i, p in enumerate(paths) if i not in eval_idx]
    heldout = [read_document(p) for i, p in enumerate(paths) if i in eval_idx]
    return train, heldout


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------

def bytes_encode(docs: Sequence[bytes]) -> np.ndarray:
    """Byte tokens with EOD after each document: uint16 [sum(len(d) + 1)]."""
    parts = []
    for d in docs:
        parts.append(np.frombuffer(d, dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([BYTE_EOD], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def bytes_decode(tokens: np.ndarray) -> list[bytes]:
    """Inverse of :func:`bytes_encode`: split at EOD, return the documents' bytes."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == BYTE_EOD)
    docs, start = [], 0
    for e in ends:
        docs.append(tokens[start:e].astype(np.uint8).tobytes())
        start = e + 1
    if start < len(tokens):
        docs.append(tokens[start:].astype(np.uint8).tobytes())
    return docs


def _text_chunks(docs: Sequence[bytes], lines_per_chunk: int = 1000) -> Iterator[str]:
    # Feed the trainer line groups rather than whole (possibly huge) documents;
    # BPE pre-tokenization splits on whitespace anyway.
    for d in docs:
        lines = d.decode("utf-8", errors="replace").splitlines(keepends=True)
        for i in range(0, len(lines), lines_per_chunk):
            yield "".join(lines[i:i + lines_per_chunk])


def train_bpe(docs: Sequence[bytes], vocab_size: int):
    """Train a byte-level BPE (HF ``tokenizers``) with <= vocab_size ids, EOD id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOD],
        # All 256 byte symbols are in the vocab, so any text is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_text_chunks(docs), trainer=trainer)
    return tok


def load_or_train_bpe(path: str, train_docs: Sequence[bytes], vocab_size: int):
    """Load ``path`` if it exists (resumed runs), else train on ``train_docs`` and save."""
    from tokenizers import Tokenizer

    if os.path.exists(path):
        tok = Tokenizer.from_file(path)
    else:
        tok = train_bpe(train_docs, vocab_size)
        _atomic_write_text(path, tok.to_str())
        # Reload what is on disk, so every user of this path sees the same tokenizer.
        tok = Tokenizer.from_file(path)
    if tok.token_to_id(BPE_EOD) is None or tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"existing tokenizer {path} (vocab {tok.get_vocab_size()}) does not match "
            f"data.tokenizer='bpe:{vocab_size}'; delete it or use another workdir"
        )
    return tok


def bpe_encode(tok, docs: Sequence[bytes]) -> np.ndarray:
    """BPE tokens with EOD after each document: int32 [n_tokens]."""
    eod = tok.token_to_id(BPE_EOD)
    texts = [d.decode("utf-8", errors="replace") for d in docs]
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.array([eod], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


# ----------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def cache_dir(workdir: str | None, paths: list[str], tokenizer: str,
              heldout_fraction: float, seed: int) -> str:
    if workdir is not None:
        return workdir
    key = _hash([paths, tokenizer, heldout_fraction, seed])
    return os.path.join(tempfile.gettempdir(), f"hybrids-data-{key}")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Tokenized splits. ``train``/``eval``: int [n_tokens] (possibly memory-mapped)."""

    train: np.ndarray
    eval: np.ndarray
    vocab_size: int
    eod: int
    directory: str


def prepare_corpus(*, files: Any, tokenizer: str, heldout_fraction: float, seed: int,
                   workdir: str | None = None) -> Corpus:
    """Read, split, tokenize and cache the corpus (or load it from the cache)."""
    kind, vocab = parse_tokenizer(tokenizer)
    paths = resolve_files(files)
    directory = cache_dir(workdir, paths, tokenizer, heldout_fraction, seed)
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    stats = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    key_parts: list[Any] = [stats, tokenizer, float(heldout_fraction), int(seed)]
    had_tokenizer = os.path.exists(tok_path)
    if kind == "bpe" and had_tokenizer:
        with open(tok_path, "rb") as f:
            key_parts.append(hashlib.sha256(f.read()).hexdigest())
    key = _hash(key_parts)
    train_path = os.path.join(directory, f"tokens-{key}-train.npy")
    eval_path = os.path.join(directory, f"tokens-{key}-eval.npy")
    eod = BYTE_EOD if kind == "bytes" else 0

    if not (os.path.exists(train_path) and os.path.exists(eval_path)):
        train_docs, eval_docs = split_documents(paths, heldout_fraction, seed)
        if kind == "bytes":
            train_tokens, eval_tokens = bytes_encode(train_docs), bytes_encode(eval_docs)
        else:
            tok = load_or_train_bpe(tok_path, train_docs, vocab)
            eod = tok.token_to_id(BPE_EOD)
            dtype = np.uint16 if vocab <= 2**16 else np.int32
            train_tokens = bpe_encode(tok, train_docs).astype(dtype)
            eval_tokens = bpe_encode(tok, eval_docs).astype(dtype)
            if not had_tokenizer:
                # The key must include the fresh tokenizer's hash, so that the next
                # call (which sees tokenizer.json) finds these arrays.
                with open(tok_path, "rb") as f:
                    key = _hash(key_parts + [hashlib.sha256(f.read()).hexdigest()])
                train_path = os.path.join(directory, f"tokens-{key}-train.npy")
                eval_path = os.path.join(directory, f"tokens-{key}-eval.npy")
        _atomic_save_npy(train_path, train_tokens)
        _atomic_save_npy(eval_path, eval_tokens)
    elif kind == "bpe":
        from tokenizers import Tokenizer
        eod = Tokenizer.from_file(tok_path).token_to_id(BPE_EOD)

    return Corpus(
        train=np.load(train_path, mmap_mode="r"),
        eval=np.load(eval_path, mmap_mode="r"),
        vocab_size=vocab,
        eod=eod,
        directory=directory,
    )


# ----------------------------------------------------------------------------
# Random-access source
# ----------------------------------------------------------------------------

class TokenWindowSource:
    """``source[i]`` = window ``i`` of a token stream: inputs/labels int32 [seq_len].

    ``eod`` (the corpus's end-of-document token, :attr:`Corpus.eod`): also emit
    ``segment_ids`` int32 [seq_len], the documents of the window (equal ids: one document; a
    document's EOD keeps its id, the next token starts the next id), from 0 in every window.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, split: str = "train", eod: int | None = None):
        self._tokens = tokens
        self._eod = eod
        self._window = int(seq_len) + 1
        self._n = len(tokens) // self._window
        if self._n == 0:
            raise ValueError(
                f"corpus too small: the {split} split has {len(tokens)} tokens, fewer than "
                f"seq_len + 1 = {self._window}; add text, lower seq_len, or "
                f"{'raise' if split == 'eval' else 'lower'} data.heldout_fraction"
            )

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._n:
            raise IndexError(f"window index {index} out of range [0, {self._n})")
        start = index * self._window
        w = np.asarray(self._tokens[start:start + self._window], dtype=np.int32)
        example = {"inputs": w[:-1].copy(), "labels": w[1:].copy()}
        if self._eod is not None:
            example["segment_ids"] = segment_ids_from_eod(example["inputs"], self._eod)
        return example
