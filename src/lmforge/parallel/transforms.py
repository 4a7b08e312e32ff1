"""Transformations applied to a plain model from outside (torchtitan's order: checkpointing, then compile).

Both keep parameter names unchanged, so checkpoints of a transformed model load into a plain one.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward pass instead of keeping them ("full" granularity)."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each block separately with torch.compile (blocks share one compiled graph; names unchanged)."""
    for block in model.layers:
        block.compile()
    return model
