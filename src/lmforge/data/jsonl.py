"""Reading JSONL records with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from lmforge.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a JSONL file.

    Raises:
        DataError: a line that is not valid JSON or not a JSON object, naming ``file:line``.
    """
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: a record must be a JSON object, not {type(record).__name__}")
            yield n, record
