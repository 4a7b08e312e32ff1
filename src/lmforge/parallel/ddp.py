"""Data parallelism: one full replica per data-parallel rank, gradients averaged.

Two ways, one meaning:

* :func:`apply_data_parallel`: DDP around the objective when every process is a data-parallel rank (it
  overlaps the all-reduce with backward; gloo on CPU, NCCL on GPU).
* :func:`average_gradients`: an explicit all-reduce over the data-parallel group after backward, for layouts
  DDP cannot wrap: tensor-parallel parameters (DTensors) and pipeline stages driven by a schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.parallel.runtime import Runtime

BUCKET_ELEMENTS = 25 * 2**20 // 4  # about 25 MB of float32 per all-reduce, DDP's default bucket


def apply_data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Wrap ``model`` in DDP when more than one process runs; otherwise return it unchanged.

    The caller keeps the plain module for saving: DDP's ``module.`` prefix never reaches a checkpoint.
    """
    if not runtime.distributed:
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


@torch.no_grad()
def average_gradients(parameters, group, size: int) -> None:
    """Average the gradients of ``parameters`` over ``group`` (``size`` ranks holding the same parameters):
    flattened into buckets of one dtype, summed with one all-reduce each, divided by ``size``. A DTensor's
    gradient is averaged shard by shard (the ranks of ``group`` hold the same shard)."""
    if size == 1:
        return
    grads = []
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            grads.append(g.to_local() if hasattr(g, "to_local") else g)
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for same in by_dtype.values():
        bucket, n = [], 0
        for g in same + [None]:
            if g is not None:
                bucket.append(g)
                n += g.numel()
            if bucket and (g is None or n >= BUCKET_ELEMENTS):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                flat /= size
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, n = [], 0
