"""Sliding-window attention: our Pallas flash kernel and XLA banded path vs cuDNN and torch flex_attention.

    python -m kernels.bench --kernels window_attention
    python -m kernels.window_attention.bench --segments 4 [--quick] [--json PATH]

Shapes (bf16, head_dim 128, 16 heads): B4 T8192 W1024 (the headline), B4 T2048 with W 128 / 512 / 2048,
and B1 T32768 W1024; ``--quick`` runs one tiny shape (on CPU the Pallas kernel runs interpreted).

Every implementation is checked before it is timed: its output and its gradients (for a random
cotangent) against an f32 reference with ``highest`` matmul precision — the dense definition where
the ``[T, T]`` scores fit, the blocked band (``impl="xla"``, itself tested against the dense one)
beyond. The floor counts the FLOPs of the causal band honestly, ``pairs = Σ_t min(t + 1, W)``:
forward ``4·B·H·D·pairs`` (QKᵀ and PV), backward ``10·B·H·D·pairs`` (QKᵀ again, dV, dP, dQ, dK).

``--segments N`` (packed documents, issue 23): each shape is timed as above and again with
``segment_ids`` cutting every row into N documents of random lengths (different per row), checked
against the reference with the same ids; torch's flex_attention gets the same document mask, cuDNN
is skipped with the dispatch's reason. On a GPU the Mosaic GPU kernels get one more row: the whole
band streamed and every block masked (``PallasBlocks(mgpu_skip_outside_documents=False)``), against
``auto``'s band cut to the documents. Every row carries ``"segments"``: its documents per row (0: no
``segment_ids``).
The floor stays that of the unsegmented band (an upper bound on the work).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.bench import Context, check, format_table, random_documents, write_report
from kernels.window_attention import PallasBlocks, window_attention

SHAPES = [  # (batch, time, heads, head_dim, window)
    (4, 8192, 16, 128, 1024),
    (4, 2048, 16, 128, 128),
    (4, 2048, 16, 128, 512),
    (4, 2048, 16, 128, 2048),
    (1, 32768, 16, 128, 1024),
]
QUICK_SHAPES = [(1, 256, 2, 64, 64)]
TOL = 2e-2  # bf16 inputs and probabilities against an f32 reference
DENSE_LIMIT = 2**31  # bytes of f32 [B, H, T, T] scores the dense reference may build


def band_pairs(time: int, window: int) -> int:
  """Number of (query, key) pairs with 0 ≤ t − s < window."""
  w = min(window, time)
  return w * time - w * (w - 1) // 2


def _label(batch, time, heads, dim, window, documents=0):
  return f"B{batch} T{time} H{heads} D{dim} W{window} bf16" + (f" · {documents} docs/row" if documents else "")


def _inputs(key, batch, time, heads, dim):
  kq, kk, kv, kg = jax.random.split(key, 4)
  shape = (batch, time, heads, dim)
  return tuple(jax.random.normal(k, shape, jnp.bfloat16) for k in (kq, kk, kv, kg))


def _fwd_and_grads(fn):
  """jit(q, k, v, do) → (o, (dq, dk, dv)) and jit(q, k, v, do) → (dq, dk, dv)."""
  def both(q, k, v, do):
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(do)
  return jax.jit(fn), jax.jit(both), jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))


def _reference(q, k, v, do, window, segment_ids=None):
  batch, time, heads, _ = q.shape
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  dense = batch * heads * time * time * 4 <= DENSE_LIMIT
  impl = "reference" if dense else "xla"
  fn = lambda q, k, v: window_attention(q, k, v, window=window, impl=impl, segment_ids=segment_ids)
  with jax.default_matmul_precision("highest"):
    out = _fwd_and_grads(fn)[1](*f32)
  return out, ("dense f32" if dense else "banded f32")


def _check_all(name, ours, ref):
  """Output and each gradient separately (one norm over all would hide a bad small one)."""
  (o, grads), (o_ref, grads_ref) = ours, ref
  errs = [check(f"{name} out", o, o_ref, TOL)]
  errs += [check(f"{name} d{x}", g, g_ref, TOL) for x, g, g_ref in zip("qkv", grads, grads_ref)]
  return max(errs)


def _torch_flex(ctx, q, k, v, do, window, ref, segment_ids=None):
  """torch flex_attention with a sliding-window BlockMask (and the documents of ``segment_ids``),
  compiled; None and a reason if unavailable."""
  try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if not torch.cuda.is_available():
      return None, "no CUDA device for torch"
  except Exception as e:  # a peer that cannot be imported is reported, not fatal
    return None, f"torch flex_attention unavailable: {type(e).__name__}"
  batch, time, heads, dim = q.shape

  def to_torch(x):  # [B, T, H, D] bf16 → [B, H, T, D] bf16 on the GPU
    return torch.from_numpy(np.array(x.astype(jnp.float32))).to("cuda", torch.bfloat16).transpose(1, 2).contiguous()

  tq, tk, tv, tdo = (to_torch(x) for x in (q, k, v, do))
  tq.requires_grad_(); tk.requires_grad_(); tv.requires_grad_()

  def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

  if segment_ids is None:
    block_mask = create_block_mask(sliding_window, B=None, H=None, Q_LEN=time, KV_LEN=time, device="cuda")
  else:
    document = torch.from_numpy(np.asarray(segment_ids)).to("cuda")

    def in_document(b, h, q_idx, kv_idx):
      return sliding_window(b, h, q_idx, kv_idx) & (document[b, q_idx] == document[b, kv_idx])
    block_mask = create_block_mask(in_document, B=batch, H=None, Q_LEN=time, KV_LEN=time, device="cuda")
  flex = torch.compile(flex_attention)
  fwd = lambda: flex(tq, tk, tv, block_mask=block_mask)
  fwdbwd = lambda: torch.autograd.grad(flex(tq, tk, tv, block_mask=block_mask), (tq, tk, tv), tdo)
  out = fwd()
  grads = fwdbwd()
  back = lambda x: x.detach().transpose(1, 2).float().cpu().numpy()
  err = _check_all("torch flex_attention", (back(out), tuple(back(g) for g in grads)), ref)
  return dict(fwd_ms=ctx.time_torch(fwd), fwdbwd_ms=ctx.time_torch(fwdbwd), rel_err=err), None


def _progress(row):
  fmt = lambda x: "—" if x is None else f"{x:.3f}"
  print(f"  {row['shape']}  {row['impl']}: fwd {fmt(row.get('fwd_ms'))} ms, fwd+bwd {fmt(row.get('fwdbwd_ms'))} ms"
        + (f"  ({row['note']})" if row.get("note") else ""), flush=True)


def run(ctx, documents: int = 0) -> list[dict]:
  """The rows of every shape; with ``documents`` > 0 each shape again with that many documents per
  row (``segment_ids``), beside the rows without."""
  rows = []
  for shape in (QUICK_SHAPES if ctx.quick else SHAPES):
    for docs in ((0, documents) if documents else (0,)):
      rows += _run_shape(ctx, shape, docs)
  return rows


def _run_shape(ctx, shape, documents: int) -> list[dict]:
  rows = []
  on_cpu = ctx.platform == "cpu"
  batch, time, heads, dim, window = shape
  segment_ids = random_documents(batch, time, documents) if documents else None
  sets = [_inputs(jax.random.key(i), batch, time, heads, dim) for i in range(1 if ctx.quick else 3)]
  ref, ref_name = _reference(*sets[0], window, segment_ids)
  pairs = band_pairs(time, window) * batch * heads
  io_bytes = 4 * batch * time * heads * dim * 2
  base = dict(kernel="window_attention", shape=_label(*shape, documents),
              floor_fwd_ms=ctx.floor_ms(bytes_moved=io_bytes, flops=4 * dim * pairs),
              floor_fwdbwd_ms=ctx.floor_ms(bytes_moved=3 * io_bytes, flops=14 * dim * pairs),
              reference=ref_name, window=window, segments=documents)

  candidates = [
      ("pallas (ours)", True, dict(impl="pallas", interpret=on_cpu)),  # Mosaic GPU on Hopper
      ("xla banded (ours)", True, dict(impl="xla")),
      ("cudnn (jax)", False, dict(impl="cudnn")),
  ]
  if not on_cpu:  # the Triton kernels, which the Mosaic GPU ones replace on Hopper
    triton = PallasBlocks(fwd_kernel="triton", bwd_kernel="triton")
    candidates.insert(1, ("pallas triton (ours)", True, dict(impl="pallas", pallas_blocks=triton)))
    if documents:  # the Hopper kernels streaming the whole band, masked (the default cuts it to the documents)
      whole = PallasBlocks(fwd_kernel="mosaic_gpu", bwd_kernel="mosaic_gpu", mgpu_skip_outside_documents=False)
      candidates.insert(2, ("pallas mosaic_gpu whole band (ours)", True, dict(impl="pallas", pallas_blocks=whole)))
  for name, ours, kwargs in candidates:
    fn = lambda q, k, v, kwargs=kwargs: window_attention(q, k, v, window=window, segment_ids=segment_ids, **kwargs)
    row = dict(base, impl=name, ours=ours, fwd_ms=None, fwdbwd_ms=None)
    try:
      fwd, both, fwdbwd = _fwd_and_grads(fn)
      row["rel_err"] = _check_all(name, both(*sets[0]), ref)
    except AssertionError:
      raise  # a wrong kernel stops the benchmark
    except Exception as e:  # an implementation this platform or shape lacks (cuDNN off GPU)
      row["note"] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
      row["impl"] = f"{name} — skipped"
      rows.append(row)
      _progress(row)
      continue
    row["fwd_ms"] = ctx.time_jax(fwd, [s[:3] for s in sets])
    row["fwdbwd_ms"] = ctx.time_jax(fwdbwd, sets)
    rows.append(row)
    _progress(row)

  timing, why = _torch_flex(ctx, *sets[0], window, ref, segment_ids) if not on_cpu else (None, "no CUDA device")
  row = dict(base, impl="flex_attention (torch)", ours=False, fwd_ms=None, fwdbwd_ms=None)
  if timing is None:
    row.update(impl="flex_attention (torch) — skipped", note=why)
  else:
    row.update(timing)
  rows.append(row)
  _progress(row)
  return rows


def main(argv=None) -> int:
  """``python -m kernels.window_attention.bench``: this family alone, as ``python -m kernels.bench``
  runs it, and ``--segments N`` (packed documents) beside."""
  import argparse
  parser = argparse.ArgumentParser(prog="python -m kernels.window_attention.bench", description=__doc__.split("\n\n")[0])
  parser.add_argument("--segments", type=int, default=0,
                      help="also time every shape with N ≥ 2 documents per row (segment_ids); 0: none")
  parser.add_argument("--quick", action="store_true", help="small shapes (checks the script, not the speed)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  args = parser.parse_args(argv)
  if args.segments == 1 or args.segments < 0:
    parser.error(f"--segments: documents per row, ≥ 2 (or 0: none), got {args.segments}")
  device = jax.devices()[0]
  ctx = Context(quick=args.quick, platform=device.platform, iters=3 if args.quick else 20,
                repeats=1 if args.quick else 5)
  rows = run(ctx, args.segments)
  print(format_table(rows), flush=True)
  write_report("kernels.window_attention.bench", argv, rows, args.json, segments=args.segments)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
