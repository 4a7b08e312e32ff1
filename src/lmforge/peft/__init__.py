"""Parameter-efficient fine-tuning, applied to a plain model from outside.

Methods (each wraps or hooks modules chosen by name; the base model's code is untouched):

* ``lora``    :mod:`lmforge.peft.lora`     LoRA / DoRA on chosen linear layers
* ``ia3``     :mod:`lmforge.peft.ia3`      IA3 scaling of keys, values and MLP activations
* ``adapter`` :mod:`lmforge.peft.adapter`  Houlsby bottleneck adapters after attention and MLP
* ``ptuning`` :mod:`lmforge.peft.ptuning`  a prompt encoder's virtual tokens prepended to the input

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For LoRA and IA3
it is Hugging Face PEFT's format (``peft.PeftModel.from_pretrained`` loads it onto the equivalent
transformers model: keys ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``); for
adapters and p-tuning the same two files with ``peft_type`` ``LMFORGE_ADAPTER`` / ``LMFORGE_PTUNING``
and lmforge's own key names.

    model = apply_peft(model, "lora", LoRAConfig(r=16, target_modules=["all-linear"]))
    save_adapter(model, "lora", cfg, "out/adapter")
    model = apply_adapter(base_model, "out/adapter")   # for inference; merge_adapter(model) folds LoRA/IA3 in
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.peft.adapter import AdapterConfig, BottleneckAdapter, apply_adapters
from lmforge.peft.core import adapters_disabled, freeze_base, is_peft_name, load_peft_state_dict, peft_state_dict
from lmforge.peft.ia3 import IA3Config, IA3Linear, apply_ia3, merge_ia3
from lmforge.peft.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from lmforge.peft.multi_lora import MultiLoRA, MultiLoRALinear
from lmforge.peft.ptuning import PromptTunedModel, PTuningConfig, apply_ptuning

__all__ = ["METHODS", "LoRAConfig", "IA3Config", "AdapterConfig", "PTuningConfig", "LoRALinear", "IA3Linear",
           "BottleneckAdapter", "PromptTunedModel", "apply_peft", "apply_lora", "apply_ia3", "apply_adapters",
           "apply_ptuning", "adapters_disabled", "base_model", "freeze_base", "peft_state_dict", "load_peft_state_dict", "is_peft_name",
           "save_adapter", "read_adapter", "apply_adapter", "merge_adapter", "to_hf_key", "from_hf_key",
           "CONFIG_NAME", "WEIGHTS_NAME", "MultiLoRA", "MultiLoRALinear"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

#: method -> (config class, Hugging Face peft_type)
METHODS: dict[str, tuple[type, str]] = {
    "lora": (LoRAConfig, "LORA"),
    "ia3": (IA3Config, "IA3"),
    "adapter": (AdapterConfig, "LMFORGE_ADAPTER"),
    "ptuning": (PTuningConfig, "LMFORGE_PTUNING"),
}
_HF_FORMAT = ("lora", "ia3")
MethodConfig = Union[LoRAConfig, IA3Config, AdapterConfig, PTuningConfig]


def method_config(method: str, values: Optional[dict] = None) -> MethodConfig:
    """The config dataclass of ``method`` filled from ``values`` (unknown keys are a ConfigError)."""
    if method not in METHODS:
        raise ConfigError(f"PEFT method {method!r} is not known; use one of {', '.join(METHODS)}")
    cls = METHODS[method][0]
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"peft.{method}: unknown setting(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def apply_peft(model: nn.Module, method: str, cfg: MethodConfig, freeze: bool = True) -> nn.Module:
    """Apply ``method`` to ``model`` in place and freeze everything else.

    Returns:
        The model to train: ``model`` itself, or a :class:`PromptTunedModel` around it for p-tuning.
    """
    if method == "lora":
        apply_lora(model, cfg)
    elif method == "ia3":
        apply_ia3(model, cfg)
    elif method == "adapter":
        apply_adapters(model, cfg)
    elif method == "ptuning":
        model = apply_ptuning(model, cfg)
    else:
        raise ConfigError(f"PEFT method {method!r} is not known; use one of {', '.join(METHODS)}")
    if freeze:
        freeze_base(model)
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The Transformer inside a PEFT wrapper (or ``model`` itself)."""
    return model.model if isinstance(model, PromptTunedModel) else model


# -- Hugging Face PEFT key names -----------------------------------------------------------------

def to_hf_key(name: str) -> str:
    """lmforge ``layers.0.self_attn.q_proj.lora_A.weight`` -> peft ``base_model.model.model.layers.0...``."""
    return "base_model.model." + (name if name.startswith("lm_head") else "model." + name)


def from_hf_key(key: str) -> str:
    """The inverse of :func:`to_hf_key` (also accepts keys with the ``.default`` adapter name peft uses in memory)."""
    name = key.removeprefix("base_model.model.")
    name = name.removeprefix("model.")
    return name.replace(".default.", ".").removesuffix(".default")


# -- saving and loading --------------------------------------------------------------------------

def _hf_config(method: str, cfg: MethodConfig, model: nn.Module, base_name: Optional[str]) -> dict:
    from lmforge.peft.core import expand_targets

    targets = expand_targets(base_model(model), cfg.target_modules)
    common = {"base_model_name_or_path": base_name, "task_type": "CAUSAL_LM", "inference_mode": True,
              "fan_in_fan_out": False, "modules_to_save": None, "revision": None}
    if method == "lora":
        return {"peft_type": "LORA", **common, "r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha),
                "lora_dropout": float(cfg.lora_dropout), "target_modules": targets, "bias": "none",
                "use_dora": bool(cfg.use_dora), "use_rslora": False, "init_lora_weights": True,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    return {"peft_type": "IA3", **common, "target_modules": targets,
            "feedforward_modules": list(cfg.feedforward_modules), "init_ia3_weights": True}


def save_adapter(model: nn.Module, method: str, cfg: MethodConfig, out_dir: Union[str, Path],
                 base_name: Optional[str] = None, state: Optional[dict[str, torch.Tensor]] = None,
                 tokenizer=None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (the method's weights only) atomically.

    Args:
        model: the model the method was applied to (or its PromptTunedModel).
        base_name: recorded as ``base_model_name_or_path`` (the base model's folder).
        state: the method's weights when not read from ``model`` (an FSDP run passes them gathered).
        tokenizer: saved beside the adapter (as Hugging Face's Trainer does) when given, chat template
            included; loading the adapter for inference then uses it rather than the base model's.
    """
    from safetensors.torch import save_file

    from lmforge.io import atomic_path

    state = state if state is not None else peft_state_dict(base_model(model))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if method in _HF_FORMAT:
        config = _hf_config(method, cfg, model, base_name)
        state = {to_hf_key(k): v for k, v in state.items()}
    else:
        config = {"peft_type": METHODS[method][1], "base_model_name_or_path": base_name, **dataclasses.asdict(cfg)}
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


def read_adapter(adapter_dir: Union[str, Path]) -> tuple[str, MethodConfig, dict[str, torch.Tensor]]:
    """``(method, config, weights with lmforge names)`` of an adapter folder (ours or Hugging Face PEFT's)."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{folder} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                              f"(written by `lmforge finetune --method lora|ia3|adapter|ptuning` or peft's save_pretrained)")
    try:
        raw: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    peft_type = str(raw.get("peft_type", "")).upper()
    by_type = {t: m for m, (_, t) in METHODS.items()}
    if peft_type not in by_type:
        raise CheckpointError(f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not supported; lmforge reads "
                              f"{', '.join(by_type)}")
    method = by_type[peft_type]
    if method == "lora":
        if raw.get("use_rslora") or raw.get("rank_pattern") or raw.get("alpha_pattern") or raw.get("fan_in_fan_out"):
            raise CheckpointError(f"{cfg_path}: rsLoRA, rank/alpha patterns and fan_in_fan_out are not supported")
        if raw.get("modules_to_save"):
            raise CheckpointError(f"{cfg_path}: modules_to_save {raw['modules_to_save']} is not supported")
        targets = raw.get("target_modules")
        cfg = LoRAConfig(r=int(raw["r"]), lora_alpha=float(raw.get("lora_alpha", 8)),
                         lora_dropout=float(raw.get("lora_dropout", 0.0)),
                         target_modules=[targets] if isinstance(targets, str) else list(targets),
                         use_dora=bool(raw.get("use_dora", False)))
    elif method == "ia3":
        targets, ff = raw.get("target_modules"), raw.get("feedforward_modules") or []
        cfg = IA3Config(target_modules=[targets] if isinstance(targets, str) else list(targets),
                        feedforward_modules=[ff] if isinstance(ff, str) else list(ff))
    else:
        values = {k: v for k, v in raw.items() if k not in ("peft_type", "base_model_name_or_path")}
        cfg = method_config(method, values)
    weights = load_file(str(w_path))
    if method in _HF_FORMAT:
        weights = {from_hf_key(k): v for k, v in weights.items()}
    return method, cfg, weights


def apply_adapter(model: nn.Module, adapter_dir: Union[str, Path], freeze: bool = True) -> nn.Module:
    """Apply the adapter saved in ``adapter_dir`` to ``model`` (an lmforge Transformer) for inference.

    The adapter weights take the dtype and device of the model. Returns the model to call (for
    p-tuning a :class:`PromptTunedModel`); LoRA/IA3 can then be folded in with :func:`merge_adapter`.
    """
    method, cfg, weights = read_adapter(adapter_dir)
    model = apply_peft(model, method, cfg, freeze=freeze)
    ref = next(base_model(model).parameters())
    weights = {k: v.to(device=ref.device, dtype=ref.dtype if v.is_floating_point() else v.dtype)
               for k, v in weights.items()}
    load_peft_state_dict(base_model(model), weights, source=str(adapter_dir))
    base_model(model).to(ref.dtype)  # method modules were built in fp32
    return model


def adapter_for_inference(model: nn.Module, adapter_dir: Union[str, Path], use: str = "inference",
                          allow_ptuning: bool = False) -> nn.Module:
    """``model`` with the adapter in ``adapter_dir`` (lmforge's or Hugging Face PEFT's) ready for inference:
    LoRA/DoRA and IA3 folded into the weights (no cost per token), bottleneck adapters as extra modules, and
    with ``allow_ptuning`` a p-tuning adapter as a :class:`PromptTunedModel` (for callers that prepend its
    virtual tokens: the serving engine).

    Raises:
        ConfigError: a p-tuning adapter without ``allow_ptuning`` (``use`` names what cannot prepend them).
    """
    method = read_adapter(adapter_dir)[0]
    if method == "ptuning" and not allow_ptuning:
        raise ConfigError(f"{adapter_dir} is a p-tuning adapter; {use} does not prepend virtual tokens yet. "
                          f"Use a LoRA, IA3 or bottleneck adapter here")
    model = apply_adapter(model, adapter_dir)
    if method in ("lora", "ia3"):
        merge_adapter(model)
    return model.eval()


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA and IA3 wrappers into plain linear weights in place (names unchanged). Returns ``model``.

    Raises:
        ConfigError: the model carries adapters or p-tuning, which cannot be folded into the weights.
    """
    inner = base_model(model)
    if isinstance(model, PromptTunedModel) or any(isinstance(m, BottleneckAdapter) for m in inner.modules()):
        raise ConfigError("only LoRA/DoRA and IA3 can be merged into the base weights; adapters and p-tuning "
                          "add modules, so use them unmerged (`lmforge generate MODEL --adapter DIR`)")
    merge_lora(inner)
    merge_ia3(inner)
    return model
