"""Batch arithmetic, checked before any work starts.

    global_batch_size = micro_batch_size x data_parallel_size x accumulate_grad_batches
    data_parallel_size = devices x num_nodes / (tensor_parallel x pipeline_parallel x context_parallel)

Give any two of global, micro and accumulate; the third is derived. A combination that cannot
work raises :class:`~lmforge.errors.ConfigError` naming the formula, the numbers and the nearest
values that would work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmforge.errors import ConfigError

FORMULA = "global_batch_size = micro_batch_size x data_parallel_size x accumulate_grad_batches"
DP_FORMULA = ("data_parallel_size = trainer.devices x trainer.num_nodes / "
              "(model.tensor_model_parallel_size x model.pipeline_model_parallel_size x model.context_parallel_size)")


@dataclass(frozen=True)
class BatchPlan:
    """Resolved batch sizes; ``global_batch_size == micro_batch_size * data_parallel_size * accumulate_grad_batches``."""

    global_batch_size: int
    micro_batch_size: int
    accumulate_grad_batches: int
    data_parallel_size: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest_multiples(value: int, step: int) -> list[int]:
    """The multiples of ``step`` just below and just above ``value`` (positive ones only)."""
    lower = (value // step) * step
    return [m for m in (lower, lower + step) if m > 0]


def _closest(values: list[int], target: int, limit: int = 8) -> list[int]:
    """Up to ``limit`` of ``values`` closest to ``target``, in increasing order."""
    return sorted(sorted(values, key=lambda v: (abs(v - target), v))[:limit])


def _fmt_set(values: list[int]) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


def data_parallel_size(devices: int, num_nodes: int, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> int:
    """``devices x num_nodes / (tensor_parallel x pipeline_parallel)``; ConfigError unless a whole number >= 1."""
    for key, value in (("trainer.devices", devices), ("trainer.num_nodes", num_nodes),
                       ("model.tensor_model_parallel_size", tensor_parallel),
                       ("model.pipeline_model_parallel_size", pipeline_parallel)):
        _check_positive(key, value)
    world = devices * num_nodes
    model_parallel = tensor_parallel * pipeline_parallel
    if world % model_parallel == 0:
        return world // model_parallel
    valid_worlds = " or ".join(str(w) for w in _nearest_multiples(world, model_parallel))
    valid_mp = ", ".join(str(d) for d in _divisors(world))
    raise ConfigError(
        f"trainer.devices x trainer.num_nodes = {devices} x {num_nodes} = {world} processes is not divisible by "
        f"model.tensor_model_parallel_size x model.pipeline_model_parallel_size = {tensor_parallel} x "
        f"{pipeline_parallel} = {model_parallel}: {DP_FORMULA} must be a whole number; nearest valid: "
        f"devices x num_nodes = {valid_worlds}, or tensor x pipeline parallel size in {{{valid_mp}}}")


def _check_positive(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def resolve_batch(global_batch_size: Optional[int], micro_batch_size: Optional[int],
                  accumulate_grad_batches: Optional[int], devices: int = 1, num_nodes: int = 1,
                  tensor_parallel: int = 1, pipeline_parallel: int = 1, dims=None) -> BatchPlan:
    """Derive the missing one of global batch, micro batch and gradient accumulation.

    Args:
        global_batch_size: ``model.global_batch_size`` (samples per optimizer step), or None to derive.
        micro_batch_size: ``model.micro_batch_size`` (samples per process per forward pass), or None.
        accumulate_grad_batches: ``trainer.accumulate_grad_batches``, or None.
        devices, num_nodes: ``trainer.devices`` and ``trainer.num_nodes``.
        tensor_parallel, pipeline_parallel: model-parallel sizes; the rest of the processes are data parallel.
        dims: a :class:`~lmforge.parallel.dims.ParallelDims`; when given, its ``dp`` is the data-parallel
            size and ``devices`` .. ``pipeline_parallel`` are not read.

    Returns:
        A :class:`BatchPlan` with all four numbers.

    Raises:
        ConfigError: fewer than two given, a value not a positive integer, a combination that
            cannot work, or three given that disagree. The message shows the formula, the numbers
            and the nearest valid values.
    """
    if dims is None:
        from lmforge.parallel.dims import ParallelDims

        data_parallel_size(devices, num_nodes, tensor_parallel, pipeline_parallel)  # the divisibility message
        dims = ParallelDims(devices * num_nodes, tp=tensor_parallel, pp=pipeline_parallel)
    dp = dims.dp
    dp_text = f"data_parallel_size = {dp}"
    g, m, a = global_batch_size, micro_batch_size, accumulate_grad_batches
    given = {"model.global_batch_size": g, "model.micro_batch_size": m, "trainer.accumulate_grad_batches": a}
    for key, value in given.items():
        if value is not None:
            _check_positive(key, value)
    missing = [key for key, value in given.items() if value is None]
    if len(missing) > 1:
        raise ConfigError(f"{' and '.join(missing)} are not set: give two of model.global_batch_size, "
                          f"model.micro_batch_size and trainer.accumulate_grad_batches ({FORMULA}), e.g. "
                          f"model.micro_batch_size=4 model.global_batch_size={4 * dp}")

    if g is None:
        return BatchPlan(m * dp * a, m, a, dp)

    if m is None:
        step = dp * a
        if g % step == 0:
            return BatchPlan(g, g // step, a, dp)
        options = [f"{v} (micro_batch_size {v // step})" for v in _nearest_multiples(g, step)]
        hint = ""
        if g % dp == 0:
            hint = f"; or trainer.accumulate_grad_batches in {_fmt_set(_closest(_divisors(g // dp), a))}"
        raise ConfigError(
            f"model.global_batch_size={g} is not a multiple of data_parallel_size x accumulate_grad_batches = "
            f"{dp} x {a} = {step}: {FORMULA} ({dp_text}); nearest valid: {' or '.join(options)}{hint}")

    if a is None:
        step = m * dp
        if g % step == 0:
            return BatchPlan(g, m, g // step, dp)
        options = [f"{v} (accumulate {v // step})" for v in _nearest_multiples(g, step)]
        if g % dp == 0:
            hint = f"; or model.micro_batch_size in {_fmt_set(_closest(_divisors(g // dp), m))}"
        else:
            hint = (f"; no micro_batch_size fits: model.global_batch_size must be a multiple of "
                    f"data_parallel_size = {dp}")
        raise ConfigError(
            f"model.global_batch_size={g} is not a multiple of micro_batch_size x data_parallel_size = "
            f"{m} x {dp} = {step}: {FORMULA} ({dp_text}); nearest valid: {' or '.join(options)}{hint}")

    if m * dp * a != g:
        hint = ""
        if g % (m * dp) == 0:
            hint = f" (it would be {g // (m * dp)})"
        raise ConfigError(
            f"model.global_batch_size={g} disagrees with micro_batch_size x data_parallel_size x "
            f"accumulate_grad_batches = {m} x {dp} x {a} = {m * dp * a}: {FORMULA} ({dp_text}); "
            f"set trainer.accumulate_grad_batches=null to derive it{hint}, or model.global_batch_size={m * dp * a}")
    return BatchPlan(g, m, a, dp)


def check_world_size(plan_devices: int, num_nodes: int, world_size: int) -> None:
    """Refuse a run whose process count differs from the config's ``devices x num_nodes``.

    Args:
        plan_devices: ``trainer.devices`` (processes per node the config plans for).
        num_nodes: ``trainer.num_nodes``.
        world_size: the number of processes torchrun actually started (``WORLD_SIZE``).
    """
    planned = plan_devices * num_nodes
    if planned == world_size:
        return
    if world_size % num_nodes == 0:
        fix = f"trainer.devices={world_size // num_nodes} trainer.num_nodes={num_nodes}"
    else:
        fix = f"trainer.devices={world_size} trainer.num_nodes=1"
    raise ConfigError(
        f"{world_size} process(es) were started, but trainer.devices x trainer.num_nodes = {plan_devices} x "
        f"{num_nodes} = {planned}: set {fix}, or start {planned} processes "
        f"(torchrun --nproc-per-node {plan_devices} --nnodes {num_nodes})")
