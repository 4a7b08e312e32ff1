"""Pipeline parallelism: a Transformer split by layers into stages for ``torch.distributed.pipelining``.

``model.pipeline_model_parallel_size`` stages (times ``virtual_pipeline_model_parallel_size`` for interleaved
1F1B), run by :class:`PipelineRunner` from the training assembly. Pipeline parallelism composes with the other
layouts on the run's mesh ``(pp, dp_replicate, dp_shard, tp)``: the ranks of one pipeline group hold the same
data-parallel and tensor-parallel coordinates, each stage's modules are tensor-parallel over ``tp`` and
sharded (FSDP) or replicated (gradients all-reduced) over the data-parallel ranks, as torchtitan composes them.

A stage keeps the modules it owns under the model's own names (``embed_tokens`` on the first stage,
``layers.{i}`` for its layers, ``norm`` and ``lm_head`` on the last), so a stage's state dict is a slice of the
model's and checkpoints stay name-keyed. The last stage returns the logits (vocabulary-sharded under tensor
parallelism: the loss is computed on the shards, PyTorch's ``loss_parallel``). With the model built on the meta
device each rank allocates and initialises only its own stages (``_materialize`` in the training assembly).

A tied output head (``share_embeddings_and_output_weights``) is built as Megatron builds it: the last stage owns
a copy of ``embed_tokens`` too (under the same name, used only as the head's weight), initialised to the same
values from the same per-name seed; after each step's backward :class:`TiedHeadSync` sums the two copies'
gradients between the rank of the first stage and the rank of the last, so both take the same update and stay
equal. The gradient norm counts the weight once (:meth:`TiedHeadSync.norm_parameters`) and a checkpoint holds
it once (DCP writes a tensor two ranks save under one name and offset once).

Still to build: packed (SFT) batches.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive layer ranges, one per stage, as even as possible (earlier stages take the remainder)."""
    if num_stages < 1 or num_layers < num_stages:
        raise ConfigError(f"model.num_layers={num_layers} cannot be split into {num_stages} pipeline stages "
                          f"(pipeline x virtual stages); use at most {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


class PipelineStageModule(nn.Module):
    """Stage ``index`` of ``num_stages`` of ``model``: its layers, plus the embeddings (first) or norm and head (last).

    ``forward(x)``: token ids (B, T) on the first stage, hidden states (B, T, C) on the others; returns hidden
    states, or the last stage's (B, T, V) logits (``V / tp`` of them under tensor parallelism: ``tp_mesh``).
    Under sequence parallelism the hidden states between stages are this rank's ``T / tp`` positions
    (``seq_split = tp``).
    """

    def __init__(self, model: nn.Module, index: int, num_stages: int):
        super().__init__()
        cfg = model.cfg
        first, last = index == 0, index == num_stages - 1
        if cfg.position_embedding_type == "alibi":
            raise ConfigError("pipeline parallelism does not support ALiBi models yet")
        object.__setattr__(self, "_model", model)  # rope tables and embed(); not a submodule of the stage
        self.cfg = cfg
        self.first, self.last = first, last
        # a tied head: the last stage owns its own copy of the embedding (the head's weight, no lookup there)
        self.embed_tokens = model.embed_tokens if first or (last and cfg.share_embeddings_and_output_weights) else None
        self.embed_positions = model.embed_positions if first else None
        layer_range = split_layers(cfg.num_layers, num_stages)[index]
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_range})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.tp_mesh = None  # tensor parallel: the head's logits are this rank's vocabulary slice
        self.seq_split = 1  # tensor-parallel ranks a hidden state's positions are split over (sequence parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model
        if self.first:
            x, rope = model.embed(x)  # (B, T, C) and the rotary rows of positions 0..T-1
        else:
            T = x.shape[1] * self.seq_split  # the attention sees (gathers) the whole sequence
            rope = None if model.rope_cos is None else (model.rope_cos[:T], model.rope_sin[:T])
        for layer in self.layers.values():
            x = layer(x, rope)
        if not self.last:
            return x
        x = self.norm(x)
        if hasattr(x, "full_tensor"):  # sequence parallel: the final norm's output is split by position
            x = x.full_tensor()
        weight = model.output_weight()  # lm_head's, or tied: embed_tokens' (this stage's modules, under FSDP gathered)
        if self.tp_mesh is None:
            return F.linear(x, weight)  # (B, T, V)
        from torch.distributed.tensor import DTensor, Replicate

        # tensor parallel: the head's rows are split by vocabulary; this rank's (B, T, V / tp) logits
        return F.linear(DTensor.from_local(x, self.tp_mesh, [Replicate()], run_check=False), weight).to_local()

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Last stage: the summed next-token cross-entropy (fp32) of this stage's ``logits`` (under tensor
        parallelism this rank's vocabulary slice: call inside ``loss_parallel``)."""
        logits = logits.float()
        if self.tp_mesh is not None:
            from torch.distributed.tensor import DTensor, Shard

            logits = DTensor.from_local(logits, self.tp_mesh, [Shard(-1)], run_check=False)
        cap: Optional[float] = self.cfg.final_logit_softcapping
        if cap is not None:
            from lmforge.models.transformer import softcap

            logits = softcap(logits, cap)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def stage_indices(pp_rank: int, pp: int, virtual: int = 1) -> list[int]:
    """The stages a pipeline rank runs: ``pp_rank, pp_rank + pp, ...`` (interleaved 1F1B's looping placement)."""
    return [pp_rank + v * pp for v in range(virtual)]


class StagesView(nn.Module):
    """The modules of a rank's stages under the model's names (``embed_tokens``, ``layers.{i}``, ``norm``,
    ``lm_head``): what this rank trains, saves and restores. ``cfg`` is the model's. Under a tied head the rank of
    the last stage holds its copy of ``embed_tokens`` too, saved and restored under that same name."""

    def __init__(self, modules: list[PipelineStageModule]):
        super().__init__()
        self.cfg = modules[0].cfg
        for name in ("embed_tokens", "embed_positions", "norm", "lm_head"):
            owned = [getattr(m, name) for m in modules if getattr(m, name) is not None]
            setattr(self, name, owned[0] if owned else None)
        self.layers = nn.ModuleDict({k: v for m in modules for k, v in m.layers.items()})


class PipelineRunner:
    """Drives this rank's stages through a pipeline schedule: 1F1B, or interleaved 1F1B with several stages a rank.

    A step's micro batches are the batch plan's accumulation steps. The loss of a micro batch is its summed
    token cross-entropy times ``scale`` (the loop's ``dp / global tokens``), so gradients are those of the global
    token mean, as without pipelining.

    Build it after the stage modules are transformed (tensor parallel, FSDP: ``fully_shard`` keeps the module
    and its class's methods; the stages then hold back gradient reduction until a step's last micro batch).
    """

    def __init__(self, modules: list[PipelineStageModule], stage_ids: list[int], num_stages: int, device,
                 group, n_microbatches: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        self.modules, self.group = modules, group
        self.first = any(m.first for m in modules)
        self.last = any(m.last for m in modules)
        last_module = modules[-1]
        self.scale = 1.0
        stages = [PipelineStage(m, i, num_stages, device, group=group) for m, i in zip(modules, stage_ids)]

        def loss_fn(hidden, target):
            return last_module.token_losses(hidden, target) * self.scale

        if len(stages) == 1:
            self.schedule = Schedule1F1B(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                                    scale_grads=False)

    def _run(self, micro: list[torch.Tensor], scale, train: bool):
        tokens = torch.cat(micro)  # (accumulate x micro batch, T + 1)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        self.scale = scale
        losses: list = []
        args = (inputs,) if self.first else ()
        target = labels if self.last else None
        if train:
            self.schedule.step(*args, target=target, losses=losses)
        else:
            self.schedule.eval(*args, target=target, losses=losses)
        if not self.last:
            return 0.0
        # float64, added in order as Python adds floats: the host's sum, left on the device (no wait)
        return sum(l.detach().double() for l in losses) / scale

    def train(self, micro: list[torch.Tensor], scale) -> torch.Tensor | float:
        """Forward and backward over one global batch's micro batches; the summed loss on the last stage (a float64
        device tensor, not read back), else 0. ``scale`` (a float, or a 0-dim device tensor) multiplies each
        micro batch's loss before its backward."""
        return self._run(micro, scale, train=True)

    def evaluate(self, micro: list[torch.Tensor]) -> float:
        """Forward only; the summed loss on the last stage, else 0."""
        with torch.no_grad():
            return float(self._run(micro, 1.0, train=False))


class TiedHeadSync:
    """A tied head across pipeline stages: the first stage's ``embed_tokens.weight`` and the last stage's copy take
    the same update, as Megatron keeps them.

    ``sync()`` (after a step's backward and the data-parallel average, before clipping) sums the weight's gradient
    between each pair of ranks holding the first and the last stage at the same data/tensor/context-parallel
    coordinates: both copies then hold the gradient of the one shared weight. Under FSDP or tensor parallelism the
    two stages shard the weight alike, so the local shards are summed. :meth:`norm_parameters` leaves the last
    stage's copy out of the gradient norm, so the weight counts once.

    Args:
        mesh: the run's mesh (``pp`` its first dimension).
        view: this rank's :class:`StagesView`.
        first, last: whether this rank runs the first / the last stage (never both: the last stage is on the last
            pipeline rank, the first on pipeline rank 0).
    """

    def __init__(self, mesh, view: nn.Module, first: bool, last: bool):
        import torch.distributed as dist

        self.weight = view.embed_tokens.weight if (first or last) else None
        self.copy = self.weight if last else None  # left out of the norm
        ranks = mesh.mesh.reshape(mesh.mesh.shape[0], -1)  # (pp, the other coordinates)
        if ranks.shape[0] == 2:  # each pair is a pipeline group
            self.group = mesh["pp"].get_group() if self.weight is not None else None
            return
        self.group = None
        me = dist.get_rank()
        for column in range(ranks.shape[1]):  # every pair's group, made on every rank in the same order
            pair = [int(ranks[0, column]), int(ranks[-1, column])]
            group = dist.new_group(pair)
            if me in pair:
                self.group = group

    @torch.no_grad()
    def sync(self) -> None:
        """Sum the tied weight's gradient over this rank's (first, last) pair; nothing on the middle stages."""
        if self.group is None:
            return
        import torch.distributed as dist

        weight = self.weight
        if weight.grad is None:  # both copies must take part (a stage whose head saw no gradient: zeros)
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
        if hasattr(grad, "placements") and tuple(grad.placements) != tuple(weight.placements):
            # tensor parallel: the embedding's backward leaves its gradient replicated, the head's is vocabulary-
            # sharded as the weight; both as the weight (a local slice, no communication), so the shards match
            grad = weight.grad = grad.redistribute(weight.device_mesh, weight.placements)
        dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=self.group)

    def norm_parameters(self, parameters) -> list:
        """``parameters`` without the last stage's copy of the tied weight (the gradient norm counts it once)."""
        return [p for p in parameters if p is not self.copy]
