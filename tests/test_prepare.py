"""Tests for ``python -m hybrids.data.prepare`` and the ``shards`` dataset that reads its output.

Run: ``PYTHONPATH=. python -m pytest -q -n 0 tests/test_prepare.py``
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os

import numpy as np
import pytest

from hybrids import data
from hybrids.data import pipeline, prepare, shards, text

SEQ = 16
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches under pale moonlight and rivers carry stones to distant seas").split()
# Small documents and shards, so that files hold several documents and windows straddle shards.
OPTIONS = dict(heldout_fraction=0.2, seed=3, doc_bytes=300, shard_tokens=1000)


def write_corpus(root, num_files=4, lines=40):
  """Plain files plus one gzip file; returns ``(pattern, {path: content})``."""
  rng = np.random.default_rng(0)
  os.makedirs(root, exist_ok=True)
  contents = {}
  for i in range(num_files):
    body = "".join(" ".join(rng.choice(WORDS, size=8)).capitalize() + ".\n" for _ in range(lines))
    body = body.encode()
    path = os.path.join(root, f"doc{i}.txt" + (".gz" if i == num_files - 1 else ""))
    with open(path, "wb") as f:
      f.write(gzip.compress(body) if path.endswith(".gz") else body)
    contents[path] = body
  return os.path.join(root, "doc*"), contents


def expected_documents(contents, doc_bytes, heldout_fraction, seed):
  """The documented rule, written out independently: ``{split: [document bytes, ...]}``."""
  docs = []
  for path in sorted(contents):
    body = contents[path]
    while body:
      cut = min(len(body), doc_bytes)
      if not body[:cut].endswith(b"\n"):
        newline = body.find(b"\n", cut, cut + doc_bytes)
        cut = min(len(body), cut + doc_bytes) if newline < 0 else newline + 1
      docs.append(body[:cut])
      body = body[cut:]
  phase = np.random.default_rng([seed, 11]).random()
  held = [math.floor((g + 1) * heldout_fraction + phase) > math.floor(g * heldout_fraction + phase)
          for g in range(len(docs))]
  held[-1] = held[-1] or not any(held)
  return {"train": [d for d, h in zip(docs, held) if not h],
          "heldout": [d for d, h in zip(docs, held) if h]}


def split_tokens(directory, split):
  manifest = json.load(open(os.path.join(directory, "manifest.json")))
  return np.concatenate([np.load(os.path.join(directory, s["file"]))
                         for s in manifest["splits"][split]["shards"]])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepare")
  pattern, contents = write_corpus(str(root / "corpus"))
  out = str(root / "bytes")
  manifest = prepare.prepare(pattern, "bytes", out, progress=False, log=lambda *_: None, **OPTIONS)
  return {"root": root, "pattern": pattern, "contents": contents, "out": out, "manifest": manifest}


def shards_config(path):
  c = data.default_config("shards")
  c.path = path
  return c


def test_bytes_shards_hold_the_corpus_split_by_the_documented_rule(corpus):
  m, out = corpus["manifest"], corpus["out"]
  assert json.load(open(os.path.join(out, "manifest.json"))) == m
  assert m["format"] == shards.FORMAT and m["dtype"] == "uint16"
  assert (m["tokenizer"], m["vocab_size"], m["eod"]) == ("bytes", 257, 256) and "tokenizer_file" not in m
  assert m["source"]["pattern"] == corpus["pattern"] and m["source"]["file_count"] == 4
  assert m["options"] == OPTIONS | {"heldout_fraction": 0.2}
  assert set(m["versions"]) >= {"python", "numpy", "hybrids"} and m["created"]
  expected = expected_documents(corpus["contents"], **{k: OPTIONS[k] for k in
                                                       ("doc_bytes", "heldout_fraction", "seed")})
  assert expected["heldout"] and len(expected["train"]) > len(expected["heldout"])
  for split in shards.SPLITS:
    entry = m["splits"][split]
    tokens = split_tokens(out, split)
    assert text.bytes_decode(tokens) == expected[split]
    assert entry["documents"] == len(expected[split]) and entry["tokens"] == len(tokens)
    # Fixed-size shards (the last one shorter); size and sha256 are those of the files.
    sizes = [s["tokens"] for s in entry["shards"]]
    assert all(n == OPTIONS["shard_tokens"] for n in sizes[:-1]) and 0 < sizes[-1] <= OPTIONS["shard_tokens"]
    for s in entry["shards"]:
      blob = open(os.path.join(out, s["file"]), "rb").read()
      assert len(blob) == s["bytes"]
      assert hashlib.sha256(blob).hexdigest() == s["sha256"]
  assert len(m["splits"]["train"]["shards"]) >= 3  # windows below straddle shard boundaries
  assert not [p for p in os.listdir(corpus["root"]) if ".tmp-" in p]  # the build dir was renamed


def test_rerun_is_a_no_op_and_a_different_preparation_is_refused(corpus):
  out = corpus["out"]
  before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
  messages = []
  again = prepare.prepare(corpus["pattern"], "bytes", out, progress=False, log=messages.append, **OPTIONS)
  assert again == corpus["manifest"] and "nothing to do" in messages[0]
  with pytest.raises(ValueError, match=r"prepared differently \(tokenizer: 'bytes' there, 'bpe:300' now"):
    prepare.prepare(corpus["pattern"], "bpe:300", out, progress=False, **OPTIONS)
  with pytest.raises(ValueError, match=r"--seed: 3 there, 4 now"):
    prepare.prepare(corpus["pattern"], "bytes", out, progress=False, **(OPTIONS | {"seed": 4}))
  not_prepared = corpus["root"] / "other"
  not_prepared.mkdir()
  (not_prepared / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds no manifest.json"):
    prepare.prepare(corpus["pattern"], "bytes", str(not_prepared), progress=False, **OPTIONS)
  assert (not_prepared / "keep.txt").read_text() == "mine"
  assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)} == before
  # Bad arguments are named with their valid choices, before anything is read or written.
  with pytest.raises(ValueError, match=r"--tokenizer='words' is invalid: must be 'bytes' or 'bpe:VOCAB'"):
    prepare.prepare(corpus["pattern"], "words", str(corpus["root"] / "x"))
  with pytest.raises(ValueError, match=r"--input='/nonexistent/\*.txt' matches no files"):
    prepare.prepare("/nonexistent/*.txt", "bytes", str(corpus["root"] / "x"))
  assert not (corpus["root"] / "x").exists()


def test_cli_exits_with_a_clear_message(corpus, capsys):
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(["--input", corpus["pattern"], "--tokenizer", "bpe:12", "--output", corpus["out"]])
  assert exit_info.value.code == 2
  assert "--tokenizer='bpe:12' is invalid" in capsys.readouterr().err


def test_bpe_tokenizer_is_trained_on_the_train_split_and_saved(corpus):
  out = str(corpus["root"] / "bpe")
  m = prepare.prepare(corpus["pattern"], "bpe:300", out, progress=False, log=lambda *_: None, **OPTIONS)
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  assert (m["tokenizer"], m["vocab_size"], m["tokenizer_file"]) == ("bpe:300", 300, "tokenizer.json")
  assert m["eod"] == tok.token_to_id(text.BPE_EOD)
  assert m["learned_vocab_size"] == tok.get_vocab_size() <= 300
  expected = expected_documents(corpus["contents"], **{k: OPTIONS[k] for k in
                                                       ("doc_bytes", "heldout_fraction", "seed")})
  eod = m["eod"]
  for split in shards.SPLITS:
    tokens = split_tokens(out, split)
    assert tokens.dtype == np.uint16 and tokens.max() < 300
    assert m["splits"][split]["tokens"] == len(tokens)
    assert (tokens == eod).sum() == len(expected[split])
    np.testing.assert_array_equal(tokens, text.bpe_encode(tok, expected[split]))
  # Fewer tokens than bytes: merges were learned.
  assert m["splits"]["train"]["tokens"] < corpus["manifest"]["splits"]["train"]["tokens"]
  assert data.vocab_size(shards_config(out)) == 300


def test_source_items_are_the_windows_of_the_concatenated_shards(corpus):
  out = corpus["out"]
  for split in shards.SPLITS:
    stream = split_tokens(out, split).astype(np.int32)
    mapped = shards.ShardWindowSource(out, split, SEQ)
    ranged = shards.ShardWindowSource(out, split, SEQ, force_range_reads=True)
    assert len(mapped) == len(ranged) == len(stream) // (SEQ + 1)
    indices = range(len(mapped)) if split == "heldout" else [0, 1, 58, 59, 60, len(mapped) - 1]
    for i in indices:
      window = stream[i * (SEQ + 1):(i + 1) * (SEQ + 1)]
      for source in (mapped, ranged):
        item = source[i]
        assert item["inputs"].dtype == np.int32
        np.testing.assert_array_equal(item["inputs"], window[:-1])
        np.testing.assert_array_equal(item["labels"], window[1:])
    with pytest.raises(IndexError):
      mapped[len(mapped)]
  # Window 58 spans tokens [986, 1003): it straddles the first shard boundary (1000).
  assert 58 * (SEQ + 1) < OPTIONS["shard_tokens"] < 59 * (SEQ + 1)
  evals = data.eval_batches(shards_config(out), seq_len=SEQ, batch_size=4, num_batches=2)
  heldout = shards.ShardWindowSource(out, "heldout", SEQ)
  np.testing.assert_array_equal(evals[1]["inputs"][0], heldout[4]["inputs"])


def test_processes_read_only_their_rows_and_concatenate_to_the_single_process_batch(corpus):
  config = shards_config(corpus["out"])
  single = data.make_iterator(data.train_dataset(config, seq_len=SEQ, batch_size=4, seed=1))
  halves = [data.make_iterator(data.train_dataset(config, seq_len=SEQ, batch_size=4, seed=1,
                                                  process_index=p, process_count=2)) for p in range(2)]
  for _ in range(3):
    whole, parts = next(single), [next(it) for it in halves]
    for key in ("inputs", "labels"):
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))

  class Recording(shards.ShardWindowSource):
    def __init__(self, *args):
      super().__init__(*args)
      self.read = set()

    def __getitem__(self, index):
      self.read.add(int(index))
      return super().__getitem__(index)

  plain = shards.ShardWindowSource(corpus["out"], "train", SEQ)
  window_index = {tuple(plain[i]["inputs"]): i for i in range(len(plain))}
  assert len(window_index) == len(plain)  # windows are told apart by their content
  rows = {}
  for p in range(2):
    source = Recording(corpus["out"], "train", SEQ)
    ds = pipeline.shard_and_batch(source, batch_size=4, seed=1, process_index=p, process_count=2)
    batches = [ds[s] for s in range(3)]
    rows[p] = {window_index[tuple(r)] for b in batches for r in b["inputs"]}
    assert source.read == rows[p] and len(rows[p]) == 6
  assert not rows[0] & rows[1]


def test_iterator_state_resumes_bit_identically(corpus):
  config = shards_config(corpus["out"])

  def fresh():
    return data.make_iterator(data.train_dataset(config, seq_len=SEQ, batch_size=4, seed=2))

  it = fresh()
  [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = fresh()
  resumed.set_state(json.loads(json.dumps(state)))
  for want, got in zip(expected, [next(resumed) for _ in range(3)]):
    np.testing.assert_array_equal(want["inputs"], got["inputs"])
    np.testing.assert_array_equal(want["labels"], got["labels"])


def test_bad_data_path_names_the_field(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"data.path='' is invalid"):
    data.validate(shards_config(""), seq_len=SEQ)
  with pytest.raises(ValueError, match=r"data.path='.*' holds no manifest.json: prepare it first"):
    data.validate(shards_config(str(tmp_path)), seq_len=SEQ)
  heldout = corpus["manifest"]["splits"]["heldout"]["tokens"]
  with pytest.raises(ValueError, match=rf"split 'heldout' has {heldout} tokens, fewer than data.seq_len"):
    data.validate(shards_config(corpus["out"]), seq_len=heldout)


def test_train_runs_on_shards(corpus, tmp_path):
  from hybrids import train
  from hybrids.config import get_config
  # quickstart tiny with one SWA layer: a third of the tiny Griffin's compile time, same data path.
  config = get_config("experiments/quickstart.py:tiny", {
      "data.name": "shards", "data.path": corpus["out"], "data.seq_len": SEQ, "train.steps": 3,
      "train.eval_every": 0, "train.checkpoint_every": 3, "model.pattern": ("swa",),
      "model.n_layers": 1})
  summary = train.train(config, str(tmp_path / "run"), progress=False)
  assert summary["status"] == "done" and summary["step"] == 3
  assert np.isfinite(summary["eval"]["eval_loss"])
  assert json.load(open(tmp_path / "run" / "config.json"))["model"]["vocab_size"] == 257


def write_archive(path, members, mode="w:xz"):
  """A tar archive of ``[(name, body or None for a directory)]``, in that order."""
  import io
  import tarfile

  with tarfile.open(path, mode) as archive:
    for name, body in members:
      info = tarfile.TarInfo(name)
      if body is None:
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
      else:
        info.size = len(body)
        archive.addfile(info, io.BytesIO(body))
  return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  """Source-like members in a non-sorted order, some to skip; plus the ordered bodies kept."""
  root = tmp_path_factory.mktemp("archive")
  rng = np.random.default_rng(1)

  def body(lines):
    return "".join(" ".join(rng.choice(WORDS, size=6)) + ";\n" for _ in range(lines)).encode()

  members = [("src/", None), ("src/zeta.c", body(30)), ("src/alpha.h", body(12)), ("src/notes.txt", body(5)),
             ("src/gen/regs.h", body(50)), ("src/lib/empty.c", b""), ("src/lib/beta.c", body(20))]
  kept = [b for n, b in members if b is not None and n.endswith((".c", ".h")) and "/gen/" not in n]
  return {"root": root, "members": members, "kept": kept,
          "xz": write_archive(str(root / "src.tar.xz"), members),
          "gz": write_archive(str(root / "more.tar.gz"), [("more/last.c", body(8))], mode="w:gz")}


def test_tar_members_are_streamed_as_documents_in_archive_order(archive):
  options = OPTIONS | {"doc_bytes": 10_000}  # above every member: one member, one document
  out = str(archive["root"] / "members")
  manifest = prepare.prepare(archive["xz"], "bytes", out, members="*.c, *.h", exclude_members="*/gen/*",
                             progress=False, log=lambda *_: None, **options)
  assert manifest["options"]["members"] == "*.c,*.h" and manifest["options"]["exclude_members"] == "*/gen/*"
  # The empty member is selected (counted) but yields no document, as an empty file does.
  assert manifest["source"]["archive_members"] == [
      {"path": archive["xz"], "members": 4, "member_bytes": sum(map(len, archive["kept"]))}]
  expected = expected_documents(dict(enumerate(archive["kept"])), **{
      k: options[k] for k in ("doc_bytes", "heldout_fraction", "seed")})
  assert expected["heldout"] and expected["train"]
  for split in shards.SPLITS:
    assert text.bytes_decode(split_tokens(out, split)) == expected[split]
  # Members are cut at line breaks like files; archives are read in sorted path order.
  both = ",".join([archive["gz"], archive["xz"]])
  out_cut = str(archive["root"] / "members-cut")
  prepare.prepare(both, "bytes", out_cut, members="*.c,*.h", exclude_members="*/gen/*", progress=False,
                  log=lambda *_: None, **OPTIONS)
  bodies = [dict(read_archive_members(archive["gz"]))["more/last.c"]] + archive["kept"]  # more.tar.gz < src.tar.xz
  expected = expected_documents(dict(enumerate(bodies)), **{
      k: OPTIONS[k] for k in ("doc_bytes", "heldout_fraction", "seed")})
  assert len(expected["train"]) + len(expected["heldout"]) > len(bodies)
  for split in shards.SPLITS:
    assert text.bytes_decode(split_tokens(out_cut, split)) == expected[split]
  # The member globs are part of the preparation: a re-run is a no-op, other globs are refused.
  messages = []
  prepare.prepare(archive["xz"], "bytes", out, members="*.c,*.h", exclude_members="*/gen/*",
                  progress=False, log=messages.append, **options)
  assert "nothing to do" in messages[0]
  with pytest.raises(ValueError, match=r"--exclude-members: '\*/gen/\*' there, None now"):
    prepare.prepare(archive["xz"], "bytes", out, members="*.c,*.h", progress=False, **options)


def read_archive_members(path):
  """``[(name, body)]`` of a tar archive's regular files, read back with tarfile."""
  import tarfile

  with tarfile.open(path) as archive:
    return [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]


def test_bad_member_options_are_refused_before_anything_is_written(archive, corpus):
  target = archive["root"] / "never"
  cases = [
      (dict(members="*.rs"), r"--members='\*.rs' selects no member of '.*src.tar.xz'"),
      (dict(members=" , "), r"--members=' , ' is invalid: must be comma-separated globs"),
      (dict(exclude_members="*.h"), r"--exclude-members='\*.h' needs --members"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      prepare.prepare(archive["xz"], "bytes", str(target), progress=False, **kwargs, **OPTIONS)
  with pytest.raises(ValueError, match=r"is not a readable tar archive"):
    prepare.prepare(corpus["pattern"], "bytes", str(target), members="*", progress=False, **OPTIONS)
  assert not target.exists()


def test_a_given_tokenizer_file_tokenizes_exactly_as_the_preparation_that_trained_it(archive):
  trained = str(archive["root"] / "bpe-trained")
  first = prepare.prepare(archive["xz"], "bpe:300", trained, members="*.c,*.h", progress=False,
                          log=lambda *_: None, **OPTIONS)
  tokenizer_file = os.path.join(trained, "tokenizer.json")
  reused = str(archive["root"] / "bpe-reused")
  second = prepare.prepare(archive["xz"], "bpe:300", reused, members="*.c,*.h", tokenizer_file=tokenizer_file,
                           progress=False, log=lambda *_: None, **OPTIONS)
  assert first["splits"] == second["splits"]  # same shards: token counts, documents, sha256
  assert open(os.path.join(reused, "tokenizer.json")).read() == open(tokenizer_file).read()
  assert second["options"]["tokenizer_file_sha256"] == hashlib.sha256(
      open(tokenizer_file, "rb").read()).hexdigest() and "bpe_sample_bytes" not in second["options"]
  with pytest.raises(ValueError, match=r"--tokenizer-file=.* needs --tokenizer=bpe:VOCAB"):
    prepare.prepare(archive["xz"], "bytes", reused + "-x", tokenizer_file=tokenizer_file, progress=False)
  with pytest.raises(ValueError, match=r"has \d+ ids; --tokenizer=bpe:280 needs at most 280 ids"):
    prepare.prepare(archive["xz"], "bpe:280", reused + "-x", tokenizer_file=tokenizer_file, progress=False)
  assert not os.path.exists(reused + "-x")
