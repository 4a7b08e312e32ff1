"""The one training loop.

Pretraining uses it now; fine-tuning and alignment will use it through another objective. A step
consumes one global batch: every data-parallel rank runs ``accumulate`` micro-batches of its own
slice, gradients are averaged across ranks, clipped, and the optimizer steps once.

Which samples a rank reads is a pure function of the step (Megatron's pretraining sampler): global
batch ``s`` is samples ``[s*G, (s+1)*G)``; micro-batch ``k`` of rank ``r`` is the ``mbs`` samples
starting at ``s*G + (k*dp + r)*mbs``. So one process with accumulation 2 and two processes with
accumulation 1 see the same global batch, and a resumed run continues on exactly the next sample.

A dataset item is either a token array (pretraining: every next token counts) or a dict of equal-length
arrays with ``tokens`` and optionally ``loss_mask``, ``positions`` and ``segment_ids`` (fine-tuning,
packed rows): the objective is called with the dict's entries as keyword arguments. The loss is
always the sum over the counted tokens of the global batch divided by their global count.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.runtime import Runtime
from lmforge.train.optim import clip_scale, clips_in_step, set_lr, step_with_clip

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def peak_memory(device: torch.device) -> dict:
    """``{"peak_memory_gib": ...}``: the most GPU memory this process has allocated on ``device`` since it started
    (``torch.cuda.max_memory_allocated``, a host-side counter: no device sync), logged with each training line; ``{}``
    off CUDA."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def _now() -> float:
    """The clock of trainer.max_time (a function, so tests can replace it)."""
    return time.monotonic()


@dataclass
class LoopSettings:
    max_steps: int
    micro_batch_size: int
    global_batch_size: int
    accumulate: int
    val_check_interval: int = 0  # 0: no validation during training
    limit_val_batches: int = 0
    log_every_n_steps: int = 10
    gradient_clip_val: float = 1.0
    precision: str = "32"
    every_n_train_steps: int = 0  # extra checkpoints between validations; 0: only at validation and the end
    num_workers: int = 0  # DataLoader worker processes reading and collating micro batches ahead (0: inline)
    max_time_s: Optional[float] = None  # stop after saving once fit() ran this long (trainer.max_time)


@dataclass
class TrainState:
    """Everything besides weights and optimizer a resumed run needs."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0
    tokens_trained: int = 0
    best_val_loss: Optional[float] = None
    history: list = field(default_factory=list)  # (step, loss) of logged steps, for the summary
    last_val: Optional[tuple] = None  # (step, val_loss) of the latest validation
    stopped_early: bool = False  # a signal asked the run to stop after saving
    time_limit_reached: bool = False  # this run stopped at its time limit (max_time_s) after saving

    def to_dict(self) -> dict:
        return dict(step=self.step, consumed_samples=self.consumed_samples, tokens_trained=self.tokens_trained,
                    best_val_loss=self.best_val_loss)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=int(d.get("step", 0)), consumed_samples=int(d.get("consumed_samples", 0)),
                   tokens_trained=int(d.get("tokens_trained", 0)), best_val_loss=d.get("best_val_loss"))


class MicroBatches:
    """Yields this rank's micro-batches of one global batch, from the step alone (see the module doc).

    The data-parallel size and rank come from ``dims`` (:class:`~lmforge.parallel.dims.ParallelDims`), never
    from the world size: ranks of one model replica read the same samples.
    """

    def __init__(self, dataset, settings: LoopSettings, runtime: Runtime, dims: Optional[ParallelDims] = None,
                 count_tokens: Optional[Callable] = None):
        self.dataset, self.s, self.rt = dataset, settings, runtime
        self.count_tokens = count_tokens or Trainer.counted_tokens  # a host micro batch's trained tokens
        self._loader, self._next_step = None, None  # DataLoader iterator (num_workers > 0) and the step it is at
        self.dims = dims or ParallelDims(runtime.world_size, runtime.rank)
        if settings.global_batch_size != settings.micro_batch_size * self.dims.dp * settings.accumulate:
            raise ValueError(f"global batch {settings.global_batch_size} != micro batch {settings.micro_batch_size} x "
                             f"data parallel {self.dims.dp} x accumulate {settings.accumulate}")

    def indices(self, step: int, micro: int) -> list[int]:
        return _indices(self.s, self.dims, len(self.dataset), step, micro)

    def batch(self, indices: Iterable[int]):
        """A (B, T+1) tensor of token rows, or for dict items a dict of such tensors, on the device."""
        return self._to_device(self.collate([self.dataset[i] for i in indices]))

    def collate(self, items: list):
        """Stack dataset items into CPU tensors (in a DataLoader worker when ``num_workers`` > 0): see
        :func:`_collate`."""
        return _collate(items, getattr(self.dataset, "collate", None), self.dims.tp)

    def _to_device(self, batch):
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if self.rt.device.type == "cuda":
            pinned = batch if batch.is_pinned() else batch.pin_memory()  # DataLoader workers pinned it already
            return pinned.to(self.rt.device, non_blocking=True)
        return batch

    def for_step(self, step: int):
        """This rank's micro batches of ``step``. With ``num_workers`` (``model.data.num_workers``) they are read
        and collated by DataLoader worker processes, ``num_workers x 2`` micro batches ahead, in the same order,
        into pinned memory, and copied to the GPU without waiting (``non_blocking``).

        ``step_counts`` lists the trained tokens of each micro batch yielded for this step (``count_tokens``),
        counted on the host before the copy (the loop reads them without a device sync)."""
        self.step_counts = []
        if self.s.num_workers <= 0:
            for micro in range(self.s.accumulate):
                cpu = self.collate([self.dataset[i] for i in self.indices(step, micro)])
                self.step_counts.append(self.count_tokens(cpu))
                yield self._to_device(cpu)
            return
        if self._loader is None or self._next_step != step:  # the first step read, or a jump (resume, evaluation)
            self._loader = iter(self._data_loader(step))
        for _ in range(self.s.accumulate):
            cpu = next(self._loader)
            self.step_counts.append(self.count_tokens(cpu))
            yield self._to_device(cpu)
        self._next_step = step + 1

    def _data_loader(self, first_step: int):
        """A DataLoader over this rank's micro batches from ``first_step`` on. Nothing it holds refers back to this
        object (no bound method, no generator over ``self``): were it in a reference cycle with the reader, the
        cyclic collector would free it, and it clears the loader's queues (their feeder threads end) before the
        iterator's ``__del__`` sends its workers the word to stop; each worker then waited out torch's 5 s join
        before being terminated, at every evaluation and at the end of training."""
        from torch.utils.data import DataLoader

        s, dims, n = self.s, self.dims, len(self.dataset)
        # read lazily by the loader, a few batches ahead: never a list of every remaining step's indices
        batches = (_indices(s, dims, n, step, micro) for step in range(first_step, max(s.max_steps, first_step + 1))
                   for micro in range(s.accumulate))
        collate = functools.partial(_collate, own=getattr(self.dataset, "collate", None), tp=dims.tp)
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=s.num_workers, collate_fn=collate,
                          pin_memory=self.rt.device.type == "cuda", prefetch_factor=2)


def _indices(s: LoopSettings, dims: ParallelDims, n: int, step: int, micro: int) -> list[int]:
    """The dataset indices (of ``n`` items) of micro batch ``micro`` of ``step`` on this data-parallel rank."""
    start = step * s.global_batch_size + (micro * dims.dp + dims.dp_rank) * s.micro_batch_size
    return [i % n for i in range(start, start + s.micro_batch_size)]


def _collate(items: list, own=None, tp: int = 1):
    """Stack dataset items into CPU tensors; ``own``: the dataset's own ``collate`` (preference pairs stack their
    items themselves).

    Dict rows are cut after the last column any row trains on (``loss_mask``): later columns are
    padding that neither counts nor, under causal attention, influences a counted token. The inputs keep a
    multiple of the tensor-parallel size ``tp`` (sequence parallelism splits them evenly), where the rows allow.
    """
    if own is not None:
        return own(items)
    if not isinstance(items[0], dict):
        return torch.from_numpy(np.stack([np.asarray(x, dtype=np.int64) for x in items]))
    out = {k: np.stack([np.asarray(x[k], dtype=np.int64) for x in items]) for k in items[0]}
    if "loss_mask" in out:
        used = np.flatnonzero(out["loss_mask"].any(axis=0))
        end = max(int(used[-1]) + 1 if used.size else 2, 2)
        end = min(-(-(end - 1) // tp) * tp + 1, out["loss_mask"].shape[1])
        out = {k: v[:, :end] for k, v in out.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


class StopRequested:
    """Set by SIGUSR1/SIGTERM (Slurm's walltime warning, preemption): save at the next step boundary, then stop."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Runs steps, validation, logging and checkpointing.

    Args:
        model: the objective to call, ``model(tokens) -> (loss_sum, n_tokens)`` (or ``model(**batch)``
            for dict batches): a :class:`~lmforge.train.objectives.CausalLMLoss`, possibly DDP-wrapped.
        raw_model: the plain model (gradient clipping; what is saved); under FSDP its parameters are DTensors.
        save_fn: ``save_fn(state, metrics)`` writes a checkpoint (all ranks call it).
        log: a MetricsLogger-like object with ``log(step, dict)`` and ``update(step, **kw)``.
        extra_val_fn: ``extra_val_fn(step) -> dict`` of more validation metrics, merged into the
            metrics a checkpoint is saved and ranked with.
        dims: the run's layout (data-parallel size and rank); default: every process is a data-parallel rank.
        loss_context: a context-manager factory around each forward and backward (``loss_parallel`` for a
            tensor-parallel model's sharded logits).
        grad_norm_fn: ``grad_norm_fn(parameters) -> norm``, the gradients' global 2-norm as a 0-dim plain tensor
            (gradients on several meshes, pipeline stages, expert groups); default torch's ``get_total_norm``.
        pipeline: a :class:`~lmforge.parallel.pipeline.PipelineRunner` (pipeline parallelism): it runs each step's
            micro batches through the pipeline schedule instead of the forward/backward loop.
        grad_sync: ``grad_sync()`` averages the gradients over the data-parallel ranks after a step's backward
            (tensor- or pipeline-parallel replicas, which DDP does not wrap); default: nothing (DDP, FSDP do it).
    """

    def __init__(self, model: nn.Module, raw_model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
                 runtime: Runtime, settings: LoopSettings, save_fn: Optional[Callable] = None, log=None,
                 scaler: Optional[torch.amp.GradScaler] = None,
                 extra_val_fn: Optional[Callable[[int], dict]] = None, dims: Optional[ParallelDims] = None,
                 loss_context: Optional[Callable] = None, grad_norm_fn: Optional[Callable] = None, pipeline=None,
                 grad_sync: Optional[Callable] = None):
        self.model, self.raw_model, self.opt, self.schedule = model, raw_model, optimizer, schedule
        self.dims = dims or ParallelDims(runtime.world_size, runtime.rank)
        if self.dims.world_size != runtime.world_size or (self.dims.pp != 1) != (pipeline is not None):
            raise ValueError(f"layout {self.dims} on {runtime.world_size} processes, pipeline runner "
                             f"{'given' if pipeline is not None else 'missing'}")
        self.pipeline = pipeline  # lmforge.parallel.pipeline.PipelineRunner when the model is split into stages
        self.loss_context = loss_context or contextlib.nullcontext  # tensor parallel: loss on sharded logits
        self.grad_norm_fn = grad_norm_fn  # parameters -> global norm; default torch's (see _clip)
        self.grad_sync = grad_sync  # () -> None: explicit gradient averaging over data-parallel replicas
        self.extra_val_fn = extra_val_fn  # step -> more validation metrics (generation scores); all ranks call it
        self.last_step_tokens = 0  # counted tokens of the latest global batch
        self.last_step_samples = 0  # samples the latest step read, over all data-parallel ranks
        self.objective = getattr(model, "module", model)  # without DDP, for evaluation
        # An objective may count its own units (preference pairs, not tokens): ``objective.count(batch)`` gives
        # a micro batch's units, or (units, more counts...) whose global totals reach ``objective.set_totals``
        # before the step's forwards; ``objective.pop_metrics(mode)`` gives sums (with "n") logged as means.
        self._count_fn = getattr(self.objective, "count", None)
        # ``tokens_trained`` counts tokens whatever the units: ``objective.count_tokens(batch)`` (an objective with
        # its own units: the completion tokens it trains), else the tokens whose loss counts (counted_tokens)
        self.count_tokens = getattr(self.objective, "count_tokens", None) or Trainer.counted_tokens
        self.last_step_trained_tokens = 0  # trained tokens of the latest global batch (tokens_trained)
        # val_ppl = exp(val_loss) only for an objective whose loss is a per-token NLL (``objective.token_nll``)
        self.token_nll = bool(getattr(self.objective, "token_nll", False))
        # what the logged rate counts: tokens, or the objective's own units ("pairs_per_s", "completions_per_s")
        self.rate_key = f"{getattr(self.objective, 'unit', 'tokens') if self._count_fn else 'tokens'}_per_s"
        self.rt, self.s, self.save_fn, self.log = runtime, settings, save_fn, log
        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision {settings.precision!r}")
        self.amp_dtype = PRECISIONS[settings.precision]
        self.scaler = scaler
        # Distributed runs: the latest step's (samples, counted units) summed over the data-parallel ranks, a device
        # tensor the loop reads at its logging steps (None: the step knew them on the host, see train_step)
        self.last_step_counts: Optional[torch.Tensor] = None
        self._flag_group = None  # see _host_group

    # -- pieces ---------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.rt.device.type, dtype=self.amp_dtype)

    def _all_reduce(self, values: list[float]) -> list[float]:
        """Sums over the data-parallel ranks: all processes summed, divided by tensor x pipeline x context parallel
        (the ranks of one data-parallel rank hold the same values; callers scale parts, see train_step)."""
        if not self.rt.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(t)
        return (t / (self.dims.world_size // self.dims.dp)).tolist()

    def _sum_on_device(self, values: list[float]) -> torch.Tensor:
        """:meth:`_all_reduce` without reading the result back: a float64 device tensor. The values reach the device
        through pinned memory without waiting (a plain host-to-device copy waits for the device's queue), so the host
        goes on queueing work; the loop reads the sums at its logging steps."""
        host = torch.tensor(values, dtype=torch.float64)
        if self.rt.device.type == "cuda":
            host = host.pin_memory()
        t = host.to(self.rt.device, non_blocking=True)
        dist.all_reduce(t)
        return t / (self.dims.world_size // self.dims.dp)

    def _host_group(self):
        """The process group of the loop's control flags (stop requested, time limit): gloo over host tensors, so
        agreeing on a flag never waits for the device. The default group when it is gloo already (CPU runs)."""
        if self._flag_group is None:
            self._flag_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._flag_group

    @staticmethod
    def counted_tokens(batch) -> int:
        """Tokens whose loss counts in a micro-batch (every next token of a tensor batch)."""
        if isinstance(batch, dict):
            if batch.get("loss_mask") is not None:
                mask = batch["loss_mask"][:, 1:]
                if mask.device.type == "cpu":  # a host batch (before its copy): numpy reads it, no device involved
                    return int(mask.numpy().sum())
                return int(mask.sum().item())
            return batch["tokens"][:, 1:].numel()
        return batch[:, 1:].numel()

    def _counts(self, batch) -> list[float]:
        """A micro batch's counts: [counted tokens], or the objective's own ([units, more...])."""
        if self._count_fn is None:
            return [float(self.counted_tokens(batch))]
        c = self._count_fn(batch)
        return [float(x) for x in c] if isinstance(c, (tuple, list)) else [float(c)]

    def objective_metrics(self, mode: str) -> dict:
        """Means of the statistics the objective gathered since the last call (all data-parallel ranks; every
        rank calls this), e.g. preference accuracies and reward margins; {} for an objective without any. Each sum
        is divided by the count ``"n"``, or by its own count ``"X#n"`` when the objective gives one."""
        pop = getattr(self.objective, "pop_metrics", None)
        if pop is None:
            return {}
        sums = pop(mode)
        keys = sorted(sums)
        values = self._all_reduce([float(sums[k]) for k in keys])
        totals = dict(zip(keys, values))
        counts = {k[:-2]: totals.pop(k) for k in keys if k.endswith("#n")}  # a statistic's own count ("X#n")
        n = totals.pop("n", 0.0)
        return {k: v / counts.get(k, n) for k, v in totals.items() if counts.get(k, n) > 0}

    def _call(self, objective, batch):
        return objective(**batch) if isinstance(batch, dict) else objective(batch)

    def train_step(self, batches: MicroBatches, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One optimizer step over one global batch. Returns (mean loss, grad norm) as 0-dim tensors on the device
        (grad norm None without clipping): nothing here waits for the device, so the host queues the next step
        while this one runs; ``float()`` them only when they are needed (the loop does at logging steps).

        An objective with a ``train_step(trainer, batches, step)`` method runs the step itself (online RL: rollouts
        from the step's prompts, then several optimizer steps over them) and returns the same pair."""
        own = getattr(self.objective, "train_step", None)
        if own is not None:
            return own(self, batches, step)
        self.model.train()
        lr = self.schedule.lr_at(step)
        set_lr(self.opt, lr)
        micro = list(batches.for_step(step))
        # Every token of the global batch weighs the same, on any number of ranks.
        host = getattr(batches, "step_counts", None)  # counted on the host before the copy: no device sync
        host = [float(c) for c in host] if host is not None and len(host) == len(micro) else None
        if self._count_fn is None and host is not None:
            counts = [[c] for c in host]
        else:
            counts = [self._counts(b) for b in micro]
        local = [sum(c[i] for c in counts) for i in range(len(counts[0]))] if counts else [0.0]
        trained = sum(host) if host is not None else \
            local[0] if self._count_fn is None else sum(float(self.count_tokens(b)) for b in micro)
        local_rows = sum(len(b["tokens"] if isinstance(b, dict) else b) for b in micro)
        self.last_step_counts = None
        if self.rt.distributed and len(local) == 1:
            # Summed on the device, not read back (that would wait for the device every step): the loss is scaled
            # by a device tensor, and the loop reads the samples, units and trained tokens at its logging steps
            # (check_losses in fit: the same sample check, the same token totals). Float64 throughout, as the host
            # path: same values.
            self.last_step_counts = self._sum_on_device([float(local_rows), *local, trained])
            self.last_step_samples = self.s.global_batch_size  # what the plan reads; checked at the logging step
            self.last_step_tokens = self.last_step_trained_tokens = 0  # added when read
            global_tokens = self.last_step_counts[1].clamp_min(1.0)

            def per_token(k: int) -> torch.Tensor:  # k / global tokens (k / t, not k * (1 / t): the host's value)
                return torch.full((), float(k), dtype=torch.float64, device=self.rt.device) / global_tokens
        else:
            global_rows, global_trained, *totals = self._all_reduce([float(local_rows), trained, *local])
            global_tokens = totals[0]
            if len(totals) > 1:  # the objective normalises its other terms by their global counts
                self.objective.set_totals(totals)
            self.last_step_tokens = int(global_tokens)
            self.last_step_trained_tokens = int(global_trained)
            self.last_step_samples = int(global_rows)  # read by all data-parallel ranks together
            self.check_samples(step, self.last_step_samples)
            global_tokens = max(global_tokens, 1.0)

            def per_token(k: int) -> float:
                return k / global_tokens
        loss_total = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        if self.pipeline is not None:
            if isinstance(micro[0], dict):
                raise ValueError("pipeline parallelism trains on token batches (pretraining) only")
            scale = per_token(self.dims.dp)
            if self.scaler is not None:  # fp16: each micro batch's loss also times the loss scale (unscaled below)
                scale = self.scaler.scale(torch.tensor(scale, dtype=torch.float32, device=self.rt.device))
            with self.loss_context(), self.autocast():
                loss_total += self.pipeline.train(micro, scale=scale)
            loss_total *= self.dims.pp  # only the last stage holds the loss; the sum below divides by tp x pp
            micro = []  # the schedule ran forward and backward
        scale = per_token(self.dims.dp * self.dims.cp) if micro else None
        for k, tokens in enumerate(micro):
            last = k == len(micro) - 1
            with self._gradient_sync(last), self.loss_context():
                with self.autocast():
                    loss_sum, _ = self._call(self.model, tokens)
                # DDP and FSDP average gradients over the data-parallel ranks: scale so the result is the
                # global token mean. (Context parallelism: they average over dp x cp ranks, and the cp ranks'
                # gradients, each of its part of the sequences, must add up: scale by cp more.)
                loss = loss_sum * (scale.to(loss_sum.dtype) if torch.is_tensor(scale) else scale)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_total += loss_sum.detach().double()
        if self.grad_sync is not None:
            self.grad_sync()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        grad_norm, clip = self._clip()
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            step_with_clip(self.opt, clip)
        self.opt.zero_grad(set_to_none=True)
        loss_total *= self.dims.cp  # context parallel: each rank holds its part's loss; the sum below divides by cp
        if self.rt.distributed:  # on the device: no wait here (see _all_reduce for the division)
            dist.all_reduce(loss_total)
            loss_total /= self.dims.world_size // self.dims.dp
        return loss_total / global_tokens, grad_norm

    def _clip(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Gradient clipping by the global 2-norm (``gradient_clip_val``): returns (the norm before clipping, a 0-dim
        device tensor; the factor the optimizer's step divides the gradients by, or None). Both None without clipping.

        With torch's fused AdamW and no fp16 scaler (:func:`~lmforge.train.optim.clips_in_step` decides) the
        gradients are not scaled here: the fused kernel divides them by ``max(1, (norm + eps) / max_norm)`` as it
        reads them (:func:`~lmforge.train.optim.step_with_clip`), the same update without a pass over every gradient.
        Otherwise they are scaled in place, as torch's ``clip_grad_norm_`` does."""
        max_norm = self.s.gradient_clip_val
        if not max_norm or max_norm <= 0:
            return None, None
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        if self.grad_norm_fn is not None:  # gradients on several meshes, stages or expert groups
            from lmforge.parallel.tensor import clip_with_norm as clip_in_place

            norm = self.grad_norm_fn(params)
        else:  # torch's clip_grad_norm_, in its two halves
            clip_in_place = torch.nn.utils.clip_grads_with_norm_
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        in_step = clips_in_step(self.opt, self.scaler)
        if not in_step:
            clip_in_place(params, max_norm, norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        return norm, clip_scale(norm, max_norm) if in_step else None

    def check_samples(self, step: int, samples: int) -> None:
        """The samples a step read over all data-parallel ranks must be the global batch."""
        if samples != self.s.global_batch_size:
            raise RuntimeError(f"step {step} read {samples} samples, not the global batch "
                               f"{self.s.global_batch_size}: the batch plan and the data-parallel layout disagree")

    def _gradient_sync(self, last: bool):
        """DDP: reduce gradients only after the last micro-batch of a step (``no_sync`` before it). FSDP
        reduce-scatters after every micro-batch: skipping it (``set_requires_gradient_sync(False)``) would keep
        each rank's whole unsharded fp32 gradients between micro-batches (28 GB for a 7B model), the memory
        sharding exists to save and that ``lmforge config --estimate`` does not count."""
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, dataset, limit_batches: int) -> float:
        """Mean next-token loss over the first ``limit_batches`` global batches of ``dataset``."""
        if dataset is None or limit_batches <= 0:
            return float("nan")
        self.model.eval()
        n_batches = min(limit_batches, max(1, len(dataset) // self.s.global_batch_size))
        settings = LoopSettings(**{**self.s.__dict__, "max_steps": n_batches})
        batches = MicroBatches(dataset, settings, self.rt, self.dims)
        loss_sum, count = 0.0, 0
        for step in range(n_batches):
            if self.pipeline is not None:
                micro = list(batches.for_step(step))
                with self.loss_context(), self.autocast():
                    loss_sum += self.pipeline.evaluate(micro) * self.dims.pp  # the last stage's; see train_step
                count += sum(self.counted_tokens(b) for b in micro)
                continue
            for tokens in batches.for_step(step):
                local = self._counts(tokens)
                if len(local) > 1:  # evaluation: each micro batch's own counts
                    self.objective.set_totals(local)
                with self.loss_context(), self.autocast():
                    l, n = self._call(self.objective, tokens)
                loss_sum += float(l)
                count += n
        loss_sum, count = self._all_reduce([loss_sum, float(count)])
        self.model.train()
        return loss_sum / max(count, 1)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, train_dataset, val_dataset, state: TrainState) -> TrainState:
        s = self.s
        batches = MicroBatches(train_dataset, s, self.rt, self.dims, self.count_tokens)
        first = train_dataset[0]
        fixed_tokens = None if isinstance(first, dict) else s.global_batch_size * (len(first) - 1)
        stop = StopRequested().install()
        kill_at = int(os.environ.get("LMFORGE_TEST_KILL_AT_STEP", "0"))  # fault injection for resume tests
        window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
        deadline = _now() + s.max_time_s if s.max_time_s else None
        # (step, loss tensor, the step's device counts or None) not read back yet: read at logging steps and before
        # saving, so a step queues the next one without waiting for the device
        unchecked: list = []

        def check_losses() -> None:
            """Read the losses (and, distributed, the sample and token counts) since the last check in one device
            sync; stop at the first loss that is not finite or count that breaks the batch plan. The counted tokens
            join the totals here (the tokens-per-second window and ``tokens_trained``, before any save)."""
            nonlocal window_tokens
            if not unchecked:
                return
            parts = [t.detach().double().reshape(1) for _, t, _ in unchecked]
            # (samples, units, trained tokens) of a distributed step
            parts += [c for _, _, c in unchecked if c is not None]
            values = torch.cat(parts).tolist()
            losses, counts = values[:len(unchecked)], values[len(unchecked):]
            for (at, _, _), value in zip(unchecked, losses):
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {at}; lower model.optim.lr or use "
                                             f"trainer.precision=bf16-mixed / gradient clipping")
            for i, at in enumerate(at for at, _, c in unchecked if c is not None):
                samples, units, tokens = counts[3 * i:3 * i + 3]
                self.check_samples(at - 1, int(samples))
                if fixed_tokens is None:  # as the host path adds int(units) and int(tokens) each step
                    state.tokens_trained += int(tokens)
                    window_tokens += int(units)
            unchecked.clear()

        try:
            while state.step < s.max_steps:
                loss_t, grad_norm = self.train_step(batches, state.step)
                tokens_per_step = fixed_tokens if fixed_tokens is not None else self.last_step_tokens  # rate's units
                state.step += 1
                state.consumed_samples += self.last_step_samples
                state.tokens_trained += fixed_tokens if fixed_tokens is not None else self.last_step_trained_tokens
                window_steps += 1
                window_tokens += tokens_per_step
                unchecked.append((state.step, loss_t, self.last_step_counts))
                if state.step % max(1, s.log_every_n_steps) == 0 or state.step == s.max_steps or state.step == 1:
                    check_losses()  # the one host sync of a logging step (the device finished the step by then)
                    loss = float(loss_t)
                    grad_norm = None if grad_norm is None else float(grad_norm)
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_steps, window_tokens = now, 0, 0
                    lr = self.schedule.lr_at(state.step - 1)
                    state.history.append((state.step, loss))
                    extra = self.objective_metrics("train")
                    if self.log is not None:
                        self.log.log(state.step, {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                                  self.rate_key: tps, "consumed_samples": state.consumed_samples,
                                                  **extra, **peak_memory(self.rt.device)})
                        self.log.update(state.step, loss=loss, lr=lr, rate=tps,
                                        unit=self.rate_key[:-len("_per_s")])
                metrics = None
                if s.val_check_interval and state.step % s.val_check_interval == 0 or state.step == s.max_steps:
                    if val_dataset is not None and s.limit_val_batches > 0:
                        check_losses()  # the steps before it count in the window validation ends
                        val_loss = self.evaluate(val_dataset, s.limit_val_batches)
                        metrics = {"val_loss": val_loss}
                        if self.token_nll:
                            metrics["val_ppl"] = math.exp(min(val_loss, 50.0))
                        if self.extra_val_fn is not None:
                            metrics.update(self.extra_val_fn(state.step))
                        state.last_val = (state.step, val_loss)
                        if state.best_val_loss is None or val_loss < state.best_val_loss:
                            state.best_val_loss = val_loss
                        if self.log is not None:
                            self.log.log(state.step, metrics)
                    window_t, window_steps, window_tokens = time.perf_counter(), 0, 0  # validation is not throughput
                periodic = s.every_n_train_steps and state.step % s.every_n_train_steps == 0
                stopping = self._any_rank(stop.flag)
                out_of_time = deadline is not None and self._any_rank(_now() >= deadline)
                if self.save_fn is not None and (metrics is not None or periodic or stopping or out_of_time
                                                 or state.step == s.max_steps):
                    check_losses()  # never save weights a non-finite loss has stepped
                    self.save_fn(state, metrics or {})
                    window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
                if kill_at and state.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stopping:
                    state.stopped_early = True
                    break
                if out_of_time and state.step < s.max_steps:
                    state.time_limit_reached = True
                    break
        finally:
            stop.restore()
        return state

    def _any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (every rank calls this at the same point). A host tensor over the
        gloo group (:meth:`_host_group`), read through numpy: the ranks agree without waiting for the device."""
        if not self.rt.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, group=self._host_group())
        return bool(t.numpy()[0] > 0)
