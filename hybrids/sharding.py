"""Device mesh, partition rules for every parameter, batch sharding and multi-process start-up.

The mesh has three axes (``AXES``):

- ``data``: pure data parallelism — parameters replicated, the batch split;
- ``fsdp``: the batch is split over it too, and every matrix is split along its largest dimension
  divisible by the axis size (ZeRO-3 / FSDP: XLA all-gathers a weight where it is used);
- ``tensor``: Megatron-style splits of the attention (``attention``, ``swa``) q/k/v/o projections and
  of the MLP / MoE up, gate and down matrices; other mixers' parameters see only ``fsdp``.

The sizes come from ``config.runtime.mesh`` (``data=-1``: all remaining devices). ``runtime`` is
where a run executes, not what it computes: it is left out of ``config.json`` and of the run id, so a
checkpoint written on one mesh resumes on another (orbax restores onto the current mesh's shardings).

Partition rules need no per-mixer table: a rule reads only the parameter's path names and shape
(:func:`partition_spec`), so a new mixer is covered the day it is registered. Sharding never changes
what is computed — XLA's SPMD partitioner inserts the collectives — only where it is computed. The
Pallas kernels are the exception XLA cannot partition: the train and eval steps are traced under
``kernels.pallas_compat.batch_parallel``, so each kernel runs on its device's rows of the batch.

Multi-process runs (one process per host, or per GPU) call :func:`initialize_distributed` first; it
reads the environment (:func:`distributed_plan`):

- ``HYBRIDS_COORDINATOR=host:port HYBRIDS_NUM_PROCESSES=N HYBRIDS_PROCESS_ID=i`` (local multi-process
  runs, ``python -m launch.multiprocess_check``);
- SLURM, under ``srun`` or from a plain ``sbatch`` script: coordinator = first host of
  ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``), id ``SLURM_PROCID``, count
  ``SLURM_STEP_NUM_TASKS`` / ``SLURM_NTASKS``, port ``HYBRIDS_COORDINATOR_PORT`` or derived from the job id;
- TPU pods and GKE (``TPU_WORKER_HOSTNAMES`` with several hosts, ``MEGASCALE_*``, ``JOBSET_NAME``):
  ``jax.distributed.initialize()`` detects everything itself;
- otherwise nothing (a single process).

Each process then loads only its rows of the global batch (``data.train_dataset(process_index=...)``)
and :func:`shard_batch` assembles the global ``[batch, seq_len]`` array from them.

Inspect the rules of a config (no devices needed)::

    python -m hybrids.sharding --config experiments/quickstart.py:griffin --fsdp 4 --tensor 2
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrids.blocks import mixer_names
from hybrids.mixers import MIXERS
from hybrids.mixers.contract import tensor_parallel
from hybrids.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both: FSDP is data parallel too

# Mixers whose projections follow the Megatron split (heads are independent until o_proj).
TENSOR_MIXERS = frozenset(name for name, cls in MIXERS.items() if tensor_parallel(cls))
# Split along the output features (column parallel) / the input features (row parallel).
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "up", "gate", "w_up", "w_gate"})
ROW_PARALLEL = frozenset({"o_proj", "down", "w_down"})


# ----------------------------------------------------------------------------- the mesh

def mesh_shape(mesh_config: Mapping[str, int], device_count: int, *, process_count: int = 1,
               batch_size: int | None = None) -> dict[str, int]:
  """Resolve ``runtime.mesh`` against the devices: ``{"data": d, "fsdp": f, "tensor": t}``.

  One axis may be -1 (all remaining devices). The product must equal ``device_count`` — or, in a
  single-process run, divide it (the first devices are used: handy to debug on part of a host).
  ``batch_size`` (global) must be divisible by ``data · fsdp``. Errors name the ``runtime.mesh``
  field and say what would work; nothing is compiled before this check.
  """
  sizes = {}
  for axis in AXES:
    value = mesh_config.get(axis, 1)
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and value != -1):
      raise ConfigError(f"runtime.mesh.{axis}={value!r} must be a positive integer or -1 (all remaining devices)")
    sizes[axis] = value
  unknown = sorted(set(mesh_config) - set(AXES))
  if unknown:
    raise ConfigError(f"runtime.mesh has unknown axes {unknown}; valid axes: {', '.join(AXES)}")
  free = [axis for axis, n in sizes.items() if n == -1]
  if len(free) > 1:
    raise ConfigError(f"runtime.mesh: only one axis may be -1, got {', '.join(f'runtime.mesh.{a}' for a in free)}")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  described = " × ".join(f"{a}={n}" for a, n in sizes.items())
  if free:
    if device_count % fixed:
      raise ConfigError(f"runtime.mesh ({described}): the fixed axes' product {fixed} does not divide the "
                        f"{device_count} devices")
    sizes[free[0]] = device_count // fixed
  total = math.prod(sizes.values())
  if total != device_count and (process_count > 1 or device_count % total):
    raise ConfigError(f"runtime.mesh ({described}) needs {total} devices but there are {device_count}"
                      + (f" over {process_count} processes (a multi-process mesh must use every device)"
                         if process_count > 1 else "") + "; set runtime.mesh.data=-1 to use all remaining devices")
  if process_count > 1 and (sizes["data"] * sizes["fsdp"]) % process_count:
    # Each process's loader yields its own rows, so the batch split must give every process whole shards.
    raise ConfigError(f"runtime.mesh ({described}): data × fsdp = {sizes['data'] * sizes['fsdp']} must be a "
                      f"multiple of the {process_count} processes (tensor parallelism stays within a process)")
  if batch_size is not None:
    ways = sizes["data"] * sizes["fsdp"]
    if batch_size % ways:
      raise ConfigError(f"train.batch_size={batch_size} is not divisible by runtime.mesh.data × runtime.mesh.fsdp "
                        f"= {sizes['data']} × {sizes['fsdp']} = {ways} (the batch is split over both)")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], *, batch_size: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``Mesh`` with axes ``AXES`` over ``devices`` (default: every device of every process).

  Devices are ordered by (process, id) so that each process owns a contiguous block of the batch
  dimension — the rows its data loader yields. TPU meshes use ``mesh_utils.create_device_mesh``,
  which follows the physical torus.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(dict(mesh_config), len(devices), process_count=jax.process_count(), batch_size=batch_size)
  shape = tuple(sizes[a] for a in AXES)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))[:math.prod(shape)]
  if devices[0].platform == "tpu":
    from jax.experimental import mesh_utils
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    array = np.array(devices, dtype=object).reshape(shape)
  return Mesh(array, AXES)


def mesh_config_of(config: ml_collections.ConfigDict) -> dict[str, int]:
  """``config.runtime.mesh`` as a plain dict (defaults when a config predates the runtime section)."""
  runtime = config.get("runtime") if hasattr(config, "get") else None
  mesh = runtime.get("mesh") if runtime is not None else None
  return dict(mesh.to_dict() if hasattr(mesh, "to_dict") else mesh or {"data": -1, "fsdp": 1, "tensor": 1})


# ----------------------------------------------------------------------------- partition rules

def _names(path) -> tuple:
  """Key path → plain names: ``('blocks', 0, 'mixer', 'q_proj', 'kernel')``."""
  out = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        out.append(getattr(key, attr))
        break
    else:
      out.append(str(key))
  return tuple(out)


def _tensor_dim(names: tuple, ndim: int, layer_mixers: Sequence[str]) -> int | None:
  """The dimension a Megatron split uses for this parameter, or None (not tensor parallel)."""
  if len(names) < 4 or names[0] != "blocks" or (names[-1] != "kernel" and names[-1] not in ("w_up", "w_gate", "w_down")):
    return None
  layer, sublayer = names[1], names[2]
  leaf_module = names[-2] if names[-1] == "kernel" else names[-1]
  if sublayer == "mlp":
    pass  # GatedMLP (up, gate, down) and MoE (w_up, w_gate, w_down); the router stays whole
  elif sublayer == "mixer" and isinstance(layer, int) and layer < len(layer_mixers):
    parts = mixer_names(layer_mixers[layer])
    if len(names) == 5 and len(parts) == 1:
      mixer = parts[0]
    elif len(names) == 7 and names[3] == "parts" and isinstance(names[4], int) and names[4] < len(parts):
      mixer = parts[names[4]]
    else:
      return None  # a parallel hybrid's merge gate / projection
    if mixer not in TENSOR_MIXERS:
      return None
  else:
    return None
  if leaf_module in COLUMN_PARALLEL:
    return ndim - 1
  if leaf_module in ROW_PARALLEL:
    return ndim - 2
  return None


def _partition(names: tuple, shape: Sequence[int], axis_sizes: Mapping[str, int],
               layer_mixers: Sequence[str]) -> tuple[PartitionSpec, tuple[str, ...]]:
  """:func:`partition_spec`, and the axes its rules wanted to split this parameter over but could not
  (no dimension they would use is divisible by the axis size): ``("tensor",)``, ``("fsdp",)``, both or ``()``."""
  spec: list[Any] = [None] * len(shape)
  if len(shape) < 2:
    return PartitionSpec(), ()
  tensor, fsdp = axis_sizes.get("tensor", 1), axis_sizes.get("fsdp", 1)
  unsplit = []
  if tensor > 1:
    dim = _tensor_dim(tuple(names), len(shape), layer_mixers)
    if dim is not None:
      if shape[dim] % tensor == 0:
        spec[dim] = "tensor"
      else:
        unsplit.append("tensor")
  if fsdp > 1:
    free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
    if free:
      spec[max(free, key=lambda d: (shape[d], -d))] = "fsdp"
    else:
      unsplit.append("fsdp")
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec), tuple(unsplit)


def partition_spec(names: tuple, shape: Sequence[int], axis_sizes: Mapping[str, int],
                   layer_mixers: Sequence[str] = ()) -> PartitionSpec:
  """The ``PartitionSpec`` of one parameter from its path ``names`` and ``shape``.

  Vectors and scalars are replicated (norm scales, biases, decay rates: small, and read everywhere).
  A matrix gets ``tensor`` on its Megatron dimension (see :data:`COLUMN_PARALLEL`) when its layer's
  mixer is in :data:`TENSOR_MIXERS` and the size divides, then ``fsdp`` on its largest other
  dimension that the fsdp size divides (the first of equals: the vocabulary of the embedding).
  A dimension nothing divides stays whole, so every spec is valid for any shape; such matrices are
  listed by :func:`replicated_params` and :func:`param_specs` warns about them.
  """
  return _partition(names, shape, axis_sizes, layer_mixers)[0]


@dataclasses.dataclass(frozen=True)
class ReplicatedParam:
  """A matrix the partition rules wanted to split over ``axis`` but left whole on it: no dimension the
  rule would use is divisible by ``axis_size``, so each of the axis's devices holds all ``bytes``."""

  name: str          # the parameter's path, "blocks/0/mixer/q_proj/kernel"
  shape: tuple[int, ...]
  bytes: int         # of the whole parameter
  axis: str          # "tensor" or "fsdp"
  axis_size: int


def _param_bytes(x) -> int:
  dtype = getattr(x, "dtype", None)
  return math.prod(x.shape) * (np.dtype(dtype).itemsize if dtype is not None else 0)


def _specs_and_replicated(params, axis_sizes: Mapping[str, int], layer_mixers: Sequence[str]):
  replicated_list: list[ReplicatedParam] = []

  def one(path, x):
    names = _names(path)
    spec, unsplit = _partition(names, x.shape, axis_sizes, layer_mixers)
    for axis in unsplit:
      replicated_list.append(ReplicatedParam("/".join(str(n) for n in names), tuple(int(n) for n in x.shape),
                                             _param_bytes(x), axis, int(axis_sizes[axis])))
    return spec

  return jax.tree_util.tree_map_with_path(one, params), replicated_list


def replicated_params(params, axis_sizes: Mapping[str, int],
                      layer_mixers: Sequence[str] = ()) -> list[ReplicatedParam]:
  """The matrices of ``params`` that ``axis_sizes`` leaves whole on an axis the rules would split them
  over (one entry per parameter and axis), in tree order; empty when every split happened. For
  ``summary.json``: ``[dataclasses.asdict(r) for r in replicated_params(...)]``."""
  return _specs_and_replicated(params, axis_sizes, layer_mixers)[1]


def _warn_replicated(replicated_list: Sequence[ReplicatedParam], shown: int = 3) -> None:
  """One warning for a whole spec computation, one clause per axis."""
  if not replicated_list:
    return
  clauses = []
  for axis in AXES:
    hits = [r for r in replicated_list if r.axis == axis]
    if hits:
      names = ", ".join(f"{r.name} {list(r.shape)}" for r in hits[:shown]) + (", ..." if len(hits) > shown else "")
      clauses.append(f"{len(hits)} parameter(s), {sum(r.bytes for r in hits):,} bytes, not split over "
                     f"runtime.mesh.{axis}={hits[0].axis_size} (no dimension the rule uses is divisible by "
                     f"{hits[0].axis_size}): {names}")
  warnings.warn("sharding: " + "; ".join(clauses) + ". They are replicated on that axis (every device of it "
                "holds them whole); hybrids.sharding.replicated_params lists them all.", stacklevel=3)


def param_specs(params, axis_sizes: Mapping[str, int], layer_mixers: Sequence[str] = ()):
  """``partition_spec`` of every leaf of ``params`` (a pure dict, arrays or ``ShapeDtypeStruct``).

  Warns once (``warnings.warn``) when a matrix the rules would split is left whole on an axis of size
  above one (see :func:`replicated_params`)."""
  specs, replicated_list = _specs_and_replicated(params, axis_sizes, layer_mixers)
  _warn_replicated(replicated_list)
  return specs


def params_shardings(params, mesh: Mesh, layer_mixers: Sequence[str] = ()):
  """``NamedSharding`` of every parameter on ``mesh``."""
  specs = param_specs(params, dict(mesh.shape), layer_mixers)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def follow_params_shardings(tree, params, params_sharding, mesh: Mesh):
  """Shardings for a tree whose leaves mirror parameters (optimizer moments): same layout.

  A leaf whose key path ends with a parameter's path, and has its shape, takes that parameter's
  sharding (optax nests the moments under its own keys: ``(1, 0, 'mu', 'blocks', 0, ...)``); any
  other leaf (step counters) is replicated.
  """
  table = {}
  for (path, p), (_, s) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(params_sharding)):
    table[_names(path)] = (tuple(p.shape), s)
  replicated = NamedSharding(mesh, PartitionSpec())

  def lookup(path, x):
    names = _names(path)
    for start in range(len(names)):
      hit = table.get(names[start:])
      if hit is not None and hit[0] == tuple(x.shape):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(lookup, tree)


# ----------------------------------------------------------------------------- batches

def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``[batch, ...]`` split over ``data`` and ``fsdp``, replicated over ``tensor``."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows ``[batch // process_count, ...]`` → global ``[batch, ...]`` arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def place_global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A batch every process holds in full (evaluation) → global arrays; each device takes its slice."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
  return out


# ----------------------------------------------------------------------------- multi-process start-up

_NODELIST_PART = re.compile(r"\[([^\]]*)\]")


def _split_top_level(text: str) -> list[str]:
  """Split on commas outside brackets: ``"a[1-2,4],b"`` → ``["a[1-2,4]", "b"]``."""
  parts, depth, current = [], 0, []
  for ch in text:
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(ch)
  parts.append("".join(current))
  return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str) -> list[str]:
  """``"01-03,7"`` → ``["01", "02", "03", "7"]`` (zero padding kept, as SLURM writes it)."""
  out = []
  for item in body.split(","):
    item = item.strip()
    if "-" in item:
      lo, hi = item.split("-", 1)
      if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
        raise ValueError(f"bad SLURM host range {item!r}")
      width = len(lo) if lo.startswith("0") else 0
      out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    elif item:
      out.append(item)
  return out


def expand_nodelist(nodelist: str) -> list[str]:
  """SLURM's compressed host list → host names, in order (what ``scontrol show hostnames`` prints).

  ``"node[01-03],other"`` → ``["node01", "node02", "node03", "other"]``; several bracket groups in
  one name (``"r[1-2]n[1,3]"``) expand as a product, the last group fastest.
  """
  if nodelist.count("[") != nodelist.count("]"):
    raise ValueError(f"bad SLURM node list {nodelist!r}: unbalanced brackets")
  hosts = []
  for part in _split_top_level(nodelist):
    names = [""]
    position = 0
    for match in _NODELIST_PART.finditer(part):
      prefix = part[position:match.start()]
      names = [n + prefix + item for n in names for item in _expand_range_list(match.group(1))]
      position = match.end()
    hosts.extend(n + part[position:] for n in names)
  return hosts


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
  """How to call ``jax.distributed.initialize``; None fields are left to JAX's own detection."""

  source: str  # "env", "slurm" or "tpu"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def kwargs(self) -> dict[str, Any]:
    out = {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
           "process_id": self.process_id}
    if self.local_device_ids is not None:
      out["local_device_ids"] = list(self.local_device_ids)
    return {k: v for k, v in out.items() if v is not None}


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value.split("(")[0])  # SLURM_TASKS_PER_NODE looks like "2(x3)"
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_port(env: Mapping[str, str]) -> int:
  port = _int_env(env, "HYBRIDS_COORDINATOR_PORT")
  if port is not None:
    return port
  # Derived from the job id so that two jobs sharing a node do not collide.
  return 20_000 + (_int_env(env, "SLURM_JOB_ID") or 0) % 10_000


def distributed_plan(env: Mapping[str, str] | None = None) -> DistributedPlan | None:
  """Read the environment; None for a single-process run. Never initializes anything.

  Precedence: explicit ``HYBRIDS_*`` variables, then SLURM, then TPU/GKE detection.
  """
  env = os.environ if env is None else env
  if env.get("HYBRIDS_COORDINATOR") or env.get("HYBRIDS_NUM_PROCESSES"):
    missing = [n for n in ("HYBRIDS_COORDINATOR", "HYBRIDS_NUM_PROCESSES", "HYBRIDS_PROCESS_ID") if not env.get(n)]
    if missing:
      raise ConfigError(f"multi-process run: {', '.join(missing)} not set (need HYBRIDS_COORDINATOR=host:port, "
                        "HYBRIDS_NUM_PROCESSES=N and HYBRIDS_PROCESS_ID=i together)")
    count, index = _int_env(env, "HYBRIDS_NUM_PROCESSES"), _int_env(env, "HYBRIDS_PROCESS_ID")
    if count < 1 or not 0 <= index < count:
      raise ConfigError(f"HYBRIDS_PROCESS_ID={index} must be in [0, HYBRIDS_NUM_PROCESSES={count})")
    if count == 1:
      return None
    address = env["HYBRIDS_COORDINATOR"]
    if ":" not in address:
      address = f"{address}:{_int_env(env, 'HYBRIDS_COORDINATOR_PORT') or 12_355}"
    local = env.get("HYBRIDS_LOCAL_DEVICE_IDS", "").strip()
    return DistributedPlan("env", address, count, index,
                           tuple(int(i) for i in local.split(",")) if local else None)

  tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
  nodes = _int_env(env, "SLURM_JOB_NUM_NODES") or _int_env(env, "SLURM_NNODES")
  if (tasks or 1) > 1 or (nodes or 1) > 1:
    # Under srun the step's node list is set; a plain sbatch script only sees the job's.
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
      raise ConfigError("SLURM multi-task job without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: cannot find the "
                        "coordinator; set HYBRIDS_COORDINATOR, HYBRIDS_NUM_PROCESSES and HYBRIDS_PROCESS_ID")
    count = tasks or nodes
    index = _int_env(env, "SLURM_PROCID") or 0
    local_ids = None
    per_node = _int_env(env, "SLURM_STEP_TASKS_PER_NODE") or _int_env(env, "SLURM_TASKS_PER_NODE")
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    # Several tasks on a node each take one GPU, unless SLURM already narrowed the visible ones.
    if per_node and per_node > 1 and len([v for v in visible.split(",") if v.strip()]) != 1:
      local_ids = (_int_env(env, "SLURM_LOCALID") or 0,)
    return DistributedPlan("slurm", f"{expand_nodelist(nodelist)[0]}:{_slurm_port(env)}", count, index, local_ids)

  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or any(k.startswith("MEGASCALE_") for k in env) or env.get("JOBSET_NAME"):
    return DistributedPlan("tpu")
  return None


def initialize_distributed(env: Mapping[str, str] | None = None) -> DistributedPlan | None:
  """Start ``jax.distributed`` as the environment says (:func:`distributed_plan`); a no-op otherwise.

  Call before anything touches a device. Safe to call twice. On CPU the cross-process collectives
  go through gloo.
  """
  plan = distributed_plan(env)
  if plan is None or jax.distributed.is_initialized():
    return plan
  platforms = (os.environ if env is None else env).get("JAX_PLATFORMS", "")
  if platforms.split(",")[0].strip() == "cpu":
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an older/newer jax without the option: its default
      pass
  jax.distributed.initialize(**plan.kwargs())
  return plan


# ----------------------------------------------------------------------------- command line

def describe(config, axis_sizes: Mapping[str, int]) -> str:
  """A table of every parameter's shape and spec for ``config`` (abstract: no weights, no devices)."""
  from flax import nnx

  from hybrids.model import HybridLM, layer_pattern

  model = nnx.eval_shape(lambda: HybridLM(config.model, rngs=nnx.Rngs(params=0)))
  params = nnx.to_pure_dict(nnx.state(model))
  specs = param_specs(params, axis_sizes, layer_pattern(config.model))
  rows = [(jax.tree_util.keystr(path), str(tuple(x.shape)), str(spec)) for (path, x), spec in
          zip(jax.tree_util.tree_leaves_with_path(params),
              jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec)))]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv=None) -> int:
  import argparse

  from hybrids import config as config_lib
  from hybrids.config import resolve

  parser = argparse.ArgumentParser(prog="python -m hybrids.sharding", description="Print the partition spec of "
                                   "every parameter of a config.")
  parser.add_argument("--config", required=True, help="experiment file and argument, e.g. experiments/quickstart.py:griffin")
  parser.add_argument("--fsdp", type=int, default=4)
  parser.add_argument("--tensor", type=int, default=1)
  args = parser.parse_args(argv)
  config = resolve(config_lib.get_config(args.config))
  print(describe(config, {"data": 1, "fsdp": args.fsdp, "tensor": args.tensor}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
