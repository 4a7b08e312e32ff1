"""Which model folder the user means: a checkpoint, a run, an HF folder or a fine-tuned adapter.

Path logic only, no model code: below both the converters (:mod:`lmforge.convert`) and the model
opener (:mod:`lmforge.open`), which use it. Accepted: a checkpoint folder (``config.json`` + weights,
whole or sharded), a checkpoints root (its newest complete checkpoint), a run's results folder
(``results/<name>/checkpoints``), a Hugging Face model folder, or an adapter folder
(``adapter_config.json``, lmforge's or HF PEFT's) / a PEFT fine-tuning run's results folder (its ``adapter/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lmforge.errors import CheckpointError

__all__ = ["resolve_checkpoint", "is_hf_folder", "find_adapter", "adapter_base", "weights_file", "ADAPTER_CONFIG"]


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path`` (see the module doc)."""
    from lmforge.parallel.runtime import Runtime
    from lmforge.train.checkpoint import CheckpointManager

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a checkpoint folder or a run's results folder")
    if (path / "config.json").exists():
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir() and ((root / "latest").exists() or any(root.glob("step_*"))):
            latest = CheckpointManager(root, Runtime(), cleanup=False).latest()
            if latest is not None:
                return latest
    raise CheckpointError(f"{path} holds no complete checkpoint (no config.json, no checkpoints/ with a finished step_* "
                          f"folder)")


def is_hf_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder whose config.json is a Hugging Face one (has ``model_type``)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and not isinstance(data.get("model"), dict)


ADAPTER_CONFIG = "adapter_config.json"


def find_adapter(path: str | Path) -> Optional[Path]:
    """The adapter folder meant by ``path``: an adapter folder itself, or a PEFT run's ``adapter/``; else None.

    Raises:
        CheckpointError: ``path`` is a PEFT run's checkpoint (adapter weights only, no base model), or a PEFT
            run without a final adapter; the message says what to pass instead.
    """
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / "adapter" / ADAPTER_CONFIG).is_file() and (path / "checkpoints").is_dir():
        return path / "adapter"
    run = path if (path / "checkpoints").is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    if run is not None and _is_peft_run(run):
        if (run / "adapter" / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{path} is a checkpoint of a PEFT fine-tuning run: it holds adapter weights only; "
                                  f"give the run ({run}) or its final adapter ({run / 'adapter'})")
        raise CheckpointError(f"{path} is part of a PEFT fine-tuning run, whose checkpoints hold adapter weights only, "
                              f"and {run} has no final adapter/ yet (it stopped before the end?); run the same "
                              f"`lmforge finetune` command again to resume, finish and write it")
    return None


def _is_peft_run(run: Path) -> bool:
    """True when ``run`` is a fine-tuning results folder of a PEFT method (its config.yaml says so)."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(cfg, dict) and cfg.get("method") in ("lora", "ia3", "adapter", "ptuning")


def adapter_base(adapter: Path) -> Path:
    """The base model folder an adapter was trained on (its ``base_model_name_or_path``), looked up as given
    (absolute, or relative to the working directory) and then next to the adapter's run folder."""
    try:
        data = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{adapter / ADAPTER_CONFIG} is not readable JSON: {e}") from e
    name = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not name:
        raise CheckpointError(f"{adapter / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path); "
                              f"give the base model and the adapter: MODEL --adapter {adapter}")
    for candidate in (Path(name), adapter.parent.parent / name, adapter.parent / name):
        if candidate.exists():
            return candidate
    raise CheckpointError(f"{adapter} is an adapter for base model {name!r}, which is not found here (as given or "
                          f"next to the run); give the base model and the adapter: BASE_MODEL --adapter {adapter}")


def weights_file(folder: str | Path, name: str) -> Path:
    """The file of ``folder`` that holds tensor ``name``: ``model.safetensors``, the shard the index names,
    ``adapter_model.safetensors``, or the sharded ``model/`` folder (else ``folder`` itself)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return folder / json.loads(index.read_text())["weight_map"][name]
        except (OSError, ValueError, KeyError, TypeError):
            return index
    for candidate in ("model.safetensors", "adapter_model.safetensors", "model"):
        if (folder / candidate).exists():
            return folder / candidate
    return folder
