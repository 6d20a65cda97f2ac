"""Forgetting attention (``kernels/forgetting_attention``): our Pallas flash kernels and XLA paths vs the
authors' Triton kernel (``forgetting_transformer``, Lin et al. 2025).

    python -m kernels.forgetting_attention.bench [--quick] [--json PATH]

Shapes: B4 T8192 H16 D128 bf16 (log f in f32), with a window of 1024 and global; ``--quick`` runs a
tiny shape of each (on CPU the Pallas kernels run interpreted, and the authors' kernel is skipped).
Rows: ``pallas (ours)`` (Triton on GPU, Mosaic on TPU), ``xla (ours)`` (the blocked band when
windowed, the dense form when global: it may not fit, and is then reported skipped) and the authors'
``forgetting_attention`` where it imports and the shape suits it (it is causal over the whole row: no
window), each skipped with the reason otherwise.

Inputs: q, k, v ~ N(0, 1) in bf16, ``log f = log σ(x + 3)`` with x ~ N(0, 1) (gates near 0.95, a
memory of tens to hundreds of tokens, as trained FoX layers show; f32). fwd+bwd is the vjp with
respect to q, k, v and log f for a random bf16 cotangent.

Every implementation is checked before it is timed, on the very program that is timed: its output and
each gradient for batch 0, heads 0–1 (all tokens) against the dense definition
(``forgetting_attention_reference``) in f32 with ``highest`` matmul precision on that slice. A wrong
implementation stops the benchmark.

Floors, as for window attention (``kernels/window_attention/bench.py``): ``pairs = Σ_t min(t + 1, W)``
(causal band); forward ``4·B·H·D·pairs`` FLOPs, fwd+bwd ``14·B·H·D·pairs`` (the bias adds one add per
pair, not counted); bytes: q, k, v, o and log f once (fwd), three times (fwd+bwd).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from kernels.bench import (Context, check_out_and_grads, checked_row, format_table, head_slice, peer_row,
                           progress_log, torch_peer, vjp_fns, write_report)
from kernels.forgetting_attention import forgetting_attention, forgetting_attention_reference
from kernels.window_attention.bench import band_pairs

SHAPES = [(4, 8192, 16, 128, 1024), (4, 8192, 16, 128, None)]  # batch, time, heads, head_dim, window
QUICK_SHAPES = [(1, 256, 2, 64, 64), (1, 256, 2, 64, None)]
TOL = 2e-2  # bf16 inputs and probabilities against an f32 reference
N_SETS = 3
NAMES = ("q", "k", "v", "log_forget")
PEER = "forgetting_transformer (authors)"

_log = progress_log("bench_forgetting_attention")


def _label(batch, time, heads, dim, window):
  return f"B{batch} T{time} H{heads} D{dim} {'W' + str(window) if window else 'global'} bf16"


def _inputs(seed, batch, time, heads, dim):
  """(q, k, v, log f, cotangent): bf16 but log f (f32)."""
  kq, kk, kv, kf, kd = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
  shape = (batch, time, heads, dim)
  log_f = jax.nn.log_sigmoid(jax.random.normal(kf, (batch, time, heads)) + 3.0)
  return normal(kq, shape), normal(kk, shape), normal(kv, shape), log_f, normal(kd, shape)


def _reference(args, window):
  f32 = [x.astype(jnp.float32) for x in args]
  with jax.default_matmul_precision("highest"):
    return vjp_fns(lambda q, k, v, log_f: forgetting_attention_reference(q, k, v, log_f, window=window))[2](*f32)


def _authors(ctx, sets, ref, window):
  """The authors' Triton kernel: (timings dict, None) or (None, why not)."""
  if window is not None:
    return None, "the authors' kernel is causal over the whole row (no window)"
  def load():
    from forgetting_transformer import forgetting_attention
    return forgetting_attention

  return torch_peer(ctx, PEER, load, sets, 4, ref, NAMES, TOL, _log)


def _run_shape(ctx: Context, shape) -> list[dict]:
  batch, time, heads, dim, window = shape
  on_cpu = ctx.platform == "cpu"
  sets = [_inputs(seed, batch, time, heads, dim) for seed in range(1 if ctx.quick else N_SETS)]
  ref = jax.block_until_ready(_reference(head_slice(sets[0][:4]) + (head_slice(sets[0][4]),), window))
  _log(f"reference ready ({_label(*shape)})")
  pairs = band_pairs(time, window or time) * batch * heads
  io_bytes = 4 * batch * time * heads * dim * 2 + batch * time * heads * 4
  base = dict(kernel="forgetting_attention", shape=_label(*shape), window=window,
              floor_fwd_ms=ctx.floor_ms(bytes_moved=io_bytes, flops=4 * dim * pairs),
              floor_fwdbwd_ms=ctx.floor_ms(bytes_moved=3 * io_bytes, flops=14 * dim * pairs),
              reference="dense f32, batch 0 heads 0-1, all tokens")
  compare = lambda name, ours, ref: check_out_and_grads(name, ours, ref, NAMES, TOL)

  def ours(name, **kwargs):
    f = lambda q, k, v, log_f: forgetting_attention(q, k, v, log_f, window=window, **kwargs)
    return checked_row(ctx, base, name, vjp_fns(f), sets, ref, compare, _log)

  rows = [ours("pallas (ours)", impl="pallas", interpret=on_cpu)]
  rows.append(peer_row(base, PEER, lambda: _authors(ctx, sets, ref, window), _log))
  rows.append(ours("xla (ours)", impl="xla"))
  return rows


def run(ctx: Context) -> list[dict]:
  """The rows of every shape (``python -m kernels.bench`` convention)."""
  rows = []
  for shape in (QUICK_SHAPES if ctx.quick else SHAPES):
    rows += _run_shape(ctx, shape)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m kernels.forgetting_attention.bench",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (checks the script, not the speed)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  ctx = Context(quick=args.quick, platform=device.platform, iters=3 if args.quick else 20,
                repeats=1 if args.quick else 5)
  rows = run(ctx)
  print(format_table(rows), flush=True)
  write_report("kernels.forgetting_attention.bench", argv, rows, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
