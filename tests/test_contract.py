"""The mixer contract (``hybrids.mixers.contract``): every registered mixer carries everything about
itself, so that adding one is one file plus one registry line; and the refactoring that moved the
per-mixer FLOPs, weight-decay names and config fields into the mixers changed nothing.

    JAX_PLATFORMS=cpu python -m pytest -q -n 0 tests/test_contract.py
"""

from __future__ import annotations

import ast
import os

import jax
import pytest
from flax import nnx

from hybrids import flops
from hybrids.config import ConfigError, get_config, model_config
from hybrids.mixers import MIXERS, Setting, mixer_settings
from hybrids.mixers.contract import collect_settings, missing
from hybrids.mixers.rglru import RGLRUBlock
from hybrids.model import HybridLM, layer_pattern
from hybrids.train import NORM_PARAMS, decay_mask, resolve
from launch import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "quickstart.py")

# The mixers registered when the contract was introduced, and the names hybrids/train.py then kept in
# one central set (matched by name anywhere, with ndim ≥ 2): the pinned "before" of the decay masks.
MIXERS_AT_CONTRACT = ("attention", "swa", "rglru", "linear_attention", "retnet", "gla", "mamba", "mamba2", "based",
                      "rwkv6", "s4d", "mlstm", "slstm", "baseconv", "hyena", "deltanet", "gated_deltanet")
OLD_NO_WEIGHT_DECAY = frozenset({"a_log", "a_param", "log_rate", "angle", "residues", "log_neg_a_real", "a_imag",
                                 "log_dt", "dt_bias", "d_skip", "skip", "scale", "mu", "mu_x", "w0", "bonus"})


def _small(pattern, **overrides):
  c = model_config()
  c.pattern, c.n_layers, c.d_model, c.vocab_size, c.window = tuple(pattern), len(pattern), 32, 64, 8
  for key, value in overrides.items():
    c[key] = value
  return c


def _abstract(cfg):
  return nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(params=0)))


def _params(cfg):
  return nnx.to_pure_dict(nnx.state(_abstract(cfg)))


# ------------------------------------------------------------------------------------ the contract

@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_registered_mixer_honours_the_contract(name):
  assert missing(MIXERS[name]) == [], f"mixer {name!r} lacks: {', '.join(missing(MIXERS[name]))}"


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_declared_no_decay_names_are_parameters_of_the_mixer(name):
  mixer = _abstract(_small((name,))).blocks[0].mixer
  names = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(mixer, nnx.Param))}
  assert MIXERS[name].NO_WEIGHT_DECAY <= names, (name, sorted(MIXERS[name].NO_WEIGHT_DECAY - names))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_flops_is_the_mixers_own_and_nonnegative(name):
  mixer = _abstract(_small((name,))).blocks[0].mixer
  result = mixer.flops(64)
  assert isinstance(result, flops.Flops)
  assert all(getattr(result, c) >= 0 for c in flops.COMPONENTS) and result.mlp == 0


def test_settings_are_collected_into_the_model_config_alike():
  c = model_config()
  for name, mixer in MIXERS.items():
    for field, setting in mixer.SETTINGS.items():
      assert c[field] == setting.default and type(c[field]) is type(setting.default), (name, field)
      assert setting.lo is None or (setting.default > setting.lo if setting.lo_open else setting.default >= setting.lo)
  # A field two mixers read is declared alike by both; a conflicting declaration is refused by name.
  assert MIXERS["mamba"].SETTINGS["d_state"] == MIXERS["hyena"].SETTINGS["d_state"]
  conflicting = type("Wide", (), {"SETTINGS": {"d_state": Setting(64, "another default", 1)}})
  with pytest.raises(ValueError, match=r"mixers 'mamba' and 'wide' declare model.d_state differently"):
    collect_settings({"mamba": MIXERS["mamba"], "wide": conflicting})
  assert set(mixer_settings()) <= set(c.keys())


class _NoFlops(RGLRUBlock):
  """A test double: Griffin's block (De et al. 2024) that forgot to count its FLOPs."""

  NO_WEIGHT_DECAY = RGLRUBlock.NO_WEIGHT_DECAY
  SETTINGS = RGLRUBlock.SETTINGS
  flops = None


def test_a_registered_mixer_without_flops_fails_loudly(monkeypatch):
  monkeypatch.setitem(MIXERS, "no_flops", _NoFlops)
  assert "method flops" in missing(_NoFlops)
  for pattern in (("no_flops",), ("no_flops|swa",)):
    with pytest.raises(TypeError, match="_NoFlops declares no flops"):
      flops.accounting(_small(pattern), 64)


def test_a_mixer_missing_declarations_is_named():
  class Bare(nnx.Module):
    def __call__(self, x):
      return x

  lacks = missing(Bare)
  for part in ("init_state", "step", "check_config", "flops", "NO_WEIGHT_DECAY", "SETTINGS", "paper"):
    assert any(part in item for item in lacks), (part, lacks)
  # Inherited declarations do not count: a subclass says what it adds.
  inherits = type("Inherits", (RGLRUBlock,), {"__module__": RGLRUBlock.__module__})
  assert missing(inherits) == ["NO_WEIGHT_DECAY declared in the class body", "SETTINGS declared in the class body"]


# ------------------------------------------------------------------------- nothing changed by it

def _old_mask(params):
  def decayed(path, p):
    return p.ndim >= 2 and getattr(path[-1], "key", None) not in OLD_NO_WEIGHT_DECAY
  return jax.tree_util.tree_map_with_path(decayed, params)


PATTERNS = [(name,) for name in MIXERS_AT_CONTRACT] + [
    ("rglru", "mamba2|swa"), ("baseconv>based",), ("hyena|rwkv6|s4d",), ("mamba", "s4d", "swa", "gated_deltanet")]


@pytest.mark.parametrize("pattern", PATTERNS, ids=["-".join(p) for p in PATTERNS])
def test_decay_mask_is_the_old_central_rule(pattern):
  cfg = _small(pattern, parallel_merge="concat")
  params = _params(cfg)
  old = _old_mask(params)
  assert decay_mask(params, layer_pattern(cfg)) == old  # by owner (the trainer passes the layer pattern)
  assert decay_mask(params) == old                      # by name, for callers without the pattern


def test_no_weight_decay_names_are_the_old_set():
  declared = frozenset().union(*(MIXERS[name].NO_WEIGHT_DECAY for name in MIXERS_AT_CONTRACT))
  assert declared | NORM_PARAMS == OLD_NO_WEIGHT_DECAY


def test_run_ids_of_existing_sweeps_are_unchanged():
  assert [rid for rid, _, _ in sweep_lib.expand(QUICKSTART)] == [
      "quickstart-a9b6ff5bd6", "quickstart-cd8c435d2c", "quickstart-7021e8e288"]
  # zoology_mqar's ids changed once on 2026-12-07 (its attention and GLA run on XLA), before its results
  # were committed; two of those committed runs (experiments/results/zoology_mqar/runs.tgz) stay pinned.
  figure2 = {rid for rid, _, _ in sweep_lib.expand(os.path.join(REPO, "experiments", "zoology_mqar.py") + ":figure2")}
  assert {"zoology_mqar-7f4430005d", "zoology_mqar-95955aa1d5"} <= figure2
  for experiment, ids in (("zoology_mqar", ["zoology_mqar-ee9c90fc72", "zoology_mqar-b8f315c77e"]),
                          ("based_tradeoff", ["based_tradeoff-39ca3003a8", "based_tradeoff-1d5f219664"])):
    spec = os.path.join(REPO, "experiments", f"{experiment}.py") + ":tiny"
    assert [rid for rid, _, _ in sweep_lib.expand(spec)] == ids
  # Sized points (the size preset matches parameters to hybrids.mixers.SIZE_BASELINE).
  for variant, size, rid in (("griffin", "1m", "quickstart-468bfca2bc"), ("jamba", "1m", "quickstart-f748526581")):
    assert sweep_lib.run_id(QUICKSTART, resolve(get_config(f"{QUICKSTART}:{variant}", {"model.size": size}))) == rid


def test_window_checks_moved_into_swa_keep_their_messages():
  with pytest.raises(ConfigError, match=r"model.window=40 exceeds data.seq_len=32"):
    resolve(get_config(QUICKSTART + ":tiny", {"model.window": 40}))
  with pytest.raises(ConfigError, match="needs an 'swa' layer"):
    resolve(get_config(QUICKSTART + ":tiny", {"train.window_choices": (4,), "model.pattern": ("rglru",)}))
  # An unused field still gets the bound every mixer reading it needs.
  with pytest.raises(ConfigError, match=r"model.feature_dim=0 must be a positive integer"):
    resolve(get_config(QUICKSTART + ":tiny", {"model.feature_dim": 0}))


# ----------------------------------------------------------------- no mixer names outside the mixers

def _literals_and_attributes(path: str, skip_functions=(), skip_assignments=()):
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  skipped = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name in skip_functions:
      skipped |= {id(n) for n in ast.walk(node)}
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in skip_assignments for t in node.targets):
      skipped |= {id(n) for n in ast.walk(node)}
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      yield node.lineno, node.value
    elif isinstance(node, ast.Attribute):
      yield node.lineno, node.attr


@pytest.mark.parametrize("path,skip_functions,skip_assignments", [
    ("hybrids/flops.py", (), ("COMPONENTS",)),   # "attention" is a FLOPs component there, not a mixer
    ("hybrids/train.py", (), ()),
    ("hybrids/config.py", ("model_config",), ()),  # config defaults (the default pattern) may name mixers
    ("hybrids/sizes.py", (), ()),
    ("hybrids/blocks.py", (), ()),
    ("hybrids/defaults.py", ("model_config",), ()),
    ("hybrids/cost.py", (), ("COMPONENTS",)),
    ("hybrids/checks.py", (), ()),
    ("hybrids/sharding.py", (), ()),
    ("hybrids/model.py", (), ()),
    ("hybrids/evaluate.py", (), ()),
    ("hybrids/rundir.py", (), ()),
])
def test_no_mixer_or_mixer_parameter_name_outside_the_mixers(path, skip_functions, skip_assignments):
  parameters = frozenset().union(*(mixer.NO_WEIGHT_DECAY for mixer in MIXERS.values()))
  found = []
  for line, text in _literals_and_attributes(path, skip_functions, skip_assignments):
    if text in MIXERS or any(f"'{name}'" in text for name in MIXERS) or text in parameters:
      found.append((line, text))
  assert not found, f"{path} names mixers or their parameters: {found}"
