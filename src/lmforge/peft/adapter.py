"""Houlsby bottleneck adapters after each block's attention and MLP (Houlsby et al., 2019).

``h + up(act(down(h)))`` applied to the output of ``self_attn`` and of ``mlp`` (before the residual
add), with ``up`` zero-initialised so training starts from the base model. The adapter becomes a
child module named ``adapter`` of the module it follows (``layers.{i}.self_attn.adapter.down.weight``)
and runs from a forward hook on that module: the model's own code and names are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.peft.core import find_targets

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}


@dataclass
class AdapterConfig:
    """Adapter settings.

    Attributes:
        dim: bottleneck width.
        activation: gelu | relu | silu.
        dropout: on the adapter's output.
        target_modules: modules whose output is adapted (default: every block's ``self_attn`` and ``mlp``).
    """

    dim: int = 32
    activation: str = "gelu"
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["self_attn", "mlp"])

    def validate(self) -> None:
        if int(self.dim) < 1:
            raise ConfigError(f"peft.adapter.dim={self.dim} must be a positive integer (16..256 are common)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"peft.adapter.activation={self.activation!r} is not known; use one of "
                              f"{', '.join(ACTIVATIONS)}")


class BottleneckAdapter(nn.Module):
    """``h + dropout(up(act(down(h))))`` over the last dimension ``hidden`` (fp32 weights by default)."""

    def __init__(self, hidden: int, dim: int, activation: str = "gelu", dropout: float = 0.0,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.down = nn.Linear(hidden, dim, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if getattr(self, "adapter_disabled", False):  # alignment's reference model: peft.adapters_disabled
            return h
        x = h if torch.is_autocast_enabled() else h.to(self.down.weight.dtype)
        return h + self.dropout(self.up(self.act(self.down(x)))).to(h.dtype)


def _adapter_hook(module: nn.Module, args, output):
    return module.adapter(output)


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Attach a :class:`BottleneckAdapter` after each target module. Returns the adapted module names."""
    cfg.validate()
    names = find_targets(model, cfg.target_modules, nn.Module, key="peft.adapter.target_modules")
    names = [n for n in names if n.startswith("layers.")]
    hidden = model.cfg.hidden_size
    for name in names:
        module = model.get_submodule(name)
        device = next(module.parameters()).device
        module.adapter = BottleneckAdapter(hidden, int(cfg.dim), cfg.activation, float(cfg.dropout), device=device)
        module.register_forward_hook(_adapter_hook)
    return names
