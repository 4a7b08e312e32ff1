"""Context parallelism (``model.context_parallel_size``): every sequence of a batch split over the ``cp`` ranks of
a context-parallel group, for sequences whose activations do not fit one device.

The ranks of a group read the same samples (they share one data-parallel rank) and each keeps ``T / cp`` of the
positions of every sequence, inputs and labels alike: the embeddings, norms, MLPs, the head and the loss of a
rank see only its positions, so their activations take ``1 / cp`` of the memory. Only attention needs the other
positions: each attention layer all-gathers the keys and values of the group (Llama 3's context parallelism,
``(B, n_kv_heads, T, head_dim)`` per layer, small under grouped-query attention) and attends with its own queries
under a causal mask written in global positions. The gather is differentiable: its backward sums the keys' and
values' gradients over the group and hands each rank the part of its own positions.

Load balance: under a causal mask late positions attend to more keys than early ones, so the sequence is cut into
``2 cp`` chunks and rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r`` (an early and a late one; every rank then
does the same work). Rotary angles and learned position embeddings are taken at the global positions.

Gradients: a rank's loss is the sum over its positions, so a group's gradient is the sum of its ranks'. DDP and
FSDP average gradients over ``dp x cp`` ranks; the training loop scales the loss by ``dp x cp`` (instead of
``dp``) divided by the global token count, which makes that average the global token mean.

Why not PyTorch's ring attention (``torch.distributed.tensor.experimental.context_parallel``)? It dispatches on
the fused SDPA kernels of CUDA (flash, memory-efficient, cuDNN) only: on CPU SDPA runs
``aten._scaled_dot_product_flash_attention_for_cpu``, which it does not shard ("does not have a sharding
strategy registered", torch 2.13), so it cannot be tested on the CPU ranks lmforge's tests run on, and it is an
experimental API. The all-gather path runs the same code on CPU (gloo) and GPU (NCCL), with any SDPA backend
that takes a mask (it passes an explicit boolean mask), and with soft-capped attention (Gemma 2). Its cost: the
gathered keys and values (``cp`` times a rank's) and a ``(T / cp, T)`` mask, held during attention.

FSDP shards over ``dp x cp`` ranks (torchtitan's ``dp_shard_cp`` mesh dimension,
:meth:`~lmforge.parallel.dims.ParallelDims.fsdp_mesh`): the ranks of a group hold the same parameters, so they
can share their shards.

Supported: pretraining (token batches) of RoPE or learned-position models (Llama, GPT, Mistral without a sliding
window, Gemma, Qwen2, ...), alone or with data parallelism (DDP, or FSDP ``full`` / ``grad``), full or selective
activation checkpointing. Refused at config time, each with its own message (:func:`context_parallel_problems`):
a sequence length not divisible by ``2 cp``; tensor, pipeline or expert parallelism; FSDP ``hybrid``; ALiBi;
sliding-window attention; mixture of experts (the router's load-balancing loss pools all positions);
``model.compile``. Fine-tuning has no context-parallel key (its masked and packed rows are not split).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

KEY = "model.context_parallel_size"


# ----------------------------------------------------------------------------------------------
# Which positions a rank holds
def sequence_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The global positions rank ``rank`` of ``cp`` holds of a sequence of ``seq_len``: chunks ``rank`` and
    ``2 cp - 1 - rank`` of ``2 cp`` equal chunks, in that order. (seq_len // cp,) int64."""
    if seq_len % (2 * cp):
        raise ValueError(f"a sequence of {seq_len} tokens cannot be cut into 2 x {KEY} = {2 * cp} equal chunks")
    chunk = seq_len // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def shard_sequence(t: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """The part of ``t`` (the sequence along ``dim``) rank ``rank`` of ``cp`` holds (see :func:`sequence_positions`)."""
    return t.index_select(dim, sequence_positions(t.shape[dim], cp, rank, device=t.device))


# ----------------------------------------------------------------------------------------------
# Config-time checks
def context_parallel_problems(cfg, cp: int, seq_length: Optional[int] = None, *, tp: int = 1, pp: int = 1,
                              ep: int = 1, fsdp: Optional[str] = None, compile: bool = False) -> list[str]:
    """Why a run of ``cfg`` (a :class:`~lmforge.models.config.ModelConfig`, or None when it is not known yet)
    cannot split its sequences of ``seq_length`` over ``cp`` ranks (empty: it can). One message each.
    ``fsdp``: the FSDP strategy (None: DDP)."""
    if cp == 1:
        return []
    out = []
    if seq_length is not None and seq_length % (2 * cp):
        out.append(f"{KEY}={cp} cuts every sequence into 2 x {cp} = {2 * cp} equal chunks (two per rank, for "
                   f"load balance), but model.data.seq_length={seq_length} is not divisible by {2 * cp}; use a "
                   f"sequence length that is a multiple of {2 * cp}")
    for what, size, key in (("tensor", tp, "model.tensor_model_parallel_size"),
                            ("pipeline", pp, "model.pipeline_model_parallel_size"),
                            ("expert", ep, "model.expert_model_parallel_size")):
        if size > 1:
            out.append(f"{KEY}={cp} with {key}={size}: context parallelism combines only with data parallelism "
                       f"(DDP or FSDP) for now; set {key}=1")
    if fsdp == "hybrid":
        out.append(f"{KEY}={cp} with model.fsdp_sharding_strategy=hybrid is not supported yet (its shard group is "
                   f"one node's data-parallel ranks); use model.fsdp_sharding_strategy=full or grad")
    if compile:
        out.append(f"{KEY}={cp} with model.compile=true is not supported yet (the attention's all-gather is not "
                   f"compiled); drop one of them")
    if cfg is not None:
        if cfg.position_embedding_type == "alibi":
            out.append(f"{KEY}={cp}: ALiBi models (Falcon-RW, Baichuan2-13B) are not supported under context "
                       f"parallelism (their bias is built from local positions); use {KEY}=1")
        if cfg.sliding_window is not None:
            out.append(f"{KEY}={cp}: sliding-window attention (Mistral, Gemma 2, StarCoder2; model.sliding_window="
                       f"{cfg.sliding_window}) is not supported under context parallelism yet; use {KEY}=1, or "
                       f"model.sliding_window=null when the sequences are no longer than the window")
        if cfg.num_moe_experts is not None:
            out.append(f"{KEY}={cp}: mixture-of-experts models (Mixtral) are not supported under context "
                       f"parallelism yet (the router's load-balancing loss pools every position); use {KEY}=1")
    return out


# ----------------------------------------------------------------------------------------------
# The transformation
class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` over ``group`` (rank order); backward: the gradient summed over the group, this
    rank's part (a reduce-scatter; gloo, which may lack one, all-reduces and keeps its part)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group, dim = ctx.group, ctx.dim
        parts = [p.contiguous() for p in grad.chunk(dist.get_world_size(group), dim=dim)]
        rank = dist.get_rank(group)
        if dist.get_backend(group) == "gloo":
            full = grad.contiguous()
            dist.all_reduce(full, group=group)
            return full.chunk(len(parts), dim=dim)[rank].contiguous(), None, None
        out = torch.empty_like(parts[rank])
        dist.reduce_scatter(out, parts, group=group)
        return out, None, None


class ContextParallel:
    """One context-parallel group: splits a batch's sequences (:meth:`split`) and attends over the group's keys.

    Args:
        group: the process group of the ``cp`` ranks holding parts of the same sequences.
    """

    def __init__(self, group):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._masks: dict = {}  # (local length, device) -> (T / cp, T) bool mask: every layer uses the same one

    def split(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``(inputs, labels, positions)``, each (B, T / cp), of full (B, T) inputs and labels."""
        positions = sequence_positions(inputs.shape[1], self.cp, self.rank, device=inputs.device)
        inputs, labels = inputs.index_select(1, positions), labels.index_select(1, positions)
        return inputs, labels, positions.expand(inputs.shape[0], -1)

    def mask(self, local_len: int, device) -> torch.Tensor:
        """Which keys each of this rank's queries sees: (T / cp, T) bool, keys in the gathered order (rank 0's
        positions, then rank 1's, ...), True where the key's global position is at most the query's."""
        key = (local_len, device)
        if key not in self._masks:
            T = local_len * self.cp
            query_pos = sequence_positions(T, self.cp, self.rank, device=device)
            key_pos = torch.cat([sequence_positions(T, self.cp, r, device=device) for r in range(self.cp)])
            self._masks[key] = key_pos[None, :] <= query_pos[:, None]
        return self._masks[key]

    def wrap_attention(self, attend: Callable) -> Callable:
        """``attend(q, k, v, mask, is_causal, dropout)`` (``Attention._sdpa`` / ``_eager``: q (B, nh, T/cp, hd),
        k and v (B, nkv, T/cp, hd) of this rank's positions) over the whole group's keys and values."""

        def context_parallel_attend(q, k, v, mask, is_causal, dropout):
            if mask is not None:  # the config refuses what builds one (ALiBi, windows, packed documents)
                raise RuntimeError("context parallelism attends with its own causal mask; this model passed "
                                   "another one (ALiBi, a sliding window or packed documents)")
            k = _GatherSequence.apply(k, self.group, 2)  # (B, nkv, T, hd)
            v = _GatherSequence.apply(v, self.group, 2)
            return attend(q, k, v, self.mask(q.shape[2], q.device), False, dropout)

        return context_parallel_attend


def apply_context_parallel(model: nn.Module, cp_mesh) -> ContextParallel:
    """Make ``model``'s attention context-parallel over the 1-D ``cp_mesh``, in place (its ``Attention._sdpa`` and
    ``_eager`` of every layer gather keys and values over the group; names and parameters unchanged).

    Returns the :class:`ContextParallel` whose :meth:`~ContextParallel.split` the objective applies to every batch
    (:class:`~lmforge.train.objectives.CausalLMLoss` ``sequence_split``): the model must be called with this rank's
    part of the sequence and its global positions.
    """
    from lmforge.models.transformer import Attention

    problems = context_parallel_problems(model.cfg, cp_mesh.size())
    if problems:
        from lmforge.errors import ConfigError

        raise ConfigError(problems[0])
    cp = ContextParallel(cp_mesh.get_group())
    for module in model.modules():
        if isinstance(module, Attention):
            module._sdpa = cp.wrap_attention(module._sdpa)
            module._eager = cp.wrap_attention(module._eager)
    model._context_parallel = cp
    return cp
