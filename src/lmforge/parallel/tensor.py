"""Tensor parallelism with DTensor plans (``torch.distributed.tensor.parallel``), applied from outside the model.

Megatron's layout, written as torchtitan writes it: in every block q/k/v and gate/up are column-parallel (each
rank computes its share of the heads and of the MLP's hidden units), o and down are row-parallel (partial
outputs summed across the tensor-parallel group); the token embedding is vocabulary-parallel (each rank holds
``V / tp`` rows) and the output head too, and the loss is computed on the vocabulary-sharded logits without
gathering them (:func:`sharded_cross_entropy`, PyTorch's ``loss_parallel``). Norms, position embeddings and
everything between the blocks stay replicated.

The model itself does not change: the attention views its heads as ``(B, T, -1, head_dim)``, so a rank's
projections give it ``heads / tp`` heads; names stay, and the state dict holds DTensors of the full shapes.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError


def tensor_parallel_problems(cfg, tp: int) -> list[str]:
    """Why ``cfg`` (a :class:`~lmforge.models.config.ModelConfig`) cannot be split over ``tp`` ranks (empty: it can)."""
    if tp == 1:
        return []
    key = "model.tensor_model_parallel_size"
    problems = []
    kv = cfg.num_query_groups or cfg.num_attention_heads
    for name, value in (("num_attention_heads", cfg.num_attention_heads), ("num_query_groups", kv),
                        ("ffn_hidden_size", cfg.ffn_hidden_size), ("vocab_size (padded)", cfg.vocab_size)):
        if value % tp:
            problems.append(f"{key}={tp} does not divide model.{name}={value}; use a tensor-parallel size that "
                            f"divides it")
    problems += [f"{key}={tp}: {what} are not supported under tensor parallelism yet; use FSDP (model.fsdp=true)"
                 for what in tensor_parallel_unsupported(cfg)]
    return problems


def tensor_parallel_unsupported(cfg) -> list[str]:
    """The kinds of model in ``cfg`` that lmforge's tensor parallelism (training's and serving's) does not split
    yet, named for a message (empty: none)."""
    kinds = []
    if cfg.position_embedding_type == "alibi":
        kinds.append("ALiBi models (Falcon-RW, Baichuan2-13B: their per-head slopes are not split)")
    if cfg.num_moe_experts is not None:
        kinds.append("mixture-of-experts models (Mixtral)")
    if cfg.parallel_attn_mlp:
        kinds.append("parallel attention + MLP blocks (Falcon)")
    return kinds


def check_tensor_parallel(cfg, tp: int, sequence_parallel: bool = False) -> None:
    """Raise one ConfigError listing every reason ``cfg`` cannot be split over ``tp`` ranks."""
    problems = tensor_parallel_problems(cfg, tp)
    if sequence_parallel and tp == 1:
        problems.append("model.sequence_parallel=true splits the tensor-parallel group's sequence: set "
                        "model.tensor_model_parallel_size above 1, or model.sequence_parallel=false")
    if sequence_parallel and cfg.position_embedding_type == "learned_absolute":
        problems.append("model.sequence_parallel=true with learned position embeddings (GPT) is not supported yet: "
                        "use model.sequence_parallel=false (tensor parallelism alone works)")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "tensor parallelism:\n  - " + "\n  - ".join(problems))


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (a :class:`~lmforge.models.transformer.Transformer`) over the 1-D ``tp_mesh``, in place.

    With ``sequence_parallel`` (``model.sequence_parallel``, Megatron's SP) the residual stream between the
    projections, the norms and the dropouts is split along the sequence too: each rank keeps ``T / tp``
    positions there, the attention and the MLP all-gather the sequence on the way in, and o / down
    reduce-scatter it on the way out (instead of all-reducing), so those activations take ``1 / tp`` of the memory.

    Returns the model; its loss must then be computed with :func:`sharded_cross_entropy` inside
    :func:`loss_context` (the vocabulary-sharded head).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    check_tensor_parallel(model.cfg, tp_mesh.size(), sequence_parallel)
    between = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout
    plan = {}
    if model.embed_tokens is not None:  # (a pipeline stage's view holds only its own modules)
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.lm_head is not None:  # untied head: its rows (the vocabulary) sharded like the embedding's
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    if sequence_parallel and model.norm is not None:
        plan["norm"] = SequenceParallel()  # a DTensor out: the loss gathers the sequence (CausalLMLoss)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    for block in blocks_of(model):
        attn, mlp = block.self_attn, block.mlp
        if getattr(attn, "qkv_proj", None) is not None or getattr(mlp, "gate_up_proj", None) is not None:
            raise ConfigError("fused q/k/v or gate/up projections are for serving only; train the model unfused")
        block_plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                      "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=between),
                      "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(output_layouts=between)}
        if hasattr(mlp, "gate_proj"):
            block_plan["mlp.gate_proj"] = ColwiseParallel()
        if sequence_parallel:
            norms = ["input_layernorm", "post_attention_layernorm"]
            norms += [n for n in ("attn_output_norm", "mlp_output_norm") if not isinstance(getattr(block, n), nn.Identity)]
            block_plan.update({n: SequenceParallel(use_local_output=True) for n in norms})
            # attention is called as (x, rope, kv_cache, start_pos, positions, attn_mask): gather x's sequence
            block_plan["self_attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                                         desired_input_layouts=(Replicate(), None, None, None, None, None),
                                                         use_local_output=True)
            block_plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True)
        parallelize_module(block, tp_mesh, block_plan)
        attn.n_heads //= tp_mesh.size()  # the heads this rank computes (only counts and ratios read them)
        attn.n_kv_heads //= tp_mesh.size()
    model._tp_mesh = tp_mesh
    return model


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: a Transformer's ``layers`` list, or a pipeline stage's
    ``layers`` dict (keyed by the layer's index in the whole model)."""
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def tp_mesh_of(model: nn.Module):
    """The tensor-parallel mesh ``model`` was sharded over, or None."""
    return getattr(model, "_tp_mesh", None)


def sharded_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          logit_softcap: Optional[float] = None) -> torch.Tensor:
    """Per-token cross-entropy (fp32) with the output head ``weight`` sharded by vocabulary rows (a DTensor).

    ``hidden`` (N, C) is the same on every rank of the group; the logits stay sharded (N, V / tp), and the
    softmax's max and sum are reduced across the group (``loss_parallel``); call it, and the backward pass,
    inside :func:`loss_context`. Returns the (N,) losses as a plain tensor, equal on every rank.
    """
    from torch.distributed.tensor import DTensor, Replicate

    from lmforge.models.transformer import softcap

    h = DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)
    logits = F.linear(h, weight).float()  # (N, V/tp) per rank: Shard(-1)
    if logit_softcap is not None:
        logits = softcap(logits, logit_softcap)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return losses.full_tensor() if isinstance(losses, DTensor) else losses


def loss_context(model: nn.Module):
    """``loss_parallel()`` for a tensor-parallel model (around the forward and backward), else nothing."""
    if tp_mesh_of(model) is None:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _by_mesh(parameters) -> dict:
    """Parameters with gradients grouped by where their gradients live: (mesh, placements) or (plain, device)."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(p)
    return groups


def squared_norm(parameters, device=None) -> torch.Tensor:
    """The summed squares of the gradients of ``parameters`` (float32 scalar), DTensor shards gathered per mesh."""
    from torch.distributed.tensor import DTensor

    squares = []
    for params in _by_mesh(parameters).values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    device = squares[0].device if squares else (device or torch.device("cpu"))
    return torch.stack([s.to(device) for s in squares]).sum() if squares else torch.zeros((), device=device)


def clip_with_norm(parameters, max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients of ``parameters`` (any mix of meshes) by ``max_norm / total`` where that is below 1."""
    from torch.distributed.tensor import DTensor

    for params in _by_mesh(parameters).values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(params[0].grad.device)
                                            if not isinstance(params[0].grad, DTensor) else total)


def grad_norm(parameters, sum_group=None) -> torch.Tensor:
    """The global 2-norm of the gradients of ``parameters``, any mix of plain tensors and DTensors on different meshes
    (tensor-parallel weights, FSDP shards, replicated norms): a 0-dim plain device tensor (not read back: the
    training loop reads it at logging steps). The training loop clips with it (:func:`clip_with_norm`, or inside
    the fused optimizer's step: :func:`lmforge.train.optim.clips_in_step`).

    ``sum_group``: a process group whose ranks hold different parameters (pipeline stages): their squared norms
    are summed across it."""
    square = squared_norm(parameters)
    if sum_group is not None:  # a rank with no gradients still takes part in the sum
        import torch.distributed as dist

        dist.all_reduce(square, group=sum_group)
    return square.sqrt()


def clip_grad_norm(parameters, max_norm: float, sum_group=None) -> torch.Tensor:
    """Clip gradients by their global 2-norm (:func:`grad_norm`) in place. Returns the norm before clipping."""
    parameters = list(parameters)
    total = grad_norm(parameters, sum_group)
    clip_with_norm(parameters, max_norm, total)
    return total
