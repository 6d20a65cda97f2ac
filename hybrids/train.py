"""Train one hybrid LM and write its run directory.

Usage:

    python -m hybrids.train --config experiments/quickstart.py:rglru --workdir /tmp/run \\
        --config.model.window=32 --config.train.steps=200

``--config`` is an experiment file and an optional argument for its ``get_config(arg)``; any field can
be overridden with ``--config.FIELD=VALUE`` (an unknown field is an error). Running the same command
again resumes from the last checkpoint with the identical data order; a run directory that holds a
different config is refused. SIGTERM or Ctrl-C saves a checkpoint and exits (status "interrupted").
One trainer per run directory: the run's ``.lock`` (``hybrids.rundir.run_lock``) is held for the whole
run; a second trainer is refused, naming the holder. Running a finished run again does nothing and
says so. Every checkpoint carries sha256 checksums of its files (``checksums.json``), verified before
any restore; a checkpoint that fails them is moved to ``corrupt_checkpoints/`` and the previous one
is used (``summary.json["corrupt_checkpoints"]``).

The run directory (DESIGN.md; its files are named, read and written by ``hybrids.rundir``): ``config.json``
(resolved), ``metrics.jsonl``, TensorBoard events in ``tb/``, ``checkpoints/`` (orbax: params, optimizer
state, data-iterator state) and ``summary.json``. This module is the loop; config resolution is
``hybrids.config.resolve``.

Sharding (``hybrids.sharding``): parameters and optimizer state are created directly in their
shardings on the mesh of ``config.runtime.mesh`` (default: data parallel over every device) and each
batch is split over ``data`` × ``fsdp``. ``runtime`` is not part of ``config.json``: a run resumes on
another mesh, e.g. ``--config.runtime.mesh.fsdp=4``. Several processes (SLURM, TPU pods, or
``HYBRIDS_COORDINATOR`` / ``HYBRIDS_NUM_PROCESSES`` / ``HYBRIDS_PROCESS_ID``) run the same command;
process 0 writes the run directory's files, all of them write the checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import kernels
from hybrids import config as config_lib
from hybrids import data as data_lib
from hybrids.data import pipeline as data_pipeline
from hybrids.data import shards as data_shards
from hybrids.data import text as data_text
from hybrids import flops as flops_lib
from hybrids import rundir
from hybrids import sharding as sharding_lib
from hybrids.config import resolve  # noqa: F401  (re-exported: callers resolve configs as hybrids.train.resolve)
from hybrids.model import HybridLM, count_params, layer_pattern
from hybrids.rundir import (  # noqa: F401  (re-exported for callers of the trainer)
    CHECKSUM_FILE, CHECKSUMS_SINCE_FILE, CONFIG_FILE, CORRUPT_DIR, METRICS_FILE, SUMMARY_FILE, RunDirectoryError)
from hybrids.rundir import prepare as prepare_workdir  # noqa: F401
from kernels.pallas_compat import batch_parallel


class DivergedError(RuntimeError):
  """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- run directory helpers

# The trainer writes its checksum files through this name (a test interrupts a save by replacing it).
_write_json = rundir.write_json


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drop metric lines logged after the checkpoint we resume from, so the log stays continuous."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= last_step:
          kept.append(line)
      except (json.JSONDecodeError, KeyError):
        continue  # a line cut by a kill mid-write
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def versions() -> dict[str, str]:
  import flax
  import grain
  out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}
  for name, mod in (("orbax-checkpoint", ocp), ("grain", grain)):
    out[name] = getattr(mod, "__version__", "unknown")
  return out


def hardware(mesh=None) -> dict[str, Any]:
  devices = jax.devices()
  out = {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
         "device_count": len(devices), "process_count": jax.process_count()}
  if mesh is not None:
    out["mesh"] = dict(mesh.shape)
  return out


# ----------------------------------------------------------------------------- optimisation

def lr_schedule(t, peak_lr=None) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then cosine decay to ``lr · min_lr_ratio`` at ``steps``.

  ``peak_lr`` (a traced scalar: a lockstep group member's rate, :func:`group_steps`) replaces ``t.lr``
  as that schedule's shape times the rate."""
  if peak_lr is None:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps, decay_steps=t.steps,
        end_value=t.lr * t.min_lr_ratio)
  shape = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=1.0, warmup_steps=t.warmup_steps,
                                             decay_steps=t.steps, end_value=t.min_lr_ratio)
  return lambda count: peak_lr * shape(count)


# The gain of every norm in hybrids.layers (the residual stream's RMSNorm / LayerNorm, the mixers'
# per-head norms): weight decay would pull it toward 0, i.e. toward a different model, not a smaller one.
NORM_PARAMS = frozenset({"scale"})


def decay_mask(params, layer_mixers=()) -> Any:
  """True for the parameters AdamW decays: matrices (ndim ≥ 2) that are neither a norm's gain
  (:data:`NORM_PARAMS`) nor named in their mixer's ``NO_WEIGHT_DECAY`` (its dynamics: decay rates,
  poles, residues, token-shift mixes, declared in the mixer's file).

  ``layer_mixers`` (``model.layer_pattern(config.model)``) says which mixer holds ``('blocks', i,
  'mixer', …)``; without it, a name that any registered mixer declares is not decayed wherever it is.
  """
  from hybrids.blocks import owning_mixer
  from hybrids.mixers import MIXERS

  anywhere = frozenset().union(*(mixer.NO_WEIGHT_DECAY for mixer in MIXERS.values()))

  def decayed(path, p):
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    name = keys[-1] if keys else None
    if p.ndim < 2 or name in NORM_PARAMS:
      return False
    if not layer_mixers:
      return name not in anywhere
    owner = owning_mixer(keys, layer_mixers)
    return owner is None or name not in MIXERS[owner].NO_WEIGHT_DECAY
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(t, layer_mixers=(), peak_lr=None) -> optax.GradientTransformation:
  """AdamW on :func:`lr_schedule`, global-norm clipping (``grad_clip == 0``: none), weight decay on
  :func:`decay_mask` (of the model whose layers are ``layer_mixers``); ``peak_lr``: see :func:`lr_schedule`
  (the state's structure does not depend on it)."""
  schedule = lr_schedule(t, peak_lr)
  mask = lambda params: decay_mask(params, tuple(layer_mixers))
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask))


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm  # renamed in optax 0.2.5


def lm_loss(logits, labels):
  """Mean cross-entropy and accuracy over positions whose label is not ``IGNORE_LABEL``.

  ``logits: f32 [batch, time, vocab]``, ``labels: int [batch, time]``. Returns sums so callers can
  aggregate exactly over batches: ``(loss_sum, correct_sum, count)``.
  """
  mask = labels != data_lib.IGNORE_LABEL
  safe = jnp.where(mask, labels, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  correct = (jnp.argmax(logits, -1) == safe) & mask
  return jnp.sum(nll * mask), jnp.sum(correct), jnp.sum(mask)


LOSS_CHUNK_BYTES = 1 << 27  # runtime.loss_chunk_tokens=-1: logits of at most this many bytes at a time


def loss_chunk_tokens(config: ml_collections.ConfigDict, devices: int = 1) -> int:
  """Positions per chunk of the chunked loss (``runtime.loss_chunk_tokens``; 0: the whole batch at once).
  Auto (-1): chunks of ``LOSS_CHUNK_BYTES`` of f32 logits where the batch's would be larger; never for
  rows scored at a few labelled positions (MQAR: ``data.max_labels_per_row``), nor on a mesh of several
  ``devices``, where XLA reduces the head's gradient once per chunk, inside the loop, rather than once
  a step (an explicit size is taken there too, at that cost)."""
  asked = config.runtime.get("loss_chunk_tokens", 0)
  if asked >= 0:
    return asked
  if data_lib.max_labels_per_row(config.data, "train") or devices > 1:
    return 0
  per_token = 4 * config.model.vocab_size
  return 0 if config.train.batch_size * config.data.seq_len * per_token <= LOSS_CHUNK_BYTES else max(
      1, LOSS_CHUNK_BYTES // per_token)


def chunked_lm_loss(head, hidden, labels, chunk_tokens: int):
  """:func:`lm_loss` of ``head(hidden)`` a chunk of time at a time, each chunk's logits recomputed in the
  backward pass (``jax.checkpoint``): the same sums, without the whole batch's logits in memory.

  ``head``: ``[batch, rows, d] → f32 [batch, rows, vocab]``; ``hidden: [batch, time, d]``; ``labels:
  int [batch, time]``; ``chunk_tokens``: positions per chunk, as ``batch × rows`` (rows of time per
  chunk, at least one; time is padded with unlabelled positions to a multiple of them). Chunks cut
  time, not the batch, so a batch sharded over devices stays where it is."""
  batch, time, width = hidden.shape
  rows = max(1, min(time, chunk_tokens // batch))
  if rows == time:  # one chunk: nothing to save, no recompute to pay
    return lm_loss(head(hidden), labels)
  # a divisor of time down to half the chunk needs no padding; else pad time with unlabelled positions
  rows = next((r for r in range(rows, rows // 2, -1) if time % r == 0), rows)
  pad = (-time) % rows
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=data_lib.IGNORE_LABEL)
  chunks = (time + pad) // rows
  hidden = jnp.moveaxis(hidden.reshape(batch, chunks, rows, width), 1, 0)
  labels = jnp.moveaxis(labels.reshape(batch, chunks, rows), 1, 0)
  piece = jax.checkpoint(lambda h, y: lm_loss(head(h), y))
  sums = jax.lax.map(lambda chunk: piece(*chunk), (hidden, labels))
  return tuple(jnp.sum(x, axis=0) for x in sums)


def label_positions(labels, slots: int):
  """The first ``slots`` positions of each row that carry a label, in order → ``int32 [batch, slots]``.

  ``labels: int [batch, time]``. Positions past a row's labels point at unlabelled positions (their
  gathered label is ``IGNORE_LABEL``, so they carry no loss). The caller guarantees that no row has
  more than ``slots`` labels (``data.max_labels_per_row``).
  """
  unlabelled = (labels == data_lib.IGNORE_LABEL).astype(jnp.int8)
  return jnp.argsort(unlabelled, axis=1, stable=True)[:, :slots].astype(jnp.int32)


DOCUMENT_BOUNDARIES = "document_boundaries"


def document_eod(config: ml_collections.ConfigDict) -> int | None:
  """The end-of-document token that delimits the packed documents of a row when
  ``data.document_boundaries`` is on (None: off, or MQAR, whose rows are one document each).

  ``data.document_boundaries`` (issue 23) is on by default for text and shards (absent: on) and
  means nothing for MQAR. On, every mixer of ``model.pattern`` must declare ``SEGMENTS``: a
  ConfigError names the first that does not.
  """
  if config.data.name not in ("text", "shards"):
    return None
  on = data_lib.get_field(config.data, DOCUMENT_BOUNDARIES, True)
  if not isinstance(on, bool):
    raise config_lib.ConfigError(f"data.{DOCUMENT_BOUNDARIES}={on!r} must be True or False")
  if not on:
    return None
  from hybrids.blocks import check_entry_segments
  for entry in dict.fromkeys(layer_pattern(config.model)):
    try:
      check_entry_segments(entry)
    except ValueError as e:
      raise config_lib.ConfigError(f"data.{DOCUMENT_BOUNDARIES}=True: {e}") from None
  if config.data.name == "text":
    return data_text.eod_token(config.data.tokenizer)
  return data_shards.eod_token(config.data.path)


@dataclasses.dataclass
class Trainer:
  """Compiled pure functions over ``(params, opt_state)``; the model is rebuilt inside jit by merge."""

  graphdef: Any
  abstract_state: Any
  tx: optax.GradientTransformation
  moe_balance_weight: float = 0.0
  has_moe: bool = False
  scan_layers: bool = True  # HybridLM.__call__: compile one layer period, not n_layers layers
  # At most this many labelled positions per row (MQAR: its key–value pairs): only their logits are
  # computed. 0: every position's. Training and evaluation rows may differ (an MQAR mixture tests
  # longer cells than it trains on).
  label_slots: int = 0
  eval_label_slots: int = 0
  # data.document_boundaries: the token ending each packed document (None: a row is one document).
  document_eod: int | None = None
  # runtime.loss_chunk_tokens as resolved (:func:`loss_chunk_tokens`): 0, the whole batch's logits at once.
  loss_chunk: int = 0

  def model(self, params, window: int | None = None) -> HybridLM:
    state = jax.tree.map(lambda x: x, self.abstract_state)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(self.graphdef, state)
    if window is not None:
      model.set_window(window)
    return model

  def scored(self, model, batch, slots: int = 0, **kwargs):
    """``(logits, labels, aux)`` at the scored positions (all, or the first ``slots`` labelled ones);
    with ``return_hidden=True`` (passed on to the model) the last block's output in place of the logits."""
    labels, positions = batch["labels"], None
    if self.document_eod is not None:  # packed documents, each run as if alone (issue 23)
      segment_ids = batch.get(data_pipeline.SEGMENT_IDS)
      if segment_ids is None:
        segment_ids = data_pipeline.segment_ids_from_eod(batch["inputs"], self.document_eod, xp=jnp)
      kwargs = {**kwargs, "segment_ids": segment_ids}
      # The label after a document's closing EOD is the next document's first token: predicting it
      # from this document would score one document on another, so it is not scored.
      labels = jnp.where(batch["inputs"] == self.document_eod, data_lib.IGNORE_LABEL, labels)
    if slots:
      positions = label_positions(labels, slots)
      labels = jnp.take_along_axis(labels, positions, axis=1)
    logits, aux = model(batch["inputs"], return_aux=True, scan_layers=self.scan_layers, logits_at=positions, **kwargs)
    return logits, labels, aux

  def loss_sums(self, model, batch, slots: int = 0):
    """``((loss_sum, correct, count), aux)`` of :func:`lm_loss` at the scored positions; the head a chunk
    of positions at a time when ``loss_chunk`` is set (:func:`chunked_lm_loss`) and every position is scored."""
    if slots or not self.loss_chunk:
      logits, labels, aux = self.scored(model, batch, slots)
      return lm_loss(logits, labels), aux
    hidden, labels, aux = self.scored(model, batch, 0, return_hidden=True)
    return chunked_lm_loss(model.logits, hidden, labels, self.loss_chunk), aux

  def _loss(self, params, batch, window):
    (loss_sum, correct, count), aux = self.loss_sums(self.model(params, window), batch, self.label_slots)
    count = jnp.maximum(count, 1)
    loss = loss_sum / count
    return loss + self.moe_balance_weight * aux["moe_balance"], (loss, correct / count, aux["moe_balance"])

  def train_step(self, params, opt_state, batch, window: int | None = None):
    """One update; ``window`` (static) overrides the SWA band for this step (SWAX)."""
    (_, (loss, accuracy, balance)), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, window)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": _global_norm(grads)}
    if self.has_moe:
      metrics["moe_balance"] = balance
    return params, opt_state, metrics

  def eval_step(self, params, batch):
    return self.loss_sums(self.model(params), batch, self.eval_label_slots)[0]


def previous_early_stop(workdir: str, step: int) -> dict | None:
  """The early stop recorded in ``summary.json`` if the run stopped there at ``step`` (then there is
  nothing left to train), else None."""
  early = rundir.read_summary(workdir, strict=True).get("early_stop")
  return early if early and early.get("step") == step else None


def window_for_step(t, step: int, seed: int) -> int | None:
  """SWAX stochastic window training (Cabannes et al. 2025): the SWA band of update ``step``.

  Drawn uniformly from ``train.window_choices`` by an RNG keyed on ``(seed, step)`` — so a resumed run
  draws the same windows — and None (the config's ``model.window``) when no choices are set or
  during the last ``train.window_anneal_steps`` updates.
  """
  choices = tuple(t.window_choices)
  if not choices or step > t.steps - t.window_anneal_steps:
    return None
  return int(choices[np.random.default_rng((seed, step)).integers(len(choices))])


@jax.jit
def _labelled_rows(labels):
  """Rows of ``labels [batch, time]`` with at least one label (a batch's real examples)."""
  return jnp.sum(jnp.any(labels != data_lib.IGNORE_LABEL, axis=1))


def evaluate(trainer: Trainer, eval_step, params, batches, members: int = 0):
  """Loss, perplexity and accuracy over ``batches``; with ``members`` (a lockstep group, whose
  ``eval_step`` returns one value per member), a list of them, one per member.

  ``eval_loss`` and ``eval_token_accuracy`` pool every labelled position. ``eval_accuracy`` is the
  mean over examples of each example's accuracy (Zoology's ``valid/accuracy``), computed as the batches'
  accuracies weighted by their labelled rows — exact when the labelled rows of a batch carry equally
  many labels, as every batch here does (MQAR: one cell per batch, ``data.eval_batches``; language
  modelling: every position). When all rows of the set do (one MQAR cell, text), the two accuracies are
  equal; on a mixture of MQAR cells they differ (a K = 256 example counts 64 × a K = 4 one in the pooled
  token accuracy, once in ``eval_accuracy``).
  """
  width = max(members, 1)
  loss_sum, correct, count = np.zeros(width), np.zeros(width), np.zeros(width)
  example_accuracy, examples = np.zeros(width), 0.0
  for batch in batches:
    l, c, n = (np.atleast_1d(np.asarray(x, np.float64)) for x in jax.device_get(eval_step(params, batch)))
    loss_sum, correct, count = loss_sum + l, correct + c, count + n
    if n.any():  # every member scores the same positions
      rows = float(jax.device_get(_labelled_rows(batch["labels"])))
      example_accuracy, examples = example_accuracy + rows * c / np.maximum(n, 1.0), examples + rows
  results = []
  for i in range(width):
    loss = float(loss_sum[i]) / max(float(count[i]), 1.0)
    results.append({"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)),
                    "eval_accuracy": float(example_accuracy[i]) / max(examples, 1.0),
                    "eval_token_accuracy": float(correct[i]) / max(float(count[i]), 1.0)})
  return results if members else results[0]


@dataclasses.dataclass
class Layout:
  """A model's structure and its state's shapes, dtypes and shardings on one mesh — no weights."""

  graphdef: Any
  abstract_state: Any  # nnx.State of ShapeDtypeStruct
  tx: optax.GradientTransformation
  params: Any     # pure dict of ShapeDtypeStruct with .sharding (also a restore target)
  opt_state: Any  # optimizer state, likewise
  counts: dict[str, int]


def layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Layout:
  """Trace the model abstractly (no compile, no weights) and place its state on ``mesh``."""
  abstract_model = nnx.eval_shape(lambda: HybridLM(config.model, rngs=nnx.Rngs(params=config.seed)))
  graphdef, abstract_state = nnx.split(abstract_model)
  abstract_params = nnx.to_pure_dict(abstract_state)
  tx = make_optimizer(config.train, layer_pattern(config.model))
  params_sharding = sharding_lib.params_shardings(abstract_params, mesh, layer_pattern(config.model))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sharding = sharding_lib.follow_params_shardings(abstract_opt, abstract_params, params_sharding, mesh)
  placed = lambda tree, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  return Layout(graphdef, abstract_state, tx, placed(abstract_params, params_sharding),
                placed(abstract_opt, opt_sharding), count_params(abstract_model))


@dataclasses.dataclass
class Setup:
  """A model's compiled steps and its state, laid out on one mesh (see :func:`build`)."""

  trainer: Trainer
  mesh: jax.sharding.Mesh
  params: Any
  opt_state: Any
  train_step: Any  # (params, opt_state, batch, window) → (params, opt_state, metrics); window static
  eval_step: Any   # (params, batch) → (loss_sum, correct_sum, count)
  batch_sharding: jax.sharding.NamedSharding
  counts: dict[str, int]


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  """Initialise parameters and optimizer state in their shardings on ``mesh``; jit the steps.

  ``config`` is resolved. The weights are created by a jitted init whose outputs are already
  sharded, so no device ever holds a full copy it does not need (and every process of a
  multi-process run builds the same weights from ``config.seed``). The steps' shardings are fixed
  (in and out), so a batch or a state on another layout is an error rather than a silent reshard.
  """
  t = config.train
  placed = layout(config, mesh)
  sharding_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  params_sharding, opt_sharding = sharding_of(placed.params), sharding_of(placed.opt_state)
  new_params = lambda: nnx.to_pure_dict(nnx.state(HybridLM(config.model, rngs=nnx.Rngs(params=config.seed))))
  replicated_params = all(s.is_fully_replicated for s in jax.tree.leaves(params_sharding))
  with threefry_kernel(replicated_params):
    params = jax.jit(new_params, out_shardings=params_sharding)()
  opt_state = jax.jit(placed.tx.init, out_shardings=opt_sharding)(params)
  trainer = Trainer(placed.graphdef, placed.abstract_state, placed.tx, moe_balance_weight=t.moe_balance_weight,
                    has_moe=bool(config.model.moe_every),
                    scan_layers=bool(config.runtime.get("scan_layers", True)),
                    label_slots=data_lib.max_labels_per_row(config.data, "train"),
                    eval_label_slots=data_lib.max_labels_per_row(config.data, "eval"),
                    document_eod=document_eod(config), loss_chunk=loss_chunk_tokens(config, mesh.devices.size))
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)

  def per_batch_shard(step):
    # Traced under batch_parallel, the Pallas kernels run on each device's rows of the batch (XLA
    # would otherwise gather the batch for them; see kernels.pallas_compat.batch_parallel).
    def traced(*args):
      with batch_parallel(mesh, sharding_lib.BATCH_AXES):
        return step(*args)
    return traced

  options = step_compiler_options(mesh.devices.flat[0].platform)
  train_step = jax.jit(per_batch_shard(trainer.train_step), donate_argnums=(0, 1), static_argnums=3,
                       in_shardings=(params_sharding, opt_sharding, batch_sharding),
                       out_shardings=(params_sharding, opt_sharding, replicated), compiler_options=options)
  eval_step = jax.jit(per_batch_shard(trainer.eval_step), in_shardings=(params_sharding, batch_sharding),
                      out_shardings=replicated, compiler_options=options)
  return Setup(trainer, mesh, params, opt_state, train_step, eval_step, batch_sharding, placed.counts)


def group_steps(trainer: Trainer, config: ml_collections.ConfigDict):
  """The jitted steps of a lockstep group (:func:`train_group`): ``(params[G], opt_state[G], batch,
  lrs[G], active[G], window) → (params[G], opt_state[G], metrics[G])`` and ``(params[G], batch) →
  (loss_sum, correct, count)[G]``, ``jax.vmap`` over the members, the batch shared.

  Each member's optimizer is the config's with its own learning rate as the schedule's peak
  (:func:`make_optimizer`'s ``peak_lr``): the schedule is the lone run's up to the rounding of one f32
  product, the optimizer state has the same structure (a member's checkpoint resumes alone, and a lone
  run's in a group). An inactive member's parameters and optimizer state are kept as they were.
  """
  layers = layer_pattern(config.model)

  def member(params, opt_state, batch, lr, active, window):
    own = dataclasses.replace(trainer, tx=make_optimizer(config.train, layers, peak_lr=lr))
    new_params, new_opt, metrics = own.train_step(params, opt_state, batch, window)
    keep = lambda new, old: jnp.where(active, new, old)
    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state), metrics

  options = step_compiler_options(jax.devices()[0].platform)
  train_step = jax.jit(jax.vmap(member, in_axes=(0, 0, None, 0, 0, None)), donate_argnums=(0, 1),
                       static_argnums=5, compiler_options=options)
  eval_step = jax.jit(jax.vmap(trainer.eval_step, in_axes=(0, None)), compiler_options=options)
  return train_step, eval_step


@contextlib.contextmanager
def threefry_kernel(enabled: bool = True):
  """Within: on GPU, JAX lowers threefry to its CUDA kernel instead of unrolled XLA ops (same bits).

  The parameter init draws a few hundred random tensors; XLA's GPU lowering unrolls threefry's rounds,
  which makes the init compile longer than the train step (figures: ``kernels/BENCHMARKS.md``). XLA
  cannot partition the kernel, so the init uses it only when the parameters are replicated
  (``enabled``); FSDP- or tensor-sharded inits keep the partitionable ops.
  """
  previous = jax.config.jax_threefry_gpu_kernel_lowering
  jax.config.update("jax_threefry_gpu_kernel_lowering", bool(enabled))
  try:
    yield
  finally:
    jax.config.update("jax_threefry_gpu_kernel_lowering", previous)


def use_compilation_cache(path: str) -> None:
  """Point JAX's persistent compilation cache at ``path`` ("" or "off": leave JAX's setting alone).

  JAX reads the setting at the process's first compile, so a command line (or a sweep task, one
  process per run) sets it before building anything. Steps that compile in under a second are not
  cached (JAX's default threshold).
  """
  if path and path != "off":
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))


def step_compiler_options(platform: str) -> dict[str, Any] | None:
  """XLA options for the train and eval steps on ``platform`` (``jax.jit(compiler_options=...)``).

  On GPU, XLA's Triton GEMM fusions are turned off, so the matmuls go to cuBLAS: their autotuning is
  a large share of a first compile and buys no step time (figures: ``kernels/BENCHMARKS.md``). An
  ``XLA_FLAGS`` that names the option wins. Other platforms get no options.
  """
  if platform != "gpu" or "xla_gpu_enable_triton_gemm" in os.environ.get("XLA_FLAGS", ""):
    return None
  return {"xla_gpu_enable_triton_gemm": False}


# ----------------------------------------------------------------------------- checkpoints

# Integrity (issue 22): orbax's OCDBT chunks carry no checksum, so a flipped bit restores silently. After
# orbax commits a step, process 0 writes ``checkpoints/STEP/checksums.json`` (sha256 and size of every
# file of the step: parameters, optimizer state, data-iterator state, orbax's metadata), atomically
# (tmp + rename). Every restore verifies it first, on every process; a mismatch, a missing or an extra
# file is handled like an unreadable checkpoint. ``WORKDIR/checksums_since.json`` records the first
# step saved with checksums: a step from then on without its checksum file was cut between orbax's
# commit and ours (a SIGKILL) and is set aside like a corrupt one; an older step (written before
# checksums existed) is restored unverified, with a warning. While ``checksums_since.json`` exists but
# cannot be parsed, no step without its checksum file is trusted (those two cases cannot be told apart),
# and the file is left as found. The file names are ``hybrids.rundir``'s.


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  # Synchronous saves: the next step donates the parameter buffers, and runs here are small enough
  # that a blocking save costs little next to a corrupted one.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, rundir.CHECKPOINTS_DIR)), options=options)


def _sha256(path: str) -> str:
  import hashlib
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def step_files_digest(step_dir: str) -> dict[str, dict]:
  """``{relative path: {"sha256", "bytes"}}`` of every file under ``step_dir`` but the checksum file
  (hashed on a few threads: hashlib releases the GIL)."""
  from concurrent.futures import ThreadPoolExecutor

  paths = sorted(os.path.relpath(os.path.join(root, name), step_dir)
                 for root, _, names in os.walk(step_dir) for name in names)
  paths = [p for p in paths if p != CHECKSUM_FILE]
  with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    digests = list(pool.map(lambda p: _sha256(os.path.join(step_dir, p)), paths))
  return {p: {"sha256": d, "bytes": os.path.getsize(os.path.join(step_dir, p))} for p, d in zip(paths, digests)}


def write_checksums(step_dir: str) -> None:
  _write_json(os.path.join(step_dir, CHECKSUM_FILE), {"algorithm": "sha256", "files": step_files_digest(step_dir)})


def verify_checksums(checkpoints_dir: str, step: int) -> str | None:
  """Why step ``step`` must not be restored (None: verified). Raises :class:`_Unverified` for a step
  written before checksums existed (restorable, with a warning)."""
  step_dir = os.path.join(checkpoints_dir, str(step))
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    try:
      since = _checksums_since(checkpoints_dir)
    except _SinceUnreadable as e:  # a cut save cannot be told from an older step: not trusted
      return (f"{e} and the step has no {CHECKSUM_FILE}: it may have been cut before its checksums were "
              "committed")
    if since is not None and step >= since:
      return (f"no {CHECKSUM_FILE}, though every step from {since} on is saved with one: "
              "the save was cut before its checksums were committed")
    raise _Unverified(step)
  try:
    with open(path) as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{CHECKSUM_FILE} unreadable ({type(e).__name__}: {e})"
  actual = step_files_digest(step_dir)
  problems = [f"{p}: missing" for p in sorted(set(expected) - set(actual))]
  problems += [f"{p}: not in {CHECKSUM_FILE}" for p in sorted(set(actual) - set(expected))]
  problems += [f"{p}: sha256 mismatch ({actual[p]['bytes']} bytes, {expected[p].get('bytes')} written)"
               for p in sorted(set(actual) & set(expected)) if actual[p]["sha256"] != expected[p].get("sha256")]
  if problems:
    more = f"; … {len(problems) - 5} more" if len(problems) > 5 else ""
    return "checksum mismatch: " + "; ".join(problems[:5]) + more
  return None


class _Unverified(Exception):
  """A step saved before checksums existed."""


class _SinceUnreadable(Exception):
  """``checksums_since.json`` exists but cannot be read or parsed."""


def _checksums_since(checkpoints_dir: str) -> int | None:
  """The first step saved with checksums; None when no step has been (the file is missing: a run
  directory from before checksums, or one not yet checkpointed). Raises :class:`_SinceUnreadable`."""
  path = os.path.join(os.path.dirname(checkpoints_dir), CHECKSUMS_SINCE_FILE)
  try:
    with open(path) as f:
      return int(json.load(f)["step"])
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise _SinceUnreadable(f"{CHECKSUMS_SINCE_FILE} is unreadable ({type(e).__name__}: {e})") from None


def save_checkpoint(manager, step: int, params, opt_state, data_state) -> None:
  """Save synchronously, then commit the step's checksums (process 0, after orbax's own commit)."""
  directory = os.fspath(manager.directory)
  primary = jax.process_index() == 0
  try:
    first_checksummed = primary and _checksums_since(directory) is None  # before the first checksummed step exists
  except _SinceUnreadable:  # kept as found: a step without checksums stays untrusted (verify_checksums)
    first_checksummed = False
  if first_checksummed:
    _write_json(os.path.join(os.path.dirname(directory), CHECKSUMS_SINCE_FILE), {"step": step})
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      data=ocp.args.JsonSave(data_state)), force=True)
  manager.wait_until_finished()
  if primary:
    write_checksums(os.path.join(directory, str(step)))


def _record_in_summary(workdir: str, key: str, entries: list[dict]) -> None:
  """Append ``entries`` to ``summary.json[key]`` (process 0; only when a summary exists)."""
  if jax.process_index() == 0:
    rundir.append_to_summary(workdir, key, entries)


def restore_checkpoint(workdir: str, keep: int, params, opt_state, *, report: dict | None = None,
                       set_aside: bool = True):
  """Open the run's checkpoints and restore the newest sound one, onto the shardings of ``params``
  and ``opt_state`` (the current mesh, whatever mesh wrote the checkpoint).

  Each step's checksums are verified before orbax reads it. A checkpoint that fails them, or that
  orbax cannot read (truncated or corrupt), is moved, with a warning, to
  ``workdir/corrupt_checkpoints/STEP-TIME`` — kept for inspection, out of orbax's way — and the next
  older one is tried; ``summary.json["corrupt_checkpoints"]`` says so (step, reason, where it went).
  When every checkpoint is unreadable they all stay in place and :class:`RunDirectoryError` is raised
  — unless every one of them was merely cut before its checksums were committed: those are set aside
  and the run starts afresh. ``report`` (a dict) receives ``"corrupt_checkpoints"`` (that list) and
  ``"restored_checkpoint"`` (``{"step", "verified"}``). ``set_aside=False`` (a reader while a trainer
  holds the run, whose newest step may be between orbax's commit and its checksums) falls back the
  same way but moves nothing and records nothing. Returns ``(manager, restored)`` where
  ``restored`` is ``(step, params, opt_state, data_state)`` or None when there is nothing to resume.
  """
  import shutil

  manager = checkpoint_manager(workdir, keep)
  directory = os.fspath(manager.directory)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  report = {} if report is None else report
  errors: list[tuple[int, str, bool]] = []  # (step, why, merely uncommitted)

  def move_aside(steps) -> list[dict]:
    manager.close()
    aside = os.path.join(workdir, CORRUPT_DIR)
    moved = []
    for bad, why, _ in errors:
      if bad not in steps:
        continue
      target = os.path.join(aside, f"{bad}-{int(time.time())}")
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        shutil.move(os.path.join(directory, str(bad)), target)
      moved.append({"step": bad, "reason": why, "moved_to": target, "detected": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return moved

  for step in sorted(manager.all_steps(), reverse=True):
    verified = True
    try:
      why = verify_checksums(directory, step)
    except _Unverified:
      why, verified = None, False
    except OSError as e:
      why = f"checksums could not be computed ({type(e).__name__}: {e})"
    if why is not None:
      errors.append((step, why, why.startswith(f"no {CHECKSUM_FILE}")))
      continue
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract(params)), opt_state=ocp.args.StandardRestore(abstract(opt_state)),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for truncated / corrupt files
      errors.append((step, f"{type(e).__name__}: {str(e)[:200]}", False))
      continue
    if not verified:
      warnings.warn(f"restored step {step} of {directory} unverified: it was saved before checkpoints carried "
                    f"checksums (no {CHECKSUM_FILE})")
    if errors and not set_aside:
      warnings.warn(f"restored step {step}; newer checkpoints failed verification or could not be read (left in "
                    "place: the run is being trained): " + "; ".join(f"step {bad}: {why}" for bad, why, _ in errors))
    elif errors:
      moved = move_aside({bad for bad, _, _ in errors if bad > step})
      warnings.warn(f"resumed from step {step}; newer checkpoints failed verification or could not be read and "
                    f"were moved to {os.path.join(workdir, CORRUPT_DIR)}: "
                    + "; ".join(f"step {m['step']}: {m['reason']}" for m in moved))
      report["corrupt_checkpoints"] = moved
      _record_in_summary(workdir, "corrupt_checkpoints", moved)
      manager = checkpoint_manager(workdir, keep)
    report["restored_checkpoint"] = {"step": step, "verified": verified}
    return manager, (step, restored["params"], restored["opt_state"], restored["data"])
  if errors and all(uncommitted for _, _, uncommitted in errors) and set_aside:
    moved = move_aside({bad for bad, _, _ in errors})
    warnings.warn(f"no committed checkpoint in {directory}; starting afresh. Set aside to "
                  f"{os.path.join(workdir, CORRUPT_DIR)}: "
                  + "; ".join(f"step {m['step']}: {m['reason']}" for m in moved))
    report["corrupt_checkpoints"] = moved
    _record_in_summary(workdir, "corrupt_checkpoints", moved)
    return checkpoint_manager(workdir, keep), None
  if errors:
    manager.close()
    raise RunDirectoryError(f"no checkpoint in {directory} could be read and verified (all kept on disk):\n"
                            + "\n".join(f"step {bad}: {why}" for bad, why, _ in errors))
  return manager, None


# ----------------------------------------------------------------------------- the loop

class _StopRequest:
  """SIGTERM / first Ctrl-C ask the loop to checkpoint and stop at the next step boundary."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: the caller handles signals
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class RunBusyError(RunDirectoryError):
  """Another process (or thread) trains this run directory now."""


# How long a trainer waits for the run's lock: covers a ``launch status`` probing it at that instant.
LOCK_WAIT_S = 2.0


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Train (or resume) the run in ``workdir``; returns the summary written to ``summary.json``.

  ``stop_after_steps``: stop (as if interrupted, with a checkpoint) after that many steps of this
  call — for tests and for time-sliced schedulers.

  One writer per run directory: process 0 holds the run's lock (``WORKDIR/.lock``,
  ``hybrids.rundir.run_lock``, which the launcher takes too) from before ``config.json`` is checked
  until ``summary.json`` is final; a second trainer is refused (:class:`RunBusyError`, naming the
  holder). A run whose summary says "done" is not touched again: this returns that summary and says so.
  """
  config = resolve(config)  # every config error surfaces here, before any compile or write
  # data.document_boundaries (optional field): refused unless every mixer takes segments
  check_kernels_run_here(config, segments=document_eod(config) is not None)
  # checked, not compiled
  mesh = sharding_lib.make_mesh(sharding_lib.mesh_config_of(config), batch_size=config.train.batch_size)
  primary = jax.process_index() == 0  # writes the run directory's files; every process checkpoints
  with contextlib.ExitStack() as held:
    busy = None
    if primary:
      try:
        held.enter_context(rundir.run_lock(workdir, wait_s=LOCK_WAIT_S))
      except rundir.RunBusy as e:
        busy = e
    free = busy is None
    if jax.process_count() > 1:  # every process learns whether process 0 got the lock
      from jax.experimental import multihost_utils
      free = bool(multihost_utils.broadcast_one_to_all(np.int32(free)))
    if not free:
      raise RunBusyError(f"{busy or workdir + ': process 0 could not take the run lock'}; refusing to write "
                         "into it as a second trainer") from None
    rundir.prepare(config, workdir, write=primary)
    finished = _finished_summary(workdir)
    if finished is not None:
      if primary:
        print(f"{os.path.abspath(workdir)} is already done (step {finished.get('step')}/{finished.get('steps')}): "
              f"nothing to train; {SUMMARY_FILE} left as it is", flush=True)
      return finished
    return _train(config, workdir, mesh, stop_after_steps=stop_after_steps, progress=progress)


def group_key(config: ml_collections.ConfigDict) -> str:
  """What members of one lockstep group share: the whole resolved config but ``train.lr``."""
  d = resolve(config).to_dict()
  d["train"].pop("lr", None)
  return json.dumps(d, sort_keys=True, default=str)


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
                stop_after_steps: int | None = None, progress: bool = True,
                cell_stop: bool = False) -> list[dict[str, Any]]:
  """Train runs that differ only in ``train.lr`` together, in lockstep; their summaries, in order.

  A small model leaves most of a GPU idle, and a learning-rate sweep trains the same model on the same
  batches G times: here one process builds it once and steps every member at once (``jax.vmap`` over
  their parameters and optimizer states, :func:`group_steps`). Each member is its own run in every
  other way: its run directory, lock, ``config.json``, checkpoints, metrics, evals, early stop and
  summary are the ones it would have alone, so a member resumes alone or in another group. What
  differs from training alone is the rounding of the learning rate's product (tests compare the two).
  Members already done are left as they are; the rest must resume from the same step (:class:`RunDirectoryError`
  names them otherwise). One device per group: a mesh of several devices is refused.

  ``cell_stop``: the members are one cell's learning rates, and the cell is decided once one of them
  passes ``train.stop_at_accuracy`` (Zoology plots the best learning rate of a cell, and every run
  stops there): at that eval the other members stop too, on a checkpoint, "done" with an
  ``early_stop`` that names the member that decided (``cell_decided_by``). Without it a member that
  stops stays frozen in the stacked step, which costs as much as training it, until the last one stops.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError(f"train_group: {len(configs)} configs for {len(workdirs)} run directories")
  configs = [resolve(c) for c in configs]
  key = group_key(configs[0])
  for c, w in zip(configs[1:], workdirs[1:]):
    if group_key(c) != key:
      raise config_lib.ConfigError(f"train_group: {w} differs from {workdirs[0]} in more than train.lr; a lockstep "
                                   "group shares everything else (model, data, seed, schedule)")
  if len({os.path.abspath(w) for w in workdirs}) != len(workdirs):
    raise ValueError("train_group: a run directory is named twice")
  config = configs[0]
  if cell_stop and not config.train.stop_at_accuracy:
    raise config_lib.ConfigError("train_group(cell_stop=True) needs train.stop_at_accuracy > 0: a cell is decided "
                                 "when one member's eval accuracy passes it (e.g. 0.99, Zoology's); it is "
                                 f"{config.train.stop_at_accuracy}")
  if data_lib.get_field(config.data, "name", "") == "text":
    raise config_lib.ConfigError("train_group: data.name='text' tokenizes into each run directory (tokenizer.json, "
                                 "token caches), and a group reads one pipeline; valid in a group: data.name "
                                 "'mqar' or 'shards' (a prepared corpus), or train these runs one by one")
  check_kernels_run_here(config, segments=document_eod(config) is not None)
  mesh = sharding_lib.make_mesh(sharding_lib.mesh_config_of(config), batch_size=config.train.batch_size)
  if mesh.devices.size != 1 or jax.process_count() != 1:
    raise config_lib.ConfigError(f"train_group: one device per group (this mesh has {mesh.devices.size} devices "
                                 f"over {jax.process_count()} processes); train larger runs one by one")
  summaries: list[dict | None] = [None] * len(configs)
  with contextlib.ExitStack() as held:
    for w in workdirs:
      try:
        held.enter_context(rundir.run_lock(w, wait_s=LOCK_WAIT_S))
      except rundir.RunBusy as e:
        raise RunBusyError(f"{e}; refusing to write into it as a second trainer") from None
    todo = []
    for i, (c, w) in enumerate(zip(configs, workdirs)):
      rundir.prepare(c, w, write=True)
      finished = _finished_summary(w)
      if finished is not None:
        print(f"{os.path.abspath(w)} is already done (step {finished.get('step')}/{finished.get('steps')}): "
              f"nothing to train; {SUMMARY_FILE} left as it is", flush=True)
        summaries[i] = finished
      else:
        todo.append(i)
    if todo:
      use_compilation_cache(config.runtime.get("compilation_cache_dir", ""))
      setup = build(configs[todo[0]], mesh)
      runs = []
      try:
        for i in todo:
          runs.append(_Run(configs[i], workdirs[i], setup, mesh))
        starts = {(r.start_step, json.dumps(r.data_state, sort_keys=True, default=str)) for r in runs}
        if len(starts) > 1:
          raise RunDirectoryError("train_group: the members resume from different steps ("
                                  + ", ".join(f"{r.workdir}: {r.start_step}" for r in runs)
                                  + "); train them in groups that resume together, or one by one")
      except BaseException:  # nothing of any member was written yet
        for r in runs:
          r.release()
        raise
      for i, summary in zip(todo, _loop(runs, setup, stop_after_steps=stop_after_steps, progress=progress,
                                        group=True, cell_stop=cell_stop)):
        summaries[i] = summary
  return summaries


def check_kernels_run_here(config: ml_collections.ConfigDict, *, segments: bool) -> None:
  """One line (ConfigError) before anything is compiled or written if a kernel the model asks for by
  name cannot run on this platform. ``resolve`` checks the names wherever it runs (a launcher's host
  may have no GPU); this checks the platform the run trains on: a ``model.*_impl="pallas"`` on a CPU
  (the trainer does not interpret Pallas kernels), cuDNN without a CUDA GPU, a request a kernel family's
  dispatch refuses for the model's shapes. ``segments``: the model gets packed documents."""
  model = config.model
  fields = sorted(f for f in model if f.endswith("_impl"))
  if jax.default_backend() == "cpu":
    for field in fields:
      if model[field] == "pallas":
        raise config_lib.ConfigError(
            f"model.{field}='pallas': Pallas kernels need a GPU or TPU (backend is 'cpu'; training does not "
            "interpret them); valid here: auto, xla, reference")
  try:
    kernels.kernel_choices(model, segments=segments)
  except ValueError as e:
    asked = ", ".join(f"model.{f}={model[f]!r}" for f in fields if model[f] != "auto")
    raise config_lib.ConfigError(f"{asked or 'the kernel choice'}: {e}") from None


def _finished_summary(workdir: str) -> dict | None:
  """The run's summary when it says "done" (the config already matched) and its final checkpoint is
  there and passes its checksums, else None. A done run whose final checkpoint is gone or corrupt is
  trained again from its newest sound checkpoint (bit-identically), which restores that checkpoint."""
  summary = rundir.read_summary(workdir)
  if summary.get("status") != "done":
    return None
  checkpoints = os.path.abspath(os.path.join(workdir, rundir.CHECKPOINTS_DIR))
  final = summary.get("step")
  if not os.path.isdir(os.path.join(checkpoints, str(final))):
    why = "it is missing"
  else:
    try:
      why = verify_checksums(checkpoints, int(final))
    except _Unverified:
      why = None  # saved before checksums existed: taken as it is
    except OSError as e:
      why = f"{type(e).__name__}: {e}"
  if why is None:
    return summary
  warnings.warn(f"{workdir}: {SUMMARY_FILE} says done, but its final checkpoint (step {final}) cannot be used "
                f"({why}); training again from the newest sound checkpoint")
  return None


def _all_finite(tree) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite (one small jitted reduction)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_finite_leaves(leaves)) if leaves else True


@jax.jit
def _finite_leaves(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _scan_layers_record(trainer: Trainer) -> dict[str, Any]:
  """``summary["compile"]``'s ``scan_layers``: whether the forward does scan; where ``runtime.scan_layers``
  asked for a scan the stack cannot take, also ``scan_layers_requested`` and ``scan_layers_fallback`` (why)."""
  model = nnx.merge(trainer.graphdef, trainer.abstract_state)  # abstract: no parameter is touched
  scans = model.scans_layers(trainer.scan_layers)
  if scans == trainer.scan_layers:
    return {"scan_layers": scans}
  return {"scan_layers": scans, "scan_layers_requested": trainer.scan_layers,
          "scan_layers_fallback": model.scan_fallback()}


class _Run:
  """One run directory while it trains: its checkpoints, ``metrics.jsonl``, TensorBoard log and
  ``summary.json``. The loop (:func:`_loop`) drives one of these, or several that train in lockstep
  (:func:`train_group`)."""

  def __init__(self, config, workdir: str, setup: Setup, mesh):
    self.config, self.workdir = config, workdir
    self.primary = jax.process_index() == 0  # writes the run directory's files; every process checkpoints
    t = config.train
    integrity: dict[str, Any] = {}
    self.manager, restored = restore_checkpoint(workdir, t.keep_checkpoints, setup.params, setup.opt_state,
                                                report=integrity)
    self.metrics_path = os.path.join(workdir, rundir.METRICS_FILE)
    self.start_step, self.params, self.opt_state, self.data_state = 0, setup.params, setup.opt_state, None
    if restored is not None:
      self.start_step, self.params, self.opt_state, self.data_state = restored
    self.integrity, self.restored, self.counts, self.mesh = integrity, restored is not None, setup.counts, mesh
    self.started = False
    self.schedule = lr_schedule(t)
    self.status = "running"
    self.step = self.start_step

  def release(self) -> None:
    """Close what restoring opened, for a run that is not started after all (nothing was written)."""
    self.manager.close()

  def start(self, trainer: Trainer) -> None:
    """Write the run's starting state: metrics cut back to the restored step, ``summary.json``
    "running", the TensorBoard writer. Nothing is written before this."""
    config, workdir, t, mesh, integrity = self.config, self.workdir, self.config.train, self.mesh, self.integrity
    if self.primary:  # from scratch too: lines a run killed before its first checkpoint logged are redone
      _truncate_metrics(self.metrics_path, self.start_step)
    batch_size, seq_len = t.batch_size, config.data.seq_len
    packed_documents = document_eod(config) is not None  # the model gets segment_ids: kernels choose for them
    summary: dict[str, Any] = {
        "status": "running", "step": self.start_step, "steps": t.steps, **self.counts,
        "tokens_per_step": batch_size * seq_len, "versions": versions(), "hardware": hardware(mesh),
        # matrices the sharding rules wanted to split on a mesh axis but left whole (sizes do not divide)
        "replicated_params": [dataclasses.asdict(r) for r in
                              sharding_lib.replicated_params(self.params, dict(mesh.shape),
                                                             layer_pattern(config.model))],
        "impl": kernels.resolve_impls(config.model, segments=packed_documents),
        "kernels": kernels.kernel_choices(config.model, segments=packed_documents),  # lowering, and why each other candidate was not taken
        "compile": {**_scan_layers_record(trainer),
                    "cache_dir": jax.config.jax_compilation_cache_dir or "",
                    "xla_options": step_compiler_options(mesh.devices.flat[0].platform) or {}},
    }
    try:  # the report's x-axis (FLOPs) and Based's (state bytes); a gap there must not stop training
      summary.update(flops_lib.summary_fields(config.model, seq_len, tokens=self.start_step * batch_size * seq_len))
    except Exception as e:  # noqa: BLE001
      summary["flops_error"] = f"{type(e).__name__}: {e}"  # the report says its FLOPs are estimated, and why
      warnings.warn(f"FLOP accounting failed ({summary['flops_error']}); summary.json will lack FLOPs")
    previous = rundir.read_summary(workdir, strict=True)  # a summary that cannot be read stops the run here
    if previous:
      # `evals` is written by `python -m hybrids.evaluate` between runs; a resume keeps it.
      summary.update({k: previous[k] for k in ("eval", "evals", "wall_seconds", "early_stop", "corrupt_checkpoints")
                      if k in previous})
    recorded = list(summary.get("corrupt_checkpoints", []))  # restore_checkpoint wrote them when a summary existed
    if integrity.get("corrupt_checkpoints") and integrity["corrupt_checkpoints"][-1] not in recorded:
      summary["corrupt_checkpoints"] = recorded + integrity["corrupt_checkpoints"]
    if "restored_checkpoint" in integrity:
      summary["restored_checkpoint"] = integrity["restored_checkpoint"]
    self.summary = summary
    self.write_summary()
    from tensorboardX import SummaryWriter  # imported late: it pulls in protobuf
    self.writer = SummaryWriter(os.path.join(workdir, rundir.TB_DIR)) if self.primary else None
    self.early = previous_early_stop(workdir, self.start_step) if self.restored else None
    self.last_loss = float("nan")
    self.started = True

  def write_summary(self) -> None:
    if self.primary:
      rundir.write_summary(self.workdir, self.summary)

  def scalar(self, tag: str, value: float, at_step: int) -> None:
    if self.writer is not None:
      self.writer.add_scalar(tag, value, at_step)

  def kept_checkpoint(self) -> str:
    kept = self.manager.latest_step()
    if kept is None:
      return (f"no checkpoint is kept: none was saved before it (train.checkpoint_every="
              f"{self.config.train.checkpoint_every}, started from step {self.start_step})")
    return f"the last checkpoint with finite parameters is kept (step {kept})"

  def log(self, records: list[tuple[int, dict]]) -> None:
    """Write fetched step metrics; :class:`DivergedError` at the first non-finite one."""
    if not records:
      return
    # lr of the update that produced step s (optax counts updates from 0): one evaluation and one
    # host sync for the whole flush, not one per step
    lrs = np.asarray(jax.device_get(self.schedule(jnp.asarray([s - 1 for s, _ in records]))))
    with open(self.metrics_path, "a") if self.primary else contextlib.nullcontext() as f:
      for (s, m), lr in zip(records, lrs):
        record = {"step": s, **{k: float(v) for k, v in m.items()}, "lr": float(lr)}
        bad = sorted((k for k, v in record.items() if not math.isfinite(v)), key=lambda k: (k != "loss", k))
        if bad:
          also = f" (also non-finite: {', '.join(bad[1:])})" if bad[1:] else ""
          finite = "" if "loss" in bad else f" while the loss was finite ({record['loss']:.6g})"
          raise DivergedError(f"non-finite {bad[0]} at step {s}{finite}{also}: {record}; {self.kept_checkpoint()}. "
                              "Lower train.lr or raise train.warmup_steps.")
        if f is not None:
          f.write(json.dumps(record) + "\n")
        for k, v in record.items():
          if k != "step":
            self.scalar(f"train/{k}", v, s)
    self.last_loss = float(records[-1][1]["loss"])

  def record_eval(self, step: int, result: dict[str, float]) -> bool:
    """Write an eval; True when it stops the run early (``train.stop_at_accuracy``)."""
    t = self.config.train
    if self.primary:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps({"step": step, **result}) + "\n")
    for k, v in result.items():
      self.scalar(f"eval/{k.removeprefix('eval_')}", v, step)
    self.summary["eval"] = {"step": step, **result}
    if t.stop_at_accuracy and result["eval_accuracy"] > t.stop_at_accuracy and step < t.steps:
      self.early = {"step": step, "reason": f"eval_accuracy {result['eval_accuracy']:.4f} > "
                                            f"train.stop_at_accuracy={t.stop_at_accuracy}"}
      self.summary["early_stop"] = self.early
      return True
    return False

  def save(self, step: int, params, opt_state, data_state) -> None:
    if not _all_finite((params, opt_state)):  # a checkpoint must never hold what it cannot resume from
      raise DivergedError(f"non-finite parameters or optimizer state after step {step} (its loss and "
                          f"gradient norm were finite); not saved; {self.kept_checkpoint()}. "
                          "Lower train.lr or raise train.warmup_steps.")
    save_checkpoint(self.manager, step, params, opt_state, data_state)

  def close(self, timing: dict[str, float], timed_tokens: int, timed_seconds: float, wall_seconds: float) -> dict:
    """Final summary (status, step, rates, time split), written; the writer and checkpoints closed. A
    run never started writes nothing (its files stay as they were)."""
    if not self.started:
      self.release()
      return rundir.read_summary(self.workdir)
    t = self.config.train
    if self.writer is not None:
      self.writer.close()
    self.manager.close()
    tokens = self.step * t.batch_size * self.config.data.seq_len
    self.summary.update({
        "status": self.status, "step": self.step, "tokens": tokens,
        "tokens_per_sec": timed_tokens / timed_seconds if timed_seconds else None,
        "train_loss": self.last_loss if math.isfinite(self.last_loss) else None,
        "wall_seconds": self.summary.get("wall_seconds", 0.0) + wall_seconds,
        "time_split": {**{k: round(v, 3) for k, v in timing.items()},
                       "steps_s": round(max(0.0, wall_seconds - sum(timing.values())), 3)},
    })
    if "flops_per_token_train" in self.summary:
      self.summary["train_flops"] = self.summary["flops_per_token_train"] * tokens
    self.write_summary()
    return self.summary


def _decided_by_cell(runs: list[_Run], active: list[bool], results: list[dict], step: int) -> list[int]:
  """The members that stop at ``step`` because another passed ``train.stop_at_accuracy`` at this eval
  (``train_group(cell_stop=True)``); their ``early_stop`` names it. The best of the deciders decides."""
  deciders = [i for i, run in enumerate(runs) if active[i] and run.early is not None and run.early["step"] == step]
  if not deciders:
    return []
  by = max(deciders, key=lambda i: results[i]["eval_accuracy"])
  name = os.path.basename(os.path.abspath(runs[by].workdir))
  stopped = []
  for i, run in enumerate(runs):
    if active[i] and run.early is None:
      run.early = {"step": step, "cell_decided_by": name,
                   "reason": f"cell decided: {name} (lr {runs[by].config.train.lr:.3g}) reached eval_accuracy "
                             f"{results[by]['eval_accuracy']:.4f} > train.stop_at_accuracy="
                             f"{run.config.train.stop_at_accuracy}; this run's eval_accuracy "
                             f"{results[i]['eval_accuracy']:.4f}"}
      run.summary["early_stop"] = run.early
      stopped.append(i)
  return stopped


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _member(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def _train(config, workdir: str, mesh, *, stop_after_steps: int | None, progress: bool) -> dict[str, Any]:
  """The loop of :func:`train`, run under the run's lock on a resolved config and a checked mesh."""
  use_compilation_cache(config.runtime.get("compilation_cache_dir", ""))
  setup = build(config, mesh)
  return _loop([_Run(config, workdir, setup, mesh)], setup, stop_after_steps=stop_after_steps, progress=progress)[0]


def _loop(runs: list[_Run], setup: Setup, *, stop_after_steps: int | None, progress: bool,
          group: bool = False, cell_stop: bool = False) -> list[dict[str, Any]]:
  """Train ``runs`` (restored, not yet started) to their ends; their summaries. One run, or with
  ``group`` a lockstep group (:func:`train_group`, even of one member).

  A group shares the batches, the step count and the schedule's shape; each member keeps its own
  parameters, optimizer state, learning rate, early stop, divergence and files. A member that stops
  (early, or diverged) stays in the stacked step, frozen, its summary final, until all have stopped;
  a member's failure never raises (the lone run's does). ``cell_stop``: see :func:`train_group`.
  """
  config = runs[0].config
  t = config.train
  batch_size, seq_len = t.batch_size, config.data.seq_len
  stacked = len(runs) > 1
  start_step = runs[0].start_step
  try:  # the data first: a pipeline that fails leaves every run's files as they were
    dataset = data_lib.train_dataset(config.data, seq_len=seq_len, batch_size=batch_size, seed=config.seed,
                                     workdir=runs[0].workdir, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    iterator = data_lib.make_iterator(dataset)
    if runs[0].data_state is not None:
      iterator.set_state(runs[0].data_state)
    eval_data = [sharding_lib.place_global_batch(b, setup.batch_sharding) for b in
                 data_lib.eval_batches(config.data, seq_len=seq_len, batch_size=batch_size, workdir=runs[0].workdir,
                                       num_batches=t.eval_batches)]
  except BaseException:
    for run in runs:
      run.release()
    raise
  try:
    for run in runs:
      run.start(setup.trainer)
  except BaseException as e:
    for run in runs:
      if run.started:
        run.status, run.summary["error"] = "failed", f"{type(e).__name__}: {e}"
        run.close({}, 0, 0.0, 0.0)
      else:
        run.release()
    raise
  if stacked:
    members = [os.path.basename(os.path.abspath(r.workdir)) for r in runs]
    for run in runs:  # provenance: these runs stepped together (train_group)
      run.summary["lockstep_group"] = members
  active = [r.early is None for r in runs]  # members still training
  for run in runs:
    if run.early is not None:  # resumed at its early stop: nothing left to train
      run.status = "done"
  params = opt_state = lrs = group_step = group_eval = None

  from tqdm.auto import tqdm

  step = start_step
  pending: list[tuple[int, Any, list[bool]]] = []  # (step, its metrics on the device, which members it trained)
  timed_tokens, timed_seconds = 0, 0.0
  tick = None  # time of the last flushed step, once the first (compiling) step is done

  closed = [False] * len(runs)

  def close(i: int) -> None:
    """Member ``i``'s final summary, written when it stops (a group's others may train on for long)."""
    if not closed[i]:
      closed[i] = True
      runs[i].close(timing, timed_tokens, timed_seconds, time.perf_counter() - wall_start)

  def fail(i: int, e: BaseException, status: str) -> None:
    """Member ``i`` of a group stops with ``status``; the others go on (a lone run re-raises)."""
    if not group:
      raise e
    runs[i].status, active[i] = status, False
    runs[i].summary["error"] = str(e)
    print(f"error: {runs[i].workdir}: {e}", file=sys.stderr, flush=True)
    close(i)

  def save(which: list[bool]) -> None:
    """Checkpoint the members ``which`` marks at ``step``; one whose state is not finite is diverged."""
    if not any(which):
      return
    clock = time.perf_counter()
    data_state = iterator.get_state()
    for i, run in enumerate(runs):
      if not which[i]:
        continue
      try:
        if stacked:
          run.save(step, _member(params, i), _member(opt_state, i), data_state)
        else:
          run.save(step, params, opt_state, data_state)
      except DivergedError as e:
        fail(i, e, "diverged")
    timing["checkpoint_s"] += time.perf_counter() - clock

  def flush() -> None:
    """One host sync for all steps since the last flush: log, check finiteness."""
    nonlocal tick, timed_tokens, timed_seconds
    if not pending:
      return
    fetched = jax.device_get([m for _, m, _ in pending])
    now = time.perf_counter()
    if tick is not None:
      timed_tokens += len(pending) * batch_size * seq_len
      timed_seconds += now - tick
    tick = now
    for i, run in enumerate(runs):
      mine = [(s, m if not stacked else {k: v[i] for k, v in m.items()})
              for (s, _, live), m in zip(pending, fetched) if live[i]]
      try:
        run.log(mine)
      except DivergedError as e:
        fail(i, e, "diverged")
    pending.clear()

  bar = tqdm(total=t.steps, initial=start_step, disable=not (progress and runs[0].primary), dynamic_ncols=True,
             unit="step", desc=os.path.basename(os.path.abspath(runs[0].workdir)) + (f" +{len(runs) - 1}" if stacked else ""))
  wall_start = time.perf_counter()
  # Where the wall time goes: the first step (compile), waiting for batches on the host, evals, saves;
  # the rest is the device running the steps (dispatch is asynchronous, so it shows up at the syncs).
  timing = {"first_step_s": 0.0, "data_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}
  interrupted = False
  active_flags = placed_flags = None  # a group's active members, and that mask on the device
  try:
    if stacked:  # inside the try: a group that cannot be stacked (memory) ends every member "failed"
      params, opt_state = _stack([r.params for r in runs]), _stack([r.opt_state for r in runs])
      lrs = jnp.asarray([r.config.train.lr for r in runs], jnp.float32)
      group_step, group_eval = group_steps(setup.trainer, config)
      for run in runs:  # the stacked copy is the state now: the members' own copies go
        run.params = run.opt_state = None
      setup.params = setup.opt_state = None
    else:
      params, opt_state = runs[0].params, runs[0].opt_state
    with _StopRequest() as stop:
      while step < t.steps and any(active):
        clock = time.perf_counter()
        batch = sharding_lib.shard_batch(next(iterator), setup.batch_sharding)
        timing["data_s"] += time.perf_counter() - clock
        window = window_for_step(t, step + 1, config.seed)
        if stacked:
          if active_flags is None or list(active_flags) != active:
            active_flags = np.asarray(active)
            placed_flags = jnp.asarray(active_flags)
          run_step = lambda p, o, b, w: group_step(p, o, b, lrs, placed_flags, w)
        else:
          run_step = setup.train_step
        if step == start_step:
          clock = time.perf_counter()
          # The step's one trace makes each kernel call's choice at its own shapes and dtypes, which may
          # differ from the model-wide `kernels` (a wider head, float32 inputs): kept beside them.
          with kernels.dispatch.recording() as kernel_calls:
            params, opt_state, metrics = run_step(params, opt_state, batch, window)
          for run in runs:
            run.summary["kernels_per_call"] = kernel_calls
          jax.block_until_ready(metrics)
          timing["first_step_s"] = time.perf_counter() - clock
        else:
          params, opt_state, metrics = run_step(params, opt_state, batch, window)
        step += 1
        for i, run in enumerate(runs):
          if active[i]:
            run.step = step
        if t.window_choices:
          metrics["window"] = (jnp.full((len(runs),), window or config.model.window) if stacked
                               else window or config.model.window)
        pending.append((step, metrics, list(active)))
        stopping = stop.signum is not None or (stop_after_steps is not None and step - start_step >= stop_after_steps)
        is_eval = step == t.steps or (t.eval_every and step % t.eval_every == 0)
        is_ckpt = step == t.steps or step % t.checkpoint_every == 0 or stopping
        if step % t.log_every == 0 or is_eval or is_ckpt or tick is None:
          flush()
          tokens_per_sec = timed_tokens / timed_seconds if timed_seconds else float("nan")
          losses = [r.last_loss for r, a in zip(runs, active) if a] or [float("nan")]
          bar.set_postfix(loss=f"{min(losses):.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        bar.update(1)
        saving = [is_ckpt and a for a in active]
        if is_eval:
          clock = time.perf_counter()
          if stacked:
            results = evaluate(setup.trainer, group_eval, params, eval_data, members=len(runs))
          else:
            results = [evaluate(setup.trainer, setup.eval_step, params, eval_data)]
          timing["eval_s"] += time.perf_counter() - clock
          for i, (run, result) in enumerate(zip(runs, results)):
            if active[i] and run.record_eval(step, result):
              saving[i] = True  # an early stop ends on a checkpoint
        save(saving)
        if cell_stop and is_eval:  # after the deciders' saves: one whose save failed decides nothing
          stopped = _decided_by_cell(runs, active, results, step)
          save([i in stopped for i in range(len(runs))])
        for i, run in enumerate(runs):
          if active[i] and run.early is not None:
            run.status, active[i] = "done", False
            if group:
              close(i)
        if (is_eval or any(saving)) and tick is not None:
          tick = time.perf_counter()  # tokens/s measures training steps, not evals or saves
        if stopping and step < t.steps and any(active):
          interrupted = True
          break
      for i, run in enumerate(runs):
        if active[i]:
          run.status = "interrupted" if interrupted else "done"
  except DivergedError as e:  # a lone run's (a group's members are failed one by one above)
    runs[0].status = "diverged"
    runs[0].summary["error"] = str(e)
    raise
  except KeyboardInterrupt:
    for i, run in enumerate(runs):
      if not closed[i] and (active[i] or run.status == "running"):
        run.status = "interrupted"
        run.summary["error"] = "killed by a second Ctrl-C before a checkpoint; resumes from the previous one"
    raise
  except BaseException as e:
    for i, run in enumerate(runs):
      if not closed[i] and (active[i] or run.status == "running"):
        run.status = "failed"
        run.summary["error"] = f"{type(e).__name__}: {e}"
    raise
  finally:
    bar.close()
    for i in range(len(runs)):
      close(i)
  return [run.summary for run in runs]


# ----------------------------------------------------------------------------- command line

def main(argv, overrides: dict[str, str] | None = None) -> None:
  """``python -m hybrids.train``: a user mistake is one ``error:`` line and exit status 2, never a traceback."""
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  workdir = flags.FLAGS.workdir
  try:
    if len(argv) > 1:
      raise config_lib.ConfigError(f"unexpected argument(s) {' '.join(argv[1:])!r}; fields are set with "
                                   "--config.FIELD=VALUE (e.g. --config.model.window=32)")
    spec = flags.FLAGS.config
    if not spec or not workdir:
      missing = " and ".join(f for f, v in (("--config", spec), ("--workdir", workdir)) if not v)
      raise config_lib.ConfigError(f"{missing} required, e.g. --config experiments/quickstart.py:tiny "
                                   "--workdir /tmp/run (see --help)")
    if isinstance(spec, ml_collections.ConfigDict):  # already loaded (a caller's own config flag)
      config = config_lib.apply_overrides(spec, overrides or {})
    else:
      try:
        config = config_lib.get_config(spec, overrides)
      except config_lib.ConfigError:
        raise
      except ValueError as e:  # an experiment's get_config refusing its argument
        raise config_lib.ConfigError(f"--config={spec}: {e}") from None
    sharding_lib.initialize_distributed()  # a no-op unless SLURM / TPU pod / HYBRIDS_* say otherwise
    summary = train(config, workdir)
  except (config_lib.ConfigError, RunDirectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except DivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  ev = summary.get("eval", {})
  print(f"{summary['status']}: step {summary['step']}/{summary['steps']}, train loss {summary['train_loss']}, "
        f"eval loss {ev.get('eval_loss')}, eval accuracy {ev.get('eval_accuracy')} → {os.path.abspath(workdir)}")
  if summary["status"] == "interrupted":
    sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
  import functools

  from absl import app, flags

  def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag as one ``error:`` line and exit status 2."""
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"error: {e} (see --help)", file=sys.stderr)
      sys.exit(2)

  # --config is parsed here rather than by ml_collections' config flags, whose unknown-field and
  # bad-variant errors are flag-parsing tracebacks: config.get_config / apply_overrides give one line.
  flags.DEFINE_string(
      "config", None, "Experiment file and optional argument, e.g. experiments/quickstart.py:rglru. "
      "Override any field with --config.FIELD=VALUE (e.g. --config.model.window=32); an unknown field "
      "or a bad value is one error line naming the field, exit status 2.")
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds the same config).")
  try:
    _argv, _overrides = config_lib.split_overrides(sys.argv)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(functools.partial(main, overrides=_overrides), argv=_argv, flags_parser=_parse_flags)
