"""Task data: local files in the Hugging Face dataset's own field layout, the Hub, and a prefetch cache.

Where a task's records come from, first match wins:

1. ``--task-data task=PATH``: a JSONL file, a Parquet file, or a folder written by
   ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder: the task's split is taken).
2. ``CACHE/tasks/<task>`` written by :func:`prefetch` (``lmforge prefetch``) on a machine with a network.
3. The Hugging Face Hub through ``datasets.load_dataset`` (needs a network).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from lmforge.data.jsonl import iter_jsonl
from lmforge.errors import DataError, UserError
from lmforge.eval.tasks import Task, get_task

__all__ = ["read_records", "load_task_records", "check_fields", "prefetch", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$LMFORGE_CACHE`` or ``~/.cache/lmforge``."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def read_records(path: str | os.PathLike, split: Optional[str] = None) -> list[dict]:
    """Records of a JSONL file, a Parquet file or a ``save_to_disk`` folder.

    Raises:
        DataError: a missing or empty file, a line that is not a JSON object, a folder that is no dataset.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"task data {path} does not exist")
    if path.is_dir():
        records = _read_saved_dataset(path, split)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    else:
        records = [record for _, record in iter_jsonl(path)]
    if not records:
        raise DataError(f"task data {path} is empty")
    return records


def _read_saved_dataset(path: Path, split: Optional[str]) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split in ds:
            ds = ds[split]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path} holds the splits {sorted(ds)}, not {split!r}")
    return [dict(r) for r in ds]


def check_fields(task: Task, records: Sequence[dict], source: str) -> None:
    """Raise a DataError naming the first field the task reads that a record lacks."""
    for n, record in enumerate(records, 1):
        for name in task.fields:
            if name not in record:
                raise DataError(f"{source}: record {n} has no field {name!r}; task {task.name} expects records like "
                                f"{task.layout} (the Hugging Face dataset's field names)")


def load_task_records(task: Task, path: Optional[str | os.PathLike] = None, limit: Optional[int] = None,
                      cache_dir: Optional[str | os.PathLike] = None) -> list[dict]:
    """The task's evaluation records (the first ``limit`` of them), checked for the fields it reads."""
    split = task.hub[2] if task.hub else None
    path = path or task.data_file
    if path is None and cache_dir is not None and (Path(cache_dir) / "tasks" / task.name).is_dir():
        path = Path(cache_dir) / "tasks" / task.name
    if path is not None:
        records, source = read_records(path, split), str(path)
    elif task.hub is not None:
        records, source = _from_hub(task, cache_dir), f"{task.hub[0]} ({task.hub[2]} split)"
    else:
        raise DataError(f"task {task.name} has no data: pass --task-data {task.name}=PATH")
    if limit is not None:
        records = records[:limit]
    check_fields(task, records, source)
    return records


def _from_hub(task: Task, cache_dir: Optional[str | os.PathLike] = None):
    import datasets

    repo, name, split = task.hub
    try:
        ds = datasets.load_dataset(repo, name, split=split,
                                   cache_dir=str(Path(cache_dir) / "hub") if cache_dir else None)
    except Exception as e:  # offline, gated, renamed: the user's fix is the same
        raise UserError(f"task {task.name}: could not load {repo} ({name}, {split}) from the Hugging Face Hub "
                        f"({type(e).__name__}: {str(e)[:200]}). On a machine without a network run "
                        f"`lmforge prefetch --tasks {task.name}` on a login node first, or pass "
                        f"--task-data {task.name}=PATH") from None
    return [dict(r) for r in ds]


def prefetch(tasks: Iterable[str] = (), models: Iterable[str] = (),
             cache_dir: Optional[str | os.PathLike] = None) -> dict[str, str]:
    """Download task datasets and models into ``cache_dir`` for machines without a network.

    Tasks are saved as ``CACHE/tasks/<task>`` (read by ``lmforge evaluate --cache CACHE``); models and
    tokenizers (Hub repository names) as ``CACHE/models/<owner>--<name>``, a folder to pass as MODEL.

    Returns:
        what was written: name -> folder.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    written: dict[str, str] = {}
    for name in tasks:
        task = get_task(name)
        if task.hub is None:
            raise UserError(f"task {name} has no Hub dataset to prefetch")
        from lmforge.io import atomic_path
        import datasets

        repo, config, split = task.hub
        ds = datasets.load_dataset(repo, config, split=split, cache_dir=str(cache / "hub"))
        target = cache / "tasks" / task.name
        with atomic_path(target) as tmp:
            ds.save_to_disk(str(tmp))
        written[task.name] = str(target)
    for repo in models:
        from huggingface_hub import snapshot_download

        target = cache / "models" / repo.replace("/", "--")
        snapshot_download(repo_id=repo, local_dir=str(target))
        written[repo] = str(target)
    return written
