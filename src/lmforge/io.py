"""Files that appear whole or not at all: write to a temporary sibling, flush it to disk, then rename.

Durability: before the rename that publishes a file or folder, every file in it and every folder it has
are fsync'ed (their data and their entries are on disk), and after the rename the parent folder is too
(the new name is on disk). A power loss then leaves either the old version or the whole new one, never
a renamed file whose blocks were still in the page cache.

Permissions: files appear with the mode the umask gives (0644 under the usual 022), whatever the writer
used (safetensors and ``tempfile`` create 0600 files).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "fsync_tree", "fsync_dir", "umask_mode",
           "apply_umask"]


def _current_umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads may be creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(executable: bool = False) -> int:
    """The mode a new file gets under the umask: 0o666 (0o777 for an executable or a folder) minus the umask."""
    return (0o777 if executable else 0o666) & ~_current_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file and folder under a folder) the mode the umask gives.

    Executable bits a writer set are kept (as far as the umask allows); links are left alone.
    """
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        _chmod(path, umask_mode(executable=True))
        for parent, dirs, files in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(parent, name)):
                    _chmod(os.path.join(parent, name), umask_mode(executable=True))
            for name in files:
                apply_umask(os.path.join(parent, name))
        return
    executable = bool(os.stat(path).st_mode & 0o111)
    _chmod(path, umask_mode(executable=executable))


def _chmod(path: str | os.PathLike, mode: int) -> None:
    """chmod, best effort: a file another user wrote (another rank's shard on a shared folder) keeps its mode."""
    try:
        os.chmod(path, mode)
    except PermissionError:
        pass


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so the names it holds (a rename into it) are on disk. Skipped where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the data files were synced
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # not ours to read (another user's file): its writer synced it or nobody can
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or every file and folder under a folder (the folder itself last)."""
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        _fsync_file(path)
        return
    for parent, dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(parent, name)):
                _fsync_file(os.path.join(parent, name))
        fsync_dir(parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success publish it as ``path`` (durably, see the module doc).

    Works for a file or a folder. On an exception the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        apply_umask(target)
        fsync_tree(target)
        if path.is_dir() and target.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
            fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
