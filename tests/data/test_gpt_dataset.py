"""GPT samples: the shuffled-document token stream, splits, seeds, blending, cached indices, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

import lmforge.data.gpt_dataset as gd
from lmforge.data.gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    blending_indices,
    build_datasets,
    build_sample_index,
    split_document_ranges,
)
from lmforge.data.indexed import IndexedDataset, IndexedDatasetBuilder
from lmforge.errors import ConfigError, DataError


def make_dataset(path, n_docs: int, base: int = 0, seed: int = 0, dtype=np.int32) -> str:
    """Document d holds tokens base + d*1000 + [0, len): every token names its document and position."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(path, dtype) as b:
        for d in range(n_docs):
            n = int(rng.integers(3, 40))
            b.add_document(base + d * 1000 + np.arange(n))
    return str(path)


@pytest.fixture
def prefix(tmp_path):
    return make_dataset(tmp_path / "a", 50)


def stream_of(ds: GPTDataset) -> np.ndarray:
    return np.concatenate([ds.indexed.get(int(d)) for d in ds.document_index]).astype(np.int64)


def test_samples_are_windows_of_the_shuffled_document_stream(prefix, tmp_path):
    train, val, test = build_datasets(prefix, "1,0,0", 16, None, seed=3, cache_dir=tmp_path / "c")
    assert val is None and test is None
    assert isinstance(train, GPTDataset)
    # one epoch: every document once, in a shuffled order
    assert sorted(train.document_index.tolist()) == list(range(50))
    assert train.document_index.tolist() != list(range(50))
    stream = stream_of(train)
    assert len(train) == train.samples_per_epoch == (len(stream) - 1) // 16
    assert sorted(train.shuffle_index.tolist()) == list(range(len(train)))
    raw = {}
    for i in range(len(train)):
        sample = train[i]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        k = int(train.shuffle_index[i])
        assert np.array_equal(sample, stream[k * 16: k * 16 + 17])
        raw[k] = sample
    for k in range(len(train) - 1):  # consecutive samples share exactly one token
        assert raw[k][-1] == raw[k + 1][0]
    assert [raw[k][0] for k in range(3)] != [train[i][0] for i in range(3)]  # the samples are shuffled


def reference_sample_index(sizes, document_index, seq_length):
    """Megatron's sample-index walk, one sample at a time (the slow, obvious way)."""
    total = int(sum(int(sizes[d]) for d in document_index))
    n = (total - 1) // seq_length
    out = [(0, 0)]
    di, off = 0, 0
    for _ in range(n):
        need = seq_length + 1
        while True:
            left = int(sizes[document_index[di]]) - off
            need -= left
            if need <= 0:
                off += need + left - 1
                break
            di, off = di + 1, 0
        out.append((di, off))
    return np.array(out)


def test_vectorised_sample_index_equals_the_document_walk():
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 30, size=200).astype(np.int32)  # zero-length documents included
    doc_index = rng.permutation(np.tile(np.arange(200), 2)).astype(np.int32)
    for seq in (1, 2, 7, 64):
        assert np.array_equal(build_sample_index(sizes, doc_index, seq), reference_sample_index(sizes, doc_index, seq))


def test_several_epochs_and_final_epoch_shuffled_apart(prefix, tmp_path):
    one = build_datasets(prefix, "1,0,0", 16, None, seed=3, cache_dir=tmp_path / "c")[0]
    per_epoch = one.samples_per_epoch
    want = 2 * per_epoch + 3  # the third epoch gives only a few samples
    ds = build_datasets(prefix, "1,0,0", 16, (want, 0, 0), seed=3, cache_dir=tmp_path / "c")[0]
    assert ds.num_epochs == 3 and len(ds) >= want
    assert np.bincount(ds.document_index).tolist() == [3] * 50
    # the final epoch's documents are shuffled apart: they come last, once each
    assert sorted(ds.document_index[-50:].tolist()) == list(range(50))
    # ... and so are its samples: the first shuffle covers only the full epochs' samples
    sans_final = (2 * one.tokens_per_epoch - 1) // 16
    assert sorted(ds.shuffle_index[:sans_final].tolist()) == list(range(sans_final))
    stream = stream_of(ds)
    for i in (0, 5, want - 1):
        k = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[k * 16: k * 16 + 17])


def test_seed_determinism(prefix, tmp_path):
    a = build_datasets(prefix, "1,0,0", 16, (300, 0, 0), seed=7, cache_dir=tmp_path / "a")[0]
    b = build_datasets(prefix, "1,0,0", 16, (300, 0, 0), seed=7, cache_dir=tmp_path / "b")[0]
    c = build_datasets(prefix, "1,0,0", 16, (300, 0, 0), seed=8, cache_dir=tmp_path / "c")[0]
    assert not b.from_cache
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert np.array_equal(a.document_index, b.document_index)
    assert not np.array_equal(a.document_index, c.document_index)
    assert any(not np.array_equal(a[i], c[i]) for i in range(20))


def test_splits_are_disjoint_documents_sized_by_the_string(prefix, tmp_path):
    train, val, test = build_datasets(prefix, "80,10,10", 8, None, seed=1, cache_dir=tmp_path)
    docs = [set(ds.document_index.tolist()) for ds in (train, val, test)]
    assert [len(d) for d in docs] == [40, 5, 5]
    assert docs[0] == set(range(40)) and docs[1] == set(range(40, 45)) and docs[2] == set(range(45, 50))
    # token ids name their document: no sample crosses into another split
    for ds, allowed in zip((train, val, test), docs):
        seen = {int(t) // 1000 for i in range(len(ds)) for t in ds[i]}
        assert seen <= allowed
    assert split_document_ranges(50, "980,10,10") == split_document_ranges(50, "98,1,1") == [(0, 49), (49, 50), (50, 50)]
    # Megatron rounds the book-ends: 33 * 0.98 = 32.34 -> 32, 33 * 0.99 = 32.67 -> 33; test gets 0 documents
    assert split_document_ranges(33, "98,1,1") == [(0, 32), (32, 33), (33, 33)]
    assert split_document_ranges(10, [1, 0, 0]) == split_document_ranges(10, "1") == [(0, 10), None, None]
    small = make_dataset(tmp_path / "small", 33)
    tr, va, te = build_datasets(small, "98,1,1", 4, None, seed=1, cache_dir=tmp_path)
    assert len(set(tr.document_index.tolist())) == 32 and set(va.document_index.tolist()) == {32} and te is None
    # a requested count of 0 gives no dataset
    assert build_datasets(prefix, "80,10,10", 8, (10, 0, 5), seed=1, cache_dir=tmp_path)[1] is None


def test_blending_follows_the_weights(tmp_path):
    a = make_dataset(tmp_path / "a", 40, base=0, seed=1)
    b = make_dataset(tmp_path / "b", 30, base=1_000_000, seed=2)
    n = 2000
    train, val, _ = build_datasets([0.3, a, "0.7", b], "90,10,0", 8, (n, 50, 0), seed=5, cache_dir=tmp_path / "c")
    assert isinstance(train, BlendedDataset) and len(train) == n
    from_b = np.array([train[i][0] >= 1_000_000 for i in range(n)])
    assert abs(from_b.sum() - 0.7 * n) <= 1
    assert abs(from_b[:100].sum() - 70) <= 1  # even early on
    assert np.array_equal(from_b, train.dataset_index == 1)
    for comp, w in zip(train.datasets, (0.3, 0.7)):
        assert comp.num_samples >= int(np.ceil(np.ceil(n * w) * 1.005))
    assert isinstance(val, BlendedDataset) and len(val) == 50
    # the greedy rule itself: argmax(w * max(i, 1) - count), the first on a tie (i = 4: 0.25*4-1 == 0.75*4-3)
    idx, sample = blending_indices([0.25, 0.75], 8)
    assert idx.tolist() == [1, 0, 1, 1, 0, 1, 1, 1] and sample.tolist() == [0, 0, 1, 2, 1, 3, 4, 5]


def test_blend_of_one_epoch_stops_before_a_component_repeats(tmp_path):
    a = make_dataset(tmp_path / "a", 40, base=0, seed=1)
    b = make_dataset(tmp_path / "b", 10, base=1_000_000, seed=2)
    train = build_datasets([1, a, 1, b], "1,0,0", 8, None, seed=5, cache_dir=tmp_path / "c")[0]
    counts = np.bincount(train.dataset_index, minlength=2)
    sizes = [len(c) for c in train.datasets]
    assert all(c <= s for c, s in zip(counts, sizes)) and counts[1] == sizes[1]
    assert len(train) == counts.sum() and train.samples_per_epoch == 2 * min(sizes)
    assert all(train[i].shape == (9,) for i in range(len(train)))
    single = build_datasets([1.0, a], "1,0,0", 8, None, seed=5, cache_dir=tmp_path / "c")[0]
    assert isinstance(single, GPTDataset)


def test_cache_is_written_once_and_reused(prefix, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_datasets(prefix, "90,10,0", 16, (100, 10, 0), seed=3, cache_dir=cache)
    assert not first[0].from_cache and not first[1].from_cache
    files = sorted(cache.iterdir())
    assert len(files) == 8  # 3 arrays + a description per split
    assert {f.name.split("-", 1)[1] for f in files} >= {"GPTDataset-train-shuffle_index.npy",
                                                        "GPTDataset-valid-sample_index.npy"}
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    def no_rebuild(*a, **k):
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(gd, "build_indices", no_rebuild)
    second = build_datasets(prefix, "90,10,0", 16, (100, 10, 0), seed=3, cache_dir=cache)
    assert second[0].from_cache and second[1].from_cache
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.iterdir())} == mtimes
    assert all(np.array_equal(first[0][i], second[0][i]) for i in range(len(first[0])))
    with pytest.raises(AssertionError, match="rebuilt"):  # another setting is another cache entry
        build_datasets(prefix, "90,10,0", 16, (100, 10, 0), seed=4, cache_dir=cache)


def test_default_cache_beside_the_data_and_blend_cache(tmp_path):
    a = make_dataset(tmp_path / "data" / "a", 20, seed=1)
    b = make_dataset(tmp_path / "data" / "b", 20, base=1_000_000, seed=2)
    blend = build_datasets([1, a, 1, b], "1,0,0", 8, (60, 0, 0), seed=1)[0]
    cache = tmp_path / "data" / "cache" / "GPTDataset_indices"
    names = sorted(p.name for p in cache.iterdir())
    assert any("BlendedDataset-train-dataset_index.npy" in n for n in names)
    assert sum("GPTDataset-train" in n for n in names) == 8
    again = build_datasets([1, a, 1, b], "1,0,0", 8, (60, 0, 0), seed=1)[0]
    assert again.from_cache and all(c.from_cache for c in again.datasets)
    assert np.array_equal(blend.dataset_index, again.dataset_index)


def test_main_rank_builds_then_others_load_after_the_barrier(prefix, tmp_path):
    calls = []
    cache = tmp_path / "shared"
    main = build_datasets(prefix, "1,0,0", 16, (40, 0, 0), 2, cache_dir=cache, barrier=lambda: calls.append("m"))
    other = build_datasets(prefix, "1,0,0", 16, (40, 0, 0), 2, cache_dir=cache, barrier=lambda: calls.append("o"),
                           is_main=False)
    assert calls == ["m", "o"]
    assert not main[0].from_cache and other[0].from_cache
    # a rank that cannot see the cache builds the same indices in memory and writes nothing
    lonely = build_datasets(prefix, "1,0,0", 16, (40, 0, 0), 2, cache_dir=tmp_path / "local", is_main=False)[0]
    assert not (tmp_path / "local").exists()
    assert np.array_equal(lonely.shuffle_index, main[0].shuffle_index)


def test_errors(prefix, tmp_path):
    with pytest.raises(DataError, match=r"nothere\.bin and .*nothere\.idx"):
        build_datasets(str(tmp_path / "nothere"), "1,0,0", 8, None, 1)
    with pytest.raises(ConfigError, match="without .bin"):
        build_datasets(prefix + ".bin", "1,0,0", 8, None, 1)
    with pytest.raises(ConfigError, match="odd number"):
        build_datasets([0.5, prefix, 0.5], "1,0,0", 8, None, 1)
    with pytest.raises(ConfigError, match="'heavy'.*not a non-negative number"):
        build_datasets(["heavy", prefix], "1,0,0", 8, None, 1)
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2", ""):
        with pytest.raises(ConfigError, match="splits_string"):
            build_datasets(prefix, bad, 8, None, 1)
    with pytest.raises(DataError, match=r"too small for one sample of seq_length \+ 1 = 10001"):
        build_datasets(prefix, "1,0,0", 10_000, None, 1, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="seq_length"):
        build_datasets(prefix, "1,0,0", 0, None, 1)
    with pytest.raises(ConfigError, match="num_samples"):
        build_datasets(prefix, "1,0,0", 8, (10, 2), 1)
    with pytest.raises(ConfigError, match="seed"):
        build_datasets(prefix, "1,0,0", 8, None, -1)


def test_string_forms_of_data_prefix(prefix, tmp_path):
    ds = build_datasets(f"[1.0,{prefix}]", "1,0,0", 8, None, 1, cache_dir=tmp_path)[0]
    assert isinstance(ds, GPTDataset) and ds.indexed.prefix == prefix
    assert isinstance(IndexedDataset(prefix), IndexedDataset)


def fresh_samples(prefix, tmp_path, **kw) -> list:
    ds = build_datasets(prefix, "1,0,0", 8, (60, 0, 0), seed=3, cache_dir=tmp_path / "fresh", **kw)[0]
    return [ds[i] for i in range(len(ds))]


def test_new_content_under_the_same_prefix_rebuilds_the_cached_indices(tmp_path):
    """Issue 15.1: a prefix preprocessed again (same name, same document count) must not reuse the old indices."""
    prefix = make_dataset(tmp_path / "data" / "a", 30, seed=1)
    cache = tmp_path / "cache"
    old = build_datasets(prefix, "1,0,0", 8, (60, 0, 0), seed=3, cache_dir=cache)[0]
    assert not old.from_cache
    lengths = IndexedDataset(prefix).sequence_lengths[::-1].copy()
    with IndexedDatasetBuilder(prefix, np.int32) as b:  # same name, documents and tokens; other lengths and ids
        for d, n in enumerate(lengths):
            b.add_document(500_000 + d * 1000 + np.arange(n))
    new = build_datasets(prefix, "1,0,0", 8, (60, 0, 0), seed=3, cache_dir=cache)[0]
    assert not new.from_cache
    samples = [new[i] for i in range(len(new))]
    assert all(s.min() >= 500_000 for s in samples)
    assert all(np.array_equal(a, b) for a, b in zip(samples, fresh_samples(prefix, tmp_path)))
    again = build_datasets(prefix, "1,0,0", 8, (60, 0, 0), seed=3, cache_dir=cache)[0]
    assert again.from_cache  # unchanged data: the new entry is reused


def test_same_size_and_mtime_but_other_index_rebuilds(tmp_path):
    """A dataset copied over with its size and mtime kept (cp -p) is told apart by the hash of its .idx."""
    a = make_dataset(tmp_path / "a", 30, seed=1)
    b = make_dataset(tmp_path / "b", 30, seed=2)
    # make b's files as large as a's: pad the last document of b so the token counts match
    ia, ib = IndexedDataset(a), IndexedDataset(b)
    diff = ia.num_tokens - ib.num_tokens
    with IndexedDatasetBuilder(tmp_path / "b", np.int32) as w:
        for d in range(len(ib)):
            extra = max(diff, 0) if d == len(ib) - 1 else 0
            w.add_document(d * 1000 + np.arange(int(ib.sequence_lengths[d]) + extra))
    if diff < 0:  # b was longer: rebuild a instead, padded the same way
        with IndexedDatasetBuilder(tmp_path / "a", np.int32) as w:
            for d in range(len(ia)):
                extra = -diff if d == len(ia) - 1 else 0
                w.add_document(d * 1000 + np.arange(int(ia.sequence_lengths[d]) + extra))
    del ia, ib
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"a{suffix}").stat().st_size == (tmp_path / f"b{suffix}").stat().st_size
    cache = tmp_path / "cache"
    build_datasets(a, "1,0,0", 8, (60, 0, 0), seed=3, cache_dir=cache)
    stat = (tmp_path / "a.idx").stat(), (tmp_path / "a.bin").stat()
    for suffix, st in zip((".idx", ".bin"), stat):
        (tmp_path / f"b{suffix}").replace(tmp_path / f"a{suffix}")
        os.utime(tmp_path / f"a{suffix}", ns=(st.st_atime_ns, st.st_mtime_ns))
    new = build_datasets(a, "1,0,0", 8, (60, 0, 0), seed=3, cache_dir=cache)[0]
    assert not new.from_cache
    assert all(np.array_equal(new[i], s) for i, s in enumerate(fresh_samples(a, tmp_path)))


def test_blend_cache_follows_its_components_content(tmp_path):
    a = make_dataset(tmp_path / "a", 20, seed=1)
    b = make_dataset(tmp_path / "b", 20, base=1_000_000, seed=2)
    cache = tmp_path / "cache"
    first = build_datasets([1, a, 1, b], "1,0,0", 8, None, seed=1, cache_dir=cache)[0]
    make_dataset(tmp_path / "b", 20, base=2_000_000, seed=3)  # other lengths: other per-epoch sample counts
    second = build_datasets([1, a, 1, b], "1,0,0", 8, None, seed=1, cache_dir=cache)[0]
    assert not second.from_cache
    fresh = build_datasets([1, a, 1, b], "1,0,0", 8, None, seed=1, cache_dir=tmp_path / "fresh")[0]
    assert len(second) == len(fresh) and all(np.array_equal(second[i], fresh[i]) for i in range(len(fresh)))
    assert any(s.max() >= 2_000_000 for s in (second[i] for i in range(len(second))))
    assert first.description != second.description


def test_token_ids_beyond_the_vocabulary_are_refused_once_and_cached(tmp_path, monkeypatch):
    """Issue 15.4: data made with a larger tokenizer is refused at build time, naming the dataset and the ids."""
    prefix = make_dataset(tmp_path / "a", 10, seed=1)  # ids up to 9000 + 39
    largest = IndexedDataset(prefix).max_token_id()
    assert largest == int(np.concatenate(IndexedDataset(prefix)[:]).max())
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=rf"a holds token id {largest} but tok.json has a vocabulary of 512 "
                                        r"\(ids 0..511\).*another tokenizer"):
        build_datasets(prefix, "1,0,0", 8, None, seed=1, cache_dir=cache, vocab_size=512, tokenizer_name="tok.json")
    assert not any(p.name.endswith("-GPTDataset-train-description.json") for p in cache.iterdir())  # nothing built
    stats = [p for p in cache.iterdir() if p.name.endswith("-IndexedDataset-stats.json")]
    assert len(stats) == 1
    # the next build reads the cached value instead of scanning the .bin again
    monkeypatch.setattr(IndexedDataset, "max_token_id", lambda self: pytest.fail("the .bin was scanned again"))
    ds = build_datasets(prefix, "1,0,0", 8, None, seed=1, cache_dir=cache, vocab_size=largest + 1)[0]
    assert len(ds) > 0
    with pytest.raises(DataError, match=f"holds token id {largest}"):
        build_datasets(prefix, "1,0,0", 8, None, seed=1, cache_dir=cache, vocab_size=largest)
