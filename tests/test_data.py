"""Tests for hybrids.data: MQAR definition, text LM pipeline, sharding, iterator state."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
from scipy import stats

from hybrids import data
from hybrids.data import mqar, text

SEQ = 64


def mqar_config(**overrides):
    c = data.default_config("mqar")
    c.vocab_size = 256
    c.num_kv_pairs = 8
    c.num_train_examples = 500
    c.num_eval_examples = 50
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
         "judge boxing matches under pale moonlight and rivers carry stones to "
         "distant seas where sailors sing old songs of home").split()


def write_corpus(tmp_path, num_files=6, words_per_file=800, seed=0, gz_last=True):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_files):
        lines = []
        for _ in range(words_per_file // 10):
            lines.append(" ".join(rng.choice(WORDS, size=10)).capitalize() + ".")
        body = ("\n".join(lines) + "\n").encode()
        if gz_last and i == num_files - 1:
            p = tmp_path / f"doc{i}.txt.gz"
            p.write_bytes(gzip.compress(body))
        else:
            p = tmp_path / f"doc{i}.txt"
            p.write_bytes(body)
        paths.append(str(p))
    return paths


def text_config(tmp_path, **overrides):
    c = data.default_config("text")
    c.files = overrides.pop("files", f"{tmp_path / '*.txt'},{tmp_path / '*.gz'}")
    c.heldout_fraction = 0.2
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"inputs", "labels"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- MQAR


def test_mqar_example_structure():
    k, V = 8, 256
    src = mqar.MQARSource(num_examples=40, seq_len=SEQ, vocab_size=V, num_kv_pairs=k,
                          power_a=0.01, random_non_queries=True, seed=3, stream=0)
    for i in range(len(src)):
        ex = src[i]
        x, y = ex["inputs"], ex["labels"]
        assert x.shape == y.shape == (SEQ,) and x.dtype == y.dtype == np.int32
        keys, values = x[0:2 * k:2], x[1:2 * k:2]
        assert len(set(keys.tolist())) == k and len(set(values.tolist())) == k
        assert np.all((keys >= 1) & (keys < V // 2))
        assert np.all((values >= V // 2) & (values < V))
        assert np.all((x >= 0) & (x < V))
        # Exactly one loss position per key, all in the query region, at even offsets.
        pos = np.flatnonzero(y != data.IGNORE_LABEL)
        assert len(pos) == k
        assert np.all(pos >= 2 * k) and np.all((pos - 2 * k) % 2 == 0)
        pairs = dict(zip(keys.tolist(), values.tolist()))
        # Each label is the value paired with the key just read; each key queried once.
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())
        for t in pos:
            assert y[t] == pairs[int(x[t])]


def test_mqar_no_random_fill_is_zero_outside_keys():
    k = 4
    src = mqar.MQARSource(num_examples=5, seq_len=SEQ, vocab_size=128, num_kv_pairs=k,
                          power_a=0.01, random_non_queries=False, seed=0, stream=0)
    x, y = src[0]["inputs"], src[0]["labels"]
    query_region = x[2 * k:]
    nonzero = np.flatnonzero(query_region) + 2 * k
    np.testing.assert_array_equal(nonzero, np.flatnonzero(y != data.IGNORE_LABEL))


def test_mqar_power_law_prefers_short_gaps():
    # With a = 0.01 the gap pmf is ~1/i: gap 0 is far more likely than the last gap.
    p = mqar.gap_probabilities(100, 0.01)
    assert p.shape == (100,) and np.isclose(p.sum(), 1.0)
    assert np.all(np.diff(p) < 0)
    np.testing.assert_allclose(mqar.gap_probabilities(10, 1.0), np.full(10, 0.1))


def test_mqar_determinism_and_splits():
    c = mqar_config()
    a = data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=0)
    b = data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=0)
    assert_batches_equal([a[i] for i in range(3)], [b[i] for i in range(3)])
    other = data.train_dataset(mqar_config(seed=1), seq_len=SEQ, batch_size=8, seed=0)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])
    shuffled = data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=1)
    assert not np.array_equal(a[0]["inputs"], shuffled[0]["inputs"])
    ev1 = data.eval_batches(c, seq_len=SEQ, batch_size=16)
    ev2 = data.eval_batches(c, seq_len=SEQ, batch_size=16)
    assert_batches_equal(ev1, ev2)
    # 50 eval examples -> 4 batches of 16, the last padded with 14 ignore rows.
    assert len(ev1) == 4 and all(b["inputs"].shape == (16, SEQ) for b in ev1)
    assert np.all(ev1[-1]["labels"][2:] == data.IGNORE_LABEL)
    n_labels = sum(int((b["labels"] != data.IGNORE_LABEL).sum()) for b in ev1)
    assert n_labels == 50 * c.num_kv_pairs
    assert len(data.eval_batches(c, seq_len=SEQ, batch_size=16, num_batches=2)) == 2
    # Eval examples are not train examples.
    train_src = mqar.MQARSource(num_examples=500, seq_len=SEQ, vocab_size=256,
                                num_kv_pairs=8, power_a=0.01, random_non_queries=True,
                                seed=0, stream=mqar.TRAIN_STREAM)
    train_rows = {train_src[i]["inputs"].tobytes() for i in range(500)}
    eval_rows = {r.tobytes() for b in ev1 for r in b["inputs"][:16]}
    assert not train_rows & eval_rows


MQAR_KW = dict(seq_len=SEQ, vocab_size=256, num_kv_pairs=8, power_a=0.01,
               random_non_queries=True)


def check_mqar_rows(x, y, k, V):
    """Zoology's MQAR structure on every row of a batch (vectorized)."""
    n, L = x.shape
    assert x.dtype == y.dtype == np.int32 and y.shape == (n, L)
    keys, values = x[:, 0:2 * k:2], x[:, 1:2 * k:2]
    assert np.all(np.diff(np.sort(keys, axis=1), axis=1) > 0)  # K distinct keys per row
    assert np.all(np.diff(np.sort(values, axis=1), axis=1) > 0)  # K distinct values
    assert np.all((keys >= 1) & (keys < V // 2)) and np.all((values >= V // 2) & (values < V))
    assert np.all((x >= 0) & (x < V))
    assert np.all(y[:, :2 * k] == data.IGNORE_LABEL)
    loss = y != data.IGNORE_LABEL
    assert np.all(loss.sum(axis=1) == k)  # exactly K labels per row
    rows, pos = np.nonzero(loss)
    assert np.all((pos - 2 * k) % 2 == 0)  # queries at 2K + 2 * gap
    # Each key is queried exactly once, and its label is the value that follows it.
    queried = x[rows, pos].reshape(n, k)
    np.testing.assert_array_equal(np.sort(queried, axis=1), np.sort(keys, axis=1))
    j = np.argmax(queried[:, :, None] == keys[:, None, :], axis=2)
    np.testing.assert_array_equal(y[rows, pos].reshape(n, k),
                                  np.take_along_axis(values, j, axis=1))


def chi2_ok(observed, expected, ddof=0, alpha=1e-6):
    """Pearson chi-square goodness of fit at level ``alpha`` (seeds are fixed: no flakiness;
    alpha = 1e-6 only guards against a wrong distribution, which fails by orders of magnitude)."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    keep = expected > 0
    assert observed[~keep].sum() == 0
    chi2 = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
    return chi2 < stats.chi2.isf(alpha, keep.sum() - 1 - ddof), chi2


def test_mqar_vectorized_structure():
    k, V = 8, 256
    b = mqar.generate_examples(3, mqar.TRAIN_STREAM, 0, 5000, **MQAR_KW)
    check_mqar_rows(b["inputs"], b["labels"], k, V)
    # No noise: every non-zero token past the context is a query.
    b = mqar.generate_examples(3, 0, 0, 500, **{**MQAR_KW, "random_non_queries": False})
    check_mqar_rows(b["inputs"], b["labels"], k, V)
    q = b["inputs"][:, 2 * k:] != 0
    np.testing.assert_array_equal(q, b["labels"][:, 2 * k:] != data.IGNORE_LABEL)
    # Edge: as many gaps as slots (4K = L) and exactly K possible keys (V // 2 - 1 = K).
    b = mqar.generate_examples(0, 1, 0, 300, seq_len=32, vocab_size=18, num_kv_pairs=8,
                               power_a=0.5, random_non_queries=True)
    check_mqar_rows(b["inputs"], b["labels"], 8, 18)
    # The slow per-example reference satisfies the same structure.
    gap_p = mqar.gap_probabilities((SEQ - 2 * k) // 2, 0.01)
    ref = [mqar.generate_example(np.random.default_rng([9, i]), seq_len=SEQ, vocab_size=V,
                                 num_kv_pairs=k, gap_p=gap_p, random_non_queries=True)
           for i in range(200)]
    check_mqar_rows(*(np.stack([e[f] for e in ref]) for f in ("inputs", "labels")), k, V)


def test_mqar_block_independence_and_determinism(monkeypatch):
    monkeypatch.setattr(mqar, "BLOCK_TOKENS", 5 * SEQ)  # 5 examples per block
    assert mqar.rows_per_block(SEQ) == 5
    whole = mqar.generate_examples(1, 0, 0, 40, **MQAR_KW)
    for start, count in [(0, 1), (3, 4), (4, 13), (17, 23), (39, 1), (10, 0)]:
        part = mqar.generate_examples(1, 0, start, count, **MQAR_KW)
        for f in ("inputs", "labels"):
            np.testing.assert_array_equal(part[f], whole[f][start:start + count])
    assert_batches_equal([mqar.generate_examples(1, 0, 0, 40, **MQAR_KW)], [whole])
    # The source's items do not depend on its size, access order or materialisation.
    src_kw = dict(power_a=0.01, random_non_queries=True, seed=1, stream=0, seq_len=SEQ,
                  vocab_size=256, num_kv_pairs=8)
    lazy = mqar.MQARSource(num_examples=23, **src_kw)
    for i in (22, 0, 7):
        for f in ("inputs", "labels"):
            np.testing.assert_array_equal(lazy[i][f], whole[f][i])
    for threads in (1, 3):
        full = mqar.MQARSource(num_examples=37, **src_kw).materialize(threads)
        idx = np.array([36, 0, 5, 5, 12])
        assert_batches_equal([full.gather(idx)], [{f: whole[f][idx] for f in whole}])
    with pytest.raises(IndexError, match="MQAR index 23 out of range"):
        lazy.gather([1, 23])
    # Seeds and streams give different data.
    for seed, stream in [(2, 0), (1, 1)]:
        other = mqar.generate_examples(seed, stream, 0, 40, **MQAR_KW)
        assert not np.any(np.all(other["inputs"] == whole["inputs"], axis=1))


def test_mqar_vectorized_distribution():
    k, V, n = 8, 256, 20_000
    space = (SEQ - 2 * k) // 2
    gap_p = mqar.gap_probabilities(space, 0.01)
    kw = dict(seq_len=SEQ, vocab_size=V, num_kv_pairs=k, gap_p=gap_p, random_non_queries=True)
    blocks = [mqar.generate_block(11, 0, b, **kw) for b in range(-(-n // mqar.rows_per_block(SEQ)))]
    inputs = np.concatenate([b[0] for b in blocks])[:n]
    gaps = (np.concatenate([b[1] for b in blocks])[:n] - 2 * k) // 2
    # First and second sequential draws against their exact pmfs:
    # P(g1 = g) = p_g;  P(g2 = g) = p_g * sum_{h != g} p_h / (1 - p_h).
    ok, chi2 = chi2_ok(np.bincount(gaps[:, 0], minlength=space), n * gap_p)
    assert ok, chi2
    r = gap_p / (1 - gap_p)
    ok, chi2 = chi2_ok(np.bincount(gaps[:, 1], minlength=space), n * gap_p * (r.sum() - r))
    assert ok, chi2
    # Keys and values: every context slot (first and last included) uniform over its range.
    slots = [(0, 1, V // 2), (2 * k - 2, 1, V // 2), (1, V // 2, V), (2 * k - 1, V // 2, V)]
    for col, lo, hi in slots:
        counts = np.bincount(inputs[:, col] - lo, minlength=hi - lo)
        ok, chi2 = chi2_ok(counts, np.full(hi - lo, n / (hi - lo)))
        assert ok, (col, chi2)
    # Noise: uniform over [0, V) (non-query positions past the context).
    labels = mqar.labels_from(inputs, np.concatenate([b[1] for b in blocks])[:n])
    noise = inputs[:, 2 * k:][labels[:, 2 * k:] == data.IGNORE_LABEL]
    ok, chi2 = chi2_ok(np.bincount(noise, minlength=V), np.full(V, noise.size / V))
    assert ok, chi2
    # All K gaps (set and order) against the per-example reference sampler: two-sample
    # homogeneity of the gap counts per draw rank (pooling draws of one example is
    # conservative: draws without replacement are negatively correlated).
    m = 3000
    ref = np.stack([np.flatnonzero(mqar.generate_example(
        np.random.default_rng([12, i]), **kw)["labels"] != data.IGNORE_LABEL) for i in range(m)])
    ref_gaps_sorted = (ref - 2 * k) // 2  # positions come out sorted: compare the sets
    table = np.stack([np.bincount(ref_gaps_sorted.ravel(), minlength=space),
                      np.bincount(gaps[:m].ravel(), minlength=space)])
    table = table[:, table.sum(0) > 0]
    _, pval, _, _ = stats.chi2_contingency(table)
    assert pval > 1e-6, pval
    # Mean gap agrees with the reference within 5 standard errors.
    diff = gaps[:m].mean() - ref_gaps_sorted.mean()
    se = np.sqrt(gaps[:m].mean(1).var() / m + ref_gaps_sorted.mean(1).var() / m)
    assert abs(diff) < 5 * se, (diff, se)


def test_mqar_eval_batches_vectorized():
    c = mqar_config(num_eval_examples=70)
    ev = data.eval_batches(c, seq_len=SEQ, batch_size=32)
    ref = mqar.generate_examples(c.seed, mqar.EVAL_STREAM, 0, 70, **MQAR_KW)
    assert len(ev) == 3
    got = {f: np.concatenate([b[f] for b in ev]) for f in ("inputs", "labels")}
    for f in got:
        np.testing.assert_array_equal(got[f][:70], ref[f])
    assert np.all(got["inputs"][70:] == 0) and np.all(got["labels"][70:] == data.IGNORE_LABEL)


def test_mqar_train_stream_epochs_resume_and_sharding():
    # 20 examples, batch 8: batches straddle epoch boundaries (steps 2, 4, 7, ...).
    c = mqar_config(num_train_examples=20)
    ds = data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=4)
    src = mqar.MQARSource(num_examples=20, seed=c.seed, stream=mqar.TRAIN_STREAM, **MQAR_KW)
    everything = src.gather(np.arange(20))["inputs"]
    stream = np.concatenate([ds[s]["inputs"] for s in range(15)])  # 120 = 6 epochs
    row_id = {r.tobytes(): i for i, r in enumerate(everything)}
    ids = np.array([row_id[r.tobytes()] for r in stream])
    epochs = ids.reshape(6, 20)
    assert np.all(np.sort(epochs, axis=1) == np.arange(20))  # each epoch: every example once
    assert len({e.tobytes() for e in epochs}) == 6  # reshuffled every epoch
    # Resume mid-epoch and across an epoch boundary: bit-identical.
    for stop in (1, 2, 7):
        it = data.make_iterator(ds)
        take(it, stop)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 6)
        it2 = data.make_iterator(data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=4))
        it2.set_state(state)
        assert_batches_equal(take(it2, 6), expected)
        assert_batches_equal(expected, [ds[s] for s in range(stop, stop + 6)])
    # 4 processes: concatenating a step's process batches gives the global batch.
    parts = [data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=4, process_index=p,
                                process_count=4) for p in range(4)]
    for s in range(15):
        for f in ("inputs", "labels"):
            np.testing.assert_array_equal(np.concatenate([p[s][f] for p in parts]), ds[s][f])


@pytest.mark.parametrize("field,value,seq_len,match", [
    ("vocab_size", 256, 63, "seq_len=63.*even"),
    ("vocab_size", 64, 64, "data.vocab_size=64.*> seq_len=64"),
    ("num_kv_pairs", 17, 64, "seq_len=64 too short for data.num_kv_pairs=17"),
    ("power_a", 0.0, 64, "data.power_a=0.0"),
    ("num_train_examples", 0, 64, "data.num_train_examples=0"),
    ("seed", -1, 64, "data.seed=-1"),
    ("name", "wikitext", 64, r"data.name='wikitext'.*\('mqar', 'text', 'shards'\)"),
])
def test_mqar_validation(field, value, seq_len, match):
    c = mqar_config()
    setattr(c, field, value)
    with pytest.raises(ValueError, match=match):
        data.validate(c, seq_len=seq_len)
    with pytest.raises(ValueError, match=match):
        data.train_dataset(c, seq_len=seq_len, batch_size=4, seed=0)


# ----------------------------------------------------------------------------- MQAR segments

TRAIN_SEGS = ((16, 2, 30), (32, 4, 20), (64, 8, 10))
EVAL_SEGS = ((16, 4, 5), (64, 8, 7), (128, 16, 3))


def segment_config(**overrides):
    return mqar_config(train_segments=TRAIN_SEGS, eval_segments=EVAL_SEGS, **overrides)


def test_mqar_segment_mixture_shapes_and_padding():
    c = segment_config()
    ds = data.train_dataset(c, seq_len=SEQ, batch_size=12, seed=0)
    src = data._source(c, seq_len=SEQ, split="train", workdir=None)
    assert isinstance(src, mqar.MQARMixture) and len(src) == 60
    whole = src.gather(np.arange(60))
    assert whole["inputs"].shape == whole["labels"].shape == (60, SEQ)
    for (length, k, n), lo in zip(TRAIN_SEGS, src.offsets):
        x, y = whole["inputs"][lo:lo + n], whole["labels"][lo:lo + n]
        # Each segment's rows are its own examples (segment key), right-padded with 0 / IGNORE_LABEL.
        ref = mqar.generate_examples(c.seed, mqar.TRAIN_STREAM, 0, n, seq_len=length,
                                     vocab_size=c.vocab_size, num_kv_pairs=k, power_a=c.power_a,
                                     random_non_queries=c.random_non_queries,
                                     segment=TRAIN_SEGS.index((length, k, n)))
        np.testing.assert_array_equal(x[:, :length], ref["inputs"])
        np.testing.assert_array_equal(y[:, :length], ref["labels"])
        assert (x[:, length:] == 0).all() and (y[:, length:] == data.IGNORE_LABEL).all()
        assert ((y != data.IGNORE_LABEL).sum(1) == k).all()
        check_mqar_rows(x[:, :length], y[:, :length], k, c.vocab_size)
    # One epoch of steps covers the mixture once, shuffled (segments interleaved).
    epoch = np.concatenate([ds[s]["inputs"] for s in range(5)])
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, whole["inputs"]))
    assert not np.array_equal(epoch, whole["inputs"])
    # Padding carries no loss: the labelled positions all lie inside the example.
    for s in range(5):
        y = ds[s]["labels"]
        assert ((y != data.IGNORE_LABEL).sum(1) <= max(k for _, k, _ in TRAIN_SEGS)).all()


def test_mqar_segments_deterministic_and_distinct():
    c = segment_config()
    a = data._source(c, seq_len=SEQ, split="train", workdir=None).gather(np.arange(60))
    b = data._source(segment_config(), seq_len=SEQ, split="train", workdir=None)
    assert_batches_equal([a], [b.materialize(2).gather(np.arange(60))])
    other = data._source(segment_config(seed=1), seq_len=SEQ, split="train", workdir=None)
    assert not np.array_equal(a["inputs"], other.gather(np.arange(60))["inputs"])
    # A segment's stream differs from the single-cell stream of the same cell (the key's segment + 1).
    single = mqar.generate_examples(c.seed, mqar.TRAIN_STREAM, 0, 10, seq_len=64, vocab_size=256,
                                    num_kv_pairs=8, power_a=c.power_a, random_non_queries=True)
    assert not np.array_equal(single["inputs"], a["inputs"][50:])
    # Same-shaped segments at different indices differ too.
    twin = data._source(mqar_config(train_segments=((16, 2, 30), (16, 2, 30)), num_kv_pairs=2), seq_len=16,
                        split="train", workdir=None).gather(np.arange(60))
    assert not np.array_equal(twin["inputs"][:30], twin["inputs"][30:])
    # Resume: the iterator state round-trips on a mixture too.
    ds = data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=3)
    it = data.make_iterator(ds)
    take(it, 9)
    state = json.loads(json.dumps(it.get_state()))
    it2 = data.make_iterator(data.train_dataset(segment_config(), seq_len=SEQ, batch_size=8, seed=3))
    it2.set_state(state)
    assert_batches_equal(take(it2, 4), take(it, 4))


def test_mqar_eval_segments_batched_per_segment():
    c = segment_config()
    batches = data.eval_batches(c, seq_len=SEQ, batch_size=4)
    # ⌈5/4⌉ + ⌈7/4⌉ + ⌈3/4⌉ batches, each one segment at its own length.
    assert [b["inputs"].shape for b in batches] == [(4, 16)] * 2 + [(4, 64)] * 2 + [(4, 128)]
    counts = [(b["labels"] != data.IGNORE_LABEL).sum(1).tolist() for b in batches]
    assert counts == [[4] * 4, [4, 0, 0, 0], [8] * 4, [8, 8, 8, 0], [16, 16, 16, 0]]
    for (length, k, n), i in zip(EVAL_SEGS, range(3)):
        ref = mqar.generate_examples(c.seed, mqar.EVAL_STREAM, 0, n, seq_len=length,
                                     vocab_size=256, num_kv_pairs=k, power_a=c.power_a,
                                     random_non_queries=True, segment=i)
        rows = [b for b in batches if b["inputs"].shape[1] == length]
        np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in rows])[:n], ref["inputs"])
    # num_batches keeps the first batches of each segment.
    assert len(data.eval_batches(c, seq_len=SEQ, batch_size=4, num_batches=1)) == 3
    assert_batches_equal(data.eval_batches(c, seq_len=SEQ, batch_size=4), batches)


def test_mqar_max_labels_per_row_covers_every_segment():
    single = mqar_config()
    assert data.max_labels_per_row(single) == 8
    assert data.max_labels_per_row(segment_config()) == 16  # an eval segment's
    assert data.max_labels_per_row(mqar_config(train_segments=((64, 12, 5),))) == 12  # a train one
    c = segment_config()
    rows = [b["labels"] for b in data.eval_batches(c, seq_len=SEQ, batch_size=4)]
    rows.append(data.train_dataset(c, seq_len=SEQ, batch_size=60, seed=0)[0]["labels"])
    assert max(int((y != data.IGNORE_LABEL).sum(1).max()) for y in rows) == data.max_labels_per_row(c)
    # Per split: what the train step and the eval step each need (the eval cells are longer).
    train_rows = data.train_dataset(c, seq_len=SEQ, batch_size=60, seed=0)[0]["labels"]
    assert int((train_rows != data.IGNORE_LABEL).sum(1).max()) <= data.max_labels_per_row(c, "train")
    assert max(int((y != data.IGNORE_LABEL).sum(1).max()) for y in rows[:-1]) == data.max_labels_per_row(c, "eval")
    assert data.max_labels_per_row(c, "train") < data.max_labels_per_row(c, "eval")
    assert data.max_labels_per_row(text_config_like()) == 0
    # Lists (config.json's form) parse like tuples.
    assert data.mqar_segments(mqar_config(eval_segments=[[16, 2, 3]]), "eval") == ((16, 2, 3),)


def test_mqar_segment_eval_accuracy_is_mean_over_examples():
    """hybrids.train.evaluate on per-segment batches: eval_accuracy is Zoology's mean over examples of
    per-example accuracy; eval_token_accuracy pools the answers."""
    import jax
    import jax.numpy as jnp

    from hybrids.train import evaluate, lm_loss

    c = segment_config()
    batches = data.eval_batches(c, seq_len=SEQ, batch_size=4)
    vocab = c.vocab_size

    def eval_step(params, batch):  # right on the 16-token segment, wrong on the others
        labels = jnp.asarray(batch["labels"])
        right = batch["inputs"].shape[1] == 16
        pred = jnp.where(labels >= 0, labels, 0) if right else jnp.zeros_like(labels)
        return lm_loss(jax.nn.one_hot(pred, vocab) * 10.0, labels)

    result = evaluate(None, eval_step, None, batches)
    n = [n for _, _, n in EVAL_SEGS]
    k = [k for _, k, _ in EVAL_SEGS]
    assert result["eval_accuracy"] == pytest.approx(n[0] / sum(n))  # 5 of 15 examples
    assert result["eval_token_accuracy"] == pytest.approx(n[0] * k[0] / sum(a * b for a, b in zip(n, k)))
    # One cell: both accuracies agree.
    single = data.eval_batches(mqar_config(num_eval_examples=10), seq_len=SEQ, batch_size=4)
    half = lambda params, batch: lm_loss(jax.nn.one_hot(jnp.where(
        jnp.arange(SEQ) % 4 == 0, jnp.maximum(batch["labels"], 0), 0), vocab) * 10.0, jnp.asarray(batch["labels"]))
    r = evaluate(None, half, None, single)
    assert r["eval_accuracy"] == pytest.approx(r["eval_token_accuracy"])


def text_config_like():
    c = data.default_config("text")
    return c


@pytest.mark.parametrize("field,value,match", [
    ("train_segments", ((128, 8, 10),), r"data.train_segments\[0\]=\(128, 8, 10\).*exceeds data.seq_len=64"),
    ("train_segments", ((16, 2, 10), (16, 5, 10)), r"data.train_segments\[1\].*num_kv_pairs.*\[1, seq_len // 4 = 4\]"),
    ("train_segments", ((15, 2, 10),), r"data.train_segments\[0\].*even"),
    ("train_segments", ((16, 2, 0),), r"data.train_segments\[0\].*num_examples must be >= 1"),
    ("train_segments", ((16, 2),), r"data.train_segments\[0\]=\(16, 2\).*triple"),
    ("train_segments", ((16, 2.0, 4),), r"data.train_segments\[0\].*triple of ints"),
    ("eval_segments", ((512, 8, 10),), r"data.eval_segments\[0\].*data.vocab_size=256 must be > its seq_len 512"),
    ("eval_segments", ((64, 0, 10),), r"data.eval_segments\[0\].*num_kv_pairs"),
])
def test_mqar_segment_validation(field, value, match):
    c = mqar_config(**{field: value})
    with pytest.raises(ValueError, match=match):
        data.validate(c, seq_len=SEQ)
    with pytest.raises(ValueError, match=match):
        data.train_dataset(c, seq_len=SEQ, batch_size=4, seed=0)


def test_mqar_segments_through_config_validate():
    """hybrids.config.validate reports a bad segment as a ConfigError naming the field."""
    from hybrids.config import ConfigError, base_config, validate

    c = base_config("mqar")
    c.data.vocab_size = 256
    c.data.train_segments = ((16, 2, 10), (128, 8, 10))
    with pytest.raises(ConfigError, match=r"data.train_segments\[1\].*exceeds data.seq_len=64"):
        validate(c)
    c.data.train_segments = ((16, 2, 10), (64, 8, 10))
    c.data.eval_segments = ((128, 16, 10),)
    validate(c)


def test_vocab_sizes(tmp_path):
    assert data.vocab_size(mqar_config(vocab_size=8192)) == 8192
    assert data.vocab_size(text_config(tmp_path)) == 257
    assert data.vocab_size(text_config(tmp_path, tokenizer="bpe:512")) == 512
    with pytest.raises(ValueError, match="data.tokenizer='bpe:x'"):
        data.vocab_size(text_config(tmp_path, tokenizer="bpe:x"))


# ----------------------------------------------------------------------------- iterator / sharding


def test_iterator_state_round_trip_mqar():
    ds = data.train_dataset(mqar_config(), seq_len=SEQ, batch_size=8, seed=5)
    it = data.make_iterator(ds)
    take(it, 7)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # must survive JSON serialization
    expected = take(it, 5)
    it2 = data.make_iterator(data.train_dataset(mqar_config(), seq_len=SEQ, batch_size=8,
                                                seed=5))
    it2.set_state(state)
    assert_batches_equal(take(it2, 5), expected)
    # Thread count does not change the data.
    it3 = data.make_iterator(ds, num_threads=0)
    assert_batches_equal(take(it3, 12)[7:], expected)


def test_epochs_cover_everything_and_reshuffle():
    c = mqar_config(num_train_examples=32)
    ds = data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=0)
    epoch0 = [r.tobytes() for s in range(4) for r in ds[s]["inputs"]]
    epoch1 = [r.tobytes() for s in range(4, 8) for r in ds[s]["inputs"]]
    assert len(set(epoch0)) == 32 and set(epoch0) == set(epoch1)
    assert epoch0 != epoch1


def test_process_sharding_reassembles_global_batch():
    c = mqar_config()
    glob_ds = data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=2)
    shards = [data.train_dataset(c, seq_len=SEQ, batch_size=8, seed=2, process_index=p,
                                 process_count=2) for p in range(2)]
    its = [data.make_iterator(s) for s in shards]
    git = data.make_iterator(glob_ds)
    for _ in range(6):
        g = next(git)
        parts = [next(it) for it in its]
        assert parts[0]["inputs"].shape == (4, SEQ)
        for k in ("inputs", "labels"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by process_count=4"):
        data.train_dataset(c, seq_len=SEQ, batch_size=6, seed=0, process_index=0,
                           process_count=4)


# ----------------------------------------------------------------------------- text


def test_byte_tokenizer_round_trip():
    docs = [b"hello world\n", "caf\u00e9 \u2603".encode(), bytes(range(256))]
    tokens = text.bytes_encode(docs)
    assert tokens.max() == text.BYTE_EOD and np.sum(tokens == text.BYTE_EOD) == 3
    assert text.bytes_decode(tokens) == docs


def test_text_bytes_pipeline(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    paths = write_corpus(corpus_dir)
    c = text_config(corpus_dir)
    work = str(tmp_path / "work")
    data.validate(c, seq_len=SEQ)
    ds = data.train_dataset(c, seq_len=SEQ, batch_size=4, seed=0, workdir=work)
    b = ds[0]
    assert b["inputs"].shape == (4, SEQ) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["labels"][:, :-1])
    assert b["inputs"].max() < 257 and b["labels"].min() >= 0

    corpus = text.prepare_corpus(files=c.files, tokenizer="bytes", heldout_fraction=0.2,
                                 seed=0, workdir=work)
    train_docs = text.bytes_decode(corpus.train)
    eval_docs = text.bytes_decode(corpus.eval)
    originals = [text.read_document(p) for p in paths]
    # 6 docs, 20% held out -> 1 eval doc; disjoint, and together exactly the corpus.
    assert len(eval_docs) == 1 and len(train_docs) == 5
    assert sorted(train_docs + eval_docs) == sorted(originals)
    assert not set(train_docs) & set(eval_docs)

    ev = data.eval_batches(c, seq_len=SEQ, batch_size=4, workdir=work)
    n_windows = len(corpus.eval) // (SEQ + 1)
    assert len(ev) == -(-n_windows // 4)
    first = np.asarray(corpus.eval[: SEQ + 1], dtype=np.int32)
    np.testing.assert_array_equal(ev[0]["inputs"][0], first[:-1])
    np.testing.assert_array_equal(ev[0]["labels"][0], first[1:])
    # Cache reuse: the token arrays are written once.
    npys = sorted(f for f in os.listdir(work) if f.endswith(".npy"))
    assert len(npys) == 2
    data.eval_batches(c, seq_len=SEQ, batch_size=4, workdir=work)
    assert sorted(f for f in os.listdir(work) if f.endswith(".npy")) == npys


def test_text_single_document_tail_split(tmp_path):
    (tmp_path / "only.txt").write_bytes(
        b"".join(b"line of text number %d\n" % i for i in range(200)))
    c = text_config(tmp_path, files=str(tmp_path / "only.txt"), heldout_fraction=0.1)
    corpus = text.prepare_corpus(files=c.files, tokenizer="bytes", heldout_fraction=0.1,
                                 seed=0, workdir=str(tmp_path / "w"))
    (train_doc,), (eval_doc,) = text.bytes_decode(corpus.train), text.bytes_decode(corpus.eval)
    assert train_doc + eval_doc == (tmp_path / "only.txt").read_bytes()
    assert eval_doc.startswith(b"line") and len(eval_doc) > 0 and len(train_doc) > 0
    assert len(data.eval_batches(c, seq_len=SEQ, batch_size=2, workdir=str(tmp_path / "w"))) > 0


def test_text_too_small_and_bad_fields(tmp_path):
    write_corpus(tmp_path, num_files=2, words_per_file=20, gz_last=False)
    c = text_config(tmp_path, heldout_fraction=0.5)
    with pytest.raises(ValueError, match="corpus too small"):
        data.train_dataset(c, seq_len=1024, batch_size=2, seed=0, workdir=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="data.files=.*matches no files"):
        data.validate(text_config(tmp_path, files=str(tmp_path / "*.nope")), seq_len=SEQ)
    with pytest.raises(ValueError, match=r"data.heldout_fraction=1.5.*\(0, 1\)"):
        data.validate(text_config(tmp_path, heldout_fraction=1.5), seq_len=SEQ)
    with pytest.raises(ValueError, match="data.tokenizer='words'.*'bytes' or 'bpe:VOCAB'"):
        data.validate(text_config(tmp_path, tokenizer="words"), seq_len=SEQ)


def test_text_bpe(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    write_corpus(corpus_dir)
    work = str(tmp_path / "work")
    c = text_config(corpus_dir, tokenizer="bpe:300")
    ds = data.train_dataset(c, seq_len=32, batch_size=4, seed=0, workdir=work)
    assert os.path.exists(os.path.join(work, "tokenizer.json"))
    corpus = text.prepare_corpus(files=c.files, tokenizer="bpe:300", heldout_fraction=0.2,
                                 seed=0, workdir=work)
    assert corpus.eod == 0
    assert int(np.max(corpus.train)) < 300 and int(np.max(corpus.eval)) < 300
    # BPE actually merges: fewer tokens than bytes (plus one EOD per doc).
    n_bytes = sum(len(d) for d in text.split_documents(
        text.resolve_files(c.files), 0.2, 0)[0])
    assert len(corpus.train) < 0.7 * n_bytes
    # Reused on resume: same tokenizer file, identical batches.
    with open(os.path.join(work, "tokenizer.json")) as f:
        tok_json = f.read()
    ds2 = data.train_dataset(c, seq_len=32, batch_size=4, seed=0, workdir=work)
    with open(os.path.join(work, "tokenizer.json")) as f:
        assert f.read() == tok_json
    assert_batches_equal([ds[i] for i in range(3)], [ds2[i] for i in range(3)])
    for b in data.eval_batches(c, seq_len=32, batch_size=4, workdir=work):
        assert b["inputs"].max() < 300 and b["inputs"].min() >= 0


def test_text_iterator_state_round_trip(tmp_path):
    write_corpus(tmp_path)
    c = text_config(tmp_path)
    work = str(tmp_path / "work")
    it = data.make_iterator(data.train_dataset(c, seq_len=SEQ, batch_size=4, seed=1,
                                               workdir=work))
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    it2 = data.make_iterator(data.train_dataset(c, seq_len=SEQ, batch_size=4, seed=1,
                                                workdir=work))
    it2.set_state(state)
    assert_batches_equal(take(it2, 5), expected)
