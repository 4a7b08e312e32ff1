"""One training assembly: ``build_training(job, model, runtime)`` for every stage that trains.

Pretraining (:mod:`lmforge.train.pretrain`) and fine-tuning (:mod:`lmforge.finetune.stage`) turn their
configs into one typed :class:`TrainJob` and hand it, with the plain model, to :func:`build_training`.
Everything after that is shared: PEFT, resume, activation checkpointing, compile, data parallelism
(DDP or FSDP2), optimizer, schedule, precision, checkpointing and the loop. Alignment (:mod:`lmforge.align`)
uses it too, with its own objective (``objective_fn``).

Transformations are applied from outside the model, in this order (torchtitan's, with PEFT first
because it swaps modules):

1. PEFT (``job.peft_method``): wrap the chosen modules, freeze the rest.
2. Resume weights from a full (unsharded) checkpoint into the plain model.
3. Pipeline stages (``job.dims.pp``, :mod:`lmforge.parallel.pipeline`): this rank's stages, allocated alone when
   the model was built on the meta device; from here on "the model" is their :class:`StagesView`.
   Then tensor parallelism (``job.dims.tp``, :mod:`lmforge.parallel.tensor`) on the mesh's ``tp`` dimension.
   Then context parallelism (``job.dims.cp``, :mod:`lmforge.parallel.context`) on its ``cp`` dimension: the
   objective takes this rank's part of every sequence, attention gathers the group's keys and values.
   Expert parallelism (``job.dims.ep``, :mod:`lmforge.parallel.expert`): each rank keeps its share of every MoE
   layer's experts; DDP then ignores them (their gradients are reduced over the expert-data-parallel group).
   Then float8 block projections (``job.fp8``, :mod:`lmforge.train.fp8`) and joint q/k/v, gate/up matmuls
   (``job.joint_projections``, :func:`lmforge.models.transformer.set_joint_projections`; not under TP).
4. Activation checkpointing (``job.activations_checkpoint``), per block (per pipeline stage).
5. torch.compile (``job.compile``), per block, and the loss head (not under tensor parallelism).
6. Data parallelism: FSDP2 (``job.dims.fsdp``: blocks, then the objective or each stage as root), DDP, or, for
   tensor- or pipeline-parallel replicas, an explicit gradient average after backward. A tied head across pipeline
   stages then sums its two copies' gradients (:class:`lmforge.parallel.pipeline.TiedHeadSync`).
7. Optimizer over the (now possibly sharded) trainable parameters.
8. Resume from a sharded checkpoint (weights) and the optimizer state (any layout).

Checkpoints: unsharded runs write full weights on rank 0 (``model.safetensors``) and the optimizer by
parameter index, as before; FSDP runs write each rank's shards with torch.distributed.checkpoint (safetensors,
``model/`` and ``training_state/optimizer/``), keyed by parameter name, so a run resumes on another number
of ranks, with or without FSDP.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.runtime import Runtime, training_precision
from lmforge.train.loop import LoopSettings, Trainer, TrainState
from lmforge.train.scaler import ParallelGradScaler

OPTIMIZER_DIR = "optimizer"  # training_state/optimizer/: FQN-keyed optimizer tensors of sharded runs
OPTIMIZER_GROUPS = "optimizer_groups.json"


@dataclass
class OptimSpec:
    """AdamW and its learning-rate schedule."""

    name: str = "fused_adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    sched: Optional[str] = "CosineAnnealing"
    warmup_steps: int = 0
    constant_steps: int = 0
    min_lr: float = 0.0


@dataclass
class CheckpointSpec:
    """Where and how checkpoints are kept, and whether the run resumes from the newest."""

    monitor: str = "val_loss"
    mode: str = "min"
    save_top_k: int = 3
    save_last: bool = True
    resume: bool = True
    resume_must_exist: bool = False  # resume=true with no checkpoint: start fresh (False) or refuse (True)
    sharded: Optional[bool] = None  # FSDP runs: None/True write shards, False gathers full weights on rank 0
    async_save: bool = False  # stage to CPU memory, write in the background, publish at the next save / the end


@dataclass
class TrainJob:
    """Everything :func:`build_training` needs, whichever stage trains.

    The data-parallel size, batch sizes and dtype each have one source here: ``dims`` and ``loop``.
    """

    out: Path
    dims: ParallelDims
    loop: LoopSettings
    optim: OptimSpec
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    seed: int = 1234
    peft_method: Optional[str] = None  # None: every weight trains
    peft_config: Any = None
    # Modules (names in the base model) that train in full beside a PEFT method and are saved with its weights, as
    # Hugging Face PEFT's modules_to_save: a SteerLM attribute model's score head. Ignored without PEFT.
    modules_to_save: tuple = ()
    activations_checkpoint: Optional[dict] = None  # {granularity, method, num_layers}; None: off
    activations_checkpoint_prefix: str = "model."  # the keys' prefix in the command's config ("": finetune, align)
    compile: bool = False
    joint_projections: bool = True  # q/k/v and gate/up as one matmul each (set_joint_projections; not under TP)
    loss_chunk_size: Optional[int] = None  # head + cross-entropy in token chunks; None: resolve_loss_chunk_size, 0: off
    fp8: Optional[str] = None  # torchao float8 block projections with this recipe (fp8.RECIPES); None: off
    fp8_fsdp_all_gather: str = "auto"  # auto | true | false: FSDP gathers the float8 weights (fp8.fsdp_all_gather)
    sequence_parallel: bool = False  # with tensor parallelism: the residual stream split along the sequence
    virtual_pipeline: int = 1  # pipeline stages per pipeline rank (interleaved 1F1B when above 1)
    fsdp_grad_reduce_dtype: Any = 32
    fsdp_cpu_offload: bool = False
    tensorboard: bool = False
    wandb: Optional[dict] = None
    run_config: dict = field(default_factory=dict)  # saved with every checkpoint


@dataclass
class Training:
    """What :func:`build_training` assembled. ``trainer.fit(train, val, state)`` runs it."""

    job: TrainJob
    runtime: Runtime
    model: nn.Module  # what is trained (the PEFT wrapper when there is one)
    base: nn.Module  # the Transformer inside
    objective: nn.Module  # the loss module the loop calls (the FSDP root under FSDP)
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: Optional[torch.amp.GradScaler]
    manager: Any
    trainer: Trainer
    logger: Any
    state: TrainState
    model_config: dict = field(default_factory=dict)  # saved as each checkpoint's config.json "model"
    tokenizer: Any = None  # saved into each checkpoint
    resumed_from: Optional[str] = None
    async_groups: dict = field(default_factory=dict)  # folder name -> gloo group of its background writes
    whole: Optional[nn.Module] = None  # pipeline parallel: the whole Transformer this rank's stages are part of
    expert_parallel: Any = None  # lmforge.parallel.expert.ExpertParallel when the experts are spread over ranks
    # ``extra_save(folder)``: more files written into each checkpoint folder (sharded or not) before it is
    # published, on rank 0 (PPO's critic); None: none
    extra_save: Optional[Callable[[Path], None]] = None

    @property
    def sharded(self) -> bool:
        """The parameters are DTensors or a stage's slice (FSDP, tensor or pipeline parallel), or a rank's share of
        the experts (expert parallel): DCP checkpoints."""
        return shards(self.job) or self.job.dims.tp > 1 or self.job.dims.pp > 1 or self.job.dims.ep > 1

    @property
    def fsdp(self) -> bool:
        """The model is wrapped with FSDP (its root gathers parameters outside forward: see ``gathered``)."""
        return shards(self.job)

    def num_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the whole model (not of one shard, nor of one pipeline stage)."""
        trainable = total = 0
        # pipeline parallel: this rank's stages are part of the whole model, whose other stages stay on the meta
        # device here (their shapes are all a count needs)
        for p in (self.whole if self.whole is not None else self.model).parameters():
            n = p.numel()  # a DTensor reports its global size
            total += n
            trainable += n if p.requires_grad else 0
        if self.expert_parallel is not None:  # the experts other ranks hold (no PEFT under expert parallelism)
            total += self.expert_parallel.absent_parameters
            trainable += self.expert_parallel.absent_parameters
        return trainable, total

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: all of them (a tied head once), or the PEFT method's only."""
        from lmforge.peft import peft_state_dict

        if self.job.peft_method is None:
            return saved_state_dict(self.base)
        saved = {n: p.detach() for n, p in _saved_modules(self.base, self.job.modules_to_save).items()}
        return {**peft_state_dict(self.base), **saved}

    def load_weights(self, folder: Path) -> None:
        """Load a checkpoint's weights (full or sharded) into the live model, whatever its layout."""
        _load_weights(self, Path(folder))

    def save(self, st: TrainState, metrics: dict) -> None:
        _save(self, st, metrics)

    def finish_saving(self) -> None:
        """Publish an asynchronous checkpoint still being written (every rank), then release the folder's lock."""
        self.manager.close()

    def async_group(self, part: str):
        """The gloo group the background writes of ``part`` (weights, optimizer) talk over: one group each, apart
        from training's, since two writes in flight at once must not interleave their collectives."""
        import torch.distributed as dist

        # also on one process when a process group exists (FSDP's, over NCCL): DCP's async save needs a CPU one
        if part not in self.async_groups and dist.is_available() and dist.is_initialized():
            self.async_groups[part] = dist.new_group(backend="gloo")
        return self.async_groups.get(part)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Python, numpy and torch RNGs from ``seed + rank`` (pass the data-parallel rank: one tensor-parallel
    group draws the same dropout masks)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def saved_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: a tied head is stored once (as the embedding); float8 all-gather weights as the tensors
    they wrap (:func:`lmforge.train.fp8.unwrap_all_gather_weight`)."""
    from lmforge.train.fp8 import unwrap_all_gather_weight

    state = {k: unwrap_all_gather_weight(v) for k, v in model.state_dict().items()}
    if getattr(model.cfg, "share_embeddings_and_output_weights", False):
        state.pop("lm_head.weight", None)
    return state


# ----------------------------------------------------------------------------------------------
def stopped_note(state: TrainState, max_steps: int, checkpoint, resume_override: Optional[str] = None) -> Optional[str]:
    """The one line a run that stopped before ``max_steps`` prints: why, where it saved, and how to go on (the
    same command again; with ``resume_override`` added when the config turned resuming off). None otherwise."""
    if not (state.stopped_early or state.time_limit_reached):
        return None
    why = "a stop signal (SIGTERM/SIGUSR1)" if state.stopped_early else "trainer.max_time reached"
    how = "run the same command again" + (f" with {resume_override}" if resume_override else "")
    return (f"stopped at step {state.step} of {max_steps} ({why}), saved in {checkpoint}: to resume, {how}")


def build_training(job: TrainJob, model: nn.Module, runtime: Runtime, tokenizer=None, model_config: dict = None,
                   console_log: Callable = print, log_every_n_steps: Optional[int] = None,
                   compile_loss: bool = True, objective_fn: Optional[Callable] = None) -> Training:
    """Assemble a run: see the module docstring for what happens, in which order.

    Args:
        job: the typed job (built by a stage from its config).
        model: the plain :class:`~lmforge.models.transformer.Transformer` on ``runtime.device`` (freshly
            initialised, or loaded from a base model).
        runtime: rank, world size, device.
        tokenizer: saved into every checkpoint.
        model_config: ``ModelConfig.to_dict()`` saved as the checkpoint's config (default: ``model.cfg``).
        objective_fn: ``objective_fn(train_model) -> nn.Module``, the loss the loop calls (default
            :class:`~lmforge.train.objectives.CausalLMLoss`; alignment passes its preference losses). Only the
            default runs under tensor, pipeline or context parallelism.
    """
    from lmforge.parallel.transforms import apply_activation_checkpointing, apply_compile
    from lmforge.peft import apply_peft, base_model
    from lmforge.train.checkpoint import CheckpointManager, check_resumable
    from lmforge.train.metrics import MetricsLogger
    from lmforge.train.objectives import CausalLMLoss
    from lmforge.train.optim import build_optimizer, build_schedule

    dims, rt = job.dims, runtime
    # bf16 on a GPU without native bf16 (V100, T4): fp16 with loss scaling instead, said in one line
    precision, note = training_precision(job.loop.precision, rt.device, fp16_supported=dims.ep == 1)
    job.loop.precision = precision
    if note and rt.is_main:
        console_log(note)
    _check_job(job, rt)
    train_model = model
    if job.peft_method is not None:  # 1. PEFT
        train_model = apply_peft(model, job.peft_method, job.peft_config)
        for p in _saved_modules(base_model(train_model), job.modules_to_save).values():
            p.requires_grad_(True)  # trained in full beside the method (modules_to_save)
        if rt.distributed:  # rank 0's initial adapter weights everywhere (DDP broadcasts them; FSDP does not)
            import torch.distributed as dist

            for p in train_model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
    base = base_model(train_model)
    model_config = model_config if model_config is not None else base.cfg.to_dict()

    ck = job.checkpoint
    manager = CheckpointManager(job.out / "checkpoints", rt, monitor=ck.monitor, mode=ck.mode,
                                save_top_k=int(ck.save_top_k), save_last=bool(ck.save_last))
    latest = manager.latest() if ck.resume else None
    if ck.resume and latest is None and ck.resume_must_exist:
        raise CheckpointError(f"exp_manager.resume_if_exists=true but {job.out / 'checkpoints'} holds no checkpoint; "
                              f"set exp_manager.resume_ignore_no_checkpoint=true to start fresh")
    if latest is not None:
        _check_same_model(latest, model_config)
        check_resumable(latest, job.run_config, tokenizer)  # same data and tokenizer (else refused); sound weights
    sharded_resume = latest is not None and _is_sharded_checkpoint(latest)
    on_meta = any(p.is_meta for p in model.parameters())  # pipeline stages, a rank's experts: allocated after the split
    if latest is not None and not sharded_resume and not on_meta:  # 2. full weights into the plain model
        _load_full_weights(base, job.peft_method, latest, rt.device, job.modules_to_save)

    mesh, stages, grad_sync = None, None, None
    if dims.pp > 1 or dims.tp > 1 or dims.cp > 1:  # the run's mesh (pp, dp_replicate, dp_shard, cp, tp), built once
        from lmforge.parallel.fsdp import ensure_process_group

        ensure_process_group(rt)
        mesh = dims.build_mesh(rt.device.type)
    if dims.pp > 1:  # 3. pipeline stages: this rank trains, saves and restores only its stages' modules
        from lmforge.parallel.pipeline import StagesView

        stages = _pipeline_stages(job, base)
        train_model = base = StagesView(stages)
        if on_meta:  # allocate and initialise this rank's stages only (the weights they have in the whole model)
            _materialize(model, base, rt.device, job.seed)
    if objective_fn is not None and (dims.tp > 1 or dims.pp > 1 or dims.cp > 1):
        raise ConfigError("this objective trains with data parallelism (DDP or FSDP) only, not tensor, pipeline or "
                          "context parallelism")
    # under pipelining not called: the stages compute the loss
    objective = CausalLMLoss(train_model) if objective_fn is None else objective_fn(train_model)
    if job.checkpoint.monitor == "val_ppl" and not getattr(objective, "token_nll", False):
        raise ConfigError(f"monitor=val_ppl: the {type(objective).__name__} objective's loss is not a per-token "
                          f"negative log-likelihood, so it has no perplexity; monitor val_loss")
    if dims.tp == 1 and hasattr(objective, "loss_chunk_size"):  # TP: the loss on vocabulary-sharded logits instead
        # activation checkpointing chunks smaller vocabularies too: the causal LM loss (pretraining, SFT, PEFT);
        # the alignment objectives' own chunked paths keep the vocabulary rule alone
        checkpointing = bool(job.activations_checkpoint) and bool(getattr(objective, "token_nll", False))
        objective.loss_chunk_size = resolve_loss_chunk_size(job.loss_chunk_size, getattr(base, "cfg", None),
                                                            checkpointing=checkpointing)
    if dims.tp > 1:  # 3. tensor parallelism (the head's loss on vocabulary-sharded logits)
        from lmforge.parallel.tensor import apply_tensor_parallel, sharded_cross_entropy

        apply_tensor_parallel(base, mesh["tp"], sequence_parallel=job.sequence_parallel)
        objective.loss_fn = sharded_cross_entropy
        for stage in stages or []:
            stage.tp_mesh = mesh["tp"]
            stage.seq_split = dims.tp if job.sequence_parallel else 1
    if dims.cp > 1:  # 3. context parallelism: this rank's part of every sequence, attention over the group's keys
        from lmforge.parallel.context import apply_context_parallel

        objective.sequence_split = apply_context_parallel(base, mesh["cp"]).split
    expert = None
    if dims.ep > 1:  # 3. expert parallelism: this rank's share of the experts, tokens exchanged by all-to-all
        from lmforge.parallel.expert import apply_expert_parallel
        from lmforge.parallel.fsdp import ensure_process_group

        ensure_process_group(rt)
        expert = apply_expert_parallel(base, dims)
        if on_meta and stages is None:  # allocate and initialise what this rank holds (the weights of the whole model)
            _materialize(model, base, rt.device, job.seed)
    fp8_all_gather = False
    if job.fp8:  # 3. float8 block projections (torchao), before compile and FSDP as torchao asks
        from lmforge.train.fp8 import apply_fp8

        fp8_all_gather = fp8_all_gather_on(job)
        converted = apply_fp8(base, job.fp8, fsdp_all_gather=fp8_all_gather)
        if rt.is_main:
            console_log(f"fp8: {len(converted)} block projections in float8 ({job.fp8} scaling), the rest in bf16"
                        + ("; FSDP all-gathers their weights in float8" if fp8_all_gather else ""))
    if job.joint_projections and dims.tp == 1:  # 3. q/k/v and gate/up as one matmul each (float8 ones too)
        from lmforge.models.transformer import set_joint_projections

        set_joint_projections(base)
    if job.activations_checkpoint:  # 4. (per pipeline stage: a chunk of blocks never spans two stages)
        for unit in stages or [base]:
            apply_activation_checkpointing(unit, **job.activations_checkpoint, prefix=job.activations_checkpoint_prefix,
                                           part="a pipeline stage" if stages else "the model")
    if job.compile:  # 5.
        apply_compile(base)
        if compile_loss and dims.tp == 1 and hasattr(objective, "compile_loss"):
            objective.compile_loss()
    if shards(job):  # 6. FSDP: blocks, then the root (the objective, or each pipeline stage)
        from lmforge.parallel.fsdp import apply_fsdp
        from lmforge.parallel.tensor import blocks_of

        inner = None
        if expert is not None:  # experts: sharded over the ranks holding the same experts (torchtitan's layout)
            import functools

            from torch.distributed.device_mesh import init_device_mesh

            edp_mesh = init_device_mesh(rt.device.type, (dims.dp // dims.ep, dims.ep), mesh_dim_names=("edp", "ep"))
            inner = functools.partial(expert.shard, edp_mesh["edp"], reshard_after_forward=dims.fsdp != "grad")
        for root in stages or [objective]:
            apply_fsdp(root, blocks_of(root if stages else base), dims, rt, precision=job.loop.precision,
                       grad_reduce_dtype=job.fsdp_grad_reduce_dtype, cpu_offload=job.fsdp_cpu_offload, mesh=mesh,
                       inner=inner)
        forward_model = objective
    elif dims.pp > 1 or dims.tp > 1:  # tensor/pipeline parallel: replicas average gradients explicitly (DDP cannot wrap)
        import functools

        from lmforge.parallel.ddp import average_gradients

        forward_model = objective
        if dims.dp > 1:
            dp_group = ParallelDims.fsdp_mesh(mesh).get_group()
            grad_sync = functools.partial(average_gradients, [p for p in train_model.parameters() if p.requires_grad],
                                          dp_group, dims.dp)
    else:
        from lmforge.parallel.ddp import apply_data_parallel

        if expert is not None:  # expert gradients are reduced by the expert-parallel plan, not by DDP
            expert.ignore_in_ddp(objective)
        forward_model = apply_data_parallel(objective, rt)
    runner = tied = None
    if stages is not None:
        from lmforge.parallel.pipeline import PipelineRunner, TiedHeadSync, stage_indices

        runner = PipelineRunner(stages, stage_indices(dims.pp_rank, dims.pp, job.virtual_pipeline),
                                dims.pp * job.virtual_pipeline, rt.device, mesh["pp"].get_group(),
                                n_microbatches=job.loop.accumulate)
        if base.cfg.share_embeddings_and_output_weights:  # the head's copy on the last stage: summed gradients
            tied = TiedHeadSync(mesh, base, runner.first, runner.last)
            grad_sync = _chained(grad_sync, tied.sync)

    o = job.optim  # 7.
    schedule = build_schedule(o.sched, float(o.lr), job.loop.max_steps, int(o.warmup_steps), int(o.constant_steps),
                              float(o.min_lr))
    optimizer = build_optimizer(train_model, o.name, float(o.lr), float(o.weight_decay), list(o.betas), float(o.eps),
                                rt.device)
    if fp8_all_gather:  # the next all-gathers' float8 scales, from one all-reduce after each step (torchtitan's hook)
        from lmforge.train.fp8 import precompute_scales_after_steps

        precompute_scales_after_steps(optimizer, base)
    scaler = ParallelGradScaler(rt.device.type) if job.loop.precision == "16-mixed" else None

    logger = MetricsLogger(job.out, rt, total_steps=job.loop.max_steps, tensorboard=job.tensorboard, wandb=job.wandb,
                           every_n_steps=int(log_every_n_steps or job.loop.log_every_n_steps or 1))
    extras = dict(grad_sync=grad_sync)
    if dims.tp > 1:
        from lmforge.parallel.tensor import loss_context

        extras.update(loss_context=lambda: loss_context(base))
    if mesh is not None:  # gradients on several meshes; a pipeline's stages hold different parameters
        import functools

        from lmforge.parallel.tensor import grad_norm

        norm_fn = functools.partial(grad_norm, sum_group=runner.group if runner else None)
        if tied is not None:  # the tied weight counted once: not the last stage's copy
            norm_fn = functools.partial(_norm_of, norm_fn, tied.norm_parameters)
        extras.update(grad_norm_fn=norm_fn)
    if runner is not None:
        extras.update(pipeline=runner)
    if expert is not None:  # expert parallelism: expert gradients summed over their group, the norm over all
        extras.update(grad_sync=expert.reduce_gradients, grad_norm_fn=expert.grad_norm)
    trainer = Trainer(forward_model, train_model, optimizer, schedule, rt, job.loop, log=logger, scaler=scaler,
                      dims=dims, **extras)
    training = Training(job=job, runtime=rt, model=train_model, base=base, objective=objective, optimizer=optimizer,
                        schedule=schedule, scaler=scaler, manager=manager, trainer=trainer, logger=logger,
                        state=TrainState(), model_config=model_config, tokenizer=tokenizer,
                        whole=model if stages is not None else None,
                        expert_parallel=expert)
    if dims.is_sharded and not shards(job) and rt.is_main:
        console_log("FSDP on one process has nothing to shard: training unsharded (the same numbers, no FSDP "
                    "copies); model.fsdp_cpu_offload=true would still offload to CPU memory")
    trainer.save_fn = training.save
    if latest is not None:  # 8.
        training.state = _resume(training, latest, sharded_resume)
        training.resumed_from = str(latest)
        if rt.is_main:
            console_log(f"resuming from {latest} at step {training.state.step}")
    return training


def _chained(first: Optional[Callable], then: Callable) -> Callable:
    """``first()`` (when there is one), then ``then()``: gradient syncs run one after the other."""
    if first is None:
        return then

    def both() -> None:
        first()
        then()

    return both


def _norm_of(norm_fn: Callable, select: Callable, parameters) -> torch.Tensor:
    """``norm_fn`` of the parameters ``select`` keeps (the gradient norm's parameters)."""
    return norm_fn(select(parameters))


def _pipeline_stages(job: TrainJob, model: nn.Module) -> list:
    """This rank's pipeline stages of ``model`` (several with interleaved 1F1B), under the model's names."""
    from lmforge.parallel.pipeline import PipelineStageModule, stage_indices

    dims = job.dims
    n_stages = dims.pp * job.virtual_pipeline
    return [PipelineStageModule(model, i, n_stages) for i in stage_indices(dims.pp_rank, dims.pp, job.virtual_pipeline)]


def _materialize(model: nn.Module, part: nn.Module, device, seed: int) -> None:
    """Allocate ``part`` of ``model`` (built on the meta device) and the model's own buffers (the rotary tables
    every stage reads) on ``device``, and initialise them as the whole model would be; the rest stays on meta."""
    part.to_empty(device=device)
    for name, buf in list(model.named_buffers(recurse=False)):
        if buf is not None and buf.is_meta:
            model.register_buffer(name, torch.empty_like(buf, device=device), persistent=False)
    model.init_weights(seed=seed)


def resolve_loss_chunk_size(setting: Optional[int], cfg, checkpointing: bool = False) -> int:
    """Tokens per chunk of the fused head + cross-entropy: ``setting`` when given (0: whole batch), else automatic:
    on for vocabularies of 65,536 and more (Llama 3, Gemma), with chunks whose fp32 logits take about 1 GiB
    (2,048 tokens at 128k); below that off, unless activation checkpointing is on (``checkpointing``), then chunks
    of about 0.25 GiB of fp32 logits (2,048 tokens at a 32k vocabulary).

    Why checkpointing turns it on: without it a 32k vocabulary's logits are small beside the activations (Llama-2-7B,
    seq 2048, micro-batch 2: 0.5 GiB of fp32 logits against some 22 GiB of kept activations), but checkpointing keeps
    about one hidden state per block (1 GiB over 32 blocks there), so the whole batch's logits, their fp32 copy and
    their gradient become a large part of the step's peak. Chunked, the loss and its gradients are computed chunk by
    chunk in the forward pass and only the hidden states' gradient stays for backward. Same loss and gradients (to
    fp32 rounding; on CPU no slower)."""
    if setting is not None:
        return int(setting)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if vocab >= 65536:
        return max(256, (2**28 // vocab) // 256 * 256)
    if checkpointing and vocab > 0:
        return max(256, (2**26 // vocab + 128) // 256 * 256)
    return 0


def _check_job(job: TrainJob, rt: Runtime) -> None:
    """Refuse, before any work, the combinations the assembly cannot build (config loaders catch most earlier)."""
    if job.fp8:
        from lmforge.train.fp8 import fp8_problem

        problem = fp8_problem(rt.device)
        if problem:
            raise ConfigError(problem)
        if job.dims.tp > 1 or job.dims.pp > 1:
            raise ConfigError("model.fp8=true (trainer.precision=fp8) with tensor or pipeline parallelism is not "
                              "supported yet: use FSDP/DDP, or trainer.precision=bf16-mixed")
        fp8_all_gather_on(job)  # model.fp8_fsdp_all_gather=true where it cannot apply: refused before any work
    if job.fsdp_cpu_offload and rt.device.type != "cuda":
        raise ConfigError("model.fsdp_cpu_offload=true moves FSDP shards from GPU memory to CPU memory, but this run "
                          "is on the CPU already: remove model.fsdp_cpu_offload (or train on GPUs)")
    if job.dims.tp > 1 and job.peft_method is not None:
        raise ConfigError(f"PEFT ({job.peft_method}) under tensor parallelism is not supported yet: fine-tune "
                          f"adapters with FSDP (fsdp=true) instead")
    if job.dims.ep > 1:  # expert parallelism: each rank's expert gradients differ (fp16's skipped steps would too)
        what = [w for w, on in (("PEFT", job.peft_method is not None), ("model.compile=true", job.compile),
                                ("trainer.precision=16-mixed", job.loop.precision == "16-mixed")) if on]
        if what:
            raise ConfigError(f"model.expert_model_parallel_size={job.dims.ep} with {', '.join(what)} is not "
                              f"supported yet")
    if job.dims.tp > 1 and job.compile:
        raise ConfigError("model.compile=true with tensor parallelism is not supported yet: drop one of them")
    if job.dims.cp > 1:  # context parallelism: the rest is refused by the config and ParallelDims.check_supported
        from lmforge.parallel.context import KEY

        what = [w for w, on in (("PEFT", job.peft_method is not None), ("model.compile=true", job.compile)) if on]
        if what:
            raise ConfigError(f"{KEY}={job.dims.cp} with {', '.join(what)} is not supported yet")
    if job.dims.pp > 1:
        what = [w for w, on in (("PEFT", job.peft_method is not None), ("model.compile=true", job.compile)) if on]
        if what:
            raise ConfigError(f"pipeline parallelism with {', '.join(what)} is not supported yet")
        if job.virtual_pipeline > 1 and job.loop.accumulate % job.dims.pp:
            raise ConfigError(f"interleaved 1F1B needs the micro batches of a step (accumulate="
                              f"{job.loop.accumulate}) to be a multiple of model.pipeline_model_parallel_size="
                              f"{job.dims.pp}: change model.global_batch_size or model.micro_batch_size")


def fp8_all_gather_on(job: TrainJob) -> bool:
    """Whether FSDP gathers the float8 projections' weights in float8 (:func:`lmforge.train.fp8.fsdp_all_gather` for
    this job's recipe, shard group and joint projections; ConfigError for ``true`` where it cannot apply)."""
    from lmforge.train.fp8 import fsdp_all_gather

    shard_ranks = job.dims.dp_shard * job.dims.cp if shards(job) else 1
    return fsdp_all_gather(job.fp8_fsdp_all_gather, job.fp8, shard_ranks, job.joint_projections and job.dims.tp == 1)


def shards(job: TrainJob) -> bool:
    """Whether the model is wrapped with FSDP: an FSDP layout of more than one data-parallel rank, or CPU offload.

    On one process FSDP has nothing to shard, and its all-gather/reduce-scatter copies cost 6% of a compiled
    1B step on an H100 (docs/benchmarks.md), so that run trains unsharded (same numbers) unless it offloads.
    """
    return job.dims.is_sharded and (job.dims.dp * job.dims.cp > 1 or job.fsdp_cpu_offload)  # cp: dp_shard_cp


# ----------------------------------------------------------------------------------------------
# checkpoints
def _is_sharded_checkpoint(folder: Path) -> bool:
    from lmforge.train.sharded import is_sharded

    return is_sharded(folder)


def _check_same_model(folder: Path, model_config: dict) -> None:
    from lmforge.models.config import ModelConfig

    saved = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model") or {}
    try:
        same = ModelConfig.from_dict(saved).to_dict() == ModelConfig.from_dict(model_config).to_dict()
    except Exception:  # noqa: BLE001 - any unreadable config is a different model
        same = False
    if not same:
        raise CheckpointError(f"{folder} holds a model of another shape than this config; use a new run folder "
                              f"(exp_manager.name / --out) or turn resuming off (exp_manager.resume_if_exists=false)")


def _saved_modules(base: nn.Module, modules: tuple) -> dict[str, torch.Tensor]:
    """The parameters of ``modules`` (:attr:`TrainJob.modules_to_save`) in ``base``, by their full names."""
    return {n: p for n, p in base.named_parameters() if any(n == m or n.startswith(m + ".") for m in modules)}


def _load_full_weights(base: nn.Module, peft_method: Optional[str], folder: Path, device, modules: tuple = ()) -> None:
    """Full weights into an unsharded model (before any wrapping); a PEFT checkpoint holds the method's weights and
    those of ``modules`` (:attr:`TrainJob.modules_to_save`)."""
    from lmforge.open import load_weights
    from lmforge.peft import load_peft_state_dict
    from lmforge.train.checkpoint import load_model

    weights, _ = load_model(folder, device=device)
    if peft_method is None:
        load_weights(base, weights, folder)
        return
    own = _saved_modules(base, modules)
    missing = sorted(set(own) - set(weights))
    if missing:
        raise CheckpointError(f"{folder} holds no {missing[0]!r}, which this run trains beside its PEFT method; was "
                              f"it written by another kind of run?")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(weights.pop(name).to(p.dtype))
    load_peft_state_dict(base, weights, source=str(folder))


def _load_weights(training: Training, folder: Path) -> None:
    """Weights of a checkpoint into the live (possibly sharded) model."""
    from lmforge.train.sharded import load_sharded, sharded_folder

    if not training.sharded and not _is_sharded_checkpoint(folder):
        _load_full_weights(training.base, training.job.peft_method, folder, training.runtime.device,
                           training.job.modules_to_save)
        return
    target = training.weights_state()
    if _is_sharded_checkpoint(folder):
        load_sharded(sharded_folder(folder), target)
    else:  # full weights into a sharded model: every rank reads the file and keeps its own slice
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from lmforge.train.checkpoint import load_model

        weights, _ = load_model(folder, device="cpu")
        missing = [k for k in target if k not in weights and not k.endswith("lm_head.weight")]
        if missing:
            raise CheckpointError(f"{folder} lacks weights {missing[:5]} of this model")
        set_model_state_dict(training.base, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _sharded_optimizer_state(training: Training) -> tuple[dict, dict]:
    """(tensors, the rest) of the optimizer's state keyed by parameter name (flattened, layout-independent)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(training.model, training.optimizer,
                                  options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def _save(training: Training, st: TrainState, metrics: dict) -> None:
    job, rt = training.job, training.runtime
    state = {**st.to_dict(), "config": job.run_config, "layout": job.dims.to_dict()}
    async_save = job.checkpoint.async_save
    if not training.sharded:
        write_fn = None
        if training.extra_save is not None:  # the weights and the extra files, written now, into the same folder
            def write_fn(tmp: Path) -> list:
                if rt.is_main:
                    from lmforge.train.checkpoint import save_model

                    save_model(tmp, training.weights_state(), training.model_config, tokenizer=training.tokenizer)
                    training.extra_save(tmp)
                return []
        training.manager.save(st.step, training.weights_state(), training.model_config, training.optimizer, state,
                              metrics=metrics, tokenizer=training.tokenizer, scaler=training.scaler,
                              async_save=async_save, write_fn=write_fn)
        return
    from lmforge.train.sharded import MODEL_DIR, save_sharded, save_sharded_async

    def shards(folder: Path, tensors: dict, waits: list) -> None:
        if async_save:
            waits.append(save_sharded_async(folder, tensors, training.async_group(folder.name)))
        else:
            save_sharded(folder, tensors)

    gather = job.checkpoint.sharded is False or job.peft_method is not None  # adapters are small: one full file

    def write(tmp: Path) -> list:
        waits: list = []
        weights = training.weights_state()
        if gather:
            from lmforge.parallel.fsdp import whole_tensor

            full = {k: whole_tensor(v) for k, v in weights.items()}  # a collective (FSDP, CPU offload too)
            if training.trainer.pipeline is not None:  # rank 0 holds the first stage: the others' weights to it
                full = _stages_gathered(training.trainer.pipeline.group, full)
            if rt.is_main:
                from lmforge.train.checkpoint import save_model

                save_model(tmp, full, training.model_config, tokenizer=training.tokenizer)
        else:
            shards(tmp / MODEL_DIR, weights, waits)
            if rt.is_main:
                from lmforge.train.checkpoint import write_model_config

                if training.tokenizer is not None:
                    training.tokenizer.save(tmp)
                write_model_config(tmp, training.model_config, sharded={"world_size": job.dims.world_size})
        tensors, rest = _sharded_optimizer_state(training)
        shards(tmp / "training_state" / OPTIMIZER_DIR, tensors, waits)
        if rt.is_main:
            (tmp / "training_state" / OPTIMIZER_GROUPS).write_text(json.dumps(rest, indent=1) + "\n", encoding="utf-8")
            if training.extra_save is not None:  # whole files beside the shards (PPO's critic, replicated)
                training.extra_save(tmp)
        return waits

    training.manager.save(st.step, None, training.model_config, None, state, metrics=metrics,
                          tokenizer=None, scaler=training.scaler, write_fn=write, async_save=async_save)


def _stages_gathered(group, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pipeline parallel, full weights on rank 0: every stage's whole weights (``weights`` on each rank of rank 0's
    pipeline ``group``) sent to rank 0 one tensor at a time (device tensors under NCCL; rank 0 keeps each in CPU
    memory as it arrives, so no more than one extra tensor is ever on its GPU), after a table of names, shapes and
    dtypes. A tied head's two copies (equal) are kept once. Other ranks get theirs back (nothing to write); ranks of
    other pipelines (other data/tensor coordinates) take no part."""
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group)
    if 0 not in ranks:
        return weights
    me = dist.get_rank()
    table = [(name, tuple(t.shape), t.dtype) for name, t in weights.items()]
    tables = [None] * len(ranks) if me == 0 else None
    dist.gather_object(table, tables, dst=0, group=group)  # names, shapes and dtypes only
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
              else torch.device("cpu"))
    gathered = dict(weights) if me == 0 else weights
    for src in ranks:
        if src == 0:
            continue
        if me == src:
            for t in weights.values():
                dist.send(t.detach().to(device).contiguous(), dst=0, group=group)
        elif me == 0:
            for name, shape, dtype in tables[ranks.index(src)]:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buffer, src=src, group=group)
                gathered.setdefault(name, buffer.cpu())
    return gathered


def _resume(training: Training, folder: Path, sharded_weights: bool) -> TrainState:
    from lmforge.train.checkpoint import load_training_state

    rt = training.runtime
    if sharded_weights or training.sharded:  # unsharded runs from full weights loaded them before wrapping
        _load_weights(training, folder)
    opt_dir = folder / "training_state" / OPTIMIZER_DIR
    if opt_dir.is_dir():  # name-keyed, sharded: fits any layout
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from lmforge.train.sharded import load_sharded

        tensors, _ = _sharded_optimizer_state(training)  # the shapes to fill (initialises the state)
        load_sharded(opt_dir, tensors)
        rest = json.loads((folder / "training_state" / OPTIMIZER_GROUPS).read_text(encoding="utf-8"))
        set_optimizer_state_dict(training.model, training.optimizer, {**tensors, **rest},
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))
        state = load_training_state(folder, None, rt, scaler=training.scaler)
    elif training.sharded:  # an unsharded run's optimizer (by parameter index) into a sharded one
        _load_indexed_optimizer(training, folder)
        state = load_training_state(folder, None, rt, scaler=training.scaler)
    else:
        state = load_training_state(folder, training.optimizer, rt, scaler=training.scaler)
    return TrainState.from_dict(state)


def _load_indexed_optimizer(training: Training, folder: Path) -> None:
    """Restore an unsharded checkpoint's optimizer state (keyed by parameter index) into a sharded optimizer.

    The index is the parameter's position in the optimizer's groups, which :func:`build_optimizer` fills in
    the model's parameter order on any layout; each rank keeps its slice of the full tensors. Under pipeline or
    expert parallelism the indices are the whole model's and a rank skips the parameters it does not hold.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from lmforge.train.checkpoint import read_optimizer_state

    saved = read_optimizer_state(folder)
    whole = training.whole  # a pipeline stage's rank: the index runs over the whole model's parameters
    if training.expert_parallel is not None:  # a rank's share of the experts: the whole model, on meta
        whole = _whole_model_on_meta(training)
    from lmforge.train.optim import decay_groups

    names = {id(p): n for n, p in (whole or training.model).named_parameters()}
    groups = decay_groups(whole or training.model, float(training.job.optim.weight_decay))  # before any TP split
    order = [names[id(p)] for g in groups for p in g["params"]]
    owned = {n for n, _ in training.model.named_parameters()}
    if len(saved["param_groups"]) != len(groups) or (
            saved["state"] and max(saved["state"]) >= len(order)):
        raise CheckpointError(f"the optimizer state in {folder} does not fit this model's optimizer; was the "
                              f"checkpoint saved with another model or PEFT method?")
    tensors, rest = _sharded_optimizer_state(training)  # the keys and shard layout this run expects
    for index, entry in saved["state"].items():
        if order[index] not in owned:  # another pipeline stage's parameter
            continue
        for key, value in entry.items():
            name = f"state.{order[index]}.{key}"
            target = tensors.get(name)
            if target is None or tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(f"the optimizer state in {folder} does not fit this model's optimizer "
                                      f"({name}); was the checkpoint saved with another model?")
            if hasattr(target, "device_mesh"):  # this rank's slice of the full tensor, no communication
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                          src_data_rank=None)
            tensors[name] = value.to(target.device) if not hasattr(value, "device_mesh") else value
    set_optimizer_state_dict(training.model, training.optimizer, {**tensors, **rest},
                             options=StateDictOptions(flatten_optimizer_state_dict=True))


def _whole_model_on_meta(training: Training) -> nn.Module:
    """The whole model of this run on the meta device (no memory): its parameter names in the order an unsharded
    run's optimizer numbers them (expert parallelism holds only a rank's share of the experts)."""
    from lmforge.models.config import ModelConfig
    from lmforge.models.meta import meta_device
    from lmforge.models.transformer import Transformer

    with meta_device():
        return Transformer(ModelConfig.from_dict(training.model_config))
