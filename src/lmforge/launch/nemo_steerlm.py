"""NeMo Launcher's ``steerlm_reg`` stage body as ``lmforge align --method regression_rm``'s config.

NeMo Framework Launcher's ``steerlm_reg`` stage runs one of two NeMo-Aligner scripts, chosen by its config file:
``rw_sft/training_rm.yaml`` trains SteerLM's attribute model (``train_reward_model.py`` with
``model.reward_model_type: regression``), ``ac_sft/gpt_sft.yaml`` the attribute-conditioned SFT
(``train_gpt_sft.py``). lmforge's ``steerlm_reg`` stage is the first: :func:`translate` turns the ``rw_sft`` body
(``trainer.rm.*``, ``pretrained_checkpoint``, ``model.regression.*``, ``model.data.data_prefix``, ``model.optim``)
into lmforge's align keys. The ``ac_sft`` body is refused by its ``trainer.sft`` section: that step is a
``fine_tuning`` stage with ``sft.attributes`` (docs/alignment.md, SteerLM), whose records carry the attribute
values rather than NeMo-Aligner's pre-rendered label strings.

NeMo's attribute model has no attribute names, only ``model.regression.num_attributes`` outputs in the order of its
data preparation: nine means NeMo-Aligner's nine (quality, toxicity, humor, creativity, helpfulness, correctness,
coherence, complexity, verbosity), lmforge's default ``align.attributes``. The data files are lmforge's attribute
records (``{"prompt", "response", "attributes": {...}}``, an attribute left out unlabelled), not the
``{"text", "label"}`` lines of NeMo's ``process_to_regression_format``.

As :mod:`lmforge.launch.nemo_peft` and :mod:`lmforge.launch.nemo_ppo` do (the one key translator,
:func:`~lmforge.launch.nemo_peft._translate_key`), every key either maps onto an lmforge key with NeMo's meaning, is
accepted at the values that describe what lmforge does anyway (``ACCEPTED``; ``"any"``: a setting of memory,
kernels or logging with no effect on the result), only feeds interpolations (``VARIABLES``), or is refused with
one ``ConfigError`` naming it.
"""

from __future__ import annotations

from typing import Any, Callable

from lmforge.errors import ConfigError
from lmforge.launch.nemo_peft import (_covered, _flatten, _set, _translate_key, activations_checkpoint_keys,
                                      precision_handlers)

#: NeMo key (below the stage) -> lmforge align key, copied as is.
DIRECT = {
    "trainer.devices": "trainer.devices", "trainer.num_nodes": "trainer.num_nodes",
    "trainer.accelerator": "trainer.accelerator",
    "trainer.rm.val_check_interval": "trainer.val_check_interval",
    "trainer.rm.gradient_clip_val": "trainer.gradient_clip_val",
    "exp_manager.explicit_log_dir": "out", "exp_manager.resume_if_exists": "resume",
    "exp_manager.checkpoint_callback_params.save_top_k": "save_top_k",
    "pretrained_checkpoint.restore_from_path": "model",
    "model.seed": "seed", "model.encoder_seq_length": "seq_length",
    "model.micro_batch_size": "micro_batch_size", "model.global_batch_size": "global_batch_size",
    "model.optim.lr": "optim.lr", "model.optim.weight_decay": "optim.weight_decay",
    "model.optim.betas": "optim.betas", "model.optim.sched.warmup_steps": "optim.warmup_steps",
    "model.optim.sched.min_lr": "optim.min_lr",
}

#: Keys accepted at these values only; "any": a setting with no effect on what is computed.
ACCEPTED: dict[str, Any] = {
    "trainer.logger": (False,), "trainer.enable_checkpointing": (False,),
    "trainer.use_distributed_sampler": (False,), "trainer.max_time": (None,),
    "exp_manager.exp_dir": (None,), "exp_manager.create_wandb_logger": (False,),
    "exp_manager.max_time_per_run": (None,), "exp_manager.resume_from_checkpoint": (None,),
    "exp_manager.resume_ignore_no_checkpoint": (True,), "exp_manager.create_checkpoint_callback": (True,),
    "exp_manager.checkpoint_callback_params.monitor": ("val_loss",),  # the masked MSE on the validation file
    "exp_manager.checkpoint_callback_params.mode": ("min",),
    "exp_manager.checkpoint_callback_params.always_save_nemo": (False,),
    "model.mcore_gpt": (True,), "model.megatron_amp_O2": "any",
    "model.share_embeddings_and_output_weights": "any",  # the base model's own, read from its checkpoint
    "model.tensor_model_parallel_size": (1,), "model.pipeline_model_parallel_size": (1,),
    "model.reward_model_type": ("regression",),  # binary_ranking: checked first (an rlhf_rm stage)
    "model.regression.merge_attributes": (False,), "model.regression.attribute_weights": (None,),
    "model.regression.loss_mask_val": "any",  # the filler of NeMo's label lists; lmforge's unlabelled are absent
    "model.output_sequence": (False,), "model.use_avg_pool": (False,),
    "model.force_head_dtype": ("float32", None),  # lmforge's head is float32 (every weight trains in float32)
    "model.optim.name": ("adamw", "adam", "fused_adam", "distributed_fused_adam"),  # AdamW, one process
    "model.optim.bucket_cap_mb": "any", "model.optim.overlap_grad_sync": "any",
    "model.optim.contiguous_grad_buffer": "any", "model.optim.sched.name": ("CosineAnnealing",),
    "model.optim.sched.constant_steps": (0, None),
    "model.data.data_impl": ("jsonl",), "model.data.splits_string": (None,),
    "model.data.skip_warmup": "any", "model.data.num_workers": "any", "model.data.dataloader_type": "any",
    "model.data.reset_position_ids": (False,), "model.data.reset_attention_mask": (False,),
    "model.data.eod_mask_loss": (False,), "model.data.index_mapping_dir": (None,),
}

#: Keys that only name things or feed interpolations.
VARIABLES = ("name", "exp_manager.name", "exp_manager.wandb_logger_kwargs",
             "exp_manager.checkpoint_callback_params.filename",
             "exp_manager.checkpoint_callback_params.model_parallel_size",
             "exp_manager.checkpoint_callback_params.save_nemo_on_train_end",
             "trainer.max_epochs", "trainer.max_steps",  # PyTorch Lightning's copies of trainer.rm.*
             "model.max_position_embeddings", "model.data.seq_length")

#: lmforge's ``trainer.limit_val_batches`` for NeMo's ``1.0`` (every validation batch).
ALL_BATCHES = 2 ** 31 - 1


def is_nemo_body(body: dict) -> bool:
    """A NeMo Launcher steerlm_reg body has a ``model:`` section; lmforge's ``model`` is a path."""
    return isinstance(body.get("model"), dict)


def translate(stage: str, body: dict, notes: list[str]) -> dict:
    """The ``lmforge align --method regression_rm`` config meant by a NeMo ``steerlm_reg`` ``rw_sft`` ``body``
    (without ``run``).

    Raises:
        ConfigError: NeMo's ``ac_sft`` body, a key with no lmforge meaning, or a value lmforge cannot honour,
            naming ``stage.key``.
    """
    from lmforge.data.steer import DEFAULT_ATTRIBUTES

    trainer = body.get("trainer") if isinstance(body.get("trainer"), dict) else {}
    if "sft" in trainer:
        raise ConfigError(f"{stage}.trainer.sft: this is NeMo's ac_sft body (attribute-conditioned SFT on "
                          f"NeMo-Aligner's label strings); lmforge's steerlm_reg stage trains the attribute model "
                          f"(NeMo's rw_sft/training_rm). Run the conditioned SFT as a fine_tuning stage with "
                          f"sft.attributes on records with an \"attributes\" object (docs/alignment.md, SteerLM)")
    model = body.get("model") if isinstance(body.get("model"), dict) else {}
    kind = model.get("reward_model_type", "regression")
    if kind != "regression":
        raise ConfigError(f"{stage}.model.reward_model_type={kind!r}: a steerlm_reg stage trains the regression "
                          f"attribute model (regression); use an rlhf_rm stage for a {kind} reward model")
    out: dict = {"method": "regression_rm"}
    flat = _flatten({k: v for k, v in body.items() if k != "run"})
    prefix_key = "model.data.data_prefix"  # a file, a list, or NeMo-Aligner's {train, validation, test}
    node = (model.get("data") or {}).get("data_prefix") if isinstance(model.get("data"), dict) else None
    if node is not None:
        flat = {k: v for k, v in flat.items() if not _covered(k, prefix_key)}
        flat[prefix_key] = node

    def max_steps(value):
        if value is None or int(value) < 1:
            raise ConfigError(f"{stage}.trainer.rm.max_steps={value}: lmforge trains a given number of steps "
                              f"(NeMo's -1, max_epochs passes over the data, is not supported); set a number")
        _set(out, "trainer.max_steps", int(value))

    def max_epochs(value):
        if value is not None:
            notes.append(f"{stage}.trainer.rm.max_epochs={value}: lmforge stops at {stage}.trainer.rm.max_steps (passing "
                         f"over the data as many times as that takes)")

    def save_interval(value):
        every = flat.get("trainer.rm.val_check_interval")
        if value is not None and value != every:
            raise ConfigError(f"{stage}.trainer.rm.save_interval={value}: lmforge saves a checkpoint at each "
                              f"validation ({stage}.trainer.rm.val_check_interval={every}) and at the end; set the same "
                              f"value or remove the key")

    def limit_val(value):
        if isinstance(value, float) and value == 1.0:
            _set(out, "trainer.limit_val_batches", ALL_BATCHES)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            _set(out, "trainer.limit_val_batches", value)
        else:
            raise ConfigError(f"{stage}.trainer.rm.limit_val_batches={value!r}: give a number of global batches, or "
                              f"1.0 for the whole validation file (lmforge does not validate on a fraction)")

    def attributes(value):
        if value != len(DEFAULT_ATTRIBUTES):
            raise ConfigError(f"{stage}.model.regression.num_attributes={value}: a NeMo attribute model names no "
                              f"attributes, so lmforge reads its outputs as NeMo-Aligner's nine "
                              f"({', '.join(DEFAULT_ATTRIBUTES)}); for another set use lmforge's keys in the stage "
                              f"(method: regression_rm, align.attributes: [...])")
        _set(out, "align.attributes", list(DEFAULT_ATTRIBUTES))

    def data(value):
        splits = value if isinstance(value, dict) else {"train": value}
        unknown = sorted(k for k in splits if k not in ("train", "validation", "test"))
        if unknown:
            raise ConfigError(f"{stage}.model.data.data_prefix.{unknown[0]}: NeMo's splits are train, validation "
                              f"and test")
        for split, target in (("train", "data"), ("validation", "val_data")):
            names = splits.get(split)
            if names is None:
                continue
            names = names if isinstance(names, list) else [names]
            if len(names) != 1 or not names[0]:
                raise ConfigError(f"{stage}.model.data.data_prefix.{split}: give one JSONL file; lmforge reads one "
                                  f"file per split (concatenate several)")
            out[target] = str(names[0])
        if splits.get("test"):
            notes.append(f"{stage}.model.data.data_prefix.test: NeMo's reward-model script trains and validates; "
                         f"score the test file afterwards with `lmforge reward`")

    special: dict[str, Callable[[Any], None]] = {
        "trainer.rm.max_steps": max_steps, "trainer.rm.max_epochs": max_epochs,
        "trainer.rm.save_interval": save_interval, "trainer.rm.limit_val_batches": limit_val,
        "model.regression.num_attributes": attributes,
        "model.data.data_prefix": data,
        **precision_handlers(stage, flat, ("trainer.precision", "model.precision"), out, "the model"),
    }
    special.update({f"model.activations_checkpoint_{k}": lambda v: None  # all three read together below
                    for k in ("granularity", "method", "num_layers")})
    for key, value in flat.items():
        _translate_key(f"{stage}.{key}", key, value, out, special, DIRECT, VARIABLES, ACCEPTED, "steerlm_reg")
    out.update(activations_checkpoint_keys(stage, flat, "model."))
    if "model.optim.name" in flat:  # NeMo's (distributed) fused Adam is AdamW with a fused kernel
        _set(out, "optim.name", "fused_adam" if "fused" in str(flat["model.optim.name"]) else "adamw")
    if "max_steps" not in (out.get("trainer") or {}):
        raise ConfigError(f"{stage}.trainer.rm.max_steps is required: the number of training steps")
    if out.get("model") in (None, "???"):
        raise ConfigError(f"{stage}.pretrained_checkpoint.restore_from_path is required: the model to start from")
    if str(out["model"]).endswith(".nemo"):
        raise ConfigError(f"{stage}.pretrained_checkpoint.restore_from_path={out['model']}: lmforge trains from an "
                          f"lmforge checkpoint or an HF folder, not a .nemo archive; convert it first (`lmforge "
                          f"convert {out['model']} FOLDER --to lmforge`) and name FOLDER")
    if out.get("data") in (None, "???"):
        raise ConfigError(f"{stage}.model.data.data_prefix.train is required: a JSONL file of attribute records")
    return out
