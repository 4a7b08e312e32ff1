"""The pretraining stage: ``run(cfg) -> summary``.

Configured exactly as NeMo's ``megatron_gpt_pretraining.py`` (trainer.*, model.*, exp_manager.*).
The CLI, the quickstart and the launcher all call :func:`run`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lmforge.config import model_config_from
from lmforge.config.loader import parallel_dims
from lmforge.config.schema import max_time_seconds, tokenizer_path
from lmforge.data.gpt_dataset import build_datasets
from lmforge.data.tokenizers import tokenizer_from_config
from lmforge.errors import ConfigError
from lmforge.io import write_json_atomic, write_text_atomic
from lmforge.models.config import ModelConfig
from lmforge.models.meta import meta_device
from lmforge.models.transformer import Transformer
from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.runtime import Runtime, run_on_runtime
from lmforge.train.assembly import (  # noqa: F401 (saved_state_dict, seed_everything: also imported from here)
    CheckpointSpec, OptimSpec, TrainJob, build_training, saved_state_dict, seed_everything, stopped_note)
from lmforge.train.loop import LoopSettings
from lmforge.train.metrics import save_loss_curve


def results_dir(cfg) -> Path:
    em = cfg.exp_manager
    if em.explicit_log_dir:
        return Path(em.explicit_log_dir)
    return Path(em.exp_dir) / em.name


def build_model(model_cfg: ModelConfig, device: torch.device, seed: int, materialize: bool = True) -> Transformer:
    """Build on the meta device, then allocate on ``device`` and initialise (no throwaway CPU copy).

    ``materialize=False`` leaves the model on the meta device: a pipeline-parallel run allocates and
    initialises only its own stages, an expert-parallel run only its own experts (``build_training``)."""
    with meta_device():
        model = Transformer(model_cfg)
    if not materialize:
        return model
    model = model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


def _sample_counts(cfg, max_steps: int, gbs: int):
    t = cfg.trainer
    train = max_steps * gbs
    val = max(0, int(t.limit_val_batches or 0)) * gbs
    test = max(0, int(t.limit_test_batches or 0)) * gbs
    return train, val, test


def _val_interval(cfg, max_steps: int) -> int:
    v = cfg.trainer.val_check_interval
    if v is None:
        return 0
    if isinstance(v, float) and v <= 1.0:
        return max(1, int(round(v * max_steps)))
    return int(v)


def joint_projections(m) -> bool:
    """``model.fused_projections``: as set, or (None) on except under float8, where one H100 measured the compiled
    1B step slower joined (58,094 tokens/s) than with separate float8 projections (61,008; docs/benchmarks.md)."""
    return bool(m.fused_projections) if m.fused_projections is not None else not m.fp8


def job_from_config(cfg, dims: ParallelDims, max_steps: int) -> TrainJob:
    """The :class:`~lmforge.train.assembly.TrainJob` of a pretraining config (NeMo's keys)."""
    from lmforge.config import to_dict as config_to_dict

    t, m, em = cfg.trainer, cfg.model, cfg.exp_manager
    cp, o = em.checkpoint_callback_params, m.optim
    loop = LoopSettings(
        max_steps=max_steps, micro_batch_size=int(m.micro_batch_size), global_batch_size=int(m.global_batch_size),
        accumulate=int(t.accumulate_grad_batches), val_check_interval=_val_interval(cfg, max_steps),
        limit_val_batches=int(t.limit_val_batches or 0), log_every_n_steps=int(t.log_every_n_steps or 1),
        gradient_clip_val=float(t.gradient_clip_val or 0.0), precision=t.precision,
        every_n_train_steps=int(cp.every_n_train_steps or 0), num_workers=int(m.data.num_workers or 0),
        max_time_s=max_time_seconds(t.max_time))
    ac = None
    if m.activations_checkpoint_granularity:
        ac = dict(granularity=m.activations_checkpoint_granularity, method=m.activations_checkpoint_method,
                  num_layers=m.activations_checkpoint_num_layers)
    return TrainJob(
        out=results_dir(cfg), dims=dims, loop=loop,
        optim=OptimSpec(name=o.name, lr=float(o.lr), weight_decay=float(o.weight_decay), betas=tuple(o.betas),
                        eps=float(o.eps), sched=o.sched.name, warmup_steps=int(o.sched.warmup_steps),
                        constant_steps=int(o.sched.constant_steps), min_lr=float(o.sched.min_lr)),
        checkpoint=CheckpointSpec(monitor=cp.monitor, mode=cp.mode, save_top_k=int(cp.save_top_k),
                                  save_last=bool(cp.save_last), resume=bool(em.resume_if_exists),
                                  resume_must_exist=not em.resume_ignore_no_checkpoint,
                                  sharded=m.fsdp_sharded_checkpoint, async_save=bool(cp.async_save)),
        seed=int(m.seed), activations_checkpoint=ac, compile=bool(m.compile), sequence_parallel=bool(m.sequence_parallel),
        joint_projections=joint_projections(m), loss_chunk_size=m.loss_chunk_size,
        fp8=str(m.fp8_recipe) if m.fp8 else None,
        fp8_fsdp_all_gather=str(m.fp8_fsdp_all_gather).lower(),
        virtual_pipeline=int(m.virtual_pipeline_model_parallel_size or 1),
        fsdp_grad_reduce_dtype=m.fsdp_grad_reduce_dtype, fsdp_cpu_offload=bool(m.fsdp_cpu_offload),
        tensorboard=bool(em.create_tensorboard_logger), wandb=_wandb_kwargs(cfg), run_config=config_to_dict(cfg))


def run(cfg, runtime: Runtime | None = None, console_log=print) -> dict:
    """Pretrain as ``cfg`` says. Returns a summary dict (losses, tokens, seconds, checkpoint path)."""
    return run_on_runtime(_run, cfg, runtime, console_log, t0=time.perf_counter())


def _run(cfg, rt: Runtime, console_log, t0: float) -> dict:
    t, m = cfg.trainer, cfg.model
    dims = parallel_dims(cfg).check_world(rt.world_size, rt.rank)
    dims.check_supported()
    if m.fp8:  # before any data work: this machine cannot train in float8
        from lmforge.train.fp8 import fp8_problem

        problem = fp8_problem(rt.device)
        if problem:
            raise ConfigError(problem)
        from lmforge.train.assembly import fp8_all_gather_on

        fp8_all_gather_on(job_from_config(cfg, dims, 1))  # model.fp8_fsdp_all_gather=true where it cannot apply
    if not m.data.data_prefix:
        raise ConfigError("model.data.data_prefix is not set: give the prefix of a preprocessed dataset, e.g. "
                          "model.data.data_prefix=[1.0,data/corpus_text_document] (make one with `lmforge preprocess`)")
    tokenizer = tokenizer_from_config(m.tokenizer)
    if tokenizer is None:
        raise ConfigError("model.tokenizer.model is not set: give the tokenizer folder or tokenizer.json the data "
                          "was preprocessed with (make one with `lmforge tokenizer train`), or GPT-2's "
                          "model.tokenizer.vocab_file and model.tokenizer.merge_file")
    tok_name = (f"model.tokenizer.model={tokenizer_path(cfg)}" if tokenizer_path(cfg)
                else f"model.tokenizer.vocab_file={m.tokenizer.vocab_file}")
    out = results_dir(cfg)
    gbs = int(m.global_batch_size)
    seq = int(m.data.seq_length or m.encoder_seq_length)
    seed = int(m.seed)

    # Samples per split; with max_epochs the step count follows from one epoch's size.
    max_steps = int(t.max_steps) if t.max_steps is not None and int(t.max_steps) > 0 else None
    cache_dir = m.data.index_mapping_dir
    build = lambda counts: build_datasets(m.data.data_prefix, m.data.splits_string, seq, counts, seed,  # noqa: E731
                                          cache_dir=cache_dir, barrier=rt.barrier, is_main=rt.is_main,
                                          vocab_size=tokenizer.vocab_size,
                                          tokenizer_name=tok_name)
    if max_steps is None:
        epochs = int(t.max_epochs or 1)
        probe = build((None, None, None))[0]
        if probe is None:
            raise ConfigError(f"model.data.splits_string={m.data.splits_string!r} leaves no training data")
        max_steps = max(1, epochs * probe.samples_per_epoch // gbs)
    train_ds, val_ds, test_ds = build(_sample_counts(cfg, max_steps, gbs))
    if train_ds is None:
        raise ConfigError(f"model.data.splits_string={m.data.splits_string!r} leaves no training data")
    flags = dict(eod_mask_loss=bool(m.data.eod_mask_loss), reset_position_ids=bool(m.data.reset_position_ids),
                 reset_attention_mask=bool(m.data.reset_attention_mask))
    if any(flags.values()):  # Megatron's document-aware loss mask, positions and attention
        from lmforge.data.gpt_dataset import DocumentMasks

        if tokenizer.eod_id is None:
            on = ", ".join(f"model.data.{k}=true" for k, v in flags.items() if v)
            raise ConfigError(f"{on} needs the end-of-document token, but the tokenizer ({tok_name}) has none (no "
                              f"eos_token / <|endoftext|>): use a tokenizer with one, or drop {on}")
        train_ds, val_ds, test_ds = (None if d is None else DocumentMasks(d, tokenizer.eod_id, **flags)
                                     for d in (train_ds, val_ds, test_ds))

    model_cfg = model_config_from(cfg, tokenizer.vocab_size)
    seed_everything(seed, dims.dp_rank)  # one tensor-parallel group draws the same dropout masks
    model = build_model(model_cfg, rt.device, seed, materialize=dims.pp == 1 and dims.ep == 1)  # see build_training
    training = build_training(job_from_config(cfg, dims, max_steps), model, rt, tokenizer=tokenizer,
                              console_log=console_log)
    trainer, logger, manager, state = training.trainer, training.logger, training.manager, training.state
    settings, resumed_from = training.job.loop, training.resumed_from

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", _to_yaml(cfg))
        n_params = training.num_parameters()[1]
        console_log(f"model: {n_params / 1e6:.1f}M parameters, {model_cfg.num_layers} layers, hidden "
                    f"{model_cfg.hidden_size}; {max_steps} steps of {gbs} x {seq} tokens on {dims.describe()}, "
                    f"{rt.device.type}, precision {settings.precision}; results in {out}")
    with logger:
        val_before = None
        if state.step == 0 and val_ds is not None and settings.limit_val_batches > 0:
            val_before = trainer.evaluate(val_ds, settings.limit_val_batches)
            logger.log(0, {"val_loss": val_before, "val_ppl": math.exp(min(val_before, 50.0))})
        state = trainer.fit(train_ds, val_ds, state)
        training.finish_saving()
        if state.last_val is not None and state.last_val[0] == state.step:
            val_after = state.last_val[1]
        else:
            val_after = trainer.evaluate(val_ds, settings.limit_val_batches) if val_ds is not None else float("nan")
        test_loss = None
        if test_ds is not None and int(t.limit_test_batches or 0) > 0 and not state.stopped_early \
                and not state.time_limit_reached:
            test_loss = trainer.evaluate(test_ds, int(t.limit_test_batches))
            logger.log(state.step, {"test_loss": test_loss})
    loss_curve = save_loss_curve(out, rt, title="lmforge pretrain: loss")
    note = stopped_note(state, max_steps, manager.latest(),
                        None if cfg.exp_manager.resume_if_exists else "exp_manager.resume_if_exists=true")
    if note and rt.is_main:
        console_log(note)
    summary = {
        "results_dir": str(out),
        "steps": state.step,
        "max_steps": max_steps,
        "tokens_trained": state.tokens_trained,
        "val_loss_before": val_before,
        "val_loss_after": _finite(val_after),
        "test_loss": test_loss,
        "final_train_loss": state.history[-1][1] if state.history else None,
        "checkpoint": str(manager.latest()) if manager.latest() else None,
        "loss_curve": None if loss_curve is None else str(loss_curve),
        "resumed_from": resumed_from,
        "stopped_early": state.stopped_early,
        "time_limit_reached": state.time_limit_reached,
        "seconds": round(time.perf_counter() - t0, 2),
        "world_size": rt.world_size,
    }
    if rt.is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def _wandb_kwargs(cfg):
    em = cfg.exp_manager
    if not em.create_wandb_logger:
        return None
    kw = dict(em.wandb_logger_kwargs or {})
    kw.setdefault("name", em.name)
    return kw


def _to_yaml(cfg) -> str:
    from lmforge.config import to_yaml

    return to_yaml(cfg)
