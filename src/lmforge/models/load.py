"""Load a trained model for inference from whatever folder the user points at.

Accepted: a checkpoint folder (``config.json`` + weights), a checkpoints root (its newest complete
checkpoint), a run's results folder (``results/<name>/checkpoints``), a Hugging Face model folder
of a supported family (:mod:`lmforge.models.families`), read tensor by tensor without converting it,
or a fine-tuned adapter: an adapter folder (``adapter_config.json``, lmforge's or HF PEFT's) or a PEFT
fine-tuning run's results folder (its ``adapter/``), loaded onto the base model the adapter names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from lmforge.errors import CheckpointError


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


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``weights`` into ``model``; a tied head may be absent. Any other mismatch is a CheckpointError."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(getattr(model, "cfg", None), "share_embeddings_and_output_weights", False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def load_for_inference(path: str | Path, device: str | torch.device = "auto", dtype: str = "auto",
                       allow_ptuning: bool = False):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    Args:
        path: an lmforge checkpoint (or checkpoints root / results folder), an HF model folder, or an adapter
            folder / PEFT run (the base model it names, with the adapter applied as ``--adapter`` would).
        allow_ptuning: a p-tuning adapter gives a :class:`~lmforge.peft.PromptTunedModel` (the serving
            engine prepends its virtual tokens); without it such an adapter is a ConfigError.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ... or a torch.device.
        dtype: ``auto`` (bf16/fp16 on GPU, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.

    Raises:
        CheckpointError / ConfigError: missing, incomplete or unsupported model folders (one line each).
    """
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import Transformer
    from lmforge.parallel.runtime import pick_device
    from lmforge.train.checkpoint import load_model

    device = device if isinstance(device, torch.device) else pick_device(str(device))
    adapter = find_adapter(path)
    if adapter is not None:
        from lmforge.peft import adapter_for_inference

        model, tokenizer = load_for_inference(adapter_base(adapter), device, dtype)
        return adapter_for_inference(model, adapter, allow_ptuning=allow_ptuning), tokenizer
    if is_hf_folder(path):
        from lmforge.convert.hf import load_hf_model

        folder = Path(path)
        model, _ = load_hf_model(folder, device, pick_dtype(dtype, device))
    else:
        folder = resolve_checkpoint(path)
        weights, config = load_model(folder, device="cpu")
        cfg = ModelConfig.from_dict(config["model"], source=str(folder / "config.json"))
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to(pick_dtype(dtype, device)).to_empty(device=device)
        model.init_weights()  # non-persistent buffers (rotary tables); weights are overwritten below
        load_weights(model, weights, folder)
        model = model.eval()
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        raise CheckpointError(f"{folder} has no tokenizer files (tokenizer.json)")
    return model, load_tokenizer(folder)
