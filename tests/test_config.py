"""Bad input fails fast: a clear error naming the field, before any compile, nothing written."""

import os
import re
import subprocess
import sys

import pytest

from hybrids.config import ConfigError, apply_overrides, get_config
from hybrids.mixers import MIXERS
from hybrids.train import resolve, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "quickstart.py") + ":tiny"


@pytest.mark.parametrize("overrides,message", [
    ({"model.pattern": ("rglru", "mamba9")}, r"model.pattern\[1\]='mamba9': 'mamba9' is not a mixer; valid mixers: " + re.escape(", ".join(sorted(MIXERS)))),
    ({"model.pattern": ()}, "model.pattern"),
    ({"model.window": 0}, "model.window=0 must be a positive integer"),
    ({"model.window": -3}, "model.window=-3"),
    ({"model.window": 33}, "model.window=33 exceeds data.seq_len=32"),
    ({"model.num_heads": 3}, "model.num_heads=3 does not divide model.d_model=32"),
    ({"model.num_kv_heads": 3, "model.num_heads": 4}, "model.num_kv_heads=3 does not divide model.num_heads=4"),
    ({"data.num_kv_pairs": 9}, "num_kv_pairs"),
    ({"model.dtype": "fp8"}, "model.dtype='fp8'; valid: float32, bfloat16, float16"),
    ({"train.steps": 0}, "train.steps=0"),
    ({"train.warmup_steps": 100}, "train.warmup_steps=100"),
    ({"model.rnn_heads": 5}, "model.rnn_heads=5"),
])
def test_bad_config_is_rejected_before_anything_runs(tmp_path, overrides, message):
  config = get_config(TINY, overrides)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    train(config, str(workdir))
  assert not workdir.exists()


def test_unknown_field_lists_valid_fields():
  with pytest.raises(ConfigError, match=r"unknown config field 'model.windw'.*valid: .*window"):
    apply_overrides(get_config(TINY), {"model.windw": 3})
  with pytest.raises(ConfigError, match="unknown config field 'modle.window'"):
    apply_overrides(get_config(TINY), {"modle.window": 3})


def test_overrides_parse_to_the_field_type():
  config = apply_overrides(get_config(TINY), {"model.window": "16", "train.lr": "1", "model.remat": "true"})
  assert config.model.window == 16 and config.train.lr == 1.0 and config.model.remat is True


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match=r"unknown variant 'mamba9'; valid: attention, baseconv, based, .*jamba.*tiny"):
    get_config(os.path.join(REPO, "experiments", "quickstart.py") + ":mamba9")


def test_resolve_fills_vocab_from_data():
  assert resolve(get_config(TINY)).model.vocab_size == 64


def _cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "hybrids.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_help_documents_usage():
  out = _cli("--help")  # absl's --help exits 1 after printing
  assert "--config" in out.stdout and "--workdir" in out.stdout and "resumes" in out.stdout


def test_cli_rejects_unknown_config_key_and_bad_window(tmp_path):
  out = _cli("--config", TINY, "--workdir", str(tmp_path / "a"), "--config.model.windw=3")
  assert out.returncode != 0 and "windw" in out.stderr
  out = _cli("--config", TINY, "--workdir", str(tmp_path / "b"), "--config.model.window=0")
  assert out.returncode == 2 and "model.window=0 must be a positive integer" in out.stderr
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_parallel_pattern_entries_are_validated():
  with pytest.raises(ConfigError, match=r"'rglru\|mamba9': 'mamba9' is not a mixer"):
    resolve(get_config(TINY, {"model.pattern": ("rglru|mamba9",)}))
  with pytest.raises(ConfigError, match="model.parallel_merge='avg'; valid: sum, gate, concat"):
    resolve(get_config(TINY, {"model.pattern": ("rglru|swa",), "model.parallel_merge": "avg"}))
  with pytest.raises(ConfigError, match="exactly two mixers"):
    resolve(get_config(TINY, {"model.pattern": ("rglru|swa|gla",), "model.parallel_merge": "gate"}))
  assert resolve(get_config(TINY, {"model.pattern": ("mamba2|swa",)})).model.pattern == ("mamba2|swa",)


def test_swax_window_choices_are_validated():
  with pytest.raises(ConfigError, match=r"train.window_choices=\(0, 8\)"):
    resolve(get_config(TINY, {"train.window_choices": (0, 8)}))
  with pytest.raises(ConfigError, match="needs an 'swa' layer"):
    resolve(get_config(TINY, {"train.window_choices": (4,), "model.pattern": ("rglru",)}))


def test_model_fields_added_later_stay_out_of_run_ids_at_their_defaults(monkeypatch):
  """A field a new mixer declares enters every config; at its default it leaves ids unchanged (so
  adding a mixer re-runs nothing), set otherwise it is part of the id, and a config.json written
  without it reads back with the default."""
  import ml_collections

  from hybrids import config as config_lib
  from hybrids import defaults

  before = config_lib.identity(config_lib.base_config())
  original = defaults.model_config

  def with_new_field():
    c = original()
    c.new_mixer_ratio = 2
    return c

  monkeypatch.setattr(defaults, "model_config", with_new_field)
  config = config_lib.base_config()
  config.model.new_mixer_ratio = 2
  assert "new_mixer_ratio" not in config_lib.identity(config)["model"]
  assert config_lib.identity(config) == before
  config.model.new_mixer_ratio = 3
  assert config_lib.identity(config)["model"]["new_mixer_ratio"] == 3
  stored = ml_collections.ConfigDict(before)
  assert config_lib.with_model_defaults(stored).model.new_mixer_ratio == 2
  # Fields of the frozen set stay in the id even at their defaults.
  assert config_lib.identity(config_lib.base_config())["model"]["window"] == original().window
