"""``python -m hybrids.evaluate`` on tiny trained runs, and the retrieval probes of ``hybrids.data.retrieval``.

Run: ``PYTHONPATH=. python -m pytest -q -n 0 tests/test_evaluate.py``
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from hybrids import evaluate
from hybrids.config import get_config, identity
from hybrids.data import retrieval
from hybrids.data.pipeline import IGNORE_LABEL
from hybrids.train import document_eod, resolve, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"
ONE_SWA_LAYER = {"model.pattern": ("swa",), "model.n_layers": 1}


def read_json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
  """Quickstart's tiny MQAR setting (seq_len 32) on one SWA layer (window 8); checkpoints at steps 2 and 4.

  One SWA layer compiles in a third of the time of tiny's Griffin stack (the evals are mixer-agnostic);
  vocabulary 257 so that the byte-level text run below has the same shapes.
  """
  workdir = str(tmp_path_factory.mktemp("mqar"))
  train(get_config(TINY, {**ONE_SWA_LAYER, "data.vocab_size": 257, "train.steps": 4, "train.checkpoint_every": 2,
                          "train.eval_every": 0}), workdir, progress=False)
  return workdir


@pytest.fixture(scope="module")
def text_run(mqar_run, tmp_path_factory):
  """A byte-level text run: the MQAR run's checkpoints under a text config with the same model.

  The evals read only config.json and the checkpoints, so this saves a second training's compile.
  Corpus: generated sentences, one file, 30% held out.
  """
  corpus = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = "the a cat dog sat on mat ran far away home tree green blue sky sun river stone bird song".split()
  (corpus / "a.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(300)))
  workdir = str(tmp_path_factory.mktemp("text"))
  shutil.copytree(os.path.join(mqar_run, "checkpoints"), os.path.join(workdir, "checkpoints"))
  config = resolve(get_config(TINY, {**ONE_SWA_LAYER, "data.name": "text", "data.files": str(corpus / "*.txt"),
                                     "data.heldout_fraction": 0.3}))
  config_json = identity(config)
  assert config_json["model"] == read_json(mqar_run, "config.json")["model"]  # same shapes
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_json, f)
  return workdir


# ----------------------------------------------------------------------------- probes (no model)

@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_needle_sits_at_the_requested_depth(task):
  tok = retrieval.ByteTokenizer()
  filler = retrieval.filler_stream(tok, 100)  # shorter than the examples: the stream cycles
  build = retrieval.passkey_example if task == "passkey" else retrieval.niah_example
  instruction = retrieval.PASSKEY_INSTRUCTION if task == "passkey" else retrieval.NIAH_INSTRUCTION
  length = 400
  for depth in (0.0, 0.3, 1.0):
    ex = build(tok, filler, length=length, depth=depth, seed=3, sample=1)
    text = bytes(ex.inputs.astype(np.uint8)).decode()
    assert ex.inputs.shape == ex.labels.shape == (length,)
    if task == "passkey":
      needle = retrieval.PASSKEY_NEEDLE.format(key=ex.answer)
      question = retrieval.PASSKEY_QUESTION
    else:
      word = text.split("special magic number for ")[1].split(" ")[0]
      needle = retrieval.NIAH_NEEDLE.format(word=word, key=ex.answer)
      question = retrieval.NIAH_QUESTION.format(word=word)
    answer = " " + ex.answer
    n_filler = length - len(instruction) - len(needle) - len(question) - len(answer)
    assert ex.needle_start == len(instruction) + round(depth * n_filler)
    assert text[ex.needle_start:ex.needle_start + len(needle)] == needle
    assert text.startswith(instruction) and text.endswith(question + answer)
    scored = np.flatnonzero(ex.labels != IGNORE_LABEL)  # the answer's tokens, predicted one position early
    assert scored.tolist() == list(range(length - len(answer) - 1, length - 1))
    assert bytes(ex.labels[scored].astype(np.uint8)).decode() == answer
  again = build(tok, filler, length=length, depth=1.0, seed=3, sample=1)
  other = build(tok, filler, length=length, depth=1.0, seed=3, sample=2)
  assert np.array_equal(again.inputs, ex.inputs) and other.answer != ex.answer


def test_mqar_block_at_depth_and_queries_at_the_end():
  length, k, vocab = 64, 4, 64
  for depth in (0.0, 0.5, 1.0):
    ex = retrieval.mqar_depth_example(length=length, depth=depth, vocab_size=vocab, num_kv_pairs=k, seed=1)
    start = ex.needle_start
    assert start == round(depth * (length - 4 * k))
    pairs = dict(zip(ex.inputs[start:start + 2 * k:2].tolist(), ex.inputs[start + 1:start + 2 * k:2].tolist()))
    query_pos = np.flatnonzero(ex.labels != IGNORE_LABEL)
    assert query_pos.tolist() == list(range(length - 2 * k, length, 2))
    assert {int(ex.inputs[q]): int(ex.labels[q]) for q in query_pos} == pairs
    filler = np.delete(ex.inputs, np.r_[start:start + 2 * k, query_pos])
    assert not set(filler.tolist()) & set(pairs)  # no filler token looks like a query


def test_scoring_perfect_constant_and_one_digit_off():
  tok = retrieval.ByteTokenizer()
  examples = retrieval.make_examples("passkey", length=300, depth=0.5, samples=3, tokenizer=tok,
                                     filler=retrieval.filler_stream(tok))
  inputs = np.stack([e.inputs for e in examples])
  labels = np.stack([e.labels for e in examples])
  vocab = 257
  # The oracle's next token is the example's own next token (the answer is in the inputs).
  perfect = np.eye(vocab)[np.concatenate([inputs[:, 1:], inputs[:, -1:]], 1)]
  constant = np.zeros_like(perfect)
  constant[..., ord("7")] = 1.0
  off = perfect.copy()
  last_digit = np.flatnonzero(labels[0] != IGNORE_LABEL)[-1]
  off[0, last_digit] = np.eye(vocab)[(labels[0, last_digit] - ord("0") + 1) % 10 + ord("0")]
  score = lambda logits, exact: retrieval.example_accuracy(retrieval.answer_correct(logits, labels), labels,
                                                          exact_match=exact)
  assert score(perfect, True).tolist() == [1.0, 1.0, 1.0]
  assert score(constant, True).tolist() == [0.0, 0.0, 0.0]
  assert score(off, True).tolist() == [0.0, 1.0, 1.0]
  np.testing.assert_allclose(score(off, False), [5 / 6, 1.0, 1.0])  # " NNNNN": one of six tokens wrong
  padding = np.full((1, 300), IGNORE_LABEL)
  assert np.isnan(retrieval.example_accuracy(np.zeros((1, 300), bool), padding, exact_match=True)).all()


# ----------------------------------------------------------------------------- the command line

def test_every_eval_on_an_mqar_run(mqar_run):
  code = evaluate.main(["--workdir", mqar_run, "--eval", "loss,position,mqar,retrieval", "--lengths", "32,64",
                        "--kv-pairs", "2,16", "--samples", "4", "--depths", "0,1"])
  assert code == 0
  summary = read_json(mqar_run, "summary.json")
  assert summary["status"] == "done" and summary["step"] == 4  # training's keys untouched
  assert set(summary["evals"]) == {"loss", "position", "mqar", "retrieval"}

  loss = read_json(mqar_run, "eval", "loss.json")
  assert loss["step"] == 4 and loss["lengths"] == [32, 64] and loss["train_seq_len"] == 32
  # At the training length the held-out split is the training loop's eval: the same loss.
  np.testing.assert_allclose(loss["loss"][0], summary["eval"]["eval_loss"], rtol=1e-5)
  assert summary["evals"]["loss"]["loss"]["32"] == loss["loss"][0]

  position = read_json(mqar_run, "eval", "position.json")
  assert position["window"] == 8 and position["train_seq_len"] == 32
  curve = position["loss_by_position"]["64"]
  assert len(curve) == 64 and all(v is None or v > 0 for v in curve) and any(v is not None for v in curve)
  assert curve[0] is None  # MQAR scores only the query positions, never the first token

  mqar = read_json(mqar_run, "eval", "mqar.json")
  assert list(zip(mqar["lengths"], mqar["num_kv_pairs"])) == [(32, 2), (64, 2), (64, 16)]
  assert mqar["skipped"] == [[32, 16]] and all(0 <= a <= 1 for a in mqar["accuracy"])

  ret = read_json(mqar_run, "eval", "retrieval.json")
  assert ret["task"] == "mqar" and ret["lengths"] == [32, 64] and ret["depths"] == [0.0, 1.0]
  assert np.array(ret["accuracy"]).shape == (2, 2) and ret["num_kv_pairs"] == 2
  assert summary["evals"]["retrieval"]["by_length"].keys() == {"32", "64"}

  # The recurrent face (decode steps in a scan) scores the same function.
  assert evaluate.main(["--workdir", mqar_run, "--eval", "loss", "--lengths", "32", "--face", "recurrent"]) == 0
  recurrent = read_json(mqar_run, "eval", "loss.json")
  assert recurrent["face"] == "recurrent"
  np.testing.assert_allclose(recurrent["loss"], loss["loss"][:1], rtol=1e-5)


def test_text_run_position_beyond_training_length_and_passkey(text_run, capsys):
  code = evaluate.main(["--workdir", text_run, "--eval", "position,retrieval", "--lengths", "32,320",
                        "--tasks", "passkey", "--depths", "0,0.5,1", "--samples", "2", "--batch-size", "2"])
  assert code == 2  # 32 tokens cannot hold a passkey prompt: refused before anything runs
  assert "passkey" in capsys.readouterr().err and not os.path.exists(os.path.join(text_run, "eval"))
  assert evaluate.main(["--workdir", text_run, "--eval", "position", "--lengths", "32,320"]) == 0
  assert evaluate.main(["--workdir", text_run, "--eval", "retrieval", "--lengths", "320", "--depths", "0,0.5,1",
                        "--samples", "2", "--batch-size", "2"]) == 0
  position = read_json(text_run, "eval", "position.json")
  assert [len(position["loss_by_position"][k]) for k in ("32", "320")] == [32, 320]
  assert all(isinstance(v, float) for v in position["loss_by_position"]["320"])  # text scores every position
  ret = read_json(text_run, "eval", "retrieval.json")
  assert ret["filler"] == "heldout" and ret["tokenizer"] == "bytes" and ret["task"] == "passkey"
  assert set(ret["by_task"]) == {"passkey", "niah"} and np.array(ret["by_task"]["niah"]).shape == (1, 3)
  assert "passkey length" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--eval", "loss,perplexity"], "valid: loss, position, mqar, retrieval"),
    (["--eval", "retrieval", "--depths", "0,1.5"], "--depths"),
    (["--eval", "retrieval", "--tasks", "passkey"], "supports mqar"),
    (["--eval", "mqar", "--lengths", "33"], "even"),
    (["--eval", "loss", "--face", "sideways"], "valid: parallel, recurrent"),
])
def test_bad_requests_fail_before_anything_runs(mqar_run, capsys, argv, message):
  before = sorted(os.listdir(mqar_run))
  assert evaluate.main(["--workdir", mqar_run, *argv]) == 2
  assert message in capsys.readouterr().err
  assert sorted(os.listdir(mqar_run)) == before


def test_mqar_eval_on_a_text_run_is_refused(text_run, capsys):
  assert evaluate.main(["--workdir", text_run, "--eval", "mqar"]) == 2
  assert "data.name='mqar'" in capsys.readouterr().err


def test_missing_and_corrupt_run_directories(mqar_run, tmp_path, capsys):
  assert evaluate.main(["--workdir", str(tmp_path / "nowhere")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(tmp_path)]) == 2
  assert "no config.json" in capsys.readouterr().err
  (tmp_path / "config.json").write_text("{not json")
  assert evaluate.main(["--workdir", str(tmp_path)]) == 2
  assert "not valid JSON" in capsys.readouterr().err

  def corrupt(workdir, step):
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "params")):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")

  copy = str(tmp_path / "copy")
  shutil.copytree(mqar_run, copy)
  corrupt(copy, 4)
  with pytest.warns(UserWarning, match="step 2"):
    assert evaluate.main(["--workdir", copy, "--eval", "loss"]) == 0
  assert read_json(copy, "eval", "loss.json")["step"] == 2  # the newest readable checkpoint
  corrupt(copy, 2)
  assert evaluate.main(["--workdir", copy, "--eval", "loss"]) == 2
  assert "could be read" in capsys.readouterr().err


# ----------------------------------------------------------------------------- packed documents

@pytest.fixture(scope="module")
def packed_text_run(tmp_path_factory):
  """A byte-level text run trained for 2 steps on 60 short documents (one per file), so that every held-out
  row of 32 tokens packs several of them; ``data.document_boundaries`` is on (the default)."""
  corpus = tmp_path_factory.mktemp("packed_corpus")
  rng = np.random.default_rng(1)
  words = "cat dog sun sky red blue ran sat".split()
  for i in range(60):
    (corpus / f"{i:02d}.txt").write_text(" ".join(rng.choice(words, int(rng.integers(1, 4)))) + ".")
  workdir = str(tmp_path_factory.mktemp("packed_text"))
  train(get_config(TINY, {**ONE_SWA_LAYER, "data.name": "text", "data.files": str(corpus / "*.txt"),
                          "data.heldout_fraction": 0.3, "train.steps": 2, "train.warmup_steps": 1,
                          "train.checkpoint_every": 2, "train.eval_every": 0}), workdir, progress=False)
  return workdir


def test_packed_text_heldout_loss_equals_the_training_loops_final_eval(packed_text_run):
  config = evaluate.load_config(packed_text_run)
  eod = document_eod(config)
  assert eod == 256
  batches = evaluate.heldout_batches(config, packed_text_run, 32, int(config.train.batch_size),
                                     int(config.train.eval_batches))
  assert all((row[:-1] == eod).sum() >= 2 for b in batches for row in b["inputs"])  # ≥ 3 documents a row

  assert evaluate.main(["--workdir", packed_text_run, "--eval", "loss,position"]) == 0
  summary = read_json(packed_text_run, "summary.json")
  loss = read_json(packed_text_run, "eval", "loss.json")
  assert loss["step"] == summary["eval"]["step"] == 2 and loss["lengths"] == [32]
  np.testing.assert_allclose(loss["loss"][0], summary["eval"]["eval_loss"], rtol=1e-5)
  np.testing.assert_allclose(loss["accuracy"][0], summary["eval"]["eval_token_accuracy"], rtol=1e-5)
  # Every position but the one after each EOD (the next document's first token, not scored).
  scored = sum(int((b["labels"] != IGNORE_LABEL).sum() - (b["inputs"] == eod).sum()) for b in batches)
  assert loss["tokens"] == [scored]
  np.testing.assert_allclose(summary["evals"]["position"]["mean_loss"]["32"], loss["loss"][0], rtol=1e-6)

  # Documents run into each other, and the cross-document labels scored: another loss.
  _, graphdef, abstract_state, params = evaluate.restore_params(packed_text_run, config)
  leaky = evaluate.Scorer(graphdef, abstract_state, params, face="parallel", window=None, document_eod=None)
  nll = sum(leaky(b)[0].sum() for b in batches)
  count = sum(int((b["labels"] != IGNORE_LABEL).sum()) for b in batches)
  assert abs(nll / count - summary["eval"]["eval_loss"]) > 1e-3


def test_recurrent_face_is_refused_for_packed_heldout_rows(packed_text_run, capsys):
  before = sorted(os.listdir(packed_text_run))
  eval_dir = os.path.join(packed_text_run, "eval")
  written = sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else None
  for evals in ("loss", "position", "position,retrieval"):
    argv = ["--workdir", packed_text_run, "--eval", evals, "--face", "recurrent", "--lengths", "320"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--face=recurrent" in err and "data.document_boundaries=True" in err and "--face=parallel" in err
  assert sorted(os.listdir(packed_text_run)) == before
  assert (sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else None) == written
  # The scorer itself refuses a labelled row holding an EOD on that face; an unlabelled row (padding) may hold one.
  config = evaluate.load_config(packed_text_run)
  _, graphdef, abstract_state, params = evaluate.restore_params(packed_text_run, config)
  scorer = evaluate.Scorer(graphdef, abstract_state, params, face="recurrent", window=None, document_eod=256)
  ignored = [IGNORE_LABEL] * 4
  with pytest.raises(evaluate.EvalError, match="--face=recurrent: a row holds the end-of-document token 256"):
    scorer({"inputs": np.array([[5, 6, 256, 7], [1, 2, 3, 4]], np.int32),
            "labels": np.array([[6, 256, 7, 8], ignored], np.int32)})
  labels = np.array([[6, 7, 8, 9], ignored], np.int32)
  nll, _, scored = scorer({"inputs": np.array([[5, 6, 7, 8], [256] * 4], np.int32), "labels": labels})
  np.testing.assert_array_equal(scored, labels != IGNORE_LABEL)
  assert (nll[0] > 0).all() and (nll[1] == 0).all()
  # Retrieval probes are one document each: its filler drops the held-out split's EOD tokens.
  args = evaluate.parser().parse_args(["--workdir", packed_text_run, "--eval", "retrieval", "--face", "recurrent",
                                       "--lengths", "320"])
  assert evaluate.plan(args, config, packed_text_run)["document_eod"] == 256
  stream = evaluate.heldout_filler(config, packed_text_run, 200)
  assert (stream == 256).sum() >= 2  # held-out documents, each closed by its EOD
  filler = evaluate.heldout_filler(config, packed_text_run, 200, document_eod=256)
  np.testing.assert_array_equal(filler, stream[stream != 256])  # the same text, documents run together


# ----------------------------------------------------------------------------- a shards run's tokenizer

@pytest.fixture(scope="module")
def bpe_shards(tmp_path_factory):
  """A BPE-prepared shards directory and a run directory whose config reads it (no checkpoint needed)."""
  from hybrids.data import prepare
  root = tmp_path_factory.mktemp("bpe_shards")
  rng = np.random.default_rng(2)
  words = "the quick brown fox jumps over a lazy dog while wizards judge boxing matches".split()
  (root / "corpus.txt").write_text("".join(" ".join(rng.choice(words, 8)) + ".\n" for _ in range(200)))
  data_path = str(root / "shards")
  prepare.prepare(str(root / "corpus.txt"), "bpe:300", data_path, progress=False, log=lambda *_: None,
                  heldout_fraction=0.2, doc_bytes=300)
  run = root / "run"
  run.mkdir()
  config = resolve(get_config(TINY, {**ONE_SWA_LAYER, "data.name": "shards", "data.path": data_path}))
  assert config.data.tokenizer == "bytes"  # the text dataset's default, not what the shards hold
  (run / "config.json").write_text(json.dumps(identity(config)))
  return {"data_path": data_path, "run": str(run)}


def test_shards_run_gets_its_manifests_bpe_tokenizer(bpe_shards, monkeypatch):
  from tokenizers import Tokenizer
  config = evaluate.load_config(bpe_shards["run"])
  expected = Tokenizer.from_file(os.path.join(bpe_shards["data_path"], "tokenizer.json"))
  text = "the lazy fox judges wizards"
  tokenizer = evaluate._tokenizer(config, bpe_shards["run"])
  assert isinstance(tokenizer, retrieval.HFTokenizer) and bpe_shards["data_path"] in tokenizer.name
  assert tokenizer.encode(text).tolist() == expected.encode(text, add_special_tokens=False).ids
  assert len(tokenizer.encode(text)) < len(text.encode())  # not bytes
  # A remote data.path (gs://…) is read through epath; tokenizers then loads a local copy.
  monkeypatch.setattr(evaluate.data_shards, "is_remote", lambda path: True)
  remote = evaluate._tokenizer(config, bpe_shards["run"])
  assert remote.encode(text).tolist() == tokenizer.encode(text).tolist() and "tokenizer.json" in remote.name


def test_shards_run_without_its_manifest_is_one_error_not_bytes(bpe_shards, tmp_path, capsys):
  from hybrids import generate
  run = tmp_path / "run"
  shutil.copytree(bpe_shards["run"], run)
  moved = str(tmp_path / "moved")
  shutil.copytree(bpe_shards["data_path"], moved)
  config = json.loads((run / "config.json").read_text())
  config["data"]["path"] = moved
  (run / "config.json").write_text(json.dumps(config))
  assert isinstance(evaluate._tokenizer(evaluate.load_config(str(run)), str(run)), retrieval.HFTokenizer)
  shutil.rmtree(moved)  # the data moved away after training
  with pytest.raises(evaluate.EvalError, match=rf"data.path='{moved}' holds no manifest.json"):
    evaluate._tokenizer(evaluate.load_config(str(run)), str(run))
  assert evaluate.main(["--workdir", str(run), "--eval", "retrieval"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and moved in err and "manifest.json" in err
  assert generate.main(["--workdir", str(run), "--prompt", "the fox"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--prompt needs the run's tokenizer" in err and "manifest.json" in err
