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
def all_reduce_(tensors: list[torch.Tensor], group) -> None:
    """Sum ``tensors`` in place over ``group``: flattened into buckets of one dtype and device (about
    ``BUCKET_ELEMENTS`` each), one all-reduce a bucket."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for same in by_dtype.values():
        bucket, n = [], 0
        for t in same + [None]:
            if t is not None:
                bucket.append(t)
                n += t.numel()
            if bucket and (t is None or n >= BUCKET_ELEMENTS):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, n = [], 0


@torch.no_grad()
def average_gradients(parameters, group, size: int) -> None:
    """Average the gradients of ``parameters`` over ``group`` (``size`` ranks holding the same parameters). A
    DTensor's gradient is averaged shard by shard (the ranks of ``group`` hold the same shard)."""
    if size == 1:
        return
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters if p.grad is not None]
    all_reduce_(grads, group)
    torch._foreach_div_(grads, float(size))
