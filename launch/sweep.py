"""Sweep definitions (``get_sweep(h)``) as plain lists of points, stable run ids, and the local runner.

An experiment file's ``get_sweep(h)`` returns a list of points built with ``h``:

    h.product([h.sweep("config", ["attention", "swa"]), h.sweep("model.window", [16, 32])])

Each point is a dict of overrides; the key ``"config"`` is the argument given to ``get_config``.
A run id is ``NAME-<hash of the resolved config>``: the same point always lands in the same run
directory, and two different configs never share one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import traceback
from typing import Any

from hybrids import config as config_lib

Point = dict[str, Any]


class SweepHelpers:
  """The ``h`` given to ``get_sweep``: sweeps are plain lists of override dicts."""

  @staticmethod
  def sweep(field: str, values) -> list[Point]:
    return [{field: v} for v in values]

  @staticmethod
  def product(axes: list[list[Point]]) -> list[Point]:
    return [dict(kv for point in combo for kv in point.items()) for combo in itertools.product(*axes)]

  @staticmethod
  def zip(axes: list[list[Point]]) -> list[Point]:
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
      raise ValueError(f"h.zip: axes have different lengths {sorted(lengths)}")
    return [dict(kv for point in combo for kv in point.items()) for combo in zip(*axes)]

  @staticmethod
  def chain(sweeps: list[list[Point]]) -> list[Point]:
    return [p for s in sweeps for p in s]


def resolve_point(experiment: str, point: Point):
  """The validated, resolved ConfigDict of one sweep point."""
  from hybrids.train import resolve

  overrides = {k: v for k, v in point.items() if k != "config"}
  return resolve(config_lib.get_config(f"{experiment}:{point.get('config') or ''}", overrides))


def run_id(experiment: str, config) -> str:
  payload = json.dumps(json.loads(config.to_json_best_effort(sort_keys=True)), sort_keys=True)
  name = os.path.splitext(os.path.basename(experiment))[0]
  return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def expand(experiment: str) -> list[tuple[str, Point, Any]]:
  """``[(run_id, point, resolved config)]``; every point is validated before anything runs."""
  module = config_lib.load_experiment(experiment)
  if not hasattr(module, "get_sweep"):
    raise config_lib.ConfigError(f"{experiment} defines no get_sweep(h)")
  out = []
  for i, point in enumerate(module.get_sweep(SweepHelpers())):
    try:
      config = resolve_point(experiment, point)
    except (config_lib.ConfigError, ValueError) as e:
      raise config_lib.ConfigError(f"{experiment}: sweep point {i} {point}: {e}") from None
    out.append((run_id(experiment, config), point, config))
  return out


def read_summary(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def run_local(experiment: str, root: str, *, progress: bool = True) -> list[dict]:
  """Run every point sequentially in this process; finished runs are skipped, others resume."""
  from hybrids.train import train

  rows = []
  for rid, point, config in expand(experiment):
    workdir = os.path.join(root, rid)
    summary = read_summary(workdir)
    if summary.get("status") != "done":
      print(f"[launch] {rid}  {point}", flush=True)
      try:
        summary = train(config, workdir, progress=progress)
      except KeyboardInterrupt:
        raise
      except Exception:  # one failed point must not stop the sweep; its summary says why
        traceback.print_exc()
        summary = read_summary(workdir) or {"status": "failed"}
    rows.append({"run": rid, "point": point, "workdir": workdir, **summary})
  return rows


def format_table(rows: list[dict]) -> str:
  header = ("run", "point", "status", "params", "eval loss", "eval acc", "tokens/s")
  lines = []
  for r in rows:
    ev = r.get("eval", {})
    fmt = lambda v, f: "—" if v is None else format(v, f)
    lines.append((r["run"], " ".join(f"{k}={v}" for k, v in r["point"].items()), r.get("status", "?"),
                  fmt(r.get("params"), ","), fmt(ev.get("eval_loss"), ".3f"), fmt(ev.get("eval_accuracy"), ".3f"),
                  fmt(r.get("tokens_per_sec"), ",.0f")))
  widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
  row = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
  return "\n".join([row(header), row(["-" * w for w in widths])] + [row(l) for l in lines])
