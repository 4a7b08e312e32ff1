"""Task data: local files in the Hugging Face dataset's own field layout, the Hub, and a prefetch cache.

Where a task's records come from, first match wins:

1. ``--task-data task=PATH``: a JSONL file, a Parquet file, or a folder written by
   ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder: the task's split is taken).
2. ``CACHE/tasks/<task>`` written by :func:`prefetch` (``lmforge prefetch``) on a machine with a network.
3. The Hugging Face Hub through ``datasets.load_dataset`` (needs a network).

Before a model loads (and before torch is imported), :func:`check_hub_access` finds the tasks that need
the Hub and, when it cannot be reached (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, or no connection to
``HF_ENDPOINT`` within a second), stops with one line naming them and the ``lmforge prefetch`` command
that fills a cache, instead of the datasets library's half a minute of retries.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from lmforge.data.jsonl import iter_jsonl
from lmforge.errors import DataError, UserError
from lmforge.eval.tasks import Task, get_task

__all__ = ["read_records", "load_task_records", "check_fields", "prefetch", "default_cache_dir", "parse_task_data",
           "split_tasks", "builtin_task_data", "resolve_tasks", "hub_unreachable", "check_hub_access", "HubUnreachableError"]

HUB_TIMEOUT_S = 1.0  # a connection to the Hub's host (DNS included) that takes longer counts as no network
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub and datasets read as "set"


class HubUnreachableError(UserError):
    """Task data or a model must come from the Hugging Face Hub, and the Hub cannot be reached."""


def default_cache_dir() -> Path:
    """``$LMFORGE_CACHE`` or ``~/.cache/lmforge``."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def parse_task_data(items: Sequence[str]) -> dict[str, str]:
    """``["hellaswag=path.jsonl", ...]`` -> ``{"hellaswag": "path.jsonl"}`` (names are checked by :func:`resolve_tasks`)."""
    out = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--task-data takes TASK=PATH (e.g. hellaswag=val.jsonl), got {item!r}")
        out[name] = path
    return out


def split_tasks(tasks: Sequence[str]) -> tuple[list[Task], list[str]]:
    """(lmforge's own :class:`Task` objects, the other names) of ``tasks``, without lm_eval."""
    from lmforge.eval.tasks import UnknownTaskError

    if not tasks:
        raise UserError("no tasks given; pass --tasks (e.g. --tasks hellaswag,piqa)")
    builtin, other = [], []
    for name in tasks:
        try:
            builtin.append(get_task(name))
        except UnknownTaskError:
            other.append(name)
    return builtin, other


def builtin_task_data(task_data: Optional[Mapping[str, str]]) -> dict[str, str]:
    """The entries of ``task_data`` that name lmforge's own tasks, keyed by task name (aliases resolved)."""
    names = {}
    for key, value in (task_data or {}).items():
        found, _ = split_tasks([key])
        if found:
            names[found[0].name] = value
    return names


def resolve_tasks(tasks: Sequence[str], task_data: Optional[Mapping[str, str]] = None,
                  include_path: Optional[str] = None) -> tuple[list[Task], dict[str, str], list[str]]:
    """Split task names into lmforge's own tasks (the eight built in, user .yaml files: the fast path) and
    lm-evaluation-harness tasks (any other name lm_eval knows, ``include_path``'s YAML tasks too).

    Returns:
        (built-in :class:`Task` objects, ``task_data`` keyed by task name, harness task names). Unknown names
        (with the closest known ones) and ``task_data`` for a task not asked for fail here, before any data or
        model is read; lm_eval is imported only when a name is not lmforge's.
    """
    from lmforge.eval.tasks import UnknownTaskError, known_tasks

    builtin, other = split_tasks(tasks)
    harness = []
    if other:
        try:
            from lmforge.eval.harness import harness_task_names
        except ImportError as e:
            raise UnknownTaskError(f"unknown task {other[0]!r}; known tasks: {', '.join(known_tasks())} (or a user "
                                   f"task's .yaml file); lm-evaluation-harness tasks need lm_eval ({e}; pip install "
                                   f"'lmforge[eval]')") from None
        harness = harness_task_names(other, include_path, builtin=known_tasks())
    by_name = {}
    for key, value in (task_data or {}).items():
        if key in harness:
            raise UserError(f"--task-data {key}=...: {key} is an lm-evaluation-harness task, which reads the dataset "
                            f"its YAML names (dataset_path, dataset_kwargs); --task-data is for the built-in tasks")
        by_name[get_task(key).name] = value
    extra = set(by_name) - {t.name for t in builtin}
    if extra:
        raise UserError(f"--task-data names {sorted(extra)}, which are not among --tasks")
    return builtin, by_name, harness


def hub_endpoint() -> str:
    """The Hub's address: ``$HF_ENDPOINT`` or https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def _offline_variable() -> Optional[str]:
    """The variable that puts the datasets library offline, as it reads them (HF_DATASETS_OFFLINE wins)."""
    value = os.environ.get("HF_DATASETS_OFFLINE")
    if value is not None:
        return f"HF_DATASETS_OFFLINE={value}" if value.strip().upper() in _TRUE else None
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return f"HF_HUB_OFFLINE={value}" if value.strip().upper() in _TRUE else None


def _connects(host: str, port: int, timeout: float) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` seconds, name lookup included
    (a thread bounds the lookup, which ``socket`` timeouts do not cover)."""
    opened = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached from this machine, or None when it can.

    Offline when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` say so, or when no TCP connection to the
    endpoint's host (or to the HTTPS proxy in front of it) opens within ``timeout`` seconds.
    """
    variable = _offline_variable()
    if variable:
        return f"{variable} is set"
    url = urllib.parse.urlsplit(hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        where, host, port = f"the proxy {proxy}", p.hostname or "", p.port or 80
    else:
        where = hub_endpoint()
    if not host or not _connects(host, port, timeout):
        return f"no connection to {where} within {timeout:g} s"
    return None


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _hub_copy(repo: str, hub_cache: Path) -> bool:
    """Whether the datasets library's cache in ``hub_cache`` holds a copy of ``repo`` (``owner___name`` folders)."""
    owner, _, name = repo.rpartition("/")
    if not hub_cache.is_dir():
        return False
    for d in hub_cache.iterdir():
        d_owner, sep, d_name = d.name.rpartition("___")
        if d.is_dir() and (d_owner if sep else "") == owner and _squash(d_name) == _squash(name):
            return True
    return False


def _needs_hub(task: Task, path, cache_dir) -> bool:
    """Whether :func:`load_task_records` would go to the Hub for ``task`` (no file, no prefetched or cached copy)."""
    if path or task.data_file or task.hub is None:
        return False
    if cache_dir is not None and ((Path(cache_dir) / "tasks" / task.name).is_dir()
                                  or _hub_copy(task.hub[0], Path(cache_dir) / "hub")):
        return False
    return True


def check_hub_access(tasks: Sequence[Task], task_data: Optional[Mapping[str, str]] = None,
                     cache_dir: Optional[str | os.PathLike] = None, also: Sequence[str] = ()) -> None:
    """Stop before any model loads when tasks need the Hub and it cannot be reached.

    ``also``: other task names (lm-evaluation-harness tasks, not yet looked up) that join the prefetch command.

    Raises:
        HubUnreachableError: one line naming the tasks and the ``lmforge prefetch --tasks ... --cache ...``
            command to run on a machine with a network.
    """
    task_data = task_data or {}
    need = [t for t in tasks if _needs_hub(t, task_data.get(t.name), cache_dir)]
    if not need:
        return
    reason = hub_unreachable()
    if reason is None:
        return
    names = ",".join(t.name for t in need)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    noun = "task" if len(need) == 1 else "tasks"
    raise HubUnreachableError(
        f"{noun} {names} need{'s' if len(need) == 1 else ''} {', '.join(t.hub[0] for t in need)} from the Hugging "
        f"Face Hub, which cannot be reached here ({reason}): on a machine with a network run `lmforge prefetch "
        f"--tasks {','.join([names, *also])} --cache {cache}`, then evaluate with --cache {cache} (or pass "
        f"--task-data {need[0].name}=PATH)")


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
                        f"({type(e).__name__}: {str(e)[:200]}). For a machine without a network run "
                        f"`lmforge prefetch --tasks {task.name} --cache {cache_dir or default_cache_dir()}` on a "
                        f"login node first, or pass --task-data {task.name}=PATH") from None
    return [dict(r) for r in ds]


def prefetch(tasks: Iterable[str] = (), models: Iterable[str] = (),
             cache_dir: Optional[str | os.PathLike] = None, include_path: Optional[str] = None) -> dict[str, str]:
    """Download task datasets and models into ``cache_dir`` for machines without a network.

    Built-in tasks are saved as ``CACHE/tasks/<task>``, lm-evaluation-harness tasks' datasets go to the datasets
    cache ``CACHE/hub`` (both read by ``lmforge evaluate --cache CACHE``); models and
    tokenizers (Hub repository names) as ``CACHE/models/<owner>--<name>``, a folder to pass as MODEL.
    ``include_path``: a folder of lm_eval task YAML files whose tasks ``tasks`` may name.

    Returns:
        what was written: name -> folder.

    Raises:
        HubUnreachableError: the Hub cannot be reached (checked first, in a second at most).
        UserError: a download failed (one line naming the repository).
    """
    tasks, models = list(tasks), list(models)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    resolved, _, harness = resolve_tasks(tasks, include_path=include_path) if tasks else ([], {}, [])  # unknown names fail before any download
    for task in resolved:
        if task.hub is None:
            raise UserError(f"task {task.name} has no Hub dataset to prefetch")
    reason = hub_unreachable() if tasks or models else None
    if reason:
        command = " ".join(["lmforge prefetch"] + ([f"--tasks {','.join(tasks)}"] if tasks else [])
                           + ([f"--include-path {include_path}"] if include_path and harness else [])
                           + ([f"--models {','.join(models)}"] if models else []) + [f"--cache {cache}"])
        raise HubUnreachableError(f"prefetch downloads from the Hugging Face Hub, which cannot be reached here "
                                  f"({reason}): run `{command}` on a machine with a network (a login node) and "
                                  f"give the compute nodes that folder")
    written: dict[str, str] = {}
    for task in resolved:
        from lmforge.io import atomic_path

        repo, config, split = task.hub
        try:
            import datasets

            ds = datasets.load_dataset(repo, config, split=split, cache_dir=str(cache / "hub"))
        except Exception as e:  # noqa: BLE001 - offline, gated, renamed: one line, not the library's traceback
            raise UserError(f"prefetch: could not download {repo} ({config}, {split}) for task {task.name} "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
        target = cache / "tasks" / task.name
        with atomic_path(target) as tmp:
            ds.save_to_disk(str(tmp))
        written[task.name] = str(target)
    if harness:  # lm_eval's tasks read their datasets when built: into CACHE/hub, where evaluate --cache looks
        from lmforge.eval.harness import load_harness_tasks

        load_harness_tasks(harness, include_path, cache_dir=str(cache))
        for name in harness:
            written[name] = str(cache / "hub")
    for repo in models:
        target = cache / "models" / repo.replace("/", "--")
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(repo_id=repo, local_dir=str(target))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"prefetch: could not download the model {repo} ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
        written[repo] = str(target)
    return written
