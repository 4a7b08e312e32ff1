"""Checkpoints anyone can open: safetensors weights, JSON config, tokenizer files, training state.

A checkpoint is one folder::

    step_0000100/
      model.safetensors              (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
      config.json                    {"lmforge_version", "format": "lmforge", "model": {...}}
      tokenizer.json, ...            when a tokenizer was given
      training_state/
        state.json                   the loop's state, optimizer layout and scalars, grad scaler, metrics
        optimizer.safetensors        every optimizer tensor, named ``state.{param_index}.{key}``
        rng_rank{r}.safetensors      torch CPU / CUDA and numpy RNG tensors of rank r
        rng_rank{r}.json             python ``random`` state and numpy's scalar RNG fields of rank r

Nothing is ever unpickled: tensors live in safetensors files and everything else in JSON.

:class:`CheckpointManager` writes ``root/step_{step:07d}`` atomically across ranks (a hidden
temporary sibling renamed into place), keeps ``root/latest`` and ``root/checkpoints.json`` up to
date, and deletes checkpoints beyond the ``save_top_k`` best only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import apply_umask, atomic_path, fsync_dir, fsync_tree, write_json_atomic, write_text_atomic
from lmforge.parallel.runtime import Runtime

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TRAINING_STATE_DIR = "training_state"
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
LATEST_NAME = "latest"
RECORDS_NAME = "checkpoints.json"
LOCK_NAME = "lmforge.lock"  # in the checkpoints folder: host and pid of the training that writes it
STATE_FORMAT_VERSION = 1
CHECKSUMS_KEY = "sha256"  # config.json: weight file (relative path) -> sha256 hex digest
NO_VERIFY_ENV = "LMFORGE_NO_VERIFY"  # =1: load weights without checking their checksums and values

_STEP_DIR = re.compile(r"^step_(\d+)$")
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# temporaries of the manager's own atomic writes (lmforge.io.atomic_path) and of its lock
_OWN_TEMP = re.compile(r"^\.(latest|checkpoints\.json|lmforge\.lock)\.tmp-.+$")


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    """Read a JSON file; a missing or unreadable file raises CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing ({what}); was the save interrupted?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} ({what}) is not readable JSON: {e}; "
                              f"the file is damaged, use an earlier checkpoint") from e


def _save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                         metadata: Optional[dict[str, str]] = None) -> None:
    """Write a safetensors file whole or not at all."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; damage becomes a CheckpointError naming the file."""
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read as safetensors ({e}); "
                              f"the file is damaged or truncated, use an earlier checkpoint") from e


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone any tensor whose storage another tensor of ``tensors`` already uses.

    safetensors refuses tensors that share memory; after deduplication only partial views of one
    storage can remain, and those are written as independent copies.
    """
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            out[name] = t
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # shares a storage, or is a view into a larger one: write just its values
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that are the very same memory as an earlier one (tied weights); keep the first name."""
    seen: set[tuple] = set()
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.numel() > 0:
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if key in seen:
                continue
            seen.add(key)
        out[name] = t
    return out


def _plan_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


# ----------------------------------------------------------------------------------------------
# model weights + config
# ----------------------------------------------------------------------------------------------
def save_model(folder: str | os.PathLike, model_state: dict[str, torch.Tensor], config: dict,
               tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write weights, ``config.json`` and (optionally) tokenizer files into ``folder``.

    Args:
        folder: the checkpoint folder (created when missing).
        model_state: parameter name -> tensor. Tensors sharing memory (tied embeddings) are written
            once under the first name. Tensors are moved to CPU and made contiguous.
        config: the model config as a dict (``ModelConfig.to_dict()``); stored under ``"model"``.
        tokenizer: an object with ``save(folder)``, or None.
        max_shard_bytes: above this total size the weights are split into
            ``model-0000k-of-0000n.safetensors`` files with ``model.safetensors.index.json``.

    Returns:
        The folder. ``config.json`` is written last, so a folder that has it holds whole weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    state = _unshare({name: _cpu_contiguous(t) for name, t in _dedupe(model_state).items()})
    total = sum(t.numel() * t.element_size() for t in state.values())
    metadata = {"format": "pt"}

    # A config.json from an earlier save would vouch for weights being rewritten: remove it first.
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    if total <= max_shard_bytes:
        written = {WEIGHTS_NAME}
        _save_tensors_atomic(state, folder / WEIGHTS_NAME, metadata)
    else:
        shards = _plan_shards(state, max_shard_bytes)
        n = len(shards)
        weight_map = {}
        written = {INDEX_NAME}
        for k, names in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            _save_tensors_atomic({name: state[name] for name in names}, folder / fname, metadata)
            weight_map.update({name: fname for name in names})
            written.add(fname)
        write_json_atomic(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    # Weight files of an earlier save into the same folder would make the layout ambiguous.
    for path in folder.iterdir():
        if path.name not in written and (path.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.match(path.name)):
            path.unlink()
    if tokenizer is not None:
        tokenizer.save(folder)
    write_model_config(folder, config, checksums=weight_checksums(folder))
    return folder


def write_model_config(folder: str | os.PathLike, config: dict, sharded: Optional[dict] = None,
                       checksums: Optional[dict[str, str]] = None) -> Path:
    """Write ``config.json`` (last, atomically: a folder that has it holds whole weights).

    Args:
        config: the model config as a dict, stored under ``"model"``.
        sharded: for an FSDP checkpoint whose weights are per-rank shards in ``model/``, e.g.
            ``{"world_size": 8}`` (stored under ``"sharded"``).
        checksums: weight file (path relative to the folder) -> sha256 (:func:`weight_checksums`), stored
            under ``"sha256"`` and verified at load. A checkpoint manager adds them when the weights
            are written later (sharded and asynchronous saves).
    """
    doc = {"lmforge_version": lmforge.__version__, "format": "lmforge", "model": config}
    if sharded is not None:
        doc["sharded"] = sharded
    if checksums is not None:
        doc[CHECKSUMS_KEY] = checksums
    path = Path(folder) / CONFIG_NAME
    write_json_atomic(path, doc)
    return path


def _weight_files(folder: Path) -> tuple[Optional[dict[str, str]], list[Path]]:
    """Validate the weight layout of ``folder``; return (weight_map or None, files to read)."""
    index = folder / INDEX_NAME
    if index.is_file():
        data = _read_json(index, "the shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"checkpoint file {index} has no 'weight_map'; the index is damaged")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint folder {folder} is incomplete: {index.name} names "
                                  f"{', '.join(missing)} but the file(s) are missing; was the save interrupted?")
        return weight_map, [folder / f for f in files]
    if (folder / WEIGHTS_NAME).is_file():
        return None, [folder / WEIGHTS_NAME]
    from lmforge.train.sharded import MODEL_DIR, ShardedFolder, is_sharded

    if is_sharded(folder / MODEL_DIR):
        # FSDP checkpoint: one safetensors file per rank in model/ (lmforge.train.sharded); opening it reads
        # the headers only and checks that every shard file is there and the slices tile every tensor.
        reader = ShardedFolder(folder / MODEL_DIR)
        return None, [reader.folder / f for f in reader.files]
    raise CheckpointError(f"checkpoint folder {folder} is incomplete: no {WEIGHTS_NAME} or {INDEX_NAME} (nor a "
                          f"sharded {MODEL_DIR}/ folder); was the save interrupted?")


def _check_folder(folder: Path) -> dict:
    """Raise CheckpointError unless ``folder`` exists with a readable config.json; return that config."""
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is not a folder; pass the checkpoint folder "
                              f"(the one holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"checkpoint folder {folder} is incomplete: no {CONFIG_NAME}; "
                              f"was the save interrupted?")
    config = _read_json(folder / CONFIG_NAME, "the model config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"checkpoint file {folder / CONFIG_NAME} has no 'model' section; "
                              f"it was not written by lmforge")
    return config


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
               verify: Optional[bool] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the weights and model config of a checkpoint folder.

    Every path that reads an lmforge checkpoint's weights (resume, generate, evaluate, serve, fine-tune
    from it, peft merge) comes here, so they all refuse a damaged checkpoint the same way: each weight
    file must match the sha256 its ``config.json`` records, and every floating tensor must be finite.

    Args:
        folder: a folder written by :func:`save_model` (or a CheckpointManager), or a sharded (FSDP)
            checkpoint folder whose ``model/`` holds one safetensors file per rank
            (:mod:`lmforge.train.sharded`): its full tensors are assembled, whatever world size wrote them.
        device: where the tensors are placed.
        verify: check checksums and finite values (default: on, unless the environment sets
            ``LMFORGE_NO_VERIFY=1``, the escape for huge files read often).

    Returns:
        (state_dict, config): ``config`` is the whole ``config.json`` (``config["model"]`` is the dict
        given to :func:`save_model`, beside ``lmforge_version`` and ``format``). A tied output head is
        not in the state dict (it was never saved).

    Raises:
        CheckpointError: the folder, its config, its weights or a shard named by the index is
            missing or unreadable, a weight file fails its checksum, or a tensor holds NaN or inf;
            the message names the path (and the tensor).
    """
    folder = Path(folder)
    config = _check_folder(folder)
    weight_map, files = _weight_files(folder)
    verify = verify if verify is not None else verification_on()
    if verify:
        verify_checksums(folder, config)
    device = str(device)
    state: dict[str, torch.Tensor] = {}
    if files and files[0].parent != folder:  # the sharded (FSDP) layout, model/shard-*.safetensors: full tensors
        from lmforge.train.sharded import read_full

        for name, tensor in read_full(files[0].parent):
            if verify:
                check_finite(tensor, name, files[0].parent)
            state[name] = tensor.to(device)
        return state, config
    for path in files:
        tensors = _load_tensors(path, device)
        if verify:
            for name, tensor in tensors.items():
                check_finite(tensor, name, path)
        state.update(tensors)
    if weight_map is not None:
        missing = [name for name in weight_map if name not in state]
        if missing:
            raise CheckpointError(f"checkpoint folder {folder}: tensors {missing[:5]} listed in {INDEX_NAME} "
                                  f"are not in their shard files; the checkpoint is damaged")
    return state, config


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` has a readable config.json and every weight file it needs (no tensor reads)."""
    try:
        folder = Path(folder)
        _check_folder(folder)
        _weight_files(folder)
        return True
    except (CheckpointError, OSError):
        return False


# ----------------------------------------------------------------------------------------------
# integrity: checksums and finite values
# ----------------------------------------------------------------------------------------------
def verification_on() -> bool:
    """Whether loads check checksums and values: yes unless ``LMFORGE_NO_VERIFY=1``."""
    return os.environ.get(NO_VERIFY_ENV, "").strip().lower() not in ("1", "true", "yes")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def weight_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every weight file of a checkpoint folder (one file, shards, or the sharded ``model/`` files),
    keyed by the path relative to the folder."""
    folder = Path(folder)
    _, files = _weight_files(folder)
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in files}


def verify_checksums(folder: str | os.PathLike, config: Optional[dict] = None) -> None:
    """Raise CheckpointError unless every weight file matches the sha256 ``config.json`` records.

    A checkpoint written before checksums were recorded (no ``"sha256"`` entry) passes unchecked.
    """
    folder = Path(folder)
    config = config if config is not None else _check_folder(folder)
    recorded = config.get(CHECKSUMS_KEY)
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise CheckpointError(f"checkpoint file {folder / CONFIG_NAME}: '{CHECKSUMS_KEY}' is not a mapping of file "
                              f"names to checksums; the file is damaged")
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing ({CONFIG_NAME} records its checksum); "
                                  f"use an earlier checkpoint")
        got = file_sha256(path)
        if got != want:
            raise CheckpointError(f"checkpoint file {path} is damaged: its sha256 {got[:16]}... differs from the "
                                  f"{str(want)[:16]}... recorded in {CONFIG_NAME}; use an earlier checkpoint "
                                  f"(or set {NO_VERIFY_ENV}=1 to load it anyway)")


def check_finite(tensor: torch.Tensor, name: str, source: str | os.PathLike) -> None:
    """Raise CheckpointError when a floating tensor holds NaN or inf (a damaged or diverged checkpoint)."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"checkpoint file {source}: tensor {name!r} holds {bad} NaN/inf value(s); the file is "
                              f"damaged or the run diverged before this save: use an earlier checkpoint "
                              f"(or set {NO_VERIFY_ENV}=1 to load it anyway)")


# ----------------------------------------------------------------------------------------------
# training state: optimizer, grad scaler, RNG
# ----------------------------------------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    """Turn an optimizer value into JSON; tensors go to ``tensors[name]`` and leave a marker."""
    if isinstance(value, torch.Tensor):
        tensors[name] = _cpu_contiguous(value)
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _encode(v, tensors, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            name = value["__tensor__"]
            if name not in tensors:
                raise CheckpointError(f"checkpoint file {source} lacks tensor {name!r} named in {STATE_NAME}; "
                                      f"the training state is damaged")
            return tensors[name]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors, source) for v in value["__tuple__"])
        return {k: _decode(v, tensors, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    return value


def _rng_paths(folder: Path, rank: int) -> tuple[Path, Path]:
    ts = folder / TRAINING_STATE_DIR
    return ts / f"rng_rank{rank}.safetensors", ts / f"rng_rank{rank}.json"


def _save_rng(folder: Path, rank: int) -> None:
    """Write this rank's python, numpy, torch CPU and (when initialised) CUDA RNG states."""
    tensors_path, json_path = _rng_paths(folder, rank)
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    cuda_states = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
        for i, s in enumerate(cuda_states):
            tensors[f"cuda_{i}"] = s.cpu()
    _save_tensors_atomic(tensors, tensors_path)
    write_json_atomic(json_path, {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "cuda_devices": len(cuda_states),
    })


def _load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False (and a warning) when this rank has no saved states."""
    tensors_path, json_path = _rng_paths(folder, rank)
    if not tensors_path.is_file() or not json_path.is_file():
        warnings.warn(f"checkpoint {folder} has no RNG state for rank {rank} ({tensors_path.name}); "
                      f"the run was saved with another number of ranks. Random numbers continue from the "
                      f"current state, so dropout and sampling will not match an uninterrupted run.",
                      RuntimeWarning, stacklevel=3)
        return False
    tensors = _load_tensors(tensors_path)
    meta = _read_json(json_path, f"RNG state of rank {rank}")
    try:
        py = meta["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        npm = meta["numpy"]
        np.random.set_state((npm["name"], tensors["numpy_keys"].numpy().astype(np.uint32), npm["pos"],
                             npm["has_gauss"], npm["cached_gaussian"]))
        torch.set_rng_state(tensors["torch_cpu"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint RNG state {json_path} / {tensors_path.name} is damaged ({e!r})") from e
    n_cuda = int(meta.get("cuda_devices", 0))
    if n_cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == n_cuda:
            torch.cuda.set_rng_state_all([tensors[f"cuda_{i}"] for i in range(n_cuda)])
        else:
            warnings.warn(f"checkpoint {folder} holds CUDA RNG states of {n_cuda} device(s) but this process "
                          f"sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG not restored",
                          RuntimeWarning, stacklevel=3)
    return True


def save_training_state(folder: str | os.PathLike, optimizer: Optional[torch.optim.Optimizer], state: dict,
                        runtime: Runtime, scaler=None, metrics: Optional[dict] = None, rng: bool = True) -> Path:
    """Write ``folder/training_state``: everything a resumed run needs besides the weights.

    The main rank writes ``optimizer.safetensors`` and then ``state.json``; every rank writes its
    own ``rng_rank{r}`` files. Call it on every rank (it does not synchronise ranks itself).

    Args:
        folder: the checkpoint folder.
        optimizer: its ``state_dict()`` is saved: tensors as ``state.{param_index}.{key}`` (0-dim ones
            such as Adam's ``step`` too), param groups and non-tensor entries in ``state.json``.
        state: the loop's state (step, consumed_samples, scheduler, run config, ...); must be
            JSON-serialisable.
        runtime: rank and world size.
        scaler: a ``torch.amp.GradScaler`` (or None); its state dict goes into ``state.json``.
        metrics: the metrics this checkpoint was saved with (kept beside ``state``).
        rng: write this rank's RNG state (an asynchronous save writes it apart, at the moment of the save).

    Returns:
        The ``training_state`` folder.
    """
    ts = Path(folder) / TRAINING_STATE_DIR
    ts.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        try:
            state_json = json.loads(json.dumps(state))
        except (TypeError, ValueError) as e:
            raise TypeError(f"the training state must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e
        tensors: dict[str, torch.Tensor] = {}
        optim_layout = None
        if optimizer is not None:
            sd = optimizer.state_dict()
            optim_layout = {
                "state": {str(idx): {str(k): _encode(v, tensors, f"state.{idx}.{k}") for k, v in entry.items()}
                          for idx, entry in sd["state"].items()},
                "param_groups": [_encode(g, tensors, f"param_groups.{i}") for i, g in enumerate(sd["param_groups"])],
            }
        _save_tensors_atomic(_unshare(tensors), ts / OPTIMIZER_NAME, {"format": "pt"})
        scaler_state = scaler.state_dict() if scaler is not None else None
        doc = {
            "format_version": STATE_FORMAT_VERSION,
            "lmforge_version": lmforge.__version__,
            "world_size": runtime.world_size,
            "state": state_json,
            "metrics": _jsonable_metrics(metrics),
            "optimizer": optim_layout,
            "grad_scaler": _encode(scaler_state, {}, "grad_scaler") if scaler_state is not None else None,
        }
        write_text_atomic(ts / STATE_NAME, json.dumps(doc, indent=1) + "\n")
    if rng:
        _save_rng(Path(folder), runtime.rank)
    return ts


def read_optimizer_state(folder: str | os.PathLike) -> dict:
    """The optimizer state dict of an unsharded checkpoint (``{"state": {index: ...}, "param_groups": [...]}``,
    CPU tensors), as ``torch.optim.Optimizer.state_dict()`` gave it."""
    folder = Path(folder)
    ts = folder / TRAINING_STATE_DIR
    doc = _read_json(ts / STATE_NAME, "the training state")
    layout = doc.get("optimizer") if isinstance(doc, dict) else None
    if layout is None:
        raise CheckpointError(f"checkpoint {folder} was saved without optimizer state; cannot restore the optimizer")
    if not (ts / OPTIMIZER_NAME).is_file():
        raise CheckpointError(f"checkpoint folder {folder} is incomplete: no {TRAINING_STATE_DIR}/{OPTIMIZER_NAME}; "
                              f"was the save interrupted?")
    tensors = _load_tensors(ts / OPTIMIZER_NAME)
    source = ts / OPTIMIZER_NAME
    return {
        "state": {int(idx): {k: _decode(v, tensors, source) for k, v in entry.items()}
                  for idx, entry in layout["state"].items()},
        "param_groups": [_decode(g, tensors, source) for g in layout["param_groups"]],
    }


def load_training_state(folder: str | os.PathLike, optimizer: Optional[torch.optim.Optimizer], runtime: Runtime,
                        scaler=None) -> dict:
    """Restore optimizer, grad scaler and this rank's RNG from ``folder/training_state``.

    Args:
        folder: a checkpoint folder written with :func:`save_training_state`.
        optimizer: built over the same parameters, in the same order, as the saved one; its state
            is replaced exactly (same tensors, same dtypes, moved to the parameters' device).
        runtime: selects ``rng_rank{rank}``; a missing file (another world size) warns and leaves
            the current RNG as it is.
        scaler: a GradScaler to restore, or None.

    Returns:
        The ``state`` dict given to :func:`save_training_state`.
    """
    folder = Path(folder)
    ts = folder / TRAINING_STATE_DIR
    if not ts.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} has no {TRAINING_STATE_DIR}/ folder, so training cannot "
                              f"resume from it (it holds weights only); start a new run from these weights instead")
    doc = _read_json(ts / STATE_NAME, "the training state")
    if not isinstance(doc, dict) or "state" not in doc:
        raise CheckpointError(f"checkpoint file {ts / STATE_NAME} has no 'state' entry; the training state is damaged")
    if optimizer is not None:
        sd = read_optimizer_state(folder)
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the optimizer state in {folder} does not fit this model's optimizer ({e}); "
                                  f"was the checkpoint saved with another model shape or optimizer?") from e
    if scaler is not None and doc.get("grad_scaler"):
        scaler.load_state_dict(_decode(doc["grad_scaler"], {}, ts / STATE_NAME))
    _load_rng(folder, runtime.rank)
    return doc["state"]


def _jsonable_metrics(metrics: Optional[dict]) -> dict:
    """Metrics as plain JSON numbers (tensors and numpy scalars become floats)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        out[str(k)] = v
    return out


def _metric_value(metrics: Optional[dict], monitor: str) -> Optional[float]:
    """The monitored value as a finite float, or None when absent or not a finite number."""
    if not metrics or monitor not in metrics:
        return None
    try:
        value = float(metrics[monitor])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# resuming: the same run, or a refusal
# ----------------------------------------------------------------------------------------------
# The keys of a run's config that decide which samples each step reads and what their tokens mean. The
# sampler reads global batch s as samples [s*G, (s+1)*G) of an order fixed by the seed, the data blend and
# the sequence length, so resuming with another value of any of them would skip or repeat data silently.
# Pretraining configs (NeMo's: a "model" section) and fine-tuning configs (flat) each have their table,
# with the way to start fresh instead.
_PRETRAIN_DATA_KEYS = ("model.global_batch_size", "model.seed", "model.data.data_prefix", "model.data.splits_string",
                       "model.data.seq_length", "model.encoder_seq_length", "model.tokenizer")
_PRETRAIN_FRESH = "a new run folder (exp_manager.explicit_log_dir, or another exp_manager.name)"
_FINETUNE_DATA_KEYS = ("global_batch_size", "seed", "data", "seq_length", "model", "method", "sft")
_FINETUNE_FRESH = "a new run folder (out=NEW_FOLDER / --out NEW_FOLDER)"
_ABSENT = object()


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """``{dotted key: value}`` of the scalars and lists under ``value`` (a dict is walked, not compared whole)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def resume_changes(saved: dict, current: dict) -> tuple[list[str], str]:
    """(``key: old -> new`` for every data-deciding key that differs, how to start fresh)."""
    pretraining = isinstance(current.get("model"), dict)
    keys, fresh = (_PRETRAIN_DATA_KEYS, _PRETRAIN_FRESH) if pretraining else (_FINETUNE_DATA_KEYS, _FINETUNE_FRESH)
    changes = []
    for key in keys:
        old, new = _lookup(saved, key), _lookup(current, key)
        if old is _ABSENT and new is _ABSENT:
            continue
        old_leaves = _leaves(old, key) if old is not _ABSENT else {}
        new_leaves = _leaves(new, key) if new is not _ABSENT else {}
        for leaf in sorted(set(old_leaves) | set(new_leaves)):
            a, b = old_leaves.get(leaf, _ABSENT), new_leaves.get(leaf, _ABSENT)
            if a != b:
                show = lambda v: "(unset)" if v is _ABSENT else json.dumps(v)  # noqa: E731
                changes.append(f"{leaf}: {show(a)} -> {show(b)}")
    return changes, fresh


def _tokenizer_fingerprint(tokenizer) -> tuple[int, str]:
    """(vocabulary size, sha256 of every id's token and the special ids): equal for tokenizers that map
    text to the same ids, whatever file format or library version saved them."""
    digest = hashlib.sha256()
    n = int(tokenizer.vocab_size)
    for i in range(n):
        digest.update(f"{i}\t{tokenizer.id_to_token(i)}\n".encode("utf-8", "surrogatepass"))
    digest.update(f"eod={tokenizer.eod_id} bos={tokenizer.bos_id}".encode())
    return n, digest.hexdigest()


def _tokenizer_change(folder: Path, tokenizer) -> Optional[str]:
    """``tokenizer: ...`` when the checkpoint's saved tokenizer maps ids otherwise than ``tokenizer``; None when
    they agree or the checkpoint holds no tokenizer to compare with."""
    if tokenizer is None or not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None
    from lmforge.data.tokenizers import load_tokenizer

    try:
        saved = load_tokenizer(folder)
        old, new = _tokenizer_fingerprint(saved), _tokenizer_fingerprint(tokenizer)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot be read or enumerated is not compared
        return None
    if old == new:
        return None
    sizes = f"vocabulary {old[0]} -> {new[0]}" if old[0] != new[0] else f"same vocabulary size {old[0]}, other tokens"
    return f"tokenizer: the checkpoint's tokenizer differs from this run's ({sizes})"


def check_resumable(folder: str | os.PathLike, run_config: dict, tokenizer=None) -> None:
    """Refuse to resume from ``folder`` unless this run reads the data exactly as the saved run did.

    Compares the data-deciding keys (batch size, seed, data blend, sequence length, tokenizer; see the tables
    above) of ``run_config`` with the config the checkpoint was saved with (its ``state.json``), and, when
    ``tokenizer`` is given, its id mapping with the tokenizer saved in the checkpoint (the same path may hold
    another tokenizer now); a change is one CheckpointError naming each key with its old and new value, and
    how to start fresh. The weight files of a sharded checkpoint (read by DCP, not :func:`load_model`) are
    checked against their checksums here. A checkpoint saved without its config (an older lmforge) is not
    compared by config.
    """
    folder = Path(folder)
    if verification_on():
        _, files = _weight_files(folder)
        if files and files[0].parent != folder:  # sharded weights: load_model (which verifies) does not read them
            verify_checksums(folder)
    doc = _read_json(folder / TRAINING_STATE_DIR / STATE_NAME, "the training state")
    saved = (doc.get("state") or {}).get("config") if isinstance(doc, dict) else None
    changes, fresh = [], _PRETRAIN_FRESH if isinstance(run_config.get("model"), dict) else _FINETUNE_FRESH
    if isinstance(saved, dict) and saved and run_config:
        changes, fresh = resume_changes(saved, run_config)
    tokenizer_change = _tokenizer_change(folder, tokenizer)
    if tokenizer_change:
        changes.append(tokenizer_change)
    if changes:
        raise CheckpointError(f"cannot resume from {folder}: this run's config changes what the saved run trained "
                              f"on ({'; '.join(changes)}), so resuming would skip or repeat data. Run again with "
                              f"the old value(s), or start fresh in {fresh}")


# ----------------------------------------------------------------------------------------------
# asynchronous saves
def _staged(value: Any) -> Any:
    """A copy of ``value`` whose tensors live in CPU memory (what a background write may read later)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _staged(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_staged(v) for v in value)
    return value


class _Frozen:
    """Stands in for an optimizer or grad scaler: ``state_dict()`` returns the state staged at the save."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _in_thread(fn, *args, **kwargs):
    """Run ``fn`` in a background thread; return ``wait()``, which joins it and raises what it raised."""
    import threading

    box: dict = {}

    def target():
        try:
            fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            box["error"] = e

    thread = threading.Thread(target=target, name="lmforge-checkpoint", daemon=True)
    thread.start()

    def wait():
        thread.join()
        if "error" in box:
            raise box["error"]

    return wait


def _saved_metrics(folder: Path) -> dict:
    """The metrics a checkpoint was saved with (its state.json), or {}."""
    try:
        doc = json.loads((folder / TRAINING_STATE_DIR / STATE_NAME).read_text(encoding="utf-8"))
        return dict(doc.get("metrics") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _seal(folder: Path) -> None:
    """Record the weight files' checksums in ``config.json`` when the writer could not (sharded and
    asynchronous saves write config.json before or beside their weights)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return
    doc = _read_json(path, "the model config")
    if isinstance(doc, dict) and CHECKSUMS_KEY not in doc:
        doc[CHECKSUMS_KEY] = weight_checksums(folder)
        write_json_atomic(path, doc)


def _os_reason(error: BaseException) -> str:
    """A short reason for a failed write: the OS's words (``No space left on device``) where there are some."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    if "os error 28" in text or "StorageFull" in text:
        return "No space left on device"
    if "os error 122" in text or "QuotaExceeded" in text:
        return "Disk quota exceeded"
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# one training per folder
# ----------------------------------------------------------------------------------------------
def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (clock ticks since boot, Linux), or None where unknown.

    With the pid it names one process: a pid reused by a later process has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    """Whether process ``pid`` of this host (the one started at ``started``, when known) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that pid
        pass
    if started is not None:
        now = _process_start(pid)
        return now is None or now == started
    return True


def _warn(message: str) -> None:
    """One ``warning:`` line on stderr (the manager has no console of its own)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _create_exclusive(complete: Path, path: Path) -> None:
    """Make ``path`` a copy of the complete file ``complete``, or raise FileExistsError when it exists.

    A hard link appears whole at once; where the file system has no hard links, an ``O_EXCL`` create
    (written right after) stands in.
    """
    try:
        os.link(complete, path)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(complete.read_bytes())


class RunLock:
    """A lock file naming the host and process that trains into a folder; two trainings never share one.

    The file is created atomically (a hard link of a complete temporary, so it is never seen half written).
    A lock left by a dead process of this host (a killed run) is taken over, with a message; a live one,
    or one of another host (whose processes cannot be checked from here), is refused with a message
    naming the host, pid and folder. The same process may take it again (a second run in one process).
    Released by :meth:`release`, when its owner is collected, or at interpreter exit.
    """

    def __init__(self, path: str | os.PathLike, log=None):
        import uuid
        import weakref

        self.path = Path(path)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        log = log or _warn
        doc = {"host": self.host, "pid": self.pid, "started": _process_start(self.pid), "token": self.token}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{self.pid}-{self.token[:8]}")
        tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    _create_exclusive(tmp, self.path)
                    break
                except FileExistsError:
                    holder = self._holder()
                    if holder is None:  # vanished or unreadable (a writer died mid-way): take it
                        self.path.unlink(missing_ok=True)
                        continue
                    if holder.get("host") == self.host and holder.get("pid") == self.pid:
                        os.replace(tmp, self.path)  # this process again
                        break
                    pid = int(holder.get("pid", -1))
                    if holder.get("host") == self.host and not _alive(pid, holder.get("started")):
                        log(f"taking over the lock of {self.path.parent}: its owner (pid {pid} on {self.host}) "
                            f"is no longer running (a killed run)")
                        os.replace(tmp, self.path)
                        break
                    raise CheckpointError(
                        f"{self.path.parent} is in use by another training (pid {pid} on host "
                        f"{holder.get('host')}, lock file {self.path}): two runs in one folder corrupt it. Wait for "
                        f"it to finish, or train into another folder; if that process is gone (another host "
                        f"cannot be checked from here), delete {self.path}")
            else:
                raise CheckpointError(f"cannot take the lock {self.path}; another process keeps replacing it")
        finally:
            tmp.unlink(missing_ok=True)
        self._finalizer = weakref.finalize(self, RunLock._release, self.path, self.token)

    def _holder(self) -> Optional[dict]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _release(path: Path, token: str) -> None:
        """Remove the lock file if it is still this holder's."""
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("token") == token:
                path.unlink()
        except (OSError, ValueError, AttributeError):
            pass

    def release(self) -> None:
        self._finalizer()


# ----------------------------------------------------------------------------------------------
# the manager
# ----------------------------------------------------------------------------------------------
class CheckpointManager:
    """Atomic, rank-aware checkpoint folders under ``root`` with top-k retention.

    Args:
        root: the folder holding ``step_{step:07d}`` checkpoints, ``latest`` and ``checkpoints.json``.
        runtime: rank / world size; rank 0 writes shared files, every rank its RNG state.
        monitor: the metric ranking checkpoints (a key of ``metrics`` given to :meth:`save`).
        mode: ``min`` (lower is better) or ``max``.
        save_top_k: how many best checkpoints to keep; -1 keeps all; 0 keeps only the newest.
        save_last: keep the newest checkpoint whatever its metric. The newest is never deleted by
            retention anyway (a run must be able to resume from it); with ``save_top_k=0`` and
            ``save_last=False`` checkpointing is off and :meth:`save` writes nothing.
        cleanup: on construction rank 0 checks that ``root`` is writable (before step 1, not at the first
            save), takes the folder's lock (:class:`RunLock`: one training per folder), removes stale
            ``.step_*.tmp`` folders left by a killed run (and puts back a folder caught mid-replacement),
            and finishes an interrupted retention so ``checkpoints.json`` lists exactly the step folders
            (:meth:`_reconcile`); then all ranks meet so they see the same checkpoints: construct the
            manager on every rank. Pass False to only read (finding a checkpoint for inference while a run
            may be saving); no lock and no barrier then.
    """

    def __init__(self, root: str | os.PathLike, runtime: Runtime, monitor: str = "val_loss", mode: str = "min",
                 save_top_k: int = 3, save_last: bool = True, cleanup: bool = True):
        if mode not in ("min", "max"):
            raise ConfigError(f"checkpoint mode={mode!r} is not known; use min (lower {monitor} is better) or max")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(f"save_top_k={save_top_k!r} must be -1 (keep all), 0 or a positive integer")
        self.root = Path(root)
        self.runtime = runtime
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self._pending: Optional[dict] = None  # an asynchronous save still being written
        self._lock: Optional[RunLock] = None
        if cleanup and (save_top_k != 0 or save_last):  # checkpointing off: the folder is never written
            error: Optional[Exception] = None
            if runtime.is_main:
                try:
                    self._prepare()
                except (CheckpointError, OSError) as e:  # every rank must learn of it before raising
                    error = e
            if not self._all_ok(error is None):
                if error is not None:
                    raise error
                raise CheckpointError(f"rank 0 could not prepare the checkpoint folder {self.root}; see its error")

    # -- names ----------------------------------------------------------------------------------
    @staticmethod
    def folder_name(step: int) -> str:
        return f"step_{int(step):07d}"

    def _tmp_path(self, name: str) -> Path:
        return self.root / f".{name}.tmp"

    def _old_path(self, name: str) -> Path:
        return self.root / f".{name}.old"

    def _prepare(self) -> None:
        """Rank 0 at the start of a run: a writable folder, its lock, no leftovers of a killed run."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
            self._lock = RunLock(self.root / LOCK_NAME)
        except OSError as e:
            raise CheckpointError(f"checkpoint folder {self.root} is not writable ({e.strerror or e}): choose another "
                                  f"results folder (exp_manager.explicit_log_dir / exp_manager.exp_dir; --out or "
                                  f"out for fine-tuning) or fix its permissions") from e
        self._clean_stale()
        self._reconcile()

    def _clean_stale(self) -> None:
        """Remove temporaries of an interrupted save; put back a folder caught mid-replacement.

        Only names the manager itself writes are touched: ``.step_N.tmp`` / ``.step_N.old`` folders and the
        ``.latest.tmp-*`` / ``.checkpoints.json.tmp-*`` temporaries of its atomic file writes.
        """
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if _OWN_TEMP.match(path.name):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                continue
            m = re.match(r"^\.(step_\d+)\.(tmp|old)$", path.name)
            if not m or not path.is_dir():
                continue
            final = self.root / m.group(1)
            if m.group(2) == "old" and not final.exists():
                os.replace(path, final)  # the replacing rename never happened: the old one is the good one
            else:
                shutil.rmtree(path, ignore_errors=True)

    def _reconcile(self) -> None:
        """Make ``checkpoints.json`` and ``latest`` agree with the step folders after a killed save or retention.

        A kill between publishing a checkpoint and recording it leaves a complete folder that
        ``checkpoints.json`` does not list (invisible to :meth:`best`); a kill inside retention leaves
        folders that were being deleted, possibly without their weights. Here every complete unlisted
        folder is listed again and retention is re-run over them (dropping what it would have dropped);
        an unlisted incomplete folder is the rest of a deletion and is removed. Listed folders are never
        deleted here (the next save's retention handles them).
        """
        folders = {f.name: f for f in self._step_folders()}
        records = self._listed()
        if records is None:  # no usable checkpoints.json: every folder is unlisted
            if not folders:
                return
            records = []
        listed = {r["name"] for r in records}
        kept_records = [r for r in records if r["name"] in folders]
        unlisted = [f for name, f in folders.items() if name not in listed]
        changed = len(kept_records) != len(records)
        added = []
        for folder in unlisted:
            if self._usable(folder):
                added.append({"name": folder.name, "step": int(_STEP_DIR.match(folder.name).group(1)),
                              "metrics": _saved_metrics(folder)})
            else:
                _warn(f"removed {folder}: an incomplete checkpoint no record lists (an interrupted save or retention)")
                shutil.rmtree(folder, ignore_errors=True)
                changed = True
        usable = [r for r in kept_records + added if self._usable(self.root / r["name"])]
        if not added and not changed:
            return
        newest = max(usable, key=lambda r: r["step"])["name"] if usable else None
        all_records = kept_records + added
        keep = self._select(all_records, newest) if newest is not None else {r["name"] for r in all_records}
        keep |= listed  # listed folders stay until the next save's retention
        for r in added:
            if r["name"] not in keep:
                _warn(f"removed {self.root / r['name']}: retention had dropped it when the run was interrupted")
                shutil.rmtree(self.root / r["name"], ignore_errors=True)
            else:
                _warn(f"recorded {self.root / r['name']} in {RECORDS_NAME}: the run was interrupted before it was")
        self._write_records([r for r in all_records if r["name"] in keep], newest)
        if newest is not None:
            write_text_atomic(self.root / LATEST_NAME, newest + "\n")

    def close(self) -> None:
        """Finish an asynchronous save and release the folder's lock (also done when the manager is collected)."""
        self.wait()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- collective helpers ---------------------------------------------------------------------
    def _all_ok(self, ok: bool) -> bool:
        """True when every rank reports ``ok``; doubles as a barrier."""
        if not self.runtime.distributed:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # -- saving ---------------------------------------------------------------------------------
    def save(self, step: int, model_state: dict[str, torch.Tensor], model_config_dict: dict,
             optimizer: Optional[torch.optim.Optimizer], state: dict, metrics: Optional[dict] = None,
             tokenizer=None, scaler=None, write_fn=None, async_save: bool = False) -> Optional[Path]:
        """Write ``root/step_{step:07d}`` atomically; call it on every rank.

        Rank 0 writes weights, config, tokenizer, optimizer and state; every rank writes its RNG
        state; all into ``root/.step_XXXXXXX.tmp``, renamed into place once every rank succeeded
        (an existing folder of that name is replaced). Then ``latest`` and ``checkpoints.json``
        are rewritten atomically and checkpoints beyond the top k are deleted.

        ``write_fn(tmp_folder)``, when given, is called on every rank instead of rank 0 writing
        ``model_state`` (sharded runs: each rank writes its shards of the weights and optimizer state,
        rank 0 the config); ``optimizer`` is then None.

        ``async_save``: the tensors are staged (copied to CPU memory) now and written by a background thread
        (``write_fn`` returns the ``wait`` functions of its asynchronous writes); the folder is renamed into
        place, and ``latest`` updated, by :meth:`wait`, which the next save and the end of training call. A
        run killed meanwhile resumes from the previous checkpoint.

        Returns:
            The checkpoint folder (None when checkpointing is off: save_top_k=0 and save_last=False).
        """
        if self.save_top_k == 0 and not self.save_last:
            return None
        self.wait()
        rt = self.runtime
        name = self.folder_name(step)
        final, tmp = self.root / name, self._tmp_path(name)
        start_error: Optional[OSError] = None
        if rt.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:  # every rank must learn of it (a barrier would wait for rank 0 forever)
                start_error = e
        if not self._all_ok(start_error is None):
            reason = _os_reason(start_error) if start_error is not None else "rank 0 failed; see its error"
            raise CheckpointError(f"could not start writing checkpoint {final}: {reason}; free space in "
                                  f"{self.root} or fix its permissions, then run again to resume") from start_error
        error: Optional[Exception] = None
        waits: list = []
        try:
            if write_fn is not None:
                waits = list(write_fn(tmp) or [])
            elif rt.is_main and async_save:
                waits.append(_in_thread(save_model, tmp, _staged(model_state), model_config_dict, tokenizer=tokenizer))
            elif rt.is_main:
                save_model(tmp, model_state, model_config_dict, tokenizer=tokenizer)
            if async_save:  # the optimizer (the largest part) in the background; RNG as it is now
                staged_opt = _Frozen(_staged(optimizer.state_dict())) if optimizer is not None else None
                staged_scaler = _Frozen(_staged(scaler.state_dict())) if scaler is not None else None
                if rt.is_main:
                    waits.append(_in_thread(save_training_state, tmp, staged_opt, state, rt, scaler=staged_scaler,
                                            metrics=metrics, rng=False))
                _save_rng(Path(tmp), rt.rank)
            else:
                save_training_state(tmp, optimizer, state, rt, scaler=scaler, metrics=metrics)
        except Exception as e:  # noqa: BLE001 - every rank must learn of a failure before raising
            error = e
        if async_save and error is None:
            self._pending = dict(waits=waits, tmp=tmp, final=final, name=name, step=int(step), metrics=metrics)
            return final
        for wait in waits:
            wait()
        return self._finish(error, tmp, final, name, int(step), metrics)

    def wait(self) -> Optional[Path]:
        """Finish an asynchronous save: wait for its files on every rank, then publish it. Call on every rank."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error: Optional[Exception] = None
        for wait in pending["waits"]:
            try:
                wait()
            except Exception as e:  # noqa: BLE001 - every rank must learn of a failure before raising
                error = error or e
        return self._finish(error, pending["tmp"], pending["final"], pending["name"], pending["step"],
                            pending["metrics"])

    def _finish(self, error: Optional[Exception], tmp: Path, final: Path, name: str, step: int,
                metrics: Optional[dict]) -> Path:
        """Publish ``tmp`` as ``final`` when every rank succeeded; otherwise remove it and raise."""
        rt = self.runtime
        if error is None and rt.is_main:
            try:
                _seal(tmp)
            except (OSError, SafetensorError, CheckpointError) as e:
                error = e
        if not self._all_ok(error is None):
            if rt.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, (OSError, SafetensorError)):  # disk full, quota, permissions: one line
                previous = self.latest()
                kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
                raise CheckpointError(f"could not write checkpoint {final}: {_os_reason(error)}; nothing was "
                                      f"published and {kept}. Free space in {self.root} (or lower save_top_k) "
                                      f"and run again to resume") from error
            if error is not None:
                raise error
            raise CheckpointError(f"another rank failed while writing checkpoint {final}; see its error above")
        if rt.is_main:
            self._publish(tmp, final)
            try:
                write_text_atomic(self.root / LATEST_NAME, final.name + "\n")
                self._retain(name, int(step), metrics)
            except OSError as e:  # the checkpoint is whole on disk; the next start records it (_reconcile)
                _warn(f"checkpoint {final} was written, but {self.root} could not be updated to list it "
                      f"({_os_reason(e)}); the next run records it. Free space in {self.root}")
        rt.barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished temporary into place (its files on disk first), replacing a folder of that name."""
        apply_umask(tmp)
        fsync_tree(tmp)
        if final.exists():
            old = self._old_path(final.name)
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)

    def _retain(self, newest: str, step: int, metrics: Optional[dict]) -> None:
        """Record the new checkpoint, rewrite checkpoints.json, then delete those beyond the top k."""
        records = [r for r in self._records() if r["name"] != newest and (self.root / r["name"]).is_dir()]
        records.append({"name": newest, "step": step, "metrics": _jsonable_metrics(metrics)})
        keep = self._select(records, newest)
        kept = [r for r in records if r["name"] in keep]
        self._write_records(kept, newest)
        for r in records:
            if r["name"] not in keep:
                shutil.rmtree(self.root / r["name"], ignore_errors=True)

    def _ranked(self, records: list[dict]) -> list[dict]:
        """Records with the monitored metric, best first (ties: the later step first)."""
        scored = [(v, r) for r in records if (v := _metric_value(r.get("metrics"), self.monitor)) is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        scored.sort(key=lambda vr: (sign * vr[0], -vr[1]["step"]))
        return [r for _, r in scored]

    def _select(self, records: list[dict], newest: str) -> set[str]:
        if self.save_top_k == -1:
            return {r["name"] for r in records}
        keep = {r["name"] for r in self._ranked(records)[: self.save_top_k]}
        keep.add(newest)  # never delete the checkpoint just written
        return keep

    def _write_records(self, records: list[dict], newest: Optional[str]) -> None:
        """Rewrite ``checkpoints.json`` with ``records`` (oldest first)."""
        kept = sorted(({"name": r["name"], "step": r["step"], "metrics": r["metrics"]} for r in records),
                      key=lambda r: r["step"])
        for r in kept:
            r["metric"] = _metric_value(r["metrics"], self.monitor)
            r["last"] = r["name"] == newest
        write_json_atomic(self.root / RECORDS_NAME, {"monitor": self.monitor, "mode": self.mode,
                                                     "latest": newest, "checkpoints": kept})

    def _listed(self) -> Optional[list[dict]]:
        """The checkpoints ``checkpoints.json`` lists, or None when it is missing or unusable."""
        path = self.root / RECORDS_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return [{"name": str(r["name"]), "step": int(r["step"]), "metrics": dict(r.get("metrics") or {})}
                    for r in data["checkpoints"] if _STEP_DIR.match(str(r["name"]))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _records(self) -> list[dict]:
        """Checkpoints known to ``checkpoints.json``, or rebuilt from the step folders when it is unusable."""
        records = self._listed()
        if records is not None:
            return records
        return [{"name": folder.name, "step": int(_STEP_DIR.match(folder.name).group(1)),
                 "metrics": _saved_metrics(folder)} for folder in self._step_folders()]

    def _step_folders(self) -> list[Path]:
        """Visible ``step_*`` folders, oldest first (temporaries are hidden and never listed)."""
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(folders, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def _usable(self, folder: Path) -> bool:
        return is_complete(folder) and (folder / TRAINING_STATE_DIR / STATE_NAME).is_file()

    # -- finding ----------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint: the one ``latest`` names, else the highest complete step folder."""
        try:
            name = (self.root / LATEST_NAME).read_text(encoding="utf-8").strip()
        except OSError:
            name = ""
        if _STEP_DIR.match(name) and self._usable(self.root / name):
            return self.root / name
        for folder in reversed(self._step_folders()):
            if self._usable(folder):
                return folder
        return None

    def best(self) -> Optional[Path]:
        """The complete checkpoint with the best monitored metric, or None when none has it."""
        for r in self._ranked(self._records()):
            folder = self.root / r["name"]
            if self._usable(folder):
                return folder
        return None

    def checkpoints(self) -> list[dict]:
        """The kept checkpoints as recorded: name, step, metrics; oldest first."""
        return sorted(self._records(), key=lambda r: r["step"])
