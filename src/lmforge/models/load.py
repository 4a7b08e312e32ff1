"""Load a trained model for inference from whatever folder the user points at.

Accepted: a checkpoint folder (``config.json`` + weights), a checkpoints root (its newest complete
checkpoint), a run's results folder (``results/<name>/checkpoints``), or a Hugging Face model folder
of a supported family (:mod:`lmforge.models.families`), read tensor by tensor without converting it.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def load_for_inference(path: str | Path, device: str | torch.device = "auto", dtype: str = "auto"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    Args:
        path: an lmforge checkpoint (or checkpoints root / results folder), or an HF model folder.
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
