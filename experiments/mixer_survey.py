"""The mixer survey: every recurrent mixer, pure and hybridized with sliding windows — which beat Mamba?

The study this project exists for (issue 25). Griffin (De et al. 2024), Based (Arora et al. 2024),
SWAX (Cabannes et al. 2025) and Jamba (Lieber et al. 2024) each pair one recurrent block with
(sliding-window) attention; none compares the recurrent blocks once hybridized. Here every recurrent
mixer of ``hybrids.mixers.MIXERS`` runs pure ``(m,)`` and in the Griffin pattern ``(m, m, swa)`` with a
small window (64 tokens) and a larger one (512), matched in non-embedding parameters (``model.size``,
``hybrids/sizes.py``) and trained on Chinchilla's 20 tokens per parameter at four sizes, each at three
learning rates; global attention, FoX (attention with a forget gate) and SWA alone are the references.
``python -m launch report`` then keeps each (pattern, size)'s best learning rate (flagging optima at the
edge of the grid), fits L(C) = E + A·C^(−α) per pattern with bootstrap intervals, ranks the patterns at
10× the largest budget, says which hybrids beat the Mamba hybrid ``(mamba, mamba, swa)`` of the same
window, and gives the pure − hybrid gap per mixer.

Grid (full): ``len(RECURRENT)`` mixers × {pure, hybrid w=64, hybrid w=512} + attention + FoX + SWA at
w=64 and w=512, i.e. ``3 · len(RECURRENT) + 4`` patterns (64 with today's 20 recurrent mixers) × 4
sizes × 3 learning rates (``LR[size] · {1/2, 1, 2}``) = 768 runs; seq_len 1024.

===== ====================== ============= ======================== ============== =======
size  (d_model, layers, heads) non-embedding tokens (20/param)        tokens a step  steps
===== ====================== ============= ======================== ============== =======
1m    (128, 4, 4)            0.85M         17.1M                    2^15           521
2m    (128, 8, 4)            1.71M         34.1M                    2^15           1041
5m    (256, 6, 4)            5.12M         102.3M                   2^16           1561
10m   (384, 6, 6)            11.51M        230.1M                   2^17           1756
===== ====================== ============= ======================== ============== =======

(non-embedding counts of the global-attention baseline that every pattern is matched to; 13.5× span).
``2m`` and ``10m`` were added to ``hybrids.sizes.LADDER`` for this survey (widths and head counts the
ladder already used, so no mixer meets a new head shape). The largest size is
bounded by the corpus: 10m's 230M tokens must not repeat any of the train split's tokens (below).

Corpus: the C sources (``*.c``, ``*.h``) of Linux 6.1 as Debian ships them (package
``linux-source-6.1``, 6.1.176-1), without ``drivers/gpu/drm/amd/include/asic_reg/`` (400 MB of
generated register tables: 51% of the ``.c``/``.h`` bytes, nearly free to predict, they would dominate
the loss); 54,723 files, 777 MB; one file is one document (``--doc-bytes`` above the largest, 1.7 MB);
1% of the documents held out (``hybrids.data.prepare``'s deterministic rule, seed 0). Tokenizer: a
byte-level BPE of 16,384 ids trained on 256 MB of the train split: the vocabulary stays uint16, the
embedding (16384 × 128 = 2.1M at 1m) stays near the smallest model's non-embedding size rather than
dwarfing it as 32k+ would, and C code still compresses to 2.5 bytes a token (so a 64-token window
spans ~4 lines of code, 512 tokens ~ a function). Prepared with the command below on 2 shared CPU
cores in 937 s (listing ~15 s, BPE training on 256 MB ~3 min, tokenizing the rest): train 307,058,998
tokens (54,152 documents, 5 shards), held out 3,163,754 tokens (547 documents); 16,384 ids learned,
uint16, ``tokenizers`` 0.23.3 (``manifest.json`` holds the exact counts; ``get_sweep`` checks them, below).
At 230M tokens, 10m reads 75% of the train split once; 20m (384M) would repeat tokens.

Prepare it here (offline after the download; reads the archive as a stream, never extracts it):

    mkdir -p build/linux && cd build/linux
    apt-get -oAPT::Architecture=amd64 download linux-source-6.1          # linux-source-6.1_6.1.176-1_all.deb, 139 MB
    ar p linux-source-6.1_*_all.deb data.tar.xz | tar -xJO ./usr/src/linux-source-6.1.tar.xz > linux-source-6.1.tar.xz
    cd ../.. && python -m hybrids.data.prepare --input build/linux/linux-source-6.1.tar.xz \\
        --members '*.c,*.h' --exclude-members '*/asic_reg/*' --doc-bytes 33554432 \\
        --tokenizer bpe:16384 --output data/linux-6.1-bpe16k

Carry to the GPU machine (no internet; ≤ 64 MiB a call; a fresh machine each slot, so once per slot):
the 138 MB inner tarball in three parts (the .deb itself is no smaller: its xz of an xz); the
committed tokenizer travels with the code, so both machines tokenize alike (``--tokenizer-file``).
``build/`` is git-ignored, so only what a call's ``carry`` names travels:

    cd build/linux && split -b 46000000 -d linux-source-6.1.tar.xz linux-source-6.1.tar.xz.part-
    sha256sum linux-source-6.1.tar.xz > linux-source-6.1.tar.xz.sha256
    cp ../../data/linux-6.1-bpe16k/manifest.json .

    # call 1: carry ["build/linux/linux-source-6.1.tar.xz.part-00",
    #                "build/linux/manifest.json", "build/linux/linux-source-6.1.tar.xz.sha256"]
    # call 2: carry ["build/linux/linux-source-6.1.tar.xz.part-01"]        command: true
    # call 3: carry ["build/linux/linux-source-6.1.tar.xz.part-02"], command:
    cat build/linux/linux-source-6.1.tar.xz.part-0? > build/linux/linux-source-6.1.tar.xz \\
      && (cd build/linux && sha256sum -c linux-source-6.1.tar.xz.sha256) \\
      && python -m hybrids.data.prepare --input build/linux/linux-source-6.1.tar.xz \\
           --members '*.c,*.h' --exclude-members '*/asic_reg/*' --doc-bytes 33554432 --tokenizer bpe:16384 \\
           --tokenizer-file experiments/tokenizers/linux-6.1-bpe16k.json --output data/linux-6.1-bpe16k --no-progress \\
      && python -c "import json; a, b = (json.load(open(p))['splits'] for p in ('build/linux/manifest.json',
           'data/linux-6.1-bpe16k/manifest.json')); assert a == b, 'tokenized differently'; print('same shards')"

(ignored files a call leaves on the machine are kept for the next call of the same slot; the last
line checks every shard's sha256 against the ones prepared here.) Then, in the same slot:

    python -m launch sweep experiments/mixer_survey.py:1m --backend local --runs-per-device N --mps --lr-group 3 --root runs
    python -m launch evaluate runs/mixer_survey-1m --eval retrieval,position --best   # recall, loss past T
    python -m launch report runs/mixer_survey-1m        # or all slices' runs together: see launch report

(``--lr-group 3``: each (pattern, size)'s three learning rates train in one process, their steps vmapped
together on the same batches; each is still its own run: README "Sweeps".)

Compute, from the table: 6 · N · tokens (N non-embedding, plus the 16k-vocabulary head) is about
3·10¹⁶ FLOPs per (pattern, learning rate) over the four sizes, 80 % of it at 10m; × 64 patterns × 3
rates ≈ 6·10¹⁸ FLOPs, about 12 H100-hours at 140 TFLOP/s (a fifth of the ~700 TFLOP/s bf16 matmul rate
measured there; an estimate: no slice has run).

Variants: ``None`` (full, 768 runs); ``1m``, ``2m``, ``5m``,
``10m``: the full grid at one size (192 runs each), the slices a GPU slot works through (the sweep is
idempotent: re-running a slice starts only the points without a finished run); ``small``: every
pattern at 1m at its table learning rate only (64 runs, no lr selection); ``pilot``: every pattern at
1m at the three learning rates (192 runs) on a subset of the corpus that fits one GPU call's carry
(below), the first runs of every pattern on a GPU: one size, but each cell at its best of three learning
rates, so the one-budget view compares the mixers pure and hybrid as the full survey will at 1m.
Trained with ``--lr-group 3`` it costs about what its 64 first points alone would: a 1m run's 521 steps
take seconds, its compile tens of seconds, and a group compiles once for its three rates.
``tiny``: a few-second CPU smoke test (2 points, used by ``tests/test_experiments.py``).

The pilot corpus: the ``fs/``, ``kernel/`` and ``mm/`` C sources of the same archive (58.9 MB), the
same tokenizer, 1% held out; its train split must hold 1m's 17.1M tokens (``check_corpus`` refuses
otherwise). The tokenizer the full preparation learns is committed, ``experiments/tokenizers/
linux-6.1-bpe16k.json`` (sha256 ``b247e9f1…``; learned again on 2026-12-08 in 654 s with the same
counts as above, so the training is deterministic), so the pilot needs neither the full preparation
nor its 11 minutes: 100 s on 2 CPU cores, train 22,131,967 tokens (2,581 documents), held out 729,537
(26), 45 MB. Its shards travel in one call beside the code:

    python -m hybrids.data.prepare --input build/linux/linux-source-6.1.tar.xz \
        --members 'linux-source-6.1/fs/*.c,linux-source-6.1/fs/*.h,linux-source-6.1/kernel/*.c,linux-source-6.1/kernel/*.h,linux-source-6.1/mm/*.c,linux-source-6.1/mm/*.h' \
        --doc-bytes 33554432 --tokenizer bpe:16384 --tokenizer-file experiments/tokenizers/linux-6.1-bpe16k.json \
        --output data/linux-6.1-bpe16k-pilot
    # on the GPU machine, carry ["data/linux-6.1-bpe16k-pilot", …]:
    python -m launch sweep experiments/mixer_survey.py:pilot --backend local --runs-per-device 8 --mps --lr-group 3 --root runs

Corpus check: ``get_sweep`` refuses, in one line naming ``train.steps × train.batch_size ×
data.seq_len`` and ``data.path``, any point whose training tokens exceed the train split of the
prepared corpus (``manifest.json``), before anything is compiled or written — when ``DATA_PATH``
exists locally. When it does not (a machine that has not prepared it yet, or a ``gs://`` path), the
check is skipped and the run's own validation refuses a missing corpus when it starts.
"""

from __future__ import annotations

import json
import os

from hybrids.config import ConfigError, base_config, check_variant, smoke_test
from hybrids.mixers import MIXERS
from hybrids.sizes import chinchilla_steps

DATA_PATH = "data/linux-6.1-bpe16k"
PILOT_DATA_PATH = "data/linux-6.1-bpe16k-pilot"  # fs/, kernel/, mm/ of the same sources, same tokenizer
ATTENTION_MIXERS = ("attention", "swa", "fox")  # references: run alone, not in (m, m, swa)
RECURRENT = tuple(name for name in MIXERS if name not in ATTENTION_MIXERS)
WINDOWS = (64, 512)   # the small window the survey is about, and one larger
SIZES = ("1m", "2m", "5m", "10m")
SEQ_LEN = 1024
TOKENS_PER_STEP = {"1m": 2**15, "2m": 2**15, "5m": 2**16, "10m": 2**17}
LR = {"1m": 3e-3, "2m": 2.5e-3, "5m": 2e-3, "10m": 1.5e-3}
LR_FACTORS = (0.5, 1.0, 2.0)
TOKENS_PER_PARAM = 20
VARIANTS = ("small", "pilot") + SIZES + ("tiny",)




def patterns() -> list[tuple[tuple[str, ...], int]]:
  """``(pattern, window)``: every recurrent mixer pure and in ``(m, m, swa)`` at each window, then the
  references (attention, FoX, SWA alone at each window). The window of a pattern without SWA is unused;
  it is kept at the first so that those runs' configs do not differ by it."""
  out = [((m,), WINDOWS[0]) for m in RECURRENT]
  out += [((m, m, "swa"), w) for w in WINDOWS for m in RECURRENT]
  out += [(("attention",), WINDOWS[0]), (("fox",), WINDOWS[0])] + [(("swa",), w) for w in WINDOWS]
  return out


def get_config(arg: str | None = None):
  """The Mamba hybrid (mamba, mamba, swa) at 1m on the Linux corpus; points set pattern, window, size, lr, steps."""
  check_variant("mixer_survey", arg, VARIANTS)
  c = base_config("shards")
  c.data.path = PILOT_DATA_PATH if arg == "pilot" else DATA_PATH
  c.data.seq_len = SEQ_LEN
  c.model.size = "1m"
  c.model.pattern = ("mamba", "mamba", "swa")
  c.model.window = WINDOWS[0]
  c.train.batch_size = TOKENS_PER_STEP["1m"] // SEQ_LEN
  c.train.lr = LR["1m"]
  c.train.steps = 500
  c.train.warmup_steps = 50
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.train.checkpoint_every = 250
  c.train.log_every = 20
  # The 16k-id head's f32 logits are 2.1 GB at 1m's 32k tokens a step (8.6 GB at 10m's 131k), three
  # times that with their gradient: a chunk of 2,048 positions at a time keeps 128 MB a member, so a
  # lockstep group of three learning rates can share one GPU with others (runtime: no run id changes).
  c.runtime.loss_chunk_tokens = 2048
  if arg == "tiny":
    smoke_test(c, steps=2, batch_size=2, n_layers=3, num_heads=2, window=8)
  return c


def rung(base, size: str) -> dict:
  """The fields one size sets: its shape, the batch of its tokens a step, Chinchilla's steps, schedules."""
  tokens_per_step = TOKENS_PER_STEP[size]
  steps = chinchilla_steps(base.model, size, tokens_per_step=tokens_per_step, tokens_per_param=TOKENS_PER_PARAM)
  return {"model.size": size, "train.batch_size": tokens_per_step // SEQ_LEN, "train.steps": steps,
          "train.warmup_steps": min(100, steps // 10), "train.eval_every": max(steps // 4, 1),
          "train.checkpoint_every": max(steps // 4, 1)}


def check_corpus(points: list[dict], base, path: str = DATA_PATH) -> None:
  """Refuse (ConfigError, one line) a point that would see more tokens than ``path``'s train split;
  a no-op when ``path`` holds no local ``manifest.json`` (module docstring)."""
  manifest_path = os.path.join(path, "manifest.json")
  if not os.path.isfile(manifest_path):
    return
  with open(manifest_path) as f:
    available = json.load(f)["splits"]["train"]["tokens"]
  for point in points:
    get = lambda field: point.get(field, base[field.split(".")[0]][field.split(".")[1]])
    steps, batch, seq_len = get("train.steps"), get("train.batch_size"), get("data.seq_len")
    if steps * batch * seq_len > available:
      raise ConfigError(
          f"mixer_survey: train.steps × train.batch_size × data.seq_len = {steps} × {batch} × {seq_len} = "
          f"{steps * batch * seq_len:,} tokens (model.size={get('model.size')!r}) exceed the {available:,} train "
          f"tokens of data.path={path!r} ({manifest_path}): tokens would repeat; prepare a larger corpus or drop "
          "that size")


def get_sweep(h, arg: str | None = None, check_corpus_tokens: bool = True):
  """Points of variant ``arg`` (module docstring); ``check_corpus_tokens=False`` skips the corpus check
  (the tests list the full grid against a small stand-in corpus)."""
  check_variant("mixer_survey", arg, VARIANTS)
  variant = [h.sweep("config", [arg])] if arg else []
  if arg == "tiny":
    return h.product(variant + [h.sweep("model.pattern", [("gla", "gla", "swa"), ("mamba", "mamba", "swa")])])
  base = get_config(arg)
  grid = []
  for size in ((arg,) if arg in SIZES else ("1m",) if arg in ("small", "pilot") else SIZES):
    fields = rung(base, size)
    factors = (1.0,) if arg == "small" else LR_FACTORS
    for pattern, window in patterns():
      for factor in factors:
        grid.append(fields | {"model.pattern": pattern, "model.window": window, "train.lr": LR[size] * factor})
  points = h.product(variant + [grid])
  if check_corpus_tokens:
    check_corpus(points, base, base.data.path)
  return points
