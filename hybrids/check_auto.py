"""Every mixer's training gradient with the kernels ``impl="auto"`` picks on this platform, against
the XLA paths: the check to run on a new GPU/TPU or jax version before a sweep trusts "auto".

    python -m hybrids.check_auto                                  # all registered mixers, bf16
    python -m hybrids.check_auto --mixers gla,deltanet --seq-len 1024 --dtype float32 --json out.json

For each mixer, a two-layer model (mixer, then SWA with window 128) sees one batch of random tokens.
The model is built twice from the same parameters: with every kernel family on "auto" (what the run
summary names, e.g. cuDNN attention and the Pallas scan / GLA / delta kernels on an NVIDIA GPU) and
with every family on "xla". The loss and the full parameter gradient of both are compared: relative
loss difference, and ‖g_auto − g_xla‖ / ‖g_xla‖ over all parameters. Limits are set by the compute
dtype (bf16: 2e-2 / 1e-1, the spread of bf16 rounding under a different summation order; f32:
1e-4 / 1e-3); a wrong kernel gradient is off by O(1). Prints a table, writes JSON, exits 1 when a
mixer fails to run, is not finite, or disagrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

TOLERANCES = {"bfloat16": (2e-2, 1e-1), "float32": (1e-4, 1e-3)}  # (loss, gradient), relative


def _model_config(mixer: str, impl: str, dtype: str, seq_len: int):
  from hybrids.config import base_config

  m = base_config("mqar").model
  m.pattern, m.n_layers, m.d_model, m.num_heads = (mixer, "swa"), 2, 256, 4
  m.window, m.vocab_size, m.dtype = 128, 256, dtype
  m.attention_impl = m.scan_impl = m.gla_impl = m.delta_impl = m.longconv_impl = impl
  return m


def check_mixer(mixer: str, *, dtype: str, seq_len: int, batch: int) -> dict:
  """Loss and gradient of one batch under "auto" and "xla"; returns the row of the table."""
  from flax import nnx

  import kernels
  from hybrids.mixers import get_mixer
  from hybrids.model import HybridLM

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (batch, seq_len + 1)), jnp.int32)
  results, row = {}, {"mixer": mixer}
  for impl in ("auto", "xla"):
    m = _model_config(mixer, impl, dtype, seq_len)
    for name in set(m.pattern):
      get_mixer(name).check_config(m, seq_len=seq_len)
    graphdef, state = nnx.split(HybridLM(m, rngs=nnx.Rngs(params=0)))  # same seed: same parameters
    params = nnx.to_pure_dict(state)

    def loss_fn(params, graphdef=graphdef, state=state):
      nnx.replace_by_pure_dict(state, params)
      logits = nnx.merge(graphdef, state)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    start = time.perf_counter()
    step = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
    compile_s = time.perf_counter() - start
    loss, grads = step(params)
    results[impl] = (float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads))
    if impl == "auto":
      row.update(kernels=kernels.resolve_impls(m), compile_s=round(compile_s, 1))
  (loss_auto, g_auto), (loss_xla, g_xla) = results["auto"], results["xla"]
  diff = sum(float(np.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_xla)))
  norm = sum(float(np.sum(b ** 2)) for b in jax.tree.leaves(g_xla))
  row.update(loss_auto=loss_auto, loss_xla=loss_xla,
             loss_rel_diff=abs(loss_auto - loss_xla) / abs(loss_xla),
             grad_rel_diff=float(np.sqrt(diff / max(norm, 1e-30))))
  finite = all(np.isfinite(x).all() for x in jax.tree.leaves(g_auto)) and np.isfinite(loss_auto)
  tol_loss, tol_grad = TOLERANCES[dtype]
  row["ok"] = bool(finite and row["loss_rel_diff"] < tol_loss and row["grad_rel_diff"] < tol_grad)
  return row


def main(argv=None) -> int:
  from hybrids.mixers import MIXERS

  parser = argparse.ArgumentParser(prog="python -m hybrids.check_auto", description=__doc__.split("\n\n")[0])
  parser.add_argument("--mixers", default=",".join(MIXERS), help=f"comma-separated; valid: {', '.join(MIXERS)}")
  parser.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCES))
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  mixers = [m for m in args.mixers.split(",") if m]
  unknown = [m for m in mixers if m not in MIXERS]
  if unknown:
    parser.error(f"--mixers: unknown {unknown}; valid: {', '.join(MIXERS)}")
  print(f"{jax.devices()[0].device_kind} · jax {jax.__version__} · {args.dtype} · T {args.seq_len} B {args.batch}",
        flush=True)
  print(f"{'mixer':16} {'auto runs':44} {'loss auto':>10} {'loss xla':>10} {'Δloss':>8} {'Δgrad':>8} {'compile s':>9}",
        flush=True)
  rows = []
  for mixer in mixers:
    try:
      row = check_mixer(mixer, dtype=args.dtype, seq_len=args.seq_len, batch=args.batch)
    except Exception as e:  # one mixer failing is reported; the others still run
      row = {"mixer": mixer, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
      print(f"{mixer:16} FAILED {row['error']}", flush=True)
      rows.append(row)
      continue
    picked = " ".join(f"{k}={v}" for k, v in row["kernels"].items())
    print(f"{mixer:16} {picked:44} {row['loss_auto']:10.5f} {row['loss_xla']:10.5f} {row['loss_rel_diff']:8.1e} "
          f"{row['grad_rel_diff']:8.1e} {row['compile_s']:9.1f}{'' if row['ok'] else '  DISAGREES'}", flush=True)
    rows.append(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "dtype": args.dtype,
                 "seq_len": args.seq_len, "batch": args.batch, "rows": rows}, f, indent=1)
  bad = [r["mixer"] for r in rows if not r["ok"]]
  print(f"{len(rows) - len(bad)}/{len(rows)} mixers agree" + (f"; failing: {', '.join(bad)}" if bad else ""))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
