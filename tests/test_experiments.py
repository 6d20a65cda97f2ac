"""The experiment definitions: every variant's sweep has its documented size, validates and is unique;
a bad variant is named; one point of each experiment's ``tiny`` variant trains.

    PYTHONPATH=. python -m pytest -q -n 0 tests/test_experiments.py

Text experiments read ``data/gcide-bytes`` relative to the working directory, so the tests prepare a
small byte-level shards directory there (in a temporary working directory) with
``hybrids.data.prepare``. Fully resolving the size-matched grids (``model.size``) builds abstract
models for every (size, pattern), minutes on a small CPU, so every grid is checked here with
``hybrids.config.validate`` per point, and the cheap variants (``tiny``, the small MQAR grids) are also
resolved in full by ``launch.sweep.expand``; ``python -m launch sweep EXPERIMENT --dry-run`` resolves
any grid in full.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from hybrids import config as config_lib
from hybrids.data import prepare
from hybrids.mixers import MIXERS
from hybrids.train import train
from launch import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MQAR_EXPERIMENTS = ("zoology_mqar", "based_tradeoff")
SURVEY_RECURRENT = [m for m in MIXERS if m not in ("attention", "swa", "fox")]
SURVEY_PATTERNS = 3 * len(SURVEY_RECURRENT) + 4
TEXT_EXPERIMENTS = ("scaling", "griffin_window", "swax", "hybrid_topology", "mixer_survey")
# (experiment, variant) → points, as each module docstring documents them.
SWEEP_SIZES = {
    ("zoology_mqar", None): 640, ("zoology_mqar", "figure2"): 240, ("zoology_mqar", "small"): 36,
    ("zoology_mqar", "tiny"): 2,
    ("based_tradeoff", None): 148, ("based_tradeoff", "small"): 22, ("based_tradeoff", "tiny"): 2,
    ("scaling", None): 60, ("scaling", "small"): 8, ("scaling", "gpu"): 4, ("scaling", "tiny"): 2,
    ("griffin_window", None): 33, ("griffin_window", "small"): 9, ("griffin_window", "gpu"): 9,
    ("griffin_window", "tiny"): 2,
    ("swax", None): 10, ("swax", "small"): 3, ("swax", "tiny"): 2,
    ("hybrid_topology", None): 42, ("hybrid_topology", "small"): 4, ("hybrid_topology", "tiny"): 2,
    # Every recurrent mixer pure and hybrid at two windows, plus 4 references (a new mixer joins the survey),
    # × 3 learning rates, at 4 sizes in full and one size per slice; small: 1m at one lr; pilot: 1m, 3 lrs.
    ("mixer_survey", None): 4 * 3 * SURVEY_PATTERNS, ("mixer_survey", "small"): SURVEY_PATTERNS,
    ("mixer_survey", "pilot"): 3 * SURVEY_PATTERNS,
    ("mixer_survey", "tiny"): 2,
    **{("mixer_survey", size): 3 * SURVEY_PATTERNS for size in ("1m", "2m", "5m", "10m")},
}
# Resolved in full through launch.sweep.expand as well (cheap: no size presets to match).
FULLY_RESOLVED = {key for key in SWEEP_SIZES if key[1] == "tiny" or (key[0] in MQAR_EXPERIMENTS and key[1])}


def path_of(name: str) -> str:
  return os.path.join(REPO, "experiments", f"{name}.py")


def spec_of(name: str, variant: str | None) -> str:
  return path_of(name) + (f":{variant}" if variant else "")


def grid_points(name: str, variant: str | None) -> list[dict]:
  """``sweep_points``, but the survey's full grids without its corpus check: the stand-in corpus of
  ``corpus_dir`` is far smaller than the one the survey is sized for (the check has its own test)."""
  if name != "mixer_survey" or variant == "tiny":
    return sweep_lib.sweep_points(spec_of(name, variant))
  module = config_lib.load_experiment(path_of(name))
  return [sweep_lib.plain(p) for p in module.get_sweep(sweep_lib.SweepHelpers(), variant, check_corpus_tokens=False)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """A working directory holding ``data/gcide-bytes``: ~35 KB of text, both splits > 8193 bytes
  (griffin_window's longest sequence), so every text grid validates against it."""
  root = tmp_path_factory.mktemp("experiments")
  rng = random.Random(0)
  words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxers".split()
  text = "".join(" ".join(rng.choice(words) for _ in range(8)) + ".\n" for _ in range(800))
  (root / "corpus.txt").write_text(text)
  for name in ("gcide-bytes", "linux-6.1-bpe16k", "linux-6.1-bpe16k-pilot"):  # the survey's corpora: the same stand-in
    prepare.prepare(str(root / "corpus.txt"), "bytes", str(root / "data" / name), heldout_fraction=0.5,
                    doc_bytes=2048, progress=False, log=lambda *_: None)
  previous = os.getcwd()
  os.chdir(root)
  yield root
  os.chdir(previous)


def canonical(config) -> str:
  return json.dumps(json.loads(config.to_json_best_effort(sort_keys=True)), sort_keys=True)


@pytest.mark.parametrize("name,variant", sorted(SWEEP_SIZES, key=lambda k: (k[0], k[1] or "")))
def test_sweep_size_validity_and_uniqueness(name, variant, corpus_dir):
  spec = spec_of(name, variant)
  points = grid_points(name, variant)
  assert len(points) == SWEEP_SIZES[(name, variant)]
  assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points), "a point is listed twice"
  module = config_lib.load_experiment(path_of(name))
  bases = {}
  configs = set()
  for point in points:
    arg = point.get("config", variant)
    assert arg == variant, f"point {point} of variant {variant!r} uses get_config({arg!r})"
    if arg not in bases:
      bases[arg] = module.get_config(arg)
    config = config_lib.apply_overrides(bases[arg], {k: v for k, v in point.items() if k != "config"})
    config_lib.validate(config)
    configs.add(canonical(config))
  assert len(configs) == len(points), "two points give the same config"
  if (name, variant) in FULLY_RESOLVED:
    expanded = sweep_lib.expand(spec)
    assert len({rid for rid, _, _ in expanded}) == len(points)


def test_documented_grids_match_their_axes():
  """The full grids are the products the docstrings describe."""
  zoology = config_lib.load_experiment(path_of("zoology_mqar"))
  assert len(zoology.PAPER_MIXERS) * len(zoology.D_MODELS) * len(zoology.SEQ_LEN_KV) * len(zoology.LEARNING_RATES) == 640
  assert [round(math.log10(lr), 3) for lr in zoology.LEARNING_RATES] == [-4.0, -3.333, -2.667, -2.0]
  points = sweep_lib.sweep_points(path_of("zoology_mqar"))
  assert {(p["data.seq_len"], p["data.num_kv_pairs"]) for p in points} == set(zoology.SEQ_LEN_KV)
  # Zoology's 64 epochs over 100k examples at every sequence length (its loader's last batch of an
  # epoch is partial; ours are whole, so an epoch is ⌈100k / batch⌉ steps), one test per epoch.
  assert all(p["train.steps"] == 64 * math.ceil(100_000 / p["train.batch_size"]) == 64 * p["train.eval_every"]
             for p in points)
  # Learned positions for attention alone, as Zoology's configs.
  assert {tuple(p["model.pattern"]) for p in points if p["model.position"] == "learned"} == {("attention",)}
  survey = config_lib.load_experiment(path_of("mixer_survey"))
  assert set(survey.RECURRENT) | set(survey.ATTENTION_MIXERS) == set(MIXERS)
  assert len(survey.patterns()) == SURVEY_PATTERNS == 3 * len(survey.RECURRENT) + 4
  stacks = {tuple(p) for p, _ in survey.patterns()}
  for m in survey.RECURRENT:  # pure, and hybrid at every window
    assert (m,) in stacks and {w for p, w in survey.patterns() if p == (m, m, "swa")} == set(survey.WINDOWS)
  assert min(survey.WINDOWS) <= 128 < max(survey.WINDOWS)
  points = grid_points("mixer_survey", None)
  for size in survey.SIZES:  # each (pattern, size) at 3 learning rates centred on the table's
    lrs = sorted({p["train.lr"] for p in points if p["model.size"] == size})
    assert lrs == pytest.approx([survey.LR[size] / 2, survey.LR[size], 2 * survey.LR[size]])


@pytest.mark.parametrize("name", TEXT_EXPERIMENTS)
def test_steps_follow_tokens_per_param(name, corpus_dir):
  """Size-matched grids train ≈ 20 tokens per non-embedding parameter of the size's attention baseline
  (griffin_window: the gpu variant's fixed step count aside), the same for every pattern of a size."""
  from hybrids.config import model_config
  from hybrids.sizes import apply_size, non_embedding_params

  points = grid_points(name, None)
  module = config_lib.load_experiment(path_of(name))
  base = module.get_config(None)
  by_size = {}
  for p in points:
    size = p.get("model.size", base.model.size)
    tokens = (p.get("train.steps", base.train.steps) * p.get("train.batch_size", base.train.batch_size)
              * p.get("data.seq_len", base.data.seq_len))
    by_size.setdefault((size, p.get("data.seq_len", base.data.seq_len)), set()).add(tokens)
  for (size, _), tokens in by_size.items():
    assert len(tokens) == 1, f"{name}: patterns of size {size} see different token counts {tokens}"
    baseline = model_config()
    baseline.size, baseline.pattern, baseline.num_kv_heads = size, ("attention",), base.model.num_kv_heads
    params = non_embedding_params(apply_size(baseline))
    assert tokens.pop() / params == pytest.approx(20, rel=0.05)


@pytest.mark.parametrize("name", MQAR_EXPERIMENTS + TEXT_EXPERIMENTS)
def test_unknown_variant_is_named(name):
  module = config_lib.load_experiment(path_of(name))
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'smal'.*valid: small"):
    module.get_config("smal")
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'smal'"):
    module.get_sweep(sweep_lib.SweepHelpers(), "smal")


# Training costs a compile (~20 s of CI CPU each), so two experiments cover the two data paths: MQAR,
# and prepared shards with a size preset (SWAX's stochastic windows train in test_train.py). Every
# point of every tiny variant is still resolved and validated above.
TRAINED = ("zoology_mqar", "scaling")


@pytest.mark.parametrize("name", TRAINED)
def test_tiny_point_trains(name, corpus_dir, tmp_path):
  """The first point of the ``tiny`` sweep trains its few steps and writes a finished run directory."""
  _, point, config = sweep_lib.expand(spec_of(name, "tiny"))[0]
  summary = train(config, str(tmp_path), progress=False)
  assert summary["status"] == "done", summary.get("error")
  assert summary["step"] == config.train.steps
  assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["eval"]["eval_loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == list(range(1, config.train.steps + 1))


def test_based_tradeoff_follows_zoology_config():
  """Zoology's arxiv24_based_figure2 grid: the segments, the four learning rates, 32 epochs of 704 steps,
  no position embedding, BaseConv before attention / Based / SWA, and the state measured at length 1024."""
  based = config_lib.load_experiment(path_of("based_tradeoff"))
  assert [round(math.log10(lr), 3) for lr in based.LEARNING_RATES] == [-3.0, -2.5, -2.0, -1.5]
  c = based.get_config(None)
  assert sum(n for _, _, n in c.data.train_segments) == 180_000 and len(c.data.eval_segments) == 7
  assert c.train.steps == 32 * 704 and c.train.eval_every == 704 and c.train.batch_size == 256
  assert c.train.eval_batches * c.train.batch_size >= 1000  # every test example, per segment
  points = sweep_lib.sweep_points(path_of("based_tradeoff"))
  by_mixer = {}
  for p in points:
    by_mixer.setdefault(tuple(p["model.pattern"]), []).append(p)
  assert {k: len(v) // 4 for k, v in by_mixer.items()} == {
      ("baseconv", "attention"): 2, ("baseconv", "based"): 9, ("baseconv", "swa"): 8, ("mamba",): 9,
      ("hyena",): 3, ("rglru",): 3, ("gla",): 3}
  assert all(p["data.seq_len"] == 1024 for p in by_mixer[("baseconv", "attention")])
  assert all(p["data.seq_len"] == max(256, p["model.window"]) for p in by_mixer[("baseconv", "swa")])
  assert all(p["model.conv_width"] == 3 for k, v in by_mixer.items() if k[0] == "baseconv" for p in v)
  assert c.model.position == "none" and all("model.position" not in p for p in points)


def test_based_tradeoff_tiny_trains(corpus_dir, tmp_path):
  """The tiny Based point trains on a segment mixture and evaluates every test segment at its length."""
  from hybrids import data as data_lib

  _, point, config = sweep_lib.expand(spec_of("based_tradeoff", "tiny"))[0]
  assert data_lib.max_labels_per_row(config.data) == 8  # the longest test segment's pairs
  summary = train(config, str(tmp_path), progress=False)
  assert summary["status"] == "done", summary.get("error")
  ev = summary["eval"]
  assert math.isfinite(ev["eval_loss"]) and 0 <= ev["eval_accuracy"] <= 1 and 0 <= ev["eval_token_accuracy"] <= 1
  assert summary["state_bytes_per_sequence"] > 0


def test_zoology_compare_puts_our_best_beside_the_published_cell(tmp_path):
  zoology = config_lib.load_experiment(path_of("zoology_mqar"))

  def run(run_id, pattern, d_model, seq_len, pairs):
    return {"run_id": run_id, "config": {"model": {"pattern": list(pattern), "d_model": d_model},
                                         "data": {"seq_len": seq_len, "num_kv_pairs": pairs}}}

  report = {"runs": [run("a", ("attention",), 64, 64, 4), run("b", ("baseconv", "based"), 128, 256, 16)],
            "cells": [{"best_run": "a", "best_metric": 0.995, "best_lr": 1e-2, "edge": True},
                      {"best_run": "b", "best_metric": 0.5, "best_lr": 2e-3, "edge": False}]}
  path = tmp_path / "report.json"
  path.write_text(json.dumps(report))
  table = zoology.compare(str(path)).splitlines()
  attention = next(line for line in table if line.startswith("| attention | (64, 4)"))
  assert "0.995 (edge lr) / 1.00" in attention and attention.count("— / 1.00") == 3
  based = next(line for line in table if line.startswith("| based | (256, 16)"))
  assert "0.500 / —" in based  # not in the published figure
  assert not any(line.startswith("| hyena") for line in table)  # no runs: no row


def test_survey_sizes_span_10x_and_the_corpus_check_refuses_repeated_tokens(corpus_dir, tmp_path):
  """Four sizes over ≥ 10× in non-embedding parameters; a slice whose tokens exceed the prepared train
  split is refused in one line naming the fields; without a local corpus the check is skipped."""
  from hybrids.config import model_config
  from hybrids.sizes import apply_size, non_embedding_params

  survey = config_lib.load_experiment(path_of("mixer_survey"))
  counts = []
  for size in survey.SIZES:
    baseline = model_config()
    baseline.size, baseline.pattern = size, ("attention",)
    counts.append(non_embedding_params(apply_size(baseline)))
  assert len(counts) >= 4 and counts == sorted(counts) and counts[-1] / counts[0] >= 10
  with open(os.path.join(survey.DATA_PATH, "manifest.json")) as f:
    available = json.load(f)["splits"]["train"]["tokens"]
  with pytest.raises(config_lib.ConfigError) as refused:
    sweep_lib.sweep_points(spec_of("mixer_survey", "1m"))
  message = str(refused.value)
  assert "\n" not in message and f"exceed the {available:,} train tokens of data.path='{survey.DATA_PATH}'" in message
  assert "train.steps × train.batch_size × data.seq_len = 521 × 32 × 1024" in message
  assert len(sweep_lib.sweep_points(spec_of("mixer_survey", "tiny"))) == 2  # 2 × 2 × 32 tokens fit
  os.chdir(tmp_path)  # no data/ here: nothing to check against (corpus_dir's fixture restores the cwd)
  assert len(sweep_lib.sweep_points(spec_of("mixer_survey", "1m"))) == 3 * SURVEY_PATTERNS
  os.chdir(corpus_dir)


def test_the_surveys_committed_tokenizer_is_the_one_its_docstring_names():
  """The pilot is prepared with the committed tokenizer (no full preparation first): a 16,384-id
  byte-level BPE whose sha256 the survey's docstring (and every manifest prepared with it) records."""
  import hashlib

  from tokenizers import Tokenizer

  path = os.path.join(REPO, "experiments", "tokenizers", "linux-6.1-bpe16k.json")
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert f"sha256 ``{digest[:8]}…``" in config_lib.load_experiment(path_of("mixer_survey")).__doc__
  tokenizer = Tokenizer.from_file(path)
  assert tokenizer.get_vocab_size() == 16384
  ids = tokenizer.encode("static int __init foo(void)\n{\n\treturn 0;\n}\n").ids
  assert 0 < len(ids) < 20 and max(ids) < 16384
