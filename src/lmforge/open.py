"""Open a trained model for inference from whatever folder the user points at.

Accepted (see :mod:`lmforge.locate`): a checkpoint folder (``config.json`` + weights: one file, shards with
an index, or a sharded FSDP ``model/`` folder), a checkpoints root (its newest complete checkpoint), a run's
results folder, a Hugging Face model folder of a supported family (:mod:`lmforge.models.families`), read
tensor by tensor without converting it, or a fine-tuned adapter: an adapter folder or a PEFT fine-tuning
run's results folder (its ``adapter/``), loaded onto the base model the adapter names.

Layering: :mod:`lmforge.models` <- :mod:`lmforge.convert` <- this module; nothing below imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmforge.errors import CheckpointError
from lmforge.locate import adapter_base, find_adapter, is_hf_folder, resolve_checkpoint, weights_file

__all__ = ["load_for_inference", "load_weights", "pick_dtype", "adapter_tokenizer"]


def _first_shape_mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[str, tuple, tuple] | None:
    """``(name, shape in weights, shape in model)`` of the first tensor whose shapes differ, or None."""
    for name, want in model.state_dict().items():  # in the model's order: embedding, layer 0, ...
        if name in weights and tuple(weights[name].shape) != tuple(want.shape):
            return name, tuple(weights[name].shape), tuple(want.shape)
    return None


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``weights`` into ``model``; a tied head may be absent.

    Any other mismatch is one CheckpointError (never load_state_dict's list of every size mismatch): it
    names the weights file, the first tensor that differs (its shape in the file and in the model that
    ``config.json`` describes) and the likely cause.
    """
    folder = Path(source)
    config = folder / "config.json"
    bad = _first_shape_mismatch(model, weights)
    if bad is not None:
        name, got, want = bad
        raise CheckpointError(f"{weights_file(folder, name)}: tensor {name!r} has shape {got} in the file but "
                              f"{config} describes {want}; the config does not belong to these weights (edited, or "
                              f"copied from another model): restore the config.json saved with them")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(getattr(model, "cfg", None), "share_embeddings_and_output_weights", False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing:
        raise CheckpointError(f"{weights_file(folder, '')}: tensor {missing[0]!r} ({len(missing)} in all) is not in the "
                              f"file but {config} describes it; the config does not belong to these weights (does "
                              f"num_layers or another setting differ?): restore the config.json saved with them")
    if unexpected:
        raise CheckpointError(f"{weights_file(folder, unexpected[0])}: tensor {unexpected[0]!r} ({len(unexpected)} in "
                              f"all) is in the file but not in the model {config} describes; the config does not "
                              f"belong to these weights (does num_layers or another setting differ?): restore the "
                              f"config.json saved with them")


_NOTES_SHOWN: set = set()  # one line per process, not one per model loaded


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):  # fp32 on the CPU, bf16 on a GPU with native bf16, else fp16 (said once)
        from lmforge.parallel.runtime import inference_dtype

        dtype, note = inference_dtype(device)
        if note and note not in _NOTES_SHOWN:
            _NOTES_SHOWN.add(note)
            print(note, file=sys.stderr)
        return dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def adapter_tokenizer(adapter: str | Path, base_tokenizer):
    """The tokenizer saved beside an adapter (fine-tuning writes it, chat template included), else
    ``base_tokenizer``: the one the base model came with."""
    from lmforge.data.tokenizers import load_tokenizer

    adapter = Path(adapter)
    if (adapter / "tokenizer.json").is_file():
        return load_tokenizer(adapter)
    return base_tokenizer


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
    from lmforge.models.meta import meta_device, to_empty
    from lmforge.models.transformer import Transformer
    from lmforge.parallel.runtime import pick_device
    from lmforge.train.checkpoint import load_model

    device = device if isinstance(device, torch.device) else pick_device(str(device))
    adapter = find_adapter(path)
    if adapter is not None:
        from lmforge.peft import adapter_for_inference

        model, tokenizer = load_for_inference(adapter_base(adapter), device, dtype)
        return adapter_for_inference(model, adapter, allow_ptuning=allow_ptuning), adapter_tokenizer(adapter, tokenizer)
    if is_hf_folder(path):
        from lmforge.convert.hf import load_hf_model

        folder = Path(path)
        model, _ = load_hf_model(folder, device, pick_dtype(dtype, device))
    else:
        folder = resolve_checkpoint(path)
        weights, config = load_model(folder, device="cpu")
        cfg = ModelConfig.from_dict(config["model"], source=str(folder / "config.json"))
        with meta_device():
            model = Transformer(cfg)
        model = to_empty(model.to(pick_dtype(dtype, device)), device)
        model.init_weights()  # non-persistent buffers (rotary tables); weights are overwritten below
        load_weights(model, weights, folder)
        model = model.eval()
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        raise CheckpointError(f"{folder} has no tokenizer files (tokenizer.json)")
    return model, load_tokenizer(folder)
