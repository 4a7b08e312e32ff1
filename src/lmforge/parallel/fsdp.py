"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``), applied from outside the model.

Each transformer block is its own FSDP unit (its parameters are all-gathered just before it runs and freed
after), and the root (the training objective, which owns the embedding, final norm and head) is the last
unit. Parameter names do not change: the model's state dict holds DTensors with the same keys, so a
checkpoint of a sharded model is the plain model's checkpoint, split.

Strategies (``model.fsdp_sharding_strategy``, NeMo's names):

* ``full``: parameters, gradients and optimizer state sharded; blocks free their gathered parameters after
  forward and gather them again for backward (ZeRO-3).
* ``grad``: the same shards at rest, but gathered parameters stay from forward to backward (ZeRO-2: less
  communication, more memory).
* ``hybrid``: ``full`` inside a node, replicated across nodes (HSDP, a 2-D mesh ``dp_replicate x dp_shard``).

Mixed precision: master weights, gradients and optimizer state stay in float32; blocks compute with
parameters cast to the run's precision (``bf16-mixed``/``16-mixed``) and gradients are reduced in
``model.fsdp_grad_reduce_dtype`` (float32 by default).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.runtime import Runtime

def reduce_dtype(value) -> torch.dtype:
    """``model.fsdp_grad_reduce_dtype`` (32 | bf16 | 16, NeMo's spellings) as a torch dtype."""
    from lmforge.config.schema import FSDP_REDUCE_DTYPES

    return getattr(torch, FSDP_REDUCE_DTYPES[str(value).lower()])


def ensure_process_group(runtime: Runtime) -> None:
    """FSDP needs a process group even on one process: start a single-rank one when torchrun did not."""
    if dist.is_initialized():
        return
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def apply_fsdp(objective: nn.Module, blocks: nn.ModuleList, dims: ParallelDims, runtime: Runtime,
               precision: str = "32", grad_reduce_dtype=32, cpu_offload: bool = False, mesh=None,
               inner: Optional[Callable] = None):
    """Shard ``blocks`` (one FSDP unit each) and then ``objective`` (the root) over the data-parallel mesh.

    Args:
        objective: the module the loop calls (e.g. :class:`~lmforge.train.objectives.CausalLMLoss` holding
            the model); becomes the root unit, so its forward gathers the embedding, norm and head.
        blocks: the model's transformer blocks (``model.layers``).
        dims: the run's layout; ``dims.fsdp`` picks the strategy.
        runtime: device and process group.
        precision: ``32``, ``bf16-mixed`` or ``16-mixed``: the dtype blocks compute in.
        grad_reduce_dtype: ``model.fsdp_grad_reduce_dtype``.
        cpu_offload: keep shards (parameters, gradients, optimizer state) in CPU memory.
        mesh: the run's mesh (:meth:`ParallelDims.build_mesh`) when it was built already (tensor parallelism).
        inner: ``inner(mp_policy=..., offload_policy=...)`` shards units inside the blocks first, over meshes of
            their own (expert parallelism's experts), with the same precision and offload policies.

    Returns:
        The mesh the model is sharded over.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    ensure_process_group(runtime)
    mesh = ParallelDims.fsdp_mesh(mesh if mesh is not None else dims.build_mesh(runtime.device.type))
    from lmforge.train.loop import PRECISIONS

    param_dtype, reduce = PRECISIONS[precision], reduce_dtype(grad_reduce_dtype)
    if mesh.size() == 1 and param_dtype is not None:
        # One replica, one shard: nothing is summed, so reducing in the compute dtype gives the same float32
        # gradient with one pass less over it.
        reduce = param_dtype
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    # ZeRO-2 keeps gathered parameters until backward; so does a single shard (there is nothing to free).
    reshard = dims.fsdp != "grad" and mesh.shape[-1] > 1  # the shard dimension (HSDP: the last)
    if inner is not None:
        inner(mp_policy=mp, offload_policy=offload)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them (torchtitan does too).
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard and i < len(blocks) - 1)
    fully_shard(objective, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return mesh


def whole_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of ``p``, gathered when it is a sharded DTensor (a collective: every rank calls it), else
    ``p``. With FSDP's CPU offload a shard lives in host memory while its mesh is the GPUs' (whose NCCL group
    gathers device tensors only): the shard is moved to the mesh's device first."""
    if not hasattr(p, "full_tensor"):
        return p
    local, mesh = p.to_local(), p.device_mesh
    if local.device.type != mesh.device_type:
        from torch.distributed.tensor import DTensor

        p = DTensor.from_local(local.to(mesh.device_type), mesh, p.placements, shape=p.shape, stride=p.stride())
    return p.full_tensor()


def is_fsdp(module: nn.Module) -> bool:
    """True when ``module`` was sharded with ``fully_shard``."""
    return hasattr(module, "unshard") and hasattr(module, "set_requires_gradient_sync")


@contextlib.contextmanager
def gathered(root: Optional[nn.Module]):
    """Run code that calls the model outside the root's forward (generation during validation) under FSDP:
    the root's parameters are gathered for the block and freed after. A no-op for unsharded modules."""
    if root is None or not is_fsdp(root):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()
