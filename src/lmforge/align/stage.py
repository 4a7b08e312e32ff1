"""The alignment stage: ``run(cfg) -> summary`` (DPO, IPO, RPO, KTO, ORPO, SimPO; reward models).

The same assembly as fine-tuning (:func:`lmforge.train.assembly.build_training`: PEFT, FSDP or DDP, precision,
checkpoints, resume, the one loop), with a preference objective (:mod:`lmforge.align.objective`) in place of the
next-token loss. Results in ``cfg.out``, laid out as a fine-tuning run's (so ``generate OUT``, ``evaluate OUT``,
``lmforge convert OUT DST --to hf`` and ``peft merge`` take it the same way)::

    checkpoints/step_XXXXXXX/   weights (all, or the PEFT method's), config.json, tokenizer, training_state/
    adapter/                    PEFT runs: the best checkpoint's adapter (Hugging Face PEFT format for lora/ia3)
    reward_model/               method=rm: the best checkpoint as a Hugging Face folder that
                                AutoModelForSequenceClassification loads (`lmforge reward` scores with it)
    metrics.jsonl, events.out.tfevents.* (TensorBoard), loss_curve.png, config.yaml, summary.json
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import nn

from lmforge.align.config import ONLINE_METHODS, AlignConfig, to_dict
from lmforge.config.batch import resolve_batch
from lmforge.data.prompts import set_chat_template
from lmforge.errors import ConfigError
from lmforge.io import write_json_atomic, write_text_atomic
from lmforge.parallel.dims import ParallelDims, fsdp_strategy
from lmforge.parallel.fsdp import gathered
from lmforge.parallel.runtime import Runtime, init_runtime, shutdown
from lmforge.train.assembly import (CheckpointSpec, OptimSpec, TrainJob, build_training, seed_everything,
                                    stopped_note)
from lmforge.train.loop import PRECISIONS, LoopSettings
from lmforge.train.metrics import save_loss_curve


def job_from_config(cfg: AlignConfig, dims: ParallelDims, accumulate: int, peft_cfg) -> TrainJob:
    """The :class:`~lmforge.train.assembly.TrainJob` of an alignment config."""
    t, o = cfg.trainer, cfg.optim
    loop = LoopSettings(max_steps=int(t.max_steps), micro_batch_size=int(cfg.micro_batch_size),
                        global_batch_size=int(cfg.global_batch_size), accumulate=accumulate,
                        val_check_interval=int(t.val_check_interval or 0),
                        limit_val_batches=int(t.limit_val_batches or 0) if cfg.val_data else 0,
                        log_every_n_steps=int(t.log_every_n_steps or 1),
                        gradient_clip_val=float(t.gradient_clip_val or 0.0), precision=t.precision)
    ac = dict(granularity="full", method=None, num_layers=None) if cfg.gradient_checkpointing else None
    return TrainJob(
        out=Path(cfg.out), dims=dims, loop=loop,
        optim=OptimSpec(name=o.name, lr=float(o.lr), weight_decay=float(o.weight_decay), betas=tuple(o.betas),
                        eps=float(o.eps), sched="CosineAnnealing", warmup_steps=int(o.warmup_steps),
                        constant_steps=0, min_lr=float(o.min_lr)),
        checkpoint=CheckpointSpec(monitor=cfg.monitor, mode=cfg.monitor_mode, save_top_k=int(cfg.save_top_k),
                                  save_last=True, resume=bool(cfg.resume), sharded=cfg.fsdp_sharded_checkpoint),
        seed=int(cfg.seed), peft_method=None if peft_cfg is None else cfg.peft.method, peft_config=peft_cfg,
        activations_checkpoint=ac, fsdp_grad_reduce_dtype=cfg.fsdp_grad_reduce_dtype,
        fsdp_cpu_offload=bool(cfg.fsdp_cpu_offload), tensorboard=True, run_config=to_dict(cfg))


def run(cfg: AlignConfig, runtime: Runtime | None = None, console_log=print) -> dict:
    """Align as ``cfg`` says. Returns a summary dict (losses, reward accuracies, checkpoint and adapter paths)."""
    own = runtime is None
    rt = runtime or init_runtime(cfg.trainer.accelerator)
    try:
        return _run(cfg, rt, console_log, time.perf_counter())
    finally:
        if own:
            shutdown(rt)


def load_datasets(cfg: AlignConfig, tokenizer, length: int):
    """(train, validation or None) datasets of ``cfg``'s method; validation rows follow the training rows in the
    reference table (``offset``)."""
    from lmforge.align.data import load_pairs, load_unpaired

    def load(path, offset):
        if cfg.method == "kto":
            return load_unpaired(path, tokenizer, cfg.align, cfg.align.chat_template, length, offset=offset)
        return load_pairs(path, tokenizer, cfg.align, cfg.align.chat_template, length, add_eos=cfg.method != "rm",
                          offset=offset, margin_key=cfg.align.margin_key if cfg.method == "rm" else None)

    train = load(cfg.data, 0)
    val = load(cfg.val_data, len(train)) if cfg.val_data else None
    return train, val


def add_score_head(model: nn.Module, seed: int) -> nn.Linear:
    """Attach a reward model's ``score`` head (hidden size -> 1, no bias, as Hugging Face's sequence
    classification models) to ``model``, drawn from N(0, 1/hidden) with ``seed``; an untied LM head is frozen."""
    C = model.cfg.hidden_size
    ref = next(model.parameters())
    head = nn.Linear(C, 1, bias=False, device=ref.device, dtype=ref.dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, C, generator=g) / C ** 0.5)
    model.score = head
    if not model.cfg.share_embeddings_and_output_weights:  # the LM head is not used: frozen (DDP needs every
        model.lm_head.weight.requires_grad_(False)         # trained parameter to get a gradient), still saved
    return head


def _run(cfg: AlignConfig, rt: Runtime, console_log, t0: float) -> dict:
    from lmforge.align.objective import PreferenceLoss, RewardLoss, precompute_reference
    from lmforge.open import load_for_inference
    from lmforge.peft import save_adapter

    t = cfg.trainer
    dims = ParallelDims(int(t.devices) * int(t.num_nodes), devices_per_node=int(t.devices),
                        fsdp=fsdp_strategy(cfg.fsdp, cfg.fsdp_sharding_strategy)).check_world(rt.world_size, rt.rank)
    dims.check_supported()
    mbs, gbs = int(cfg.micro_batch_size), int(cfg.global_batch_size)
    accum = resolve_batch(gbs, mbs, None, dims=dims).accumulate_grad_batches
    out = Path(cfg.out)
    seed_everything(int(cfg.seed), dims.dp_rank)

    peft_method = None if cfg.peft.method == "none" else cfg.peft.method
    model, tokenizer = load_for_inference(cfg.model, device=rt.device,
                                          dtype="float32" if peft_method is None else cfg.base_dtype)
    set_chat_template(tokenizer, cfg.align.chat_template)
    model.train()
    mcfg = model.cfg
    peft_cfg = None
    if peft_method is not None:
        import dataclasses

        from lmforge.peft import method_config as make

        peft_cfg = make(peft_method, dataclasses.asdict(getattr(cfg.peft, peft_method)))
    n_virtual = int(cfg.peft.ptuning.num_virtual_tokens) if peft_method == "ptuning" else 0
    seq = int(cfg.seq_length) if cfg.seq_length else mcfg.max_position_embeddings - n_virtual
    if seq + n_virtual > mcfg.max_position_embeddings:
        raise ConfigError(f"seq_length={seq} (+{n_virtual} virtual tokens) exceeds the model's "
                          f"max_position_embeddings={mcfg.max_position_embeddings}; lower seq_length")

    online = cfg.method in ONLINE_METHODS
    if online:
        from lmforge.align.rl import PromptSet, load_reward_fn

        load_reward_fn(cfg.align.reward_fn)  # a reward function that does not import stops the run before any work
        train_ds, val_ds = PromptSet(cfg.data, tokenizer, cfg.align, seq), None
    else:
        train_ds, val_ds = load_datasets(cfg, tokenizer, seq)
    if rt.is_main:
        console_log(train_ds.stats.summary(str(cfg.data)))
        if val_ds is not None:
            console_log(val_ds.stats.summary(str(cfg.val_data)))

    amp = PRECISIONS[t.precision]
    autocast = (lambda: torch.autocast(rt.device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    model_config = mcfg.to_dict()
    if cfg.method == "rm":
        add_score_head(model, int(cfg.seed))
        objective_fn = lambda m: RewardLoss(m, cfg.align.center_rewards_coefficient)  # noqa: E731
    elif online:
        import copy

        from lmforge.align.rl import RolloutLoss

        # The reward function tried on the first micro batch's rollouts before anything is written: one that
        # raises or returns the wrong values stops the run with its error line and no results folder.
        rows = mbs * int(cfg.align.num_generations)
        probe = RolloutLoss(model, cfg.method, cfg.align, train_ds, tokenizer, None, seq, int(cfg.seed), rows)
        first = list(range(min(mbs, len(train_ds))))
        probe.rewards(first, probe.sample([train_ds.ids[i] for i in first]))
        del probe
        reference = cfg.reference
        if reference == "frozen_copy" and float(cfg.align.beta) > 0:  # before PEFT or wrapping: the start weights
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        objective_fn = lambda m: RolloutLoss(m, cfg.method, cfg.align, train_ds, tokenizer, reference,  # noqa: E731
                                             seq, int(cfg.seed), rows)
    else:
        reference, table = cfg.reference, None
        if reference == "precomputed":  # once, with the base model, before any wrapping
            table = precompute_reference(model, [d for d in (train_ds, val_ds) if d is not None], mbs, rt, autocast)
            if rt.is_main:
                console_log(f"reference log-probabilities of {len(table)} examples computed once")
        objective_fn = lambda m: PreferenceLoss(m, cfg.method, cfg.align, reference, table)  # noqa: E731

    job = job_from_config(cfg, dims, accum, peft_cfg)
    training = build_training(job, model, rt, tokenizer=tokenizer, model_config=model_config,
                              console_log=console_log, objective_fn=objective_fn)
    trainer, logger, manager, state = training.trainer, training.logger, training.manager, training.state
    n_trainable, n_total = training.num_parameters()
    if val_ds is not None:
        trainer.extra_val_fn = lambda step: {f"val_{k}": v for k, v in trainer.objective_metrics("val").items()}

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(job.run_config)))
        what = cfg.method + ("" if peft_method is None else f" + {peft_method}")
        console_log(f"alignment ({what}): {n_trainable:,} of {n_total:,} parameters trained; {t.max_steps} steps "
                    f"of {gbs} examples x up to {seq} tokens on {dims.describe()}, {rt.device.type}, precision "
                    f"{job.loop.precision}; results in {out}")
    with logger:
        state = trainer.fit(train_ds, val_ds, state)
        training.finish_saving()
    loss_curve = save_loss_curve(out, rt, title=f"lmforge align ({cfg.method}): loss")
    note = stopped_note(state, int(t.max_steps), manager.latest(), None if cfg.resume else "resume=true")
    if note and rt.is_main:
        console_log(note)

    best = manager.best() or manager.latest()
    final_metrics = {}
    if best is not None:
        records = {r["name"]: r for r in manager.checkpoints()} if hasattr(manager, "checkpoints") else {}
        final_metrics = dict((records.get(best.name) or {}).get("metrics") or {})
    adapter_dir = reward_dir = None
    if best is not None and not state.stopped_early:
        if peft_cfg is not None:
            training.load_weights(best)
            with gathered(training.objective if training.fsdp else None):
                full = None
                if training.fsdp:
                    from lmforge.peft import peft_state_dict

                    full = {k: v.full_tensor() for k, v in peft_state_dict(training.base).items()}  # collective
                if rt.is_main:
                    adapter_dir = str(save_adapter(training.model, peft_method, peft_cfg, out / "adapter",
                                                   base_name=str(cfg.model), state=full, tokenizer=tokenizer))
            rt.barrier()
        if cfg.method == "rm" and rt.is_main:
            from lmforge.align.reward import export_reward_model

            reward_dir = str(export_reward_model(best, out / "reward_model", cfg.model))
    history = state.history
    summary = {
        "results_dir": str(out),
        "method": cfg.method,
        "peft": cfg.peft.method,
        "reference": cfg.reference,
        "steps": state.step,
        "trainable_parameters": n_trainable,
        "train_loss_first": history[0][1] if history else None,
        "train_loss_last": history[-1][1] if history else None,
        "losses": [[s, l] for s, l in history],
        "best_checkpoint": str(best) if best else None,
        "best_metrics": final_metrics,
        "adapter": adapter_dir,
        "reward_model": reward_dir,
        "loss_curve": None if loss_curve is None else str(loss_curve),
        "data": train_ds.stats.to_dict(),
        "resumed_from": training.resumed_from,
        "stopped_early": state.stopped_early,
        "seconds": round(time.perf_counter() - t0, 2),
        "world_size": rt.world_size,
    }
    if rt.is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary
