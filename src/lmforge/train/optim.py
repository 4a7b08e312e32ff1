"""Optimizers and learning-rate schedules.

The optimizer follows NeMo's defaults: AdamW with decoupled weight decay on matrices and
embeddings, none on biases and norm weights. ``fused_adam`` uses PyTorch's fused AdamW kernel
(CUDA, and CPU on recent torch); ``adamw`` the multi-tensor (foreach) one.

Gradient clipping with the fused kernel costs no pass of its own (:func:`clips_in_step`): the training loop computes
the global norm and hands the clip factor to the kernel, which divides each gradient by it as it reads it.

The schedule is a pure function of the step, so a resumed run needs nothing but the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lmforge.errors import ConfigError

OPTIMIZERS = ("fused_adam", "adamw", "adam")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's groups: :func:`decay_groups`, each split by tensor kind where needed.

    Under tensor parallelism the sharded weights are DTensors and the replicated ones (norms, position
    embeddings) plain tensors; the fused and multi-tensor AdamW kernels take one list per group and refuse that
    mix, so a group holding both is split in two (DTensors first), with the same settings.
    """
    return [part for group in decay_groups(model, weight_decay) for part in _by_tensor_kind(group)]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: 2-D and larger decay, 1-D (biases, norm weights) do not. An unsharded
    checkpoint's optimizer state is indexed in this order (on any layout)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _by_tensor_kind(group: dict) -> list[dict]:
    """``group`` as is, or two groups (DTensor parameters, plain ones) when it holds both."""
    from torch.distributed.tensor import DTensor

    dtensors = [p for p in group["params"] if isinstance(p, DTensor)]
    if not dtensors or len(dtensors) == len(group["params"]):
        return [group]
    plain = [p for p in group["params"] if not isinstance(p, DTensor)]
    return [{**group, "params": dtensors}, {**group, "params": plain}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas, eps: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters.

    Args:
        name: ``fused_adam`` (fused kernel), ``adamw`` or ``adam`` (multi-tensor AdamW; NeMo's
            ``adam`` with weight decay is decoupled as well).
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"model.optim.name={name!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
    betas = tuple(float(b) for b in betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"model.optim.betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9,0.95]")
    kwargs = dict(lr=lr, betas=betas, eps=eps)
    if name == "fused_adam" and _fused_supported(device):
        kwargs["fused"] = True
    elif device.type == "cuda":
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, weight_decay), **kwargs)


def _fused_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # Fused AdamW on the CPU exists from torch 2.4 on; try it on a scrap parameter.
    try:
        p = nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


# torch.nn.utils.clip_grads_with_norm_ scales by max_norm / (norm + 1e-6) where that is below 1
CLIP_EPS = 1e-6


def clips_in_step(optimizer: torch.optim.Optimizer, scaler=None) -> bool:
    """Whether gradient clipping is folded into ``optimizer``'s step (:func:`step_with_clip`) instead of scaling the
    gradients first: the one place that decides.

    True for torch's fused Adam / AdamW (every group ``fused=True``) without an fp16 loss scaler. That kernel divides
    each gradient by ``optimizer.grad_scale`` as it reads it (AMP's unscale, ``_step_supports_amp_scaling``) and,
    with the factor set, writes the clipped gradient back (so they hold the clipped values after the step, as
    before): clipping costs the kernel that extra write instead of ``_foreach_mul_``'s read and write of every
    gradient, one pass over the fp32 gradients fewer. It holds for DTensor parameters too (FSDP2 shards,
    tensor-parallel weights; checked on gloo CPU ranks): a 0-dim plain tensor beside DTensors is replicated implicitly.
    With a loss scaler the attribute is the scaler's (the fp16 path scales the gradients as before)."""
    if scaler is not None and scaler.is_enabled():
        return False
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or not optimizer.param_groups:
        return False
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return False  # someone else's (a scaler's) factor: leave it alone
    return all(group.get("fused") for group in optimizer.param_groups)


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor the fused kernel divides the gradients by to clip them to ``max_norm``: ``max(1, (norm + eps) /
    max_norm)`` (the inverse of torch's clip coefficient, same eps), a float32 tensor on ``norm``'s device (no
    host sync). A non-finite norm gives what clipping gives: inf zeroes finite gradients, NaN makes them NaN."""
    return ((norm.detach().float() + CLIP_EPS) / float(max_norm)).clamp(min=1.0)


def step_with_clip(optimizer: torch.optim.Optimizer, scale: Optional[torch.Tensor]) -> None:
    """``optimizer.step()`` with the gradients divided by ``scale`` inside the fused kernel (``scale`` None: a plain
    step). The attribute is removed afterwards, even when the step raises, so no later step reads a stale one."""
    if scale is None:
        optimizer.step()
        return
    optimizer.grad_scale = scale
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


@dataclass(frozen=True)
class CosineAnnealing:
    """NeMo's CosineAnnealing: linear warmup, cosine decay to ``min_lr``, then ``min_lr`` held for
    the last ``constant_steps`` steps.

    ``lr_at(step)`` gives the learning rate for optimizer step ``step`` (0-based).
    """

    lr: float
    max_steps: int
    warmup_steps: int = 0
    constant_steps: int = 0
    min_lr: float = 0.0

    def lr_at(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = self.max_steps - self.warmup_steps - self.constant_steps
        if decay_steps <= 0 or step >= self.warmup_steps + decay_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / decay_steps
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Constant:
    lr: float

    def lr_at(self, step: int) -> float:
        return self.lr


SCHEDULES = ("CosineAnnealing", "constant", "none")


def build_schedule(name: str | None, lr: float, max_steps: int, warmup_steps: int = 0, constant_steps: int = 0,
                   min_lr: float = 0.0):
    if name in (None, "none", "constant", "Constant"):
        return Constant(lr)
    if name == "CosineAnnealing":
        return CosineAnnealing(lr=lr, max_steps=max_steps, warmup_steps=int(warmup_steps or 0),
                               constant_steps=int(constant_steps or 0), min_lr=float(min_lr or 0.0))
    raise ConfigError(f"model.optim.sched.name={name!r} is not supported; use one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
