"""Streaming conversion between Hugging Face folders and lmforge checkpoints.

Tensors move one rule at a time (:class:`lmforge.models.families.Rule`): the source tensors of a rule
are read from memory-mapped safetensors, transformed, checked against the shapes the config implies,
and handed to a :class:`ShardWriter` that flushes a shard file whenever it holds ``max_shard_bytes``.
Memory stays bounded by one shard plus one rule's tensors, never two copies of the model.

Formats:
    HF folder       config.json (``model_type``), model.safetensors or model-*.safetensors +
                    model.safetensors.index.json, tokenizer files, generation_config.json, chat template.
    lmforge folder  config.json ``{"lmforge_version", "format": "lmforge", "model": {...}, "family",
                    "hf_config"}``, the same safetensors layout with lmforge tensor names, tokenizer files;
                    or (read only) a sharded FSDP checkpoint: ``model/`` with one safetensors file per rank
                    (:mod:`lmforge.train.sharded`), each full tensor assembled from its slices when read.
    .nemo           NeMo 1.x archive (import only; see :mod:`lmforge.convert.nemo`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from lmforge.convert.nemo import open_nemo
from lmforge.convert.plan import (Source, Step, expected_shapes, hf_shapes, plan, to_hf_tensors,  # noqa: F401
                                  to_our_tensors)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_path, write_json_atomic
from lmforge.models.config import ModelConfig
from lmforge.models.families import (FAMILIES, Family, Rule, family_by_name, guess_family, hf_to_model_config,
                                     model_config_to_hf)

__all__ = ["detect_format", "SafetensorsFolder", "ShardWriter", "Step", "plan", "expected_shapes", "to_hf_tensors",
           "to_our_tensors", "Source", "open_source", "lmforge_weights", "convert", "load_hf_model", "read_hf_config",
           "CARRIED_FILES"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files that travel with the weights both ways: tokenizer, generation defaults, chat template.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                 "chat_template.json")
# HF config keys about tokens and dtype that an lmforge checkpoint keeps to write them back.
_HF_EXTRA_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- formats


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _checkpoint_of_run(path: str | os.PathLike) -> Path:
    """A training run's results folder (or its checkpoints/ folder) stands for its newest complete checkpoint,
    so a pipeline can convert "whatever training produced"; any other path is returned as it is."""
    from lmforge.locate import find_adapter

    path = Path(path)
    try:
        adapter = find_adapter(path)
    except CheckpointError as e:  # a PEFT run's checkpoint, or a run without its final adapter
        raise CheckpointError(f"{e}; to convert, merge the adapter into its base first "
                              f"(`lmforge peft merge --model BASE --adapter RUN/adapter --out MERGED`)") from None
    if adapter is not None:
        raise CheckpointError(f"{path} is a fine-tuned adapter ({adapter}), not a whole model: merge it into its base "
                              f"first (`lmforge peft merge --model BASE --adapter {adapter} --out MERGED`), then convert "
                              f"MERGED (a LoRA or IA3 adapter is in HF PEFT format: PEFT and vLLM load {adapter} as it is)")
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "model_config.yaml").is_file():
        if (path / "checkpoints").is_dir() or (path / "latest").is_file() or any(path.glob("step_*")):
            from lmforge.locate import resolve_checkpoint

            return resolve_checkpoint(path)
    return path


def detect_format(path: str | os.PathLike) -> str:
    """``"hf"``, ``"lmforge"`` or ``"nemo"`` for a model at ``path``; CheckpointError if it is none of them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give an HF model folder, an lmforge checkpoint or a .nemo file")
    if path.is_file():
        if path.suffix == ".nemo" or path.suffix == ".tar":
            return "nemo"
        raise CheckpointError(f"{path} is a file; give a model folder or a .nemo archive")
    if (path / "model_config.yaml").is_file():
        return "nemo"  # an extracted .nemo
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not an HF model folder or an lmforge checkpoint "
                              f"(was the download interrupted?)")
    config = _read_json(path / "config.json")
    if isinstance(config.get("model"), dict) and ("lmforge_version" in config or config.get("format") == "lmforge"):
        return "lmforge"
    if "model_type" in config or "architectures" in config:
        return "hf"
    raise CheckpointError(f"{path / 'config.json'} has neither model_type (HF) nor a 'model' section (lmforge)")


class SafetensorsFolder:
    """Read-only, memory-mapped view of a folder's weights (one file or shards with an index).

    Raises CheckpointError for a missing index entry, a missing or damaged shard, or a folder with
    only pickle weights (``pytorch_model.bin``: convert it to safetensors first; lmforge never unpickles).
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map'; the index is damaged")
            files = sorted(set(weight_map.values()))
        elif (self.folder / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
            weight_map = None
        else:
            pickles = [p.name for p in self.folder.glob("*.bin")] + [p.name for p in self.folder.glob("*.pt")]
            if pickles:
                raise CheckpointError(f"{self.folder} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); "
                                      f"lmforge reads safetensors only: save the model with safe_serialization=True")
            raise CheckpointError(f"{self.folder} has no {WEIGHTS_NAME} or {INDEX_NAME}; was the download interrupted?")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.folder}: {INDEX_NAME} names {', '.join(missing[:3])} but the file(s) are "
                                  f"missing; was the download interrupted?")
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            try:
                handle = safe_open(str(self.folder / f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise CheckpointError(f"{self.folder / f} cannot be read as safetensors ({e}); the file is damaged or "
                                      f"incomplete") from None
            self._handles[f] = handle
            for key in handle.keys():
                self._where[key] = f
        if weight_map is not None:
            lost = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if lost:
                raise CheckpointError(f"{self.folder}: tensors {lost[:3]} listed in {INDEX_NAME} are not in their "
                                      f"shard files; the download is damaged")
        self.total_bytes = sum((self.folder / f).stat().st_size for f in files)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``; CheckpointError naming it when absent or unreadable."""
        if key not in self._where:
            raise CheckpointError(f"{self.folder}: tensor {key!r} is missing; the weights do not match config.json "
                                  f"(or a shard is missing)")
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.folder / self._where[key]}: cannot read tensor {key!r} ({e}); the file is "
                                  f"damaged or incomplete") from None


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` as they arrive.

    Shards are named ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` (the
    HF and lmforge layout), or a single ``model.safetensors`` when everything fits one shard.
    Call :meth:`close` once at the end; it returns the total bytes written.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 2**30):
        if max_shard_bytes <= 0:
            raise ConfigError(f"max shard size must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, str(self.folder / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> int:
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / self._shards[0][0], self.folder / WEIGHTS_NAME)
            return self.total_bytes
        weight_map = {}
        for k, (tmp, names) in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update({name: final for name in names})
        write_json_atomic(self.folder / INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return self.total_bytes


# ---------------------------------------------------------------------------------------------- sources


def read_hf_config(folder: str | os.PathLike) -> tuple[Family, ModelConfig, dict]:
    """``(family, ModelConfig, raw config dict)`` of an HF model folder."""
    path = Path(folder) / "config.json"
    hf = _read_json(path)
    fam, cfg = hf_to_model_config(hf, source=str(path))
    return fam, cfg, hf


def iter_hf_tensors(reader: SafetensorsFolder, cfg: ModelConfig, fam: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """lmforge-named tensors of an HF folder, one rule at a time, shapes checked against ``cfg``."""
    shapes = expected_shapes(cfg)
    steps = plan(cfg, fam)
    used = set()
    for step in steps:
        for name, want in zip(step.hf, hf_shapes(step, cfg, shapes)):
            if name not in reader:
                continue  # reader.get names it below
            got = reader.shape(name)
            if tuple(got) != tuple(want):
                raise CheckpointError(f"{reader.folder}: tensor {name!r} has shape {tuple(got)} but config.json implies "
                                      f"{tuple(want)}; the weights do not belong to this config")
        hf_tensors = [reader.get(name) for name in step.hf]
        used.update(step.hf)
        for name, tensor in zip(step.ours, to_our_tensors(step, hf_tensors, cfg, shapes)):
            yield name, tensor
    extra = [k for k in reader.keys() if k not in used and not k.endswith(fam.ignore)
             and not (k == "lm_head.weight" and cfg.share_embeddings_and_output_weights)]
    if extra:
        raise CheckpointError(f"{reader.folder}: tensors {extra[:3]} are not used by the {fam.name} model that "
                              f"config.json describes (does num_hidden_layers or another size match the weights?)")


def lmforge_weights(folder: str | os.PathLike):
    """The weights of an lmforge checkpoint folder as a reader (``keys``, ``in``, ``shape``, ``get``):
    a :class:`SafetensorsFolder`, or for a sharded (FSDP) checkpoint, whose ``model/`` holds one safetensors
    file per rank, a :class:`lmforge.train.sharded.ShardedFolder`, which assembles one full tensor per ``get``."""
    folder = Path(folder)
    if not (folder / INDEX_NAME).is_file() and not (folder / WEIGHTS_NAME).is_file():
        from lmforge.train.sharded import MODEL_DIR, ShardedFolder, is_sharded

        if is_sharded(folder / MODEL_DIR):
            return ShardedFolder(folder / MODEL_DIR)
    return SafetensorsFolder(folder)


def _iter_lmforge_tensors(reader: SafetensorsFolder, cfg: ModelConfig,
                          verify: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    from lmforge.train.checkpoint import check_finite

    for name, want in expected_shapes(cfg).items():
        if name not in reader:
            raise CheckpointError(f"{reader.folder}: tensor {name!r} is missing; the weights do not match config.json")
        got = reader.shape(name)
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{reader.folder}: tensor {name!r} has shape {tuple(got)} but the config implies "
                                  f"{tuple(want)}")
        tensor = reader.get(name)
        if verify:
            check_finite(tensor, name, reader.folder)
        yield name, tensor


def open_source(path: str | os.PathLike, family: Optional[str] = None, verify: Optional[bool] = None) -> Source:
    """Open an HF folder, an lmforge checkpoint or a .nemo archive as a :class:`Source`.

    Args:
        family: the family to export as (lmforge and .nemo sources); default: the one recorded in the
            checkpoint, else guessed from its config (GPT style -> gpt2, Llama style -> llama, ...).
        verify: an lmforge checkpoint's weight files must match the sha256 its config.json records and its
            tensors must be finite, as for every load (:func:`lmforge.train.checkpoint.load_model`);
            default: on unless ``LMFORGE_NO_VERIFY=1``.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        own, cfg, hf = read_hf_config(path)
        reader = SafetensorsFolder(path)
        fam = family_by_name(family) if family else own  # tensors are read by the folder's own family
        return Source(cfg, fam, lambda: iter_hf_tensors(reader, cfg, own), reader.total_bytes,
                      {k: hf[k] for k in _HF_EXTRA_KEYS if k in hf}, path)
    if fmt == "lmforge":
        config = _read_json(path / "config.json")
        model = dict(config["model"])
        if config.get("family") == "baichuan" and "normalize_output_head" not in model:
            # Converted before ModelConfig.normalize_output_head: the head was stored normalised, and
            # normalising it again at use changes nothing, so it exports as the NormHead it is.
            model["normalize_output_head"] = True
        cfg = ModelConfig.from_dict(model, source=str(path / "config.json"))
        name = family or config.get("family")
        fam = family_by_name(name) if name else guess_family(cfg)
        reader = lmforge_weights(path)
        from lmforge.train.checkpoint import verification_on, verify_checksums

        verify = verification_on() if verify is None else verify
        if verify:
            verify_checksums(path, config)
        return Source(cfg, fam, lambda: _iter_lmforge_tensors(reader, cfg, verify), reader.total_bytes,
                      dict(config.get("hf_config") or {}), path)
    return open_nemo(path, family)


# ---------------------------------------------------------------------------------------------- convert


def _progress(enabled: bool):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tensors]} tensors"),
                    DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def _copy_carried(src: Source, dst: Path) -> list[str]:
    copied = []
    if src.carry_from is not None:
        for name in CARRIED_FILES:
            if (src.carry_from / name).is_file():
                shutil.copyfile(src.carry_from / name, dst / name)
                copied.append(name)
    for name, data in src.tokenizer_files.items():
        (dst / name).write_bytes(data)
        copied.append(name)
    return copied


_WRITTEN = re.compile(r"^(config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                      r"model-\d{5}-of-\d{5}\.safetensors)$")


def _check_output(dst: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse an output that would destroy what convert did not write.

    ``dst`` may not be a source, hold one, or lie inside one (``--overwrite`` would delete the source, or
    the new folder would land in it); with ``--overwrite`` an existing ``dst`` is replaced only when it
    is a folder of files convert writes (weights, config.json, tokenizer and generation files).
    """
    out = dst.resolve()
    for src in sources:
        if not src.exists():
            continue
        src = src.resolve()
        if out == src or out in src.parents:
            raise ConfigError(f"the output {dst} {'is' if out == src else 'contains'} the source {src}: "
                              f"--overwrite would delete it; choose an output folder outside the source")
        if src in out.parents:
            raise ConfigError(f"the output {dst} is inside the source {src}: choose an output folder outside it")
    if not dst.exists() and not dst.is_symlink():
        return
    if not overwrite:
        raise CheckpointError(f"{dst} already exists; choose a new folder or pass --overwrite")
    if dst.is_symlink() or not dst.is_dir():
        raise CheckpointError(f"{dst} is {'a link' if dst.is_symlink() else 'a file'}, not a converted model folder; "
                              f"--overwrite replaces only a folder convert wrote: choose a new output folder")
    foreign = sorted(p.name for p in dst.iterdir()
                     if p.is_symlink() or not p.is_file() or not (_WRITTEN.match(p.name) or p.name in CARRIED_FILES))
    if foreign:
        raise CheckpointError(f"{dst} holds {', '.join(foreign[:5])}, which convert did not write; --overwrite "
                              f"replaces only a folder convert wrote: choose a new output folder (or empty {dst} "
                              f"yourself)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, family: Optional[str] = None,
            dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
            progress: bool = True, verify: Optional[bool] = None) -> dict:
    """Convert the model at ``src`` into ``dst`` as an HF folder (``to="hf"``) or an lmforge checkpoint.

    ``dst`` appears whole or not at all. Tensors stream one rule at a time (see the module doc).

    Args:
        src: HF folder, lmforge checkpoint folder or .nemo archive (detected).
        dst: output folder; must not exist unless ``overwrite``, which replaces only a folder holding nothing
            but files convert writes; never the source, a folder holding it, or a folder inside it.
        to: ``"hf"`` or ``"lmforge"``.
        family: HF family to write (``to="hf"``); default: recorded or guessed (see :func:`open_source`).
        dtype: cast floating tensors to ``float32``/``bfloat16``/``float16``; default: keep.
        max_shard_bytes: shard size of the written weights.
        progress: show a rich progress bar (tensors and bytes).
        verify: an lmforge source's weight files are checked against their recorded sha256 and every tensor
            must be finite (default: on unless ``LMFORGE_NO_VERIFY=1``; ``--no-verify``).

    Returns:
        A summary: source format, family, tensors, bytes, files carried.

    Raises:
        UserError subclasses for unknown architectures, shapes that do not fit the config, missing shards,
        incomplete folders and configs the target cannot represent.
    """
    if to not in ("hf", "lmforge"):
        raise ConfigError(f"--to {to!r}: use hf or lmforge")
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    dst = Path(dst)
    given = Path(src)
    src = _checkpoint_of_run(src)
    _check_output(dst, [given, src], overwrite)
    fmt = detect_format(src)
    source = open_source(src, family, verify=verify)
    cfg, fam = source.cfg, source.family
    hf_config = None
    if to == "hf":
        hf_config = {**source.hf_extra, **model_config_to_hf(cfg, fam)}  # raises before anything is written
        if dtype is not None:
            hf_config["torch_dtype"] = hf_config["dtype"] = dtype
        steps = plan(cfg, fam)
    cast = _DTYPES.get(dtype)
    n_tensors = 0
    with atomic_path(dst) as tmp, _progress(progress) as bar:
        tmp.mkdir()
        task = bar.add_task(f"convert {fmt} -> {to}", total=source.total_bytes, tensors=0)
        writer = ShardWriter(tmp, max_shard_bytes)

        def emit(name: str, tensor: torch.Tensor) -> None:
            nonlocal n_tensors
            if cast is not None and tensor.is_floating_point():
                tensor = tensor.to(cast)
            writer.add(name, tensor)
            n_tensors += 1
            bar.update(task, advance=tensor.numel() * tensor.element_size(), tensors=n_tensors)

        if to == "lmforge":
            for name, tensor in source.tensors():
                emit(name, tensor)
        else:
            pending: dict[str, torch.Tensor] = {}
            stream = source.tensors()
            for step in steps:
                while not all(n in pending for n in step.ours):
                    name, tensor = next(stream)
                    pending[name] = tensor
                outs = to_hf_tensors(step, [pending.pop(n) for n in step.ours], cfg)
                for name, tensor in zip(step.hf, outs):
                    emit(name, tensor if len(step.ours) == 1 else tensor.clone())
            for _ in stream:  # let the source finish its own checks
                pass
        total = writer.close()
        carried = _copy_carried(source, tmp)
        if to == "hf":
            write_json_atomic(tmp / "config.json", hf_config)
        else:
            import lmforge

            from lmforge.train.checkpoint import weight_checksums

            write_json_atomic(tmp / "config.json", {"lmforge_version": lmforge.__version__, "format": "lmforge",
                                                    "model": cfg.to_dict(), "family": fam.name,
                                                    "hf_config": source.hf_extra, "sha256": weight_checksums(tmp)})
    return {"source_format": fmt, "to": to, "family": fam.name, "tensors": n_tensors, "bytes": total,
            "carried": carried, "dst": str(dst)}


# ---------------------------------------------------------------------------------------------- loading


def load_hf_model(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype):
    """Build the lmforge model of an HF folder on ``device`` in ``dtype``, filling it tensor by tensor.

    Returns:
        ``(model, family)``; the model is in eval mode.
    """
    from lmforge.models.meta import meta_device, to_empty
    from lmforge.models.transformer import Transformer

    fam, cfg, _ = read_hf_config(folder)
    reader = SafetensorsFolder(folder)
    with meta_device():
        model = Transformer(cfg)
    model = to_empty(model.to(dtype), device)
    model.init_weights()  # rotary tables; every weight is overwritten below
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in iter_hf_tensors(reader, cfg, fam):
            state[name].copy_(tensor)
    return model.eval(), fam
