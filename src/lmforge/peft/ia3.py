"""IA3: learned rescaling of keys, values and the MLP's inner activations (Liu et al., 2022).

As in Hugging Face peft: a target that is not a feed-forward module scales its *output*
(``y = (W x + b) * l``, ``l`` of shape (out, 1)); a feed-forward module (``down_proj``) scales its
*input*, i.e. the MLP activations (``y = W (x * l) + b``, ``l`` of shape (1, in)). ``l`` starts at 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.peft.core import expand_targets, find_targets, set_module


@dataclass
class IA3Config:
    """IA3 settings (Hugging Face peft's names; the defaults are peft's for Llama)."""

    target_modules: list = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list = field(default_factory=lambda: ["down_proj"])

    def validate(self) -> None:
        if not self.target_modules:
            raise ConfigError("peft.ia3.target_modules is empty; the usual choice is [k_proj, v_proj, down_proj]")
        extra = [m for m in self.feedforward_modules if m not in self.target_modules]
        if extra:
            raise ConfigError(f"peft.ia3.feedforward_modules {extra} must also be in target_modules "
                              f"{list(self.target_modules)}")


class IA3Linear(nn.Module):
    """A frozen ``nn.Linear`` whose output (or, for a feed-forward module, input) is scaled by ``ia3_l``."""

    def __init__(self, base: nn.Linear, feedforward: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.is_feedforward = bool(feedforward)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=dtype))
        self.adapter_disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:  # the base layer alone (alignment's reference model: peft.adapters_disabled)
            return F.linear(x, self.weight, self.bias)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return F.linear((x * scale).to(x.dtype), self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        return (y * scale).to(y.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_((self.weight.float() * self.ia3_l.float()).to(self.weight.dtype))  # (out,in)*(1,in)|(out,1)
        if self.bias is not None:
            bias = self.bias.float() if self.is_feedforward else self.bias.float() * self.ia3_l.float().flatten()
            out.bias.copy_(bias.to(self.bias.dtype))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, feedforward={self.is_feedforward}"


def apply_ia3(model: nn.Module, cfg: IA3Config) -> list[str]:
    """Wrap the target linears of ``model`` in :class:`IA3Linear`. Returns the wrapped module names."""
    cfg.validate()
    targets = expand_targets(model, cfg.target_modules)
    names = find_targets(model, targets, nn.Linear, key="peft.ia3.target_modules")
    ff = set(cfg.feedforward_modules)
    for name in names:
        feedforward = name.rsplit(".", 1)[-1] in ff or any(name.endswith("." + f) for f in ff)
        set_module(model, name, IA3Linear(model.get_submodule(name), feedforward))
    return names


def merge_ia3(model: nn.Module) -> int:
    """Fold every :class:`IA3Linear` into a plain ``nn.Linear`` in place. Returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, IA3Linear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).merged_linear())
    return len(names)
