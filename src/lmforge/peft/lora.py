"""LoRA and DoRA: a trainable low-rank update beside frozen linear weights.

``y = W x + b + (alpha / r) * B(A(dropout(x)))`` with ``A`` (r, in) drawn like a Linear's weight and
``B`` (out, r) zero, so training starts from the base model (Hu et al., 2021). DoRA (Liu et al., 2024)
also learns a per-output-row magnitude ``m``: the weight becomes ``m * (W + sBA) / ||W + sBA||`` with
the norm taken per row and treated as a constant in the backward pass, as Hugging Face peft does.

:func:`apply_lora` swaps each target ``nn.Linear`` for a :class:`LoRALinear` that keeps the base
``weight``/``bias`` Parameters under their own names, so the keys are ``...q_proj.weight`` (base)
and ``...q_proj.lora_A.weight``, ``...q_proj.lora_B.weight``, ``...q_proj.lora_magnitude_vector``.

Speed (the format stays the same): the LoRA weights are fp32 master copies cast to the compute dtype (autocast's,
else the input's) at use, so a bf16 base runs its low-rank matmuls in bf16 and keeps no fp32 copy of the input
(``LoRALinear.master_cast``; False restores the old fp32 update of a bf16 input). Sibling projections of one
input (q/k/v, gate/up) joined by :func:`lmforge.models.transformer.set_joint_projections` run as one base matmul
and one ``x @ [A_q; A_k; A_v]`` (:meth:`LoRALinear.joint_forward`), when none has dropout or DoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.peft.core import ATTENTION_LINEARS, expand_targets, find_targets, set_module


@dataclass
class LoRAConfig:
    """LoRA settings (Hugging Face peft's names).

    Attributes:
        r: rank of the update.
        lora_alpha: the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the update's input.
        target_modules: short or full module names (``q_proj``, ``mlp.down_proj``) or ``"all-linear"``.
        use_dora: learn a magnitude vector too (DoRA).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(ATTENTION_LINEARS))
    use_dora: bool = False

    def validate(self) -> None:
        if int(self.r) < 1:
            raise ConfigError(f"peft.lora.r={self.r} must be a positive integer (8, 16, 64 are common)")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"peft.lora.lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("peft.lora.target_modules is empty; name modules such as [q_proj, v_proj] or all-linear")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA (optionally DoRA) update.

    Args:
        base: the linear layer to adapt; its ``weight`` and ``bias`` Parameters are reused as they are.
        r, alpha, dropout, use_dora: see :class:`LoRAConfig`.
        dtype: of the LoRA weights (default fp32, whatever the base dtype: optimizer state stays exact).
    """

    #: plain LoRA: cast A and B to the compute dtype at use (fp32 masters, bf16 matmuls on a bf16 input). False:
    #: the input is cast to the LoRA weights' dtype instead (an fp32 update and an fp32 copy of a bf16 input).
    master_cast = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_dora: bool = False,
                 dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.scaling, self.use_dora = int(r), float(alpha) / int(r), bool(use_dora)
        device = base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_magnitude_vector = None
        self.adapter_disabled = False
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initialises weights (Kaiming uniform), B zero, magnitude = row norms of W."""
        if self.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_magnitude_vector is not None:
            self.lora_magnitude_vector.copy_(torch.linalg.norm(self.weight.float(), dim=1))

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (out, in) in the LoRA dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.adapter_disabled:  # the base layer alone (alignment's reference model: peft.adapters_disabled)
            return result
        if self.lora_magnitude_vector is None and self.master_cast:
            dtype = _compute_dtype(x)
            xd = self.lora_dropout(x).to(dtype)
            update = F.linear(F.linear(xd, self.lora_A.weight.to(dtype)), self.lora_B.weight.to(dtype))
            return result + (update * self.scaling).to(result.dtype)
        xd = self.lora_dropout(x)
        if not torch.is_autocast_enabled():
            xd = xd.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(xd))  # (..., out), unscaled
        if self.lora_magnitude_vector is None:
            return result + (update * self.scaling).to(result.dtype)
        # DoRA: rescale rows of W + sBA to the learned magnitude; the norm is a constant for autograd.
        lora_w = self.lora_B.weight @ self.lora_A.weight
        with torch.no_grad():
            norm = torch.linalg.norm(self.weight.to(lora_w.dtype) + self.scaling * lora_w, dim=1)
        scale = (self.lora_magnitude_vector / norm).view(*([1] * (x.dim() - 1)), -1)  # (1.., out)
        if isinstance(self.lora_dropout, nn.Identity):
            base = result if self.bias is None else result - self.bias
        else:
            base = F.linear(xd.to(self.weight.dtype), self.weight)
        dora = (scale - 1) * base + scale * update * self.scaling
        return result + dora.to(result.dtype)

    @staticmethod
    def can_join(parts: list) -> bool:
        """Siblings of one input can share ``x @ [A_1; ...; A_n]``: plain LoRA (no DoRA), no dropout (one input for
        all; peft draws a mask per module), LoRA weights in the compute dtype at use (``master_cast``)."""
        return all(p.lora_magnitude_vector is None and isinstance(p.lora_dropout, nn.Identity) for p in parts) \
            and LoRALinear.master_cast and len({p.bias is None for p in parts}) == 1

    @staticmethod
    def joint_forward(x: torch.Tensor, parts: list) -> list[torch.Tensor]:
        """The outputs of sibling LoRA linears ``parts`` of one input ``x``: the frozen base weights as one matmul
        (:func:`~lmforge.models.transformer.joint_linear`), the low-rank inputs as one ``x @ [A_1; ...].T``, then each
        part's ``B``. Same values as calling each part (each ``B`` sees its own rank's columns)."""
        from lmforge.models.transformer import joint_linear

        dtype = _compute_dtype(x)
        base = joint_linear(x, [p.weight for p in parts], [p.bias for p in parts])  # (..., sum out)
        xa = F.linear(x.to(dtype), torch.cat([p.lora_A.weight for p in parts]).to(dtype))  # (..., sum r)
        outs = []
        for y, a, p in zip(base.split([q.out_features for q in parts], dim=-1),
                           xa.split([q.r for q in parts], dim=-1), parts):
            if p.adapter_disabled:  # the base layer alone (alignment's reference model)
                outs.append(y)
                continue
            outs.append(y + (F.linear(a, p.lora_B.weight.to(dtype)) * p.scaling).to(y.dtype))
        return outs

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight folds the update in (same dtype and device as the base)."""
        w32 = self.weight.float() + self.delta_weight().float()
        if self.lora_magnitude_vector is not None:
            w32 = w32 * (self.lora_magnitude_vector.float() / torch.linalg.norm(w32, dim=1))[:, None]
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(w32.to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when it is on, else ``x``'s: what the base matmul of ``x`` runs in."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every target linear of ``model`` in a :class:`LoRALinear`. Returns the wrapped module names.

    Raises:
        ConfigError: a bad setting, or a target name that matches no linear module (the message lists them).
    """
    cfg.validate()
    targets = expand_targets(model, cfg.target_modules)
    names = find_targets(model, targets, nn.Linear, key="peft.lora.target_modules")
    for name in names:
        base = model.get_submodule(name)
        set_module(model, name, LoRALinear(base, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` of ``model`` into a plain ``nn.Linear`` in place. Returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).merged_linear())
    return len(names)
