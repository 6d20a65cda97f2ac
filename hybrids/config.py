"""Default configuration and validation of every field before anything is compiled.

Experiment files start from :func:`base_config` and change what they study; ``validate`` turns a
typo or an impossible combination into one clear ``ConfigError`` naming the field.
"""

from __future__ import annotations

import ml_collections

from hybrids.checks import ConfigError, check_choice, check_int, check_number  # noqa: F401
from hybrids.defaults import model_config
from hybrids import data as data_lib
from hybrids.blocks import MERGES, PARALLEL, composition, mixer_names
from hybrids.layers import DTYPES, NORMS
from hybrids.mixers import MIXERS, mixer_settings
from hybrids.model import layer_pattern
from kernels.delta import IMPLS as DELTA_IMPLS
from kernels.gla import IMPLS as GLA_IMPLS
from kernels.scan import IMPLS as SCAN_IMPLS
from kernels.window_attention import IMPLS as ATTENTION_IMPLS

# Which implementations each kernel-choice field accepts: the kernel modules' own lists.
KERNEL_IMPLS = {"attention_impl": ATTENTION_IMPLS, "scan_impl": SCAN_IMPLS, "gla_impl": GLA_IMPLS,
                "delta_impl": DELTA_IMPLS}


POSITIONS = ("rope", "learned", "none")


def train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 1000
  c.batch_size = 32
  c.lr = 1e-3
  c.warmup_steps = 100
  c.min_lr_ratio = 0.1        # cosine decays to lr · min_lr_ratio
  c.weight_decay = 0.1        # applied to matrices only (ndim ≥ 2), not norms, biases or gates' Λ
  c.b1 = 0.9
  c.b2 = 0.95
  c.grad_clip = 1.0           # global-norm clip; 0: none
  c.log_every = 10
  c.eval_every = 250          # 0: only at the end
  c.eval_batches = 8
  c.checkpoint_every = 250
  c.keep_checkpoints = 3
  c.moe_balance_weight = 0.01  # weight of the MoE load-balancing loss
  c.stop_at_accuracy = 0.0   # stop once eval accuracy exceeds this (Zoology: 0.99); 0: off
  c.window_choices = ()       # SWAX: draw each step's SWA window from these (e.g. (128, 2048)); () = off
  c.window_anneal_steps = 0   # SWAX: the last N steps train with model.window
  return c


# Sections that say where a run executes, not what it computes: left out of the run's identity
# (config.json comparison on resume, run ids), so a run may resume on another mesh.
RUNTIME_SECTIONS = ("runtime",)


def runtime_config() -> ml_collections.ConfigDict:
  """How a run executes: placement (``hybrids.sharding``: mesh axis sizes, -1 takes all remaining
  devices), whether the layers are scanned, and where compiled steps are cached."""
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # lax.scan over repeats of the layer period (HybridLM.__call__): the same values, compiled once per
  # period rather than once per layer. How the step is compiled, not what it computes.
  c.scan_layers = True
  # JAX's persistent compilation cache: a resumed or repeated run loads its compiled steps instead of
  # compiling them again. "" or "off": none (sweeps fill in <sweep root>/.jax_cache).
  c.compilation_cache_dir = ""
  # Positions whose logits (and loss) are computed at a time, recomputed in the backward pass: the
  # same loss up to the order of its sum, without the whole [batch, time, vocab] f32 logits in memory
  # (2.1 GB at 32k tokens and 16k ids, three times that with their gradient), for one more head matmul
  # a position. 0: all at once; -1: chunks of hybrids.train.LOSS_CHUNK_BYTES of logits where the
  # batch's would be larger (never for MQAR, which scores a few positions a row, nor on several devices:
  # there XLA reduces the head's gradient once a chunk, inside the loop).
  c.loss_chunk_tokens = 0
  return c


# The model fields that existed when run ids were frozen. A field a mixer declares later
# (``SETTINGS``) enters every config with its default; it joins a run's identity only when set to
# something else, so adding a mixer changes no existing run id (tests/test_contract.py pins a few).
IDENTITY_MODEL_FIELDS = frozenset({
    "attention_impl", "attn_softcap", "chunk_size", "conv_width", "d_model", "d_state", "delta_impl", "dtype",
    "embed_scale", "feature_dim", "gate_low_rank", "gla_impl", "head_dim", "key_expansion", "logits_softcap",
    "max_len", "mlp_expansion", "moe_every", "moe_top_k", "n_layers", "norm", "num_experts", "num_heads",
    "num_kv_heads", "parallel_merge", "param_dtype", "pattern", "position", "remat", "rnn_heads", "rnn_width",
    "rope_base", "scan_impl", "size", "ssm_expand", "tie_embeddings", "vocab_size", "window"})


def with_model_defaults(config):
  """``config`` (read back from a ``config.json``) with every model field it lacks at its default: the
  fields :func:`identity` leaves out at their defaults, and those added after the run was written."""
  from hybrids.defaults import model_config

  model = config.get("model")
  if model is None:
    return config
  with config.unlocked():
    for field, value in model_config().items():
      if field not in model:
        model[field] = value
  return config


def identity(config) -> dict:
  """The config as the run's identity: its JSON form without :data:`RUNTIME_SECTIONS`, and without
  model fields added after :data:`IDENTITY_MODEL_FIELDS` while they hold their defaults."""
  import json

  return identity_of_json(json.loads(config.to_json_best_effort(sort_keys=True)))


def identity_of_json(stored: dict) -> dict:
  """:func:`identity` of a config already in its JSON form (e.g. a ``config.json`` read back)."""
  import copy
  import json

  from hybrids.defaults import model_config

  out = {k: copy.deepcopy(v) for k, v in stored.items() if k not in RUNTIME_SECTIONS}
  model = out.get("model")
  if isinstance(model, dict):
    defaults = json.loads(model_config().to_json_best_effort(sort_keys=True))
    for field in [f for f in model if f not in IDENTITY_MODEL_FIELDS and f in defaults]:
      if model[field] == defaults[field]:
        del model[field]
  return out


def base_config(dataset: str = "mqar") -> ml_collections.ConfigDict:
  """The full default config: ``seed``, ``model``, ``data``, ``train``, ``runtime``."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  # Every dataset's fields are present, so `--config.data.name=text --config.data.files=...` works
  # from any experiment; `name` picks which ones are read.
  c.data = data_lib.default_config(dataset)
  for name in data_lib.DATASETS:
    for key, value in data_lib.default_config(name).items():
      if key not in c.data and key not in data_lib.DATASET_ONLY_FIELDS:
        c.data[key] = value
  c.data.seq_len = 64
  c.train = train_config()
  c.runtime = runtime_config()
  return c


def _positive_int(value, field: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigError(f"{field}={value!r} must be a positive integer")


# The top-level fields and sections of a config; ``data``'s values are checked by hybrids.data (it has optional fields).
TOP_LEVEL = ("seed", "model", "data", "train", "runtime")


def data_fields() -> tuple[str, ...]:
  """Every field a ``data`` section may hold: each dataset's, ``seq_len`` and the optional ones."""
  fields = {"seq_len", *data_lib.DATASET_ONLY_FIELDS, *data_lib.SEGMENT_FIELDS}
  for name in data_lib.DATASETS:
    fields.update(data_lib.default_config(name).keys())
  return tuple(sorted(fields))


# Fields read only by some layers: (type, lower bound, note); the mixers' own fields carry theirs in
# their SETTINGS. A mixer in model.pattern checks its own fields first (check_config, with finer rules:
# an even d_state, divisibility); these bounds hold whether or not a layer reads the field.
FIELD_RANGES = {
    "num_experts": (int, 1, " (MoE experts)"),
    "moe_top_k": (int, 1, " (experts per token)"),
}


def _field_ranges() -> dict:
  """:data:`FIELD_RANGES` after every registered mixer's ``SETTINGS`` bounds."""
  out = {field: (int if isinstance(s.default, int) else "positive" if s.lo_open else float, s.lo, f" ({s.doc})")
         for field, s in mixer_settings().items() if s.lo is not None}
  return {**out, **FIELD_RANGES}


def _check_unread_choices(m, used: set[str], seq_len: int) -> None:
  """A mixer's choice field (a string, e.g. its kernel implementation) that no layer of ``model.pattern``
  reads, set away from its default, is checked by the mixers that declare it on the default model: a
  misspelt choice is refused, not ignored. (Numeric fields get :func:`_field_ranges` instead: their finer
  rules depend on the shapes of a model that does not use them.)"""
  read = {field for name in used for field in MIXERS[name].SETTINGS}
  for field, setting in sorted(mixer_settings().items()):
    if not isinstance(setting.default, str) or field in read or m[field] == setting.default:
      continue
    probe = model_config()
    probe[field] = m[field]
    owners = [name for name, mixer in MIXERS.items() if field in mixer.SETTINGS]
    errors = []
    for name in owners:
      try:
        MIXERS[name].check_config(probe, seq_len=seq_len)
      except ValueError as e:
        errors.append(str(e))
    if len(errors) == len(owners) and f"model.{field}" in errors[0]:
      readers = (f"the {owners[0]!r} mixer, which model.pattern does not use" if len(owners) == 1 else
                 f"the {', '.join(map(repr, owners))} mixers, none of which model.pattern uses")
      raise ConfigError(f"{errors[0]} (read by {readers})")


def _check_fields(config) -> None:
  """Every section holds exactly the fields of the defaults, each of the defaults' type (a float field takes an int)."""
  unknown = sorted(set(config.keys()) - set(TOP_LEVEL))
  if unknown:
    raise ConfigError(f"unknown config field {unknown[0]!r}; valid: {', '.join(TOP_LEVEL)}")
  for name in ("model", "data", "train"):
    if not isinstance(config.get(name), ml_collections.ConfigDict):
      raise ConfigError(f"config.{name} is missing or not a section (got {config.get(name)!r})")
  check_int(config.get("seed"), "seed", 0, 2**32 - 1)
  # The data sources read their fields with defaults: a misspelt one would be dropped silently.
  unknown = sorted(set(config.data.keys()) - set(data_fields()))
  if unknown:
    raise ConfigError(f"unknown config field 'data.{unknown[0]}'; valid: {', '.join(data_fields())}")
  boundaries = config.data.get("document_boundaries", True)
  if not isinstance(boundaries, bool):  # read as a truth value: the string 'false' would switch them on
    raise ConfigError(f"data.document_boundaries={boundaries!r} must be True or False")
  for name, defaults in (("model", model_config()), ("train", train_config())):
    section = config[name]
    unknown = sorted(set(section.keys()) - set(defaults.keys()))
    if unknown:
      raise ConfigError(f"unknown config field '{name}.{unknown[0]}'; valid: {', '.join(sorted(defaults.keys()))}")
    for key, default in defaults.items():
      if key not in section:
        raise ConfigError(f"{name}.{key} is missing (default {default!r})")
      value, field = section[key], f"{name}.{key}"
      if isinstance(default, bool):
        if not isinstance(value, bool):
          raise ConfigError(f"{field}={value!r} must be True or False")
      elif isinstance(default, int):
        check_int(value, field)
      elif isinstance(default, float):
        check_number(value, field)
      elif isinstance(default, str):
        if not isinstance(value, str):
          raise ConfigError(f"{field}={value!r} must be a string (default {default!r})")
      elif isinstance(default, tuple) and not isinstance(value, (tuple, list)):
        raise ConfigError(f"{field}={value!r} must be a tuple (default {default!r})")
  runtime = config.get("runtime")
  if runtime is not None and not isinstance(runtime, ml_collections.ConfigDict):
    raise ConfigError(f"config.runtime is not a section (got {runtime!r}); valid fields: "
                      f"{', '.join(sorted(runtime_config().keys()))}")
  if runtime is not None:
    defaults = runtime_config()
    unknown = sorted(set(runtime.keys()) - set(defaults.keys()))
    if unknown:
      raise ConfigError(f"unknown config field 'runtime.{unknown[0]}'; valid: {', '.join(sorted(defaults.keys()))}")
    if not isinstance(runtime.get("scan_layers", True), bool):
      raise ConfigError(f"runtime.scan_layers={runtime.scan_layers!r} must be True or False")
    chunk = runtime.get("loss_chunk_tokens", 0)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < -1:
      raise ConfigError(f"runtime.loss_chunk_tokens={chunk!r} must be an int ≥ -1 (-1: auto, 0: whole batch, "
                        "N: N positions' logits at a time)")
    if not isinstance(runtime.get("compilation_cache_dir", ""), str):
      raise ConfigError(f"runtime.compilation_cache_dir={runtime.compilation_cache_dir!r} must be a path string "
                        "('' or 'off': no cache)")


# A text corpus up to this size on disk is read during validation, so that one too small for
# data.seq_len is refused before the run directory is written (larger ones are checked when read).
TEXT_CHECK_BYTES = 16 * 1024 * 1024


def _check_text_corpus(data, seq_len: int) -> None:
  """Each split of a ``data.name='text'`` corpus must hold at least one ``seq_len + 1`` window."""
  import os

  from hybrids.data import text as text_lib

  paths = text_lib.resolve_files(data.files)
  if sum(os.path.getsize(p) for p in paths) > TEXT_CHECK_BYTES:
    return
  try:
    splits = text_lib.split_documents(paths, data.heldout_fraction, data.seed)
  except (ValueError, OSError, EOFError) as e:
    raise ConfigError(f"data.files={data.files!r}: {e}") from None
  for split, docs in zip(("train", "eval"), splits):
    # Bytes: one token per byte plus an end-of-document token; BPE: at most that many.
    tokens = sum(len(d) + 1 for d in docs)
    if tokens < seq_len + 1:
      raise ConfigError(f"data.files={data.files!r}: the {split} split has at most {tokens} tokens, fewer than "
                        f"data.seq_len + 1 = {seq_len + 1}; add text, lower data.seq_len or "
                        f"{'raise' if split == 'eval' else 'lower'} data.heldout_fraction")


def validate(config) -> None:
  """Raise :class:`ConfigError` for the first field that cannot work; returns None if all is well."""
  _check_fields(config)
  m, t = config.model, config.train
  seq_len = config.data.get("seq_len")
  _positive_int(seq_len, "data.seq_len")
  for field in ("d_model", "n_layers", "num_heads", "conv_width"):
    _positive_int(m[field], f"model.{field}")
  check_int(m.vocab_size, "model.vocab_size", 0, note=" (0: the data's vocabulary)")
  check_int(m.num_kv_heads, "model.num_kv_heads", 0, note=" (0: = model.num_heads)")
  pattern = tuple(m.pattern) if isinstance(m.pattern, (tuple, list)) else None
  if not pattern:
    raise ConfigError(f"model.pattern={m.pattern!r} must be a non-empty tuple of mixer names; "
                      f"valid mixers: {', '.join(sorted(MIXERS))}")
  for i, entry in enumerate(pattern):
    if not isinstance(entry, str):
      raise ConfigError(f"model.pattern[{i}]={entry!r} must be a mixer name (a string)")
    try:
      names = mixer_names(entry)
    except ValueError as e:
      raise ConfigError(f"model.pattern[{i}]: {e}") from None
    for name in names:
      if name not in MIXERS:
        raise ConfigError(f"model.pattern[{i}]={entry!r}: {name!r} is not a mixer; valid mixers: "
                          f"{', '.join(sorted(MIXERS))} (and 'a|b' for a parallel hybrid, 'a>b' for a "
                          "sequential one)")
  if m.parallel_merge not in MERGES:
    raise ConfigError(f"model.parallel_merge={m.parallel_merge!r}; valid: {', '.join(MERGES)}")
  if m.parallel_merge == "gate" and any(composition(e) == PARALLEL and len(mixer_names(e)) != 2 for e in pattern):
    raise ConfigError("model.parallel_merge='gate' merges exactly two mixers per parallel entry ('a|b')")
  for field in ("dtype", "param_dtype"):
    if m[field] not in DTYPES:
      raise ConfigError(f"model.{field}={m[field]!r}; valid: {', '.join(DTYPES)}")
  for field, valid in KERNEL_IMPLS.items():
    if m[field] not in valid:
      raise ConfigError(f"model.{field}={m[field]!r}; valid: {', '.join(valid)}")
  if m.d_model % m.num_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}")
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
  used = {name for entry in layer_pattern(m) for name in mixer_names(entry)}
  for name in sorted(used):
    try:
      MIXERS[name].check_config(m, seq_len=seq_len)
    except ValueError as e:
      raise ConfigError(f"mixer {name!r}: {e}") from None
  _check_unread_choices(m, used, seq_len)
  # The mixers' fields that no layer reads still get the range every mixer reading them needs.
  for field, (kind, lo, note) in _field_ranges().items():
    if kind is int:
      check_int(m[field], f"model.{field}", lo, note=note)
    else:
      check_number(m[field], f"model.{field}", lo, lo_open=kind == "positive", note=note)
  check_int(m.moe_every, "model.moe_every", 0, note=" (0: dense MLPs; k: every k-th layer's MLP is a MoE)")
  if m.moe_every:
    _positive_int(m.num_experts, "model.num_experts")
    check_int(m.moe_top_k, "model.moe_top_k", 1, m.num_experts, note=" (at most model.num_experts)")
  if m.moe_every > m.n_layers:  # layer i is a MoE where i % moe_every == moe_every - 1 (HybridLM)
    raise ConfigError(f"model.moe_every={m.moe_every} exceeds model.n_layers={m.n_layers}: no layer's MLP would be a "
                      f"MoE; valid: 0 (dense MLPs) or 1 … {m.n_layers}")
  if m.moe_every < 0 or (m.moe_every and not 1 <= m.moe_top_k <= m.num_experts):
    raise ConfigError(f"model.moe_every={m.moe_every} must be ≥ 0 and model.moe_top_k={m.moe_top_k} in "
                      f"[1, model.num_experts={m.num_experts}]")
  import math

  if (isinstance(m.mlp_expansion, bool) or not isinstance(m.mlp_expansion, (int, float))
      or not math.isfinite(m.mlp_expansion) or not m.mlp_expansion >= 0):
    raise ConfigError(f"model.mlp_expansion={m.mlp_expansion!r} must be ≥ 0 (0: no MLP sublayer)")
  if m.mlp_expansion and int(m.mlp_expansion * m.d_model) < 1:
    raise ConfigError(f"model.mlp_expansion={m.mlp_expansion!r} gives an MLP of int({m.mlp_expansion!r} · "
                      f"model.d_model={m.d_model}) = 0 units; use 0 for no MLP sublayer or a larger value")
  if m.moe_every and m.mlp_expansion == 0:
    raise ConfigError(f"model.moe_every={m.moe_every} needs experts of width model.mlp_expansion > 0, "
                      "not 0 (no MLP sublayer)")
  if m.norm not in NORMS:
    raise ConfigError(f"model.norm={m.norm!r}; valid: {', '.join(NORMS)}")
  if m.position not in POSITIONS:
    raise ConfigError(f"model.position={m.position!r}; valid: {', '.join(POSITIONS)}")
  if isinstance(m.max_len, bool) or not isinstance(m.max_len, int) or m.max_len < 0:
    raise ConfigError(f"model.max_len={m.max_len!r} must be an integer ≥ 0 (0: data.seq_len)")
  if m.position == "learned" and m.max_len and m.max_len < seq_len:
    raise ConfigError(f"model.max_len={m.max_len} is shorter than data.seq_len={seq_len}: the learned "
                      "position table must cover every training position")
  if m.logits_softcap < 0 or m.attn_softcap < 0:
    raise ConfigError("model.logits_softcap and model.attn_softcap must be ≥ 0 (0 = off)")
  for field in ("logits_softcap", "attn_softcap"):
    check_number(m[field], f"model.{field}", 0, note=" (0: off)")
  check_number(m.rope_base, "model.rope_base", 0, lo_open=True)
  for field in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
    _positive_int(t[field], f"train.{field}")
  if not (t.lr > 0):
    raise ConfigError(f"train.lr={t.lr} must be > 0")
  check_number(t.lr, "train.lr", 0, lo_open=True)
  if not 0 <= t.warmup_steps < t.steps:  # optax's cosine needs at least one decay step
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps})")
  if not (t.grad_clip >= 0):
    raise ConfigError(f"train.grad_clip={t.grad_clip} must be ≥ 0 (0: no clipping)")
  check_number(t.grad_clip, "train.grad_clip", 0, note=" (0: no clipping)")
  check_number(t.min_lr_ratio, "train.min_lr_ratio", 0, 1, note=" (the cosine decays to train.lr · min_lr_ratio)")
  check_number(t.weight_decay, "train.weight_decay", 0, note=" (0: none)")
  check_number(t.b1, "train.b1", 0, 1, hi_open=True, note=" (Adam's first-moment decay)")
  check_number(t.b2, "train.b2", 0, 1, hi_open=True, note=" (Adam's second-moment decay)")
  check_number(t.moe_balance_weight, "train.moe_balance_weight", 0)
  if not 0 <= t.stop_at_accuracy < 1:
    raise ConfigError(f"train.stop_at_accuracy={t.stop_at_accuracy} must be in [0, 1) (0: off)")
  check_number(t.stop_at_accuracy, "train.stop_at_accuracy", 0, 1, hi_open=True, note=" (0: off)")
  if t.eval_every < 0:
    raise ConfigError(f"train.eval_every={t.eval_every} must be ≥ 0 (0: evaluate at the end only)")
  choices = tuple(t.window_choices)
  if choices:
    windowed = sorted(name for name, mixer in MIXERS.items() if "window" in mixer.SETTINGS)  # banded attention
    if not used & set(windowed):
      raise ConfigError(f"train.window_choices={choices} needs an {' or '.join(map(repr, windowed))} layer in "
                        f"model.pattern={tuple(m.pattern)}")
    for w in choices:
      if isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= seq_len:
        raise ConfigError(f"train.window_choices={choices}: each window must be an int in [1, data.seq_len={seq_len}]")
  if not 0 <= t.window_anneal_steps <= t.steps:
    raise ConfigError(f"train.window_anneal_steps={t.window_anneal_steps} must be in [0, train.steps={t.steps}]")
  if t.window_anneal_steps and not choices:
    raise ConfigError(f"train.window_anneal_steps={t.window_anneal_steps} anneals stochastic windows, but "
                      "train.window_choices=() (off); set train.window_choices or train.window_anneal_steps=0")
  try:
    data_lib.validate(config.data, seq_len=seq_len)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.data.name == "text":
    _check_text_corpus(config.data, seq_len)
  data_vocab = data_lib.vocab_size(config.data)
  if m.vocab_size and m.vocab_size < data_vocab:
    raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the data's vocabulary ({data_vocab})")
  _validate_mesh(config, t.batch_size)


def _validate_mesh(config, batch_size: int) -> None:
  """What can be checked without devices; ``sharding.make_mesh`` checks the rest against them."""
  runtime = config.get("runtime")
  if runtime is None:
    return
  mesh = runtime.get("mesh") or {}
  valid = tuple(runtime_config().mesh.keys())
  if not isinstance(mesh, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f"runtime.mesh={mesh!r} must be a section of axis sizes; valid axes: {', '.join(valid)}")
  unknown = sorted(set(mesh.keys()) - set(valid))
  if unknown:
    raise ConfigError(f"runtime.mesh has unknown axes {unknown}; valid: {', '.join(valid)}")
  sizes = {axis: mesh.get(axis, 1) for axis in valid}
  for axis, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and value != -1):
      raise ConfigError(f"runtime.mesh.{axis}={value!r} must be a positive integer or -1 (all remaining devices)")
  if sum(value == -1 for value in sizes.values()) > 1:
    raise ConfigError("runtime.mesh: at most one of " + ", ".join(f"runtime.mesh.{a}" for a in valid) + " may be -1")
  ways = sizes["data"] * sizes["fsdp"]
  if ways > 0 and batch_size % ways:  # with a -1 axis, make_mesh checks once the device count is known
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by runtime.mesh.data × runtime.mesh.fsdp = {ways}"
                      " (the batch is split over both)")


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validate and fill derived fields (size preset, learned-position table, vocab size); the result
  is what a run trains and what its ``config.json`` holds (``hybrids.rundir``). Every config error
  surfaces here, before anything is compiled or written."""
  from hybrids.sizes import apply_size

  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.get("position") == "learned" and not config.model.get("max_len"):
    config.model.max_len = config.data.seq_len  # the table covers the training length
  if "runtime" not in config:  # a config built without base_config(): default placement
    config.runtime = runtime_config()
  try:
    config.model = apply_size(config.model)
  except (ValueError, ArithmeticError, TypeError) as e:
    # A size preset builds the model to match parameters: a bad field breaks that first. Validating
    # the unsized config names the field when it can.
    validate(config)
    raise ConfigError(f"model.size={config.model.size!r}: {e}") from None
  validate(config)
  if not config.model.vocab_size:
    config.model.vocab_size = data_lib.vocab_size(config.data)
  return config


def load_experiment(path: str):
  """Import an experiment file (``experiments/NAME.py``) as a module."""
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise ConfigError(f"experiment file {path!r} does not exist")
  name = "hybrids_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"experiment file {path!r} defines no get_config(arg)")
  return module


def parse_value(text: str, current):
  """Parse an override string into the type of the field it replaces (as ``--config.X=`` does)."""
  import ast

  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected a bool, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if not isinstance(current, tuple):
      raise ConfigError(f"cannot parse {text!r} as a {type(current).__name__}") from None
    value = None
  if isinstance(current, tuple) and not isinstance(value, (tuple, list)):
    # A tuple field also takes a comma list: --config.model.pattern=rglru,swa or --config.model.pattern=rglru
    def element(part: str):
      try:
        return ast.literal_eval(part)
      except (ValueError, SyntaxError):
        return part  # a bare name: rglru, swa, rglru|swa
    value = tuple(element(part.strip()) for part in text.split(",") if part.strip())
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Set dotted fields (``{"model.window": 32}``); an unknown field names its valid siblings."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parents[:i]) or "config"
        raise ConfigError(f"unknown config field {dotted!r}: {where} has no {part!r}; "
                          f"valid: {', '.join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else '—'}")
      node = node[part]
    if leaf not in node:
      where = ".".join(parents) or "config"
      raise ConfigError(f"unknown config field {dotted!r}: {where} has no {leaf!r}; valid: {', '.join(sorted(node.keys()))}")
    if isinstance(value, str) and not isinstance(node[leaf], str) and node[leaf] is not None:
      try:
        value = parse_value(value, node[leaf])
      except ConfigError as e:
        raise ConfigError(f"config field {dotted!r}: {e}") from None
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError:  # ml_collections keeps each field's type (an int field refuses 1.5)
      raise ConfigError(f"config field {dotted!r}={value!r} must be of type {type(node[leaf]).__name__}, "
                        f"like its current value {node[leaf]!r}") from None
  return config


def split_overrides(argv: list[str], flag: str = "config") -> tuple[list[str], dict[str, str]]:
  """``argv`` → (``argv`` without its ``--config.FIELD=VALUE`` overrides, ``{"FIELD": "VALUE"}``).

  What ml_collections' config flags accept: ``--config.F=V``, ``--config.F V``, ``--config.F`` (true) and
  ``--noconfig.F`` (false). The overrides go through :func:`apply_overrides`, so a misspelt field is one
  ``ConfigError`` naming the valid fields instead of a flag-parsing traceback.
  """
  rest, overrides = list(argv[:1]), {}
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      rest.extend(argv[i:])
      break
    prefix = next((p for p in (f"--{flag}.", f"-{flag}.", f"--no{flag}.", f"-no{flag}.") if arg.startswith(p)), None)
    if prefix is None:
      rest.append(arg)
      i += 1
      continue
    field, eq, value = arg[len(prefix):].partition("=")
    if "no" in prefix:
      if eq:
        raise ConfigError(f"{arg!r}: --no{flag}.FIELD takes no value (use --{flag}.{field}={value})")
      value = "false"
    elif not eq:
      if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        value = argv[i + 1]
        i += 1
      else:
        value = "true"
    if not field:
      raise ConfigError(f"{arg!r} names no config field (e.g. --{flag}.model.window=32)")
    overrides[field] = value
    i += 1
  return rest, overrides


def get_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """``"experiments/quickstart.py:rglru"`` (+ overrides) → ConfigDict, like ``--config`` on the CLI."""
  path, _, arg = spec.partition(":")
  module = load_experiment(path)
  config = module.get_config(arg or None)
  return apply_overrides(config, overrides or {})


def check_variant(experiment: str, arg: str | None, variants: tuple[str, ...]) -> None:
  """An experiment file's ``get_config(arg)`` / ``get_sweep(h, arg)``: a misspelt variant names the valid ones."""
  if arg is not None and arg not in variants:
    raise ConfigError(f"{experiment}: unknown variant {arg!r}; valid: {', '.join(variants)} (or none for the full grid)")


def smoke_test(c: ml_collections.ConfigDict, *, steps: int = 3, batch_size: int = 4,
               **model_fields) -> ml_collections.ConfigDict:
  """Shrink an experiment's config in place to a seconds-long CPU run (the ``tiny`` variants).

  Keeps the experiment's pattern, data source and training path; ``model_fields`` override
  ``model.*`` (e.g. ``n_layers=3, window=8``). Checkpoints once, at the end; no eval before it.
  """
  c.data.seq_len = 32
  if c.data.name == "mqar":
    c.data.vocab_size, c.data.num_kv_pairs = 64, 2
    c.data.num_train_examples, c.data.num_eval_examples = 64, 8
  c.model.size = ""
  c.model.d_model = 16
  for field, value in model_fields.items():
    c.model[field] = value
  t = c.train
  t.batch_size, t.steps, t.warmup_steps = batch_size, steps, 1
  t.eval_every, t.eval_batches, t.checkpoint_every, t.log_every = 0, 1, steps, 1
  return c


def zoology_training(t: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Set ``train`` (in place) as Zoology's trainer (``zoology/train.py``): AdamW with torch's default
  betas (0.9, 0.999) and weight decay 0.1, no warmup, cosine to 0, no gradient clipping, and stop
  once test accuracy exceeds 0.99."""
  t.b1, t.b2 = 0.9, 0.999
  t.weight_decay = 0.1
  t.warmup_steps = 0
  t.min_lr_ratio = 0.0
  t.grad_clip = 0.0
  t.stop_at_accuracy = 0.99
  return t
