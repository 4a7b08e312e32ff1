"""JSONL -> indexed dataset: the bytes Megatron's preprocess_data.py would write, parallel workers, bad input."""

from __future__ import annotations

import gzip
import inspect
import json
import os
import struct

import numpy as np
import pytest

from lmforge.data.indexed import IndexedDataset
from lmforge.data.preprocess import preprocess
from lmforge.data.tokenizers import load_tokenizer, train_bpe
from lmforge.errors import DataError

QUIET = dict(log=lambda *a: None)


def _texts() -> list[str]:
    import collections
    import shutil
    import string

    texts = []
    for m in (collections, shutil, string):
        texts.extend(p for p in inspect.getsource(m).split("\n\n\n") if p.strip())
    return texts[:60]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    texts = _texts()
    texts.insert(3, "")  # an empty document
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
    tok = train_bpe([corpus], 320, root / "tok")
    return {"root": root, "texts": texts, "corpus": corpus, "tok_path": root / "tok", "tok": tok}


def megatron_reference(texts, tok, append_eod: bool) -> tuple[bytes, bytes]:
    """What tools/preprocess_data.py writes (document level), laid out by hand from the format notes."""
    lengths, tokens, docs = [], [], [0]
    for t in texts:
        ids = tok.encode(t)
        if ids:
            if append_eod:
                ids = ids + [tok.eod_id]
            lengths.append(len(ids))
            tokens.extend(ids)
        docs.append(len(lengths))
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += 2 * n
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(lengths), len(docs))
    idx += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(lengths)}q", *pointers)
    idx += struct.pack(f"<{len(docs)}q", *docs)
    return struct.pack(f"<{len(tokens)}H", *tokens), idx


def read(prefix) -> tuple[bytes, bytes]:
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.mark.parametrize("append_eod", [False, True])
def test_bytes_match_megatron_layout(env, tmp_path, append_eod):
    summary = preprocess([env["corpus"]], tmp_path / "out" / "c", env["tok_path"], append_eod=append_eod, **QUIET)
    prefix = tmp_path / "out" / "c_text_document"
    assert summary["outputs"]["text"]["prefix"] == str(prefix)
    assert read(prefix) == megatron_reference(env["texts"], env["tok"], append_eod)
    assert summary["documents"] == len(env["texts"])
    ds = IndexedDataset(prefix)
    assert summary["tokens"] == ds.num_tokens
    assert summary["dtype"] == "uint16" and summary["skipped_lines"] == 0
    # the empty document is a document without a sequence: its index repeats
    assert ds.num_documents == len(env["texts"]) and len(ds) == len(env["texts"]) - 1
    assert ds.document_indices[3] == ds.document_indices[4] == 3
    if append_eod:
        assert all(ds[i][-1] == env["tok"].eod_id for i in range(len(ds)))
        assert sum(int(ds[i][-1] == env["tok"].eod_id) for i in range(len(ds))) == len(ds)
    else:
        assert not any(env["tok"].eod_id in ds[i] for i in range(len(ds)))


def test_two_workers_give_identical_bytes(env, tmp_path):
    preprocess([env["corpus"]], tmp_path / "one", env["tok_path"], append_eod=True, workers=1, **QUIET)
    s = preprocess([env["corpus"]], tmp_path / "two", env["tok_path"], append_eod=True, workers=2, chunk_lines=7,
                   **QUIET)
    assert s["workers"] == 2
    assert read(tmp_path / "one_text_document") == read(tmp_path / "two_text_document")


def test_gzip_and_several_files_and_tokenizer_object(env, tmp_path):
    lines = env["corpus"].read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:half])))
    (tmp_path / "b.json").write_bytes(b"".join(lines[half:]))
    preprocess([tmp_path / "a.jsonl.gz", tmp_path / "b.json"], tmp_path / "g", env["tok"], **QUIET)
    assert read(tmp_path / "g_text_document") == megatron_reference(env["texts"], env["tok"], False)


def test_several_keys_and_int32(env, tmp_path):
    path = tmp_path / "two_keys.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i} " * i}) for i in range(5)) + "\n")
    s = preprocess(path, tmp_path / "k", env["tok_path"], json_keys=("q", "a"), dtype="int32", **QUIET)
    q, a = IndexedDataset(tmp_path / "k_q_document"), IndexedDataset(tmp_path / "k_a_document")
    assert q.dtype == np.int32 and s["dtype"] == "int32"
    assert env["tok"].decode(q[2]) == "question 2"
    assert len(a) == 4 and a.num_documents == 5  # "answer 0 " * 0 is empty
    assert env["tok"].decode(a[0]) == "answer 1 "


def test_malformed_line_stops_with_file_and_line(env, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "unterminated\n' + json.dumps({"text": "ok"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON .*skip-bad-lines"):
        preprocess([path], out / "x", env["tok_path"], **QUIET)
    assert not out.exists()  # nothing half-written, not even the folder
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        preprocess([path], out / "x", env["tok_path"], workers=2, **QUIET)
    assert not out.exists()


def test_malformed_line_skipped_and_reported_once(env, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n[1, 2\n" + json.dumps({"text": "third"}) + "\n\n")
    messages = []
    s = preprocess([path], tmp_path / "x", env["tok_path"], on_bad_line="skip", log=messages.append)
    assert s["skipped_lines"] == 1 and s["documents"] == 2 and s["blank_lines"] == 1
    assert s["skipped"][0].startswith(f"{path}:2: not valid JSON")
    assert "JSON array" in s["skipped"][0]
    reports = [m for m in messages if "bad line" in m]
    assert len(reports) == 1 and f"{path}:2" in reports[0]
    ds = IndexedDataset(tmp_path / "x_text_document")
    assert [env["tok"].decode(ds[i]) for i in range(len(ds))] == ["first", "third"]


def test_missing_key_and_wrong_type(env, tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"content": "b", "id": 1}) + "\n"
                    + json.dumps({"text": None}) + "\n")
    with pytest.raises(DataError, match=r"keys\.jsonl:2: missing key 'text' \(keys present: 'content', 'id'\)"):
        preprocess([path], tmp_path / "x", env["tok_path"], **QUIET)
    s = preprocess([path], tmp_path / "x", env["tok_path"], on_bad_line="skip", **QUIET)
    assert s["skipped_lines"] == 2 and s["documents"] == 1
    assert "holds null" in s["skipped"][1] and s["skipped"][1].startswith(f"{path}:3")


def test_empty_corpus(env, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n   \n")
    with pytest.raises(DataError, match="empty corpus"):
        preprocess([blank], tmp_path / "x", env["tok_path"], **QUIET)
    allbad = tmp_path / "allbad.jsonl"
    allbad.write_text("nope\n{}\n")
    with pytest.raises(DataError, match="empty corpus.*2 bad line"):
        preprocess([allbad], tmp_path / "x", env["tok_path"], on_bad_line="skip", **QUIET)
    empties = tmp_path / "empties.jsonl"
    empties.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="empty corpus"):
        preprocess([empties], tmp_path / "x", env["tok_path"], **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allbad.jsonl", "blank.jsonl", "empties.jsonl"]


def test_missing_inputs_and_small_dtype(env, tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl not found"):
        preprocess([tmp_path / "nothere.jsonl"], tmp_path / "x", env["tok_path"], **QUIET)
    with pytest.raises(DataError, match="notok"):
        preprocess([env["corpus"]], tmp_path / "x", tmp_path / "notok", **QUIET)
    with pytest.raises(DataError, match=r"uint8 holds ids up to 255.*vocabulary of 320"):
        preprocess([env["corpus"]], tmp_path / "x", env["tok_path"], dtype="uint8", **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_append_eod_needs_an_eod_token(env, tmp_path):
    tok = load_tokenizer(env["tok_path"])
    tok._eod_id = None  # a tokenizer without any end-of-document token
    with pytest.raises(DataError, match="no end-of-document token"):
        preprocess([env["corpus"]], tmp_path / "x", tok, append_eod=True, **QUIET)


def test_existing_outputs_need_overwrite(env, tmp_path):
    """Issue 15.12: an existing output is refused (untouched) unless overwrite is asked for."""
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"text": "first corpus"}) + "\n")
    preprocess([first], tmp_path / "x", env["tok_path"], **QUIET)
    before = read(tmp_path / "x_text_document")
    with pytest.raises(DataError, match=r"x_text_document\.bin exists; pass --overwrite"):
        preprocess([env["corpus"]], tmp_path / "x", env["tok_path"], **QUIET)
    assert read(tmp_path / "x_text_document") == before
    preprocess([env["corpus"]], tmp_path / "x", env["tok_path"], overwrite=True, **QUIET)
    assert read(tmp_path / "x_text_document") == megatron_reference(env["texts"], env["tok"], False)


def test_outputs_get_the_umask_mode(env, tmp_path):
    """Published files get 0666 & ~umask (0644 under the usual umask), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        preprocess([env["corpus"]], tmp_path / "m", env["tok_path"], **QUIET)
    finally:
        os.umask(old)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"m_text_document{suffix}").stat().st_mode & 0o777 == 0o644


KILLED_BUILD = """
import os, sys
import numpy as np
from lmforge.data.indexed import IndexedDatasetBuilder
b = IndexedDatasetBuilder(sys.argv[1], np.uint16)
b.add_document(np.arange(1000))
b._file.flush()
os._exit(9)  # killed mid-build: no abort, no finalize
"""


def test_a_killed_run_leaves_temporaries_the_next_run_removes(env, tmp_path):
    """Issue 15.12: what a killed preprocess left beside its outputs is removed by the next run; nothing else is."""
    import fcntl
    import subprocess
    import sys

    prefix = tmp_path / "k_text_document"
    subprocess.run([sys.executable, "-c", KILLED_BUILD, str(prefix)], check=False, timeout=120,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".k_text_document.bin.")]
    assert len(left) == 1 and left[0].stat().st_size == 2000
    # look-alikes that are not ours, and a temporary a live build holds (locked), must stay
    keep = [tmp_path / ".k_text_document.bin.notes.tmp", tmp_path / "k_text_document.bin.abcdefgh.tmp",
            tmp_path / ".other.bin.abcdefgh.tmp"]
    for p in keep:
        p.write_text("not preprocess's")
    live = tmp_path / ".k_text_document.idx.live1234.tmp"
    live.write_text("a running build's")
    holder = open(live, "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        messages = []
        preprocess([env["corpus"]], tmp_path / "k", env["tok_path"], log=messages.append)
    finally:
        holder.close()
    assert not left[0].exists()
    assert any(f"removed {left[0]}" in m and "interrupted" in m for m in messages)
    assert all(p.exists() for p in keep) and live.exists()
    assert read(prefix) == megatron_reference(env["texts"], env["tok"], False)


def test_long_documents_are_bad_lines(env, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "y" * 300}) + "\n"
                    + json.dumps({"text": "tail"}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:2: document of 300 characters is over "
                                        r"--max-document-chars=100"):
        preprocess([path], tmp_path / "x", env["tok_path"], max_document_chars=100, **QUIET)
    s = preprocess([path], tmp_path / "x", env["tok_path"], max_document_chars=100, on_bad_line="skip",
                   workers=2, **QUIET)
    assert s["documents"] == 2 and s["skipped_lines"] == 1 and "300 characters" in s["skipped"][0]
    ds = IndexedDataset(tmp_path / "x_text_document")
    assert [env["tok"].decode(ds[i]) for i in range(len(ds))] == ["short", "tail"]
