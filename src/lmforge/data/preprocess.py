"""JSON lines, Parquet, FASTA -> token ids -> Megatron indexed datasets (``{prefix}_{key}_document.bin/.idx``).

The output is byte-for-byte what Megatron-LM's ``tools/preprocess_data.py`` writes for the same
input and tokenizer (without sentence splitting): each JSON line is one document; each text is
encoded with the tokenizer's default call (its post-processor's special tokens included);
``append_eod`` adds the end-of-document id to every non-empty document; a text that encodes to
no ids adds no sequence but still ends a document. A value that is a list of strings is a
pre-split document: each non-empty string becomes one sequence, as Megatron does.

Input is streamed (``.jsonl``, ``.json`` lines files, ``.gz`` / ``.zst`` compressed, and any file of another
name read as JSON lines; Parquet rows; FASTA records, one document each, the sequence under ``text``; files,
folders or globs, see :func:`lmforge.data.files.expand_inputs`), tokenized in chunks
by a pool of processes when ``workers > 1`` (order preserved, a bounded number of chunks in
flight), and the outputs appear only at the end, atomically: on any error nothing is left behind.
Memory is bounded per document: a document over ``max_document_chars`` characters is a bad line
(tokenizing costs ~200 bytes a character), and no more of a line is read than such a document
can take. Existing outputs are replaced only with ``overwrite``; temporaries a killed run left
beside the outputs are removed (see :func:`lmforge.data.indexed.remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from lmforge.data.files import (MAX_DOCUMENT_CHARS, check_max_document_chars, check_output_location, expand_inputs,
                                iter_records, make_parents, max_line_bytes, remove_empty)
from lmforge.data.indexed import IndexedDatasetBuilder, data_file_path, dtype_code, dtype_for_vocab, index_file_path
from lmforge.data.tokenizers import load_tokenizer
from lmforge.errors import ConfigError, DataError

#: How many skipped-line messages the summary keeps (the count is always exact).
MAX_REPORTED = 20


# -- encoding (runs in the worker processes, or in-process when workers == 1) -----------------------

class _Encoder:
    """Parse and tokenize chunks of raw JSON lines.

    ``__call__(lines)`` returns one entry per line: ``(None, {key: (tokens, lengths)})`` for a good
    line (``tokens`` an int32 array of the document's ids, ``lengths`` its sequence lengths), or
    ``(reason, None)`` for a bad one. A line given as a ``str`` is already known bad: that is its reason.
    """

    def __init__(self, tokenizer, json_keys: Sequence[str], append_eod: bool,
                 max_document_chars: int = MAX_DOCUMENT_CHARS):
        self.tokenizer = tokenizer
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod
        self.eod = tokenizer.eod_id
        self.max_document_chars = int(max_document_chars)

    def _texts(self, raw) -> tuple[Optional[str], Optional[dict]]:
        """The sentences of each key of one line, or the reason the line is bad."""
        if isinstance(raw, str):  # a line too long to read (see lmforge.data.files.iter_lines)
            return (f"{raw}: raise --max-document-chars (now {self.max_document_chars:,}), or split it into "
                    f"several lines"), None
        try:
            row = json.loads(raw)
        except UnicodeDecodeError as e:
            return f"not UTF-8 text ({e})", None
        except RecursionError:
            return "JSON nested too deeply to read (more than ~1,000 levels of [ or {)", None
        except ValueError as e:
            hint = ""
            if raw.lstrip().startswith(b"["):
                hint = " (this looks like a JSON array: write one JSON object per line instead)"
            return f"not valid JSON ({e}){hint}", None
        if not isinstance(row, dict):
            return f"expected a JSON object, got {type(row).__name__}", None
        texts = {}
        for key in self.json_keys:
            if key not in row:
                present = ", ".join(repr(k) for k in row) or "none"
                return f"missing key {key!r} (keys present: {present})", None
            value = row[key]
            if isinstance(value, str):
                texts[key] = [value]
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                texts[key] = value
            else:
                kind = "null" if value is None else type(value).__name__
                return f"key {key!r} holds {kind}, expected a string (or a list of strings)", None
        chars = sum(len(t) for parts in texts.values() for t in parts)
        if chars > self.max_document_chars:
            return (f"document of {chars:,} characters is over --max-document-chars={self.max_document_chars:,} "
                    f"(tokenizing takes ~200 bytes a character): split it into several lines, or raise "
                    f"--max-document-chars"), None
        return None, texts

    def __call__(self, lines: Sequence[bytes]) -> list[tuple]:
        parsed = [self._texts(raw) for raw in lines]
        flat = [s for reason, texts in parsed if reason is None for key in self.json_keys for s in texts[key]]
        encoded = iter(self.tokenizer.encode_batch(flat) if flat else [])
        out = []
        for reason, texts in parsed:
            if reason is not None:
                out.append((reason, None))
                continue
            doc = {}
            for key in self.json_keys:
                seqs = [ids for ids in (next(encoded) for _ in texts[key]) if len(ids) > 0]
                if seqs and self.append_eod:
                    seqs[-1] = list(seqs[-1]) + [self.eod]
                lengths = [len(s) for s in seqs]
                tokens = np.array([t for s in seqs for t in s], dtype=np.int64)
                doc[key] = (tokens, lengths)
            out.append((None, doc))
        return out


_worker_encoder: Optional[_Encoder] = None  # set once per pool worker process by _init_worker


def _init_worker(tokenizer_source, json_keys, append_eod, max_document_chars) -> None:
    """Pool initializer: load the tokenizer once in this worker process."""
    global _worker_encoder
    tok = load_tokenizer(tokenizer_source) if isinstance(tokenizer_source, (str, os.PathLike)) else tokenizer_source
    _worker_encoder = _Encoder(tok, json_keys, append_eod, max_document_chars)


def _encode_in_worker(lines: Sequence[bytes]) -> list[tuple]:
    return _worker_encoder(lines)


# -- reading -------------------------------------------------------------------------------------

def _read_chunks(files: Sequence[Path], chunk_lines: int, counters: dict, max_bytes: int,
                 chunk_bytes: int = 4 << 20, columns: Optional[Sequence[str]] = None) -> Iterator[tuple[list, list]]:
    """Yield ``(positions, lines)``: up to ``chunk_lines`` raw non-blank lines (fewer once they reach
    ``chunk_bytes``) and their ``(file, line)``; a line over ``max_bytes`` comes as its reason (a str)."""
    positions: list[tuple[str, int]] = []
    lines: list = []
    size = 0
    for path in files:
        for lineno, raw in iter_records(path, max_bytes, columns=columns):
            if isinstance(raw, bytes) and not raw.strip():
                counters["blank_lines"] += 1
                continue
            positions.append((str(path), lineno))
            lines.append(raw)
            size += len(raw)
            if len(lines) >= chunk_lines or size >= chunk_bytes:
                yield positions, lines
                positions, lines, size = [], [], 0
    if lines:
        yield positions, lines


# -- the stage -------------------------------------------------------------------------------------

def _resolve_dtype(dtype, vocab_size: int, tokenizer_name: str):
    if dtype is None:
        return np.dtype(dtype_for_vocab(vocab_size))
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DataError(f"dtype {dtype!r} is not known; use uint16 (vocabularies up to 65,536) or int32") from None
    dtype_code(dt)
    if dt.kind not in "iu":
        raise DataError(f"dtype {dt.name} cannot hold token ids; use uint16 or int32")
    if vocab_size - 1 > np.iinfo(dt).max:
        raise DataError(f"dtype {dt.name} holds ids up to {np.iinfo(dt).max} but the tokenizer {tokenizer_name} has "
                        f"a vocabulary of {vocab_size}; use {np.dtype(dtype_for_vocab(vocab_size)).name} "
                        f"(or leave the dtype unset)")
    return dt


def preprocess(inputs: Sequence[str | os.PathLike] | str | os.PathLike, output_prefix: str | os.PathLike,
               tokenizer, json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               on_bad_line: str = "stop", dtype=None, log: Callable[..., None] = print,
               chunk_lines: int = 256, overwrite: bool = False,
               max_document_chars: int = MAX_DOCUMENT_CHARS, files_filter: Optional[str] = None,
               log_interval: Optional[int] = None) -> dict:
    """Tokenize JSON-lines files into Megatron indexed datasets, one per JSON key.

    Args:
        inputs: files, folders or globs (see :func:`lmforge.data.files.expand_inputs`): JSON lines
            (``.jsonl``, ``.json`` or any other name; ``.gz`` / ``.zst`` compressed), Parquet (``.parquet``,
            columns = ``json_keys``), FASTA (``.fasta``, ``.fa``, ...: one document per record, the sequence
            under the key ``text``, the header under ``id`` / ``description``); read in order.
        output_prefix: outputs are ``{output_prefix}_{key}_document.bin`` and ``.idx``.
        tokenizer: a tokenizer path (anything :func:`lmforge.data.tokenizers.load_tokenizer` reads) or a
            loaded tokenizer (e.g. from :func:`lmforge.data.tokenizers.open_tokenizer`).
        json_keys: the keys of each line to tokenize (each gives its own dataset).
        append_eod: append the tokenizer's end-of-document id to each non-empty document.
        workers: tokenizer processes; ``> 1`` uses a process pool (same bytes as 1).
        on_bad_line: ``"stop"`` raises DataError at the first malformed line or missing key;
            ``"skip"`` skips such lines, counts them and reports them in the summary and once at the end.
        dtype: token dtype of the .bin (default: uint16 below 65,500 ids, else int32).
        log: where progress and the final report go (``print`` by default).
        chunk_lines: lines per unit of work (fewer when they hold over 4 MiB).
        overwrite: replace existing outputs; without it an existing ``.bin`` or ``.idx`` is refused.
        max_document_chars: a line whose texts hold more characters is a bad line (see ``on_bad_line``).
        files_filter: with a folder among ``inputs``, only its files whose path inside it matches this glob.
        log_interval: also log progress every this many documents (default: every 30 s only).

    Returns:
        a summary: documents, tokens, skipped_lines, skipped (first messages), blank_lines,
        outputs (per key: prefix, bin, idx), dtype, vocab_size, workers, seconds.

    Raises:
        DataError: a missing or unreadable input or tokenizer, a truncated .gz, a bad line (with
            ``on_bad_line="stop"``), an empty corpus, a dtype too small for the vocabulary, an output
            that exists (without ``overwrite``) or cannot be written. Nothing is written in that case.
    """
    t0 = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not list(inputs):
        raise DataError("preprocess needs at least one input file (--input)")
    files = expand_inputs(inputs, files_filter=files_filter)
    max_document_chars = check_max_document_chars(max_document_chars)
    if isinstance(json_keys, str):
        json_keys = (json_keys,)
    json_keys = tuple(json_keys)
    if not json_keys or not all(isinstance(k, str) and k for k in json_keys):
        raise ConfigError(f"json_keys={json_keys!r}: give one or more key names, e.g. text")
    if on_bad_line not in ("stop", "skip"):
        raise ConfigError(f"on_bad_line={on_bad_line!r} is not known; use 'stop' or 'skip'")
    if int(workers) < 1:
        raise ConfigError(f"workers={workers} must be at least 1")
    workers = int(workers)
    if log_interval is not None and int(log_interval) < 1:
        raise ConfigError(f"log_interval={log_interval} must be at least 1 document")
    if int(chunk_lines) < 1:
        raise ConfigError(f"chunk_lines={chunk_lines} must be at least 1")
    output_prefix = os.fspath(output_prefix)
    if Path(output_prefix).is_dir():
        raise DataError(f"output prefix {output_prefix} is a folder; give a path prefix inside it, "
                        f"e.g. {os.path.join(output_prefix, 'corpus')}")
    check_output_location(output_prefix, "--output-prefix")

    if isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(tokenizer)
        tokenizer_source = os.fspath(tokenizer)
    else:
        tok = tokenizer
        tokenizer_source = tok  # reaches the workers as it is (forked), or pickled
    tokenizer_name = str(getattr(tok, "source", None) or type(tok).__name__)
    vocab_size = int(tok.vocab_size)
    dt = _resolve_dtype(dtype, vocab_size, tokenizer_name)
    if append_eod and tok.eod_id is None:
        raise DataError(f"append_eod is set but the tokenizer {tokenizer_name} has no end-of-document token "
                        f"(no eos_token in tokenizer_config.json and none of <|endoftext|>, </s>, <|end_of_text|>, "
                        f"<eos>); drop --append-eod or use a tokenizer with one")

    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    for prefix in prefixes.values():
        for path in (data_file_path(prefix), index_file_path(prefix)):
            if path.is_dir() or (path.exists() and not overwrite):
                what = "is a folder" if path.is_dir() else "exists"
                raise DataError(f"{path} {what}; pass --overwrite to replace it, or choose another --output-prefix")
    counters = {"blank_lines": 0}
    skipped: list[str] = []
    n_skipped = 0
    documents = 0
    tokens = {key: 0 for key in json_keys}
    builders: dict[str, IndexedDatasetBuilder] = {}
    log(f"preprocess: {len(files)} file(s) -> {output_prefix}_{{{','.join(json_keys)}}}_document "
        f"({workers} worker(s), dtype {dt.name})")

    def handle(positions, results) -> None:
        nonlocal n_skipped, documents
        for (fname, lineno), (reason, doc) in zip(positions, results):
            if reason is not None:
                message = f"{fname}:{lineno}: {reason}"
                if on_bad_line == "stop":
                    raise DataError(message + " (pass --skip-bad-lines / on_bad_line='skip' to skip such lines)")
                n_skipped += 1
                if len(skipped) < MAX_REPORTED:
                    skipped.append(message)
                continue
            for key in json_keys:
                ids, lengths = doc[key]
                builders[key].add_document(ids, lengths)
                tokens[key] += int(ids.size)
            documents += 1

    created: list[Path] = []
    try:
        created = make_parents(output_prefix)
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(prefix, dt)
            for stale in builders[key].removed_temporaries:
                log(f"preprocess: removed {stale}, left by an interrupted run")
        chunks = _read_chunks(files, int(chunk_lines), counters, max_line_bytes(max_document_chars),
                              columns=json_keys)
        last_log = time.monotonic()
        logged_docs = 0

        def progress() -> None:
            nonlocal last_log, logged_docs
            due = log_interval is not None and documents - logged_docs >= int(log_interval)
            if due or time.monotonic() - last_log > 30:
                last_log, logged_docs = time.monotonic(), documents
                log(f"  {documents} documents, {sum(tokens.values())} tokens")

        if workers == 1:
            encoder = _Encoder(tok, json_keys, append_eod, max_document_chars)
            for positions, lines in chunks:
                handle(positions, encoder(lines))
                progress()
        else:
            import multiprocessing

            ctx = multiprocessing.get_context()
            with ctx.Pool(workers, initializer=_init_worker,
                          initargs=(tokenizer_source, json_keys, append_eod, max_document_chars)) as pool:
                pending: deque = deque()
                for positions, lines in chunks:
                    pending.append((positions, pool.apply_async(_encode_in_worker, (lines,))))
                    if len(pending) >= 2 * workers + 2:  # bounded: the reader never runs far ahead
                        p, result = pending.popleft()
                        handle(p, result.get())
                    progress()
                while pending:
                    p, result = pending.popleft()
                    handle(p, result.get())
                    progress()
        total = sum(tokens.values())
        if documents == 0 or total == 0:
            what = "no documents" if documents == 0 else f"{documents} documents but no tokens"
            extra = f"; {n_skipped} bad line(s) skipped, first: {skipped[0]}" if n_skipped else ""
            raise DataError(f"empty corpus: {what} in {', '.join(map(str, files))}{extra}")
        for b in builders.values():
            b.finalize()
    except BaseException as e:
        for b in builders.values():
            b.abort()
        remove_empty(created)
        if isinstance(e, OSError):  # a full disk, a folder made read-only meanwhile: name it, keep no traceback
            where = e.filename or Path(output_prefix).parent
            raise DataError(f"cannot write the outputs of --output-prefix {output_prefix} ({where}): "
                            f"{e.strerror or e}; free space or choose another location") from e
        raise

    seconds = time.perf_counter() - t0
    if n_skipped:
        log(f"preprocess: skipped {n_skipped} bad line(s); first: {skipped[0]}")
    summary = {
        "documents": documents,
        "tokens": sum(tokens.values()),
        "tokens_per_key": dict(tokens),
        "skipped_lines": n_skipped,
        "skipped": skipped,
        "blank_lines": counters["blank_lines"],
        "outputs": {key: {"prefix": p, "bin": str(data_file_path(p)), "idx": str(index_file_path(p))}
                    for key, p in prefixes.items()},
        "dtype": dt.name,
        "vocab_size": vocab_size,
        "append_eod": bool(append_eod),
        "workers": workers,
        "seconds": round(seconds, 3),
    }
    log(f"preprocess: {documents} documents, {summary['tokens']} tokens in {seconds:.1f} s -> "
        f"{', '.join(prefixes.values())}")
    return summary
