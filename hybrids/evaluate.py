"""Evaluate a trained run from its checkpoint: held-out loss, loss by position, MQAR, long-context retrieval.

Usage:

    python -m hybrids.evaluate --workdir RUN --eval retrieval --lengths 1024,4096,16384
    python -m hybrids.evaluate --workdir RUN --eval loss,position --lengths 2048,8192,16384
    python -m hybrids.evaluate --workdir RUN --eval mqar --lengths 64,128,256 --kv-pairs 4,8,16
    python -m hybrids.evaluate --help

The parameters of the newest readable checkpoint in ``RUN/checkpoints`` are restored (through
``hybrids.train.restore_checkpoint``: each checkpoint's sha256 checksums are verified first; an unreadable
or mismatching latest checkpoint falls back to the previous one and
is moved to ``RUN/corrupt_checkpoints/``, as a resumed training run would do). Every request is checked against the run's ``config.json`` before
anything is restored or compiled: an unknown eval, a length the task cannot use or a missing run
directory is one clear error (exit status 2).

Evals (``--eval``, a comma list of ``EVALS``):

* ``loss``: mean next-token loss, perplexity and accuracy on held-out sequences of each length
  (default: the training ``data.seq_len``; the run's own held-out split: text windows, or MQAR's eval
  stream). At the training length it equals the training loop's final eval at the same step: scored as
  the trainer scores (``hybrids.train.Trainer``), so with ``data.document_boundaries`` (text and shards
  runs, on by default) each packed document of a row runs as if alone and the label right after an
  end-of-document token (the next document's first token) is not scored.
* ``position``: mean loss at each position over held-out sequences of each length (default ``T`` and
  ``4T``, ``T`` = training ``data.seq_len``): does the loss keep falling past the SWA window and past the
  training length? (SWA and recurrent mixers can extrapolate; global attention with RoPE may not — we
  measure.) Positions without scored labels (most of an MQAR sequence) are ``null``. Scored as ``loss``
  is: with packed documents kept apart, a position is the row's, not a document's.
* ``mqar``: Zoology's MQAR accuracy (fraction of queried values predicted) at every
  ``--lengths`` × ``--kv-pairs`` point (defaults: ``T`` and the training ``num_kv_pairs``); points where
  ``4·K > L`` are skipped and listed. Only for runs trained on MQAR (``data.name = "mqar"``).
* ``retrieval``: accuracy on a grid ``--lengths`` × ``--depths`` (defaults ``T, 2T, 4T, 8T`` and
  ``0, 0.25, 0.5, 0.75, 1``) with ``--samples`` probes per cell, for each of ``--tasks``
  (:mod:`hybrids.data.retrieval`): ``passkey`` and ``niah`` for text runs (filler: the corpus's held-out
  split, its end-of-document tokens dropped when the run kept documents apart, so a probe is one
  document; or the built-in filler when the corpus is no longer readable), ``mqar`` for MQAR runs (their
  vocabulary is not text, so retrieval means the key→value block at a depth of a long sequence of
  filler tokens, queried at the end).

Faces and memory (``--face``): ``parallel`` (default) scores a batch with one forward pass; it holds
``[batch, L, vocab]`` f32 logits and the activations of one layer at a time — and, for global
attention on the XLA path, ``[batch, heads, L, L]`` scores, which is what stops fitting first at long
``L``. ``recurrent`` runs the mixers' decode step token by token in one compiled ``lax.scan``: memory is
the decode state (constant in ``L`` for every mixer but global attention, whose cache holds ``L`` keys
and values), much slower. Both compute the same function (tests/test_model.py, tests/test_evaluate.py). One
decode state per row cannot keep packed documents apart, so ``recurrent`` is refused for ``loss`` and
``position`` on runs with ``data.document_boundaries`` on (their retrieval probes are one document each). The batch
size defaults to the training batch's token count divided by ``L`` (``--batch-size`` overrides).
``--window W`` evaluates with another SWA band (SWAX trains with sampled windows).

Output (read by ``python -m launch report``): ``RUN/eval/<eval>.json`` per eval, all with
``{"eval", "step" (checkpoint step), "created" (UTC ISO time), "face", "window" (SWA band used, or
null), "train_seq_len", "seed", "batch_size": {"<L>": int}}`` and:

* ``loss.json``: ``{"lengths": [L…], "loss": [f…], "perplexity": [f…], "accuracy": [f…],
  "tokens": [int…]}`` (lists parallel to ``lengths``);
* ``position.json``: ``{"lengths": [L…], "loss_by_position": {"<L>": [f | null] * L},
  "sequences": {"<L>": int}, "window": W, "train_seq_len": T}``;
* ``mqar.json``: ``{"lengths": [L…], "num_kv_pairs": [K…], "accuracy": [f…], "loss": [f…],
  "examples": int, "skipped": [[L, K]…]}`` (one entry per evaluated point; lists parallel);
* ``retrieval.json``: ``{"task": first task, "lengths": [L…], "depths": [d…],
  "accuracy": [[f] * len(depths)] * len(lengths)`` (of the first task),
  ``"by_task": {"<task>": [[f…]…]}, "samples": int, "filler": "heldout" | "builtin" | "random tokens",
  "tokenizer": str | null, "num_kv_pairs": K | null}``.

``RUN/summary.json`` gets (re-read just before an atomic rewrite; other keys are never touched)
``"evals": {"<eval>": compact}`` with ``compact`` = ``{"step", "lengths", …}``: loss: ``"loss"``,
``"perplexity"``, ``"accuracy"`` (``{"<L>": f}``); position: ``"mean_loss"`` and ``"tail_loss"`` (mean
over the last eighth of the positions; ``{"<L>": f}``) and ``"window"``; mqar: ``"accuracy"`` (mean over points) and
``"by_point"`` (``{"L<L>_kv<K>": f}``); retrieval: ``"task"``, ``"accuracy"`` (mean over the grid),
``"by_length"`` (``{"<L>": mean over depths}``, first task) and ``"by_task"`` (``{"<task>": mean}``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from hybrids import config as config_lib
from hybrids import data as data_lib
from hybrids import rundir
from hybrids import train as train_lib
from hybrids.data import retrieval
from hybrids.data import shards as data_shards
from hybrids.data import text as data_text
from hybrids.data.pipeline import IGNORE_LABEL, finite_batches
from hybrids.model import HybridLM, layer_pattern

EVALS = ("loss", "position", "mqar", "retrieval")
# The evals that score the run's held-out rows: on text and shards, packed documents (the others build
# their own one-document rows).
PACKED_EVALS = ("loss", "position")
FACES = ("parallel", "recurrent")
EVAL_DIR = rundir.EVAL_DIR
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Default lengths per eval, in multiples of the training length.
DEFAULT_LENGTHS = {"loss": (1,), "position": (1, 4), "mqar": (1,), "retrieval": (1, 2, 4, 8)}


class EvalError(ValueError):
  """A request that cannot run on this run directory; the message names the flag and the valid choices."""


# ----------------------------------------------------------------------------- request checking

def _csv(text: str | None, flag: str, cast) -> list | None:
  if text is None:
    return None
  try:
    values = [cast(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise EvalError(f"{flag}={text!r}: expected a comma-separated list of {cast.__name__}s") from None
  if not values:
    raise EvalError(f"{flag}={text!r} is empty")
  return values


def parse_evals(text: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in EVALS]
  if unknown or not names:
    raise EvalError(f"--eval={text!r}: unknown eval {', '.join(map(repr, unknown)) or '(none given)'}; "
                    f"valid: {', '.join(EVALS)}")
  return list(dict.fromkeys(names))


def load_config(run_dir: str) -> ml_collections.ConfigDict:
  """The resolved config of a run directory; EvalError when the directory or its config is unusable."""
  if not os.path.isdir(run_dir):
    raise EvalError(f"--workdir={run_dir!r} does not exist or is not a directory")
  path = os.path.join(run_dir, rundir.CONFIG_FILE)
  if not os.path.isfile(path):
    raise EvalError(f"--workdir={run_dir!r} is not a run directory: it has no {rundir.CONFIG_FILE}")
  try:
    with open(path) as f:
      stored = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise EvalError(f"{path} is not valid JSON ({e})") from None
  return config_lib.with_model_defaults(ml_collections.ConfigDict(stored))


def _is_mqar(config) -> bool:
  return config.data.name == "mqar"


def _has_swa(config) -> bool:
  """Whether a layer attends within a window (the ``swa`` mixer, or any mixer declaring ``window``)."""
  from hybrids.blocks import mixer_names
  from hybrids.mixers import MIXERS
  from hybrids.mixers.contract import windowed
  return any(windowed(MIXERS[name]) for entry in layer_pattern(config.model) for name in mixer_names(entry))


def _tokenizer(config, run_dir: str) -> retrieval.Tokenizer:
  """The run's tokenizer: ``data.tokenizer`` (text runs; a BPE's ``tokenizer.json`` is in the run directory),
  or the one a shards run's prepared data names in its manifest (``data.path``, local or ``gs://…``).

  A shards run's ``data.tokenizer`` is only the text dataset's default, never what its shards were
  tokenized with: when the manifest cannot be read, EvalError says so rather than falling back to it.
  """
  if config.data.name == "shards":
    return _shards_tokenizer(config.data.get("path", ""))
  try:
    return retrieval.load_tokenizer(config.data.get("tokenizer", "bytes"), [run_dir])
  except ValueError as e:
    raise EvalError(f"the run's tokenizer cannot be loaded: {e}") from None


def _shards_tokenizer(data_path: str) -> retrieval.Tokenizer:
  """The tokenizer named by the manifest of the prepared directory ``data_path`` (its ``tokenizer.json`` beside it)."""
  try:
    manifest = data_shards.read_manifest(data_path)
  except ValueError as e:
    raise EvalError(f"a shards run's tokenizer is the one its manifest names, which cannot be read: {e}") from None
  spec = manifest.get("tokenizer")
  if not isinstance(spec, str) or not spec.startswith("bpe:"):
    try:
      return retrieval.load_tokenizer(spec, [])
    except ValueError as e:
      raise EvalError(f"data.path={data_path!r}: the manifest's tokenizer is unusable here: {e}") from None
  source = epath.Path(data_path) / manifest.get("tokenizer_file", data_text.TOKENIZER_FILE)
  if not source.exists():
    raise EvalError(f"data.path={data_path!r}: its manifest names tokenizer {spec!r}, but {source} is missing")
  return retrieval.HFTokenizer(str(source), text=source.read_text())  # local or gs://


def _document_eod(config) -> int | None:
  """The trainer's end-of-document token (:func:`hybrids.train.document_eod`; None: rows are one document)."""
  try:
    return train_lib.document_eod(config)
  except ValueError as e:  # a ConfigError naming its field, or a shards manifest that cannot be read
    raise EvalError(str(e)) from None


def plan(args, config, run_dir: str) -> dict[str, Any]:
  """Check the whole request against the run's config (cheap: nothing is restored); fill defaults."""
  evals = parse_evals(args.eval)
  seq_len = int(config.data.seq_len)
  lengths = _csv(args.lengths, "--lengths", int)
  if lengths is not None and any(n < 2 for n in lengths):
    raise EvalError(f"--lengths={args.lengths!r}: every length must be an integer ≥ 2")
  depths = _csv(args.depths, "--depths", float) or list(DEFAULT_DEPTHS)
  if any(not 0.0 <= d <= 1.0 for d in depths):
    raise EvalError(f"--depths={args.depths!r}: every depth must be in [0, 1]")
  kv_pairs = _csv(args.kv_pairs, "--kv-pairs", int)
  if args.face not in FACES:
    raise EvalError(f"--face={args.face!r}; valid: {', '.join(FACES)}")
  for flag, value in (("--samples", args.samples), ("--batches", args.batches), ("--batch-size", args.batch_size),
                      ("--window", args.window)):
    if value is not None and value < 1:
      raise EvalError(f"{flag}={value} must be a positive integer")
  if args.window is not None and not _has_swa(config):
    raise EvalError(f"--window={args.window}: the model has no windowed layer (model.pattern={list(config.model.pattern)})")
  mqar_run = _is_mqar(config)
  if mqar_run:
    kv_pairs = kv_pairs or [int(config.data.num_kv_pairs)]
  elif kv_pairs is not None:
    raise EvalError("--kv-pairs applies to runs trained on MQAR only (this run has data.name="
                    f"{config.data.name!r})")
  tasks = _csv(args.tasks, "--tasks", str) or (["mqar"] if mqar_run else list(retrieval.TEXT_TASKS))
  unknown = [t for t in tasks if t not in retrieval.TASKS]
  if unknown:
    raise EvalError(f"--tasks: unknown task {', '.join(map(repr, unknown))}; valid: {', '.join(retrieval.TASKS)}")
  valid_tasks = ("mqar",) if mqar_run else retrieval.TEXT_TASKS
  if any(t not in valid_tasks for t in tasks):
    raise EvalError(f"--tasks={args.tasks!r}: a run trained on data.name={config.data.name!r} supports "
                    f"{', '.join(valid_tasks)} (MQAR models have no text vocabulary; text models were never "
                    "trained on MQAR)")
  per_eval = {name: lengths or [m * seq_len for m in DEFAULT_LENGTHS[name]] for name in evals}
  vocab = int(config.data.vocab_size) if mqar_run else int(config.model.vocab_size)
  if "mqar" in evals:
    if not mqar_run:
      raise EvalError(f"--eval=mqar needs a run trained on MQAR (data.name='mqar'); this run has data.name="
                      f"{config.data.name!r}: use --eval retrieval (passkey / NIAH) instead")
    if any(n % 2 for n in per_eval["mqar"]):
      raise EvalError(f"--lengths={per_eval['mqar']}: MQAR lengths must be even")
    if not any(4 * k <= n for n in per_eval["mqar"] for k in kv_pairs):
      raise EvalError(f"--lengths={per_eval['mqar']} × --kv-pairs={kv_pairs}: no point has 4·K ≤ L")
  if mqar_run:
    for name in set(evals) & {"loss", "position", "retrieval"}:
      kv = kv_pairs[0] if name == "retrieval" else int(config.data.num_kv_pairs)
      for n in per_eval[name]:
        try:
          retrieval.check_mqar(n, kv, vocab)
          if name != "retrieval" and n % 2:
            raise ValueError(f"MQAR length {n} must be even")
        except ValueError as e:
          raise EvalError(f"--eval={name} --lengths: {e}") from None
  tokenizer = None
  if "retrieval" in evals and not mqar_run:
    tokenizer = _tokenizer(config, run_dir)
    probe_filler = retrieval.filler_stream(tokenizer, 64)
    for task in tasks:
      for n in per_eval["retrieval"]:
        try:
          retrieval.make_examples(task, length=n, depth=0.0, samples=1, tokenizer=tokenizer, filler=probe_filler)
        except ValueError as e:
          raise EvalError(f"--eval=retrieval --lengths: {task}: {e}") from None
  document_eod = _document_eod(config)
  packed = [name for name in evals if name in PACKED_EVALS]
  if args.face == "recurrent" and document_eod is not None and packed:
    raise EvalError(f"--face=recurrent --eval={','.join(packed)}: data.document_boundaries=True (this run's "
                    "held-out rows pack several documents, each scored as if alone) needs --face=parallel; one "
                    "decode state per row cannot restart at each document")
  return {"evals": evals, "lengths": per_eval, "depths": depths, "kv_pairs": kv_pairs, "tasks": tasks,
          "tokenizer": tokenizer, "document_eod": document_eod}


# ----------------------------------------------------------------------------- model and scoring

def restore_params(run_dir: str, config) -> tuple[int, Any, Any, Any]:
  """``(step, graphdef, abstract_state, params)`` of the newest readable checkpoint; nothing is initialised.

  Restores through ``train.restore_checkpoint`` (checksum verification and the corrupt-checkpoint
  fallback live there); the optimizer state comes along with it and is dropped at once. While a
  trainer holds the run's lock, a checkpoint that fails is skipped but left in place (the trainer's
  newest step may be between orbax's commit and its checksums).
  """
  model = nnx.eval_shape(lambda: HybridLM(config.model, rngs=nnx.Rngs(params=config.seed)))
  graphdef, abstract_state = nnx.split(model)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  params = target(nnx.to_pure_dict(abstract_state))
  opt_state = target(jax.eval_shape(train_lib.make_optimizer(config.train).init, params))
  checkpoints = os.path.join(run_dir, rundir.CHECKPOINTS_DIR)
  if not os.path.isdir(checkpoints) or not os.listdir(checkpoints):
    raise EvalError(f"{run_dir} has no checkpoint yet ({checkpoints} is missing or empty)")
  try:
    manager, restored = train_lib.restore_checkpoint(run_dir, int(config.train.keep_checkpoints), params, opt_state,
                                                     set_aside=not rundir.is_locked(run_dir))
  except rundir.RunDirectoryError as e:
    raise EvalError(str(e)) from None
  manager.close()
  if restored is None:
    raise EvalError(f"{checkpoints} holds no finished checkpoint")
  step, params, _, _ = restored
  return step, graphdef, abstract_state, params


def token_scores(logits, labels):
  """``logits: f32 [..., vocab]``, ``labels: int [...]`` → (nll f32 [...], correct bool [...]), 0 / False where ignored."""
  mask = labels != IGNORE_LABEL
  safe = jnp.where(mask, labels, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  return jnp.where(mask, nll, 0.0), (jnp.argmax(logits, -1) == safe) & mask


@functools.partial(jax.jit, static_argnames=("graphdef", "face", "window", "document_eod", "scan_layers"))
def _scores(graphdef, state, batch, *, face: str, window: int | None, document_eod: int | None, scan_layers: bool):
  """``batch`` ``{"inputs", "labels"[, "segment_ids"]}: int [batch, L]`` → (nll, correct, scored) ``[batch, L]``."""
  # Module-level jit keyed on the (hashable) graphdef: evaluating the same model again reuses the compile.
  model = nnx.merge(graphdef, state)
  if window is not None:
    model.set_window(window)
  if face == "parallel":
    # The training loop's own scoring (packed documents kept apart, the label after an EOD unscored),
    # so that the held-out loss is its eval's; only its ``scored`` is used, hence no state or optimizer.
    trainer = train_lib.Trainer(graphdef, None, None, scan_layers=scan_layers, document_eod=document_eod)
    logits, labels, _ = trainer.scored(model, batch)
    return (*token_scores(logits, labels), labels != IGNORE_LABEL)
  inputs, labels = batch["inputs"], batch["labels"]
  states = model.init_state(inputs.shape[0], max_len=inputs.shape[1])

  def step(states, xs):
    token, label = xs
    logits, states = model.step(token, states)
    return states, token_scores(logits, label)

  _, (nll, correct) = jax.lax.scan(step, states, (inputs.T, labels.T))
  return nll.T, correct.T, labels != IGNORE_LABEL


class Scorer:
  """``batch → (nll f64 [batch, L], correct bool [batch, L], scored bool [batch, L])`` for a restored model, on
  the chosen face; ``scored``: the positions whose label counts (not ``IGNORE_LABEL``, and with
  ``document_eod`` not the label right after an EOD, as in the training loop's eval).

  ``document_eod`` (:func:`hybrids.train.document_eod`): the parallel face keeps a row's packed documents
  apart as the trainer does. The recurrent face carries one decode state through a row, so it refuses a
  row holding that token (:func:`plan` refuses it for the evals of packed held-out rows beforehand).
  """

  def __init__(self, graphdef, abstract_state, params, *, face: str, window: int | None,
               document_eod: int | None = None, scan_layers: bool = True):
    self.graphdef, self.face, self.window = graphdef, face, window
    self.document_eod, self.scan_layers = document_eod, bool(scan_layers)
    self.state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(self.state, params)

  def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labelled_rows = (batch["labels"] != IGNORE_LABEL).any(-1, keepdims=True)  # padding rows' inputs are 0: BPE's EOD
    if (self.face == "recurrent" and self.document_eod is not None
        and ((batch["inputs"] == self.document_eod) & labelled_rows).any()):
      raise EvalError(f"--face=recurrent: a row holds the end-of-document token {self.document_eod} "
                      "(data.document_boundaries=True), which one decode state per row cannot keep apart; "
                      "use --face=parallel")
    nll, correct, scored = _scores(self.graphdef, self.state, {k: jnp.asarray(v) for k, v in batch.items()},
                                   face=self.face, window=self.window, document_eod=self.document_eod,
                                   scan_layers=self.scan_layers)
    return np.asarray(nll, np.float64), np.asarray(correct), np.asarray(scored)


def batch_size_for(config, length: int, requested: int | None) -> int:
  """The training batch's token count in sequences of ``length`` (memory like a training step's forward)."""
  if requested:
    return requested
  return max(1, int(config.train.batch_size) * int(config.data.seq_len) // length)


def pad_batches(examples: list[dict[str, np.ndarray]], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Fixed-shape batches (one compile per length); padding rows carry no labels."""
  return finite_batches(examples, batch_size=batch_size)


def heldout_batches(config, run_dir: str, length: int, batch_size: int, num_batches: int) -> list[dict]:
  """The run's held-out sequences at ``length``: MQAR's eval stream, or the text split's windows."""
  d = config.data
  if _is_mqar(config):
    source = retrieval.mqar_source(length=length, num_examples=batch_size * num_batches, vocab_size=int(d.vocab_size),
                                   num_kv_pairs=int(d.num_kv_pairs), power_a=float(d.power_a),
                                   random_non_queries=bool(d.random_non_queries), seed=int(d.seed))
    return finite_batches(source, batch_size=batch_size)
  try:
    return data_lib.eval_batches(d, seq_len=length, batch_size=batch_size, workdir=run_dir, num_batches=num_batches)
  except ValueError as e:
    raise EvalError(f"held-out data at length {length}: {e}") from None


# ----------------------------------------------------------------------------- evals

def eval_loss(ctx, lengths: list[int]) -> tuple[dict, dict]:
  out = {"lengths": lengths, "loss": [], "perplexity": [], "accuracy": [], "tokens": []}
  for n in lengths:
    loss_sum = correct_sum = count = 0.0
    for batch in heldout_batches(ctx.config, ctx.run_dir, n, ctx.batch_size(n), ctx.num_batches):
      nll, correct, scored = ctx.scorer(batch)
      loss_sum, correct_sum, count = loss_sum + nll.sum(), correct_sum + correct.sum(), count + float(scored.sum())
    loss = loss_sum / max(count, 1.0)
    out["loss"].append(loss)
    out["perplexity"].append(math.exp(min(loss, 80.0)))
    out["accuracy"].append(correct_sum / max(count, 1.0))
    out["tokens"].append(int(count))
  compact = {k: dict(zip(map(str, lengths), out[k])) for k in ("loss", "perplexity", "accuracy")}
  return out, compact


def eval_position(ctx, lengths: list[int]) -> tuple[dict, dict]:
  curves, sequences, mean_loss, tail_loss = {}, {}, {}, {}
  for n in lengths:
    loss_sum, count, rows = np.zeros(n), np.zeros(n), 0
    for batch in heldout_batches(ctx.config, ctx.run_dir, n, ctx.batch_size(n), ctx.num_batches):
      nll, _, scored = ctx.scorer(batch)
      loss_sum, count = loss_sum + nll.sum(0), count + scored.sum(0)
      rows += int(scored.any(-1).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
      curve = loss_sum / count
    curves[str(n)] = [None if c == 0 else float(v) for v, c in zip(curve, count)]
    sequences[str(n)] = rows
    mean_loss[str(n)] = float(loss_sum.sum() / max(count.sum(), 1))
    tail = slice(n - max(1, n // 8), n)
    tail_loss[str(n)] = float(loss_sum[tail].sum() / max(count[tail].sum(), 1))
  window = int(ctx.window) if ctx.window else None
  out = {"lengths": lengths, "loss_by_position": curves, "sequences": sequences}
  return out, {"mean_loss": mean_loss, "tail_loss": tail_loss, "window": window}


def eval_mqar(ctx, lengths: list[int], kv_pairs: list[int]) -> tuple[dict, dict]:
  d = ctx.config.data
  out = {"lengths": [], "num_kv_pairs": [], "accuracy": [], "loss": [], "examples": ctx.samples, "skipped": []}
  for n in lengths:
    for k in kv_pairs:
      if 4 * k > n:
        out["skipped"].append([n, k])
        continue
      source = retrieval.mqar_source(length=n, num_examples=ctx.samples, vocab_size=int(d.vocab_size),
                                     num_kv_pairs=k, power_a=float(d.power_a),
                                     random_non_queries=bool(d.random_non_queries), seed=int(d.seed))
      loss_sum = correct_sum = count = 0.0
      for batch in finite_batches(source, batch_size=ctx.batch_size(n)):
        nll, correct, scored = ctx.scorer(batch)
        loss_sum, correct_sum, count = loss_sum + nll.sum(), correct_sum + correct.sum(), count + float(scored.sum())
      out["lengths"].append(n)
      out["num_kv_pairs"].append(k)
      out["accuracy"].append(correct_sum / count)
      out["loss"].append(loss_sum / count)
  by_point = {f"L{n}_kv{k}": a for n, k, a in zip(out["lengths"], out["num_kv_pairs"], out["accuracy"])}
  return out, {"accuracy": float(np.mean(out["accuracy"])), "by_point": by_point}


def heldout_filler(config, run_dir: str, min_tokens: int, document_eod: int | None = None) -> np.ndarray | None:
  """≥ ``min_tokens`` of the held-out split as one token stream (fewer if the split is smaller); None if unreadable.

  ``document_eod`` (set when the run kept packed documents apart): its EOD tokens are dropped, so that a
  probe is one document, as the model saw every context in training (with them, the parallel face would
  cut the needle off from the question, and the recurrent face could not run it).
  """
  seq_len = int(config.data.seq_len)
  windows = -(-min_tokens // (seq_len + 1))
  batch_size = min(windows, 64)
  try:
    batches = data_lib.eval_batches(config.data, seq_len=seq_len, batch_size=batch_size, workdir=run_dir,
                                    num_batches=-(-windows // batch_size))
  except (ValueError, OSError) as e:
    warnings.warn(f"held-out text unavailable ({e}); retrieval uses the built-in filler")
    return None
  # A window is inputs plus its last label: consecutive windows rebuild the split's token stream.
  rows = [np.concatenate([i, l[-1:]]) for b in batches for i, l in zip(b["inputs"], b["labels"])
          if (l != IGNORE_LABEL).any()]
  stream = np.concatenate(rows).astype(np.int32)
  return stream if document_eod is None else stream[stream != document_eod]


def eval_retrieval(ctx, lengths: list[int], depths: list[float], tasks: list[str], kv_pairs) -> tuple[dict, dict]:
  filler, filler_kind = None, "random tokens"
  if tasks[0] != "mqar":
    filler = heldout_filler(ctx.config, ctx.run_dir, 2 * max(lengths), ctx.document_eod)
    filler_kind = "heldout" if filler is not None else "builtin"
    if filler is None:
      filler = retrieval.filler_stream(ctx.tokenizer)
  kv = kv_pairs[0] if kv_pairs else None
  by_task = {}
  for task in tasks:
    grid = []
    for n in lengths:
      examples = [e for depth in depths for e in retrieval.make_examples(
          task, length=n, depth=depth, samples=ctx.samples, seed=ctx.seed, tokenizer=ctx.tokenizer, filler=filler,
          vocab_size=int(ctx.config.data.vocab_size), num_kv_pairs=kv or 0)]
      scores = []
      for batch in pad_batches([{"inputs": e.inputs, "labels": e.labels} for e in examples], ctx.batch_size(n)):
        _, correct, _ = ctx.scorer(batch)
        scores.append(retrieval.example_accuracy(correct, batch["labels"], exact_match=retrieval.exact_match(task)))
      scores = np.concatenate(scores)[:len(examples)].reshape(len(depths), ctx.samples)
      grid.append([float(s) for s in scores.mean(-1)])
    by_task[task] = grid
  first = by_task[tasks[0]]
  out = {"task": tasks[0], "lengths": lengths, "depths": depths, "accuracy": first, "by_task": by_task,
         "samples": ctx.samples, "filler": filler_kind, "num_kv_pairs": kv,
         "tokenizer": ctx.tokenizer.name if ctx.tokenizer is not None else None}
  compact = {"task": tasks[0], "accuracy": float(np.mean(first)),
             "by_length": {str(n): float(np.mean(row)) for n, row in zip(lengths, first)},
             "by_task": {t: float(np.mean(g)) for t, g in by_task.items()}}
  return out, compact


# ----------------------------------------------------------------------------- output

def write_results(run_dir: str, name: str, full: dict, compact: dict) -> str:
  """Write ``RUN/eval/<name>.json`` and merge ``compact`` into ``summary.json["evals"][name]``."""
  os.makedirs(os.path.join(run_dir, EVAL_DIR), exist_ok=True)
  path = os.path.join(run_dir, EVAL_DIR, f"{name}.json")
  rundir.write_json(path, full)
  try:
    summary = rundir.read_summary(run_dir, strict=True)  # re-read now: training may have rewritten it since we started
  except json.JSONDecodeError as e:
    warnings.warn(f"{os.path.join(run_dir, rundir.SUMMARY_FILE)} is not valid JSON ({e}); left as it is, "
                  f"results only in {path}")
    return path
  summary.setdefault("evals", {})[name] = compact
  rundir.write_summary(run_dir, summary)
  return path


def _fmt(x) -> str:
  return "—" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def table(name: str, full: dict) -> str:
  """A plain-text table of one eval's results."""
  if name == "loss":
    head, rows = ["length", "loss", "perplexity", "accuracy", "tokens"], [
        [n, full["loss"][i], full["perplexity"][i], full["accuracy"][i], full["tokens"][i]]
        for i, n in enumerate(full["lengths"])]
  elif name == "position":
    head, rows = ["length", "sequences", "first", "mid", "last eighth"], []
    for n in full["lengths"]:
      curve = np.array([np.nan if v is None else v for v in full["loss_by_position"][str(n)]])
      parts = [curve[: max(1, n // 8)], curve[n // 2 - n // 16: n // 2 + n // 16 + 1], curve[n - max(1, n // 8):]]
      rows.append([n, full["sequences"][str(n)], *[float(np.nanmean(p)) if np.isfinite(p).any() else None
                                                    for p in parts]])
  elif name == "mqar":
    head = ["length", "kv pairs", "accuracy", "loss"]
    rows = [list(r) for r in zip(full["lengths"], full["num_kv_pairs"], full["accuracy"], full["loss"])]
  else:
    head = [f"{full['task']} length"] + [f"depth {d:g}" for d in full["depths"]]
    rows = [[n, *row] for n, row in zip(full["lengths"], full["accuracy"])]
  cells = [head] + [[_fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join([f"{name} (step {full['step']})", lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ----------------------------------------------------------------------------- command line

class _Context:
  """What every eval needs: the run, its scorer and the request's shared settings."""

  def __init__(self, **kwargs):
    self.__dict__.update(kwargs)

  def batch_size(self, length: int) -> int:
    return batch_size_for(self.config, length, self.requested_batch_size)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m hybrids.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="run directory (config.json, checkpoints/)")
  p.add_argument("--eval", default="loss", help=f"comma list of {', '.join(EVALS)} (default: loss)")
  p.add_argument("--lengths", help="comma list of sequence lengths (default per eval: see the module docstring)")
  p.add_argument("--depths", help="retrieval needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
  p.add_argument("--kv-pairs", help="MQAR runs: comma list of key-value pair counts for --eval mqar; retrieval "
                 "uses the first (default: the training data's num_kv_pairs)")
  p.add_argument("--tasks", help=f"retrieval tasks, of {', '.join(retrieval.TASKS)} (default: passkey,niah for "
                 "text runs, mqar for MQAR runs)")
  p.add_argument("--samples", type=int, default=32, help="probes per retrieval cell / MQAR examples per point")
  p.add_argument("--batches", type=int, help="held-out batches for loss/position (default train.eval_batches)")
  p.add_argument("--batch-size", type=int, help="sequences per forward pass (default: training tokens / length)")
  p.add_argument("--face", default="parallel", help="parallel (one forward pass) or recurrent (decode steps)")
  p.add_argument("--window", type=int, help="evaluate with this SWA window instead of model.window")
  p.add_argument("--seed", type=int, default=0, help="seed of the retrieval probes")
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  run_dir = args.workdir
  try:
    if args.seed < 0:
      raise EvalError(f"--seed={args.seed} must be an integer ≥ 0")
    config = load_config(run_dir)
    try:
      request = plan(args, config, run_dir)
    except (KeyError, AttributeError, TypeError) as e:  # a config.json that is not a run's config
      raise EvalError(f"{os.path.join(run_dir, rundir.CONFIG_FILE)} is not a usable run config "
                      f"({type(e).__name__}: {e})") from None
    step, graphdef, abstract_state, params = restore_params(run_dir, config)
  except EvalError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  window = args.window or (int(config.model.window) if _has_swa(config) else None)
  ctx = _Context(config=config, run_dir=run_dir, seed=args.seed, samples=args.samples,
                 num_batches=args.batches or int(config.train.eval_batches), requested_batch_size=args.batch_size,
                 window=window, tokenizer=request["tokenizer"], document_eod=request["document_eod"],
                 scorer=Scorer(graphdef, abstract_state, params, face=args.face, window=args.window,
                               document_eod=request["document_eod"],
                               scan_layers=bool((config.get("runtime") or {}).get("scan_layers", True))))
  lengths = request["lengths"]
  for name in request["evals"]:
    try:
      if name == "loss":
        full, compact = eval_loss(ctx, lengths[name])
      elif name == "position":
        full, compact = eval_position(ctx, lengths[name])
      elif name == "mqar":
        full, compact = eval_mqar(ctx, lengths[name], request["kv_pairs"])
      else:
        full, compact = eval_retrieval(ctx, lengths[name], request["depths"], request["tasks"], request["kv_pairs"])
    except EvalError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    common = {"eval": name, "step": step, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "face": args.face, "window": window, "train_seq_len": int(config.data.seq_len), "seed": args.seed,
              "batch_size": {str(n): ctx.batch_size(n) for n in lengths[name]}}
    full = {**common, **full}
    path = write_results(run_dir, name, full, {"step": step, "lengths": lengths[name], **compact})
    print(table(name, full))
    print(f"→ {path}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
