"""NeMo Launcher's PPO stage body (``conf/rlhf_ppo/gpt3/2b_ppo.yaml``) as ``lmforge align --method ppo``'s config.

NeMo-Aligner runs PPO as two jobs: an ``actor`` (the policy: rollouts, the clipped policy loss) and a ``critic``
server (the value model, started from the reward model, which it also serves when
``combine_rm_and_critic_server``). lmforge runs both in one process: the actor's keys become the run's, the critic's
checkpoint becomes the reward model the critic starts from (``align.reward_model``) and its learning rate and value
clip the critic's (``align.critic_lr``, ``align.cliprange_value``).

NeMo's step takes ``model.ppo.num_rollout_samples`` prompts (one completion each) and trains on them in mini
batches of ``model.global_batch_size``: lmforge's ``global_batch_size`` (prompts per step) is the former,
``align.num_mini_batches`` their ratio, ``align.num_generations`` 1, ``align.ppo_epochs`` 1.

The actor's ``model.activations_checkpoint_granularity`` / ``_method`` / ``_num_layers`` are ``lmforge align``'s keys
of the same names, with NeMo's (Megatron-core's) meaning, for the policy and the critic; the critic's own keys,
where given, must say the same (:func:`~lmforge.launch.nemo_peft.activations_checkpoint_keys`).

As :mod:`lmforge.launch.nemo_peft` does, every key either maps onto an lmforge key with NeMo's meaning, is accepted
at the values that describe what lmforge does anyway (``ACCEPTED``; ``"any"``: a setting of NeMo's servers,
memory or kernels with no effect on the result), only feeds interpolations (``VARIABLES``), or is refused with one
``ConfigError`` naming it (validation, which lmforge's online RL does not have, among them).
"""

from __future__ import annotations

from typing import Any, Callable

from lmforge.errors import ConfigError
from lmforge.launch.nemo_peft import (_covered, _flatten, _set, _translate_key, activations_checkpoint_keys,
                                      precision_handlers)

#: NeMo key (below the stage) -> lmforge align key, copied as is.
DIRECT = {
    "actor.trainer.devices": "trainer.devices", "actor.trainer.num_nodes": "trainer.num_nodes",
    "actor.trainer.accelerator": "trainer.accelerator",
    "actor.trainer.ppo.gradient_clip_val": "trainer.gradient_clip_val",
    "actor.trainer.ppo.initial_policy_kl_penalty": "align.beta",
    "actor.trainer.ppo.use_absolute_kl": "align.absolute_kl",
    "actor.trainer.ppo.discount_factor": "align.gamma",
    "actor.trainer.ppo.gae_lambda": "align.lam",
    "actor.trainer.ppo.normalize_advantages": "align.normalize_advantages",
    "actor.pretrained_checkpoint.restore_from_path": "model",
    "actor.exp_manager.explicit_log_dir": "out", "actor.exp_manager.resume_if_exists": "resume",
    "actor.exp_manager.checkpoint_callback_params.save_top_k": "save_top_k",
    "actor.model.seed": "seed", "actor.model.encoder_seq_length": "seq_length",
    "actor.model.ppo.rollout_micro_batch_size": "micro_batch_size",
    "actor.model.ppo.ratio_eps": "align.cliprange",
    "actor.model.ppo.sampling_params.temperature": "align.temperature",
    "actor.model.ppo.length_params.max_length": "align.max_completion_length",
    "actor.model.optim.lr": "optim.lr", "actor.model.optim.weight_decay": "optim.weight_decay",
    "actor.model.optim.betas": "optim.betas", "actor.model.optim.sched.warmup_steps": "optim.warmup_steps",
    "actor.model.optim.sched.min_lr": "optim.min_lr",
    "critic.pretrained_checkpoint.restore_from_path": "align.reward_model",
    "critic.model.loss_clip_val": "align.cliprange_value",
    "critic.model.optim.lr": "align.critic_lr",
}

#: Keys accepted at these values only; "any": a setting with no effect on what is computed.
ACCEPTED: dict[str, Any] = {
    "actor.defaults": "any", "critic.defaults": "any", "actor.overwrite_base_config": "any",
    "actor.trainer.logger": (False,), "actor.trainer.enable_checkpointing": (False,),
    "actor.trainer.use_distributed_sampler": (False,), "actor.trainer.max_time": (None,),
    "actor.trainer.ppo.max_epochs": (1,), "actor.trainer.ppo.rollout_batch_seq_length": "any",
    "actor.remote_critic_rm": "any",  # where NeMo's actor finds the critic and reward servers: lmforge runs them in
    "critic.trainer": "any",          # the actor's process, so their addresses and resources have no meaning
    "critic.exp_manager": "any",
    "actor.exp_manager.exp_dir": (None,), "actor.exp_manager.create_wandb_logger": (False,),
    "actor.exp_manager.resume_from_checkpoint": (None,), "actor.exp_manager.resume_ignore_no_checkpoint": (True,),
    "actor.exp_manager.create_checkpoint_callback": (True,),
    "actor.exp_manager.checkpoint_callback_params.always_save_nemo": (False,),
    "actor.model.mcore_gpt": (True,), "actor.model.enable_nge": "any", "actor.model.megatron_amp_O2": "any",
    "actor.model.tensor_model_parallel_size": (1,), "actor.model.pipeline_model_parallel_size": (1,),
    "actor.model.sequence_parallel": (False,),
    "actor.model.micro_batch_size": "any", "actor.model.ppo.forward_micro_batch_size": "any",  # memory only
    "actor.model.ppo.offload_adam_states": "any",
    "actor.model.ppo.entropy_bonus": (0, 0.0),
    "actor.model.ppo.sampling_params.use_greedy": (False,), "actor.model.ppo.sampling_params.top_k": (0, None),
    "actor.model.ppo.sampling_params.top_p": (1.0, None),
    "actor.model.ppo.sampling_params.repetition_penalty": (1.0, None),
    "actor.model.ppo.sampling_params.add_BOS": (False,), "actor.model.ppo.sampling_params.all_probs": (False,),
    "actor.model.ppo.sampling_params.compute_logprob": (False,),
    "actor.model.ppo.length_params.min_length": (0, 1, None),  # an EOS counts as a token: every completion has one
    "actor.model.optim.name": ("adamw", "adam", "fused_adam", "distributed_fused_adam"),  # AdamW, one process
    "actor.model.optim.bucket_cap_mb": "any", "actor.model.optim.overlap_grad_sync": "any",
    "actor.model.optim.contiguous_grad_buffer": "any", "actor.model.optim.sched.name": ("CosineAnnealing",),
    "actor.model.optim.sched.constant_steps": (0, None),
    "actor.model.data.data_impl": ("jsonl",), "actor.model.data.splits_string": (None,),
    "actor.model.data.skip_warmup": "any", "actor.model.data.num_workers": "any",
    "actor.model.data.dataloader_type": "any", "actor.model.data.reset_position_ids": (False,),
    "actor.model.data.reset_attention_mask": (False,), "actor.model.data.eod_mask_loss": (False,),
    "actor.model.data.index_mapping_dir": (None,),
    "critic.model.mcore_gpt": (True,), "critic.model.offload_adam_states": "any",
    "critic.model.output_sequence": (True,), "critic.model.reward_standardization.enable": (False,),
    "critic.model.reward_standardization.mean": "any", "critic.model.reward_standardization.std": "any",
    "critic.model.use_avg_pool": (False,), "critic.model.force_head_dtype": ("float32", None),
    "critic.model.micro_batch_size": "any", "critic.model.forward_micro_batch_size": "any",
    "critic.model.tensor_model_parallel_size": (1,), "critic.model.pipeline_model_parallel_size": (1,),
    "critic.model.megatron_amp_O2": "any", "critic.model.num_attributes": (1,),
    "critic.model.reward_model_type": ("binary_ranking",),
    "critic.model.optim.bucket_cap_mb": "any", "critic.model.optim.overlap_grad_sync": "any",
    "critic.model.optim.contiguous_grad_buffer": "any",
}

#: Keys that only name things or feed interpolations (or size NeMo's validation, refused through its interval).
VARIABLES = ("name", "actor.exp_manager.name", "actor.exp_manager.wandb_logger_kwargs",
             "actor.exp_manager.checkpoint_callback_params.filename",
             "actor.exp_manager.checkpoint_callback_params.model_parallel_size",
             "actor.exp_manager.checkpoint_callback_params.save_nemo_on_train_end",
             "actor.trainer.max_epochs", "actor.trainer.max_steps", "actor.trainer.ppo.model_gbs",
             "actor.trainer.ppo.model_mbs", "actor.model.max_position_embeddings",
             "actor.model.data.seq_length", "actor.model.ppo.val_rollout_micro_batch_size",
             "actor.model.ppo.num_val_samples", "critic.model.encoder_seq_length",
             "critic.model.max_position_embeddings", "critic.model.seed",
             "critic.name")

#: NeMo's precision keys: lmforge runs actor and critic at one precision, so where several are given they must
#: mean the same (NeMo's own files interpolate them from ``actor.trainer.precision``).
PRECISION_KEYS = ("actor.trainer.precision", "actor.model.precision", "critic.trainer.precision",
                  "critic.model.precision")

#: Critic keys whose value must equal the actor's (lmforge's critic shares the actor's optimizer settings, batch
#: and clipping): critic key -> actor key.
SAME_AS_ACTOR = {
    "critic.model.optim.name": "actor.model.optim.name",
    "critic.model.optim.weight_decay": "actor.model.optim.weight_decay",
    "critic.model.optim.betas": "actor.model.optim.betas",
    "critic.model.optim.sched.name": "actor.model.optim.sched.name",
    "critic.model.optim.sched.warmup_steps": "actor.model.optim.sched.warmup_steps",
    "critic.model.optim.sched.constant_steps": "actor.model.optim.sched.constant_steps",
    "critic.model.global_batch_size": "actor.model.global_batch_size",
    "critic.model.activations_checkpoint_granularity": "actor.model.activations_checkpoint_granularity",
    "critic.model.activations_checkpoint_method": "actor.model.activations_checkpoint_method",
    "critic.model.activations_checkpoint_num_layers": "actor.model.activations_checkpoint_num_layers",
    "critic.trainer.ppo.max_steps": "actor.trainer.ppo.max_steps",
}


def is_nemo_body(body: dict) -> bool:
    """A NeMo Launcher PPO body has ``actor:`` (and ``critic:``) sections; lmforge's align keys have neither."""
    return isinstance(body.get("actor"), dict) or isinstance(body.get("critic"), dict)


def translate(stage: str, body: dict, notes: list[str]) -> dict:
    """The ``lmforge align --method ppo`` config meant by a NeMo PPO ``body`` (without ``run``).

    Raises:
        ConfigError: a key with no lmforge meaning, or a value lmforge cannot honour, naming ``stage.key``.
    """
    out: dict = {"method": "ppo", "align": {"num_generations": 1, "ppo_epochs": 1}}
    flat = _flatten({k: v for k, v in body.items() if k != "run"})
    prefix_key = "actor.model.data.data_prefix"  # a file, a list, or NeMo-Aligner's {train, validation, test}
    node: Any = body
    for part in prefix_key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
        flat = {k: v for k, v in flat.items() if not _covered(k, prefix_key)}
        flat[prefix_key] = node
    special: dict[str, Callable[[Any], None]] = {}

    def max_steps(value):
        if value is None or int(value) < 1:
            raise ConfigError(f"{stage}.actor.trainer.ppo.max_steps={value}: lmforge runs a given number of PPO steps "
                              f"(NeMo's -1, one pass over the prompts, is not supported); set a number")
        _set(out, "trainer.max_steps", int(value))

    def rollouts(value):
        samples = int(value)
        mini = flat.get("actor.model.global_batch_size", samples)
        if mini is None or int(mini) < 1 or samples % int(mini):
            raise ConfigError(f"{stage}.actor.model.global_batch_size={mini} must divide "
                              f"actor.model.ppo.num_rollout_samples={samples}: each rollout trains in equal mini "
                              f"batches")
        out["global_batch_size"] = samples
        _set(out, "align.num_mini_batches", samples // int(mini))

    def data(value):
        prefix = value
        if isinstance(value, dict):
            extra = sorted(k for k, v in value.items() if k != "train" and v)
            if extra:
                raise ConfigError(f"{stage}.actor.model.data.data_prefix.{extra[0]}: lmforge's PPO has no validation "
                                  f"or test pass; give the training prompts alone (data_prefix: {{train: FILE}})")
            prefix = value.get("train")
        names = prefix if isinstance(prefix, list) else [prefix]
        if len(names) != 1 or not names[0]:
            raise ConfigError(f"{stage}.actor.model.data.data_prefix: give one JSONL file of prompts ({{train: "
                              f"FILE}}); lmforge reads one file per run (concatenate several)")
        out["data"] = str(names[0])

    def refused(key, why):
        def act(value):
            if value is not None:
                raise ConfigError(f"{stage}.{key}={value!r}: {why}")
        return act

    def end_strings(value):
        if value:
            raise ConfigError(f"{stage}.actor.model.ppo.sampling_params.end_strings={list(value)}: lmforge ends a "
                              f"completion at the tokenizer's EOS only; remove end_strings")

    def same(key, other):
        def act(value):
            if value != flat.get(other):
                setting = other.split(".", 1)[1]
                raise ConfigError(f"{stage}.{key}={value!r}: lmforge's critic takes the actor's {setting} "
                                  f"({flat.get(other)!r}); set the same value or remove the key")
        return act

    def combined(value):
        if value is False:
            raise ConfigError(f"{stage}.critic.trainer.ppo.combine_rm_and_critic_server=false: lmforge starts the "
                              f"critic from the reward model it scores with (critic.pretrained_checkpoint."
                              f"restore_from_path); set true")

    special.update({
        "actor.trainer.ppo.max_steps": max_steps,
        "actor.model.ppo.num_rollout_samples": rollouts, "actor.model.global_batch_size": lambda v: None,
        "actor.model.data.data_prefix": data,
        "actor.trainer.ppo.val_check_interval": refused(
            "actor.trainer.ppo.val_check_interval", "lmforge's PPO has no validation pass (it logs the rollouts' "
            "rewards every step); remove the key"),
        "actor.trainer.ppo.save_interval": refused(
            "actor.trainer.ppo.save_interval", "lmforge's PPO saves at the end of the run and when stopped "
            "(SIGUSR1, time limit); remove the key"),
        "actor.exp_manager.checkpoint_callback_params.monitor": refused(
            "actor.exp_manager.checkpoint_callback_params.monitor", "lmforge's PPO has no validation metric to rank "
            "checkpoints by; the latest is kept; remove the key"),
        "actor.exp_manager.checkpoint_callback_params.mode": refused(
            "actor.exp_manager.checkpoint_callback_params.mode", "lmforge's PPO has no validation metric to rank "
            "checkpoints by; remove the key"),
        "actor.model.ppo.sampling_params.end_strings": end_strings,
        "actor.remote_critic_rm.combine_rm_and_critic_server": combined,
        "critic.trainer.ppo.combine_rm_and_critic_server": combined,
        "critic.trainer.ppo.gradient_clip_val": same("critic.trainer.ppo.gradient_clip_val",
                                                     "actor.trainer.ppo.gradient_clip_val"),
        "critic.model.optim.sched.min_lr": lambda v: None,  # checked below: the same ratio to lr as the actor's
    })
    special.update({f"actor.model.activations_checkpoint_{k}": lambda v: None  # all three read together below
                    for k in ("granularity", "method", "num_layers")})
    special.update({k: same(k, v) for k, v in SAME_AS_ACTOR.items()})
    special.update(precision_handlers(stage, flat, PRECISION_KEYS, out, "the actor and the critic"))
    for key, value in flat.items():
        where = f"{stage}.{key}"
        _translate_key(where, key, value, out, special, DIRECT, VARIABLES, ACCEPTED, "PPO")
    _check_critic_schedule(stage, flat)
    out.update(activations_checkpoint_keys(stage, flat, "actor.model."))
    if "actor.model.optim.name" in flat:  # NeMo's (distributed) fused Adam is AdamW with a fused kernel
        _set(out, "optim.name", "fused_adam" if "fused" in str(flat["actor.model.optim.name"]) else "adamw")
    if "trainer" not in out or "max_steps" not in out["trainer"]:
        raise ConfigError(f"{stage}.actor.trainer.ppo.max_steps is required: the number of PPO steps")
    if out.get("model") in (None, "???"):
        raise ConfigError(f"{stage}.actor.pretrained_checkpoint.restore_from_path is required: the SFT model")
    if out.get("data") in (None, "???"):
        raise ConfigError(f"{stage}.actor.model.data.data_prefix is required: a JSONL file of prompts")
    if not (out.get("align") or {}).get("reward_model"):
        raise ConfigError(f"{stage}.critic.pretrained_checkpoint.restore_from_path is required: the reward model (a "
                          f"`lmforge align --method rm` run) that scores completions and that the critic starts from")
    if "global_batch_size" not in out:
        rollouts(flat.get("actor.model.global_batch_size", 1) or 1)
    notes.append(f"{stage}: NeMo's actor and critic run in one lmforge process (`lmforge align --method ppo`); the "
                 f"critic starts from the reward model")
    return out


def _check_critic_schedule(stage: str, flat: dict) -> None:
    """lmforge's critic follows the actor's schedule scaled to its own peak rate: NeMo's critic ``min_lr`` must be
    the actor's ``min_lr`` scaled alike."""
    a_lr, a_min = flat.get("actor.model.optim.lr"), flat.get("actor.model.optim.sched.min_lr")
    c_lr, c_min = flat.get("critic.model.optim.lr"), flat.get("critic.model.optim.sched.min_lr")
    if c_min is None:
        return
    a_lr, c_lr = float(a_lr if a_lr is not None else 1e-4), float(c_lr if c_lr is not None else a_lr or 1e-4)
    want = float(a_min or 0.0) * c_lr / a_lr
    if abs(float(c_min) - want) > 1e-9 + 1e-6 * abs(want):
        raise ConfigError(f"{stage}.critic.model.optim.sched.min_lr={c_min}: lmforge's critic follows the actor's "
                          f"schedule scaled to its peak rate, so its min_lr is {want:g} (actor min_lr {a_min} x "
                          f"critic lr {c_lr} / actor lr {a_lr}); set that or remove the key")
