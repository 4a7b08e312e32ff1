"""The embedded default corpus: the running Python's standard library as JSON lines."""

from __future__ import annotations

import json

from lmforge.data.corpus import stdlib_corpus, stdlib_root


def test_whole_stdlib_is_many_valid_documents(tmp_path):
    out = tmp_path / "stdlib.jsonl"
    info = stdlib_corpus(out)
    assert info["root"] == str(stdlib_root())
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == info["documents"] > 300
    assert sum(len(r["text"].encode("utf-8")) for r in rows) == info["bytes"] > 5_000_000
    paths = [r["path"] for r in rows]
    assert len(set(paths)) == len(paths)
    assert "json/decoder.py" in paths and "collections/__init__.py" in paths
    for p in paths:
        parts = p.split("/")
        assert p.endswith(".py")
        assert not {"test", "tests", "site-packages", "dist-packages"} & set(parts[:-1])
        assert not any(part.startswith("idle_test") for part in parts)
    assert all(r["text"].strip() for r in rows)
    assert list(tmp_path.iterdir()) == [out]  # written atomically: no temporary left


def test_deterministic_and_capped(tmp_path):
    a = stdlib_corpus(tmp_path / "a.jsonl", max_bytes=500_000)
    b = stdlib_corpus(tmp_path / "b.jsonl", max_bytes=500_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a == b and a["documents"] > 5
    assert 500_000 <= a["bytes"] < 500_000 + 1_000_000
    order = [json.loads(line)["path"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    top_level = [p for p in order if "/" not in p]
    assert top_level and top_level == sorted(top_level)  # sorted files within each folder


def test_tests_can_be_included(tmp_path):
    with_tests = stdlib_corpus(tmp_path / "t.jsonl", exclude_tests=False)
    without = stdlib_corpus(tmp_path / "n.jsonl")
    paths = [json.loads(line)["path"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert with_tests["documents"] == len(paths)
    root = stdlib_root()
    test_files = [p for p in root.glob("*/test*/**/*.py") if "site-packages" not in p.parts]
    test_files += list((root / "test").glob("**/*.py")) if (root / "test").is_dir() else []
    if test_files:  # some distributions ship the test suite separately
        assert with_tests["documents"] > without["documents"]
        assert any(p.split("/")[0] == "test" or "/test/" in p or "/tests/" in p for p in paths)
    else:
        assert with_tests["documents"] == without["documents"]
