"""Packed documents in the long convolutions (Hyena, BaseConv, S4D): what the segmented modal scan costs.

    python -m hybrids.bench_longconv --json longconv.json      # B4 T8192, 1024 channels, 16 modes (GPU)
    python -m hybrids.bench_longconv --quick                   # a tiny shape (checks the script)

A row of one document runs the FFT convolution (:func:`hybrids.longconv.causal_fft_conv` of the
materialised filter); packed documents run :func:`hybrids.longconv.segmented_modal_conv`, a chunked
modal scan. Rows, forward and forward+backward (gradients of the input and of the filter's poles and
residues), timed in the same process as in ``kernels.bench``:

- FFT convolution, one document a row (what a row without ``segment_ids`` runs);
- the segmented scan with each form of its in-chunk taps (``hybrids.longconv.CHUNK_TAPS``) and chunk
  size (``--forms``: ``taps:chunk`` pairs), one document a row (the same output: the scan's own cost)
  and ``--segments`` documents a row. A longer chunk halves the chunk-end states (and the scan over
  them) each time it doubles, while the taps do twice the multiply-adds: which wins depends on how the
  taps run (``scan``: one pass over the input a lag; ``reduce``: one fused pass);
- the streaming Pallas kernels of :mod:`kernels.modal` (``--forms pallas:BLOCK_C``, BLOCK_C channels a
  program; the states in registers, one pass over the input each way), interpreted off a GPU.

fwd+bwd is the output and every gradient together, as a training step needs them (earlier rows in
kernels/BENCHMARKS.md timed the gradients alone, which lets XLA skip a linear op's forward).

Each is checked before it is timed: the scan with one document against the FFT convolution, with N
documents against every document convolved alone by FFT. The issue-23 target is that documents cost
≤ 5 % against the first row.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hybrids.layers import document_starts
from hybrids.longconv import CHUNK_TAPS, SEGMENT_CHUNK, causal_fft_conv, modal_kernel, segmented_modal_conv
from kernels.modal import ModalConfig, modal_conv_pallas
from kernels.bench import Context, check, format_table, random_documents, vjp_fns, write_report

FULL = (4, 8192, 1024, 16)  # batch, time, channels, modes
QUICK = (2, 96, 8, 4)
TOL = 1e-4  # float32 on both sides; the scan and the FFT round differently


def _inputs(seed: int, batch: int, time: int, channels: int, modes: int):
  ku, kr, ka, kre, kim, kg = jax.random.split(jax.random.key(seed), 6)
  u = jax.random.normal(ku, (batch, time, channels), jnp.float32)
  rate = jnp.exp(jax.random.uniform(kr, (channels, modes), minval=np.log(1e-3), maxval=np.log(1e-1)))
  log_poles = (-rate + 1j * jax.random.uniform(ka, (channels, modes), maxval=np.pi)).astype(jnp.complex64)
  residues = ((jax.random.normal(kre, (channels, modes)) + 1j * jax.random.normal(kim, (channels, modes)))
              / np.sqrt(modes)).astype(jnp.complex64)
  cotangent = jax.random.normal(kg, (batch, time, channels), jnp.float32)
  return u, log_poles, residues, cotangent


def _fft(u, log_poles, residues):
  return causal_fft_conv(u, modal_kernel(log_poles, residues, u.shape[1]))


def _by_document(u, log_poles, residues, segment_ids):
  """Every document convolved alone by FFT: the definition the scan must meet."""
  out = np.zeros(u.shape, np.float32)
  ids = np.asarray(segment_ids)
  for row in range(u.shape[0]):
    starts = [0] + [t for t in range(1, u.shape[1]) if ids[row, t] != ids[row, t - 1]] + [u.shape[1]]
    for a, b in zip(starts[:-1], starts[1:]):
      out[row, a:b] = np.asarray(_fft(u[row:row + 1, a:b], log_poles, residues))[0]
  return out


def _segmented(u, log_poles, residues, *, segment_ids, taps: str, chunk: int, interpret: bool = False):
  if taps == PALLAS:  # the streaming kernels of kernels.modal, `chunk` channels a program
    config = ModalConfig(block_c=chunk)
    return modal_conv_pallas(u, log_poles, residues, document_starts(segment_ids), config=config,
                             interpret=interpret)
  return segmented_modal_conv(u, log_poles, residues, segment_ids, taps=taps, chunk_size=chunk)[0]


PALLAS = "pallas"  # a --forms item pallas:BLOCK_C: the Pallas kernels with BLOCK_C channels a program
FORMS = f"scan:{SEGMENT_CHUNK},unrolled:{SEGMENT_CHUNK},reduce:{SEGMENT_CHUNK},reduce:128"
# On a GPU the kernels too; elsewhere they would only interpret (hours at the full shape): ask for them.
GPU_FORMS = f"{FORMS},{PALLAS}:4,{PALLAS}:8,{PALLAS}:16,{PALLAS}:32"


def parse_forms(text: str) -> list[tuple[str, int]]:
  """``"scan:32,reduce:128,pallas:8"`` → ``[("scan", 32), ("reduce", 128), ("pallas", 8)]``; one line
  naming the bad item."""
  forms = []
  for item in filter(None, (x.strip() for x in text.split(","))):
    taps, _, chunk = item.partition(":")
    if taps == PALLAS and chunk.isdigit() and int(chunk) >= 1 and int(chunk) & (int(chunk) - 1) == 0:
      forms.append((taps, int(chunk)))
      continue
    if taps not in CHUNK_TAPS or not chunk.isdigit() or int(chunk) < 1:
      raise ValueError(f"--forms: {item!r} is not taps:chunk with taps one of {sorted(CHUNK_TAPS)} and a "
                       f"positive chunk size, nor {PALLAS}:BLOCK_C with a power of two")
    forms.append((taps, int(chunk)))
  if not forms:
    raise ValueError("--forms: give at least one taps:chunk pair")
  return forms


def run(ctx: Context, segments: int, forms: list[tuple[str, int]] | None = None) -> list[dict]:
  batch, time, channels, modes = QUICK if ctx.quick else FULL
  sets = [_inputs(seed, batch, time, channels, modes) for seed in range(1 if ctx.quick else 3)]
  u, log_poles, residues, _ = sets[0]
  one = jnp.zeros((batch, time), jnp.int32)
  packed = random_documents(batch, time, segments)
  reference = np.asarray(_fft(u, log_poles, residues))
  by_document = _by_document(u, log_poles, residues, packed)
  candidates = [("fft conv, 1 doc/row", lambda u, p, r: _fft(u, p, r), None)]
  interpret = ctx.platform != "gpu"  # the kernels are Triton's: elsewhere they interpret
  for taps, chunk in forms or parse_forms(FORMS):
    form = f"pallas kernel, block_c {chunk}" if taps == PALLAS else f"{taps} taps, chunk {chunk}"
    candidates += [
        (f"segmented, {form}, {n} doc{'s' if n > 1 else ''}/row",
         functools.partial(_segmented, segment_ids=ids, taps=taps, chunk=chunk, interpret=interpret), expected)
        for n, ids, expected in ((1, one, None), (segments, packed, by_document))]
  label = f"B{batch} T{time} C{channels} modes{modes} f32"
  rows = []
  for name, f, expected in candidates:
    # fwd+bwd: the output and every gradient, as a training step needs them (the gradients alone would
    # let XLA drop a linear op's forward, which they do not need).
    fwd, _, fwdbwd = vjp_fns(f)
    err = check(name, np.asarray(fwd(u, log_poles, residues)), reference if expected is None else expected, TOL)
    rows.append(dict(kernel="longconv", shape=label, impl=name, ours=True, rel_err=err,
                     fwd_ms=ctx.time_jax(fwd, [s[:3] for s in sets]), fwdbwd_ms=ctx.time_jax(fwdbwd, sets),
                     segments=None if expected is None else segments))
    print(f"  {name}: fwd {rows[-1]['fwd_ms']:.3f} ms, fwd+bwd {rows[-1]['fwdbwd_ms']:.3f} ms", flush=True)
  base = rows[0]
  for row in rows[1:]:
    row["cost_fwd"] = row["fwd_ms"] / base["fwd_ms"] - 1
    row["cost_fwdbwd"] = row["fwdbwd_ms"] / base["fwdbwd_ms"] - 1
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m hybrids.bench_longconv", description=__doc__.split("\n\n")[0])
  parser.add_argument("--segments", type=int, default=4, help="documents a row in the last row (≥ 2)")
  parser.add_argument("--quick", action="store_true", help="a tiny shape (checks the script, not the speed)")
  parser.add_argument("--json", default="", help="write the rows, device and versions here")
  parser.add_argument("--forms", default=None, help=f"taps:chunk pairs of the segmented rows, and pallas:BLOCK_C "
                      f"(default on a GPU {GPU_FORMS}; elsewhere {FORMS})")
  args = parser.parse_args(argv)
  if args.segments < 2:
    parser.error(f"--segments: documents per row, ≥ 2, got {args.segments}")
  platform = jax.devices()[0].platform
  try:
    forms = parse_forms(args.forms or (GPU_FORMS if platform == "gpu" else FORMS))
  except ValueError as e:
    parser.error(str(e))
  ctx = Context(quick=args.quick, platform=platform)
  rows = run(ctx, args.segments, forms)
  print(format_table(rows))
  for row in rows[1:]:
    print(f"  {row['impl']}: {100 * row['cost_fwd']:+.0f} % fwd, {100 * row['cost_fwdbwd']:+.0f} % fwd+bwd "
          "against the FFT convolution")
  write_report("hybrids.bench_longconv", argv, rows, args.json, segments=args.segments)
  return 0


if __name__ == "__main__":
  sys.exit(main())
