"""``python -m launch report ROOT``: a markdown report with plots from a sweep's run directories.

    python -m launch report runs/zoology_mqar                 # writes runs/zoology_mqar/report/report.md
    python -m launch report runs/scaling --out /tmp/scaling --bootstrap 500

Reads only ``ROOT/*/config.json``, ``summary.json``, ``metrics.jsonl``, ``eval/*.json`` and
``ROOT/sweep.json`` (never a checkpoint, never a model), and writes ``OUT/report.md`` with PNGs beside it
(matplotlib, Agg), each only when its data exists:

- ``loss_vs_flops.png``: eval loss vs training FLOPs, log-log, one colour per mixer, with the fitted
  ``L(C) = E + A·C^(−α)`` (``launch/fit.py``: Chinchilla Approach 3, Huber in log space, L-BFGS-B from a
  grid, bootstrap 95% interval of α) fitted to each mixer's compute frontier (its lowest loss per budget);
- ``isoflop.png``: loss vs non-embedding params per budget with its parabola and compute-optimal size,
  when a budget has ≥ 3 sizes of one mixer (Chinchilla Approach 2);
- ``mqar_vs_width.png``: MQAR accuracy vs d_model, one panel per (seq_len, kv pairs), one line per mixer,
  best over the other swept fields (learning rate) — the layout of Zoology's Fig. 2;
- ``state_tradeoff.png``: MQAR accuracy vs recurrent state bytes per sequence, Pareto frontier marked
  (Based's Fig. 2);
- ``retrieval_<run>.png``: retrieval accuracy heatmap, length × depth (``eval/retrieval.json``);
- ``position_<run>.png``: loss by position at each evaluated length (``eval/position.json``);
- ``window_ablation.png``: eval loss per window, grouped by seq_len (Griffin's Fig. 9 layout).

``report.md`` also holds the fits table (E, A, α, 95% CI, n), the run table (mixer, size, window,
params, FLOPs, tokens, eval loss, accuracy, tokens/s; sorted by mixer and size) and a "Missing" section:
points of ``sweep.json`` without a finished run. A run is grouped by its mixer label: the mixers of
its layers joined by ``+`` (``rglru+swa`` for ``('rglru', 'rglru', 'swa')``), with the named topology
of ``hybrids.topologies`` it matches; series split further by window / seq_len / kv pairs / dataset
when those vary within a label. Train FLOPs come from ``summary.json`` (``train_flops``, else
``flops_per_token_train × tokens``); runs written before FLOP accounting fall back to
``6 · params · tokens``, and the report says which runs did.

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

from launch import fit as fit_lib

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


def _read_metrics(path: str) -> tuple[dict | None, dict | None]:
  """The last eval record and the last training record of ``metrics.jsonl`` (torn lines skipped)."""
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
  except OSError:
    pass
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


def _layers(model: dict) -> tuple[str, ...]:
  pattern = model.get("pattern") or ()
  if isinstance(pattern, str):
    pattern = (pattern,)
  n_layers = int(model.get("n_layers") or len(pattern) or 0)
  return tuple(pattern[i % len(pattern)] for i in range(n_layers)) if pattern else ()


def load_run(path: str, problems: list[str]) -> Run | None:
  config = _read_json(os.path.join(path, "config.json"), problems)
  if not isinstance(config, dict):
    return None
  summary = _read_json(os.path.join(path, "summary.json"), problems)
  summary = summary if isinstance(summary, dict) else {}
  evals = {}
  for file in sorted(glob.glob(os.path.join(path, "eval", "*.json"))):
    content = _read_json(file, problems)
    if content is not None:
      evals[os.path.splitext(os.path.basename(file))[0]] = content
  run = Run(run_id=os.path.basename(os.path.normpath(path)), path=path, config=config, summary=summary,
            evals=evals, status=str(summary.get("status") or "no summary"), layers=_layers(config.get("model", {})))
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

  last_eval, last_train = _read_metrics(os.path.join(path, "metrics.jsonl"))
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
  for config_path in sorted(glob.glob(os.path.join(root, "*", "config.json"))):
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


# ----------------------------------------------------------------------------- analyses


@dataclasses.dataclass
class SeriesFit:
  series: str
  fit: fit_lib.PowerLawFit | None
  frontier: list[tuple[float, float]]       # (FLOPs, loss): the best run of each budget
  note: str = ""


def fit_series(runs: list[Run], *, n_bootstrap: int, seed: int) -> list[SeriesFit]:
  by_series = defaultdict(list)
  for run in runs:
    if run.status == FINISHED and run.flops and run.loss is not None:
      by_series[run.series].append(run)
  out = []
  for series, members in sorted(by_series.items()):
    budgets = fit_lib.group_budgets([r.flops for r in members])
    best: dict[int, Run] = {}
    for run, b in zip(members, budgets):
      if b not in best or run.loss < best[b].loss:
        best[b] = run
    frontier = sorted((r.flops, r.loss) for r in best.values())
    result = fit_lib.fit_power_law([c for c, _ in frontier], [l for _, l in frontier],
                                   n_bootstrap=n_bootstrap, seed=seed) if len(frontier) >= fit_lib.MIN_POINTS else None
    note = "" if result else (f"{len(frontier)} budget(s): no fit (needs ≥ {fit_lib.MIN_POINTS})"
                              if len(frontier) < fit_lib.MIN_POINTS else "the fit did not converge")
    if result and result.alpha_ci is None and n_bootstrap:
      note = "too few distinct resamples for an interval"
    elif result and result.alpha_ci and len(frontier) < 6:
      note = f"only {len(frontier)} budgets: resamples nearly interpolate, so the interval understates the error"
    out.append(SeriesFit(series, result, frontier, note))
  return out


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
  panels = defaultdict(list)
  for run in runs:
    if run.status == FINISHED and run.is_mqar and run.accuracy is not None and getattr(run, require) is not None:
      panels[(run.seq_len, run.data.get("num_kv_pairs"))].append(run)
  return dict(sorted(panels.items(), key=lambda kv: tuple(x or 0 for x in kv[0])))


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
  points = [r for r in runs if r.status == FINISHED and r.flops and r.loss is not None]
  if not points:
    return None
  fig, (ax,) = _figure(1, 6.4, 4.4)
  colors = _colors(r.series for r in points)
  for f in fits:
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
    ax.plot([], [], color=c, marker="o", label=name)
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="eval loss",
         title="loss vs compute, fits L = E + A·C^(−α)")
  _plain_ticks(ax.yaxis, minor=True)  # losses span less than a decade: 10^0-style labels would be unreadable
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
    ax.legend(fontsize=7)
  return _save(fig, out, "isoflop.png")


def _plain_ticks(axis, *, minor: bool = False) -> None:
  """Plain numbers on a log axis; ``minor``: label the 2…9 ticks too (for a span under a decade)."""
  from matplotlib.ticker import NullFormatter, StrMethodFormatter

  axis.set_major_formatter(StrMethodFormatter("{x:.3g}"))
  axis.set_minor_formatter(StrMethodFormatter("{x:.3g}") if minor else NullFormatter())


def _colors_seq(n: int):
  import matplotlib.pyplot as plt

  return [plt.get_cmap("viridis")(i / max(n - 1, 1)) for i in range(n)]


def plot_mqar_width(runs: list[Run], out: str) -> str | None:
  panels = {k: v for k, v in _mqar_panels(runs, "label").items()
            if len({r.model.get("d_model") for r in v}) >= 2}
  if not panels:
    return None
  fig, axes = _figure(len(panels))
  colors = _colors(_mqar_key(r) for v in panels.values() for r in v)
  for ax, ((seq_len, kv), members) in zip(axes, panels.items()):
    best = defaultdict(dict)  # key → d_model → best accuracy (over learning rates)
    for r in members:
      d = r.model.get("d_model")
      best[_mqar_key(r)][d] = max(r.accuracy, best[_mqar_key(r)].get(d, -1.0))
    for key, by_width in sorted(best.items()):
      widths = sorted(by_width)
      ax.plot(widths, [by_width[w] for w in widths], marker="o", color=colors[key], label=key)
    ax.set(xlabel="d_model", ylabel="MQAR accuracy", ylim=(-0.02, 1.02), title=f"seq_len {seq_len}, {kv} kv pairs")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.model.get("d_model") for r in members}))
    _plain_ticks(ax.xaxis)
    ax.legend(fontsize=7, loc="lower right")
  return _save(fig, out, "mqar_vs_width.png")


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The (state, accuracy) points that no smaller-or-equal state beats in accuracy."""
  frontier, best = [], -math.inf
  for state, acc in sorted(points, key=lambda p: (p[0], -p[1])):
    if acc > best:
      frontier.append((state, acc))
      best = acc
  return frontier


def plot_state_tradeoff(runs: list[Run], out: str) -> str | None:
  panels = {k: v for k, v in _mqar_panels(runs, "state_bytes").items() if len(v) >= 2}
  if not panels:
    return None
  fig, axes = _figure(len(panels))
  colors = _colors(r.label for v in panels.values() for r in v)
  for ax, ((seq_len, kv), members) in zip(axes, panels.items()):
    for label in sorted({r.label for r in members}):
      mine = [r for r in members if r.label == label]
      ax.scatter([r.state_bytes for r in mine], [r.accuracy for r in mine], color=colors[label], s=18, label=label)
    frontier = pareto_frontier([(r.state_bytes, r.accuracy) for r in members])
    ax.step(*zip(*frontier), where="post", color="black", lw=1, ls="--", label="Pareto frontier")
    ax.set(xscale="log", xlabel="recurrent state (bytes / sequence)", ylabel="MQAR accuracy",
           ylim=(-0.02, 1.02), title=f"seq_len {seq_len}, {kv} kv pairs")
    ax.legend(fontsize=7, loc="lower right")
  return _save(fig, out, "state_tradeoff.png")


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


def window_ablation(runs: list[Run]) -> dict[str, dict[int, dict[str, float]]]:
  """panel (size) → seq_len → bar (label + window) → best eval loss; empty unless a window is swept."""
  done = [r for r in runs if r.status == FINISHED and r.loss is not None and r.loss_source != "train"]
  swept = {r.label for r in done if r.window is not None} & {
      label for label in {r.label for r in done} if len({r.window for r in done if r.label == label}) > 1}
  if not swept:
    return {}
  seq_lens = {r.seq_len for r in done if r.label in swept}
  table: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
  for r in done:
    if r.seq_len not in seq_lens:
      continue
    panel = r.model.get("size") or f"d_model {r.model.get('d_model')}"
    bar = r.label + (f" w={r.window}" if r.window is not None else "")
    table[panel][r.seq_len][bar] = min(r.loss, table[panel][r.seq_len].get(bar, math.inf))
  return table


def plot_window_ablation(table, out: str) -> str | None:
  if not table:
    return None
  fig, axes = _figure(len(table), 6.0, 3.6)
  bar_key = lambda b: (b.split(" w=")[0], int(b.split(" w=")[1]) if " w=" in b else math.inf)
  bars = sorted({b for panel in table.values() for row in panel.values() for b in row}, key=bar_key)
  colors = dict(zip(bars, _colors_seq(len(bars))))
  for ax, (panel, rows) in zip(axes, sorted(table.items())):
    seq_lens = sorted(rows)
    width = 0.8 / len(bars)
    for i, b in enumerate(bars):
      xs = [k + (i - (len(bars) - 1) / 2) * width for k, t in enumerate(seq_lens) if b in rows[t]]
      ax.bar(xs, [rows[t][b] for t in seq_lens if b in rows[t]], width=width, color=colors[b], label=b)
    ax.set_xticks(range(len(seq_lens)), [str(t) for t in seq_lens])
    losses = [v for row in rows.values() for v in row.values()]
    ax.set_ylim(min(losses) * 0.97, max(losses) * 1.01)
    ax.set(xlabel="training sequence length", ylabel="eval loss", title=f"window ablation ({panel})")
    ax.legend(fontsize=7)
  return _save(fig, out, "window_ablation.png")


# ----------------------------------------------------------------------------- markdown


def _num(v, spec: str = ".3g") -> str:
  return "—" if v is None else format(v, spec)


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


def build_report(root: str, out: str, *, n_bootstrap: int = 200, seed: int = 0) -> str:
  """Write ``out/report.md`` and its PNGs; returns the path of report.md."""
  import matplotlib

  matplotlib.use("Agg")
  problems: list[str] = []
  runs = load_runs(root, problems)
  assign_labels(runs)
  os.makedirs(out, exist_ok=True)
  runs.sort(key=lambda r: (r.label, r.non_embedding_params or 0, r.series, r.seq_len or 0, r.run_id))
  name = os.path.basename(os.path.normpath(root))
  done = [r for r in runs if r.status == FINISHED]
  md = [f"# {name}", "",
        f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'} in `{root}`, {len(done)} finished. "
        f"Generated by `python -m launch report {root}`.", ""]

  fits = fit_series(runs, n_bootstrap=n_bootstrap, seed=seed)
  figure = plot_loss_vs_flops(runs, fits, out)
  if figure:
    md += ["## Loss vs training FLOPs", "",
           "Each mixer's compute frontier (its lowest loss per budget, solid dots; other runs faded) fitted with "
           "L(C) = E + A·C^(−α) (Huber δ=1e-3 on log loss, L-BFGS-B from a grid; 95% percentile bootstrap "
           f"interval of α over {n_bootstrap} resamples of the runs).", "", f"![loss vs FLOPs]({figure})", ""]
    rows = []
    for f in fits:
      if f.fit:
        ci = f"[{f.fit.alpha_ci[0]:.3f}, {f.fit.alpha_ci[1]:.3f}]" if f.fit.alpha_ci else "—"
        rows.append([f.series, str(f.fit.n), f"{f.fit.E:.4g}", f"{f.fit.A:.4g}", f"{f.fit.alpha:.4f}", ci, f.note])
      else:
        rows.append([f.series, str(len(f.frontier)), "—", "—", "—", "—", f.note])
    md += _table(["mixer", "n", "E", "A", "α", "95% CI (α)", "note"], rows) + [""]

  curves = isoflop_curves(runs)
  figure = plot_isoflop(curves, out)
  if figure:
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

  sections = []
  for plot, title in ((plot_mqar_width, "MQAR accuracy vs width"),
                      (plot_state_tradeoff, "MQAR accuracy vs state size")):
    figure = plot(runs, out)
    if figure:
      sections += [f"## {title}", "", f"![{title}]({figure})", ""]
  md += sections

  table = window_ablation(runs)
  figure = plot_window_ablation(table, out)
  if figure:
    md += ["## Window ablation", "", "Eval loss per window (best over the other swept fields), grouped by training "
           "sequence length (Griffin Fig. 9 layout).", "", f"![window ablation]({figure})", ""]

  eval_figures = []
  for r in runs:
    for plot in (plot_retrieval, plot_position):
      figure = plot(r, out, problems)
      if figure:
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
  for r in runs:
    flops = _num(r.flops) + ("*" if r.flops_source == "6·params·tokens" else "")
    loss = _num(r.loss, ".4f") + (" (train)" if r.loss_source == "train" else "")
    rows.append([f"`{r.run_id}`", r.status, r.label, _count(r.non_embedding_params), r.window_text, _count(r.params),
                 flops, _count(r.tokens), loss, _num(r.accuracy, ".3f"), _num(r.tokens_per_sec, ",.0f")])
  md += _table(["run", "status", "mixer", "size (non-emb.)", "window", "params", "FLOPs", "tokens", "eval loss",
                "accuracy", "tokens/s"], rows) + [""]
  approx = [r.run_id for r in runs if r.flops_source == "6·params·tokens"]
  if approx:
    md += [f"\\* FLOPs approximated as 6 · params · tokens (summary.json has no FLOP accounting) for "
           f"{len(approx)} run(s): " + ", ".join(f"`{x}`" for x in approx), ""]
  train_loss = [r.run_id for r in runs if r.loss_source == "train"]
  if train_loss:
    md += ["(train) = no eval recorded, last training loss shown; such runs are left out of the window "
           "ablation: " + ", ".join(f"`{x}`" for x in train_loss), ""]

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
  path = os.path.join(out, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(md))
  os.replace(path + ".tmp", path)
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
