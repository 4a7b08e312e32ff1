"""The fine-tuning stage: ``run(cfg) -> summary`` (SFT of all weights, or LoRA/DoRA, IA3, adapters, p-tuning).

The base model is loaded with :func:`lmforge.open.load_for_inference`, the method is applied from
outside (:mod:`lmforge.peft`), and the one training loop (:mod:`lmforge.train.loop`) trains it on
rows of :mod:`lmforge.data.sft` with :class:`~lmforge.train.objectives.CausalLMLoss` (loss on response
tokens only). Results in ``cfg.out``::

    checkpoints/step_XXXXXXX/   weights (all of them for method=full, the method's only otherwise),
                                config.json, tokenizer, training_state/ (exact resume)
    adapter/                    PEFT methods: the best checkpoint as adapter_config.json +
                                adapter_model.safetensors (Hugging Face PEFT format for lora/ia3)
    metrics.jsonl, config.yaml, summary.json
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lmforge.config.batch import resolve_batch
from lmforge.data.sft import load_sft_dataset
from lmforge.errors import CheckpointError, ConfigError
from lmforge.finetune.config import FinetuneConfig, to_dict
from lmforge.finetune.metrics import exact_match, greedy_continue, token_f1
from lmforge.io import write_json_atomic, write_text_atomic
from lmforge.parallel.ddp import apply_data_parallel
from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.runtime import Runtime, init_runtime, shutdown
from lmforge.parallel.transforms import apply_activation_checkpointing
from lmforge.train.checkpoint import CheckpointManager, load_model, load_training_state
from lmforge.train.loop import PRECISIONS, LoopSettings, Trainer, TrainState
from lmforge.train.metrics import MetricsLogger
from lmforge.train.objectives import CausalLMLoss
from lmforge.train.optim import build_optimizer, build_schedule
from lmforge.train.pretrain import saved_state_dict, seed_everything


def method_config(cfg: FinetuneConfig):
    """The :mod:`lmforge.peft` config of ``cfg.method`` (None for full fine-tuning)."""
    import dataclasses

    from lmforge.peft import method_config as make

    if cfg.method == "full":
        return None
    return make(cfg.method, dataclasses.asdict(getattr(cfg.peft, cfg.method)))


def run(cfg: FinetuneConfig, runtime: Runtime | None = None, console_log=print) -> dict:
    """Fine-tune as ``cfg`` says. Returns a summary dict (losses, metrics, checkpoint and adapter paths)."""
    own = runtime is None
    rt = runtime or init_runtime(cfg.trainer.accelerator)
    try:
        return _run(cfg, rt, console_log, time.perf_counter())
    finally:
        if own:
            shutdown(rt)


def _run(cfg: FinetuneConfig, rt: Runtime, console_log, t0: float) -> dict:
    from lmforge.open import load_for_inference
    from lmforge.peft import apply_peft, base_model, load_peft_state_dict, peft_state_dict, save_adapter

    t = cfg.trainer
    dims = ParallelDims(int(t.devices) * int(t.num_nodes), devices_per_node=int(t.devices)).check_world(
        rt.world_size, rt.rank)
    dims.check_supported()
    mbs, gbs = int(cfg.micro_batch_size), int(cfg.global_batch_size)
    accum = resolve_batch(gbs, mbs, None, dims=dims).accumulate_grad_batches
    out = Path(cfg.out)
    seed_everything(int(cfg.seed), rt.rank)

    # Base model, in the dtype its frozen weights are kept in.
    dtype = "float32" if cfg.method == "full" else cfg.base_dtype
    model, tokenizer = load_for_inference(cfg.model, device=rt.device, dtype=dtype)
    model.train()
    mcfg = model.cfg
    peft_cfg = method_config(cfg)
    n_virtual = int(cfg.peft.ptuning.num_virtual_tokens) if cfg.method == "ptuning" else 0
    seq = int(cfg.seq_length) if cfg.seq_length else mcfg.max_position_embeddings - n_virtual
    if seq + n_virtual > mcfg.max_position_embeddings:
        raise ConfigError(f"seq_length={seq} (+{n_virtual} virtual tokens) exceeds the model's "
                          f"max_position_embeddings={mcfg.max_position_embeddings}; lower seq_length")

    # Data: rows of seq+1 tokens (inputs and shifted labels).
    train_ds = load_sft_dataset(cfg.data, tokenizer, cfg.sft, seq + 1, seed=int(cfg.seed))
    val_ds = load_sft_dataset(cfg.val_data, tokenizer, cfg.sft, seq + 1, shuffle=False) if cfg.val_data else None
    if rt.is_main:
        console_log(train_ds.stats.summary(str(cfg.data)))
        if val_ds is not None:
            console_log(val_ds.stats.summary(str(cfg.val_data)))

    train_model = model
    if peft_cfg is not None:
        train_model = apply_peft(model, cfg.method, peft_cfg)
    base = base_model(train_model)
    n_trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in train_model.parameters())

    schedule = build_schedule("CosineAnnealing", float(cfg.optim.lr), int(t.max_steps), int(cfg.optim.warmup_steps),
                              0, float(cfg.optim.min_lr))
    optimizer = build_optimizer(train_model, cfg.optim.name, float(cfg.optim.lr), float(cfg.optim.weight_decay),
                                list(cfg.optim.betas), float(cfg.optim.eps), rt.device)
    scaler = torch.amp.GradScaler(rt.device.type) if t.precision == "16-mixed" else None

    def weights_to_save() -> dict:
        return saved_state_dict(base) if peft_cfg is None else peft_state_dict(base)

    def load_saved(folder: Path) -> None:
        weights, _ = load_model(folder, device=rt.device)
        if peft_cfg is None:
            from lmforge.open import load_weights

            load_weights(base, weights, folder)
        else:
            load_peft_state_dict(base, weights, source=str(folder))

    manager = CheckpointManager(out / "checkpoints", rt, monitor=cfg.monitor, mode=cfg.monitor_mode,
                                save_top_k=int(cfg.save_top_k), save_last=True)
    state, resumed_from = TrainState(), None
    latest = manager.latest() if cfg.resume else None
    if latest is not None:
        load_saved(latest)
        state = TrainState.from_dict(load_training_state(latest, optimizer, rt, scaler=scaler))
        resumed_from = str(latest)
        if rt.is_main:
            console_log(f"resuming from {latest} at step {state.step}")

    if cfg.gradient_checkpointing:
        apply_activation_checkpointing(base)
    objective = CausalLMLoss(train_model)
    forward_model = apply_data_parallel(objective, rt)
    settings = LoopSettings(max_steps=int(t.max_steps), micro_batch_size=mbs, global_batch_size=gbs, accumulate=accum,
                            val_check_interval=int(t.val_check_interval or 0),
                            limit_val_batches=int(t.limit_val_batches or 0) if val_ds is not None else 0,
                            log_every_n_steps=int(t.log_every_n_steps or 1),
                            gradient_clip_val=float(t.gradient_clip_val or 0.0), precision=t.precision)
    amp_dtype = PRECISIONS[t.precision]

    def generation_metrics(step: int) -> dict:
        """Exact match and token F1 of greedy answers on the first validation samples (sharded over ranks)."""
        n = min(int(cfg.generation.num_samples), len(val_ds.samples)) if val_ds is not None else 0
        if n == 0:
            return {}
        was = train_model.training
        train_model.eval()
        autocast = torch.autocast(rt.device.type, dtype=amp_dtype) if amp_dtype is not None else None
        em = f1 = 0.0
        for s in val_ds.samples[rt.rank:n:rt.world_size]:
            new = greedy_continue(train_model, s.ids[:s.prompt_len], int(cfg.generation.max_new_tokens),
                                  tokenizer.eod_id, autocast, dtype=amp_dtype)
            text = tokenizer.decode(new, skip_special_tokens=True)
            em += exact_match(text, s.response_text)
            f1 += token_f1(text, s.response_text)
        train_model.train(was)
        em, f1 = trainer._all_reduce([em, f1])
        return {"exact_match": em / n, "f1": f1 / n}

    run_config = to_dict(cfg)

    def save(st: TrainState, metrics: dict) -> None:
        manager.save(st.step, weights_to_save(), mcfg.to_dict(), optimizer, {**st.to_dict(), "config": run_config},
                     metrics=metrics, tokenizer=tokenizer, scaler=scaler)

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(run_config)))
        console_log(f"fine-tuning ({cfg.method}): {n_trainable:,} of {n_total:,} parameters trained; "
                    f"{t.max_steps} steps of {gbs} rows x {seq} tokens on {rt.world_size} process(es), "
                    f"{rt.device.type}, precision {t.precision}; results in {out}")
    logger = MetricsLogger(out, rt, total_steps=int(t.max_steps), tensorboard=False,
                           every_n_steps=int(t.log_every_n_steps or 1))
    trainer = Trainer(forward_model, train_model, optimizer, schedule, rt, settings, save_fn=save, log=logger,
                      scaler=scaler, extra_val_fn=generation_metrics if val_ds is not None else None, dims=dims)
    with logger:
        val_before = None
        if state.step == 0 and val_ds is not None and settings.limit_val_batches > 0:
            val_before = trainer.evaluate(val_ds, settings.limit_val_batches)
            logger.log(0, {"val_loss": val_before})
        state = trainer.fit(train_ds, val_ds, state)

    best = manager.best() or manager.latest()
    final_metrics = {}
    if best is not None:
        records = {r["name"]: r for r in manager.checkpoints()} if hasattr(manager, "checkpoints") else {}
        final_metrics = dict((records.get(best.name) or {}).get("metrics") or {})
    adapter_dir = None
    if peft_cfg is not None and best is not None and not state.stopped_early:
        load_saved(best)  # the best weights, on every rank alike
        if rt.is_main:
            adapter_dir = str(save_adapter(train_model, cfg.method, peft_cfg, out / "adapter", base_name=str(cfg.model)))
        rt.barrier()
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
        "data": train_ds.stats.to_dict(),
        "resumed_from": resumed_from,
        "stopped_early": state.stopped_early,
        "seconds": round(time.perf_counter() - t0, 2),
        "world_size": rt.world_size,
    }
    if rt.is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary
