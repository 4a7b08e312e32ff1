"""Data parallelism: one full replica per process, gradients averaged by DDP (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.parallel.runtime import Runtime


def apply_data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Wrap ``model`` in DDP when more than one process runs; otherwise return it unchanged.

    The caller keeps the plain module for saving: DDP's ``module.`` prefix never reaches a checkpoint.
    """
    if not runtime.distributed:
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
