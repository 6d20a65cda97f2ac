"""Every bad input is refused before anything is written, with one clear line naming the field or file.

Config fields (each section's ranges, the mixers' own fields), a random search over configs in range and
out of it (hypothesis), and the command lines of hybrids.train, hybrids.evaluate, hybrids.data.prepare
and launch. The kinds of bad input tried here are counted by ``BAD_INPUT_KINDS`` at the bottom.
"""

import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrids.config import ConfigError, get_config, resolve
from hybrids.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"
NAN, INF = float("nan"), float("inf")

# (overrides, the field the error must name): each out of range, each refused by validation.
BAD_CONFIGS = [
    ({"train.grad_clip": -1.0}, "train.grad_clip"),
    ({"train.grad_clip": NAN}, "train.grad_clip"),
    ({"train.min_lr_ratio": -3.0}, "train.min_lr_ratio"),
    ({"train.min_lr_ratio": 1.5}, "train.min_lr_ratio"),
    ({"train.b1": 2.0}, "train.b1"),
    ({"train.b2": 1.0}, "train.b2"),
    ({"train.b2": -0.1}, "train.b2"),
    ({"train.weight_decay": -5.0}, "train.weight_decay"),
    ({"train.lr": INF}, "train.lr"),
    ({"train.lr": -1e-3}, "train.lr"),
    ({"train.lr": NAN}, "train.lr"),
    ({"train.moe_balance_weight": -1.0}, "train.moe_balance_weight"),
    ({"train.stop_at_accuracy": 1.0}, "train.stop_at_accuracy"),
    ({"train.eval_every": -1}, "train.eval_every"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.log_every": 0}, "train.log_every"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints"),
    ({"train.window_anneal_steps": -1}, "train.window_anneal_steps"),
    ({"seed": -1}, "seed"),
    ({"model.head_dim": -8}, "model.head_dim"),
    ({"model.head_dim": -8, "model.pattern": ("attention",)}, "model.head_dim"),
    ({"model.rnn_width": -32}, "model.rnn_width"),
    ({"model.ssm_expand": 0, "model.pattern": ("mamba2",)}, "model.ssm_expand"),
    ({"model.ssm_expand": -1, "model.pattern": ("mamba",)}, "model.ssm_expand"),
    ({"model.ssm_expand": 0, "model.pattern": ("mlstm",)}, "model.ssm_expand"),
    ({"model.ssm_expand": 0, "model.pattern": ("mamba2",), "model.size": "1m"}, "model.ssm_expand"),  # sized
    ({"model.key_expansion": 0.0, "model.pattern": ("gla",)}, "model.key_expansion"),
    ({"model.key_expansion": NAN, "model.pattern": ("gla",)}, "model.key_expansion"),
    ({"model.chunk_size": 0, "model.pattern": ("gla",)}, "model.chunk_size"),
    ({"model.chunk_size": -4, "model.pattern": ("retnet",)}, "model.chunk_size"),
    ({"model.chunk_size": 0, "model.pattern": ("rwkv6",)}, "model.chunk_size"),
    ({"model.gate_low_rank": 0, "model.pattern": ("gla",)}, "model.gate_low_rank"),
    ({"model.d_state": 0, "model.pattern": ("hyena",)}, "model.d_state"),
    ({"model.d_state": 3, "model.pattern": ("s4d",)}, "model.d_state"),
    ({"model.d_state": -1, "model.pattern": ("mamba",)}, "model.d_state"),
    ({"model.feature_dim": 0, "model.pattern": ("based",)}, "model.feature_dim"),
    ({"model.rope_base": 0.0, "model.pattern": ("attention",)}, "model.rope_base"),
    ({"model.attn_softcap": -1.0}, "softcap"),
    ({"model.logits_softcap": NAN}, "model.logits_softcap"),
    ({"model.mlp_expansion": -1.0}, "model.mlp_expansion"),
    ({"model.mlp_expansion": 0.001}, "model.mlp_expansion"),
    ({"model.vocab_size": -5}, "model.vocab_size"),
    ({"model.num_kv_heads": -1}, "model.num_kv_heads"),
    ({"model.moe_every": 1, "model.moe_top_k": 9}, "model.moe_top_k"),
    ({"model.moe_every": -2}, "model.moe_every"),
    ({"model.norm": "batch"}, "model.norm"),
    ({"model.position": "alibi"}, "model.position"),
    ({"model.max_len": -1}, "model.max_len"),
    ({"model.remat": 1}, "model.remat"),
    ({"model.d_model": 0}, "model.d_model"),
    ({"model.n_layers": -1}, "model.n_layers"),
    ({"model.conv_width": 0}, "model.conv_width"),
    ({"model.attention_impl": "cuda"}, "model.attention_impl"),
    ({"runtime.scan_layers": "yes"}, "runtime.scan_layers"),
    ({"runtime.mesh.fsdp": 0}, "runtime.mesh.fsdp"),
    ({"data.seq_len": 0}, "data.seq_len"),
    ({"data.vocab_size": 3}, "vocab_size"),
    # Each would be dropped or do nothing, silently.
    ({"data.num_kv_pair": 3}, "data.num_kv_pair"),  # misspelt: the data sources read fields with defaults
    ({"model.moe_every": 5}, "model.moe_every"),  # more than the tiny config's 3 layers: no MoE layer at all
    ({"train.window_anneal_steps": 2}, "train.window_anneal_steps"),  # no train.window_choices to anneal from
    # Not sections: a one-line refusal, not an AttributeError.
    ({"runtime.mesh": 4}, "runtime.mesh"),
    ({"runtime": "local"}, "config.runtime"),
]


def _config(overrides):
  """The tiny config with raw (already typed) values set, bypassing apply_overrides' own type checks."""
  config = get_config(TINY)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    with node.ignore_type():
      node[leaf] = value
  return config


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS, ids=[" ".join(f"{k}={v}" for k, v in o.items())
                                                              for o, _ in BAD_CONFIGS])
def test_out_of_range_field_is_refused_before_anything_is_written(tmp_path, overrides, field):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as caught:
    train(_config(overrides), str(workdir), progress=False)
  assert "\n" not in str(caught.value)
  assert not workdir.exists()


def test_unknown_fields_in_a_section_are_refused(tmp_path):
  config = get_config(TINY)
  config.model.windw = 8
  with pytest.raises(ConfigError, match=r"unknown config field 'model.windw'; valid: .*window"):
    train(config, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


# Refused by resolve() itself, which alone serves ``launch sweep --dry-run`` and the flops and sharding CLIs
# (the trainer's later checks caught the text and kernel cases before it wrote, but only there).
RESOLVE_REFUSES = [
    # A non-empty string is true: the boundaries would stay on (MQAR ignores the field, but not its type).
    ({"data.name": "text", "data.files": os.path.join(REPO, "README.md"), "data.document_boundaries": "false"},
     "data.document_boundaries='false' must be True or False"),
    ({"data.document_boundaries": "no"}, "data.document_boundaries='no' must be True or False"),
    # No layer of the tiny config's pattern reads these: a misspelt choice is refused all the same.
    ({"model.fox_impl": "cuda"}, "model.fox_impl='cuda'; valid: auto, xla, reference, pallas"),
    ({"model.dplr_impl": "triton"}, "model.dplr_impl='triton'; valid: auto, xla, reference, pallas"),
]


@pytest.mark.parametrize("overrides,message", RESOLVE_REFUSES, ids=[" ".join(f"{k}={v}" for k, v in o.items())
                                                                    for o, _ in RESOLVE_REFUSES])
def test_resolve_alone_refuses_them(overrides, message):
  with pytest.raises(ConfigError) as caught:
    resolve(_config(overrides))
  assert str(caught.value).startswith(message) and "\n" not in str(caught.value), caught.value


@pytest.mark.parametrize("content,message", [(b"", "has 0 bytes"), (b"abc", "fewer than data.seq_len")])
def test_a_text_corpus_too_small_is_refused_before_config_json(tmp_path, content, message):
  corpus = tmp_path / "corpus.txt"
  corpus.write_bytes(content)
  workdir = tmp_path / "run"
  config = get_config(TINY, {"data.name": "text", "data.files": str(corpus)})
  with pytest.raises(ConfigError, match=f"data.files=.*{message}"):
    train(config, str(workdir), progress=False)
  assert not workdir.exists()


# ----------------------------------------------------------------------------- random configs

# field → (values in range, values out of range) around the tiny config (d_model 16, seq_len 32).
FIELDS = {
    "train.lr": ([1e-3, 0.01], [0.0, -1.0, NAN, INF]),
    "train.grad_clip": ([0.0, 0.5], [-1.0, NAN]),
    "train.min_lr_ratio": ([0.0, 1.0], [-3.0, 1.5]),
    "train.weight_decay": ([0.0, 0.3], [-5.0, INF]),
    "train.b1": ([0.0, 0.5], [1.0, 2.0, -0.5]),
    "train.b2": ([0.9, 0.999], [1.0, -1.0]),
    "train.batch_size": ([2, 4], [0, -4]),
    "train.warmup_steps": ([0, 1], [-1, 100]),
    "train.stop_at_accuracy": ([0.0, 0.5], [1.0, -0.1]),
    "seed": ([0, 7], [-1]),
    "model.head_dim": ([0, 4], [-8]),
    "model.rnn_width": ([0, 8], [-32]),
    "model.num_heads": ([1, 2], [0, -2]),
    "model.window": ([4, 32], [0, -1]),
    "model.mlp_expansion": ([0.0, 2.0], [-1.0, NAN, 0.01]),
    "model.logits_softcap": ([0.0, 30.0], [-1.0, NAN]),
    "model.norm": (["rms", "layer"], ["batch"]),
    "model.position": (["rope", "none", "learned"], ["alibi"]),
    "model.conv_width": ([2, 4], [0]),
    "model.ssm_expand": ([1, 2], [0, -1]),
    "model.key_expansion": ([0.5, 1.0], [0.0, NAN, -0.5]),
    "model.chunk_size": ([8, 16], [0, -16]),
    "model.d_state": ([4, 8], [0, -2]),
    "model.pattern": ([("rglru", "swa"), ("mamba2",), ("gla",), ("mlstm", "swa")], [(), ("mamba9",)]),
    "model.moe_every": ([0], [-1, 4, 9]),  # the tiny config has 3 layers (pattern ("mamba2",): 3 layers too)
    "model.fox_impl": (["auto", "xla"], ["cuda", "XLA"]),  # in no drawn pattern: checked all the same
    "model.dplr_impl": (["auto", "reference"], ["triton"]),
    "train.window_anneal_steps": ([0], [-1, 2, 99]),  # no train.window_choices in the tiny config
}


TRAINED = []  # the drawn configs that trained a step (for a look with -s)


@st.composite
def configs(draw):
  """1–3 fields of the tiny config, each in range or out of it; → (overrides, out-of-range fields)."""
  names = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True))
  overrides, bad = {}, []
  for name in names:
    good, wrong = FIELDS[name]
    if draw(st.integers(0, 4)) == 0:  # mostly out of range: a refusal is cheap, a training step compiles
      overrides[name] = draw(st.sampled_from(good))
    else:
      overrides[name] = draw(st.sampled_from(wrong))
      bad.append(name)
  return overrides, bad


# derandomize: the same examples every run (a fixed cost, ~40 s on 2 CPU cores); database=None: no .hypothesis/.
@settings(max_examples=24, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs())
def test_random_configs_train_a_step_or_are_refused_with_nothing_written(tmp_path_factory, drawn):
  overrides, bad = drawn
  config = _config(overrides)
  config.train.steps, config.train.checkpoint_every = 4, 4
  workdir = tmp_path_factory.mktemp("run") / "run"
  try:
    summary = train(config, str(workdir), stop_after_steps=1, progress=False)
    TRAINED.append(overrides)
  except ConfigError as e:
    assert not workdir.exists(), f"{overrides}: refused after writing {os.listdir(workdir)}"
    message = str(e)
    assert "\n" not in message
    # The message names a field of the config (a refused field, or one it conflicts with).
    assert any(name in message for name in ("model.", "train.", "data.", "seed", "runtime.")), message
    if bad:
      return
    # Every field in range: a refusal must come from a combination (e.g. a head count that does not divide).
    assert any(word in message for word in ("divide", "exceeds", "needs", "even", "shorter", "below", "every")), \
        f"{overrides} are each in range but were refused: {message}"
    return
  assert not bad, f"{overrides}: out-of-range {bad} trained instead of being refused"
  assert summary["step"] == 1 and math.isfinite(summary["train_loss"])


# ----------------------------------------------------------------------------- command lines

def _run(module, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def _one_error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
  assert "Traceback" not in stderr, stderr
  assert 1 <= len(lines) <= 2, stderr
  return lines[-1]


TRAIN_CLI = [
    (["--config.model.windw=8"], r"unknown config field 'model.windw'.*valid: .*window"),
    (["--config.modle.window=8"], r"unknown config field 'modle.window'.*valid: .*model"),
    (["--config.model.d_model=1.5"], r"model.d_model.*type int"),
    (["--config.model.window", "abc"], r"cannot parse 'abc'"),
    (["--config.train.b1=2"], r"train.b1=2.0 must be a finite number in \[0, 1\)"),
    (["--wokdir=3"], r"Unknown command line flag 'wokdir'"),
    (["extra"], r"unexpected argument"),
]


@pytest.mark.parametrize("args,message", TRAIN_CLI, ids=[" ".join(a) for a, _ in TRAIN_CLI])
def test_train_cli_mistakes_are_one_line_exit_2(tmp_path, args, message):
  import re

  out = _run("hybrids.train", "--config", TINY, "--workdir", str(tmp_path / "run"), *args)
  assert out.returncode == 2, out.stderr
  assert re.search(message, _one_error_line(out.stderr)), out.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config,message", [
    ("experiments/nope.py", "experiment file 'experiments/nope.py' does not exist"),
    ("experiments/quickstart.py:mamba9", "unknown variant 'mamba9'; valid: attention"),
    (None, "--config required"),
])
def test_train_cli_bad_experiment_is_one_line_exit_2(tmp_path, config, message):
  args = ["--workdir", str(tmp_path / "run")] + (["--config", config] if config else [])
  out = _run("hybrids.train", *args)
  assert out.returncode == 2 and message in _one_error_line(out.stderr), out.stderr
  assert not (tmp_path / "run").exists()


def test_train_cli_overrides_still_reach_the_run(tmp_path):
  """--config.F V, comma lists for tuples and --noconfig.F (ml_collections' forms) keep working."""
  out = _run("hybrids.train", "--config", TINY, "--workdir", str(tmp_path / "run"), "--config.train.steps", "3",
             "--config.model.pattern=rglru,swa", "--noconfig.model.tie_embeddings", "--config.train.checkpoint_every=3")
  assert out.returncode == 0, out.stderr[-2000:]
  import json

  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["train"]["steps"] == 3 and saved["model"]["pattern"] == ["rglru", "swa"]
  assert saved["model"]["tie_embeddings"] is False


LAUNCH_CLI = [
    (["sweep", "experiments/nope.py", "--dry-run"], "does not exist"),
    (["sweep", "experiments/quickstart.py:mamba9", "--dry-run"], "unknown variant 'mamba9'; valid:"),
    (["sweep", "experiments/quickstart.py:tiny", "--dry-run", "--filter", "model.windw=3"], "valid:"),
    (["sweep", "experiments/quickstart.py:tiny", "--dry-run", "--max-parallel", "0"], "--max-parallel=0"),
    (["status", "/nonexistent/runs"], "is not a directory"),
]


@pytest.mark.parametrize("argv,message", LAUNCH_CLI, ids=[" ".join(a) for a, _ in LAUNCH_CLI])
def test_launch_mistakes_are_one_line_exit_2(capsys, argv, message):
  from launch.__main__ import main

  assert main(argv) == 2
  assert message in _one_error_line(capsys.readouterr().err)


EVALUATE_CLI = [
    (["--workdir", "/nonexistent/run"], "does not exist"),
    (["--workdir", "{tmp}", "--seed", "-1"], "--seed=-1"),
    (["--workdir", "{tmp}"], "is not a run directory"),
    (["--workdir", "{bad}"], "is not valid JSON"),
]


@pytest.mark.parametrize("argv,message", EVALUATE_CLI, ids=[" ".join(a) for a, _ in EVALUATE_CLI])
def test_evaluate_mistakes_are_one_line_exit_2(tmp_path, capsys, argv, message):
  from hybrids.evaluate import main

  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text("{not json")
  argv = [a.format(tmp=tmp_path, bad=bad) for a in argv]
  assert main(argv) == 2
  assert message in _one_error_line(capsys.readouterr().err)


PREPARE_CLI = [
    (["--input", "/nonexistent/*.txt", "--tokenizer", "bytes"], "matches no files"),
    (["--input", "{corpus}", "--tokenizer", "bpe:3"], "--tokenizer='bpe:3' is invalid"),
    (["--input", "{corpus}", "--tokenizer", "bytes", "--heldout-fraction", "1.5"], "--heldout-fraction=1.5"),
    (["--input", "{corpus}", "--tokenizer", "bytes", "--doc-bytes", "0"], "--doc-bytes=0"),
    (["--input", "{corpus}", "--tokenizer", "bytes", "--output", "/proc/hybrids-test/out"], "error: "),
]


@pytest.mark.parametrize("argv,message", PREPARE_CLI, ids=[" ".join(a) for a, _ in PREPARE_CLI])
def test_prepare_mistakes_are_one_line_exit_2(tmp_path, capsys, argv, message):
  from hybrids.data.prepare import main

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("some text\n" * 50)
  argv = [a.format(corpus=corpus) for a in argv]
  if "--output" not in argv:
    argv += ["--output", str(tmp_path / "out")]
  with pytest.raises(SystemExit) as exited:
    main(argv + ["--no-progress"])
  assert exited.value.code == 2
  assert message in _one_error_line(capsys.readouterr().err)
  assert not (tmp_path / "out").exists()


# How many kinds of bad input this file and tests/test_generate_cli.py try (the README quotes it).
BAD_INPUT_KINDS = (len(BAD_CONFIGS) + len(RESOLVE_REFUSES) + 1 + 2 + len(TRAIN_CLI) + 3 + len(LAUNCH_CLI) + len(EVALUATE_CLI)
                   + len(PREPARE_CLI))
