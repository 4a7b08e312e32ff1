"""Input and output files of the data tools, with one clear error for each way they can be wrong.

``preprocess`` and ``tokenizer train`` read JSON-lines or text files (optionally ``.gz``) and write
outputs under a path the user names. What can go wrong there — an unreadable or truncated input, a
line too long to hold in memory, an output folder that is a file or not writable, an output that
already exists — becomes a :class:`~lmforge.errors.DataError` naming the file (and line) and the fix,
checked before anything is written where it can be.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Iterator, Sequence, Union

from lmforge.errors import DataError

#: Default of ``--max-document-chars``: longer documents are refused (tokenizing one costs ~200 bytes a character).
MAX_DOCUMENT_CHARS = 10_000_000
#: Bytes a JSON line may take per character of its text: ``\\ud83d\\ude00`` (one character) is 12 bytes escaped.
BYTES_PER_CHAR = 12
#: Room for a line's keys and other fields beside its text.
LINE_OVERHEAD_BYTES = 1 << 20
_READ_BLOCK = 1 << 20


def max_line_bytes(max_document_chars: int) -> int:
    """The longest raw line that can hold a document of ``max_document_chars`` characters."""
    return BYTES_PER_CHAR * int(max_document_chars) + LINE_OVERHEAD_BYTES


def check_max_document_chars(value, flag: str = "--max-document-chars") -> int:
    """``value`` as a positive int, or a DataError naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{flag}={value!r} must be a positive number of characters, e.g. {MAX_DOCUMENT_CHARS}")
    return value


def check_inputs(files: Sequence[Union[str, os.PathLike]], what: str = "input file") -> list[Path]:
    """The inputs as paths, each an existing, readable file (opened once to be sure)."""
    paths = [Path(f) for f in files]
    for path in paths:
        if path.is_dir():
            raise DataError(f"{what} {path} is a folder; give the files in it (e.g. {path}/*.jsonl)")
        if not path.exists():
            raise DataError(f"{what} {path} not found")
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            raise DataError(f"cannot read {what} {path}: permission denied; make it readable "
                            f"(chmod u+r {path}) or copy it somewhere you can read") from None
        except OSError as e:
            raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return paths


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, Union[bytes, str]]]:
    """``(line number, raw line)`` for each line of ``path`` (``.gz`` decompressed), holding at most
    ``max_bytes`` of one line in memory: a longer line comes as ``(line number, reason)`` (a ``str``),
    its rest skipped unread into memory.

    Raises:
        DataError: a truncated or corrupt ``.gz`` or an unreadable file, naming the file and the line reached.
    """
    lineno = 0
    try:
        with _open(path) as fh:
            while True:
                raw = fh.readline(max_bytes + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    size = len(raw)
                    while True:  # skip the rest of the line, a block at a time
                        block = fh.readline(_READ_BLOCK)
                        size += len(block)
                        if not block or block.endswith(b"\n"):
                            break
                    yield lineno, (f"line of {size:,} bytes is longer than any document within the character "
                                   f"limit can be ({max_bytes:,} bytes)")
                    continue
                yield lineno, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file after line {lineno} ({e}); download or "
                        f"compress it again (gzip -t {path} checks it)") from None
    except OSError as e:
        raise DataError(f"cannot read {path} (after line {lineno}): {e.strerror or e}") from None


def check_output_location(target: Union[str, os.PathLike], flag: str, shown=None) -> None:
    """The folder that would hold ``target`` is (or can become) a writable folder: its nearest existing
    ancestor is a folder, not a file, and is writable. Errors name ``flag`` and ``shown`` (default: ``target``)."""
    target = Path(target)
    shown = target if shown is None else shown
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{flag} {shown}: {parent} is a file, not a folder; choose a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {shown}: cannot write in {parent} (permission denied); choose a writable "
                        f"location")


def make_parents(path: Union[str, os.PathLike]) -> list[Path]:
    """Create the missing folders above ``path``; returns those created, deepest last."""
    created = []
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    created.reverse()
    for folder in created:
        folder.mkdir()
    return created


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders made by :func:`make_parents` again, deepest first, where they are still empty."""
    for folder in reversed(list(folders)):
        try:
            folder.rmdir()
        except OSError:
            return
