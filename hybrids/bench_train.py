"""End-to-end training throughput: a ~100M Griffin-pattern hybrid vs a same-size global-attention
transformer, XLA-only paths vs the kernels ``impl="auto"`` picks, beside recurrentgemma's own JAX Griffin.

    python -m hybrids.bench_train                                   # T = 2k, 8k, 32k; 32k tokens per step
    python -m hybrids.bench_train --seq-lens 2048 --models griffin,recurrentgemma --json /tmp/e2e.json

Shapes follow the issue: width 768, 12 layers, pattern (R, R, A) with window 1024, 12 heads with one
key/value head (MQA, as recurrentgemma's local attention), MLP 3×, vocabulary 32k, bf16 compute with
f32 parameters, remat on every block, AdamW. Every model sees the same tokens per step (batch =
tokens_per_step / T). A step is the full update (forward, backward, optimizer); tokens/s is the
median over timed loops after one warm-up step, and the compile time (lower + compile) is reported
beside it. Our steps are compiled as ``hybrids.train`` compiles them: layers scanned over the pattern's
period (``--scan-layers off`` unrolls them) and ``train.step_compiler_options`` (cuBLAS GEMMs on GPU).
A configuration that does not fit in memory is reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

WIDTH, LAYERS, HEADS, WINDOW, VOCAB, MLP = 768, 12, 12, 1024, 32_000, 3
MODELS = ("griffin", "attention", "recurrentgemma")


def _ours(pattern: tuple[str, ...], seq_len: int, impl: str, scan_layers: bool = True):
  """Our HybridLM train step (the one ``hybrids.train`` runs) and its params/optimizer state."""
  from flax import nnx

  from hybrids.config import base_config
  from hybrids.mixers import get_mixer
  from hybrids.model import HybridLM, count_params
  from hybrids.train import Trainer, make_optimizer, step_compiler_options

  c = base_config("mqar")
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.pattern = VOCAB, WIDTH, LAYERS, pattern
  m.num_heads, m.num_kv_heads, m.window, m.mlp_expansion = HEADS, 1, WINDOW, float(MLP)
  m.dtype, m.param_dtype, m.remat = "bfloat16", "float32", True
  m.attention_impl = m.scan_impl = m.gla_impl = m.delta_impl = m.longconv_impl = impl
  c.train.steps, c.train.warmup_steps = 1000, 10
  for name in set(pattern):  # the model's own checks; the data section is unused (synthetic tokens)
    get_mixer(name).check_config(m, seq_len=seq_len)
  model = HybridLM(m, rngs=nnx.Rngs(params=0))
  params_count = count_params(model)["params"]
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = make_optimizer(c.train)
  trainer = Trainer(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), tx,
                    scan_layers=scan_layers)
  step = jax.jit(trainer.train_step, donate_argnums=(0, 1),
                 compiler_options=step_compiler_options(jax.devices()[0].platform))
  return step, (params, tx.init(params)), params_count


def _recurrentgemma(seq_len: int):
  """recurrentgemma's JAX Griffin with the same shapes, trained with optax AdamW."""
  import recurrentgemma.jax as rg

  config = rg.GriffinConfig(
      vocab_size=VOCAB, width=WIDTH, mlp_expanded_width=MLP * WIDTH, num_heads=HEADS,
      block_types=tuple([rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.RECURRENT,
                         rg.TemporalBlockType.ATTENTION] * (LAYERS // 3)),
      embeddings_scale_by_sqrt_dim=True, attention_window_size=WINDOW, logits_soft_cap=30.0)
  model = rg.Griffin(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, gradient_checkpointing=True)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(jax.random.key(0), tokens, jnp.arange(seq_len)[None])
  count = sum(x.size for x in jax.tree.leaves(params))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 10, 1000)))

  def loss_fn(params, batch):
    pos = jnp.broadcast_to(jnp.arange(seq_len), batch["inputs"].shape)
    logits, _ = model.apply(params, batch["inputs"], pos)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss}

  return jax.jit(train_step, donate_argnums=(0, 1)), (params, tx.init(params)), count


def measure(build: Callable, seq_len: int, tokens_per_step: int, steps: int) -> dict:
  batch_size = max(1, tokens_per_step // seq_len)
  rng = np.random.default_rng(0)
  batches = [{"inputs": jnp.asarray(rng.integers(1, VOCAB, (batch_size, seq_len)), jnp.int32),
              "labels": jnp.asarray(rng.integers(1, VOCAB, (batch_size, seq_len)), jnp.int32)} for _ in range(2)]
  step, carry, count = build()
  start = time.perf_counter()
  lowered = step.lower(*carry, batches[0])
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()  # called directly below: compiled once
  compile_s = time.perf_counter() - start

  def run(carry, batch):
    params, opt_state, metrics = compiled(*carry, batch)
    return (params, opt_state), metrics["loss"]

  carry, loss = run(carry, batches[0])  # warm-up (and the jit cache entry for the timed loop)
  jax.block_until_ready(loss)
  samples = []
  for _ in range(3):
    start = time.perf_counter()
    for i in range(steps):
      carry, loss = run(carry, batches[i % 2])
    jax.block_until_ready(loss)
    samples.append((time.perf_counter() - start) / steps)
  step_s = statistics.median(samples)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"loss {float(loss)}")
  return {"params": int(count), "batch": batch_size, "step_ms": 1e3 * step_s,
          "tokens_per_s": batch_size * seq_len / step_s, "compile_s": compile_s,
          "lower_s": lower_s}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m hybrids.bench_train", description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--seq-lens", default="2048,8192,32768")
  parser.add_argument("--impls", default="xla,auto", help="our kernel choices: xla (XLA-only) and/or auto")
  parser.add_argument("--tokens-per-step", type=int, default=32_768)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--scan-layers", choices=("on", "off"), default="on",
                      help="our models: lax.scan over the layer period (training's default) or unrolled layers")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  models = args.models.split(",")
  bad = [m for m in models if m not in MODELS]
  if bad:
    parser.error(f"--models: unknown {bad}; valid: {', '.join(MODELS)}")
  rows = []
  print(f"{'model':<16} {'impl':<6} {'T':>6} {'B':>3} {'params':>8} {'step ms':>9} {'tokens/s':>10} {'compile s':>9} {'(lower s)':>9}")
  for seq_len in [int(t) for t in args.seq_lens.split(",")]:
    for model in models:
      for impl in (["-"] if model == "recurrentgemma" else args.impls.split(",")):
        if model == "recurrentgemma":
          build = lambda: _recurrentgemma(seq_len)
        else:
          pattern = ("rglru", "rglru", "swa") if model == "griffin" else ("attention",)
          build = lambda: _ours(pattern, seq_len, impl, args.scan_layers == "on")
        row = {"model": model, "impl": impl, "seq_len": seq_len,
               "scan_layers": model != "recurrentgemma" and args.scan_layers == "on"}
        try:
          row.update(measure(build, seq_len, args.tokens_per_step, args.steps))
          print(f"{model:<16} {impl:<6} {seq_len:>6} {row['batch']:>3} {row['params'] / 1e6:>7.1f}M "
                f"{row['step_ms']:>9.1f} {row['tokens_per_s']:>10,.0f} {row['compile_s']:>9.1f} {row['lower_s']:>9.1f}",
                flush=True)
        except Exception as e:  # out of memory, a missing peer: recorded in the table and the JSON
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
          print(f"{model:<16} {impl:<6} {seq_len:>6}   {row['error']}", flush=True)
        rows.append(row)
        jax.clear_caches()
        if args.json:  # after every row: a run cut short by a time limit keeps what it measured
          device = jax.devices()[0]
          report = {"device": getattr(device, "device_kind", device.platform), "jax": jax.__version__,
                    "command": "python -m hybrids.bench_train " + " ".join(argv or sys.argv[1:]), "rows": rows}
          with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
