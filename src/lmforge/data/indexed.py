"""The Megatron / NeMo memory-mapped indexed dataset: ``prefix.bin`` + ``prefix.idx``.

Files written here are byte-for-byte what Megatron-LM's ``tools/preprocess_data.py`` writes for the
same token ids, and files written by Megatron or NeMo read back here. The layout
(see ``docs`` / ``shared/notes/megatron_indexed_format.md``):

``prefix.bin``
    no header; the token ids of every sequence, concatenated, in the index's dtype.

``prefix.idx`` (little-endian, no padding)
    ``b"MMIDIDX\\x00\\x00"`` | u64 version = 1 | u8 dtype code | u64 sequence count N |
    u64 document count D | int32 lengths[N] | int64 byte pointers[N] | int64 document_indices[D]
    (| int8 sequence modes[N], multimodal datasets only).

``document_indices`` starts at 0 and gets the running sequence count appended after each
document; without sentence splitting a document is one sequence. An empty document adds no
sequence but still ends a document, so the value repeats.
"""

from __future__ import annotations

import array
import hashlib
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from lmforge.errors import DataError

try:
    import fcntl
except ImportError:  # not on Windows: stale temporaries are then removed without the liveness check
    fcntl = None

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 document count

#: Megatron's numeric code for each token dtype (code 7 is float32 in Megatron-Core).
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: Optional[int]) -> type:
    """The token dtype Megatron picks: ``uint16`` when ``vocab_size < 65500``, else ``int32``."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype) -> int:
    """Megatron's code for ``dtype`` (a numpy dtype, type or name such as ``"uint16"``)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise DataError(f"{dtype!r} is not a numpy dtype; use one of {_dtype_names()}") from e
    if dt not in _CODE_OF:
        raise DataError(f"dtype {dt.name} cannot be stored in a Megatron indexed dataset; use one of {_dtype_names()}")
    return _CODE_OF[dt]


def _dtype_names() -> str:
    return ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())


def data_file_path(prefix: str | os.PathLike) -> Path:
    """``prefix.bin``."""
    return Path(f"{os.fspath(prefix)}.bin")


def index_file_path(prefix: str | os.PathLike) -> Path:
    """``prefix.idx``."""
    return Path(f"{os.fspath(prefix)}.idx")


def exists(prefix: str | os.PathLike) -> bool:
    """True when both ``prefix.bin`` and ``prefix.idx`` exist."""
    return data_file_path(prefix).is_file() and index_file_path(prefix).is_file()


def _pointers(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence in the .bin: exclusive prefix sum of ``lengths * itemsize``."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


def index_bytes(dtype, sequence_lengths: Sequence[int], document_indices: Sequence[int]) -> bytes:
    """The exact bytes of a ``.idx`` file for these lengths and document indices."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    pointers = _pointers(lengths, np.dtype(dtype).itemsize)
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", dtype_code(dtype))
    header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs))
    return header + lengths.tobytes(order="C") + pointers.tobytes(order="C") + docs.tobytes(order="C")


def _temporary(target: Path):
    """A new hidden temporary file beside ``target`` (``.NAME.XXXXXXXX.tmp``), open for writing and locked
    (``flock``) for as long as this process holds it: a temporary nobody holds was left by a killed run."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the published file gets the usual mode (0644)
    return os.fdopen(fd, "wb"), Path(tmp)


def _umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(prefix: str | os.PathLike) -> list[Path]:
    """Remove what killed builds of ``prefix`` left behind; returns the paths removed.

    Only names this module gives its temporaries count: ``.PREFIX.bin.XXXXXXXX.tmp`` and
    ``.PREFIX.idx.XXXXXXXX.tmp`` that no live process holds locked (a running build keeps its own),
    and ``.PREFIX.idx.tmp-XXXXXXXX`` folders of earlier versions. Anything else is left alone.
    """
    removed = []
    for target in (data_file_path(prefix), index_file_path(prefix)):
        if not target.parent.is_dir():
            continue
        name = re.escape(target.name)
        ours = re.compile(rf"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp")
        old_folder = re.compile(rf"\.{name}\.tmp-[A-Za-z0-9_]{{8}}")
        for entry in target.parent.iterdir():
            if ours.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                if _unlink_unless_held(entry):
                    removed.append(entry)
            elif old_folder.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _unlink_unless_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a running build holds it
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class IndexedDatasetBuilder:
    """Write ``prefix.bin`` / ``prefix.idx`` one document at a time.

    Tokens stream into a temporary ``.bin`` beside the target while building (only the sequence
    lengths stay in memory); :meth:`finalize` writes the ``.idx`` to a temporary too, flushes both to
    disk and renames them into place, so neither file appears half-written. Temporaries that a killed
    build left behind are removed when the next builder of the same prefix starts
    (:func:`remove_stale_temporaries`; see :attr:`removed_temporaries`). Use as a context manager to
    have the temporary removed on an exception (and :meth:`finalize` called on a normal exit)::

        with IndexedDatasetBuilder("data/corpus_text_document", np.uint16) as b:
            for ids in documents:
                b.add_document(ids)

    Args:
        prefix: output path without ``.bin`` / ``.idx``.
        dtype: token dtype (numpy dtype or name); see :func:`dtype_for_vocab`.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validates
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        # Compact arrays (4 and 8 bytes an entry): only these stay in memory while building.
        self.sequence_lengths = array.array("i")
        self.document_indices = array.array("q", [0])
        target = data_file_path(self.prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.removed_temporaries = remove_stale_temporaries(self.prefix)
        self._file, self._tmp_bin = _temporary(target)
        self._tmp_idx: Optional[Path] = None
        self._done = False

    # -- building -------------------------------------------------------------------------------
    def add_item(self, tokens: Iterable[int]) -> None:
        """Append one sequence without ending the document (sentence-level datasets)."""
        self._check_open()
        arr = self._as_array(tokens)
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))

    def end_document(self) -> None:
        """End the current document: record the running sequence count in ``document_indices``."""
        self._check_open()
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Iterable[int], lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document and end it.

        Args:
            tokens: the document's token ids. Without ``lengths`` the document is one sequence;
                an empty list adds no sequence but still ends a document (the document index repeats).
            lengths: optional sequence lengths that split ``tokens`` into several sequences
                (sentence-split data); they must sum to ``len(tokens)``.
        """
        self._check_open()
        arr = self._as_array(tokens)
        if lengths is None:
            lengths = [int(arr.size)] if arr.size else []
        else:
            lengths = [int(n) for n in lengths]
            if sum(lengths) != arr.size:
                raise ValueError(f"lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def merge(self, other_prefix: str | os.PathLike) -> None:
        """Append another finished dataset (e.g. a parallel worker's output) to this one."""
        self._check_open()
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise DataError(f"cannot merge {index_file_path(other_prefix)}: its dtype is {other.dtype.name}, "
                            f"this dataset's is {self.dtype.name}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(np.asarray(other.sequence_lengths, dtype=np.int32).tobytes())
        self.document_indices.frombytes((np.asarray(other.document_indices[1:], dtype=np.int64) + offset).tobytes())
        del other
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._file, 16 * 1024 * 1024)

    # -- finishing ------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write ``prefix.idx`` and move ``prefix.bin`` into place; both appear whole or not at all."""
        self._check_open()
        idx_path = index_file_path(self.prefix)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            idx_file, self._tmp_idx = _temporary(idx_path)
            with idx_file:  # closed (its lock released) only after the renames
                idx_file.write(index_bytes(self.dtype, self.sequence_lengths, self.document_indices))
                idx_file.flush()
                os.fsync(idx_file.fileno())
                os.replace(self._tmp_bin, data_file_path(self.prefix))
                os.replace(self._tmp_idx, idx_path)
                self._tmp_idx = None
            self._file.close()
            _fsync_folder(idx_path.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far (the temporary .bin); the target files are left untouched."""
        if not self._file.closed:
            self._file.close()
        self._tmp_bin.unlink(missing_ok=True)
        if self._tmp_idx is not None:
            self._tmp_idx.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __del__(self):
        # A builder dropped without finalize() leaves no temporary file behind.
        try:
            if not self._done:
                self.abort()
        except Exception:
            pass

    # -- helpers --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"the builder for {self.prefix} is already finalized or aborted")

    def _as_array(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and self._info is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise DataError(f"token id {hi if hi > self._info.max else lo} does not fit the dataset dtype "
                                f"{self.dtype.name} (range {self._info.min}..{self._info.max}) of {self.prefix}; "
                                f"use a wider dtype such as int32")
        return arr.astype(self.dtype, copy=False)


#: SHA-256 of each .idx version hashed in this process: (path, device, inode, size, mtime_ns, ctime_ns) -> hex.
_IDX_SHA256: dict[tuple, str] = {}


class IndexedDataset:
    """Read a Megatron mmap indexed dataset (``prefix.bin`` + ``prefix.idx``).

    Sequences come back as read-only numpy views of the memory-mapped ``.bin``. The header and
    sizes are checked on open; any mismatch (wrong magic, legacy format, truncated files) raises
    :class:`~lmforge.errors.DataError` naming the file.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
        if missing:
            raise DataError(f"indexed dataset {self.prefix!r} is incomplete: {' and '.join(missing)} not found "
                            f"(a dataset prefix names PREFIX.bin and PREFIX.idx, e.g. data/corpus_text_document)")
        self.index_path, self.data_path = idx_path, bin_path
        self._stats = (idx_path.stat(), bin_path.stat())  # taken before mapping: the content mapped is at least this new
        self._read_index(idx_path)
        self._open_data(bin_path)
        self._fingerprint: Optional[dict] = None
        self._max_token_id: Optional[int] = None

    def _read_index(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if head.startswith(LEGACY_MAGIC):
            raise DataError(f"{path} is in the legacy NeMo/Megatron TNTIDX (non-mmap) format; convert it by "
                            f"re-running preprocessing (lmforge preprocess) to get the MMIDIDX format")
        if len(head) < HEADER_SIZE and head[: len(MAGIC)] == MAGIC[: len(head)]:
            raise DataError(f"{path} is truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        if not head.startswith(MAGIC):
            raise DataError(f"{path} is not a Megatron indexed-dataset index: it does not start with {MAGIC!r}")
        (version,) = struct.unpack_from("<Q", head, 9)
        if version != VERSION:
            raise DataError(f"{path} has index version {version}; only version {VERSION} is supported")
        (code,) = struct.unpack_from("<B", head, 17)
        if code not in DTYPE_CODES:
            raise DataError(f"{path} has unknown dtype code {code}; known codes are {sorted(DTYPE_CODES)}")
        n, d = struct.unpack_from("<QQ", head, 18)
        expected = HEADER_SIZE + 12 * n + 8 * d
        multimodal = size == expected + n and n > 0
        if size != expected and not multimodal:
            raise DataError(f"{path} is truncated or corrupt: the header promises {n} sequences and {d} document "
                            f"indices ({expected} bytes) but the file has {size} bytes")
        self.dtype = np.dtype(DTYPE_CODES[code])
        if size > HEADER_SIZE:
            buf = np.memmap(path, mode="r", dtype=np.uint8)
        else:
            buf = np.zeros(HEADER_SIZE, dtype=np.uint8)
        self._index_buffer = buf
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=d, offset=HEADER_SIZE + 12 * n)
        self.sequence_modes = (np.frombuffer(buf, dtype=np.int8, count=n, offset=HEADER_SIZE + 12 * n + 8 * d)
                               if multimodal else None)
        if d == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            last = int(self.document_indices[-1]) if d else None
            raise DataError(f"{path} is corrupt: document indices must start at 0 and end at the sequence count {n} "
                            f"(found {d} entries ending at {last})")
        if n and int(self.sequence_lengths.min()) < 0:
            raise DataError(f"{path} is corrupt: it holds a negative sequence length")

    def _open_data(self, path: Path) -> None:
        n = len(self.sequence_lengths)
        need = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n else 0
        size = path.stat().st_size
        if size != need:
            raise DataError(f"{path} has {size} bytes but its index {self.index_path} describes {need} bytes "
                            f"({int(self.sequence_lengths.sum(dtype=np.int64))} tokens of {self.dtype.name}); "
                            f"the files are truncated or do not belong together")
        self._data = np.memmap(path, mode="r", dtype=np.uint8) if size else np.zeros(0, dtype=np.uint8)

    def fingerprint(self) -> dict:
        """What identifies the files' content, cheaply: size and mtime (ns) of the .bin and the .idx, and a
        SHA-256 of the .idx (sequence lengths and document boundaries; small beside the .bin).

        Caches derived from a dataset (sample indices, its largest token id) are keyed on this, so a prefix
        preprocessed again with new content is never served from a stale cache. Computed once per open.
        """
        if self._fingerprint is None:
            idx, bin_ = self._stats
            key = (str(self.index_path.resolve()), idx.st_dev, idx.st_ino, idx.st_size, idx.st_mtime_ns,
                   idx.st_ctime_ns)
            if key not in _IDX_SHA256:  # one hash per file version and process (builds open a dataset repeatedly)
                _IDX_SHA256[key] = hashlib.sha256(memoryview(self._index_buffer) if idx.st_size > HEADER_SIZE
                                                  else self.index_path.read_bytes()).hexdigest()
            self._fingerprint = {
                "idx_bytes": idx.st_size, "idx_mtime_ns": idx.st_mtime_ns,
                "bin_bytes": bin_.st_size, "bin_mtime_ns": bin_.st_mtime_ns, "idx_sha256": _IDX_SHA256[key],
            }
        return dict(self._fingerprint)

    def max_token_id(self) -> int:
        """The largest token id in the .bin (-1 when it holds no tokens): one pass over the mapped file in
        blocks, remembered for this open (see ``gpt_dataset`` for the copy cached beside the index cache)."""
        if self._max_token_id is None:
            tokens = np.frombuffer(self._data, dtype=self.dtype) if len(self._data) else np.zeros(0, self.dtype)
            block = 1 << 26  # tokens per step: bounded memory for files larger than RAM
            largest = -1
            for start in range(0, len(tokens), block):
                largest = max(largest, int(tokens[start:start + block].max()))
            self._max_token_id = largest
        return self._max_token_id

    def __len__(self) -> int:
        """Number of sequences (documents, without sentence splitting)."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """Number of documents (empty ones included): ``len(document_indices) - 1``."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total number of tokens."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getitem__(self, i):
        """Sequence ``i`` as a numpy array (a list of arrays for a slice)."""
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when ``length`` is None)."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        seq_len = int(self.sequence_lengths[i])
        offset = int(offset)
        if length is None:
            length = seq_len - offset
        length = int(length)
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {seq_len}")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data, dtype=self.dtype, count=length, offset=start)

    def __getstate__(self) -> dict:
        # Pickle by reference (for DataLoader worker processes): reopen the files instead of copying the maps.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, dtype={self.dtype.name})"
