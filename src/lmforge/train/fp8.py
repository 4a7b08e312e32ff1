"""FP8 training: torchao's float8 linear layers on a decoder's block projections, bf16 everywhere else.

``trainer.precision=fp8`` (or NeMo's ``model.fp8=true``) trains in bf16-mixed precision with the seven projections
of every block (q, k, v, o, gate, up, down) swapped for torchao float8 linears
(:class:`lmforge.train.fp8_linear.Float8Projection`, a ``torchao.float8.Float8Linear``): their three matmuls
(forward, input gradient, weight gradient) run in float8 on the tensor cores with dynamic scales, per tensor
(``model.fp8_recipe=tensorwise``), per row (``rowwise``), or per row with the weight gradient's matmul in bf16
(``rowwise_with_gw_hp``, torchao's most accurate recipe). With the joint projections on (``model.fused_projections=true``;
left unset they are off under float8: compiled on an H100 the joined step measured 5% slower) q/k/v and gate/up
run as one float8 matmul each (one scaling of their shared input): four float8 GEMMs per block instead of seven. The embedding, the output head, the norms, attention and a MoE router stay in
bf16 (the head's logits and the router's choices are where float8's 3-bit mantissa hurts). The swapped modules
subclass ``nn.Linear`` and keep their names and Parameters, so checkpoints are unchanged.

Float8 all-gather under FSDP (``model.fp8_fsdp_all_gather``, torchao's ``enable_fsdp_float8_all_gather``, as torchtitan
wires it): with tensorwise scaling and FSDP sharding over more than one rank, each projection's weight shard is cast to
float8 before FSDP gathers it (half the bytes of a bf16 all-gather), with the scale of the whole weight (its amax
all-reduced over the shards, or precomputed for all weights at once by one all-reduce after each optimizer step:
:func:`precompute_scales`, an optimizer step hook). The gathered float8 weight goes straight into the matmul. ``auto``
turns it on where it applies only once :data:`FSDP_ALL_GATHER_AUTO` is True (it is not yet: the gloo test shows the
same losses and weights as the bf16 all-gather in fp32 and float8-rounding differences in bf16, but no GPU has timed
it); ``true`` where it cannot apply is refused. Joint projections (``model.fused_projections=true``) and float8
all-gather weights do not mix (each gathered weight carries its own float8 scale): ``true`` with them is refused,
``auto`` keeps the joint projections.

Needs torchao (``pip install 'lmforge[fp8]'``) and an NVIDIA GPU with float8 tensor cores (compute capability
8.9 or later: H100, H200, L4, L40S, RTX 4090); anything else is refused with one line before any work.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmforge.errors import ConfigError

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao Float8LinearConfig recipe names
KEY = "model.fp8=true (trainer.precision=fp8)"
#: ``model.fp8_fsdp_all_gather`` values
ALL_GATHER_SETTINGS = ("auto", "true", "false")
#: whether ``auto`` turns float8 all-gather on where it applies. False until a GPU run has timed it and checked its
#: loss (docs/benchmarks.md); the CPU gloo test shows it correct (tests/train/test_fp8_fsdp.py)
FSDP_ALL_GATHER_AUTO = False
#: the block projections that go float8 (by their last name component, inside ``layers.``)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_problem(device: torch.device) -> Optional[str]:
    """Why float8 training cannot run on ``device`` (one line naming the key), or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"{KEY} needs an NVIDIA GPU with float8 tensor cores (compute capability 8.9+: H100, H200, L40S, "
                f"RTX 4090); this run is on {device.type}: drop model.fp8 / use trainer.precision=bf16-mixed")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9) or torch.version.hip:
        name = torch.cuda.get_device_name(device)
        return (f"{KEY} needs float8 tensor cores (compute capability 8.9+: H100, H200, L40S, RTX 4090); {name} has "
                f"{major}.{minor}: use trainer.precision=bf16-mixed")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return f"{KEY} needs torchao, which is not installed: pip install 'lmforge[fp8]' (or torchao)"
    return None


def is_fp8_target(module: nn.Module, name: str) -> bool:
    """Whether the module named ``name`` is converted: a plain ``nn.Linear`` block projection (never the output
    head, an embedding or a MoE router) whose sizes are multiples of 16 (float8 matmuls need them)."""
    if type(module) is not nn.Linear:
        return False
    parts = name.split(".")
    if "layers" not in parts or parts[-1] not in PROJECTIONS:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def fsdp_all_gather(setting, recipe: str, shard_ranks: int, joint_projections: bool) -> bool:
    """Whether float8 all-gather is on: ``setting`` (``model.fp8_fsdp_all_gather``: auto | true | false) for a run
    with ``recipe`` whose FSDP shards each weight over ``shard_ranks`` ranks (1: not sharded) and joint projections
    on or off. It applies with tensorwise scaling, sharding over more than one rank and no joint projections.

    Raises:
        ConfigError: ``true`` where it does not apply, or a value not in :data:`ALL_GATHER_SETTINGS`.
    """
    setting = str(setting).lower()
    if setting not in ALL_GATHER_SETTINGS:
        raise ConfigError(f"model.fp8_fsdp_all_gather={setting!r} is not one of: {', '.join(ALL_GATHER_SETTINGS)}")
    if setting == "false":
        return False
    why = None
    if recipe != "tensorwise":
        why = (f"needs model.fp8_recipe=tensorwise (one scale per weight), not {recipe}: use the tensorwise recipe or "
               f"model.fp8_fsdp_all_gather=auto/false")
    elif shard_ranks <= 1:
        why = ("needs FSDP sharding over more than one rank (model.fsdp=true with several data-parallel ranks per "
               "shard group); this run does not all-gather weights: set model.fp8_fsdp_all_gather=auto/false")
    elif joint_projections:
        why = ("does not mix with joint projections (model.fused_projections=true: one float8 matmul over q/k/v "
               "needs one scale, each gathered weight has its own): drop one of the two")
    if setting == "true" and why:
        raise ConfigError(f"model.fp8_fsdp_all_gather=true {why}")
    return why is None and (setting == "true" or FSDP_ALL_GATHER_AUTO)


@torch.no_grad()
def precompute_scales(model: nn.Module) -> None:
    """After an optimizer step: the float8 scales of every all-gather weight of ``model`` from one all-reduce of
    their amaxes (torchao's ``precompute_float8_dynamic_scale_for_fsdp``), instead of one all-reduce per weight at
    its all-gather. Nothing to do for a model without float8 all-gather weights."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def precompute_scales_after_steps(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run :func:`precompute_scales` on ``model`` after every step ``optimizer`` takes (a step a gradient scaler skips
    changes no weight and runs no hook). Returns the hook's handle."""
    return optimizer.register_step_post_hook(lambda *_: precompute_scales(model))


def unwrap_all_gather_weight(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a float8 all-gather weight (torchao's ``WeightWithDynamicFloat8CastTensor``, also as a DTensor's
    local shard) replaced by the high-precision tensor it wraps: the same storage, so a checkpoint writes it and
    loading fills it in place (safetensors and DCP cannot read the wrapper's storage). Other tensors unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        local = t.to_local()
        if type(local).__name__ != "WeightWithDynamicFloat8CastTensor":
            return t
        return DTensor.from_local(local._tensor, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(),
                                  run_check=False)
    return t._tensor if type(t).__name__ == "WeightWithDynamicFloat8CastTensor" else t


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False,
              fsdp_all_gather: bool = False) -> list[str]:
    """Swap the block projections of ``model`` for torchao float8 linears (:class:`Float8Projection`, which
    :func:`~lmforge.models.transformer.set_joint_projections` joins), in place. Returns the converted names.
    ``emulate``: torchao's emulated float8 matmuls (any device, for tests; training uses the tensor cores).
    ``fsdp_all_gather``: FSDP gathers the weights in float8 (see :func:`fsdp_all_gather`; the weights become torchao's
    ``WeightWithDynamicFloat8CastTensor``, and :func:`precompute_scales` must run after each optimizer step).

    Raises:
        ConfigError: an unknown recipe, or no module to convert.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"model.fp8_recipe={recipe!r} is not known; use one of {', '.join(RECIPES)}")
    if fsdp_all_gather and recipe != "tensorwise":
        raise ConfigError(f"model.fp8_fsdp_all_gather=true needs model.fp8_recipe=tensorwise, not {recipe}")
    import dataclasses

    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear_utils import swap_linear_layers

    from lmforge.train.fp8_linear import Float8Projection

    names = [n for n, m in model.named_modules() if is_fp8_target(m, n)]
    if not names:
        raise ConfigError(f"{KEY}: the model has no block projection to run in float8 (sizes must be multiples of "
                          f"16)")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate or fsdp_all_gather:
        config = dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp_all_gather)
    chosen = set(names)
    swap_linear_layers(model, lambda m: Float8Projection.from_float(m, config=config),
                       module_filter_fn=lambda m, fqn: fqn in chosen)
    return names
