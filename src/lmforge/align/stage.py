"""The alignment stage: ``run(cfg) -> summary`` (DPO, IPO, RPO, KTO, ORPO, SimPO; reward models and SteerLM
attribute models; GRPO, REINFORCE, PPO).

The same assembly as fine-tuning (:func:`lmforge.train.assembly.build_training`: PEFT, FSDP or DDP, precision,
checkpoints, resume, the one loop), with a preference objective (:mod:`lmforge.align.objective`) in place of the
next-token loss. Results in ``cfg.out``, laid out as a fine-tuning run's (so ``generate OUT``, ``evaluate OUT``,
``lmforge convert OUT DST --to hf`` and ``peft merge`` take it the same way)::

    checkpoints/step_XXXXXXX/   weights (all, or the PEFT method's), config.json, tokenizer, training_state/
    adapter/                    PEFT runs: the best checkpoint's adapter (Hugging Face PEFT format for lora/ia3)
    reward_model/               method=rm / regression_rm: the best checkpoint as a Hugging Face folder that
                                AutoModelForSequenceClassification loads (`lmforge reward` scores with it; an
                                attribute model has one output per attribute, problem_type regression)
    critic/                     method=ppo: the latest checkpoint's critic (weights with score.weight, config.json,
                                training_state/); each checkpoint holds its own critic/ too
    metrics.jsonl, events.out.tfevents.* (TensorBoard), loss_curve.png, config.yaml, summary.json
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from lmforge.align.config import ONLINE_METHODS, AlignConfig, to_dict
from lmforge.finetune.stage import (export_adapter, finish_results, open_base_model, peft_method_config,
                                    sequence_length, stage_job, stage_layout, start_results, write_summary)
from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.runtime import Runtime, run_on_runtime
from lmforge.train.assembly import TrainJob, build_training, seed_everything, shards
from lmforge.train.loop import PRECISIONS


def job_from_config(cfg: AlignConfig, dims: ParallelDims, accumulate: int, peft_cfg) -> TrainJob:
    """The :class:`~lmforge.train.assembly.TrainJob` of an alignment config."""
    job = stage_job(cfg, dims, accumulate, cfg.peft.method, peft_cfg, cfg.activations_checkpoint, to_dict(cfg))
    job.compile = bool(cfg.compile)  # each block, and the preference head's chunks (PreferenceLoss.compile_loss)
    return job


def run(cfg: AlignConfig, runtime: Runtime | None = None, console_log=print) -> dict:
    """Align as ``cfg`` says. Returns a summary dict (losses, reward accuracies, checkpoint and adapter paths)."""
    return run_on_runtime(_run, cfg, runtime, console_log)


def shared_prompt(cfg: AlignConfig, model_cfg=None) -> bool:
    """Whether pairs are read as one row ``[prompt | chosen | rejected]`` (``align.shared_prompt``, see
    :class:`~lmforge.align.data.PairDataset`): on for the paired methods unless set false, or unless the model
    (``model_cfg``) measures attention by token-index distance; ``align.shared_prompt=true`` for such a model is
    refused with one line."""
    from lmforge.align.objective import shared_prompt_problem
    from lmforge.errors import ConfigError

    if not cfg.shared_prompt:
        return False
    problem = shared_prompt_problem(model_cfg) if model_cfg is not None else None
    if problem and cfg.align.shared_prompt:
        raise ConfigError(f"align.shared_prompt=true cannot act on {cfg.model}: {problem}, and a shared row changes "
                          f"those distances; set align.shared_prompt=false (or leave it unset)")
    return problem is None


def load_datasets(cfg: AlignConfig, tokenizer, length: int, model_cfg=None):
    """(train, validation or None) datasets of ``cfg``'s method; validation rows follow the training rows in the
    reference table (``offset``). Pairs share their prompt in one row where :func:`shared_prompt` says so (the
    model's config ``model_cfg`` decides with it)."""
    from lmforge.align.data import load_attributes, load_pairs, load_unpaired

    shared = shared_prompt(cfg, model_cfg)

    def load(path, offset):
        if cfg.method == "regression_rm":
            return load_attributes(path, tokenizer, cfg.align, cfg.align.chat_template, length)
        if cfg.method == "kto":
            return load_unpaired(path, tokenizer, cfg.align, cfg.align.chat_template, length, offset=offset)
        pairs = load_pairs(path, tokenizer, cfg.align, cfg.align.chat_template, length, add_eos=cfg.method != "rm",
                           offset=offset, margin_key=cfg.align.margin_key if cfg.method == "rm" else None)
        pairs.shared_prompt = shared
        return pairs

    train = load(cfg.data, 0)
    val = load(cfg.val_data, len(train)) if cfg.val_data else None
    return train, val


def add_score_head(model: nn.Module, seed: int, outputs: int = 1) -> nn.Linear:
    """Attach a reward model's ``score`` head (hidden size -> ``outputs``: 1, or one per SteerLM attribute; no
    bias, as Hugging Face's sequence classification models) to ``model``, drawn from N(0, 1/hidden) with ``seed``;
    an untied LM head is frozen."""
    C = model.cfg.hidden_size
    ref = next(model.parameters())
    head = nn.Linear(C, outputs, bias=False, device=ref.device, dtype=ref.dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(outputs, C, generator=g) / C ** 0.5)
    model.score = head
    if not model.cfg.share_embeddings_and_output_weights:  # the LM head is not used: frozen (DDP needs every
        model.lm_head.weight.requires_grad_(False)         # trained parameter to get a gradient), still saved
    return head


def open_reward_model(path, tokenizer, device) -> nn.Module:
    """The reward model of ``align.reward_model`` (eval mode, frozen); one line when it is not one, or when its
    tokenizer is not the policy's (it scores the policy's token ids)."""
    from lmforge.align.reward import load_reward_model
    from lmforge.errors import ConfigError

    rm, rm_tok = load_reward_model(path, device=device)
    if rm.score.weight.shape[0] != 1:
        raise ConfigError(f"align.reward_model={path} has {rm.score.weight.shape[0]} outputs (a SteerLM attribute "
                          f"model); online RL needs one scalar reward: a `lmforge align --method rm` model")
    probe = "The reward model reads the policy's tokens: 0123456789 abc XYZ"
    if rm_tok.vocab_size != tokenizer.vocab_size or rm_tok.encode(probe) != tokenizer.encode(probe):
        raise ConfigError(f"align.reward_model={path}: its tokenizer is not the policy's (it scores the policy's "
                          f"token ids); train the reward model from the same base model (lmforge align --method rm)")
    return rm.eval().requires_grad_(False)


def _export_merged_reward_model(training, out: Path, base_name: str, fmt) -> Path:
    """``out/reward_model`` of a PEFT attribute model: the live model (the best checkpoint's weights loaded) with its
    LoRA merged into the base weights and its score head, written as a full checkpoint in a scratch folder and
    exported from there as :func:`~lmforge.align.reward.export_reward_model` exports any run's."""
    import tempfile

    from lmforge.align.reward import export_reward_model
    from lmforge.peft import merge_adapter
    from lmforge.train.assembly import saved_state_dict
    from lmforge.train.checkpoint import save_model

    base = merge_adapter(training.base)  # the run is over: its model is not trained again
    with tempfile.TemporaryDirectory(dir=out, prefix=".merged.") as tmp:
        save_model(Path(tmp), saved_state_dict(base), training.model_config, tokenizer=training.tokenizer)
        return export_reward_model(Path(tmp), out / "reward_model", base_name, attributes=fmt)


def copy_folder(src: Path, dst: Path) -> Path:
    """Replace ``dst`` with a copy of ``src``, whole or not at all."""
    import os
    import shutil
    import tempfile

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        staged = Path(tmp) / dst.name
        shutil.copytree(src, staged)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(staged, dst)
    return dst


def _run(cfg: AlignConfig, rt: Runtime, console_log, t0: float) -> dict:
    from lmforge.align.objective import AttributeLoss, PreferenceLoss, RewardLoss, precompute_reference
    t = cfg.trainer
    dims, accum = stage_layout(cfg, rt)
    mbs, gbs = int(cfg.micro_batch_size), int(cfg.global_batch_size)
    out = Path(cfg.out)
    seed_everything(int(cfg.seed), dims.dp_rank)

    peft_method = None if cfg.peft.method == "none" else cfg.peft.method
    model, tokenizer = open_base_model(cfg.model, rt, "float32" if peft_method is None else cfg.base_dtype,
                                       cfg.align.chat_template)
    mcfg = model.cfg
    peft_cfg = None if peft_method is None else peft_method_config(peft_method, cfg.peft)
    n_virtual = int(cfg.peft.ptuning.num_virtual_tokens) if peft_method == "ptuning" else 0
    seq = sequence_length(cfg.seq_length, mcfg, n_virtual)

    online = cfg.method in ONLINE_METHODS
    reward_model = critic_start = None
    if online:
        from lmforge.align.rl import PromptSet, load_reward_fn

        if cfg.align.reward_model:  # a reward model that does not load stops the run before any work
            reward_model = open_reward_model(cfg.align.reward_model, tokenizer, rt.device)
        else:  # so does a reward function that does not import
            load_reward_fn(cfg.align.reward_fn)
        if cfg.align.critic_model:  # a critic that does not load: one line, nothing written
            from lmforge.align.rl import load_critic

            critic_start = load_critic(cfg.align.critic_model, rt.device)
        train_ds, val_ds = PromptSet(cfg.data, tokenizer, cfg.align, seq), None
    else:
        train_ds, val_ds = load_datasets(cfg, tokenizer, seq, mcfg)
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
    elif cfg.method == "regression_rm":
        add_score_head(model, int(cfg.seed), len(cfg.align.attributes))
        objective_fn = lambda m: AttributeLoss(m, cfg.align.attributes)  # noqa: E731
    elif online:
        import copy

        from lmforge.align.rl import RolloutLoss, rollout_compile, rollout_dtype

        compiled, line = rollout_compile(cfg.align.rollout_compile, rt.device)  # true off CUDA: refused here
        sample_dtype = rollout_dtype(cfg.align.rollout_dtype, amp)  # None: the weights' own
        # The reward function tried on the first micro batch's rollouts before anything is written: one that
        # raises or returns the wrong values stops the run with its error line and no results folder.
        rows = mbs * int(cfg.align.num_generations)
        probe = RolloutLoss(model, cfg.method, cfg.align, train_ds, tokenizer, None, seq, int(cfg.seed), rows,
                            reward_model=reward_model)  # eager: one micro batch, on the model before PEFT
        first = list(range(min(mbs, len(train_ds))))
        probe.rewards(first, probe.sample([train_ds.ids[i] for i in first]))
        del probe
        reference = cfg.reference
        if reference == "frozen_copy" and float(cfg.align.beta) > 0:  # before PEFT or wrapping: the start weights
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        critic = critic_opt = None
        critic_lr = float(cfg.align.critic_lr if cfg.align.critic_lr is not None else cfg.optim.lr)
        if cfg.method == "ppo":  # from the starting policy (before PEFT), the reward model or align.critic_model
            from lmforge.align.rl import build_critic
            from lmforge.train.optim import build_optimizer

            critic = build_critic(model, critic_start, cfg.align.critic_model, reward_model, rt.device)
            if cfg.critic_activations_checkpoint:  # the critic's forward in the loss recomputed as the policy's
                from lmforge.parallel.transforms import apply_activation_checkpointing

                apply_activation_checkpointing(critic, **cfg.critic_activations_checkpoint, prefix="")
            o = cfg.optim
            critic_opt = build_optimizer(critic, o.name, critic_lr, float(o.weight_decay), list(o.betas),
                                         float(o.eps), rt.device)
        objective_fn = lambda m: RolloutLoss(m, cfg.method, cfg.align, train_ds, tokenizer, reference,  # noqa: E731
                                             seq, int(cfg.seed), rows, reward_model=reward_model, critic=critic,
                                             critic_optimizer=critic_opt,
                                             critic_lr_scale=critic_lr / float(cfg.optim.lr),
                                             compile_decode=compiled, log=console_log,
                                             rollout_copy=shards(job), rollout_dtype=sample_dtype)
    else:
        reference, table = cfg.reference, None
        if reference == "precomputed":  # once, with the base model, before any wrapping
            table = precompute_reference(model, [d for d in (train_ds, val_ds) if d is not None], mbs, rt, autocast)
            if rt.is_main:
                console_log(f"reference log-probabilities of {len(table)} examples computed once")
        objective_fn = lambda m: PreferenceLoss(m, cfg.method, cfg.align, reference, table)  # noqa: E731

    job = job_from_config(cfg, dims, accum, peft_cfg)
    if cfg.method == "regression_rm" and peft_cfg is not None:  # the new score head trains in full beside LoRA
        job.modules_to_save = ("score",)
    training = build_training(job, model, rt, tokenizer=tokenizer, model_config=model_config,
                              console_log=console_log, objective_fn=objective_fn)
    trainer, logger, manager, state = training.trainer, training.logger, training.manager, training.state
    if online and cfg.method == "ppo":  # the critic in every checkpoint, and back from the one resumed
        from lmforge.align.rl import resume_critic, save_critic

        training.extra_save = lambda folder: save_critic(folder, critic, critic_opt, rt)
        if training.resumed_from:
            resume_critic(training.resumed_from, critic, critic_opt)
    if online and rt.is_main:  # the decode step, and the dtype and weights the rollouts sample from
        console_log(f"{line}; {training.objective.describe_rollouts()} (align.rollout_dtype="
                    f"{cfg.align.rollout_dtype})")
    if online and shards(job) and rt.is_main:
        console_log("rollouts: each rank samples its share of the prompts from a whole copy of the policy, its "
                    "trained weights gathered from the shards once per rollout")
    n_trainable, n_total = training.num_parameters()
    if val_ds is not None:
        trainer.extra_val_fn = lambda step: {f"val_{k}": v for k, v in trainer.objective_metrics("val").items()}

    if rt.is_main:
        start_results(out, job.run_config)
        what = cfg.method + ("" if peft_method is None else f" + {peft_method}")
        rows = "; pairs as one row each, the prompt shared" if getattr(train_ds, "shared_prompt", False) else ""
        console_log(f"alignment ({what}): {n_trainable:,} of {n_total:,} parameters trained; {t.max_steps} steps "
                    f"of {gbs} examples x up to {seq} tokens{rows} on {dims.describe()}, {rt.device.type}, precision "
                    f"{job.loop.precision}; results in {out}")
    with logger:
        state = trainer.fit(train_ds, val_ds, state)
        training.finish_saving()
    loss_curve, best, final_metrics = finish_results(out, rt, f"lmforge align ({cfg.method}): loss", state,
                                                     int(t.max_steps), manager, bool(cfg.resume), console_log)
    adapter_dir = reward_dir = None
    if best is not None and not state.stopped_early:
        if peft_cfg is not None:
            adapter_dir = export_adapter(training, rt, best, peft_method, peft_cfg, out, str(cfg.model), tokenizer)
        if cfg.method in ("rm", "regression_rm") and rt.is_main:
            from lmforge.align.reward import export_reward_model
            from lmforge.data.steer import AttributeFormat

            fmt = None if cfg.method == "rm" else AttributeFormat.of(cfg.align.attributes, cfg.align.attribute_range)
            if peft_cfg is None:
                reward_dir = str(export_reward_model(best, out / "reward_model", cfg.model, attributes=fmt))
            else:  # the best checkpoint's LoRA (loaded by export_adapter) merged, with its head
                reward_dir = str(_export_merged_reward_model(training, out, cfg.model, fmt))
    critic_dir = None
    if cfg.method == "ppo" and rt.is_main:  # the latest checkpoint's critic beside the policy: OUT/critic/
        from lmforge.align.rl import CRITIC_DIR

        latest = manager.latest()
        if latest is not None and (latest / CRITIC_DIR).is_dir():
            critic_dir = str(copy_folder(latest / CRITIC_DIR, out / CRITIC_DIR))
    history = state.history
    summary = {
        "results_dir": str(out),
        "method": cfg.method,
        "peft": cfg.peft.method,
        "reference": cfg.reference,
        "shared_prompt": bool(getattr(train_ds, "shared_prompt", False)),
        "steps": state.step,
        "trainable_parameters": n_trainable,
        "train_loss_first": history[0][1] if history else None,
        "train_loss_last": history[-1][1] if history else None,
        "losses": [[s, l] for s, l in history],
        "best_checkpoint": str(best) if best else None,
        "best_metrics": final_metrics,
        "adapter": adapter_dir,
        "reward_model": reward_dir,
    }
    if cfg.method == "ppo":
        summary["critic"] = critic_dir
    return write_summary(summary, out, rt, loss_curve, train_ds.stats, training.resumed_from, state, t0)
