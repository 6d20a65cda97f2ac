"""Where a training run's time goes beyond its device step: the same jitted step, four ways.

    python -m hybrids.bench_step --config experiments/zoology_mqar.py --config.model.d_model=64 \\
        "--config.model.pattern=('based',)" --config.model.feature_dim=8 --steps 300 --json step.json

A run's rate (``tokens_per_sec`` in ``summary.json``) can be well below its step's: the host must make
and place every batch and keep the metrics, and any of these can leave the device waiting. Each row
times ``--steps`` steps of the config's own ``train_step`` (after warm-up steps, one sync at the end),
adding one piece of the trainer's loop at a time:

1. one batch already on the device, reused: the device step alone (what the step costs);
2. + a host batch placed on the device every step (``shard_batch``);
3. + the batches from the config's own training pipeline (``data.train_dataset``), as the run reads them;
4. + the metrics kept every step and fetched every ``train.log_every`` steps, as the trainer does;
5. (``--lr-group G``) G copies of the run trained in one step (``train.group_steps``, the step of a
   lockstep group: ``jax.vmap`` over their parameters and optimizer states on one shared device batch), per run: what a sweep would gain by training
   the learning rates of one cell together instead of in G processes (the copies share the config's
   learning rate here: the step's cost does not depend on its value).

The difference between rows is that piece's cost to the run (host time the device could not hide);
"host ms" is the time spent getting batches. Prints a table and, with ``--json``, writes the rows with
the device and versions. Parameters are updated as in training (the rows run one after the other).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax

from hybrids import config as config_lib
from hybrids import data as data_lib
from hybrids import sharding as sharding_lib
from hybrids import train as train_lib


def measure(config, steps: int, warmup: int = 5, lr_group: int = 0) -> list[dict]:
  """The rows of the module docstring for ``config`` (resolved), ``steps`` timed steps each; row 5
  only with ``lr_group`` ≥ 2."""
  mesh = sharding_lib.make_mesh(sharding_lib.mesh_config_of(config), batch_size=config.train.batch_size)
  setup = train_lib.build(config, mesh)
  t = config.train
  dataset = data_lib.train_dataset(config.data, seq_len=config.data.seq_len, batch_size=t.batch_size, seed=config.seed,
                                   workdir=tempfile.mkdtemp(prefix="bench_step-"), process_index=jax.process_index(),
                                   process_count=jax.process_count())
  iterator = data_lib.make_iterator(dataset)
  host_batch = next(iterator)
  placed = sharding_lib.shard_batch(host_batch, setup.batch_sharding)
  state = {"params": setup.params, "opt_state": setup.opt_state}
  tokens = t.batch_size * config.data.seq_len

  def timed(name: str, get_batch, keep_metrics: bool = False) -> dict:
    for _ in range(warmup):
      state["params"], state["opt_state"], metrics = setup.train_step(state["params"], state["opt_state"], get_batch(),
                                                                       None)
    jax.block_until_ready(metrics)
    pending, host_s, start = [], 0.0, time.perf_counter()
    for i in range(steps):
      clock = time.perf_counter()
      batch = get_batch()
      host_s += time.perf_counter() - clock
      state["params"], state["opt_state"], metrics = setup.train_step(state["params"], state["opt_state"], batch, None)
      if keep_metrics:
        pending.append(metrics)
        if (i + 1) % max(t.log_every, 1) == 0:
          jax.device_get(pending)
          pending.clear()
    jax.block_until_ready(metrics)
    ms = 1e3 * (time.perf_counter() - start) / steps
    row = {"loop": name, "ms_per_step": ms, "host_ms_per_batch": 1e3 * host_s / steps, "tokens_per_sec": tokens / ms * 1e3}
    print(f"  {name:58s} {ms:8.2f} ms/step  host {row['host_ms_per_batch']:6.2f} ms  "
          f"{row['tokens_per_sec']:12,.0f} tokens/s", flush=True)
    return row

  place = lambda b: sharding_lib.shard_batch(b, setup.batch_sharding)
  rows = [timed("1. one device-resident batch (the device step)", lambda: placed),
          timed("2. + a host batch placed every step", lambda: place(host_batch)),
          timed("3. + the training pipeline's batches", lambda: place(next(iterator))),
          timed(f"4. + metrics kept, fetched every {t.log_every} steps", lambda: place(next(iterator)), True)]
  if lr_group >= 2:
    rows.append(_vmapped_row(setup.trainer, config, state, placed, lr_group, steps, warmup, tokens))
  return rows


def _vmapped_row(trainer, config, state: dict, batch, group: int, steps: int, warmup: int, tokens: int) -> dict:
  """Row 5: ``group`` copies of the step under ``jax.vmap``, per run (``state``: the rows' current
  parameters and optimizer state)."""
  stack = lambda tree: jax.tree.map(lambda x: jax.numpy.stack([x] * group), tree)
  params, opt_state = stack(state["params"]), stack(state["opt_state"])
  group_step, _ = train_lib.group_steps(trainer, config)  # the step train_group runs
  lrs = jax.numpy.full((group,), config.train.lr, jax.numpy.float32)
  active = jax.numpy.ones((group,), bool)
  for _ in range(warmup):
    params, opt_state, metrics = group_step(params, opt_state, batch, lrs, active, None)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, metrics = group_step(params, opt_state, batch, lrs, active, None)
  jax.block_until_ready(metrics)
  ms = 1e3 * (time.perf_counter() - start) / steps / group
  name = f"5. {group} runs vmapped in one step (per run)"
  print(f"  {name:58s} {ms:8.2f} ms/step  host {0.0:6.2f} ms  {tokens / ms * 1e3:12,.0f} tokens/s", flush=True)
  return {"loop": name, "ms_per_step": ms, "host_ms_per_batch": 0.0, "tokens_per_sec": tokens / ms * 1e3,
          "lr_group": group}


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    argv, overrides = config_lib.split_overrides(argv)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  parser = argparse.ArgumentParser(prog="python -m hybrids.bench_step", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="experiment file and optional argument; fields with --config.F=V")
  parser.add_argument("--steps", type=int, default=200, help="timed steps per row (default 200)")
  parser.add_argument("--lr-group", type=int, default=0, metavar="G",
                      help="also time G copies of the step vmapped into one, per run (row 5)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  args = parser.parse_args(argv[1:])
  if args.steps < 1:
    parser.error(f"--steps: timed steps per row, ≥ 1, got {args.steps}")
  if args.lr_group == 1 or args.lr_group < 0:
    parser.error(f"--lr-group: runs vmapped into one step, 0 (no such row) or ≥ 2, got {args.lr_group}")
  try:
    config = config_lib.resolve(config_lib.get_config(args.config, overrides))
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.config} {overrides}: batch {config.train.batch_size} × {config.data.seq_len} tokens, "
        f"{args.steps} steps a row", flush=True)
  rows = measure(config, args.steps, lr_group=args.lr_group)
  from kernels.bench import write_report
  write_report("hybrids.bench_step", argv[1:], rows, args.json, config=args.config, overrides=overrides)
  return 0


if __name__ == "__main__":
  sys.exit(main())
