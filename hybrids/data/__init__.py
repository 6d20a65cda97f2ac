"""Data pipelines for hybrids: MQAR (Zoology), packed LM over local text files or prepared shards.

Batch contract (every dataset): a dict of numpy arrays
``{"inputs": int32 [batch, seq_len], "labels": int32 [batch, seq_len]}`` where
``labels[b, t]`` is the token to predict after reading ``inputs[b, :t+1]`` and
``labels == IGNORE_LABEL`` (-100) marks positions without loss.

Typical use in the training loop::

    from hybrids import data
    data.validate(cfg.data, seq_len=cfg.seq_len)             # before any compile
    vocab = data.vocab_size(cfg.data)
    ds = data.train_dataset(cfg.data, seq_len=..., batch_size=GLOBAL_B, seed=...,
                            workdir=..., process_index=jax.process_index(),
                            process_count=jax.process_count())
    it = data.make_iterator(ds)           # grain.DatasetIterator
    batch = next(it)                      # this process's [GLOBAL_B // P, seq_len] rows
    state = it.get_state()                # JSON-serializable dict -> save with checkpoint
    it.set_state(state)                   # on a fresh make_iterator(ds): exact resume
    evals = data.eval_batches(cfg.data, seq_len=..., batch_size=..., workdir=...)

See :mod:`hybrids.data.mqar`, :mod:`hybrids.data.text`, :mod:`hybrids.data.shards`
(made by ``python -m hybrids.data.prepare``) and :mod:`hybrids.data.pipeline` for the definitions.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections

from hybrids.data import mqar as _mqar
from hybrids.data import shards as _shards
from hybrids.data import text as _text
from hybrids.data.pipeline import IGNORE_LABEL, finite_batches, get_field, make_iterator
from hybrids.data.pipeline import shard_and_batch as _shard_and_batch

__all__ = [
    "IGNORE_LABEL",
    "DATASETS",
    "default_config",
    "vocab_size",
    "validate",
    "train_dataset",
    "eval_batches",
    "make_iterator",
    "max_labels_per_row",
    "mqar_segments",
]

DATASETS = ("mqar", "text", "shards")
# Fields only some datasets have, not merged into the others' configs (hybrids.config.base_config).
DATASET_ONLY_FIELDS = ("document_boundaries",)


def default_config(name: str) -> ml_collections.ConfigDict:
    """Default ``data`` config for dataset ``name`` (one of ``DATASETS``).

    Text and shards default to ``document_boundaries=True``: each packed document runs as if alone
    (the model gets segment ids derived from EOD). The field belongs to those two datasets only: it
    is not merged into other datasets' configs (an MQAR row is one document), and a config switched
    to text without it has the boundaries on.

    MQAR also reads two optional fields that are not in the defaults (so configs without them
    keep their identity): ``data.train_segments`` and ``data.eval_segments``, tuples of
    ``(seq_len, num_kv_pairs, num_examples)`` that replace the single cell by a mixture
    (:mod:`hybrids.data.mqar`, "Segments").
    """
    if name == "mqar":
        return ml_collections.ConfigDict(dict(
            name="mqar",
            vocab_size=8192,
            num_kv_pairs=8,
            power_a=0.01,
            num_train_examples=100_000,
            num_eval_examples=1000,
            random_non_queries=True,
            seed=0,
        ))
    if name == "text":
        return ml_collections.ConfigDict(dict(
            name="text",
            # Glob pattern, comma-separated glob patterns, or a list of them; must be set.
            files="",
            tokenizer="bytes",
            heldout_fraction=0.05,
            seed=0,
            # Packed documents run as if alone (segment ids from EOD; issue 23). Off only to
            # measure the leak or to reproduce a run made before.
            document_boundaries=True,
        ))
    if name == "shards":
        return ml_collections.ConfigDict(dict(
            name="shards",
            # Directory written by `python -m hybrids.data.prepare --output DIR` (local or gs://…).
            path="",
            document_boundaries=True,
        ))
    raise ValueError(f"data.name={name!r} is invalid: must be one of {DATASETS}")


def _name(data_config: Any) -> str:
    name = get_field(data_config, "name", None)
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is invalid: must be one of {DATASETS}")
    return name


def _fields(data_config: Any) -> dict[str, Any]:
    """The fields the dataset's source reads, absent ones filled from ``default_config``
    (``document_boundaries`` is the trainer's: :func:`hybrids.train.document_eod`)."""
    name = _name(data_config)
    defaults = default_config(name)
    return {k: get_field(data_config, k, v) for k, v in defaults.items()
            if k != "name" and k not in DATASET_ONLY_FIELDS}


SEGMENT_FIELDS = ("train_segments", "eval_segments")


def _segment_fields(data_config: Any) -> dict[str, Any]:
    """MQAR's optional mixture fields as written (absent: ``()``); :func:`mqar_segments` parses them."""
    return {k: get_field(data_config, k, ()) for k in SEGMENT_FIELDS}


def mqar_segments(data_config: Any, split: str) -> tuple[tuple[int, int, int], ...]:
    """The ``(seq_len, num_kv_pairs, num_examples)`` cells of MQAR split ``split`` ("train"/"eval").

    ``data.train_segments`` / ``data.eval_segments`` when set (see :mod:`hybrids.data.mqar`),
    else the single cell ``((data.seq_len, data.num_kv_pairs, num_train/eval_examples),)``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    segments = _mqar.parse_segments(f"data.{split}_segments",
                                    get_field(data_config, f"{split}_segments", ()))
    if segments:
        return segments
    f = _fields(data_config)
    return ((int(get_field(data_config, "seq_len", 0)), int(f["num_kv_pairs"]),
             int(f[f"num_{split}_examples"])),)


def vocab_size(data_config: Any) -> int:
    """Vocabulary size the model must have for this data config (no data is read)."""
    f = _fields(data_config)
    if _name(data_config) == "mqar":
        return int(f["vocab_size"])
    if _name(data_config) == "shards":
        return _shards.vocab_size(f["path"])
    return _text.parse_tokenizer(f["tokenizer"])[1]


def validate(data_config: Any, *, seq_len: int) -> None:
    """Raise ValueError naming the field, its bad value and the valid choices/range.

    Cheap (reads no data beyond a glob for text files, or the manifest for shards): call it
    before compiling.
    """
    f = _fields(data_config)
    if _name(data_config) == "mqar":
        _mqar.validate(seq_len=seq_len, **f, **_segment_fields(data_config))
    elif _name(data_config) == "shards":
        _shards.validate(seq_len=seq_len, **f)
    else:
        _text.validate(seq_len=seq_len, **f)


def _source(data_config: Any, *, seq_len: int, split: str, workdir: str | None):
    validate(data_config, seq_len=seq_len)
    f = _fields(data_config)
    if _name(data_config) == "mqar":
        stream = _mqar.TRAIN_STREAM if split == "train" else _mqar.EVAL_STREAM
        common = dict(vocab_size=f["vocab_size"], power_a=f["power_a"],
                      random_non_queries=f["random_non_queries"], seed=f["seed"], stream=stream)
        segments = _mqar.parse_segments(f"data.{split}_segments",
                                        get_field(data_config, f"{split}_segments", ()))
        if not segments:
            return _mqar.MQARSource(
                num_examples=f["num_train_examples" if split == "train" else "num_eval_examples"],
                seq_len=seq_len, num_kv_pairs=f["num_kv_pairs"], **common)
        sources = [_mqar.MQARSource(num_examples=n, seq_len=length, num_kv_pairs=k, segment=i,
                                    **common)
                   for i, (length, k, n) in enumerate(segments)]
        # Training: one mixture of seq_len-long rows. Evaluation: the segments, each at its length.
        return _mqar.MQARMixture(sources, seq_len) if split == "train" else sources
    if _name(data_config) == "shards":
        return _shards.ShardWindowSource(
            f["path"], _shards.TRAIN_SPLIT if split == "train" else _shards.HELDOUT_SPLIT, seq_len)
    corpus = _text.prepare_corpus(workdir=workdir, **f)
    tokens = corpus.train if split == "train" else corpus.eval
    # Build both windows so that a too-small split errors at train time too.
    _text.TokenWindowSource(corpus.eval if split == "train" else corpus.train, seq_len,
                            split="eval" if split == "train" else "train")
    return _text.TokenWindowSource(tokens, seq_len, split=split)


def train_dataset(
    data_config: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    workdir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite training dataset of batches for this process.

    Item ``s`` is step ``s``'s batch for this process:
    ``{"inputs": int32 [batch_size // process_count, seq_len], "labels": same}``.
    The train split is shuffled per epoch from ``seed`` (the shuffle seed; the
    data content is fixed by ``data_config.seed``) and repeated forever.
    Process ``p`` gets rows ``[p*b, (p+1)*b)`` (``b = batch_size // process_count``)
    of the global batch, so concatenating the processes' batches in order gives
    the single-process batch. ``batch_size`` must be divisible by ``process_count``.

    Iterate with ``it = make_iterator(ds)`` (a ``grain.DatasetIterator``):
    ``it.get_state()`` returns a JSON-serializable dict and ``it.set_state(state)``
    on a fresh iterator over the same dataset resumes with bit-identical batches.
    MQAR batches are gathered whole from the materialised training set
    (:class:`hybrids.data.pipeline.StepBatches`); text/shards go through grain's
    per-record shuffle and batch.
    ``workdir`` holds text caches / ``tokenizer.json`` (temp dir if None).

    MQAR with ``data.train_segments``: the segments' examples form one fixed set
    (:class:`hybrids.data.mqar.MQARMixture`) of ``seq_len``-long rows, shorter examples
    right-padded with input 0 and label ``IGNORE_LABEL``; the whole mixture is shuffled per epoch
    (Zoology instead iterates each segment's batches in order, unshuffled).
    """
    source = _source(data_config, seq_len=seq_len, split="train", workdir=workdir)
    if isinstance(source, (_mqar.MQARSource, _mqar.MQARMixture)):
        # MQAR's fixed training set is generated once, vectorized, in background threads
        # (overlapping whatever the caller does next, e.g. compiling); batches are then
        # gathered whole. The first batch waits only for the blocks it needs.
        source.start_materialize()
    return _shard_and_batch(source, batch_size=batch_size, seed=seed,
                            process_index=process_index, process_count=process_count)


def eval_batches(
    data_config: Any,
    *,
    seq_len: int,
    batch_size: int,
    workdir: str | None = None,
    num_batches: int | None = None,
) -> list[dict]:
    """The held-out split as a deterministic, finite list of batches (in order).

    Each batch is ``{"inputs": int32 [batch_size, seq_len], "labels": same}``; the
    last batch is padded with all-``IGNORE_LABEL`` rows so every batch has the
    same shape. ``num_batches`` (optional) keeps only the first batches. Not
    sharded by process: every process gets the full list.

    MQAR with ``data.eval_segments``: the batches of each segment in turn, each at the
    segment's own length (``[batch_size, segment seq_len]``, not ``seq_len``; the caller's
    eval step compiles once per distinct length), a segment's last batch padded as above, so a
    batch never mixes segments; ``num_batches`` then keeps the first batches *of each segment*.
    ``hybrids.train.evaluate`` weighs batches by their examples, which makes its
    ``eval_accuracy`` the mean over examples of per-example accuracy (Zoology's
    ``valid/accuracy``).
    """
    source = _source(data_config, seq_len=seq_len, split="eval", workdir=workdir)
    if isinstance(source, list):  # MQAR eval segments
        return [batch for segment in source
                for batch in finite_batches(segment, batch_size=batch_size, num_batches=num_batches)]
    return finite_batches(source, batch_size=batch_size, num_batches=num_batches)


def max_labels_per_row(config: ml_collections.ConfigDict, split: str | None = None) -> int:
    """The most positions of one row of ``split`` ("train", "eval"; None: either) that carry a label,
    or 0 when any may (language modelling).

    MQAR labels exactly its ``num_kv_pairs`` query positions, a mixture row its segment's; this is
    the largest ``num_kv_pairs`` over the split's segments (the single cell's when none are set),
    because the trainer computes the logits of that many labelled positions per row only
    (``hybrids.train.Trainer.label_slots`` for training, ``eval_label_slots`` for evaluation): a row
    with more labels would silently lose the extra ones.
    """
    if config.name != "mqar":
        return 0
    splits = ("train", "eval") if split is None else (split,)
    return max(k for s in splits for _, k, _ in mqar_segments(config, s))
