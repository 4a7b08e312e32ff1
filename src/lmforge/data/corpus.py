"""The embedded default corpus: the running interpreter's own standard library as JSON lines.

Every Python installation carries a few dozen megabytes of well-written, varied source code; it
needs no download and is the same on every run of the same interpreter, which makes it the
quickstart's corpus and the test suite's text.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from lmforge.io import atomic_path

#: Folders never read: installed third-party packages.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Test folders, left out when ``exclude_tests`` (they hold deliberately broken and generated files).
TEST_DIRS = frozenset({"test", "tests"})


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test_dir(name: str) -> bool:
    return name in TEST_DIRS or name.startswith("idle_test")


def iter_stdlib_files(root: Path, exclude_tests: bool = True) -> Iterator[Path]:
    """Every ``.py`` file under ``root`` in sorted (deterministic) order, skipping third-party and test folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in EXCLUDED_DIRS and not (exclude_tests and _is_test_dir(d)))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def stdlib_corpus(out_path: str | os.PathLike, max_bytes: Optional[int] = None, exclude_tests: bool = True) -> dict:
    """Write the standard library's modules as JSON lines ``{"text": source, "path": relative path}``.

    Args:
        out_path: the ``.jsonl`` file to write (atomically).
        max_bytes: stop once this many bytes of source text are written (None: everything).
        exclude_tests: leave out ``test/``, ``tests/`` and ``idlelib/idle_test`` folders.

    Empty modules (blank ``__init__.py`` files) are left out: they would be empty documents.

    Returns:
        ``{"documents", "bytes", "root", "skipped"}``: modules written, UTF-8 bytes of their text,
        the standard library folder, and files skipped because they are not UTF-8.
    """
    root = stdlib_root()
    documents = written = skipped = 0
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for path in iter_stdlib_files(root, exclude_tests):
            if max_bytes is not None and written >= max_bytes:
                break
            try:
                text = path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            if not text.strip():
                continue
            out.write(json.dumps({"text": text, "path": path.relative_to(root).as_posix()}, ensure_ascii=False) + "\n")
            documents += 1
            written += len(text.encode("utf-8"))
    return {"documents": documents, "bytes": written, "root": str(root), "skipped": skipped}
