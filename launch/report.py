"""``python -m launch report ROOT``: a markdown report with plots from a sweep's run directories.

    python -m launch report runs/zoology_mqar                 # writes runs/zoology_mqar/report/report.md
    python -m launch report runs/scaling --out /tmp/scaling --bootstrap 500

Reads only ``ROOT/*/config.json``, ``summary.json``, ``metrics.jsonl``, ``eval/*.json`` and
``ROOT/sweep.json`` (never a checkpoint, never a model), and writes ``OUT/report.md``, ``OUT/report.json``
and PNGs beside them (matplotlib, Agg), each plot only when it can answer its question:

- ``window_ablation.png`` (first, when present: it is the window study's answer): eval loss against the
  local-attention window, one line per (mixer, training length), global attention as dashed horizontal
  lines, when a mixer sweeps its window; else eval loss against the training length, one line per
  (mixer, window) with global attention dashed, when SWA stacks and global attention share ≥ 2 lengths
  (Griffin App. E). Language-model runs only;
- ``mqar_vs_width.png``: MQAR accuracy vs d_model (log2 axis), one panel per (seq_len, kv pairs), one line
  per mixer, each point its cell's best learning rate, hollow when that lr is at the edge of the grid —
  the layout of Zoology's Fig. 2; with a table of the accuracies and winning lrs;
- ``state_tradeoff.png``: MQAR accuracy (best lr) vs recurrent state bytes per sequence, Pareto frontier
  marked (Based's Fig. 2);
- ``loss_vs_flops.png``: eval loss vs training FLOPs, log-log, one colour per series, with the fitted
  ``L(C) = E + A·C^(−α)`` (``launch/fit.py``: Chinchilla Approach 3, Huber in log space, L-BFGS-B from a
  grid, bootstrap 95% interval of α) fitted to each series' compute frontier (its lowest loss per
  budget) — only for series with ≥ 3 budgets spanning ≥ 3× in FLOPs (``MIN_FLOPS_SPAN``): a sweep at one
  budget (a window or length ablation) gets a line saying why there is no plot, not a plot of a point cloud;
- survey tables (``survey_section``; when ≥ 2 series have fits): every fitted series ranked by its predicted
  loss at 10× the largest budget, with its loss at the common budget (the largest every series reached),
  α and 95% bootstrap intervals of each; each hybrid ``(m, m, swa)`` against the Mamba hybrid of the same
  window (the interval of the loss difference, and one sentence naming those that beat it, lose, or
  cannot be told apart); the pure − hybrid gap per recurrent mixer at both budgets, with intervals;
- ``survey_one_budget.png`` with its tables (``one_budget_section``; survey runs — recurrent mixers pure and
  as ``(m, m, swa)`` — with no fit yet, e.g. the survey's pilot at one size): per size, each mixer's
  best-lr loss pure (hollow) and hybridized at each window, references as vertical lines, and a table of
  the losses, the pure − hybrid gap and the difference to the Mamba hybrid per window, saying so when a
  cell tried one learning rate; it replaces the window ablation for such runs;
- ``isoflop.png``: loss vs non-embedding params per budget with its parabola and compute-optimal size,
  when a budget has ≥ 3 sizes of one mixer (Chinchilla Approach 2);
- ``recall_by_size.png`` with the "Recall and long-context loss by size" table (runs evaluated by
  ``python -m launch evaluate``): each pattern's best-lr retrieval accuracy (mean over ``eval/retrieval.json``'s
  tasks, lengths and depths) against non-embedding parameters, and its loss over the last eighth of the
  positions at the longest evaluated length (both as ``hybrids.evaluate`` summarised them in
  ``summary.json["evals"]``); ``report.json``'s ``evals_by_size`` holds the rows;
- ``retrieval_<run>.png``: retrieval accuracy heatmap, length × depth (``eval/retrieval.json``);
- ``position_<run>.png``: loss by position at each evaluated length (``eval/position.json``); these two
  per run only while at most ``MAX_RUN_EVAL_FIGURES`` (12) runs have such evals.

Learning rates (Zoology's protocol): a *cell* is every config field but ``train.lr`` (the runtime section
is never part of one). Each cell keeps its best learning rate — highest eval accuracy for MQAR, lowest
eval loss otherwise — and only that run enters the MQAR plots and tables and the window ablation. The
"Learning rates" section lists every cell's metric at each lr, flags a cell whose best lr is the smallest
or largest of its grid ("edge"; ties keep the lr nearest the grid's middle, and flag only when every tied
lr is at an edge), and names lrs that failed, have no eval, or are ``sweep.json`` points never started.

``report.md`` also holds the fits table (E, A, α, 95% CI, n), the run table (mixer, size, window, lr,
params, FLOPs, tokens, eval loss, accuracy, tokens/s; sorted by mixer and size), "Compute spent" (device
hours by device kind over every attempt in ``launch.json``, each attempt's wall time divided among the runs
that shared its device, and finished runs per device hour; ``report.json``'s ``compute``) and a "Missing"
section: points of ``sweep.json`` without a finished run. ``report.json`` (written atomically) holds ``runs``
(each run's ``run_id``, ``config`` = config.json and ``summary`` = summary.json, its lr, cell and derived
FLOPs / loss / accuracy: ``pandas.json_normalize(report["runs"])`` gives one row per run), ``cells`` (the
varying fields, metric, every lr with its metric and run, best lr, tied lrs, edge flag, missing lrs),
``fits`` (E, A, α, CIs, frontier, whether plotted), ``survey`` (the budgets, ranking, comparisons with the
Mamba hybrid and pure − hybrid gaps; ``{"one_budget": [...]}`` for a survey with no fit; or null), ``isoflop``, ``figures`` and ``missing``.

A run is grouped by its mixer label: the mixers of its layers joined by ``+`` (``rglru+swa`` for
``('rglru', 'rglru', 'swa')``), with the named topology of ``hybrids.topologies`` it matches; series
split further by window / seq_len / kv pairs / dataset when those vary within a label. Train FLOPs come
from ``summary.json`` (``train_flops``, else ``flops_per_token_train × tokens``); runs written before FLOP
accounting fall back to ``6 · params · tokens``, and the report says which runs did.

Tested by ``tests/test_report.py`` (fake run directories, no training).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict
from typing import Any

import numpy as np

from hybrids import rundir
from launch import fit as fit_lib
from launch import runs as run_dirs  # (functions here take a "runs" list)

MANIFEST_FILE = "sweep.json"
FINISHED = "done"
DPI = 110


class ReportError(ValueError):
  """Nothing to report on (no runs, a bad path); the message says what was expected where."""


# ----------------------------------------------------------------------------- reading


def _read_json(path: str, problems: list[str]) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    problems.append(f"`{path}` is unreadable ({type(e).__name__}: {e}); ignored")
    return None


def _read_metrics(path: str, problems: list[str]) -> tuple[dict | None, dict | None]:
  """The last eval record and the last training record of ``metrics.jsonl`` (torn lines skipped; a
  missing file is none, another that cannot be read is named in ``problems``)."""
  last_eval = last_train = None
  try:
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if "eval_loss" in record:
          last_eval = record
        elif "loss" in record:
          last_train = record
  except FileNotFoundError:
    pass
  except OSError as e:
    problems.append(f"`{path}` is unreadable ({type(e).__name__}: {e}); its losses are not used")
  return last_eval, last_train


def _finite(v) -> float | None:
  return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclasses.dataclass
class Run:
  """One run directory, reduced to what the report shows."""
  run_id: str
  path: str
  config: dict
  summary: dict
  evals: dict[str, Any]                     # eval/<name>.json contents by name
  status: str
  layers: tuple[str, ...]                   # the mixer entry of every layer
  label: str = ""                           # mixer label (+ topology); set once all runs are known
  series: str = ""                          # label + the fields that vary within it
  params: float | None = None
  non_embedding_params: float | None = None
  tokens: float | None = None
  flops: float | None = None
  flops_source: str = ""                    # "summary", "per-token", "6·params·tokens" or ""
  loss: float | None = None
  loss_source: str = ""                     # "eval", "metrics eval", "train"
  accuracy: float | None = None
  tokens_per_sec: float | None = None
  state_bytes: float | None = None
  attempts: list = dataclasses.field(default_factory=list)  # launch.json's, when the launcher kept them

  @property
  def model(self) -> dict:
    return self.config.get("model", {})

  @property
  def data(self) -> dict:
    return self.config.get("data", {})

  @property
  def mixers(self) -> set[str]:
    return {name for entry in self.layers for name in entry.split("|")}

  @property
  def window(self) -> int | None:
    return self.model.get("window") if "swa" in self.mixers else None

  @property
  def window_text(self) -> str:
    if self.window is None:
      return "—"
    choices = self.config.get("train", {}).get("window_choices") or ()
    return f"{self.window} (train ~{{{', '.join(map(str, choices))}}})" if choices else str(self.window)

  @property
  def seq_len(self) -> int | None:
    return self.data.get("seq_len")

  @property
  def is_mqar(self) -> bool:
    return self.data.get("name") == "mqar"

  @property
  def stops_at_accuracy(self) -> bool:
    """Trained under ``train.stop_at_accuracy``: its compute is where it stopped, not a budget."""
    return bool(self.config.get("train", {}).get("stop_at_accuracy"))

  @property
  def passed_stop_accuracy(self) -> bool:
    """Done because its own eval accuracy passed ``train.stop_at_accuracy`` (``launch.runs``)."""
    return run_dirs.passed_stop_accuracy(self.summary) is not None

  @property
  def stopped_with_cell(self) -> str | None:
    """The run that decided its cell when this one stopped with it (``launch sweep --cell-stop``)."""
    return run_dirs.stopped_with_cell(self.summary)


def _layers(model: dict) -> tuple[str, ...]:
  pattern = model.get("pattern") or ()
  if isinstance(pattern, str):
    pattern = (pattern,)
  n_layers = int(model.get("n_layers") or len(pattern) or 0)
  return tuple(pattern[i % len(pattern)] for i in range(n_layers)) if pattern else ()


def load_run(path: str, problems: list[str]) -> Run | None:
  config = _read_json(os.path.join(path, rundir.CONFIG_FILE), problems)
  if not isinstance(config, dict):
    return None
  summary = _read_json(os.path.join(path, rundir.SUMMARY_FILE), problems)
  summary = summary if isinstance(summary, dict) else {}
  evals = {}
  for file in sorted(glob.glob(os.path.join(path, rundir.EVAL_DIR, "*.json"))):
    content = _read_json(file, problems)
    if content is not None:
      evals[os.path.splitext(os.path.basename(file))[0]] = content
  run = Run(run_id=os.path.basename(os.path.normpath(path)), path=path, config=config, summary=summary,
            evals=evals, status=str(summary.get("status") or "no summary"), layers=_layers(config.get("model", {})))
  record = _read_json(os.path.join(path, rundir.LAUNCH_FILE), problems) if os.path.exists(
      os.path.join(path, rundir.LAUNCH_FILE)) else None
  run.attempts = [a for a in (record.get("attempts") or []) if isinstance(a, dict)] if isinstance(record, dict) else []
  run.params = _finite(summary.get("params"))
  run.non_embedding_params = _finite(summary.get("non_embedding_params"))
  run.tokens = _finite(summary.get("tokens"))
  run.tokens_per_sec = _finite(summary.get("tokens_per_sec"))
  run.state_bytes = _finite(summary.get("state_bytes_per_sequence"))

  if _finite(summary.get("train_flops")) is not None:
    run.flops, run.flops_source = _finite(summary["train_flops"]), "summary"
  elif _finite(summary.get("flops_per_token_train")) is not None and run.tokens is not None:
    run.flops, run.flops_source = _finite(summary["flops_per_token_train"]) * run.tokens, "per-token"
  elif run.params is not None and run.tokens:
    run.flops, run.flops_source = 6.0 * run.params * run.tokens, "6·params·tokens"
  if summary.get("flops_error") and run.flops_source in ("6·params·tokens", ""):  # a bug to fix, not an old run
    estimate = "estimated as 6 · params · tokens" if run.flops_source == "6·params·tokens" else "missing"
    problems.append(f"`{run.run_id}`: FLOPs {estimate} because FLOP accounting failed in training "
                    f"({summary['flops_error']})")

  last_eval, last_train = _read_metrics(os.path.join(path, rundir.METRICS_FILE), problems)
  ev = summary.get("eval") if isinstance(summary.get("eval"), dict) else None
  if ev is None and last_eval is not None:
    ev, run.loss_source = last_eval, "metrics eval"
  if ev is not None:
    run.loss = _finite(ev.get("eval_loss"))
    run.accuracy = _finite(ev.get("eval_accuracy"))
    run.loss_source = run.loss_source or "eval"
  if run.loss is None:
    train_loss = _finite(summary.get("train_loss"))
    if train_loss is None and last_train is not None:
      train_loss = _finite(last_train.get("loss"))
    if train_loss is not None:
      run.loss, run.loss_source = train_loss, "train"
  return run


def load_runs(root: str, problems: list[str]) -> list[Run]:
  if not os.path.isdir(root):
    raise ReportError(f"{root!r} is not a directory; give the sweep root, e.g. runs/NAME "
                      "(it holds one directory per run: RUNID/config.json)")
  runs = []
  for config_path in sorted(glob.glob(os.path.join(root, "*", rundir.CONFIG_FILE))):
    run = load_run(os.path.dirname(config_path), problems)
    if run is not None:
      runs.append(run)
  if not runs:
    manifest = _read_json(os.path.join(root, MANIFEST_FILE), problems)
    pending = len(manifest.get("points", [])) if isinstance(manifest, dict) else 0
    hint = (f"; {MANIFEST_FILE} lists {pending} points, none started: launch them with python -m launch sweep"
            if pending else "")
    raise ReportError(f"no runs in {root!r}: expected run directories {root}/RUNID/config.json{hint}")
  return runs


# ----------------------------------------------------------------------------- grouping


def _topology(model: dict) -> str | None:
  """The named topology of ``hybrids.topologies`` whose model fields this config has, if any."""
  from hybrids.topologies import TOPOLOGIES  # a plain dict: no jax import

  for name, fields in sorted(TOPOLOGIES.items()):
    model_fields = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("model.")}
    if all(_same(model.get(k), v) for k, v in model_fields.items()):
      return name
  return None


def _same(a, b) -> bool:
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  return norm(a) == norm(b)


def _architecture(run: Run) -> str:
  """What distinguishes two mixer stacks beyond their label: the layer list, merge, MoE."""
  text = ",".join(run.layers)
  if any("|" in e for e in run.layers):
    text += f" merge={run.model.get('parallel_merge', 'sum')}"
  if run.model.get("moe_every"):
    text += f" moe/{run.model['moe_every']}"
  return text


def assign_labels(runs: list[Run]) -> None:
  """``label`` (mixer label + topology; the layer list too when two stacks share one) and ``series``."""
  for run in runs:
    names = list(dict.fromkeys(run.layers))  # unique, in order of first appearance
    run.label = "+".join(names) or "?"
    # A topology names the full pattern; a stack cut shorter (n_layers < len(pattern)) is not it.
    topology = _topology(run.model) if set(run.model.get("pattern") or ()) <= set(run.layers) else None
    if topology:
      run.label += f" ({topology})"
  by_label = defaultdict(set)
  for run in runs:
    by_label[run.label].add(_architecture(run))
  for run in runs:
    if len(by_label[run.label]) > 1:
      run.label += f" [{_architecture(run)}]"
  # Fields that change what a loss means: a series never mixes two of their values.
  nuisance = {"w": lambda r: r.window, "T": lambda r: r.seq_len,
              "kv": lambda r: r.data.get("num_kv_pairs") if r.is_mqar else None,
              "data": lambda r: r.data.get("name")}
  label_runs = defaultdict(list)
  for run in runs:
    label_runs[run.label].append(run)
  for label, members in label_runs.items():
    varying = [k for k, get in nuisance.items() if len({json.dumps(get(r)) for r in members}) > 1]
    for run in members:
      run.series = " ".join([label] + [f"{k}={nuisance[k](run)}" for k in varying])


def _colors(keys) -> dict[str, Any]:
  import matplotlib.pyplot as plt

  keys = sorted(set(keys))
  cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
  return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------- learning-rate cells

LR_FIELD = "train.lr"
NOT_CELL_SECTIONS = ("runtime",)            # where a run executes, not what it is
TIE_TOL = 1e-9


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
  """``{"model": {"d_model": 64}}`` → ``{"model.d_model": 64}`` (lists stay values)."""
  if not isinstance(obj, dict):
    return {prefix: obj}
  out = {}
  for k, v in obj.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _cell_fields(run: Run) -> dict[str, Any]:
  """Every config field that makes a cell: all of ``config.json`` but ``train.lr`` and the runtime section."""
  flat = _flatten({k: v for k, v in run.config.items() if k not in NOT_CELL_SECTIONS})
  flat.pop(LR_FIELD, None)
  return flat


def run_lr(run: Run) -> float | None:
  return _finite(run.config.get("train", {}).get("lr")) if isinstance(run.config.get("train"), dict) else None


def _lr_text(lr: float | None) -> str:
  """2 significant digits in e-notation: 1e-3, 2.2e-4 (logspace(−4, −2, 4) = 1e-4, 4.6e-4, 2.2e-3, 1e-2)."""
  if lr is None:
    return "—"
  mantissa, exponent = f"{lr:.1e}".split("e")
  return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


@dataclasses.dataclass
class Cell:
  """The runs of one configuration at every learning rate tried (Zoology's protocol: keep the best)."""
  fields: dict[str, Any]                    # the config fields that vary across the sweep (besides lr)
  label: str
  metric: str                               # "eval_accuracy" (MQAR, higher is better) or "eval_loss"
  runs: list[Run]
  scores: dict[float, float | None]         # lr → metric of its best run; None: failed / unfinished / no eval
  reasons: dict[float, str]                 # lr → why it has no metric
  not_started: list[float]                  # lrs of sweep.json points without a run directory
  best: Run | None = None
  best_lr: float | None = None
  winners: list[float] = dataclasses.field(default_factory=list)  # lrs tied at the best metric
  edge: bool = False

  @property
  def higher_is_better(self) -> bool:
    return self.metric == "eval_accuracy"

  @property
  def grid(self) -> list[float]:
    return sorted(set(self.scores) | set(self.not_started))

  @property
  def missing(self) -> list[tuple[float, str]]:
    out = [(lr, self.reasons[lr]) for lr, s in self.scores.items() if s is None]
    out += [(lr, "not started") for lr in self.not_started]
    return sorted(out)

  @property
  def decided(self) -> bool:
    """Its best run passed ``train.stop_at_accuracy`` (an early stop of its own): the accuracy every
    run stops at, so the learning rates it lacks, still training, or stopped with it (``launch sweep
    --cell-stop``) cannot change what the cell shows by more than 1 − that accuracy."""
    return self.best is not None and self.best.passed_stop_accuracy

  @property
  def incomplete(self) -> bool:
    return bool(self.missing) and not self.decided

  @property
  def decided_early(self) -> bool:
    """Decided before every learning rate trained to its end (some missing, or stopped with it)."""
    return self.decided and (bool(self.missing) or any(r.stopped_with_cell for r in self.runs))

  @property
  def name(self) -> str:
    shown = [f"{k.rsplit('.', 1)[-1]}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
             for k, v in self.fields.items() if k != "model.pattern"]
    return " ".join([self.label] + shown)


def _metric(run: Run) -> tuple[float | None, str]:
  """The cell metric of a run and, when there is none, why."""
  if run.status != FINISHED:
    return None, run.status
  if run.is_mqar:
    return (run.accuracy, "") if run.accuracy is not None else (None, "no eval accuracy")
  if run.loss is None or run.loss_source == "train":
    return None, "no eval loss"
  return run.loss, ""


def learning_rate_cells(runs: list[Run], pending: list[dict] | None = None) -> list[Cell]:
  """Group runs into cells (all config fields equal but ``train.lr``), pick each cell's best learning rate.

  The metric is MQAR eval accuracy (higher is better) for MQAR runs, else eval loss (lower is better).
  A cell's grid is every lr it has a run directory for plus the ``pending`` sweep points (dotted-key
  overrides, ``train.lr`` among them) that match it. Ties keep the lr nearest the grid's middle (in
  log; the smaller of two as near); a cell is flagged ``edge`` when more than one lr is on its grid and
  every lr tied at the best is the smallest or the largest of the grid.
  """
  by_key: dict[str, list[Run]] = defaultdict(list)
  fields_of = {}
  for run in runs:
    fields = _cell_fields(run)
    key = json.dumps(fields, sort_keys=True, default=str)
    by_key[key].append(run)
    fields_of[key] = fields
  all_keys = sorted({k for f in fields_of.values() for k in f})
  varying = [k for k in all_keys if len({json.dumps(f.get(k), sort_keys=True, default=str)
                                         for f in fields_of.values()}) > 1]
  cells = []
  for key, members in by_key.items():
    fields = fields_of[key]
    scores: dict[float, float | None] = {}
    reasons: dict[float, str] = {}
    best_of_lr: dict[float, Run] = {}
    metric = "eval_accuracy" if any(r.is_mqar for r in members) else "eval_loss"
    sign = -1.0 if metric == "eval_accuracy" else 1.0  # minimise sign · metric
    for r in members:
      lr = run_lr(r)
      if lr is None:
        continue
      value, why = _metric(r)
      if value is None:
        if scores.get(lr) is None:
          scores[lr], reasons[lr] = None, why
        continue
      if scores.get(lr) is None or sign * value < sign * scores[lr]:
        scores[lr], best_of_lr[lr] = value, r
    cell = Cell(fields={k: fields.get(k) for k in varying}, label=members[0].label, metric=metric,
                runs=sorted(members, key=lambda r: (run_lr(r) or 0, r.run_id)), scores=scores, reasons=reasons,
                not_started=[])
    cells.append(cell)
  for point in pending or []:
    lr = _finite(point.get(LR_FIELD))
    if lr is None:
      continue
    others = {k: v for k, v in point.items() if k != LR_FIELD}
    matches = [c for c in cells if all(_same(_cell_fields(c.runs[0]).get(k), v) for k, v in others.items()
                                       if k in _cell_fields(c.runs[0]))]
    if len(matches) == 1 and lr not in matches[0].scores and lr not in matches[0].not_started:
      matches[0].not_started.append(lr)
  for cell in cells:
    cell.not_started.sort()
    sign = -1.0 if cell.higher_is_better else 1.0
    scored = {lr: s for lr, s in cell.scores.items() if s is not None}
    if not scored:
      continue
    best_value = min(sign * s for s in scored.values())
    tol = TIE_TOL * max(1.0, abs(best_value))
    cell.winners = sorted(lr for lr, s in scored.items() if sign * s <= best_value + tol)
    grid = cell.grid
    middle = (math.log(grid[0]) + math.log(grid[-1])) / 2 if grid[0] > 0 else 0.0
    cell.best_lr = min(cell.winners, key=lambda lr: (round(abs(math.log(lr) - middle), 9) if lr > 0 else math.inf, lr))
    cell.best = next(r for r in cell.runs if run_lr(r) == cell.best_lr and _metric(r)[0] == scored[cell.best_lr])
    cell.edge = len(grid) > 1 and all(lr in (grid[0], grid[-1]) for lr in cell.winners)
  sortable = lambda v: ((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool)
                        else (1, 0, json.dumps(v, default=str)))
  cells.sort(key=lambda c: (c.label, [(k, sortable(v)) for k, v in sorted(c.fields.items())]))
  return cells


def best_runs(runs: list[Run], cells: list[Cell]) -> list[Run]:
  """The best run of every cell, plus every run that has no learning rate in its config."""
  best = [c.best for c in cells if c.best is not None]
  return best + [r for r in runs if run_lr(r) is None]


# ----------------------------------------------------------------------------- analyses


MIN_FLOPS_SPAN = 3.0  # a series is plotted and fitted in FLOPs only when its budgets span this ratio or more


@dataclasses.dataclass
class SeriesFit:
  series: str
  fit: fit_lib.PowerLawFit | None
  frontier: list[tuple[float, float]]       # (FLOPs, loss): the best run of each budget
  note: str = ""
  mixers: tuple[str, ...] = ()              # the series' mixers, in order of first appearance
  window: int | None = None                 # its SWA window, if it has SWA layers

  @property
  def span(self) -> float:
    """max / min FLOPs of the frontier (1 for a single budget)."""
    return self.frontier[-1][0] / self.frontier[0][0] if self.frontier else 1.0

  @property
  def plottable(self) -> bool:
    """Enough budgets over a wide enough FLOPs range for loss vs FLOPs to show a trend."""
    return len(self.frontier) >= fit_lib.MIN_POINTS and self.span >= MIN_FLOPS_SPAN


def fit_series(runs: list[Run], *, n_bootstrap: int, seed: int) -> list[SeriesFit]:
  by_series = defaultdict(list)
  for run in runs:
    # A run that may stop at a target accuracy (Zoology's protocol) spends the FLOPs it needed, not a
    # budget: a loss-vs-FLOPs fit over such runs would claim a scaling law that isn't there.
    if run.status == FINISHED and run.flops and run.loss is not None and not run.stops_at_accuracy:
      by_series[run.series].append(run)
  out = []
  for series, members in sorted(by_series.items()):
    budgets = fit_lib.group_budgets([r.flops for r in members])
    best: dict[int, Run] = {}
    for run, b in zip(members, budgets):
      if b not in best or run.loss < best[b].loss:
        best[b] = run
    frontier = sorted((r.flops, r.loss) for r in best.values())
    names = tuple(dict.fromkeys(n for entry in members[0].layers for n in entry.split("|")))
    entry = SeriesFit(series, None, frontier, mixers=names, window=members[0].window)
    if len(frontier) < fit_lib.MIN_POINTS:
      entry.note = f"{len(frontier)} budget(s): no fit (needs ≥ {fit_lib.MIN_POINTS})"
    elif entry.span < MIN_FLOPS_SPAN:
      entry.note = f"FLOPs span only {_ratio(entry.span)}×: no fit (needs ≥ {MIN_FLOPS_SPAN:g}×)"
    else:
      entry.fit = fit_lib.fit_power_law([c for c, _ in frontier], [l for _, l in frontier],
                                        n_bootstrap=n_bootstrap, seed=seed)
      if entry.fit is None:
        entry.note = "the fit did not converge"
      elif entry.fit.alpha_ci is None and n_bootstrap:
        entry.note = "too few distinct resamples for an interval"
      elif entry.fit.alpha_ci and len(frontier) < 6:
        entry.note = (f"only {len(frontier)} budgets: resamples nearly interpolate, so the interval understates "
                      "the error")
    out.append(entry)
  return out


# ----------------------------------------------------------------------------- the survey's questions

# Attention-like: references, never "the recurrent mixer" (experiments/mixer_survey.py's ATTENTION_MIXERS;
# written here too so that `launch report` does not import the models).
REFERENCE_MIXERS = ("attention", "swa", "fox")
MAMBA_HYBRID = ("hybrid", "mamba")                # the hybrid every other is measured against (a _kind)
EXTRAPOLATION = 10.0                              # rank at this multiple of the largest budget


def _kind(f: SeriesFit | Run) -> tuple[str, str | None]:
  """``("pure", m)``, ``("hybrid", m)`` (one recurrent mixer with SWA) or ``("reference"/"other", None)``
  of a fitted series or of a run."""
  recurrent = [m for m in f.mixers if m not in REFERENCE_MIXERS]
  if len(recurrent) == 1 and set(f.mixers) == {recurrent[0]}:
    return "pure", recurrent[0]
  if len(recurrent) == 1 and set(f.mixers) == {recurrent[0], "swa"}:
    return "hybrid", recurrent[0]
  return ("reference", None) if not recurrent else ("other", None)


def _ci_text(ci: tuple[float, float] | None, spec: str = ".4f") -> str:
  return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "—"


def _verdict(ci: tuple[float, float] | None) -> str:
  if ci is None:
    return "no interval"
  return "lower" if ci[1] < 0 else "higher" if ci[0] > 0 else "not distinguishable"


def survey_section(fits: list[SeriesFit]) -> tuple[list[str], dict | None]:
  """Markdown and JSON answering the survey (``experiments/mixer_survey.py``) from the power-law fits.

  Budgets: the *common budget* is the largest one every fitted series reached (the smallest of
  their largest frontier FLOPs: an interpolation for all); the *ranking budget* is ``EXTRAPOLATION``
  × the largest frontier FLOPs of any series (an extrapolation for all). Every interval is the
  series' bootstrap (``launch.fit``); a difference between two series pairs their resamples. Needs
  ≥ 2 fitted series; empty otherwise.
  """
  fitted = [f for f in fits if f.fit is not None]
  if len(fitted) < 2:
    return [], None
  common = min(f.frontier[-1][0] for f in fitted)
  target = EXTRAPOLATION * max(f.frontier[-1][0] for f in fitted)
  ranked = sorted(fitted, key=lambda f: float(f.fit.predict(target)))
  md = ["## Ranking at 10× the largest budget", "",
        f"Each series' fit L(C) = E + A·C^(−α) evaluated at the common budget C = {common:.3g} FLOPs (the largest "
        f"every series reached) and at {EXTRAPOLATION:g}× the largest budget, C = {target:.3g} FLOPs (an "
        "extrapolation: trust it as far as the fits' intervals and the number of budgets allow); "
        "95% percentile bootstrap intervals over each series' runs. Ranked by the loss at the larger budget.", ""]
  rows, ranking = [], []
  for i, f in enumerate(ranked, 1):
    kind, _ = _kind(f)
    at_common, at_target = float(f.fit.predict(common)), float(f.fit.predict(target))
    ci_common, ci_target = f.fit.loss_ci(common), f.fit.loss_ci(target)
    rows.append([str(i), f.series, kind, str(len(f.frontier)), f"{f.fit.alpha:.3f} {_ci_text(f.fit.alpha_ci, '.3f')}",
                 f"{at_common:.4f} {_ci_text(ci_common)}", f"{at_target:.4f} {_ci_text(ci_target)}"])
    ranking.append({"rank": i, "series": f.series, "kind": kind, "budgets": len(f.frontier), "alpha": f.fit.alpha,
                    "alpha_ci": f.fit.alpha_ci, "loss_common": at_common, "loss_common_ci": ci_common,
                    "loss_target": at_target, "loss_target_ci": ci_target})
  md += _table(["rank", "series", "kind", "budgets", "α [95% CI]", f"loss at {common:.3g} [95% CI]",
                f"loss at {target:.3g} [95% CI]"], rows) + [""]
  if any(len(f.frontier) < 6 for f in fitted):
    md += ["Fewer than 6 budgets in a series: its bootstrap resamples nearly interpolate, so these intervals "
           "understate the error.", ""]

  # Which hybrids beat the Mamba hybrid of the same window.
  mamba = {f.window: f for f in fitted if _kind(f) == MAMBA_HYBRID}
  versus = []
  for f in ranked:
    kind, mixer = _kind(f)
    if kind != "hybrid" or mixer == "mamba" or f.window not in mamba:
      continue
    gap, ci = fit_lib.difference_ci(f.fit, mamba[f.window].fit, target)
    versus.append({"series": f.series, "mamba_series": mamba[f.window].series, "window": f.window,
                   "difference": gap, "difference_ci": ci, "verdict": _verdict(ci)})
  md += ["## Hybrids against the Mamba hybrid", ""]
  if not mamba:
    md += ["No fitted Mamba hybrid (mamba, mamba, swa): nothing to compare against.", ""]
  elif not versus:
    md += ["No other fitted hybrid shares a window with the Mamba hybrid.", ""]
  else:
    md += [f"Loss of each hybrid minus the Mamba hybrid's of the same window at C = {target:.3g} FLOPs, with the "
           "95% bootstrap interval of the difference; *lower* means the interval lies below 0.", ""]
    md += _table(["hybrid", "window", "Δ loss vs Mamba hybrid [95% CI]", "verdict"],
                 [[v["series"], str(v["window"]), f"{v['difference']:+.4f} {_ci_text(v['difference_ci'], '+.4f')}",
                   v["verdict"]] for v in versus]) + [""]
    beat = [v["series"] for v in versus if v["verdict"] == "lower"]
    worse = [v["series"] for v in versus if v["verdict"] == "higher"]
    unclear = [v["series"] for v in versus if v["verdict"] not in ("lower", "higher")]
    md += [f"Beat the Mamba hybrid (interval below 0): {', '.join(beat) if beat else 'none'}. "
           f"Worse than it (interval above 0): {', '.join(worse) if worse else 'none'}. "
           f"Not distinguishable: {', '.join(unclear) if unclear else 'none'}.", ""]

  # Pure − hybrid gap per recurrent mixer (positive: hybridizing helps).
  pure = {mixer: f for f in fitted for kind, mixer in [_kind(f)] if kind == "pure"}
  gaps = []
  for f in fitted:
    kind, mixer = _kind(f)
    if kind == "hybrid" and mixer in pure:
      entry = {"mixer": mixer, "pure_series": pure[mixer].series, "hybrid_series": f.series, "window": f.window}
      for key, budget in (("common", common), ("target", target)):
        gap, ci = fit_lib.difference_ci(pure[mixer].fit, f.fit, budget)
        entry[f"gap_{key}"], entry[f"gap_{key}_ci"] = gap, ci
      gaps.append(entry)
  if gaps:
    md += ["## Pure − hybrid gap per mixer", "",
           "Loss of the pure stack minus its hybrid's (positive: the hybrid is better), at the common budget and at "
           "the ranking budget, with 95% bootstrap intervals of the difference.", ""]
    md += _table(["mixer", "hybrid", f"gap at {common:.3g} [95% CI]", f"gap at {target:.3g} [95% CI]"],
                 [[g["mixer"], g["hybrid_series"], f"{g['gap_common']:+.4f} {_ci_text(g['gap_common_ci'], '+.4f')}",
                   f"{g['gap_target']:+.4f} {_ci_text(g['gap_target_ci'], '+.4f')}"]
                  for g in sorted(gaps, key=lambda g: (g["mixer"], g["window"] or 0))]) + [""]
  return md, {"common_budget": common, "target_budget": target, "ranking": ranking, "versus_mamba_hybrid": versus,
              "pure_minus_hybrid": gaps}


@dataclasses.dataclass
class OneBudgetSurvey:
  """The survey's runs at one size, where no scaling fit exists yet (a pilot, or one slice): each
  recurrent mixer's best-lr loss pure and hybridized at each window, and the references."""
  size: str
  windows: list[int]
  mixers: dict[str, dict]             # mixer → {"pure": Run | None, window: Run}
  references: list[Run]               # attention, FoX, SWA alone
  single_lr: bool                     # some cell tried one learning rate: not comparable across mixers
  merged: list[str] = dataclasses.field(default_factory=list)  # runs left out: another had their entry


def one_budget_surveys(best: list[Run], cells: list[Cell]) -> list[OneBudgetSurvey]:
  """Per size (``model.size``, else non-embedding params), the survey view of the best-lr runs — when
  that size has at least one recurrent mixer both pure and hybridized."""
  by_size = defaultdict(list)
  for r in best:  # eval losses only (a run without an eval shows its training loss elsewhere)
    if r.status == FINISHED and r.loss is not None and r.loss_source != "train" and not r.is_mqar:
      by_size[r.model.get("size") or _count(r.non_embedding_params)].append(r)
  grid = {c.best.run_id: len(c.grid) for c in cells if c.best is not None}
  out = []
  for size, members in sorted(by_size.items(), key=lambda kv: min(r.non_embedding_params or 0 for r in kv[1])):
    mixers: dict[str, dict] = defaultdict(dict)
    references, merged = [], []
    for r in sorted(members, key=lambda r: r.loss):  # where two runs share an entry, the better is kept
      kind, mixer = _kind(r)
      slot = "pure" if kind == "pure" else r.window if kind == "hybrid" and r.window is not None else None
      if kind == "reference":
        references.append(r)
      elif slot is not None and slot in mixers[mixer]:
        merged.append(f"`{r.run_id}` ({r.series}) behind `{mixers[mixer][slot].run_id}`")
      elif slot is not None:
        mixers[mixer][slot] = r
    if not any("pure" in v and len(v) > 1 for v in mixers.values()):
      continue
    windows = sorted({w for v in mixers.values() for w in v if w != "pure"})
    out.append(OneBudgetSurvey(str(size), windows, dict(mixers), sorted(references, key=lambda r: (r.label, r.window or 0)),
                               any(grid.get(r.run_id, 1) < 2 for r in members), merged))
  return out


def _survey_order(survey: OneBudgetSurvey) -> list[str]:
  """Mixers by their hybrid's loss at the smallest window (the survey's question), then pure loss."""
  first = survey.windows[0] if survey.windows else None
  key = lambda m: (survey.mixers[m].get(first).loss if survey.mixers[m].get(first) else math.inf,
                   survey.mixers[m]["pure"].loss if "pure" in survey.mixers[m] else math.inf)
  return sorted(survey.mixers, key=key)


def one_budget_section(surveys: list[OneBudgetSurvey], figure: str | None) -> tuple[list[str], list[dict]]:
  """Markdown and JSON: per size, each mixer's pure and hybrid losses, its pure − hybrid gap per window,
  and the hybrid's difference to the Mamba hybrid of the same window (no intervals: one run each)."""
  md, data = [], []
  if not surveys:
    return md, data
  md += ["## The survey at one budget", "",
         "No scaling fit yet (one size, or too few budgets): each recurrent mixer's eval loss at its best "
         "learning rate, pure and as `(m, m, swa)` at each window; gap = pure − hybrid (positive: the window "
         "helps); vs Mamba = hybrid − the Mamba hybrid of the same window (negative: better). One run per "
         "entry, so no intervals.", ""] + ([f"![the survey at one budget]({figure})", ""] if figure else [])
  for survey in surveys:
    if survey.single_lr:
      md += [f"**{survey.size}: one learning rate per cell (untuned): differences between mixers may be the "
             "learning rate's, not the mixer's.**", ""]
    mamba = survey.mixers.get("mamba", {})
    rows = []
    for m in _survey_order(survey):
      entry = survey.mixers[m]
      pure = entry.get("pure")
      row = [m, _num(pure.loss, ".4f") if pure else "—"]
      record = {"size": survey.size, "mixer": m, "pure": pure.loss if pure else None}
      for w in survey.windows:
        hybrid = entry.get(w)
        gap = pure.loss - hybrid.loss if pure and hybrid else None
        versus = hybrid.loss - mamba[w].loss if hybrid and w in mamba and m != "mamba" else None
        row += [_num(hybrid.loss, ".4f") if hybrid else "—", _num(gap, "+.4f"), _num(versus, "+.4f")]
        record |= {f"hybrid_w{w}": hybrid.loss if hybrid else None, f"gap_w{w}": gap, f"vs_mamba_w{w}": versus}
      rows.append(row)
      data.append(record)
    header = ["mixer", "pure"] + [x for w in survey.windows for x in (f"hybrid w={w}", f"gap w={w}", f"vs Mamba w={w}")]
    md += [f"{survey.size} (sorted by the hybrid at the smallest window):", ""] + _table(header, rows) + [""]
    if survey.references:
      md += ["References: " + ", ".join(f"{r.label}" + (f" w={r.window}" if r.window else "") + f" {r.loss:.4f}"
                                       for r in survey.references) + ".", ""]
    if survey.merged:
      md += ["Left out (another run of the same mixer and window at this size had a lower loss): "
             + "; ".join(survey.merged) + ".", ""]
  return md, data


def plot_one_budget(surveys: list[OneBudgetSurvey], out: str) -> str | None:
  """One panel per size: mixers down the side (best hybrid first), eval loss across; pure hollow, each
  window's hybrid filled; references as vertical lines."""
  if not surveys:
    return None
  import matplotlib.pyplot as plt

  tallest = max(len(s.mixers) for s in surveys)
  fig, axes = plt.subplots(1, len(surveys), figsize=(6.8 * len(surveys), 1.4 + 0.32 * tallest), squeeze=False)
  markers = ["o", "^", "s", "D"]
  for ax, survey in zip(axes[0], surveys):
    order = _survey_order(survey)[::-1]  # best at the top
    y = {m: i for i, m in enumerate(order)}
    pure = [(survey.mixers[m]["pure"].loss, y[m]) for m in order if "pure" in survey.mixers[m]]
    ax.scatter(*zip(*pure), facecolors="white", edgecolors="black", s=30, label="pure", zorder=3)
    for i, w in enumerate(survey.windows):
      points = [(survey.mixers[m][w].loss, y[m]) for m in order if w in survey.mixers[m]]
      if points:
        ax.scatter(*zip(*points), marker=markers[(i + 1) % len(markers)], s=30, zorder=3, label=f"(m, m, swa) w={w}")
    for m in order:  # the window's effect, pure → hybrid
      ends = [survey.mixers[m][k].loss for k in ["pure", *survey.windows] if k in survey.mixers[m]]
      ax.plot([min(ends), max(ends)], [y[m], y[m]], color="gray", lw=0.8, zorder=1)
    styles = ["--", ":", "-.", (0, (1, 3))]
    for j, r in enumerate(survey.references):
      ax.axvline(r.loss, color="gray", ls=styles[j % len(styles)], lw=1,
                 label=f"{r.label}" + (f" w={r.window}" if r.window else ""))
    ax.set_yticks(range(len(order)), order)
    ax.set(xlabel="eval loss (best lr)", title=f"{survey.size}" + (", one lr per cell" if survey.single_lr else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the rows
  return _save(fig, out, "survey_one_budget.png")


@dataclasses.dataclass
class IsoFlop:
  series: str
  budget: float                             # median FLOPs of the budget's runs
  points: list[tuple[float, float]]         # (non-embedding params, loss)
  fit: fit_lib.IsoFlopFit | None


def isoflop_curves(runs: list[Run]) -> list[IsoFlop]:
  by_series = defaultdict(list)
  for run in runs:
    if run.status == FINISHED and run.flops and run.loss is not None and run.non_embedding_params:
      by_series[run.series].append(run)
  out = []
  for series, members in sorted(by_series.items()):
    budgets = fit_lib.group_budgets([r.flops for r in members])
    for b in sorted(set(budgets)):
      group = [r for r, g in zip(members, budgets) if g == b]
      if len({r.non_embedding_params for r in group}) < 3:
        continue
      best: dict[float, float] = {}  # best loss per size (over learning rates etc.)
      for r in group:
        best[r.non_embedding_params] = min(r.loss, best.get(r.non_embedding_params, math.inf))
      points = sorted(best.items())
      out.append(IsoFlop(series, float(np.median([r.flops for r in group])), points,
                         fit_lib.fit_isoflop([n for n, _ in points], [l for _, l in points])))
  return out


def _mqar_panels(runs: list[Run], require: str) -> dict[tuple, list[Run]]:
  """Finished MQAR runs by what they were tested on: ``(seq_len, kv pairs)``, or, for runs tested on a
  mixture (``data.eval_segments``, Based's Fig. 2), ``("mixture", segments)``: those runs share one
  test whatever length each trained at, so they share one panel."""
  panels = defaultdict(list)
  for run in runs:
    if run.status == FINISHED and run.is_mqar and run.accuracy is not None and getattr(run, require) is not None:
      segments = run.data.get("eval_segments")
      key = ("mixture", tuple(tuple(s) for s in segments)) if segments else (run.seq_len, run.data.get("num_kv_pairs"))
      panels[key].append(run)
  return dict(sorted(panels.items(), key=lambda kv: (1, str(kv[0])) if _is_mixture(kv[0])
                     else (0, tuple(x or 0 for x in kv[0]))))


def _is_mixture(panel: tuple) -> bool:
  return panel[0] == "mixture"


def _panel_title(panel: tuple) -> str:
  if not _is_mixture(panel):
    return f"seq_len {panel[0]}, {panel[1]} kv pairs"
  segments = panel[1]
  lengths, pairs = [s[0] for s in segments], [s[1] for s in segments]
  return (f"test: mixture of {len(segments)} segments, "
          f"seq_len {min(lengths)}–{max(lengths)}, {min(pairs)}–{max(pairs)} kv pairs")


def _mqar_key(run: Run) -> str:
  """Line label for MQAR plots: the label, plus the window when it is swept."""
  return run.label + (f" w={run.window}" if run.window is not None and "w=" in run.series else "")


# ----------------------------------------------------------------------------- plots


def _figure(n_panels: int, width: float = 4.2, height: float = 3.2):
  import matplotlib.pyplot as plt

  cols = min(n_panels, 3)
  rows = math.ceil(n_panels / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.flat[n_panels:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:n_panels])


def _save(fig, out: str, name: str) -> str:
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(os.path.join(out, name), dpi=DPI)
  plt.close(fig)
  return name


def plot_loss_vs_flops(runs: list[Run], fits: list[SeriesFit], out: str) -> str | None:
  """Loss vs FLOPs of the series with ≥ 3 budgets spanning ≥ 3× (``SeriesFit.plottable``); None if there is none.

  A sweep at (nearly) one budget — a window or length ablation — has no trend in FLOPs to show.
  """
  shown = [f for f in fits if f.plottable]
  if not shown:
    return None
  points = [r for r in runs if r.status == FINISHED and r.flops and r.loss is not None]
  fig, (ax,) = _figure(1, 6.4, 4.4)
  colors = _colors(f.series for f in shown)
  for f in shown:
    c = colors[f.series]
    members = [r for r in points if r.series == f.series]
    ax.scatter([r.flops for r in members], [r.loss for r in members], color=c, alpha=0.35, s=14)
    ax.scatter(*zip(*f.frontier), color=c, s=22)
    name = f.series
    if f.fit:
      grid = np.geomspace(min(x for x, _ in f.frontier), max(x for x, _ in f.frontier), 100)
      ci = f" [{f.fit.alpha_ci[0]:.3f}, {f.fit.alpha_ci[1]:.3f}]" if f.fit.alpha_ci else ""
      name += f": α={f.fit.alpha:.3f}{ci}"
      ax.plot(grid, f.fit.predict(grid), color=c, lw=1.4)
    ax.plot([], [], color=c, marker="o", ls="-" if f.fit else "none", label=name)
  fitted = any(f.fit for f in shown)
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="eval loss",
         title="loss vs compute" + (", fits L = E + A·C^(−α)" if fitted else " (no fit)"))
  _log_ticks(ax.xaxis, [r.flops for r in points if r.series in colors])
  _log_ticks(ax.yaxis, [r.loss for r in points if r.series in colors])
  ax.legend(fontsize=7)
  return _save(fig, out, "loss_vs_flops.png")


def plot_isoflop(curves: list[IsoFlop], out: str) -> str | None:
  if not curves:
    return None
  series = sorted({c.series for c in curves})
  fig, axes = _figure(len(series))
  for ax, s in zip(axes, series):
    mine = [c for c in curves if c.series == s]
    colors = {c.budget: col for c, col in zip(mine, _colors_seq(len(mine)))}
    for c in mine:
      ns, ls = zip(*c.points)
      ax.scatter(ns, ls, color=colors[c.budget], s=16, label=f"C={c.budget:.2g}")
      if c.fit:
        grid = np.geomspace(min(ns), max(ns), 100)
        ax.plot(grid, c.fit.predict(grid), color=colors[c.budget], lw=1.2)
        ax.axvline(c.fit.n_opt, color=colors[c.budget], ls=":", lw=1)
    ax.set(xscale="log", xlabel="non-embedding params", ylabel="eval loss", title=s)
    _log_ticks(ax.xaxis, [n for c in mine for n, _ in c.points], max_ticks=6)
    ax.legend(fontsize=7)
  return _save(fig, out, "isoflop.png")


# Mantissas of log-axis ticks, coarse to fine: the coarsest giving ≥ 3 ticks in the data's range is used.
_MANTISSAS = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8),
              tuple(np.round(np.arange(1, 10, 0.5), 1)), tuple(np.round(np.arange(1, 10, 0.2), 1)))


def _tick_text(v: float) -> str:
  text = f"{v:.3g}"
  if "e" in text:  # 2e+14 → 2e14
    mantissa, exponent = text.split("e")
    text = f"{mantissa}e{int(exponent)}"
  return text


def log_ticks(lo: float, hi: float, max_ticks: int = 7) -> list[float]:
  """Readable ticks for a log axis over [lo, hi]: 3 to ``max_ticks`` round numbers (1-2-5 style)."""
  if not (lo > 0 and hi > 0):
    return []
  lo, hi = min(lo, hi), max(lo, hi)
  decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
  candidates = []
  for mantissas in _MANTISSAS:
    ticks = sorted({float(f"{m * 10.0**d:.6g}") for d in decades for m in mantissas})
    ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    candidates.append(ticks)
    if len(ticks) >= 3:
      break
  ticks = candidates[-1]
  if len(ticks) < 2:  # a range narrower than the finest mantissas: its ends and geometric middle
    ticks = sorted({float(f"{v:.3g}") for v in np.geomspace(lo, hi, 3)})
  step = math.ceil(len(ticks) / max_ticks)
  return ticks[::step]


def _log_ticks(axis, values, max_ticks: int = 7) -> None:
  """Put ``log_ticks`` of the values' range on a log axis, with plain labels and no minor labels."""
  from matplotlib.ticker import FixedLocator, NullFormatter

  values = [v for v in values if v is not None and v > 0]
  if not values:
    return
  ticks = log_ticks(min(values), max(values), max_ticks)
  if not ticks:
    return
  axis.set_major_locator(FixedLocator(ticks))
  axis.set_major_formatter(_fixed_formatter(ticks))
  axis.set_minor_formatter(NullFormatter())


def _fixed_formatter(ticks):
  from matplotlib.ticker import FuncFormatter

  return FuncFormatter(lambda v, _pos: _tick_text(v))


def _colors_seq(n: int):
  import matplotlib.pyplot as plt

  return [plt.get_cmap("viridis")(0.85 * i / max(n - 1, 1)) for i in range(n)]  # not the pale yellow end


def mqar_width_table(runs: list[Run]) -> dict[tuple, dict[str, dict[int, Run]]]:
  """(seq_len, kv pairs) → line (mixer) → d_model → the best run (over lr and the other swept fields)."""
  table: dict[tuple, dict[str, dict[int, Run]]] = {}
  for panel, members in _mqar_panels(runs, "label").items():
    if _is_mixture(panel):  # Based's Fig. 2 sweeps each mixer's state knob: its question is the state plot
      continue
    lines: dict[str, dict[int, Run]] = defaultdict(dict)
    for r in members:
      d = r.model.get("d_model")
      if d not in lines[_mqar_key(r)] or r.accuracy > lines[_mqar_key(r)][d].accuracy:
        lines[_mqar_key(r)][d] = r
    table[panel] = dict(sorted(lines.items()))
  return table


def plot_mqar_width(runs: list[Run], out: str, edge: frozenset[str] = frozenset()) -> str | None:
  """Zoology Fig. 2: accuracy vs d_model (log2), one line per mixer, one panel per (seq_len, kv pairs).

  ``runs`` are the best-lr runs of their cells; a point whose cell's best lr is at the edge of its
  grid (run id in ``edge``) is drawn hollow.
  """
  table = {k: v for k, v in mqar_width_table(runs).items() if len({d for line in v.values() for d in line}) >= 2}
  if not table:
    return None
  fig, axes = _figure(len(table))
  colors = _colors(key for lines in table.values() for key in lines)
  any_edge = False
  for ax, (panel, lines) in zip(axes, table.items()):
    for key, by_width in lines.items():
      widths = sorted(by_width)
      ax.plot(widths, [by_width[w].accuracy for w in widths], color=colors[key], label=key, lw=1.4, marker="o", ms=5)
      hollow = [w for w in widths if by_width[w].run_id in edge]
      any_edge |= bool(hollow)
      if hollow:
        ax.plot(hollow, [by_width[w].accuracy for w in hollow], ls="none", marker="o", ms=5, color=colors[key],
                markerfacecolor="white")
    widths = sorted({d for line in lines.values() for d in line})
    ax.set(xlabel="d_model", ylabel="MQAR accuracy (best lr)", ylim=(-0.02, 1.02), title=_panel_title(panel))
    ax.set_xscale("log", base=2)
    ax.set_xlim(widths[0] / 1.25, widths[-1] * 1.25)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_formatter(_null_formatter())
    ax.xaxis.set_minor_locator(_null_locator())
    if any_edge:
      ax.plot([], [], marker="o", ls="none", color="gray", markerfacecolor="white", label="best lr at grid edge")
    ax.legend(fontsize=7, loc="lower right")
  return _save(fig, out, "mqar_vs_width.png")


def _null_formatter():
  from matplotlib.ticker import NullFormatter

  return NullFormatter()


def _null_locator():
  from matplotlib.ticker import NullLocator

  return NullLocator()


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The (state, accuracy) points that no smaller-or-equal state beats in accuracy."""
  frontier, best = [], -math.inf
  for state, acc in sorted(points, key=lambda p: (p[0], -p[1])):
    if acc > best:
      frontier.append((state, acc))
      best = acc
  return frontier


def plot_state_tradeoff(runs: list[Run], out: str, edge: frozenset[str] = frozenset()) -> str | None:
  """Based Fig. 2: accuracy vs recurrent state bytes of the best-lr runs, Pareto frontier dashed."""
  panels = {k: v for k, v in _mqar_panels(runs, "state_bytes").items() if len(v) >= 2}
  if not panels:
    return None
  fig, axes = _figure(len(panels))
  colors = _colors(r.label for v in panels.values() for r in v)
  for ax, (panel, members) in zip(axes, panels.items()):
    for label in sorted({r.label for r in members}):
      mine = [r for r in members if r.label == label]
      ax.scatter([], [], s=18, color=colors[label], label=label)  # legend: filled whatever the first point is
      ax.scatter([r.state_bytes for r in mine], [r.accuracy for r in mine], s=18, edgecolors=colors[label],
                 facecolors=["white" if r.run_id in edge else colors[label] for r in mine])
    frontier = pareto_frontier([(r.state_bytes, r.accuracy) for r in members])
    frontier.append((max(r.state_bytes for r in members), frontier[-1][1]))  # flat to the largest state
    ax.step(*zip(*frontier), where="post", color="black", lw=1, ls="--", label="Pareto frontier")
    if any(r.run_id in edge for r in members):
      ax.scatter([], [], s=18, edgecolors="gray", facecolors="white", label="best lr at grid edge")
    ax.set(xscale="log", xlabel="recurrent state (bytes / sequence)", ylabel="MQAR accuracy (best lr)",
           ylim=(-0.02, 1.02), title=_panel_title(panel).replace(", seq_len", "\nseq_len"))
    _log_ticks(ax.xaxis, [r.state_bytes for r in members], max_ticks=6)
    ax.legend(fontsize=7, loc="lower right")
  return _save(fig, out, "state_tradeoff.png")


def state_tradeoff_section(best: list[Run], cells: list[Cell]) -> list[str]:
  """Markdown: per panel of the state plot, every best-lr point by state size — mixer, the fields that
  set its state (those that vary among the mixer's points), accuracy and winning lr, and whether it
  is on the Pareto frontier."""
  cell_of = {c.best.run_id: c for c in cells if c.best is not None}
  md = []
  for panel, members in _mqar_panels(best, "state_bytes").items():
    if len(members) < 2:
      continue
    frontier = set(pareto_frontier([(r.state_bytes, r.accuracy) for r in members]))
    knobs = {}
    for label in {r.label for r in members}:
      mine = [r for r in members if r.label == label]
      knobs[label] = [k for k in STATE_KNOBS if len({json.dumps(r.model.get(k)) for r in mine}) > 1]
    rows = []
    for r in sorted(members, key=lambda r: (r.state_bytes, -r.accuracy)):
      knob = ", ".join(f"{k}={r.model.get(k)}" for k in knobs[r.label]) or "—"
      lr, flags = _chosen_lr(r, cell_of)
      rows.append([r.label, knob, f"{r.state_bytes:,.0f}", f"{r.accuracy:.3f}", lr.removeprefix("lr ") + flags,
                   "yes" if (r.state_bytes, r.accuracy) in frontier else ""])
    md += [f"{_panel_title(panel)} — each point's best learning rate, by state size:", ""]
    md += _table(["mixer", "state knob", "state bytes / sequence", "accuracy", "lr", "on the frontier"], rows) + [""]
  return md


# Model fields that set a mixer's recurrent state (Based Fig. 2's knobs); the state table names those a
# mixer's points differ in.
STATE_KNOBS = ("d_model", "feature_dim", "window", "d_state", "key_expansion", "heads", "head_dim")


# The figures a report writes into ``out`` (fixed names, and one per evaluated run).
REPORT_FIGURES = ("loss_vs_flops.png", "isoflop.png", "mqar_vs_width.png", "state_tradeoff.png", "window_ablation.png",
                  "survey_one_budget.png")
REPORT_FIGURE_PREFIXES = ("retrieval_", "position_")


def _remove_stale_figures(out: str, drawn: list[str]) -> None:
  """A figure the previous report in ``out`` drew (its ``report.json`` lists it) and this one did not —
  its question no longer applies, or a fixed report stopped drawing it — would sit beside report.md as
  if current: removed. Nothing the previous report did not write is touched."""
  try:
    with open(os.path.join(out, "report.json")) as f:
      previous = json.load(f).get("figures") or []
  except (OSError, ValueError, AttributeError):
    return
  for name in previous:
    ours = isinstance(name, str) and os.path.basename(name) == name and (
        name in REPORT_FIGURES or (name.endswith(".png") and name.startswith(REPORT_FIGURE_PREFIXES)))
    if ours and name not in drawn and os.path.isfile(os.path.join(out, name)):
      os.remove(os.path.join(out, name))


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _floats(values) -> np.ndarray:
  """A float array with ``null`` as NaN (evaluate.py writes null where nothing was scored)."""
  return np.array(values, dtype=object).astype(np.float64) if len(values) else np.zeros(0)


def plot_retrieval(run: Run, out: str, problems: list[str]) -> str | None:
  """One heatmap per retrieval task (``by_task``, else the single ``accuracy`` grid), length × depth."""
  data = run.evals.get("retrieval")
  if not isinstance(data, dict):
    return None
  try:
    lengths, depths = list(data["lengths"]), list(data["depths"])
    by_task = data.get("by_task")
    if not isinstance(by_task, dict):
      by_task = {data.get("task") or "": data["accuracy"]}
    grids = {task: np.array([_floats(row) for row in grid]) for task, grid in sorted(by_task.items())}
    for task, grid in grids.items():
      if grid.shape != (len(lengths), len(depths)):
        raise ValueError(f"{task or 'accuracy'} has shape {grid.shape}, "
                         f"lengths × depths is {(len(lengths), len(depths))}")
  except (KeyError, TypeError, ValueError) as e:
    problems.append(f"`{run.run_id}/eval/retrieval.json` does not hold lengths × depths accuracy ({e}); no heatmap")
    return None
  fig, axes = _figure(len(grids), 1.4 + 0.7 * len(depths), 1.2 + 0.45 * len(lengths))
  for ax, (task, acc) in zip(axes, grids.items()):
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    for i in range(len(lengths)):
      for j in range(len(depths)):
        ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="black" if acc[i, j] > 0.6 else "white")
    ax.set(xlabel="depth", ylabel="length", title=f"{task or 'retrieval'}: {run.label}")
    fig.colorbar(image, ax=ax)
  return _save(fig, out, f"retrieval_{_safe(run.run_id)}.png")


def plot_position(run: Run, out: str, problems: list[str]) -> str | None:
  """Loss at each position, one line per evaluated length; the window and training length marked."""
  data = run.evals.get("position")
  if not isinstance(data, dict) or not isinstance(data.get("loss_by_position"), dict):
    return None
  try:
    curves = {int(length): _floats(curve) for length, curve in data["loss_by_position"].items()}
  except (TypeError, ValueError) as e:
    problems.append(f"`{run.run_id}/eval/position.json` is malformed ({e}); no plot")
    return None
  fig, (ax,) = _figure(1, 6.0, 3.6)
  for length, curve in sorted(curves.items()):
    scored = np.isfinite(curve)  # MQAR scores only the answer positions
    ax.plot(np.arange(1, len(curve) + 1)[scored], curve[scored], lw=1, marker="." if scored.mean() < 0.5 else None,
            ms=3, label=f"length {length}")
  for key, style in (("window", ":"), ("train_seq_len", "--")):
    if _finite(data.get(key)):
      ax.axvline(data[key], color="gray", ls=style, lw=1, label=key)
  ax.set(xscale="log", xlabel="position", ylabel="loss", title=f"loss by position: {run.label}")
  ax.legend(fontsize=7)
  return _save(fig, out, f"position_{_safe(run.run_id)}.png")


def _compact_eval(run: Run, name: str) -> dict:
  """What ``hybrids.evaluate`` put in ``summary.json["evals"][name]`` (its compact figures; {} if none)."""
  evals = run.summary.get("evals")
  found = evals.get(name) if isinstance(evals, dict) else None
  return found if isinstance(found, dict) else {}


def retrieval_accuracy(run: Run) -> float | None:
  """Mean retrieval accuracy over the tasks (each ``hybrids.evaluate``'s mean over its lengths × depths
  grid), from the run's compact evals (None: none)."""
  compact = _compact_eval(run, "retrieval")
  by_task = compact.get("by_task")
  values = [_finite(v) for v in by_task.values()] if isinstance(by_task, dict) else [_finite(compact.get("accuracy"))]
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def tail_loss(run: Run) -> tuple[float | None, int | None]:
  """``(loss over the last eighth of the positions, length)`` at the longest evaluated length, as
  ``hybrids.evaluate`` computed it (``tail_loss`` of the compact position eval; ``(None, None)``: none)."""
  tails = _compact_eval(run, "position").get("tail_loss")
  try:
    by_length = {int(n): _finite(v) for n, v in tails.items()}
  except (AttributeError, TypeError, ValueError):
    return None, None
  if not by_length:
    return None, None
  length = max(by_length)
  return by_length[length], length


# Per-run eval figures (a retrieval heatmap, a loss-by-position plot) only up to this many runs: a
# survey's hundreds are read from the by-size table and plot instead.
MAX_RUN_EVAL_FIGURES = 12


def evals_by_size(best: list[Run]) -> tuple[list[str], list[dict]]:
  """Markdown and JSON rows of the best runs' retrieval accuracy and tail loss by size, one row per
  pattern (label and window), one column per non-embedding size: the survey's recall question."""
  rows = [r for r in best if retrieval_accuracy(r) is not None or tail_loss(r)[0] is not None]
  if not rows:
    return [], []
  sizes: list[float | None] = sorted({r.non_embedding_params for r in rows if r.non_embedding_params is not None})
  sizes += [None] if any(r.non_embedding_params is None for r in rows) else []  # runs from before the count
  series: dict[tuple[str, str], dict[float | None, Run]] = defaultdict(dict)
  for r in rows:
    series[(r.label, r.window_text)][r.non_embedding_params] = r
  md = ["## Recall and long-context loss by size", "",
        "Each pattern's best learning rate: mean retrieval accuracy over `eval/retrieval.json`'s tasks, lengths "
        "and depths, and the loss over the last eighth of the positions at the longest length of "
        "`eval/position.json` (`python -m launch evaluate ROOT --eval retrieval,position --best`).", ""]
  header = ["mixer", "window"] + [f"{_count(n) if n else 'size unknown'} recall / tail loss" for n in sizes]
  table, records = [], []
  for (label, window), by_size in sorted(series.items()):
    cells = []
    for n in sizes:
      r = by_size.get(n)
      acc = retrieval_accuracy(r) if r else None
      loss, length = tail_loss(r) if r else (None, None)
      cells.append(f"{_num(acc, '.3f')} / {_num(loss, '.3f')}" if r else "—")
      if r:
        records.append({"run_id": r.run_id, "label": label, "window": r.window, "non_embedding_params": n,
                        "retrieval_accuracy": acc, "tail_loss": loss, "tail_loss_length": length})
    table.append([label, window] + cells)
  return md + _table(header, table) + [""], records


def plot_evals_by_size(records: list[dict], out: str) -> str | None:
  """Retrieval accuracy against non-embedding parameters, one line per pattern (hybrids with SWA dashed)."""
  points = [r for r in records if r["retrieval_accuracy"] is not None and r["non_embedding_params"]]
  lines: dict[tuple[str, Any], list[dict]] = defaultdict(list)
  for r in points:
    lines[(r["label"], r["window"])].append(r)
  if not any(len(v) >= 2 for v in lines.values()):
    return None
  fig, (ax,) = _figure(1, 7.0, 4.2)
  colors = _colors([label for label, _ in lines])
  for (label, window), members in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
    members.sort(key=lambda r: r["non_embedding_params"])
    ax.plot([r["non_embedding_params"] for r in members], [r["retrieval_accuracy"] for r in members],
            marker="o", ms=3, lw=1, color=colors[label], ls="--" if window is not None else "-",
            label=label if window is None else f"{label} w={window}")
  ax.set(xscale="log", ylim=(0, 1.02), xlabel="non-embedding parameters", ylabel="retrieval accuracy",
         title="recall by size (best learning rate)")
  _log_ticks(ax.xaxis, [r["non_embedding_params"] for r in points], max_ticks=6)
  ax.legend(fontsize=6, ncol=2)
  return _save(fig, out, "recall_by_size.png")


GLOBAL = "global"


def _window_line(run: Run) -> tuple[str, int | None]:
  """(label, window) of an ablation line; global attention (no SWA layer) has window None."""
  return run.label, run.window


def _line_text(label: str, window: int | None) -> str:
  return f"{label} w={window}" if window is not None else f"{label} ({GLOBAL})"


@dataclasses.dataclass
class WindowAblation:
  """panel (size) → (label, window) → seq_len → the best run (lowest eval loss over lr etc.).

  ``by`` is ``"window"`` when some label sweeps its window (loss against window, one line per
  (label, seq_len), global attention as a horizontal line), else ``"seq_len"`` (loss against the
  training length, one line per (label, window)).
  """
  panels: dict[str, dict[tuple[str, int | None], dict[int, Run]]]
  by: str


def window_ablation(runs: list[Run]) -> WindowAblation | None:
  """The window study of Griffin (App. E): SWA stacks against each other's windows or global attention.

  Present when language-model runs with an SWA layer either sweep the window within a label, or sit
  beside global attention runs (no SWA layer, with attention) at two or more shared training lengths.
  """
  done = [r for r in runs if r.status == FINISHED and r.loss is not None and r.loss_source != "train"
          and not r.is_mqar]  # MQAR is compared by accuracy (the MQAR plots), not eval loss
  local = [r for r in done if r.window is not None]
  global_ = [r for r in done if r.window is None and "attention" in r.mixers]
  windows_by_label = defaultdict(set)
  for r in local:
    windows_by_label[r.label].add(r.window)
  swept = any(len(w) > 1 for w in windows_by_label.values())
  beside_global = len({r.seq_len for r in local} & {r.seq_len for r in global_}) >= 2
  if not local or not (swept or beside_global):
    return None
  seq_lens = {r.seq_len for r in local}
  panels: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
  for r in local + global_:
    if r.seq_len not in seq_lens:
      continue
    panel = r.model.get("size") or f"d_model {r.model.get('d_model')}"
    line = panels[panel][_window_line(r)]
    if r.seq_len not in line or r.loss < line[r.seq_len].loss:
      line[r.seq_len] = r
  return WindowAblation({k: dict(v) for k, v in sorted(panels.items())}, "window" if swept else "seq_len")


def _line_order(line: tuple[str, int | None]):
  return (line[0], line[1] if line[1] is not None else math.inf)


def plot_window_ablation(ablation: WindowAblation | None, out: str) -> str | None:
  if ablation is None:
    return None
  fig, axes = _figure(len(ablation.panels), 5.6, 3.8)
  for ax, (panel, lines) in zip(axes, ablation.panels.items()):
    losses = [r.loss for line in lines.values() for r in line.values()]
    if ablation.by == "seq_len":
      colors = _colors(_line_text(*line) for line in lines)
      seq_lens = sorted({t for line in lines.values() for t in line})
      for line in sorted(lines, key=_line_order):
        ts = sorted(lines[line])
        text = _line_text(*line)
        ax.plot(ts, [lines[line][t].loss for t in ts], marker="o", color=colors[text], label=text,
                ls="--" if line[1] is None else "-")
      ax.set_xscale("log", base=2)
      ax.set_xlim(seq_lens[0] / 1.3, seq_lens[-1] * 1.3)
      ax.set_xticks(seq_lens, [str(t) for t in seq_lens])
      ax.set(xlabel="training sequence length", title=f"eval loss vs training length ({panel})")
    else:
      seq_lens = sorted({t for line in lines.values() for t in line})
      t_colors = dict(zip(seq_lens, _colors_seq(len(seq_lens))))
      styles = dict(zip(sorted({label for label, w in lines if w is not None}), ("-", "-.", ":", (0, (5, 1)))))
      markers = dict(zip(styles, "osD^v"))
      windows = sorted({w for _, w in lines if w is not None})
      by_label = defaultdict(dict)  # (label, T) → window → loss
      for (label, w), line in lines.items():
        for t, r in line.items():
          if w is not None:
            by_label[(label, t)][w] = r.loss
          else:
            ax.axhline(r.loss, color=t_colors[t], ls="--", lw=1, label=f"{label} ({GLOBAL}), T={t}")
      for (label, t), by_w in sorted(by_label.items()):
        ws = sorted(by_w)
        ax.plot(ws, [by_w[w] for w in ws], color=t_colors[t], ls=styles.get(label, "-"),
                marker=markers.get(label, "o"), label=f"{label}, T={t}")
      ax.set_xscale("log", base=2)
      ax.set_xlim(windows[0] / 1.3, windows[-1] * 1.3)
      ax.set_xticks(windows, [str(w) for w in windows])
      ax.set(xlabel="local attention window", title=f"eval loss vs window ({panel})")
    ax.xaxis.set_minor_locator(_null_locator())
    ax.xaxis.set_minor_formatter(_null_formatter())
    pad = 0.08 * (max(losses) - min(losses) or abs(max(losses)) * 0.05 or 0.05)
    ax.set_ylim(min(losses) - pad, max(losses) + pad)
    ax.set_ylabel("eval loss (best lr)")
    ax.legend(fontsize=7)
  return _save(fig, out, "window_ablation.png")


def window_ablation_table(ablation: WindowAblation) -> list[str]:
  """One markdown table per panel: a row per line, a column per training length (loss and its lr)."""
  md = []
  for panel, lines in ablation.panels.items():
    seq_lens = sorted({t for line in lines.values() for t in line})
    rows = []
    for line in sorted(lines, key=_line_order):
      rows.append([_line_text(*line)] + [f"{lines[line][t].loss:.4f} (lr {_lr_text(run_lr(lines[line][t]))})"
                                         if t in lines[line] else "—" for t in seq_lens])
    if len(ablation.panels) > 1:
      md += [f"{panel}:", ""]
    md += _table(["mixer", *(f"T={t}" for t in seq_lens)], rows) + [""]
  return md


# ----------------------------------------------------------------------------- markdown


def _num(v, spec: str = ".3g") -> str:
  return "—" if v is None else format(v, spec)


def _ratio(v: float) -> str:
  return f"{v:.2f}" if v < 10 else f"{v:.3g}"


def _count(v) -> str:
  if v is None:
    return "—"
  for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(v) >= scale:
      return f"{v / scale:.3g}{unit}"
  return f"{v:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def missing_points(root: str, runs: list[Run], problems: list[str]) -> tuple[list[list[str]], bool]:
  """Rows (run id, state, point) for every sweep.json point without a finished run; and whether sweep.json was read."""
  manifest = _read_json(os.path.join(root, MANIFEST_FILE), problems)
  by_id = {r.run_id: r for r in runs}
  rows = []
  if not isinstance(manifest, dict):
    for r in runs:
      if r.status != FINISHED:
        rows.append([r.run_id, r.status, "—"])
    return rows, False
  for entry in manifest.get("points", []):
    rid = entry.get("run_id", "?")
    point = " ".join(f"{k}={v}" for k, v in (entry.get("point") or {}).items()) or "(base config)"
    run = by_id.get(rid)
    if run is None:
      rows.append([rid, "not started", point])
    elif run.status != FINISHED:
      error = run.summary.get("error")
      state = f"{run.status} at step {run.summary.get('step', '?')}/{run.summary.get('steps', '?')}"
      rows.append([rid, state + (f": {str(error)[:120]}" if error else ""), point])
  return rows, True


def _json_safe(obj):
  """NaN / ±inf → None (strict JSON), tuples → lists, recursively."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, np.generic):
    return _json_safe(obj.item())
  return obj


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def report_data(root: str, runs: list[Run], cells: list[Cell], fits: list[SeriesFit], curves: list[IsoFlop],
                figures: list[str], missing: list[list[str]], survey: dict | None = None,
                evals_by_size: list[dict] | None = None, compute: dict | None = None) -> dict:
  """What ``report.json`` holds: every run (resolved config + summary), the per-cell bests and the fits."""
  cell_of = {r.run_id: i for i, c in enumerate(cells) for r in c.runs}
  best_ids = {c.best.run_id for c in cells if c.best is not None}
  runs_out = []
  for r in runs:
    runs_out.append({
        "run_id": r.run_id, "status": r.status, "label": r.label, "series": r.series, "lr": run_lr(r),
        "cell": cell_of.get(r.run_id), "best_in_cell": r.run_id in best_ids,
        "flops": r.flops, "flops_source": r.flops_source, "loss": r.loss, "loss_source": r.loss_source,
        "accuracy": r.accuracy, "config": r.config, "summary": r.summary})
  cells_out = []
  for i, c in enumerate(cells):
    by_lr = {run_lr(r): r for r in c.runs}
    cells_out.append({
        "cell": i, "name": c.name, "label": c.label, "fields": c.fields, "metric": c.metric,
        "higher_is_better": c.higher_is_better, "best_lr": c.best_lr,
        "best_metric": c.scores.get(c.best_lr) if c.best_lr is not None else None,
        "best_run": c.best.run_id if c.best else None, "tied_lrs": c.winners, "edge": c.edge,
        "lrs": [{"lr": lr, "metric": c.scores.get(lr), "run_id": by_lr[lr].run_id if lr in by_lr else None,
                 "status": by_lr[lr].status if lr in by_lr else "not started"} for lr in c.grid],
        "missing": [{"lr": lr, "reason": why} for lr, why in c.missing], "decided": c.decided,
        "stopped_with_cell": sorted(run_lr(r) for r in c.runs if r.stopped_with_cell)})
  fits_out = []
  for f in fits:
    fit = f.fit
    fits_out.append({
        "series": f.series, "n_budgets": len(f.frontier), "flops_span": f.span, "plotted": f.plottable,
        "frontier": [list(p) for p in f.frontier], "note": f.note,
        "E": fit.E if fit else None, "A": fit.A if fit else None, "alpha": fit.alpha if fit else None,
        "alpha_ci": list(fit.alpha_ci) if fit and fit.alpha_ci else None,
        "E_ci": list(fit.E_ci) if fit and fit.E_ci else None, "n": fit.n if fit else None,
        "n_bootstrap": fit.n_bootstrap if fit else 0})
  iso_out = [{"series": c.series, "budget": c.budget, "points": [list(p) for p in c.points],
              "n_opt": c.fit.n_opt if c.fit else None, "loss_opt": c.fit.loss_opt if c.fit else None,
              "coeffs": list(c.fit.coeffs) if c.fit else None} for c in curves]
  return _json_safe({"root": root, "generated_by": f"python -m launch report {root}", "runs": runs_out,
                     "cells": cells_out, "fits": fits_out, "isoflop": iso_out, "figures": figures,
                     "survey": survey, "evals_by_size": evals_by_size or [], "compute": compute or {},
                     "missing": [{"run_id": a, "state": b, "point": c} for a, b, c in missing]})


def compute_spent(runs: list[Run]) -> tuple[list[str], dict]:
  """"Compute spent": device hours by device kind, summed over every attempt of every run
  (:func:`launch.runs.attempt_device_seconds`: wall time × devices ÷ processes sharing them ÷ runs in a
  lockstep group), and finished runs per device hour. Runs whose attempts were not kept (archives made
  before ``launch pack`` carried ``launch.json``) and attempts with no end are counted, not timed."""
  by_kind: dict[str, dict] = {}
  untimed_runs, open_attempts = 0, 0
  for r in runs:
    if not r.attempts:
      untimed_runs += 1
      continue
    hardware = r.summary.get("hardware") if isinstance(r.summary.get("hardware"), dict) else {}
    for a in r.attempts:
      seconds = run_dirs.attempt_device_seconds({"device_count": hardware.get("device_count"), **a})
      if seconds is None:
        open_attempts += 1
        continue
      kind = a.get("device_kind") or hardware.get("device_kind") or "unknown"
      row = by_kind.setdefault(kind, {"device": kind, "attempts": 0, "device_hours": 0.0, "runs": set()})
      row["attempts"] += 1
      row["device_hours"] += seconds / 3600.0
      row["runs"].add(r.run_id)
  finished = {r.run_id for r in runs if r.status == FINISHED}
  rows_out = []
  for row in sorted(by_kind.values(), key=lambda x: -x["device_hours"]):
    done = len(row["runs"] & finished)
    rows_out.append({"device": row["device"], "attempts": row["attempts"], "device_hours": row["device_hours"],
                     "runs": len(row["runs"]), "finished_runs": done,
                     "finished_per_device_hour": done / row["device_hours"] if row["device_hours"] > 0 else None})
  data = {"by_device": rows_out, "untimed_runs": untimed_runs, "open_attempts": open_attempts}
  md = ["## Compute spent", ""]
  if rows_out:
    md += ["Device hours over every attempt of every run: wall time × devices ÷ the runs sharing them (packed "
           "processes, lockstep groups). A run trained on several kinds counts under each; finished runs per "
           "device hour divide the runs finished by all the time spent, the unfinished runs' included.", ""]
    md += _table(["device", "attempts", "device hours", "runs", "finished", "finished per device hour"],
                 [[f"`{x['device']}`", str(x["attempts"]), _num(x["device_hours"], ".2f"), str(x["runs"]),
                   str(x["finished_runs"]), _num(x["finished_per_device_hour"], ".1f")] for x in rows_out]) + [""]
  notes = []
  if untimed_runs:
    notes.append(f"{untimed_runs} run(s) have no attempt record (`launch.json` not kept): not timed")
  if open_attempts:
    notes.append(f"{open_attempts} attempt(s) have no end (running, or killed before they could say): not timed")
  return md + ([f"{'; '.join(notes)}.", ""] if notes else []), data


def learning_rate_section(cells: list[Cell]) -> list[str]:
  """Markdown: the protocol, a row per cell with every lr's metric, the flagged and incomplete cells."""
  md = ["## Learning rates", ""]
  multi = [c for c in cells if len(c.grid) > 1]
  if not multi:
    lrs = sorted({lr for c in cells for lr in c.grid})
    md += [f"Every cell ran at a single learning rate ({', '.join(_lr_text(lr) for lr in lrs) or 'none recorded'}): "
           "no learning rate was selected, and these runs cannot tell whether another would do better.", ""]
    return md
  lrs = sorted({lr for c in cells for lr in c.grid})
  md += ["A cell is one configuration (every config field but `train.lr`); its best learning rate is kept "
         "(MQAR: highest eval accuracy; otherwise lowest eval loss), and only that run enters the MQAR plots "
         "and tables. **edge** = the best learning rate is the smallest or largest the cell tried, so the "
         "optimum may lie outside the grid. Best value in bold.", ""]
  rows = []
  for c in cells:
    cols = []
    for lr in lrs:
      if lr in c.not_started:
        cols.append("not started")
      elif lr not in c.scores:
        cols.append("")
      elif c.scores[lr] is None:
        cols.append(c.reasons[lr])
      else:
        text = _num(c.scores[lr], ".3f" if c.higher_is_better else ".4f")
        cols.append(f"**{text}**" if lr == c.best_lr else text)
    note = []
    if c.edge:
      note.append("edge")
    if c.decided_early:
      note.append(f"decided at lr {_lr_text(c.best_lr)}")
      with_cell = sorted({run_lr(r) for r in c.runs if r.stopped_with_cell})
      if with_cell:
        note.append("stopped with it " + ", ".join(_lr_text(lr) for lr in with_cell))
    if c.missing:
      note.append(("not trained to the end " if c.decided else "missing ")
                  + ", ".join(f"{_lr_text(lr)} ({why})" for lr, why in c.missing))
    rows.append([c.name, "accuracy" if c.higher_is_better else "eval loss", *cols, _lr_text(c.best_lr),
                 "; ".join(note)])
  md += _table(["cell", "metric", *(f"lr {_lr_text(lr)}" for lr in lrs), "best lr", "flag"], rows) + [""]
  edge = [c for c in cells if c.edge]
  md += [f"Best learning rate at the edge of the grid ({len(edge)} of {len(cells)} cells): "
         + (", ".join(f"{c.name} (lr {_lr_text(c.best_lr)})" for c in edge) if edge else "none") + ".", ""]
  decided = [c for c in cells if c.decided_early]
  if decided:
    md += [f"Cells decided before every learning rate trained to its end ({len(decided)}): the best passed "
           "`train.stop_at_accuracy`, where every run stops, so the others cannot change the cell's accuracy "
           "by more than 1 − that accuracy (`launch sweep --cell-stop` stops them with it, or does not "
           "launch them); their values are where they stopped: " + ", ".join(c.name for c in decided) + ".", ""]
  incomplete = [c for c in cells if c.incomplete]
  if incomplete:
    md += [f"Cells missing learning rates ({len(incomplete)}): "
           + "; ".join(f"{c.name}: " + ", ".join(f"{_lr_text(lr)} {why}" for lr, why in c.missing) for c in incomplete)
           + ".", ""]
  single = [c for c in cells if len(c.grid) == 1]
  if single:
    md += [f"{len(single)} cell(s) ran at one learning rate only (no selection): "
           + ", ".join(c.name for c in single) + ".", ""]
  return md


def _chosen_lr(run: Run, cell_of: dict[str, Cell]) -> tuple[str, str]:
  """``("lr 2.2e-3 of 4", " **edge** (incomplete)")``: a best-lr run's rate, how many its cell tried, and
  its cell's flags."""
  c = cell_of.get(run.run_id)
  lr = f"lr {_lr_text(run_lr(run))}" + (f" of {len(c.grid)}" if c is not None and len(c.grid) > 1 else "")
  flags = " **edge**" if c is not None and c.edge else ""
  if c is not None and c.missing:
    flags += " (decided)" if c.decided else " (incomplete)"
  return lr, flags


def mqar_table_section(best: list[Run], cells: list[Cell]) -> list[str]:
  """Markdown: per (seq_len, kv pairs), MQAR accuracy of each mixer at each width, with its winning lr."""
  table = mqar_width_table(best)
  if not table:
    return []
  cell_of = {c.best.run_id: c for c in cells if c.best is not None}
  md = []
  for panel, lines in table.items():
    widths = sorted({d for line in lines.values() for d in line})
    rows = []
    for key, by_width in lines.items():
      cols = []
      for w in widths:
        r = by_width.get(w)
        if r is None:
          cols.append("—")
          continue
        lr, flags = _chosen_lr(r, cell_of)
        cols.append(f"{r.accuracy:.3f} ({lr}){flags}")
      rows.append([key, *cols])
    md += [f"{_panel_title(panel)} — accuracy of the best learning rate "
           "(lr shown; \"of n\": lrs tried):", ""]
    md += _table(["mixer", *(f"d_model {w}" for w in widths)], rows) + [""]
  return md


def build_report(root: str, out: str, *, n_bootstrap: int = 200, seed: int = 0) -> str:
  """Write ``out/report.md``, ``out/report.json`` and the PNGs; returns the path of report.md."""
  import matplotlib

  matplotlib.use("Agg")
  problems: list[str] = []
  runs = load_runs(root, problems)
  assign_labels(runs)
  os.makedirs(out, exist_ok=True)
  runs.sort(key=lambda r: (r.label, r.non_embedding_params or 0, r.series, r.seq_len or 0, run_lr(r) or 0, r.run_id))
  name = os.path.basename(os.path.normpath(root))
  done = [r for r in runs if r.status == FINISHED]
  md = [f"# {name}", "",
        f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'} in `{root}`, {len(done)} finished. "
        f"Generated by `python -m launch report {root}`; every run's config and summary, the per-cell "
        "learning-rate choice and the fits are in `report.json`.", ""]
  figures: list[str] = []

  manifest = _read_json(os.path.join(root, MANIFEST_FILE), [])  # missing_points reports an unreadable one
  started = {r.run_id for r in runs}
  pending = [e.get("point") or {} for e in (manifest.get("points", []) if isinstance(manifest, dict) else [])
             if isinstance(e, dict) and e.get("run_id") not in started]
  cells = learning_rate_cells(runs, pending)
  best = best_runs(runs, cells)
  edge = frozenset(c.best.run_id for c in cells if c.edge and c.best is not None)

  # The study's own question first: the window ablation, then MQAR accuracy; loss vs FLOPs after. Survey
  # runs (recurrent mixers pure and hybridized) have their own one-budget view instead of the ablation.
  fits = fit_series(runs, n_bootstrap=n_bootstrap, seed=seed)
  survey_md, survey = survey_section(fits)
  one_budget = one_budget_surveys(best, cells) if survey is None else []
  ablation = window_ablation([] if one_budget else best)
  figure = plot_window_ablation(ablation, out)
  if figure:
    figures.append(figure)
    what = ("against the window, one line per mixer and training length (global attention: dashed horizontal line)"
            if ablation.by == "window" else
            "against the training sequence length, one line per mixer and window (global attention dashed)")
    md += ["## Window ablation", "", f"Eval loss of the best learning rate {what} (Griffin App. E). Tokens per "
           "run are as the sweep set them; the run table lists them.", "", f"![window ablation]({figure})", ""]
    md += window_ablation_table(ablation)

  figure = plot_mqar_width(best, out, edge)
  if figure:
    figures.append(figure)
    md += ["## MQAR accuracy vs width", "",
           "Accuracy vs d_model, one line per mixer, one panel per (seq_len, kv pairs) (Zoology Fig. 2); each "
           "point is its cell's best learning rate" + (" (hollow: best lr at the edge of the grid)." if edge else "."),
           "", f"![MQAR accuracy vs width]({figure})", ""]
  md += mqar_table_section(best, cells)
  figure = plot_state_tradeoff(best, out, edge)
  if figure:
    figures.append(figure)
    md += ["## MQAR accuracy vs state size", "", "Accuracy of each cell's best learning rate vs recurrent state "
           "bytes per sequence; dashed: Pareto frontier (Based Fig. 2).", "",
           f"![MQAR accuracy vs state size]({figure})", ""]
    md += state_tradeoff_section(best, cells)

  figure = plot_loss_vs_flops(runs, fits, out)
  if figure:
    figures.append(figure)
    left_out = [f.series for f in fits if not f.plottable]
    md += ["## Loss vs training FLOPs", "",
           f"Series with ≥ {fit_lib.MIN_POINTS} budgets spanning ≥ {MIN_FLOPS_SPAN:g}× in FLOPs: each one's "
           "compute frontier (its lowest loss per budget, solid dots; other runs faded) fitted with "
           "L(C) = E + A·C^(−α) (Huber δ=1e-3 on log loss, L-BFGS-B from a grid; 95% percentile bootstrap "
           f"interval of α over {n_bootstrap} resamples of the runs)."
           + (f" Not plotted (too few budgets or too narrow a FLOPs range): {', '.join(left_out)}."
              if left_out else ""),
           "", f"![loss vs FLOPs]({figure})", ""]
    rows = []
    for f in fits:
      if f.fit:
        ci = f"[{f.fit.alpha_ci[0]:.3f}, {f.fit.alpha_ci[1]:.3f}]" if f.fit.alpha_ci else "—"
        rows.append([f.series, str(f.fit.n), f"{f.fit.E:.4g}", f"{f.fit.A:.4g}", f"{f.fit.alpha:.4f}", ci, f.note])
      else:
        rows.append([f.series, str(len(f.frontier)), "—", "—", "—", "—", f.note])
    md += _table(["mixer", "n", "E", "A", "α", "95% CI (α)", "note"], rows) + [""]
  elif fits:
    flops = [c for f in fits for c, _ in f.frontier]
    md += ["## Loss vs training FLOPs", "",
           f"Not drawn, and no scaling fit: no series has ≥ {fit_lib.MIN_POINTS} budgets spanning ≥ "
           f"{MIN_FLOPS_SPAN:g}× in training FLOPs (these runs span {min(flops):.3g} to {max(flops):.3g} FLOPs, "
           f"{_ratio(max(flops) / min(flops))}×).", ""]

  md += survey_md
  if one_budget:
    figure = plot_one_budget(one_budget, out)
    if figure:
      figures.append(figure)
    one_md, one_data = one_budget_section(one_budget, figure)
    md += one_md
    survey = {"one_budget": one_data}

  curves = isoflop_curves(runs)
  figure = plot_isoflop(curves, out)
  if figure:
    figures.append(figure)
    md += ["## IsoFLOP curves", "",
           "Loss vs non-embedding params at each budget, parabola in log params; its vertex is the compute-optimal "
           "size N*.", "", f"![isoFLOP]({figure})", ""]
    rows = [[c.series, f"{c.budget:.3g}", str(len(c.points)), _count(c.fit.n_opt) if c.fit else "—",
             _num(c.fit.loss_opt, ".4f") if c.fit else "—", "" if c.fit else "no minimum inside the sizes"]
            for c in curves]
    md += _table(["mixer", "budget (FLOPs)", "sizes", "N*", "loss at N*", "note"], rows) + [""]
    for s in sorted({c.series for c in curves}):
      optima = [(c.budget, c.fit.n_opt) for c in curves if c.series == s and c.fit]
      line = fit_lib.fit_loglog_line(*zip(*optima)) if len(optima) >= 2 else None
      if line:
        md += [f"- {s}: N* ∝ C^{line[1]:.3f} over {len(optima)} budgets"]
    md += [""]

  if cells:
    md += learning_rate_section(cells)

  by_size_md, by_size = evals_by_size(best)
  md += by_size_md
  figure = plot_evals_by_size(by_size, out)
  if figure:
    figures.append(figure)
    md += [f"![recall by size]({figure})", ""]
  eval_figures = []
  with_evals = [r for r in runs if isinstance(r.evals.get("retrieval"), dict) or isinstance(r.evals.get("position"), dict)]
  if len(with_evals) > MAX_RUN_EVAL_FIGURES:
    md += [f"{len(with_evals)} runs have retrieval or position evals: their per-run figures are left out (more than "
           f"{MAX_RUN_EVAL_FIGURES}); the table above holds each pattern's best.", ""]
    with_evals = []
  for r in with_evals:
    for plot in (plot_retrieval, plot_position):
      figure = plot(r, out, problems)
      if figure:
        figures.append(figure)
        eval_figures.append(f"![{r.run_id}]({figure})")
  mqar_evals = [r for r in runs if isinstance(r.evals.get("mqar"), dict)]
  loss_evals = [r for r in runs if isinstance(r.evals.get("loss"), dict)]
  if eval_figures or mqar_evals or loss_evals:
    md += ["## Evaluations", ""] + [f + "\n" for f in eval_figures]
  if loss_evals:
    lengths = sorted({n for r in loss_evals for n in r.evals["loss"].get("lengths") or [] if isinstance(n, int)})
    rows = []
    for r in loss_evals:
      e = r.evals["loss"]
      by_length = dict(zip(e.get("lengths") or [], e.get("loss") or []))
      rows.append([f"`{r.run_id}`", r.label, r.window_text] + [_num(_finite(by_length.get(n)), ".4f") for n in lengths])
    md += ["Held-out loss at each evaluated length (`eval/loss.json`):", ""]
    md += _table(["run", "mixer", "window"] + [f"L={n}" for n in lengths], rows) + [""]
  for r in mqar_evals:
    e = r.evals["mqar"]
    try:
      rows = [[str(n), str(k), _num(_finite(a), ".3f")]
              for n, k, a in zip(e["lengths"], e["num_kv_pairs"], e["accuracy"])]
    except (KeyError, TypeError):
      problems.append(f"`{r.run_id}/eval/mqar.json` lacks lengths / num_kv_pairs / accuracy lists; skipped")
      continue
    md += [f"MQAR at other lengths, {r.label} (`{r.run_id}`):", ""]
    md += _table(["length", "kv pairs", "accuracy"], rows) + [""]

  md += ["## Runs", ""]
  rows = []
  chosen = {c.best.run_id for c in cells if c.best is not None and len(c.scores) > 1}
  for r in runs:
    flops = _num(r.flops) + ("*" if r.flops_source == "6·params·tokens" else "")
    loss = _num(r.loss, ".4f") + (" (train)" if r.loss_source == "train" else "")
    lr = _lr_text(run_lr(r)) + (" (best)" if r.run_id in chosen else "")
    rows.append([f"`{r.run_id}`", r.status, r.label, _count(r.non_embedding_params), r.window_text, lr,
                 _count(r.params), flops, _count(r.tokens), loss, _num(r.accuracy, ".3f"),
                 _num(r.tokens_per_sec, ",.0f")])
  md += _table(["run", "status", "mixer", "size (non-emb.)", "window", "lr", "params", "FLOPs", "tokens",
                "eval loss", "accuracy", "tokens/s"], rows) + [""]
  if chosen:
    md += ["(best) = the run its cell keeps (the best of the learning rates it tried).", ""]
  approx = [r.run_id for r in runs if r.flops_source == "6·params·tokens"]
  if approx:
    md += [f"\\* FLOPs approximated as 6 · params · tokens (summary.json has no FLOP accounting) for "
           f"{len(approx)} run(s): " + ", ".join(f"`{x}`" for x in approx), ""]
  train_loss = [r.run_id for r in runs if r.loss_source == "train"]
  if train_loss:
    md += ["(train) = no eval recorded, last training loss shown; such runs are left out of the window "
           "ablation: " + ", ".join(f"`{x}`" for x in train_loss), ""]

  compute_md, compute = compute_spent(runs)
  md += compute_md
  missing, have_manifest = missing_points(root, runs, problems)
  md += ["## Missing", ""]
  if not have_manifest:
    md += [f"No readable `{MANIFEST_FILE}` in `{root}`: points that never started cannot be listed.", ""]
  if missing:
    md += _table(["run", "state", "point"], missing) + [""]
  else:
    md += ["Nothing: every point has a finished run." if have_manifest else "Every run directory is finished.", ""]
  unfinished = [r.run_id for r in runs if r.status != FINISHED]
  if unfinished:
    md += ["Unfinished runs are in the run table but not in fits or plots.", ""]

  if problems:
    md += ["## Notes", ""] + [f"- {p}" for p in problems] + [""]
  _remove_stale_figures(out, figures)
  data = report_data(root, runs, cells, fits, curves, figures, missing, survey, by_size, compute)
  _write_atomic(os.path.join(out, "report.json"), json.dumps(data, indent=1, allow_nan=False) + "\n")
  path = os.path.join(out, "report.md")
  _write_atomic(path, "\n".join(md))
  return path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root", help="the sweep root: ROOT/NAME, holding RUNID/ directories and sweep.json")
  parser.add_argument("--out", default=None, help="output directory (default ROOT/report)")
  parser.add_argument("--bootstrap", type=int, default=200,
                      help="bootstrap resamples for the interval of α (0: no interval; default 200)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
  args = parser.parse_args(argv)
  if args.bootstrap < 0:
    parser.error(f"--bootstrap={args.bootstrap} must be ≥ 0")
  try:
    path = build_report(args.root, args.out or os.path.join(args.root, "report"), n_bootstrap=args.bootstrap,
                        seed=args.seed)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"report: {os.path.abspath(path)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
