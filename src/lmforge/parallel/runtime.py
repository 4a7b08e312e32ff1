"""Where this process runs: rank, world size and device, read once from torchrun's environment.

No global state: the :class:`Runtime` is created by the stage and passed down.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError
from lmforge.stop_markers import mark as mark_stopped, stopped_to_resume


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


def run_on_runtime(stage_run, cfg, runtime: Optional[Runtime], console_log, t0: Optional[float] = None) -> dict:
    """``stage_run(cfg, rt, console_log, t0)`` on ``runtime``, else on a runtime started here for
    ``cfg.trainer.accelerator`` and shut down when the stage ends (however it ends); ``t0`` is the start time
    (default: once the runtime is up).

    No rank returns before every rank has finished the stage (rank 0 its loss curve and summary.json): a run
    stopped early exits 75 on every rank, and torchrun's agent takes a rank's non-zero exit for a failure and kills
    the ranks still running, rank 0 in the middle of writing its summary included. Such a rank writes its stop
    marker (:mod:`lmforge.stop_markers`) before that barrier: the launcher reads torchrun's exit 1 as 75 by it."""
    own = runtime is None
    rt = runtime or init_runtime(cfg.trainer.accelerator)
    try:
        summary = stage_run(cfg, rt, console_log, time.perf_counter() if t0 is None else t0)
        if stopped_to_resume(summary):
            mark_stopped(rt.rank)
        rt.barrier()
        return summary
    finally:
        if own:
            shutdown(rt)


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively. CUDA GPUs before Ampere (compute capability < 8.0: V100,
    T4, ...) do not: torch emulates bf16 there (``torch.cuda.is_bf16_supported()`` says True), slowly and without
    bf16 tensor cores. The CPU counts as native (its autocast runs bf16 kernels)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    if torch.version.hip:  # ROCm: capabilities are not CUDA's
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def training_precision(precision: str, device: torch.device, fp16_supported: bool = True) -> tuple[str, str | None]:
    """The precision a run trains in, and a one-line note when it is not the one asked for.

    ``bf16-mixed`` (the recipes' default) on a GPU without native bf16 becomes ``16-mixed``: fp16 autocast with
    dynamic loss scaling (the GradScaler), as NeMo users on V100 run. Where fp16 is not supported by the run's
    layout (``fp16_supported=False``: expert parallelism), bf16 stays, emulated, and the note says so.
    """
    if precision != "bf16-mixed" or has_native_bf16(device):
        return precision, None
    if not fp16_supported:
        return precision, (f"note: {_gpu_name(device)} has no native bf16; training stays in bf16-mixed (emulated, "
                           f"slow): fp16 is not supported with this parallel layout yet")
    return "16-mixed", (f"note: {_gpu_name(device)} has no native bf16: training in fp16 with loss scaling "
                        f"(trainer.precision=16-mixed) instead of bf16-mixed")


def inference_dtype(device: torch.device) -> tuple[torch.dtype, str | None]:
    """The ``auto`` dtype for inference on ``device``: float32 on the CPU, bfloat16 on a GPU with native bf16,
    float16 (and a one-line note) on an older GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32, None
    if has_native_bf16(device):
        return torch.bfloat16, None
    return torch.float16, f"note: {_gpu_name(device)} has no native bf16: running in float16"
