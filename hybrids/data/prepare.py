"""Tokenize local text files once into memory-mappable shards for the ``shards`` dataset.

Run::

    python -m hybrids.data.prepare --input 'corpus/**/*.txt' --tokenizer bpe:8192 --output data/corpus
    python -m hybrids.data.prepare --help

then train with ``--config.data.name=shards --config.data.path=data/corpus``
(:mod:`hybrids.data.shards` reads it; the path may also be ``gs://…`` once uploaded).

What it does, streaming file by file (never the whole corpus in memory):

* Input: a glob (``**`` allowed; several separated by commas); matches are de-duplicated and
  sorted; ``.gz`` / ``.dz`` (dictzip) files are decompressed by extension.
* Archives: with ``--members '*.c,*.h'`` every input is a tar archive (``.tar``, ``.tar.gz``,
  ``.tar.xz``, ``.tar.bz2``) read as one forward stream, never extracted to disk; its regular-file
  members whose name (path inside the archive) matches a glob, and no ``--exclude-members`` glob,
  take the place of files, in archive order (``fnmatch``: ``*`` crosses ``/``). One listing pass
  first counts them (``source.archive_members`` in the manifest) and sizes the BPE sample.
* Documents: each file (or member) is cut into documents of about ``--doc-bytes`` bytes, each
  ending at a line break (a smaller one is one document: a ``--doc-bytes`` above the largest makes
  one file one document); every document is followed by the end-of-document token.
* Held-out split, deterministic: document ``g`` (counted over the whole corpus, in file order) is
  held out iff ``floor((g + 1) * f + phase) > floor(g * f + phase)`` (``f = --heldout-fraction``,
  ``phase`` uniform in [0, 1) from ``--seed``), so the held-out share tracks ``f`` at every prefix
  of the corpus; the last document is held out if no other was. Splits are named ``train`` and
  ``heldout``.
* Tokenizers (shared with :mod:`hybrids.data.text`): ``bytes`` (vocab 257, EOD 256) or
  ``bpe:VOCAB``, a byte-level BPE (HF ``tokenizers``) trained on the first ``--bpe-sample-bytes``
  of the train split only (visiting files in a seeded random order so the sample spans files) and
  saved as ``tokenizer.json``. ``--tokenizer-file PATH`` tokenizes with a given ``tokenizer.json``
  instead of training one (another machine then writes the same shards, sha256 for sha256).
* Output ``DIR``: ``{split}-{k:05d}.npy`` shards of ``--shard-tokens`` tokens (the last one of a
  split shorter), uint16 when the vocabulary fits, else uint32, and ``manifest.json`` (format,
  tokenizer spec (as ``data.tokenizer``), vocab_size, eod, tokenizer_file, dtype, per split:
  tokens, documents and shards with token count, bytes and sha256; source pattern, files and
  sizes, options, creation time, seconds, versions).
* Once: a local ``DIR`` is built in a temporary sibling directory and renamed into place, so it
  exists only when complete (a cloud ``DIR`` is written in place, ``manifest.json`` last).
  Re-running with the same input files and options finds the manifest and does nothing; an
  existing ``DIR`` prepared differently, or holding anything else, is refused (nothing is ever
  deleted).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import gzip
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from hybrids.data import shards as _shards
from hybrids.data import text as _text

DEFAULT_HELDOUT_FRACTION = 0.01
DEFAULT_DOC_BYTES = 256 * 1024
DEFAULT_SHARD_TOKENS = 64 * 1024 * 1024   # 128 MB of uint16
DEFAULT_BPE_SAMPLE_BYTES = 256 * 1024 * 1024
# Tokenize BPE documents in batches of about this many bytes (encode_batch runs them in parallel).
_BPE_BATCH_BYTES = 16 * 1024 * 1024


def _check_options(*, tokenizer: str, heldout_fraction: float, seed: int, doc_bytes: int,
                   shard_tokens: int, bpe_sample_bytes: int) -> None:
  _text.parse_tokenizer(tokenizer, field="--tokenizer")
  if (isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float))
      or not 0.0 < heldout_fraction < 1.0):
    raise ValueError(f"--heldout-fraction={heldout_fraction!r} is invalid: must be in (0, 1)")
  for name, value, lo in (("--seed", seed, 0), ("--doc-bytes", doc_bytes, 1),
                          ("--shard-tokens", shard_tokens, 1), ("--bpe-sample-bytes", bpe_sample_bytes, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
      raise ValueError(f"{name}={value!r} is invalid: must be an int >= {lo}")


# ----------------------------------------------------------------------------
# Reading: documents and the held-out rule
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemberFilter:
  """Which members of a tar archive are documents: regular files whose name (the full path inside
  the archive, e.g. ``linux-source-6.1/kernel/fork.c``) matches an ``include`` glob and no
  ``exclude`` glob (``fnmatch``: ``*`` also crosses ``/``, so ``*.c`` is every C file)."""
  include: tuple[str, ...]
  exclude: tuple[str, ...] = ()

  def __call__(self, member: tarfile.TarInfo) -> bool:
    return (member.isfile() and any(fnmatch.fnmatchcase(member.name, g) for g in self.include)
            and not any(fnmatch.fnmatchcase(member.name, g) for g in self.exclude))


def parse_globs(text: Any, field: str) -> tuple[str, ...]:
  """``"*.c, *.h"`` → ``("*.c", "*.h")``; ValueError naming ``field`` if no glob is left."""
  globs = tuple(g.strip() for g in text.split(",") if g.strip()) if isinstance(text, str) else ()
  if not globs:
    raise ValueError(f"{field}={text!r} is invalid: must be comma-separated globs over member names, "
                     "e.g. '*.c,*.h'")
  return globs


def _sources(raw, path: str, members: MemberFilter | None) -> Iterator[Any]:
  """Readers of the document sources in one input: the (decompressed) file itself, or each member
  of the tar archive that ``members`` selects, in archive order, streamed (never extracted)."""
  if members is None:
    if path.endswith(_text.GZIP_SUFFIXES):
      with gzip.GzipFile(fileobj=raw, mode="rb") as reader:
        yield reader
    else:
      yield raw
    return
  for archive, member in _tar_members(raw, path):
    if members(member):
      yield archive.extractfile(member)


def _tar_members(raw, path: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
  """``(archive, member)`` for every member of the tar archive read from ``raw``, in one forward pass
  ("r|*": a gz/bz2/xz-compressed stream, members read as they come); ValueError if it is not one."""
  try:
    with tarfile.open(fileobj=raw, mode="r|*") as archive:
      for member in archive:
        yield archive, member
  except tarfile.ReadError as e:
    raise ValueError(f"--input file {path!r} is not a readable tar archive ({e}); --members reads "
                     "tar archives (.tar, .tar.gz, .tar.xz, .tar.bz2) only") from None


def iter_documents(paths: list[str], doc_bytes: int, progress=None,
                   members: MemberFilter | None = None) -> Iterator[tuple[bytes, bool]]:
  """Yield ``(document, is_last_of_corpus)``: each file (or selected archive member) cut into
  ~``doc_bytes`` at line breaks.

  A document is ``read(doc_bytes)`` completed to the end of its line (at most ``doc_bytes``
  more); empty sources yield nothing. ``progress`` (a tqdm bar) advances by on-disk bytes.
  """
  pending: bytes | None = None   # one document of look-ahead, to know which one is last
  for path in paths:
    with open(path, "rb") as raw:
      position = 0
      for reader in _sources(raw, path, members):
        while True:
          doc = reader.read(doc_bytes)
          if not doc:
            break
          if not doc.endswith(b"\n"):
            doc += reader.readline(doc_bytes)
          if progress is not None:
            progress.update(raw.tell() - position)
            position = raw.tell()
          if pending is not None:
            yield pending, False
          pending = doc
  if pending is not None:
    yield pending, True


def list_members(paths: list[str], members: MemberFilter, progress: bool = False) -> list[dict[str, Any]]:
  """Per archive: how many members ``members`` selects and their uncompressed bytes (one pass of
  decompression, headers only kept); ValueError if an archive selects none."""
  listing = []
  with _bar(sum(os.path.getsize(p) for p in paths), "listing archive members", progress) as bar:
    for path in paths:
      count = size = position = 0
      with open(path, "rb") as raw:
        for _, member in _tar_members(raw, path):
          if members(member):
            count, size = count + 1, size + member.size
          bar.update(raw.tell() - position)
          position = raw.tell()
      if not count:
        raise ValueError(f"--members={','.join(members.include)!r}"
                         + (f" --exclude-members={','.join(members.exclude)!r}" if members.exclude else "")
                         + f" selects no member of {path!r}")
      listing.append({"path": path, "members": count, "member_bytes": size})
  return listing


class HeldoutRule:
  """Decides, document by document in corpus order, which ones are held out (module docstring)."""

  def __init__(self, fraction: float, seed: int):
    self.fraction = fraction
    self.phase = float(np.random.default_rng([seed, 11]).random())
    self.index = 0
    self.held_out = 0

  def __call__(self, is_last: bool) -> bool:
    g, f = self.index, self.fraction
    held = math.floor((g + 1) * f + self.phase) > math.floor(g * f + self.phase)
    held = held or (is_last and self.held_out == 0)
    self.index += 1
    self.held_out += held
    return held


def split_documents(paths: list[str], *, doc_bytes: int, heldout_fraction: float, seed: int,
                    progress=None, members: MemberFilter | None = None) -> Iterator[tuple[str, bytes]]:
  """Yield ``(split, document)`` for the whole corpus, in order."""
  rule = HeldoutRule(heldout_fraction, seed)
  for doc, is_last in iter_documents(paths, doc_bytes, progress, members):
    yield (_shards.HELDOUT_SPLIT if rule(is_last) else _shards.TRAIN_SPLIT), doc


# ----------------------------------------------------------------------------
# Writing shards
# ----------------------------------------------------------------------------

class _HashingWriter:
  """A write-only file wrapper that counts and hashes what passes through (np.save writes to it)."""

  def __init__(self, f):
    self._f = f
    self.sha256 = hashlib.sha256()
    self.bytes = 0

  def write(self, data) -> int:
    data = bytes(data)
    self.sha256.update(data)
    self.bytes += len(data)
    return self._f.write(data)


class ShardWriter:
  """Collects one split's token stream and writes it as fixed-size ``.npy`` shards."""

  def __init__(self, directory: epath.Path, split: str, dtype: np.dtype, shard_tokens: int):
    self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
    self._pending: list[np.ndarray] = []
    self._pending_tokens = 0
    self.shards: list[dict[str, Any]] = []
    self.tokens = 0
    self.documents = 0

  def add(self, tokens: np.ndarray, documents: int) -> None:
    self._pending.append(np.asarray(tokens).astype(self.dtype, copy=False))
    self._pending_tokens += len(tokens)
    self.tokens += len(tokens)
    self.documents += documents
    while self._pending_tokens >= self.shard_tokens:
      stream = np.concatenate(self._pending)
      self._write(stream[:self.shard_tokens])
      rest = stream[self.shard_tokens:]
      self._pending, self._pending_tokens = [rest], len(rest)

  def close(self) -> dict[str, Any]:
    if self._pending_tokens:
      self._write(np.concatenate(self._pending))
    self._pending, self._pending_tokens = [], 0
    return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}

  def _write(self, tokens: np.ndarray) -> None:
    name = f"{self.split}-{len(self.shards):05d}.npy"
    with (self.directory / name).open("wb") as f:
      writer = _HashingWriter(f)
      np.save(writer, np.ascontiguousarray(tokens))
    self.shards.append({"file": name, "tokens": int(len(tokens)), "bytes": writer.bytes,
                        "sha256": writer.sha256.hexdigest()})


# ----------------------------------------------------------------------------
# Tokenizing
# ----------------------------------------------------------------------------

def bpe_sample(paths: list[str], *, sample_bytes: int, doc_bytes: int, heldout_fraction: float,
               seed: int, progress: bool = False, members: MemberFilter | None = None,
               content_bytes: int | None = None) -> list[bytes]:
  """A seeded random subset of the train split's documents, about ``sample_bytes`` in all.

  Each train document is kept with probability ``min(1, sample_bytes / content_bytes)`` (so the
  sample spans the corpus), until ``sample_bytes`` are kept; reading stops there.
  ``content_bytes``: the selected archive members' uncompressed bytes (``list_members``); the
  on-disk input bytes when not given.
  """
  input_bytes = sum(os.path.getsize(p) for p in paths)
  keep = min(1.0, sample_bytes / max(1, input_bytes if content_bytes is None else content_bytes))
  rng = np.random.default_rng([seed, 13])
  sample, size = [], 0
  with _bar(input_bytes, "sampling the train split for BPE", progress) as bar:
    for split, doc in split_documents(paths, doc_bytes=doc_bytes, heldout_fraction=heldout_fraction,
                                      seed=seed, progress=bar, members=members):
      if split == _shards.TRAIN_SPLIT and rng.random() < keep:
        sample.append(doc)
        size += len(doc)
        if size >= sample_bytes:
          break
  return sample


def _bar(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not enabled, file=sys.stderr)


def _versions() -> dict[str, str]:
  import hybrids
  out = {"python": platform.python_version(), "numpy": np.__version__, "hybrids": hybrids.__version__}
  try:
    import tokenizers
    out["tokenizers"] = tokenizers.__version__
  except ImportError:
    pass
  return out


# ----------------------------------------------------------------------------
# Once: what was asked, and what an existing output holds
# ----------------------------------------------------------------------------

def _request(manifest: dict[str, Any]) -> dict[str, Any]:
  """The fields that decide a preparation's content (compared on re-runs)."""
  return {"input files": manifest["source"]["files"], "tokenizer": manifest["tokenizer"],
          **{f"--{k.replace('_', '-')}": v for k, v in manifest["options"].items()}}


def _existing(output: epath.Path, request: dict[str, Any]) -> dict[str, Any] | None:
  """The manifest already at ``output`` if it was prepared the same way; None if nothing is there.

  Raises ValueError (naming what differs) if ``output`` holds a different preparation or
  anything that is not one.
  """
  if not output.exists():
    return None
  if not output.is_dir():
    raise ValueError(f"--output={str(output)!r} exists and is not a directory; choose another --output")
  if not (output / _shards.MANIFEST_FILE).exists():
    if any(output.iterdir()):
      raise ValueError(f"--output={str(output)!r} exists, is not empty and holds no "
                       f"{_shards.MANIFEST_FILE} (not a prepared directory, or an interrupted cloud "
                       "write); choose another --output (nothing was changed)")
    return None
  manifest = _shards.read_manifest(str(output))
  theirs = _request(manifest)
  # Both ways: an option recorded there but not asked now (e.g. --exclude-members) differs too.
  differences = [k for k in {**theirs, **request} if theirs.get(k) != request.get(k)]
  if differences:
    detail = "; ".join(
        f"{k}: {_short(theirs.get(k))} there, {_short(request.get(k))} now" for k in differences)
    raise ValueError(f"--output={str(output)!r} was prepared differently ({detail}); choose another "
                     "--output, or delete that directory yourself to redo it (nothing was changed)")
  return manifest


def _short(value: Any) -> str:
  if isinstance(value, list) and value and isinstance(value[0], dict):
    return f"{len(value)} files, {sum(v['bytes'] for v in value)} bytes"
  return repr(value)


# ----------------------------------------------------------------------------
# The whole preparation
# ----------------------------------------------------------------------------

def prepare(input: Any, tokenizer: str, output: str, *,  # noqa: A002 (the CLI's name)
            heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0,
            doc_bytes: int = DEFAULT_DOC_BYTES, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES, members: str | None = None,
            exclude_members: str | None = None, tokenizer_file: str | None = None,
            progress: bool = True, log=print) -> dict[str, Any]:
  """Prepare ``output`` from the files matching ``input`` (module docstring); return its manifest.

  ``members`` / ``exclude_members``: comma-separated globs; when given, every input is a tar
  archive and its selected members are the documents (:class:`MemberFilter`).
  ``tokenizer_file``: a ``tokenizer.json`` (of an earlier ``bpe:VOCAB`` preparation) to tokenize
  with instead of training one, so two machines tokenize alike.
  All arguments are checked, and an existing ``output`` compared, before any file is read.
  """
  _check_options(tokenizer=tokenizer, heldout_fraction=heldout_fraction, seed=seed,
                 doc_bytes=doc_bytes, shard_tokens=shard_tokens, bpe_sample_bytes=bpe_sample_bytes)
  if not isinstance(output, (str, os.PathLike)) or not str(output):
    raise ValueError(f"--output={output!r} is invalid: must be a directory path (local or gs://…)")
  kind, vocab = _text.parse_tokenizer(tokenizer, field="--tokenizer")
  member_filter = None
  if members is not None:
    member_filter = MemberFilter(parse_globs(members, "--members"),
                                 parse_globs(exclude_members, "--exclude-members") if exclude_members else ())
  elif exclude_members is not None:
    raise ValueError(f"--exclude-members={exclude_members!r} needs --members (it filters archive members)")
  given_tokenizer = None
  if tokenizer_file is not None:
    given_tokenizer = _given_tokenizer(tokenizer_file, kind, vocab)
  paths = _text.resolve_files(input, field="--input")
  files = [{"path": p, "bytes": os.path.getsize(p)} for p in paths]
  options = {"heldout_fraction": float(heldout_fraction), "seed": seed, "doc_bytes": doc_bytes,
             "shard_tokens": shard_tokens}
  if kind == "bpe" and given_tokenizer is None:  # only then does it change the output
    options["bpe_sample_bytes"] = bpe_sample_bytes
  if member_filter is not None:  # absent otherwise, so earlier manifests still compare equal
    options["members"] = ",".join(member_filter.include)
    if member_filter.exclude:
      options["exclude_members"] = ",".join(member_filter.exclude)
  if given_tokenizer is not None:
    options["tokenizer_file_sha256"] = hashlib.sha256(given_tokenizer.encode()).hexdigest()
  manifest: dict[str, Any] = {
      "format": _shards.FORMAT,
      "source": {"pattern": input, "file_count": len(files),
                 "bytes": sum(f["bytes"] for f in files), "files": files},
      # The spec string, as in data.tokenizer (hybrids.evaluate reads it to rebuild the tokenizer).
      "tokenizer": tokenizer,
      "vocab_size": vocab,
      "options": options,
  }
  out = epath.Path(output)
  request = _request(manifest)
  found = _existing(out, request)
  if found is not None:
    log(f"{output} is already prepared from the same {len(files)} files and options; nothing to do")
    return found
  content_bytes = None
  if member_filter is not None:
    listing = list_members(paths, member_filter, progress=progress)
    manifest["source"]["archive_members"] = listing
    content_bytes = sum(entry["member_bytes"] for entry in listing)

  remote = _shards.is_remote(str(output))
  if remote:
    # Object stores cannot rename a directory atomically: write in place, the manifest last.
    build = out
    build.mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    build = epath.Path(tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(output)),
                                        prefix=f".{os.path.basename(os.path.abspath(output))}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(str(build), 0o777 & ~umask)  # mkdtemp's 0700 would hide the corpus from other users
  started = datetime.datetime.now(datetime.timezone.utc)
  try:
    _build(build, manifest, paths=paths, kind=kind, vocab=vocab, progress=progress,
           heldout_fraction=heldout_fraction, seed=seed, doc_bytes=doc_bytes, shard_tokens=shard_tokens,
           bpe_sample_bytes=bpe_sample_bytes, members=member_filter, content_bytes=content_bytes,
           given_tokenizer=given_tokenizer)
    manifest["created"] = started.isoformat(timespec="seconds")
    manifest["seconds"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    manifest["versions"] = _versions()
    (build / _shards.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    if not remote:
      try:
        os.rename(str(build), str(out))  # atomic; replaces only an absent or empty directory
      except OSError:
        # Someone else finished `output` meanwhile: fine if it is the same preparation.
        found = _existing(out, request)
        if found is None:
          raise
        log(f"{output} was prepared meanwhile by another process, the same way; using it")
        return found
  finally:
    if not remote and os.path.isdir(str(build)):
      shutil.rmtree(str(build), ignore_errors=True)
  for split in _shards.SPLITS:
    s = manifest["splits"][split]
    log(f"{split}: {s['tokens']:,} tokens in {len(s['shards'])} shard(s), {s['documents']:,} documents")
  log(f"wrote {output} in {manifest['seconds']} s")
  return manifest


def _given_tokenizer(path: str, kind: str, vocab: int) -> str:
  """The text of ``--tokenizer-file``, checked against ``--tokenizer`` (ValueError otherwise)."""
  if kind != "bpe":
    raise ValueError(f"--tokenizer-file={path!r} needs --tokenizer=bpe:VOCAB")
  try:
    text = open(path).read()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(text)
  except Exception as e:  # noqa: BLE001 (tokenizers raises its own Exception type on bad JSON)
    raise ValueError(f"--tokenizer-file={path!r} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
  if tok.token_to_id(_text.BPE_EOD) is None or tok.get_vocab_size() > vocab:
    raise ValueError(f"--tokenizer-file={path!r} has {tok.get_vocab_size()} ids"
                     + ("" if tok.token_to_id(_text.BPE_EOD) is not None else f" and no {_text.BPE_EOD}")
                     + f"; --tokenizer=bpe:{vocab} needs at most {vocab} ids and {_text.BPE_EOD}")
  return text


def _build(build: epath.Path, manifest: dict[str, Any], *, paths: list[str], kind: str, vocab: int,
           progress: bool, heldout_fraction: float, seed: int, doc_bytes: int, shard_tokens: int,
           bpe_sample_bytes: int, members: MemberFilter | None = None, content_bytes: int | None = None,
           given_tokenizer: str | None = None) -> None:
  """Tokenize the corpus into shards under ``build``; fill ``manifest``'s tokenizer/dtype/splits."""
  dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
  if kind == "bytes":
    tok, eod = None, _text.BYTE_EOD
  else:
    from tokenizers import Tokenizer

    if given_tokenizer is not None:
      (build / _text.TOKENIZER_FILE).write_text(given_tokenizer)
    else:
      sample = bpe_sample(paths, sample_bytes=bpe_sample_bytes, doc_bytes=doc_bytes,
                          heldout_fraction=heldout_fraction, seed=seed, progress=progress, members=members,
                          content_bytes=content_bytes)
      if not sample:
        raise ValueError("the train split is empty: there is nothing to train the BPE on; "
                         "add text or lower --doc-bytes")
      (build / _text.TOKENIZER_FILE).write_text(_text.train_bpe(sample, vocab).to_str())
      del sample
    # Tokenize with what is on disk, exactly as a later reader of tokenizer.json would.
    tok = Tokenizer.from_str((build / _text.TOKENIZER_FILE).read_text())
    eod = tok.token_to_id(_text.BPE_EOD)
    manifest.update(tokenizer_file=_text.TOKENIZER_FILE, learned_vocab_size=tok.get_vocab_size())
  manifest["eod"] = int(eod)
  manifest["dtype"] = dtype.name

  writers = {split: ShardWriter(build, split, dtype, shard_tokens) for split in _shards.SPLITS}
  pending: dict[str, list[bytes]] = {split: [] for split in _shards.SPLITS}
  pending_bytes = dict.fromkeys(_shards.SPLITS, 0)

  def flush(split: str) -> None:
    docs = pending[split]
    if docs:
      writers[split].add(_text.bpe_encode(tok, docs), len(docs))
      pending[split], pending_bytes[split] = [], 0

  total = sum(os.path.getsize(p) for p in paths)
  with _bar(total, "tokenizing", progress) as bar:
    for split, doc in split_documents(paths, doc_bytes=doc_bytes, heldout_fraction=heldout_fraction,
                                      seed=seed, progress=bar, members=members):
      if tok is None:
        writers[split].add(_text.bytes_encode([doc]), 1)
      else:
        pending[split].append(doc)
        pending_bytes[split] += len(doc)
        if pending_bytes[split] >= _BPE_BATCH_BYTES:
          flush(split)
    for split in _shards.SPLITS:
      if tok is not None:
        flush(split)
  manifest["splits"] = {split: writers[split].close() for split in _shards.SPLITS}
  if manifest["splits"][_shards.TRAIN_SPLIT]["tokens"] == 0:
    raise ValueError(f"the train split is empty: the corpus has only "
                     f"{manifest['splits'][_shards.HELDOUT_SPLIT]['documents']} document(s) of "
                     f"--doc-bytes={doc_bytes}; lower --doc-bytes or add text")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m hybrids.data.prepare",
      description="Tokenize local text files (plain or .gz/.dz) once into memory-mappable .npy "
                  "shards with a held-out split and manifest.json, for --config.data.name=shards "
                  "--config.data.path=OUTPUT.")
  parser.add_argument("--input", required=True,
                      help="glob of text files ('**' allowed; several separated by commas); quote it")
  parser.add_argument("--tokenizer", required=True,
                      help="'bytes' (vocab 257) or 'bpe:VOCAB' (byte-level BPE trained on the train split)")
  parser.add_argument("--output", required=True, help="directory to create (local, or gs://…)")
  parser.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                      help="share of documents held out for evaluation (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the held-out choice and the BPE sample (default: %(default)s)")
  parser.add_argument("--doc-bytes", type=int, default=DEFAULT_DOC_BYTES,
                      help="files are cut into documents of about this many bytes, at line breaks "
                           "(default: %(default)s)")
  parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                      help="tokens per shard (default: %(default)s)")
  parser.add_argument("--bpe-sample-bytes", type=int, default=DEFAULT_BPE_SAMPLE_BYTES,
                      help="bytes of the train split the BPE is trained on (default: %(default)s)")
  parser.add_argument("--members", default=None,
                      help="read every --input file as a tar archive (.tar, .tar.gz, .tar.xz, .tar.bz2), "
                           "streamed, and take its regular-file members whose name matches one of these "
                           "comma-separated globs as the documents, e.g. '*.c,*.h' ('*' crosses '/')")
  parser.add_argument("--exclude-members", default=None,
                      help="with --members: skip members matching these comma-separated globs")
  parser.add_argument("--tokenizer-file", default=None,
                      help="with --tokenizer=bpe:VOCAB: tokenize with this tokenizer.json (e.g. from an "
                           "earlier preparation on another machine) instead of training one")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  try:
    prepare(args.input, args.tokenizer, args.output, heldout_fraction=args.heldout_fraction,
            seed=args.seed, doc_bytes=args.doc_bytes, shard_tokens=args.shard_tokens,
            bpe_sample_bytes=args.bpe_sample_bytes, members=args.members,
            exclude_members=args.exclude_members, tokenizer_file=args.tokenizer_file,
            progress=not args.no_progress)
  except ValueError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  except (OSError, EOFError, tarfile.TarError) as e:  # unreadable input, truncated .gz/.xz, unwritable --output
    parser.exit(2, f"{parser.prog}: error: {type(e).__name__}: {e}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
