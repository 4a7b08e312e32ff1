"""fp16 loss scaling (``trainer.precision=16``) for every parallel layout.

torch's ``GradScaler`` unscales the gradients of a device and dtype with one fused call, which refuses a
list that mixes DTensors with plain tensors: under tensor parallelism the sharded weights have DTensor
gradients and the replicated ones (norms, some biases, position embeddings) plain ones, so NeMo's fp16
command with ``model.tensor_model_parallel_size=4`` failed at its first step. ``ParallelGradScaler`` unscales
each DTensor gradient through its local shard (the same values, in place) and then adds up the "found
inf/NaN" flag over all ranks, so a step is skipped on every rank or on none (each tensor-parallel rank
sees only its own shards, so one rank alone may overflow). Its ``step`` skips or takes the optimizer step
itself (the unscale has run): the fused AdamW kernel, handed the scaler's flag as a plain tensor beside
DTensor parameters, would refuse the same mix.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class ParallelGradScaler(torch.amp.GradScaler):
    """A ``torch.amp.GradScaler`` whose unscale accepts DTensor gradients and agrees on overflow across ranks."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        """Unscale in place (local shards of DTensors); returns {device: found_inf} as the base class does."""
        from torch.distributed.tensor import DTensor

        grads = defaultdict(list)  # (device, dtype) -> tensors to unscale in place
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    grad = param.grad
                    if grad is None:
                        continue
                    if not allow_fp16 and grad.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    local = grad.to_local() if isinstance(grad, DTensor) else grad
                    grads[(local.device, local.dtype)].append(local)
            found = {}
            for (device, _), tensors in grads.items():
                if device not in found:
                    found[device] = found_inf.to(device)
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, found[device], inv_scale.to(device))
        if not found:  # no gradient on this rank: it still takes part in the agreement below
            found[found_inf.device] = found_inf
        return found

    def unscale_(self, optimizer) -> None:
        """Unscale, then sum each device's overflow flag over all ranks (every rank skips the same steps)."""
        super().unscale_(optimizer)
        if not (self.is_enabled() and dist.is_available() and dist.is_initialized()):
            return
        nccl = dist.get_backend() == "nccl"
        for flag in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            if nccl and flag.device.type == "cpu":  # CPU-offloaded gradients: NCCL reduces device tensors only
                on_device = flag.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_device)
                flag.copy_(on_device)
            else:
                dist.all_reduce(flag)

    def step(self, optimizer, *args, **kwargs):
        """Step unless a rank found inf/NaN; a fused optimizer is stepped like any other (after ``unscale_``)."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not fused:
            return super().step(optimizer, *args, **kwargs)
        optimizer._step_supports_amp_scaling = False
        try:
            return super().step(optimizer, *args, **kwargs)
        finally:
            optimizer._step_supports_amp_scaling = fused
