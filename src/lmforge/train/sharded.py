"""Sharded (FSDP) checkpoint I/O: torch.distributed.checkpoint in Hugging Face safetensors form.

A sharded folder (a checkpoint's ``model/``, or its ``training_state/optimizer/``) holds::

    shard-00001-model-00001-of-00001.safetensors     what rank 0 wrote
    shard-00002-model-00001-of-00001.safetensors     what rank 1 wrote, ...
    shards.json                                      {"format", "version", "world_size", "files",
                                                      "tensors": {name: {"shape", "dtype"}}}

Each shard file is plain safetensors written by ``dcp.save`` with a
``HuggingFaceStorageWriter(save_distributed=True)``: a rank's slice of every tensor it owns, and in
the header's ``__metadata__`` the entry ``DCP_SHARDING_INFO`` = ``{name: {"saved_offsets": [...]}}``,
where the slice starts in the full tensor. A replicated (plain) tensor is written once, by one rank;
a rank with nothing to write writes no file. ``shards.json`` is written by rank 0 after every shard
file is complete, so a folder that has it is whole.

Tensors only: nothing is pickled (DCP would pickle any other value into the file as bytes, so
anything but a tensor is refused; the caller keeps such values in JSON).

:func:`save_sharded` and :func:`load_sharded` are collective (every rank calls them; without a
process group they run in one process). Loading reshards: any world size reads what any other wrote.
:func:`read_full` needs no process group, GPU or knowledge of the writing world size: it reads the
headers, then assembles each full tensor from its slices, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from lmforge.errors import CheckpointError
from lmforge.io import write_json_atomic

__all__ = ["save_sharded", "load_sharded", "is_sharded", "read_full", "ShardedFolder", "sharded_folder",
           "MANIFEST_NAME", "MODEL_DIR"]

MANIFEST_NAME = "shards.json"
MODEL_DIR = "model"  # a checkpoint folder's sharded weights
MANIFEST_FORMAT = "lmforge-dcp-safetensors"
MANIFEST_VERSION = 1
# Written by torch's HuggingFaceStorageWriter (torch/distributed/checkpoint/_hf_utils.py); spelled out
# here so no private torch module is imported.
_SHARDING_KEY = "DCP_SHARDING_INFO"
_OFFSETS_KEY = "saved_offsets"
_SHARD_FILE = re.compile(r"^shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _check_state(state_dict: dict, what: str) -> None:
    """Refuse anything but a flat ``{str: tensor}`` dict (DTensors are tensors)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{what}: state_dict must be a dict of name -> tensor, got {type(state_dict).__name__}")
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: state_dict key {name!r} is a {type(name).__name__}, not a str")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: state_dict[{name!r}] is a {type(value).__name__}, not a tensor; sharded "
                            f"checkpoints hold tensors only (nothing is pickled): keep other values in JSON")


@contextlib.contextmanager
def _one_process_quiet():
    """Silence DCP's "torch.distributed is ... uninitialized, assuming ... a single process" warning: one process
    without a process group is a supported use here (reading an FSDP checkpoint onto one device)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield


def _hf_storage():
    """torch's public HuggingFaceStorageWriter / Reader (torch >= 2.8)."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:  # pragma: no cover - older torch
        raise CheckpointError(f"sharded checkpoints need torch.distributed.checkpoint.HuggingFaceStorageWriter "
                              f"(torch >= 2.8); this is torch {torch.__version__}") from None
    return HuggingFaceStorageWriter, HuggingFaceStorageReader


# ---------------------------------------------------------------------------------------------- save / load


def save_sharded(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``state_dict`` into ``folder`` as one safetensors file per rank (collective: every rank calls).

    Args:
        folder: the sharded folder (created when missing; earlier shard files in it are removed).
        state_dict: flat name -> tensor. DTensors (FSDP2 shards) are written as each rank's slice with
            its offsets; plain tensors count as replicated (the same on every rank) and are written once.

    Returns:
        ``folder``. Its ``shards.json`` is written last (rank 0), after every rank's file is complete.

    Raises:
        TypeError: a value is not a tensor, or a key is not a str.
    """
    import torch.distributed.checkpoint as dcp

    folder = _prepare_save(folder, state_dict, "save_sharded")
    writer_cls, _ = _hf_storage()
    with _one_process_quiet():
        dcp.save(state_dict, storage_writer=writer_cls(path=str(folder), save_distributed=True),
                 no_dist=not _distributed())
    # dcp.save returns on every rank after rank 0 gathered every rank's write results: all files exist.
    _write_manifest(folder, _shapes(state_dict))
    _barrier()
    return folder


def save_sharded_async(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], group=None):
    """:func:`save_sharded` with the files written in the background (``dcp.async_save``).

    Every rank calls it. The tensors are staged (copied to CPU memory) before it returns, so training may
    change them at once; the writes and DCP's own collectives run in a thread over ``group`` (a gloo group
    apart from the training one; None without a process group).

    Returns:
        ``wait()``: blocks until this rank's files are written, then rank 0 writes ``shards.json``. Call it on
        every rank before the folder is published (no collective inside).
    """
    import torch.distributed.checkpoint as dcp

    folder = _prepare_save(folder, state_dict, "save_sharded_async")
    writer_cls, _ = _hf_storage()
    shapes = _shapes(state_dict)
    with _one_process_quiet():
        result = dcp.async_save(state_dict, storage_writer=writer_cls(path=str(folder), save_distributed=True),
                                process_group=group, no_dist=not _distributed())
    future = getattr(result, "upload_completion", result)  # torch >= 2.9 may answer an AsyncSaveResponse

    def wait() -> Path:
        future.result()
        _write_manifest(folder, shapes)  # rank 0's future ends after every rank's results were gathered
        return folder

    return wait


def _prepare_save(folder, state_dict: dict, what: str) -> Path:
    """Check ``state_dict``; rank 0 makes ``folder`` and removes an earlier save's manifest and shards (a shard of
    a larger world size would be read back); every rank waits for it."""
    folder = Path(folder)
    _check_state(state_dict, f"{what}({folder})")
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        for path in folder.iterdir():
            if path.name.endswith(".safetensors"):
                path.unlink()
    _barrier()
    return folder


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict:
    return {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in state_dict.items()}


def _write_manifest(folder: Path, tensors: dict) -> None:
    """Rank 0: ``shards.json`` naming the files and every tensor's full shape and dtype (the folder is whole)."""
    if _rank() != 0:
        return
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    write_json_atomic(folder / MANIFEST_NAME, {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "world_size": dist.get_world_size() if _distributed() else 1, "files": files, "tensors": tensors})


def load_sharded(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    """Fill ``state_dict``'s tensors / DTensors in place from ``folder`` (collective: every rank calls).

    Any world size reads what any other wrote (DCP's planner picks the saved slices each local shard
    needs). Keys of the folder that ``state_dict`` lacks are not read. Values are cast to the dtype
    of the given tensors.

    Raises:
        CheckpointError: the folder is missing or damaged, or a key of ``state_dict`` is absent from it
            or has another (global) shape; the message names the folder and the key.
    """
    import torch.distributed.checkpoint as dcp

    source = sharded_folder(folder)
    if source is None:
        raise CheckpointError(f"{folder} is not a sharded checkpoint folder (no {MANIFEST_NAME} or shard-*.safetensors "
                              f"files); was the save interrupted?")
    _check_state(state_dict, f"load_sharded({folder})")
    reader = ShardedFolder(source)
    for name, t in state_dict.items():
        if name not in reader:
            raise CheckpointError(f"sharded checkpoint {source}: tensor {name!r} is missing (the folder holds "
                                  f"{len(reader.keys())} tensors); does the model or optimizer match the checkpoint?")
        if tuple(reader.shape(name)) != tuple(t.shape):
            raise CheckpointError(f"sharded checkpoint {source}: tensor {name!r} has shape {tuple(reader.shape(name))} "
                                  f"but the model expects {tuple(t.shape)}")
    _, reader_cls = _hf_storage()
    try:
        with _one_process_quiet():
            dcp.load(state_dict, storage_reader=reader_cls(str(source)), no_dist=not _distributed())
    except Exception as e:  # DCP wraps every rank's failure in a CheckpointException
        raise CheckpointError(f"sharded checkpoint {source} could not be loaded: {e}") from e


# ---------------------------------------------------------------------------------------------- reading


def sharded_folder(folder: str | os.PathLike) -> Optional[Path]:
    """The sharded folder meant by ``folder`` (itself, or a checkpoint folder's ``model/``), else None."""
    folder = Path(folder)
    for candidate in (folder, folder / MODEL_DIR):
        if not candidate.is_dir():
            continue
        if (candidate / MANIFEST_NAME).is_file() or any(_SHARD_FILE.match(p.name) for p in candidate.iterdir()):
            return candidate
    return None


def is_sharded(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a sharded folder, or a checkpoint folder whose weights are one (``model/``).

    Looks at file names only; :class:`ShardedFolder` checks the files themselves.
    """
    return sharded_folder(folder) is not None


class ShardedFolder:
    """Read-only view of a sharded folder with :class:`lmforge.convert.hf.SafetensorsFolder`'s interface:
    ``keys()``, ``in``, ``shape(name)`` (the full shape), ``get(name)`` (the full tensor), ``folder``,
    ``total_bytes``.

    Opening reads the headers only (memory-mapped ``safe_open``); it checks that the files named by
    ``shards.json`` are there and readable and that the slices of every tensor tile it exactly.

    Raises:
        CheckpointError: a missing, damaged or truncated shard file (named), or slices that do not cover a
            tensor (a shard is missing).
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        manifest = self._manifest()
        if manifest is not None:
            files = list(manifest["files"])
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise CheckpointError(f"sharded checkpoint {self.folder}: {MANIFEST_NAME} names {', '.join(missing[:3])} "
                                      f"but the file(s) are missing; copy the whole folder, or use an earlier checkpoint")
        else:
            files = sorted(p.name for p in self.folder.iterdir() if _SHARD_FILE.match(p.name)) \
                if self.folder.is_dir() else []
            if not files:
                raise CheckpointError(f"{self.folder} holds no shard-*.safetensors files and no {MANIFEST_NAME}; "
                                      f"it is not a sharded checkpoint, or the save was interrupted")
        self._handles = {}
        # name -> [(file, offsets, shape)]
        self._chunks: dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        for f in files:
            path = self.folder / f
            try:
                handle = safe_open(str(path), framework="pt")
                info = json.loads((handle.metadata() or {}).get(_SHARDING_KEY) or "{}")
                if not isinstance(info, dict):
                    raise ValueError(f"{_SHARDING_KEY} is not a JSON object")
                entries = []
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    shape = tuple(int(s) for s in sl.get_shape())
                    offsets = tuple(int(o) for o in (info.get(key) or {}).get(_OFFSETS_KEY, [0] * len(shape)))
                    if len(offsets) != len(shape):
                        raise ValueError(f"tensor {key!r}: {len(offsets)} offsets for {len(shape)} dimensions")
                    entries.append((key, offsets, shape, sl.get_dtype()))
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise CheckpointError(f"shard file {path} cannot be read ({e}); the file is damaged or truncated, "
                                      f"use an earlier checkpoint") from None
            self._handles[f] = handle
            for key, offsets, shape, dtype in entries:
                self._chunks.setdefault(key, []).append((f, offsets, shape))
                self._dtype.setdefault(key, _st_dtype(dtype, path))
        self._shape: dict[str, tuple[int, ...]] = {}
        if manifest is not None:
            order = list(manifest["tensors"])
            for name, meta in manifest["tensors"].items():
                self._shape[name] = tuple(int(s) for s in meta["shape"])
                if name not in self._chunks:
                    raise CheckpointError(f"sharded checkpoint {self.folder}: tensor {name!r} named in {MANIFEST_NAME} "
                                          f"is in no shard file; a shard file is missing or damaged")
        else:
            order = list(self._chunks)
        for name, chunks in self._chunks.items():
            if name not in self._shape:
                ndim = len(chunks[0][2])
                self._shape[name] = tuple(max(o[d] + s[d] for _, o, s in chunks) for d in range(ndim))
            self._check_tiling(name)
        self._order = order + [k for k in self._chunks if k not in set(order)]
        self.total_bytes = sum((self.folder / f).stat().st_size for f in files)
        self.files = files

    def _manifest(self) -> Optional[dict]:
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(data, dict) and isinstance(data.get("files"), list)
                    and isinstance(data.get("tensors"), dict)):
                raise ValueError("it lacks 'files' or 'tensors'")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable shard manifest ({e}); the checkpoint is damaged") from None
        return data

    def _check_tiling(self, name: str) -> None:
        """Every slice lies inside the full tensor and together they hold exactly its elements."""
        full = self._shape[name]
        covered = 0
        for f, offsets, shape in self._chunks[name]:
            if len(shape) != len(full) or any(o + s > n for o, s, n in zip(offsets, shape, full)):
                raise CheckpointError(f"shard file {self.folder / f}: the slice of {name!r} at {list(offsets)} with shape "
                                      f"{list(shape)} lies outside its full shape {list(full)}; the checkpoint is damaged")
            covered += math.prod(shape)
        if covered != math.prod(full):
            raise CheckpointError(f"sharded checkpoint {self.folder}: the slices of {name!r} hold {covered} of its "
                                  f"{math.prod(full)} elements; a shard file is missing or damaged")

    def keys(self) -> list[str]:
        return list(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._chunks

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype[name]

    def get(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` assembled from its slices; CheckpointError naming it (or its file)."""
        if name not in self._chunks:
            raise CheckpointError(f"sharded checkpoint {self.folder}: tensor {name!r} is missing")
        chunks = self._chunks[name]
        full = self._shape[name]
        if len(chunks) == 1 and chunks[0][2] == full:
            return self._read(chunks[0][0], name)
        out = torch.empty(full, dtype=self._dtype[name])
        for f, offsets, shape in chunks:
            if math.prod(shape) == 0:
                continue
            part = self._read(f, name)
            out[tuple(slice(o, o + s) for o, s in zip(offsets, shape))].copy_(part)
        return out

    def _read(self, f: str, name: str) -> torch.Tensor:
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"shard file {self.folder / f}: cannot read tensor {name!r} ({e}); the file is "
                                  f"damaged or truncated") from None


def _st_dtype(name: str, path: Path) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
             "F8_E5M2": getattr(torch, "float8_e5m2", None)}
    dtype = table.get(str(name).upper())
    if dtype is None:
        raise CheckpointError(f"shard file {path}: dtype {name!r} is not supported")
    return dtype


def read_full(folder: str | os.PathLike, names: Optional[Iterable[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, full tensor)`` pairs out of a sharded folder, one tensor in memory at a time.

    No process group, GPU or world size needed. ``folder`` is a sharded folder or a checkpoint folder
    whose ``model/`` is one. ``names``: these tensors in this order (default: all, in saved order).

    Raises (at the call, before the first tensor):
        CheckpointError: not a sharded folder, a missing or damaged shard file (named), or a name of
            ``names`` that is not in the checkpoint.
    """
    source = sharded_folder(folder)
    if source is None:
        raise CheckpointError(f"{folder} is not a sharded checkpoint (no {MANIFEST_NAME} or shard-*.safetensors files, "
                              f"here or in {MODEL_DIR}/)")
    reader = ShardedFolder(source)
    wanted = reader.keys() if names is None else list(names)
    absent = [n for n in wanted if n not in reader]
    if absent:
        raise CheckpointError(f"sharded checkpoint {source}: tensors {absent[:5]} are missing")

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name in wanted:
            yield name, reader.get(name)

    return stream()
