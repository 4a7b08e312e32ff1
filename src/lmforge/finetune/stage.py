"""The fine-tuning stage: ``run(cfg) -> summary`` (SFT of all weights, or LoRA/DoRA, IA3, adapters, p-tuning).

The base model is loaded with :func:`lmforge.open.load_for_inference`, the method is applied from
outside (:mod:`lmforge.peft`), and the one training loop (:mod:`lmforge.train.loop`) trains it on
rows of :mod:`lmforge.data.sft` with :class:`~lmforge.train.objectives.CausalLMLoss` (loss on response
tokens only). Results in ``cfg.out``::

    checkpoints/step_XXXXXXX/   weights (all of them for method=full, the method's only otherwise),
                                config.json, tokenizer, training_state/ (exact resume)
    adapter/                    PEFT methods: the best checkpoint as adapter_config.json +
                                adapter_model.safetensors (Hugging Face PEFT format for lora/ia3) + the tokenizer
                                (with the chat template trained on: sft.chat_template, else the base's,
                                and with sft.attributes the SteerLM attribute format, lmforge.data.steer)
    metrics.jsonl, events.out.tfevents.* (TensorBoard), loss_curve.png, config.yaml, summary.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from lmforge.config.batch import resolve_batch
from lmforge.data.prompts import set_chat_template
from lmforge.data.sft import load_sft_dataset
from lmforge.errors import ConfigError
from lmforge.finetune.config import FinetuneConfig, activations_checkpoint, parallel_dims, to_dict
from lmforge.finetune.metrics import exact_match, greedy_continue, token_f1
from lmforge.io import write_json_atomic, write_text_atomic
from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.fsdp import gathered, whole_tensor
from lmforge.parallel.runtime import Runtime, run_on_runtime
from lmforge.train.assembly import (CheckpointSpec, OptimSpec, TrainJob, build_training, seed_everything,
                                    stopped_note)
from lmforge.train.loop import PRECISIONS, LoopSettings
from lmforge.train.metrics import save_loss_curve


def peft_method_config(method: str, peft_settings):
    """The :mod:`lmforge.peft` config of PEFT ``method`` from a config's ``peft`` section (``peft_settings.<method>``).
    Fine-tuning and alignment both build theirs here."""
    import dataclasses

    from lmforge.peft import method_config as make

    return make(method, dataclasses.asdict(getattr(peft_settings, method)))


def method_config(cfg: FinetuneConfig):
    """The :mod:`lmforge.peft` config of ``cfg.method`` (None for full fine-tuning)."""
    if cfg.method == "full":
        return None
    return peft_method_config(cfg.method, cfg.peft)


def stage_job(cfg, dims: ParallelDims, accumulate: int, peft_method: Optional[str], peft_cfg,
              activations_checkpoint: Optional[dict], run_config: dict, async_save: bool = False,
              sequence_parallel: bool = False) -> TrainJob:
    """The :class:`~lmforge.train.assembly.TrainJob` of a fine-tuning or alignment config, from the keys both
    schemas share (``trainer.*``, ``optim.*``, batch sizes, checkpoint, seed and FSDP settings); what only one
    stage has comes as arguments. The schedule is cosine annealing after the warm-up."""
    t, o = cfg.trainer, cfg.optim
    loop = LoopSettings(max_steps=int(t.max_steps), micro_batch_size=int(cfg.micro_batch_size),
                        global_batch_size=int(cfg.global_batch_size), accumulate=accumulate,
                        val_check_interval=int(t.val_check_interval or 0),
                        limit_val_batches=int(t.limit_val_batches or 0) if cfg.val_data else 0,
                        log_every_n_steps=int(t.log_every_n_steps or 1),
                        gradient_clip_val=float(t.gradient_clip_val or 0.0), precision=t.precision)
    return TrainJob(
        out=Path(cfg.out), dims=dims, loop=loop,
        optim=OptimSpec(name=o.name, lr=float(o.lr), weight_decay=float(o.weight_decay), betas=tuple(o.betas),
                        eps=float(o.eps), sched="CosineAnnealing", warmup_steps=int(o.warmup_steps),
                        constant_steps=0, min_lr=float(o.min_lr)),
        checkpoint=CheckpointSpec(monitor=cfg.monitor, mode=cfg.monitor_mode, save_top_k=int(cfg.save_top_k),
                                  save_last=True, resume=bool(cfg.resume), sharded=cfg.fsdp_sharded_checkpoint,
                                  async_save=async_save),
        seed=int(cfg.seed), peft_method=None if peft_cfg is None else peft_method, peft_config=peft_cfg,
        activations_checkpoint=activations_checkpoint, activations_checkpoint_prefix="",  # the keys are top-level
        sequence_parallel=sequence_parallel,
        fsdp_grad_reduce_dtype=cfg.fsdp_grad_reduce_dtype,
        fsdp_cpu_offload=bool(cfg.fsdp_cpu_offload), tensorboard=True, run_config=run_config)


def job_from_config(cfg: FinetuneConfig, dims: ParallelDims, accumulate: int, peft_cfg) -> TrainJob:
    """The :class:`~lmforge.train.assembly.TrainJob` of a fine-tuning config."""
    job = stage_job(cfg, dims, accumulate, cfg.method, peft_cfg, activations_checkpoint(cfg), to_dict(cfg),
                    async_save=bool(cfg.async_save), sequence_parallel=bool(cfg.sequence_parallel))
    job.compile = bool(cfg.compile)  # each block with its adapters, and the loss head (build_training)
    return job


def stage_layout(cfg, rt: Runtime) -> tuple[ParallelDims, int]:
    """(parallel layout, gradient accumulation steps) of a fine-tuning or alignment run on ``rt``: the layout the
    config asks for (:func:`lmforge.finetune.config.parallel_dims`), checked against the world torchrun started;
    accumulation from the global and micro batch sizes."""
    dims = parallel_dims(cfg).check_world(rt.world_size, rt.rank)
    dims.check_supported()
    accum = resolve_batch(int(cfg.global_batch_size), int(cfg.micro_batch_size), None,
                          dims=dims).accumulate_grad_batches
    return dims, accum


def open_base_model(path, rt: Runtime, dtype: str, chat_template: Optional[str]):
    """(model in training mode, tokenizer) of the model a stage starts from, its weights in ``dtype``; the
    tokenizer carries ``chat_template`` (else its own), so checkpoints and the adapter keep the trained one."""
    from lmforge.open import load_for_inference

    model, tokenizer = load_for_inference(path, device=rt.device, dtype=dtype)
    set_chat_template(tokenizer, chat_template)
    model.train()
    return model, tokenizer


def sequence_length(seq_length, model_cfg, n_virtual: int) -> int:
    """Tokens a training row holds: ``seq_length``, else the model's ``max_position_embeddings`` less the
    ``n_virtual`` p-tuning tokens; a ConfigError when the two together exceed what the model takes."""
    seq = int(seq_length) if seq_length else model_cfg.max_position_embeddings - n_virtual
    if seq + n_virtual > model_cfg.max_position_embeddings:
        raise ConfigError(f"seq_length={seq} (+{n_virtual} virtual tokens) exceeds the model's "
                          f"max_position_embeddings={model_cfg.max_position_embeddings}; lower seq_length")
    return seq


def start_results(out: Path, run_config: dict) -> None:
    """Create the results folder and write the run's ``config.yaml`` (rank 0 calls this)."""
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(run_config)))


def finish_results(out: Path, rt: Runtime, title: str, state, max_steps: int, manager, resume: bool, console_log):
    """After training: save the loss curve and print (rank 0) the note of a run that stopped before
    ``max_steps``. Returns (loss curve path or None, best checkpoint or None, the best checkpoint's recorded
    metrics); the best is the monitored best, else the newest."""
    loss_curve = save_loss_curve(out, rt, title=title)
    note = stopped_note(state, max_steps, manager.latest(), None if resume else "resume=true")
    if note and rt.is_main:
        console_log(note)
    best = manager.best() or manager.latest()
    final_metrics = {}
    if best is not None:
        records = {r["name"]: r for r in manager.checkpoints()} if hasattr(manager, "checkpoints") else {}
        final_metrics = dict((records.get(best.name) or {}).get("metrics") or {})
    return loss_curve, best, final_metrics


def write_summary(summary: dict, out: Path, rt: Runtime, loss_curve, data_stats, resumed_from, state,
                  t0: float) -> dict:
    """Complete a fine-tuning or alignment summary with the keys both end with (loss curve, data statistics,
    resume, early stop, seconds since ``t0``, world size), write it to ``out/summary.json`` on rank 0, return it."""
    summary.update({
        "loss_curve": None if loss_curve is None else str(loss_curve),
        "data": data_stats.to_dict(),
        "resumed_from": resumed_from,
        "stopped_early": state.stopped_early,
        "seconds": round(time.perf_counter() - t0, 2),
        "world_size": rt.world_size,
    })
    if rt.is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def export_adapter(training, rt: Runtime, best, method: str, peft_cfg, out: Path, base_name: str, tokenizer):
    """Load the ``best`` checkpoint's weights on every rank and write its adapter to ``out/adapter`` on rank 0
    (under FSDP the adapter weights are gathered first, a collective). Returns the adapter folder on rank 0,
    None on the others."""
    from lmforge.peft import save_adapter

    adapter_dir = None
    training.load_weights(best)  # the best weights, on every rank alike
    with gathered(training.objective if training.fsdp else None):
        full = None
        if training.fsdp:
            from lmforge.peft import peft_state_dict

            full = {k: whole_tensor(v) for k, v in peft_state_dict(training.base).items()}  # collective
        if rt.is_main:
            adapter_dir = str(save_adapter(training.model, method, peft_cfg, out / "adapter", base_name=base_name,
                                           state=full, tokenizer=tokenizer))
    rt.barrier()
    return adapter_dir


def run(cfg: FinetuneConfig, runtime: Runtime | None = None, console_log=print) -> dict:
    """Fine-tune as ``cfg`` says. Returns a summary dict (losses, metrics, checkpoint and adapter paths)."""
    return run_on_runtime(_run, cfg, runtime, console_log)


def _run(cfg: FinetuneConfig, rt: Runtime, console_log, t0: float) -> dict:
    t = cfg.trainer
    dims, accum = stage_layout(cfg, rt)
    gbs = int(cfg.global_batch_size)
    out = Path(cfg.out)
    seed_everything(int(cfg.seed), dims.dp_rank)  # one tensor-parallel group draws the same dropout masks

    # Base model, in the dtype its frozen weights are kept in.
    dtype = "float32" if cfg.method == "full" else cfg.base_dtype
    model, tokenizer = open_base_model(cfg.model, rt, dtype, cfg.sft.chat_template)
    steer = cfg.sft.attribute_format()
    if steer is not None:  # SteerLM: the checkpoints' tokenizer carries the attribute format `generate` reads
        from lmforge.data.steer import set_format

        set_format(tokenizer, steer)
    mcfg = model.cfg
    peft_cfg = method_config(cfg)
    n_virtual = int(cfg.peft.ptuning.num_virtual_tokens) if cfg.method == "ptuning" else 0
    seq = sequence_length(cfg.seq_length, mcfg, n_virtual)

    if cfg.sequence_parallel and seq % dims.tp:
        raise ConfigError(f"sequence_parallel=true splits each row's {seq} input tokens over "
                          f"tensor_model_parallel_size={dims.tp} ranks: set seq_length to a multiple of {dims.tp}")

    # Data: rows of seq+1 tokens (inputs and shifted labels).
    train_ds = load_sft_dataset(cfg.data, tokenizer, cfg.sft, seq + 1, seed=int(cfg.seed))
    val_ds = load_sft_dataset(cfg.val_data, tokenizer, cfg.sft, seq + 1, shuffle=False) if cfg.val_data else None
    if rt.is_main:
        console_log(train_ds.stats.summary(str(cfg.data)))
        if val_ds is not None:
            console_log(val_ds.stats.summary(str(cfg.val_data)))

    job = job_from_config(cfg, dims, accum, peft_cfg)
    training = build_training(job, model, rt, tokenizer=tokenizer, model_config=mcfg.to_dict(),
                              console_log=console_log)
    train_model, trainer, logger, manager = training.model, training.trainer, training.logger, training.manager
    state, resumed_from, settings = training.state, training.resumed_from, job.loop
    n_trainable, n_total = training.num_parameters()
    amp_dtype = PRECISIONS[settings.precision]  # the one trained in (fp16 on a V100)

    def generation_metrics(step: int) -> dict:
        """Exact match and token F1 of greedy answers on the first validation samples (sharded over ranks)."""
        n = min(int(cfg.generation.num_samples), len(val_ds.samples)) if val_ds is not None else 0
        if n == 0:
            return {}
        was = train_model.training
        train_model.eval()
        autocast = torch.autocast(rt.device.type, dtype=amp_dtype) if amp_dtype is not None else None
        em = f1 = 0.0
        with gathered(training.objective if training.fsdp else None):
            # Under FSDP every rank runs the same number of forwards (the blocks' all-gathers are collective).
            samples = val_ds.samples[:n] if training.fsdp else val_ds.samples[dims.dp_rank:n:dims.dp]
            for s in samples:
                new = greedy_continue(train_model, s.ids[:s.prompt_len], int(cfg.generation.max_new_tokens),
                                      tokenizer.eod_id, autocast, dtype=amp_dtype)
                text = tokenizer.decode(new, skip_special_tokens=True)
                em += exact_match(text, s.response_text)
                f1 += token_f1(text, s.response_text)
        train_model.train(was)
        if training.fsdp:  # every rank scored all samples
            return {"exact_match": em / n, "f1": f1 / n}
        em, f1 = trainer._all_reduce([em, f1])
        return {"exact_match": em / n, "f1": f1 / n}

    if val_ds is not None:
        trainer.extra_val_fn = generation_metrics

    if rt.is_main:
        start_results(out, job.run_config)
        console_log(f"fine-tuning ({cfg.method}): {n_trainable:,} of {n_total:,} parameters trained; "
                    f"{t.max_steps} steps of {gbs} rows x {seq} tokens on {dims.describe()}, "
                    f"{rt.device.type}, precision {settings.precision}; results in {out}")
    with logger:
        val_before = None
        if state.step == 0 and val_ds is not None and settings.limit_val_batches > 0:
            val_before = trainer.evaluate(val_ds, settings.limit_val_batches)
            logger.log(0, {"val_loss": val_before})
        state = trainer.fit(train_ds, val_ds, state)
        training.finish_saving()
    loss_curve, best, final_metrics = finish_results(out, rt, f"lmforge finetune ({cfg.method}): loss", state,
                                                     int(t.max_steps), manager, bool(cfg.resume), console_log)
    adapter_dir = None
    if peft_cfg is not None and best is not None and not state.stopped_early:
        adapter_dir = export_adapter(training, rt, best, cfg.method, peft_cfg, out, str(cfg.model), tokenizer)
    history = state.history
    summary = {
        "results_dir": str(out),
        "method": cfg.method,
        "steps": state.step,
        "trainable_parameters": n_trainable,
        "train_loss_first": history[0][1] if history else None,
        "train_loss_last": history[-1][1] if history else None,
        "losses": [[s, l] for s, l in history],
        "val_loss_before": val_before,
        "best_checkpoint": str(best) if best else None,
        "best_metrics": final_metrics,
        "adapter": adapter_dir,
    }
    return write_summary(summary, out, rt, loss_curve, train_ds.stats, resumed_from, state, t0)
