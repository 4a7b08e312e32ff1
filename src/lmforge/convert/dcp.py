"""Read a torch.distributed.checkpoint (DCP) folder without unpickling anything a user did not write.

NeMo's ``dist_ckpt_format: torch_dist`` (megatron.core dist_checkpointing) stores the weights as a DCP
folder: ``.metadata`` (a Python pickle of ``torch.distributed.checkpoint.metadata.Metadata``) and data
files (``__0_0.distcp``, ...). Each tensor item in a data file is one ``torch.save`` of one chunk, found
at ``storage_data[index].offset`` / ``.length``; each chunk has its offsets and sizes inside the global
tensor in ``state_dict_metadata[fqn].chunks``.

Safety:
    ``.metadata`` is read by :class:`_MetadataUnpickler`, whose ``find_class`` resolves only an explicit
    allowlist (the dataclasses and enums of DCP's metadata, filesystem and planner modules, torch.Size,
    torch dtypes and layouts, plain containers); any other global raises :class:`CheckpointError` naming
    the class and the file, before anything is called. Data items are read with
    ``torch.load(weights_only=True)`` only. Byte items (``BytesStorageMetadata``: megatron's
    ``_extra_state`` objects) are never read.
"""

from __future__ import annotations

import io
import math
import pickle
import posixpath
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional

import torch

from lmforge.errors import CheckpointError

__all__ = ["DcpCheckpoint", "load_metadata"]

_MD = "torch.distributed.checkpoint.metadata"
_OLD_MD = "torch.distributed._shard.sharded_tensor.metadata"  # TensorProperties before torch 2.2
_ALLOWED = {
    _MD: ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
          "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta"),
    _OLD_MD: ("TensorProperties", "MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "_StoragePrefix"),
    # megatron.core stores every rank's save plan in the metadata (``all_local_plans``)
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"),
    "collections": ("OrderedDict",),
    "builtins": ("set", "frozenset", "dict", "list", "tuple", "int", "float", "bool", "str", "bytes", "bytearray",
                 "complex"),
}


class _Inert:
    """Stands for megatron.core's metadata dummy classes: attributes only, no behaviour."""


def _as_text_path(*parts) -> str:
    return posixpath.join(*(str(p) for p in parts)) if parts else ""


def _layout(name: str) -> torch.layout:
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return value


_SUBSTITUTES = {
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"): _Inert,
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): _Inert,
    ("torch.serialization", "_get_layout"): _layout,
    **{("pathlib", n): _as_text_path for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _SUBSTITUTES:
            return _SUBSTITUTES[(module, name)]
        if module == "torch":
            value = getattr(torch, name, None)
            if name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        elif name in _ALLOWED.get(module, ()):
            import importlib

            found = getattr(importlib.import_module(module), name, None)
            if found is not None:
                return found
        raise CheckpointError(f"{self.where} refers to {module}.{name}, which is not a torch.distributed.checkpoint "
                              f"metadata class; lmforge reads this pickle with an allowlist and does not load other "
                              f"objects (unpickling them could run code). Re-save the checkpoint with NeMo or "
                              f"megatron.core, or export the model to HF format")


def load_metadata(data: bytes, where: str):
    """The ``Metadata`` of a DCP ``.metadata`` file, unpickled through the allowlist (see the module doc)."""
    try:
        md = _MetadataUnpickler(data, where).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where} is not a readable torch.distributed.checkpoint index ({type(e).__name__}: "
                              f"{e}); was the copy interrupted?") from None
    if not all(isinstance(getattr(md, name, None), dict) for name in ("state_dict_metadata", "storage_data")):
        raise CheckpointError(f"{where} does not hold torch.distributed.checkpoint Metadata "
                              f"(no state_dict_metadata/storage_data)")
    return md


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: str
    offset: int
    length: int


@dataclass
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[_Chunk]


class DcpCheckpoint:
    """The tensors of a DCP folder, reassembled from their chunks on demand.

    Args:
        read: returns the bytes of a file of the folder (``.metadata``).
        open_file: returns a seekable binary file of the folder (data files); None if it is absent.
        where: the folder, for messages.
    """

    def __init__(self, read: Callable[[str], bytes], open_file: Callable[[str], Optional[BinaryIO]], where: str):
        self.where = where
        self._open = open_file
        md = load_metadata(read(".metadata"), f"{where}/.metadata")
        storage = {}
        for index, info in md.storage_data.items():
            fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{where}/.metadata: item {fqn!r} is stored with transforms "
                                      f"{list(info.transform_descriptors)} (e.g. compression), which lmforge does not read")
            storage[(fqn, None if offset is None else tuple(offset))] = info
        self.entries: dict[str, _Entry] = {}
        self.skipped: list[str] = []  # byte items (megatron _extra_state objects): never read
        for fqn, item in md.state_dict_metadata.items():
            if not hasattr(item, "chunks"):
                self.skipped.append(fqn)
                continue
            chunks = []
            for c in item.chunks:
                info = storage.get((fqn, tuple(c.offsets)))
                if info is None:
                    raise CheckpointError(f"{where}/.metadata: chunk {tuple(c.offsets)} of {fqn!r} has no storage entry; "
                                          f"the index is damaged")
                chunks.append(_Chunk(tuple(c.offsets), tuple(c.sizes), str(info.relative_path), int(info.offset),
                                     int(info.length)))
            dtype = item.properties.dtype
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"{where}/.metadata: tensor {fqn!r} has no dtype")
            self.entries[fqn] = _Entry(tuple(item.size), dtype, chunks)

    def total_bytes(self) -> int:
        return sum(math.prod(e.shape) * e.dtype.itemsize for e in self.entries.values())

    def _read_chunk(self, fqn: str, chunk: _Chunk) -> torch.Tensor:
        f = self._open(chunk.path)
        if f is None:
            raise CheckpointError(f"{self.where}/{chunk.path} is missing (it holds part of {fqn!r}); was the copy "
                                  f"interrupted?")
        with f:
            f.seek(chunk.offset)
            data = f.read(chunk.length)
        if len(data) != chunk.length:
            raise CheckpointError(f"{self.where}/{chunk.path} ends before the item of {fqn!r} at byte {chunk.offset}; "
                                  f"the file is truncated")
        try:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{self.where}/{chunk.path}: the item of {fqn!r} cannot be loaded with "
                                  f"torch.load(weights_only=True) ({e}); lmforge does not unpickle arbitrary "
                                  f"objects") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != chunk.sizes:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(f"{self.where}/{chunk.path}: the item of {fqn!r} is {got}, but .metadata says a "
                                  f"chunk of shape {chunk.sizes}; the checkpoint is inconsistent")
        return tensor

    def get(self, fqn: str, index: Optional[int] = None) -> torch.Tensor:
        """The global tensor ``fqn``, or only its slice ``[index]`` along dim 0 (a layer of a stacked tensor).

        Only the chunks that overlap the wanted part are read; CheckpointError if they do not cover it.
        """
        entry = self.entries[fqn]
        shape = entry.shape if index is None else entry.shape[1:]
        out = torch.empty(shape, dtype=entry.dtype)
        covered = torch.zeros(shape, dtype=torch.bool)
        for chunk in entry.chunks:
            if any(o < 0 or o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.shape)):
                raise CheckpointError(f"{self.where}/.metadata: a chunk of {fqn!r} at {chunk.offsets} of size "
                                      f"{chunk.sizes} lies outside the tensor's shape {entry.shape}")
            offsets, sizes = chunk.offsets, chunk.sizes
            if index is not None:
                if not offsets[0] <= index < offsets[0] + sizes[0]:
                    continue
            tensor = self._read_chunk(fqn, chunk).to(entry.dtype)
            if index is not None:
                tensor, offsets, sizes = tensor[index - offsets[0]], offsets[1:], sizes[1:]
            region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            out[region] = tensor
            covered[region] = True
        if not bool(covered.all()):
            what = fqn if index is None else f"{fqn}[{index}]"
            raise CheckpointError(f"{self.where}: the chunks of {what} cover {int(covered.sum())} of {covered.numel()} "
                                  f"elements; a rank's part of the checkpoint is missing")
        return out
