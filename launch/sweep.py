"""Sweep definitions as plain lists of points, stable run ids, filters and the sweep manifest.

An experiment file's ``get_sweep(h)`` (or ``get_sweep(h, arg)``) returns a list of points built with ``h``:

    h.product([h.sweep("config", ["attention", "swa"]), h.sweep("model.window", [16, 32])])

Each point is a dict of dotted config overrides; the key ``"config"`` is the argument given to
``get_config``. An experiment is named ``FILE`` or ``FILE:ARG``: ARG goes to ``get_sweep(h, ARG)``
when it takes a second parameter, and is the ``get_config`` argument of points that set no
``"config"``. A run id is ``NAME-<hash of the resolved config>``: the same point always lands in the
same run directory, and two different configs never share one.

Use: ``expand("experiments/quickstart.py")`` → ``[(run_id, point, resolved config)]``;
``python -m launch sweep experiments/NAME.py[:ARG] --dry-run`` prints them.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import itertools
import json
import os
from typing import Any

from hybrids import config as config_lib
from hybrids import rundir

Point = dict[str, Any]
MANIFEST_FILE = "sweep.json"
# Filter fields that are not config fields: the point's get_config argument, and "any mixer of the
# layer pattern" (model.mixer=swa keeps every point with an SWA layer).
VIRTUAL_FILTER_FIELDS = ("config", "model.mixer")


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


def split_spec(experiment: str) -> tuple[str, str | None]:
  """``"experiments/x.py:small"`` → ``("experiments/x.py", "small")``; no ARG → None."""
  path, sep, arg = experiment.partition(":")
  return path, (arg if sep and arg else None)


def sweep_name(experiment: str) -> str:
  """The default sweep directory name: ``NAME`` for ``FILE``, ``NAME-ARG`` for ``FILE:ARG``."""
  path, arg = split_spec(experiment)
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}-{arg}" if arg else name


def plain(value):
  """A JSON-able copy of an override value (numpy scalars / arrays → Python, tuples → lists)."""
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
    return plain(value.tolist())
  return value


def resolve_point(experiment: str, point: Point, default_arg: str | None = None):
  """The validated, resolved ConfigDict of one sweep point (``experiment`` may carry ``:ARG``)."""
  path, spec_arg = split_spec(experiment)
  arg = point.get("config", default_arg if default_arg is not None else spec_arg)
  overrides = {k: v for k, v in point.items() if k != "config"}
  return config_lib.resolve(config_lib.get_config(f"{path}:{arg or ''}", overrides))


def run_id(experiment: str, config) -> str:
  # The mesh (config.runtime) is where a run executes, not what it is: it stays out of the id.
  payload = json.dumps(rundir.config_json(config), sort_keys=True)
  name = os.path.splitext(os.path.basename(split_spec(experiment)[0]))[0]
  return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def sweep_points(experiment: str) -> list[Point]:
  """The raw points of ``get_sweep``, JSON-normalised (tuples become lists, as after a round trip)."""
  path, arg = split_spec(experiment)
  module = config_lib.load_experiment(path)
  if not hasattr(module, "get_sweep"):
    raise config_lib.ConfigError(f"{path} defines no get_sweep(h)")
  params = inspect.signature(module.get_sweep).parameters.values()
  takes_arg = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
  if arg is not None and not takes_arg and all("config" in p for p in module.get_sweep(SweepHelpers())):
    print(f"[launch] warning: {path}'s get_sweep(h) takes no argument and every point sets 'config': "
          f"the variant {arg!r} changes nothing")
  points = module.get_sweep(SweepHelpers(), arg) if takes_arg else module.get_sweep(SweepHelpers())
  if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
    raise config_lib.ConfigError(f"{path}: get_sweep must return a list of dicts (points), got {type(points).__name__}")
  return [plain(p) for p in points]


def expand(experiment: str) -> list[tuple[str, Point, Any]]:
  """``[(run_id, point, resolved config)]``; every point is validated before anything runs.

  Points that resolve to the same config (hence the same run id) are kept once.
  """
  _, arg = split_spec(experiment)
  out, seen = [], set()
  for i, point in enumerate(sweep_points(experiment)):
    try:
      config = resolve_point(experiment, point)
    except (config_lib.ConfigError, ValueError) as e:
      raise config_lib.ConfigError(f"{experiment}: sweep point {i} {point}: {e}") from None
    rid = run_id(experiment, config)
    if rid in seen:
      print(f"[launch] warning: sweep point {i} {point} resolves to the same config as an earlier point ({rid}); kept once")
      continue
    seen.add(rid)
    out.append((rid, point, config))
  return out


def config_arg(experiment: str, point: Point) -> str | None:
  """The ``get_config`` argument a point resolves with."""
  return point.get("config", split_spec(experiment)[1])


# ----------------------------------------------------------------------------- filters

def _lookup(config, dotted: str):
  node = config
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      where = ".".join(parts[:i]) or "config"
      valid = sorted(node.keys()) if hasattr(node, "keys") else []
      if i == 0:
        valid = sorted(set(valid) | {"config"})
      elif where == "model":
        valid = sorted(set(valid) | {"mixer"})
      raise config_lib.ConfigError(f"--filter {dotted}=…: unknown field ({where} has no {part!r}); "
                                   f"valid: {', '.join(valid)}")
    node = node[part]
  return node


def parse_filters(filters: list[str], example_config) -> dict[str, list]:
  """``["model.window=16", "model.window=32"]`` → ``{"model.window": [16, 32]}``.

  Values are parsed like ``--config.FIELD=VALUE`` overrides, into the type of the field in
  ``example_config`` (any resolved point); an unknown field is a ConfigError listing valid fields.
  """
  from hybrids.mixers import MIXERS

  parsed: dict[str, list] = {}
  for text in filters:
    field, sep, value = text.partition("=")
    if not sep or not field:
      raise config_lib.ConfigError(f"--filter {text!r}: expected FIELD=VALUE, e.g. model.window=16")
    if field == "config":
      parsed.setdefault(field, []).append(value)
      continue
    if field == "model.mixer":
      if value not in MIXERS:
        raise config_lib.ConfigError(f"--filter model.mixer={value!r}: not a mixer; valid: {', '.join(sorted(MIXERS))}")
      parsed.setdefault(field, []).append(value)
      continue
    current = _lookup(example_config, field)
    if hasattr(current, "keys"):
      raise config_lib.ConfigError(f"--filter {field}: is a group, not a field; valid: "
                                   f"{', '.join(f'{field}.{k}' for k in sorted(current.keys()))}")
    try:
      v = config_lib.parse_value(value, current) if current is not None else value
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"--filter {field}: {e}") from None
    parsed.setdefault(field, []).append(tuple(v) if isinstance(v, list) else v)
  return parsed


def matches(filters: dict[str, list], experiment: str, point: Point, config) -> bool:
  """All fields match (AND); repeated values of one field are alternatives (OR)."""
  from hybrids.blocks import mixer_names
  from hybrids.model import layer_pattern

  for field, values in filters.items():
    if field == "config":
      actual = config_arg(experiment, point)
      if actual not in values:
        return False
    elif field == "model.mixer":
      used = {m for entry in layer_pattern(config.model) for m in mixer_names(entry)}
      if not used & set(values):
        return False
    else:
      actual = _lookup(config, field)
      actual = tuple(actual) if isinstance(actual, list) else actual
      if actual not in values:
        return False
  return True


def select(experiment: str, expanded, filters: list[str]):
  """The expanded points that pass ``--filter``s (all of them when there are none)."""
  if not filters or not expanded:
    return list(expanded)
  parsed = parse_filters(filters, expanded[0][2])
  return [e for e in expanded if matches(parsed, experiment, e[1], e[2])]


def cell_decisions(root: str, selected):
  """``launch sweep --cell-stop``: run id → why its cell needs it no more, or None.

  A cell is the points of ``selected`` (``(run id, point, resolved config)``) that differ only in
  ``train.lr``. It is decided once one of its runs is "done" with its own ``early_stop`` (it passed
  ``train.stop_at_accuracy``; a run that stopped with its lockstep group counts only through that
  decider): the best learning rate has reached the accuracy at which every run stops, so the others
  cannot change what the cell shows by more than 1 − that accuracy. A pass at a run's last eval is no
  early stop and decides nothing (the run is simply done). Read from the run directories at each
  call, so a cell decided while the sweep runs counts at once."""
  from collections import defaultdict

  from hybrids.train import group_key
  from launch import runs

  cell_of = {rid: group_key(config) for rid, _, config in selected}
  members: dict[str, list[str]] = defaultdict(list)
  for rid, key in cell_of.items():
    members[key].append(rid)

  def why(rid: str) -> str | None:
    for other in members.get(cell_of.get(rid), ()):
      if other != rid and (early := runs.passed_stop_accuracy(runs.read_summary(os.path.join(root, other)))):
        return f"cell decided by {other}: it passed train.stop_at_accuracy at step {early.get('step')}"
    return None

  return why


# ----------------------------------------------------------------------------- manifest

def write_manifest(root: str, experiment: str, expanded, *, backend: str, filters: list[str]) -> str:
  """``ROOT/sweep.json``: every point with its run id, so status/report can list pending runs."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, MANIFEST_FILE)
  rundir.write_json(path, {
      "experiment": os.path.abspath(split_spec(experiment)[0]),
      "experiment_arg": split_spec(experiment)[1],
      "spec": experiment,
      "backend": backend,
      "filters": list(filters),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "points": [{"run_id": rid, "point": point, "config_arg": config_arg(experiment, point)}
                 for rid, point, _ in expanded],
  })
  return path


def read_manifest(root: str) -> dict | None:
  try:
    with open(os.path.join(root, MANIFEST_FILE)) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def format_table(rows: list[dict]) -> str:
  """The sweep's results: one row per run (summary.json fields)."""
  header = ("run", "point", "status", "params", "eval loss", "eval acc", "tokens/s")
  lines = []
  for r in rows:
    ev = r.get("eval") or {}
    fmt = lambda v, f: "—" if v is None else format(v, f)
    lines.append((r["run"], " ".join(f"{k}={v}" for k, v in r["point"].items()), r.get("status", "?"),
                  fmt(r.get("params"), ","), fmt(ev.get("eval_loss"), ".3f"), fmt(ev.get("eval_accuracy"), ".3f"),
                  fmt(r.get("tokens_per_sec"), ",.0f")))
  widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
  row = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
  return "\n".join([row(header), row(["-" * w for w in widths])] + [row(l) for l in lines])
