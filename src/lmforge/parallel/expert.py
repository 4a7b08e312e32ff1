"""Expert parallelism for mixture-of-experts models (Mixtral), applied from outside the model (torchtitan's way).

``model.expert_model_parallel_size = ep`` spreads the experts of every :class:`~lmforge.models.transformer.MoE`
layer over ``ep`` data-parallel ranks. The data-parallel ranks form groups of ``ep`` consecutive ranks (the
*expert-parallel group*); rank ``i`` of a group keeps experts ``[i*E/ep, (i+1)*E/ep)`` of each layer, under their
own names (``layers.0.mlp.experts.3.gate_proj.weight``: ``experts`` becomes an ``nn.ModuleDict`` keyed by the
global index), so checkpoints keep the names of the plain model. Everything else (attention, norms, embeddings,
each layer's router) stays replicated, as under plain data parallelism.

A forward of a MoE layer on one rank:

1. the (replicated) router picks ``k`` experts for each of this rank's tokens (:meth:`MoE.route`, unchanged);
2. the token copies are sorted by expert and sent with an all-to-all to the rank of the group that holds it;
3. each local expert runs on the rows it received (from every rank of the group);
4. a second all-to-all brings the outputs back, and they are summed per token with the router weights.

Both all-to-alls are differentiable (``all_to_all_single_autograd`` of torch's functional collectives, the
one torchtitan uses; it runs on gloo and NCCL), so backward sends each row's gradient back the same way.

Gradients (:meth:`ExpertParallel.reduce_gradients`, the Trainer's ``grad_sync``, once per step after the last
micro batch's backward):
non-expert parameters are averaged over all data-parallel ranks by DDP, which is told to ignore the expert
parameters; an expert's gradient already sums the tokens of its whole expert-parallel group, and is summed
over the *expert-data-parallel group* (the ``dp / ep`` ranks holding the same experts; nothing to do when
``ep == dp``) and divided by ``dp``, which gives exactly the gradient of one process seeing the global batch.
Clipping uses the global norm (:meth:`ExpertParallel.grad_norm`, the Trainer's ``grad_norm_fn``): the squared norms
of the expert gradients are summed over the expert-parallel group (each expert counted once), the replicated ones
added once.

Router load balancing is unchanged: its statistics (:attr:`MoE.aux_stats`) are this rank's own tokens, routed
before any dispatch, exactly as under data parallelism (each rank's micro batch adds its own term; the counts
are not pooled over ranks).

What it does not combine with yet (refused by :meth:`~lmforge.parallel.dims.ParallelDims.check_supported` and the
config checks): FSDP, tensor, pipeline and context parallelism, PEFT, ``model.compile`` and fp16 (``16-mixed``:
the grad scaler would skip steps on some ranks only). Pretraining builds the model on the meta device and
allocates only what a rank holds after this transformation (each weight initialised from the seed and its name, so
the values are the whole model's); a model with real weights simply drops the experts it does not hold.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError

KEY = "model.expert_model_parallel_size"


def expert_parallel_problems(cfg, ep: int) -> list[str]:
    """Why ``cfg`` (a :class:`~lmforge.models.config.ModelConfig`) cannot spread its experts over ``ep`` ranks."""
    if ep == 1:
        return []
    if cfg.num_moe_experts is None:
        return [f"{KEY}={ep} spreads the experts of a mixture-of-experts model, but this model has none: set "
                f"model.num_moe_experts (e.g. 8, with model.moe_router_topk=2), or {KEY}=1"]
    if cfg.num_moe_experts % ep:
        return [f"{KEY}={ep} does not divide model.num_moe_experts={cfg.num_moe_experts}: every rank of an "
                f"expert-parallel group holds the same number of experts; use a size that divides it"]
    return []


@dataclass
class ExpertParallel:
    """What :func:`apply_expert_parallel` set up: the groups, and the step's gradient work for the trainer."""

    ep: int
    ep_rank: int
    dp: int
    ep_group: object  # the ranks that split the experts between them (and exchange tokens)
    edp_group: Optional[object]  # the ranks that hold the same experts (None when ep == dp: nothing to average)
    layers: list = field(default_factory=list)  # the MoE modules, each holding this rank's experts
    sharded: bool = False  # FSDP: experts sharded over the expert-data-parallel ranks (which reduce their gradients)
    absent_parameters: int = 0  # elements of the experts other ranks hold (for the parameter count)

    @property
    def expert_params(self) -> list:
        """This rank's expert parameters, in model order (read when asked: allocating a model built on the meta
        device replaces its parameter objects)."""
        return [p for moe in self.layers for expert in moe.experts.values() for p in expert.parameters()]

    def ignore_in_ddp(self, module: nn.Module) -> None:
        """Tell DDP (before wrapping ``module``) not to average the expert parameters: each rank holds others."""
        from torch.nn.parallel import DistributedDataParallel

        ids = {id(p) for p in self.expert_params}
        names = [n for n, p in module.named_parameters() if id(p) in ids]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Expert gradients -> the global-batch gradient: sum over the expert-data-parallel group, divide by dp.

        The loop scales each rank's loss by ``dp / global tokens`` for DDP's average; an expert's gradient holds
        the tokens its expert-parallel group sent it, so the sum over the ranks holding the same experts covers
        every token once, ``dp`` times too large."""
        grads = []
        for p in self.expert_params:
            if p.grad is None:  # no token reached it in any micro batch: a zero gradient all the same
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if not grads:
            return
        if self.sharded:  # FSDP averaged over the dp / ep ranks holding these experts (see shard)
            torch._foreach_div_([g.to_local() if hasattr(g, "to_local") else g for g in grads], float(self.ep))
            return
        if self.edp_group is not None:
            from lmforge.parallel.ddp import all_reduce_

            all_reduce_(grads, self.edp_group)
        torch._foreach_div_(grads, float(self.dp))

    def shard(self, mesh, **fsdp_kwargs) -> None:
        """FSDP for the experts (before the blocks are sharded): each expert its own unit over ``mesh``, the ranks
        holding the same experts (dp / ep of them). Their reduce-scatter averages over those ranks; then
        :meth:`reduce_gradients` divides by ep, so an expert's gradient is the sum over its ranks divided by dp,
        as for replicated experts. (FSDP's own divide factor would need PREMUL_SUM, which gloo lacks.)"""
        from torch.distributed.fsdp import fully_shard

        for moe in self.layers:
            for expert in moe.experts.values():  # each is called every step on every rank (with or without tokens)
                fully_shard(expert, mesh=mesh, **fsdp_kwargs)
        self.sharded = True

    def grad_norm(self, parameters) -> torch.Tensor:
        """The global 2-norm of the gradients: replicated gradients once, expert gradients summed over the
        expert-parallel group (FSDP shards of either kind gathered per mesh)."""
        from lmforge.parallel.tensor import squared_norm

        parameters = [p for p in parameters if p.grad is not None]
        expert_params = self.expert_params
        ids = {id(q) for q in expert_params}
        experts = [p for p in parameters if id(p) in ids]
        others = [p for p in parameters if id(p) not in ids]
        device = expert_params[0].device if expert_params else torch.device("cpu")
        expert_square = squared_norm(experts, device)
        dist.all_reduce(expert_square, group=self.ep_group)
        return (squared_norm(others, device) + expert_square).sqrt()

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip by the global 2-norm (:meth:`grad_norm`) in place. Returns the norm before clipping."""
        from lmforge.parallel.tensor import clip_with_norm

        parameters = [p for p in parameters if p.grad is not None]
        total = self.grad_norm(parameters)
        if parameters:
            clip_with_norm(parameters, max_norm, total)
        return total


def expert_groups(dims) -> tuple[object, Optional[object], int]:
    """(expert-parallel group, expert-data-parallel group or None, this rank's index in its expert-parallel group).

    Expert-parallel groups are ``ep`` consecutive data-parallel ranks (innermost, as torchtitan splits its
    data-parallel mesh dimension); the ranks at the same index of every group hold the same experts.
    Collective: every rank calls it (each group is created on every rank, in the same order)."""
    if dims.dp != dims.world_size:
        raise ConfigError(f"{KEY}={dims.ep} combines with data parallelism only for now (tensor, pipeline and "
                          f"context parallel sizes 1)")
    ep, dp = dims.ep, dims.dp
    ep_ranks = [list(range(start, start + ep)) for start in range(0, dp, ep)]
    ep_group, _ = dist.new_subgroups_by_enumeration(ep_ranks)
    edp_group = None
    if dp > ep:
        edp_ranks = [list(range(i, dp, ep)) for i in range(ep)]
        edp_group, _ = dist.new_subgroups_by_enumeration(edp_ranks)
    return ep_group, edp_group, dims.dp_rank % ep


def apply_expert_parallel(model: nn.Module, dims) -> ExpertParallel:
    """Keep this rank's share of every MoE layer's experts and route tokens to the others by all-to-all.

    In place, on the plain :class:`~lmforge.models.transformer.Transformer` (with its weights, or still on the
    meta device, before DDP wraps it). ``dims``: the run's :class:`~lmforge.parallel.dims.ParallelDims`; torch.distributed must be
    initialised. Returns the :class:`ExpertParallel` the trainer calls after backward and for clipping.

    Raises:
        ConfigError: ``dims.ep`` does not divide the experts, the model has no MoE layer, or other parallelism
            than data parallelism is in the layout.
    """
    from lmforge.models.transformer import MoE

    problems = expert_parallel_problems(model.cfg, dims.ep)
    if problems:
        raise ConfigError(problems[0])
    ep_group, edp_group, ep_rank = expert_groups(dims)
    plan = ExpertParallel(ep=dims.ep, ep_rank=ep_rank, dp=dims.dp, ep_group=ep_group, edp_group=edp_group)
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        per_rank = moe.num_experts // dims.ep
        local = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
        experts = list(moe.experts)
        plan.absent_parameters += sum(p.numel() for e, x in enumerate(experts) if e not in local
                                      for p in x.parameters())
        moe.experts = nn.ModuleDict({str(e): experts[e] for e in local})  # the global index keeps the names
        moe.ep, moe.ep_rank, moe.ep_group = dims.ep, ep_rank, ep_group
        moe.run_experts = types.MethodType(_run_experts_parallel, moe)
        plan.layers.append(moe)
    return plan


def _run_experts_parallel(moe, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """:meth:`MoE.run_experts` across the expert-parallel group (see the module docstring, steps 2-4)."""
    import torch.distributed._functional_collectives as funcol

    ep, per_rank = moe.ep, moe.num_experts // moe.ep
    n, k = chosen.shape
    flat = chosen.reshape(-1)  # (N*k,) the expert of every token copy
    order = torch.argsort(flat, stable=True)  # copies grouped by expert, hence by the rank that holds it
    token = order // k  # the token of each sorted copy
    # How many copies go to each expert; every rank learns how many it gets from each rank for each local expert.
    send_per_expert = torch.bincount(flat, minlength=moe.num_experts)
    recv_per_expert = torch.empty_like(send_per_expert)
    dist.all_to_all_single(recv_per_expert, send_per_expert, group=moe.ep_group)
    send_splits = send_per_expert.view(ep, per_rank).sum(dim=1).tolist()
    recv_counts = recv_per_expert.view(ep, per_rank)  # [source rank, local expert]
    recv_splits = recv_counts.sum(dim=1).tolist()
    received = funcol.all_to_all_single_autograd(x[token], recv_splits, send_splits, group=moe.ep_group)
    received = funcol.wait_tensor(received)  # (R, C): by source rank, then by expert
    # Run each local expert on its rows (all sources together), then put the rows back in received order.
    local_expert = torch.repeat_interleave(torch.arange(per_rank, device=x.device).repeat(ep), recv_counts.reshape(-1))
    by_expert = torch.argsort(local_expert, stable=True)
    sizes = recv_counts.sum(dim=0).tolist()
    outputs = [expert(rows) for expert, rows in zip(moe.experts.values(), received[by_expert].split(sizes))]
    inverse = torch.empty_like(by_expert)
    inverse[by_expert] = torch.arange(by_expert.numel(), device=x.device)
    expert_out = torch.cat(outputs)[inverse]
    back = funcol.all_to_all_single_autograd(expert_out, send_splits, recv_splits, group=moe.ep_group)
    back = funcol.wait_tensor(back)  # (N*k, C): the outputs of this rank's copies, in sorted order
    out = torch.zeros_like(x)
    out.index_add_(0, token, back * weights.reshape(-1)[order, None])
    return out
