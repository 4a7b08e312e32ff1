"""What every PEFT method shares: finding target modules by name, freezing the base, the method's weights.

A method is applied from outside the model: it replaces (or hooks) chosen modules found by their
names, which are the Hugging Face Llama names of :class:`~lmforge.models.transformer.Transformer`
(``layers.{i}.self_attn.q_proj``, ``layers.{i}.mlp.down_proj``, ...), so it works on every family
built from those modules. Wrappers keep the base weights under their original names
(``...q_proj.weight``), so a base checkpoint still loads into a wrapped model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from lmforge.errors import ConfigError

#: Name fragments that mark a parameter as a PEFT method's own (trained and saved) weight.
PEFT_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".ia3_l", ".adapter.", "prompt_encoder.")

#: The linear layers of a decoder block, by short name (attention, then MLP).
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def is_peft_name(name: str) -> bool:
    """True for a parameter/buffer name that belongs to a PEFT method."""
    dotted = "." + name
    return any(m in dotted for m in PEFT_MARKERS)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of every base linear layer inside the blocks (``layers.*``) of ``model``.

    Linear layers already wrapped by a method count under their own name; the method's inner layers
    (``lora_A``, adapter projections) do not.
    """
    out = []
    for n, m in model.named_modules():
        if not n.startswith("layers.") or is_peft_name(n + ".x"):
            continue
        if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and isinstance(getattr(m, "weight", None), nn.Parameter)):
            out.append(n)
    return out


def expand_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Short target names: ``"all-linear"`` becomes every linear short name found in the blocks."""
    if isinstance(targets, str):
        targets = [targets]
    out: list[str] = []
    for t in targets:
        if t == "all-linear":
            for n in linear_names(model):
                short = n.rsplit(".", 1)[-1]
                if short not in out:
                    out.append(short)
        elif t not in out:
            out.append(t)
    return out


def find_targets(model: nn.Module, targets: Sequence[str], kind: type = nn.Linear,
                 key: str = "target_modules") -> list[str]:
    """Full names of the modules of type ``kind`` whose name is, or ends with ``.`` + , a target.

    Raises:
        ConfigError: a target matches nothing (the message lists the names that exist).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, kind) and n]
    found: list[str] = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            shorts = sorted({n.rsplit(".", 1)[-1] for n in names if n.startswith("layers.")})
            raise ConfigError(f"{key}: {t!r} matches no {kind.__name__} module of this model; module names that "
                              f"exist: {', '.join(shorts)} (full names like {names[0] if names else '-'}), "
                              f"or 'all-linear'")
        found.extend(h for h in hits if h not in found)
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_base(model: nn.Module) -> int:
    """Train only PEFT parameters: ``requires_grad`` off for every other one. Returns the trainable count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_peft_name(name))
        n += p.numel() if p.requires_grad else 0
    return n


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PEFT method's weights of ``model`` (lmforge names), detached."""
    return {n: t.detach() for n, t in model.state_dict().items() if is_peft_name(n)}


def load_peft_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT weights into ``model``; every PEFT weight must be given, and nothing else, in the shapes the
    model has. A mismatch is one CheckpointError naming the file, the first tensor and the likely cause
    (a rank other than ``adapter_config.json`` says, or an adapter trained on another base model)."""
    from lmforge.errors import CheckpointError
    from lmforge.locate import weights_file

    own = {n for n in model.state_dict() if is_peft_name(n)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise CheckpointError(f"{weights_file(source, '')}: adapter weights do not fit this model (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}); was it trained on another model or method?")
    for name, want in model.state_dict().items():  # the first mismatch in the model's order
        if name in state and tuple(state[name].shape) != tuple(want.shape):
            got, want = tuple(state[name].shape), tuple(want.shape)
            raise CheckpointError(f"{weights_file(source, name)}: tensor {name!r} has shape {got} in the file but "
                                  f"{want} in this model; {_adapter_mismatch_cause(name, got, want, Path(source))}")
    model.load_state_dict(state, strict=False)


def _adapter_mismatch_cause(name: str, got: tuple, want: tuple, folder: Path) -> str:
    """The likely reason an adapter tensor has another shape than the model expects, and the fix."""
    import json

    config = folder / "adapter_config.json"
    says = str(config) if config.is_file() else "the run's PEFT settings"
    rank_dim = 0 if ".lora_A." in "." + name else 1 if ".lora_B." in "." + name else None
    if rank_dim is not None and len(got) == len(want) == 2 and got[1 - rank_dim] == want[1 - rank_dim]:
        return (f"r is {want[rank_dim]} in {says} but the adapter's tensors have rank {got[rank_dim]}: "
                f"set r to {got[rank_dim]} there (or use the adapter_config.json saved with these weights)")
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    named = f" ({config} names {base})" if base else ""
    return (f"the adapter was trained on a base model of other sizes{named}: load it on the base model it was "
            f"trained on")


def unique(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for i in items:
        if i not in out:
            out.append(i)
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block, every LoRA/DoRA, IA3 and bottleneck-adapter module of ``model`` computes its base layer
    alone, so ``model`` is the base model: the reference of preference training under PEFT, without a second
    copy of the weights. (P-tuning: call the Transformer inside instead, which adds no virtual tokens.)"""
    modules = [m for m in model.modules() if hasattr(m, "adapter_disabled") or type(m).__name__ == "BottleneckAdapter"]
    for m in modules:
        m.adapter_disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.adapter_disabled = False
