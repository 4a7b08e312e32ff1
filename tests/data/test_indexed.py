"""The Megatron .bin/.idx format, checked against bytes laid out by hand from the documented layout."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from lmforge.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    dtype_for_vocab,
    exists,
)
from lmforge.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"


def hand_idx(code: int, lengths: list[int], itemsize: int, doc_indices: list[int]) -> bytes:
    """The .idx bytes written field by field: magic, version, dtype code, N, D, lengths, pointers, doc indices."""
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * itemsize
    out = MAGIC
    out += struct.pack("<Q", 1)
    out += struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths))
    out += struct.pack("<Q", len(doc_indices))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    out += struct.pack(f"<{len(lengths)}q", *pointers)
    out += struct.pack(f"<{len(doc_indices)}q", *doc_indices)
    return out


DOCS = [[1, 2, 3], [], [65535, 0], [7], []]


def test_writer_matches_hand_layout_byte_for_byte(tmp_path):
    prefix = tmp_path / "ds"
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for doc in DOCS:
            b.add_document(doc)
    # empty documents add no sequence but repeat the document index
    expected_idx = hand_idx(8, [3, 2, 1], 2, [0, 1, 1, 2, 3, 3])
    expected_bin = struct.pack("<6H", 1, 2, 3, 65535, 0, 7)
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx
    assert (tmp_path / "ds.bin").read_bytes() == expected_bin
    assert len(expected_idx) == 34 + 12 * 3 + 8 * 6


def test_reader_reads_hand_written_files(tmp_path):
    lengths = [4, 1, 3]
    tokens = [10, 11, 12, 13, 100_000, 5, 6, 7]
    (tmp_path / "h.idx").write_bytes(hand_idx(4, lengths, 4, [0, 2, 2, 3]))
    (tmp_path / "h.bin").write_bytes(struct.pack("<8i", *tokens))
    ds = IndexedDataset(tmp_path / "h")
    assert ds.dtype == np.int32
    assert len(ds) == 3 and ds.num_documents == 3 and ds.num_tokens == 8
    assert ds.sequence_lengths.tolist() == lengths
    assert ds.sequence_pointers.tolist() == [0, 16, 20]
    assert ds.document_indices.tolist() == [0, 2, 2, 3]
    assert ds[0].tolist() == [10, 11, 12, 13]
    assert ds[1].tolist() == [100_000]
    assert ds[-1].tolist() == [5, 6, 7]
    assert ds.get(0, offset=1, length=2).tolist() == [11, 12]
    assert ds.get(2, offset=1).tolist() == [6, 7]
    assert [a.tolist() for a in ds[0:2]] == [[10, 11, 12, 13], [100_000]]
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=2)
    with pytest.raises(IndexError):
        ds[3]
    copy = pickle.loads(pickle.dumps(ds))  # by reference: small, and reopens the files
    assert len(pickle.dumps(ds)) < 200 and copy[0].tolist() == [10, 11, 12, 13]


def test_int32_dtype_and_dtype_choice(tmp_path):
    assert dtype_for_vocab(65499) is np.uint16
    assert dtype_for_vocab(65500) is np.int32
    assert dtype_for_vocab(None) is np.int32
    assert DTYPE_CODES[8] is np.uint16 and DTYPE_CODES[4] is np.int32
    docs = [[70_000, 1], [2**31 - 1]]
    with IndexedDatasetBuilder(tmp_path / "w", np.int32) as b:
        for d in docs:
            b.add_document(d)
    assert (tmp_path / "w.idx").read_bytes() == hand_idx(4, [2, 1], 4, [0, 1, 2])
    assert (tmp_path / "w.bin").read_bytes() == struct.pack("<3i", 70_000, 1, 2**31 - 1)
    ds = IndexedDataset(tmp_path / "w")
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_token_too_large_for_dtype_is_refused(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "u", "uint16")
    with pytest.raises(DataError, match="70000.*uint16"):
        b.add_document([1, 70_000])
    b.abort()
    assert list(tmp_path.iterdir()) == []


def test_nothing_appears_before_finalize_and_abort_cleans_up(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "p", np.uint16)
    b.add_document([1, 2])
    assert not exists(tmp_path / "p")
    assert not (tmp_path / "p.bin").exists() and not (tmp_path / "p.idx").exists()
    b.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(tmp_path / "q", np.uint16) as b2:
            b2.add_document([3])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_sentence_level_items_and_end_document(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "s", np.uint16) as b:
        b.add_item([1, 2])
        b.add_item([3])
        b.end_document()
        b.add_document([4, 5, 6], lengths=[1, 2])
    assert (tmp_path / "s.idx").read_bytes() == hand_idx(8, [2, 1, 1, 2], 2, [0, 2, 4])


def test_merge_equals_single_build(tmp_path):
    parts = [[[1, 2], [], [3]], [[4], [5, 6, 7]]]
    for k, docs in enumerate(parts):
        with IndexedDatasetBuilder(tmp_path / f"part{k}", np.uint16) as b:
            for d in docs:
                b.add_document(d)
    with IndexedDatasetBuilder(tmp_path / "merged", np.uint16) as b:
        b.merge(tmp_path / "part0")
        b.merge(tmp_path / "part1")
    with IndexedDatasetBuilder(tmp_path / "single", np.uint16) as b:
        for d in parts[0] + parts[1]:
            b.add_document(d)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"single.{ext}").read_bytes()
    with IndexedDatasetBuilder(tmp_path / "other", np.int32) as b:
        with pytest.raises(DataError, match="dtype"):
            b.merge(tmp_path / "part0")


def test_dataset_with_only_empty_documents(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "e", np.uint16) as b:
        b.add_document([])
        b.add_document([])
    assert (tmp_path / "e.idx").read_bytes() == hand_idx(8, [], 2, [0, 0, 0])
    assert (tmp_path / "e.bin").read_bytes() == b""
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 2


@pytest.fixture
def good(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "g", np.uint16) as b:
        b.add_document([1, 2, 3])
        b.add_document([4, 5])
    return tmp_path / "g"


def test_missing_files_are_named(tmp_path, good):
    (tmp_path / "g.bin").unlink()
    with pytest.raises(DataError, match=r"g\.bin"):
        IndexedDataset(good)
    with pytest.raises(DataError, match=r"nothere\.bin and .*nothere\.idx"):
        IndexedDataset(tmp_path / "nothere")


def test_truncated_index_is_reported(tmp_path, good):
    idx = tmp_path / "g.idx"
    data = idx.read_bytes()
    idx.write_bytes(data[:-4])
    with pytest.raises(DataError, match=r"g\.idx.*truncated"):
        IndexedDataset(good)
    idx.write_bytes(data[:20])
    with pytest.raises(DataError, match=r"g\.idx.*truncated"):
        IndexedDataset(good)
    idx.write_bytes(b"")
    with pytest.raises(DataError, match="truncated"):
        IndexedDataset(good)


def test_truncated_data_file_is_reported(tmp_path, good):
    binf = tmp_path / "g.bin"
    binf.write_bytes(binf.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"g\.bin has 8 bytes.*describes 10 bytes"):
        IndexedDataset(good)


def test_wrong_magic_and_legacy_format(tmp_path, good):
    idx = tmp_path / "g.idx"
    data = idx.read_bytes()
    idx.write_bytes(b"XXXXXXXXX" + data[9:])
    with pytest.raises(DataError, match="not a Megatron indexed-dataset index"):
        IndexedDataset(good)
    idx.write_bytes(b"TNTIDX\x00\x00" + struct.pack("<QQQQQQ", 1, 8, 2, 2, 2, 2) + bytes(48))
    with pytest.raises(DataError, match="legacy.*TNTIDX"):
        IndexedDataset(good)


def test_bad_version_dtype_and_document_indices(tmp_path, good):
    idx = tmp_path / "g.idx"
    data = bytearray(idx.read_bytes())
    v2 = data[:9] + struct.pack("<Q", 2) + data[17:]
    idx.write_bytes(bytes(v2))
    with pytest.raises(DataError, match="version 2"):
        IndexedDataset(good)
    bad_code = data[:17] + struct.pack("<B", 9) + data[18:]
    idx.write_bytes(bytes(bad_code))
    with pytest.raises(DataError, match="dtype code 9"):
        IndexedDataset(good)
    idx.write_bytes(hand_idx(8, [3, 2], 2, [0, 1, 5]))
    with pytest.raises(DataError, match="document indices"):
        IndexedDataset(good)
