"""Input and output files of the data tools, with one clear error for each way they can be wrong.

``preprocess`` and ``tokenizer train`` read JSON-lines files (optionally ``.gz`` or ``.zst``), Parquet
files, FASTA files (one document per record) or plain text, named as files, folders or globs
(:func:`expand_inputs`), and write outputs under a path the user names. What can go wrong there — an unreadable or truncated input, a
line too long to hold in memory, an output folder that is a file or not writable, an output that
already exists — becomes a :class:`~lmforge.errors.DataError` naming the file (and line) and the fix,
checked before anything is written where it can be.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

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


#: File name endings (after .gz / .zst) of each input format; any other file is the caller's default format.
FORMAT_SUFFIXES = {
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "parquet": (".parquet",),
    "fasta": (".fasta", ".fa", ".fna", ".faa", ".ffn", ".frn", ".fas"),
    "text": (".txt",),
}


def input_format(path: Union[str, os.PathLike], default: str = "text") -> str:
    """``jsonl``, ``parquet``, ``fasta`` or ``text`` by the file's name (a ``.gz`` / ``.zst`` ending aside);
    ``default`` for any other name (wikiextractor's ``wiki_00`` files have none)."""
    name = Path(path).name.lower()
    for ext in (".gz", ".zst"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    for kind, suffixes in FORMAT_SUFFIXES.items():
        if name.endswith(suffixes):
            return kind
    return default


def expand_inputs(inputs: Sequence[Union[str, os.PathLike]], what: str = "input file",
                  files_filter: Optional[str] = None) -> list[Path]:
    """The files that ``inputs`` name, in order: a file as itself, a folder as every file under it (sorted, hidden
    files and folders left out; only those whose path inside the folder matches the glob ``files_filter``, e.g.
    ``**/*.jsonl``, when given), a glob (``data/*.jsonl.gz``, ``**`` spanning folders) as its sorted matches.
    Each is checked readable (:func:`check_inputs`).

    Raises:
        DataError: a path that does not exist and matches nothing, a folder with no (matching) file.
    """
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    f = Path(dirpath) / name
                    rel = f.relative_to(path).as_posix()
                    if files_filter is None or fnmatch.fnmatch(rel, files_filter) or \
                            fnmatch.fnmatch(rel, files_filter.removeprefix("**/")):
                        found.append(f)
            if not found:
                which = f" matching --files-filter {files_filter}" if files_filter else ""
                raise DataError(f"{what} folder {path} holds no file{which}")
            out.extend(found)
        elif not path.exists() and any(c in str(item) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.fspath(item), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{what} {item} matches no file")
            out.extend(matches)
        else:
            out.append(path)
    return check_inputs(out, what)


def _open(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path} is zstd-compressed: install zstandard (pip install zstandard) to read it, "
                            f"or decompress it (zstd -d {path})") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _decompress_errors() -> tuple:
    errors = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def iter_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, Union[bytes, str]]]:
    """``(line number, raw line)`` for each line of ``path`` (``.gz`` / ``.zst`` decompressed), holding at most
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
    except _decompress_errors() as e:
        tool = "zstd" if path.name.endswith(".zst") else "gzip"
        raise DataError(f"{path}: truncated or corrupt {tool} file after line {lineno} ({e}); download or "
                        f"compress it again ({tool} -t {path} checks it)") from None
    except OSError as e:
        raise DataError(f"cannot read {path} (after line {lineno}): {e.strerror or e}") from None



def iter_records(path: Path, max_bytes: int, columns: Optional[Sequence[str]] = None,
                 default: str = "jsonl") -> Iterator[tuple[int, Union[bytes, str]]]:
    """``(position, raw JSON line)`` of each record of ``path`` by its format (:func:`input_format`, ``default``
    for an unknown name), so that every format is parsed as JSON lines are:

    * JSON lines / text: the file's lines (:func:`iter_lines`), numbered from 1;
    * Parquet (needs ``pyarrow``): each row's ``columns`` (all when None) as a JSON object, numbered from 1;
    * FASTA: each record as ``{"id": first word of the header, "description": the header, "text": the
      sequence, its lines joined}``, numbered by its header's line.

    A record longer than ``max_bytes`` comes as its reason (a ``str``), as :func:`iter_lines` gives it.
    """
    kind = input_format(path, default)
    if kind == "parquet":
        yield from _parquet_records(path, max_bytes, columns)
    elif kind == "fasta":
        yield from _fasta_records(path, max_bytes)
    else:
        yield from iter_lines(path, max_bytes)


def _parquet_records(path: Path, max_bytes: int, columns) -> Iterator[tuple[int, Union[bytes, str]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is a Parquet file: install pyarrow (pip install pyarrow) to read it") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if columns is not None:
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"{path}: no column {', '.join(map(repr, missing))} (columns: "
                                f"{', '.join(map(repr, names)) or 'none'}); choose them with --json-keys")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=list(columns) if columns is not None else None):
            for record in batch.to_pylist():
                row += 1
                raw = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
                if len(raw) > max_bytes:
                    yield row, (f"row of {len(raw):,} bytes is longer than any document within the character limit "
                                f"can be ({max_bytes:,} bytes)")
                else:
                    yield row, raw
    except DataError:
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError are ValueError / OSError
        raise DataError(f"cannot read Parquet file {path}: {e}") from None


def _fasta_records(path: Path, max_bytes: int) -> Iterator[tuple[int, Union[bytes, str]]]:
    header: Optional[str] = None
    start = 0
    parts: list[bytes] = []
    size = 0

    def record():
        if size > max_bytes:
            return start, (f"FASTA record of {size:,} bytes is longer than any document within the character "
                           f"limit can be ({max_bytes:,} bytes)")
        text = b"".join(parts).decode("utf-8", errors="replace")
        name = header.split()[0] if header.split() else ""
        return start, json.dumps({"id": name, "description": header, "text": text}).encode("utf-8")

    for lineno, raw in iter_lines(path, max_bytes):
        if isinstance(raw, str):  # a sequence line too long to hold: the record is too long
            size = max_bytes + 1
            continue
        if raw.startswith(b">"):
            if header is not None:
                yield record()
            header = raw[1:].decode("utf-8", errors="replace").strip()
            start, parts, size = lineno, [], 0
        elif raw.strip():
            if header is None:
                yield lineno, "a sequence line before any '>' header: not a FASTA file?"
                header, start, parts, size = "", lineno, [], 0
                continue
            if size <= max_bytes:
                piece = b"".join(raw.split())
                parts.append(piece)
                size += len(piece)
            if size > max_bytes:
                parts = []
    if header is not None:
        yield record()


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
