"""Where this process runs: rank, world size and device, read once from torchrun's environment.

No global state: the :class:`Runtime` is created by the stage and passed down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def pick_device(accelerator: str, local_rank: int = 0) -> torch.device:
    """``accelerator`` is ``auto`` (CUDA when present), ``gpu``/``cuda`` or ``cpu``."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible; use trainer.accelerator=cpu")
        return torch.device("cuda", local_rank)
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    raise ConfigError(f"trainer.accelerator={accelerator!r} is not known; use auto, gpu or cpu")


def init_runtime(accelerator: str = "auto", timeout_minutes: float = 30) -> Runtime:
    """Start torch.distributed when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(accelerator, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        kwargs = dict(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
        if device.type == "cuda":
            kwargs.update(backend="nccl", device_id=device)  # binds the rank to its GPU (no guessing)
        dist.init_process_group(**kwargs)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
