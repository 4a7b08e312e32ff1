"""NeMo Launcher's PEFT stage body (``conf/peft/llama/squad.yaml``) as ``lmforge finetune``'s config.

A NeMo peft file holds ``trainer``, ``exp_manager`` and a ``model`` section (``model.restore_from_path``,
``model.peft.peft_scheme`` with its ``lora_tuning`` / ``adapter_tuning`` / ``p_tuning`` / ``ia3_tuning`` section,
``model.data.train_ds`` / ``validation_ds``, ``model.optim``). :func:`translate` turns it into the keys of
:class:`lmforge.finetune.config.FinetuneConfig`. Every key either maps onto an lmforge key with NeMo's meaning,
is accepted at the value that describes what lmforge does anyway (``ACCEPTED``; ``None`` in a tuple means
"unset"), only feeds interpolations (``names``, the datasets' batch sizes), or is refused with one
``ConfigError`` naming it. The sections of the schemes not chosen are ignored, as NeMo ignores them.
"""

from __future__ import annotations

from typing import Any, Callable

from lmforge.errors import ConfigError

SCHEMES = {"lora": "lora", "ptuning": "ptuning", "p_tuning": "ptuning", "adapter": "adapter", "ia3": "ia3"}
SCHEME_SECTIONS = {"lora": "lora_tuning", "ptuning": "p_tuning", "adapter": "adapter_tuning", "ia3": "ia3_tuning"}

#: NeMo's LoRA target names (Megatron module names) -> lmforge's linear layers.
LORA_TARGETS = {"attention_qkv": ["q_proj", "k_proj", "v_proj"], "attention_dense": ["o_proj"],
                "mlp_fc1": ["gate_proj", "up_proj"], "mlp_fc2": ["down_proj"],
                "attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"],
                "all": ["all-linear"]}
#: NeMo's ``trainer.precision`` (Lightning's values; NeMo reads 16 and bf16 as mixed precision) -> lmforge's.
#: None is Lightning's default, 32-true.
PRECISIONS = {"16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "32": "32", "32-true": "32"}
#: Lightning's other values, which lmforge cannot run, with why.
PRECISIONS_REFUSED = {
    "16-true": "float16 weights with no float32 master copy", "bf16-true": "bfloat16 weights with no float32 master "
    "copy", "64": "float64", "64-true": "float64", "transformer-engine": "float8 through Transformer Engine",
    "transformer-engine-float16": "float8 through Transformer Engine"}
METRICS = {"loss": "val_loss", "exact_string_match": "exact_match"}

#: NeMo key (below the stage) -> lmforge key, copied as is.
DIRECT = {
    "trainer.devices": "trainer.devices", "trainer.num_nodes": "trainer.num_nodes",
    "trainer.accelerator": "trainer.accelerator", "trainer.max_steps": "trainer.max_steps",
    "trainer.log_every_n_steps": "trainer.log_every_n_steps", "trainer.val_check_interval": "trainer.val_check_interval",
    "trainer.limit_val_batches": "trainer.limit_val_batches", "trainer.gradient_clip_val": "trainer.gradient_clip_val",
    "exp_manager.explicit_log_dir": "out", "exp_manager.resume_if_exists": "resume",
    "exp_manager.checkpoint_callback_params.save_top_k": "save_top_k",
    "model.seed": "seed", "model.micro_batch_size": "micro_batch_size", "model.global_batch_size": "global_batch_size",
    "model.restore_from_path": "model", "model.tensor_model_parallel_size": "tensor_model_parallel_size",
    "model.sequence_parallel": "sequence_parallel",
    "model.activations_checkpoint_granularity": "activations_checkpoint_granularity",
    "model.activations_checkpoint_method": "activations_checkpoint_method",
    "model.activations_checkpoint_num_layers": "activations_checkpoint_num_layers",
    "model.optim.name": "optim.name", "model.optim.lr": "optim.lr", "model.optim.weight_decay": "optim.weight_decay",
    "model.optim.betas": "optim.betas", "model.optim.sched.warmup_steps": "optim.warmup_steps",
    "model.optim.sched.min_lr": "optim.min_lr",
    "model.data.train_ds.max_seq_length": "seq_length", "model.data.train_ds.context_key": "sft.input_key",
    "model.data.train_ds.input_key": "sft.input_key", "model.data.train_ds.label_key": "sft.output_key",
    "model.data.train_ds.add_eos": "sft.add_eos", "model.data.train_ds.add_bos": "sft.add_bos",
    "model.data.validation_ds.tokens_to_generate": "generation.max_new_tokens",
    "lora_tuning.adapter_dim": "peft.lora.r", "lora_tuning.alpha": "peft.lora.lora_alpha",
    "lora_tuning.adapter_dropout": "peft.lora.lora_dropout",
    "adapter_tuning.adapter_dim": "peft.adapter.dim", "adapter_tuning.adapter_dropout": "peft.adapter.dropout",
    "p_tuning.virtual_tokens": "peft.ptuning.num_virtual_tokens",
    "p_tuning.bottleneck_dim": "peft.ptuning.encoder_hidden_size",
}

#: Keys accepted at these values only: what lmforge does anyway (or settings of the framework with no effect
#: on the result). Any other value is refused.
ACCEPTED: dict[str, tuple] = {
    "trainer.logger": (False,), "trainer.enable_checkpointing": (False,), "trainer.use_distributed_sampler": (False,),
    "trainer.num_sanity_val_steps": (None, 0, 2), "trainer.benchmark": (False,),
    "exp_manager.exp_dir": (None,), "exp_manager.create_wandb_logger": (False,),
    "exp_manager.resume_ignore_no_checkpoint": (True,), "exp_manager.create_checkpoint_callback": (True,),
    "exp_manager.checkpoint_callback_params.mode": ("min", "max"),  # checked against the metric below
    "exp_manager.checkpoint_callback_params.always_save_nemo": (False,),
    "exp_manager.checkpoint_callback_params.save_best_model": (True, False),  # the best is always kept (top-k)
    "exp_manager.create_early_stopping_callback": (False,),
    "model.pipeline_model_parallel_size": (1,), "model.resume_from_checkpoint": (None,),
    "model.save_nemo_on_validation_end": (False,), "model.answer_only_loss": (True,),
    "model.hidden_dropout": (0.0,), "model.attention_dropout": (0.0,), "model.ffn_dropout": (0.0,),
    "model.activations_checkpoint_layers_per_pipeline": (None,),
    "model.sync_batch_comm": (False, True), "model.megatron_amp_O2": (False, True),
    "model.gradient_as_bucket_view": (False, True),
    "model.peft.restore_from_path": (None,),
    "model.optim.sched.name": ("CosineAnnealing",), "model.optim.sched.constant_steps": (0, None),
    "model.optim.sched.monitor": ("val_loss", None), "model.optim.sched.reduce_on_plateau": (False, None),
    "model.data.train_ds.shuffle": (True,), "model.data.train_ds.min_seq_length": (1, None),
    "model.data.train_ds.drop_last": (True,), "model.data.train_ds.concat_sampling_probabilities": ([1.0], None),
    "model.data.train_ds.index_mapping_dir": (None,), "model.data.train_ds.add_sep": (False,),
    "model.data.train_ds.separate_prompt_and_response_with_newline": (False,),
    "model.data.train_ds.num_workers": "any", "model.data.train_ds.memmap_workers": "any",
    "model.data.train_ds.pin_memory": "any",
    "model.data.validation_ds.shuffle": (False,), "model.data.validation_ds.drop_last": (False, True),
    "model.data.validation_ds.write_predictions_to_file": (False,),
    "model.data.validation_ds.output_file_path_prefix": (None,), "model.data.validation_ds.index_mapping_dir": (None,),
    "model.data.validation_ds.num_workers": "any", "model.data.validation_ds.memmap_workers": "any",
    "model.data.validation_ds.pin_memory": "any",
    "model.data.validation_ds.metric.average": (None,), "model.data.validation_ds.metric.num_classes": (None,),
    "model.data.test_ds": "any",  # NeMo's fine-tuning script trains and validates; the test set is its eval script's
    "lora_tuning.row_init_method": ("zero",), "lora_tuning.layer_selection": (None,),
    "lora_tuning.weight_tying": (False,), "lora_tuning.position_embedding_strategy": (None,),
    "adapter_tuning.type": ("linear_adapter",), "adapter_tuning.layer_selection": (None,),
    "adapter_tuning.weight_tying": (False,), "adapter_tuning.position_embedding_strategy": (None,),
    "ia3_tuning.layer_selection": (None,),
}

#: Keys that only name things or feed interpolations (their values reach lmforge through the keys that use them).
VARIABLES = ("name", "exp_manager.name", "exp_manager.wandb_logger_kwargs",
             "exp_manager.checkpoint_callback_params.filename",
             "exp_manager.checkpoint_callback_params.model_parallel_size",
             "exp_manager.checkpoint_callback_params.save_nemo_on_train_end",
             "exp_manager.early_stopping_callback_params", "model.data.validation_ds.names",
             "model.data.train_ds.global_batch_size", "model.data.train_ds.micro_batch_size",
             "model.data.validation_ds.global_batch_size", "model.data.validation_ds.micro_batch_size",
             "model.data.validation_ds.max_seq_length", "model.data.validation_ds.min_seq_length",
             "model.data.validation_ds.context_key", "model.data.validation_ds.label_key",
             "model.data.validation_ds.add_eos", "model.data.validation_ds.add_sep",
             "model.data.validation_ds.add_bos", "model.data.validation_ds.prompt_template",
             "model.data.validation_ds.truncation_field",
             "model.data.validation_ds.separate_prompt_and_response_with_newline")


def is_nemo_body(body: dict) -> bool:
    """A NeMo peft body has a ``model:`` section; lmforge's ``model`` is a path."""
    return isinstance(body.get("model"), dict)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _set(out: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _covered(key: str, group: str) -> bool:
    return key == group or key.startswith(group + ".")


def nemo_precision(where: str, value: Any) -> str:
    """lmforge's ``trainer.precision`` for NeMo's precision ``value`` (``trainer.precision`` and the keys that
    repeat it), read as NeMo reads it: 16 / 16-mixed -> 16-mixed, bf16 / bf16-mixed -> bf16-mixed, 32 / 32-true /
    null -> 32. Every NeMo body translation reads its precision keys through this one function.

    Raises:
        ConfigError: any other value, naming ``where`` (the full key) and the value.
    """
    if value is None:
        return "32"
    key = "" if isinstance(value, bool) else str(value)
    if key in PRECISIONS:
        return PRECISIONS[key]
    why = f"NeMo's {key} is {PRECISIONS_REFUSED[key]}, which lmforge does not train in; " if key in PRECISIONS_REFUSED \
        else ""
    raise ConfigError(f"{where}={value!r}: {why}lmforge trains at mixed 16 or bf16 (float32 weights) or at 32: set "
                      f"16, 16-mixed, bf16, bf16-mixed, 32 or 32-true")


def precision_handlers(stage: str, flat: dict, keys: tuple, out: dict, runs: str) -> dict[str, Callable[[Any], None]]:
    """The ``special`` handlers of a NeMo body's precision ``keys`` (the trainer's first): each sets lmforge's
    ``trainer.precision`` through :func:`nemo_precision`; a model precision left null follows the trainer's, and
    one that means another precision than the first given key is refused (lmforge runs ``runs`` at one
    precision; NeMo's own files interpolate them from the trainer's)."""
    given = [k for k in keys if k in flat and (k == keys[0] or flat[k] is not None)]

    def handler(key):
        def act(value):
            if key not in given:
                return
            meant = nemo_precision(f"{stage}.{key}", value)
            first = given[0]
            if key != first and meant != nemo_precision(f"{stage}.{first}", flat[first]):
                raise ConfigError(f"{stage}.{key}={value!r}: lmforge runs {runs} at one precision, "
                                  f"{first}={flat[first]!r}; set the same value or remove the key")
            _set(out, "trainer.precision", meant)
        return act

    return {k: handler(k) for k in keys}


def activations_checkpoint_keys(stage: str, flat: dict, section: str) -> dict:
    """``lmforge align``'s ``activations_checkpoint_*`` keys (fine-tuning's, NeMo's meaning) for a NeMo body's
    ``{section}activations_checkpoint_granularity`` / ``_method`` / ``_num_layers`` (``section``: ``actor.model.``,
    ``model.``), all three read together.

    NeMo-Aligner's models are Megatron-core models (``mcore_gpt: true``), whose rules these are: ``selective``
    recomputes the core attention of every layer and ignores a method (NeMo's own ``rlhf_ppo/gpt3/2b_ppo.yaml`` sets
    ``selective`` with ``uniform``) but refuses a number of layers; ``full`` recomputes chunks of ``num_layers``
    blocks (``uniform``) or the first ``num_layers`` blocks (``block``). A method or number of layers without a
    granularity, which acts on nothing, and a granularity NeMo does not have are refused, naming
    ``stage.section.key`` and what works."""
    from lmforge.parallel.transforms import check_activations_checkpoint

    key = f"{section}activations_checkpoint_"
    granularity, method, num_layers = (flat.get(key + k) for k in ("granularity", "method", "num_layers"))
    if granularity not in (None, "full", "selective"):
        raise ConfigError(f"{stage}.{key}granularity={granularity!r}: NeMo's values are full and selective (or "
                          f"null: off); use one of them")
    check_activations_checkpoint(granularity, method, num_layers, prefix=f"{stage}.{section}")
    given = {"granularity": granularity, "method": method, "num_layers": num_layers}
    return {f"activations_checkpoint_{k}": v for k, v in given.items() if v is not None}


def _translate_key(where: str, key: str, value: Any, out: dict, special: dict, direct: dict, variables,
                   accepted: dict, section: str) -> None:
    """One NeMo key into ``out``: a ``special`` handler, a ``direct`` lmforge key, a Launcher variable (skipped), an
    ``accepted`` key with no lmforge counterpart (its value checked), else refused naming ``where`` (``section``:
    what kind of NeMo key, for the message)."""
    if key in special:
        special[key](value)
    elif key in direct:
        _set(out, direct[key], value)
    elif any(_covered(key, v) for v in variables):
        return
    elif key in accepted or any(_covered(key, k) and accepted[k] == "any" for k in accepted):
        allowed = accepted.get(key, "any")
        if allowed != "any" and value not in allowed:
            shown = " or ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"{where}={value!r}: lmforge supports {shown} here (what it does); remove the key "
                              f"or set that value")
    else:
        raise ConfigError(f"{where}: NeMo's {section} key has no lmforge meaning; remove it (the keys lmforge "
                          f"translates are listed in docs/launcher.md, 'NeMo Launcher configs')")


def translate(stage: str, body: dict, notes: list[str]) -> dict:
    """The lmforge fine-tuning config meant by a NeMo peft ``body`` (without ``run``); notes go to ``notes``.

    Raises:
        ConfigError: a key with no lmforge meaning, or a value lmforge cannot honour, naming ``stage.key``.
    """
    out: dict = {}
    flat = _flatten({k: v for k, v in body.items() if k != "run"})
    model = body.get("model") or {}
    peft = model.get("peft") or {}
    scheme = str(peft.get("peft_scheme", "lora"))
    if scheme not in SCHEMES:
        raise ConfigError(f"{stage}.model.peft.peft_scheme={scheme!r}: use one of lora, ptuning, adapter, ia3")
    method = SCHEMES[scheme]
    out["method"] = method
    section = SCHEME_SECTIONS[method]
    special: dict[str, Callable[[Any], None]] = {}

    def precision(value):
        _set(out, "trainer.precision", nemo_precision(f"{stage}.trainer.precision", value))

    def max_epochs(value):
        if value is not None:
            notes.append(f"{stage}.trainer.max_epochs={value}: lmforge fine-tuning stops at trainer.max_steps "
                         f"(passing over the data as many times as that takes)")

    def monitor(value):
        metric = str(value).replace("validation_", "val_", 1) if str(value).startswith("validation_") else str(value)
        metric = {"val_exact_string_match": "exact_match"}.get(metric, metric)
        if metric not in ("val_loss", "exact_match"):
            raise ConfigError(f"{stage}.exp_manager.checkpoint_callback_params.monitor={value!r}: lmforge ranks "
                              f"fine-tuning checkpoints by val_loss or exact_match (validation_loss, "
                              f"validation_exact_string_match)")
        mode = flat.get("exp_manager.checkpoint_callback_params.mode", "min" if metric == "val_loss" else "max")
        if mode != ("min" if metric == "val_loss" else "max"):
            raise ConfigError(f"{stage}.exp_manager.checkpoint_callback_params.mode={mode}: {metric} is best "
                              f"{'lowest (min)' if metric == 'val_loss' else 'highest (max)'}")
        out["monitor"] = metric

    def metric_name(value):
        if str(value) not in METRICS:
            raise ConfigError(f"{stage}.model.data.validation_ds.metric.name={value!r}: use loss or exact_string_match")

    def files(key, target):
        def act(value):
            names = value if isinstance(value, list) else [value]
            if len(names) != 1:
                raise ConfigError(f"{stage}.{key} lists {len(names)} files: lmforge fine-tunes on one JSONL file "
                                  f"per split; concatenate them (cat a.jsonl b.jsonl > train.jsonl)")
            out[target] = str(names[0])
        return act

    def template(value):
        label = str(flat.get("model.data.train_ds.label_key", "output"))
        marker = "{" + label + "}"
        text = str(value)
        if not text.endswith(marker):
            raise ConfigError(f"{stage}.model.data.train_ds.prompt_template={text!r}: NeMo's template ends with the "
                              f"answer's placeholder {marker}; lmforge takes the text before it as the prompt")
        _set(out, "sft.prompt_template", text[:-len(marker)])

    def targets(value):
        names = value if isinstance(value, list) else [value]
        mapped = []
        for name in names:
            if str(name) not in LORA_TARGETS:
                raise ConfigError(f"{stage}.model.peft.lora_tuning.target_modules: {name!r} is not one of NeMo's "
                                  f"names {', '.join(LORA_TARGETS)}")
            mapped += [m for m in LORA_TARGETS[str(name)] if m not in mapped]
        _set(out, "peft.lora.target_modules", mapped)

    def truncation(value):
        if value != "answer":
            raise ConfigError(f"{stage}.model.data.train_ds.truncation_field={value!r}: lmforge cuts a too-long "
                              f"sample at its end, the answer (truncation_field: answer); it does not shorten the "
                              f"context: set truncation_field: answer")
        _set(out, "sft.truncation", "truncate")

    def column_init(value):
        raise ConfigError(f"{stage}.model.peft.lora_tuning.column_init_method={value!r}: lmforge initialises LoRA's "
                          f"A matrix as Hugging Face PEFT does (Kaiming-uniform; B zero, as NeMo's row_init_method: "
                          f"zero), not {value}; remove column_init_method")

    special.update({
        "trainer.precision": precision, "trainer.max_epochs": max_epochs,
        "exp_manager.checkpoint_callback_params.monitor": monitor,
        "model.data.validation_ds.metric.name": metric_name,
        "model.data.train_ds.file_names": files("model.data.train_ds.file_names", "data"),
        "model.data.validation_ds.file_names": files("model.data.validation_ds.file_names", "val_data"),
        "model.data.train_ds.prompt_template": template, "model.data.train_ds.truncation_field": truncation,
        "lora_tuning.target_modules": targets, "lora_tuning.column_init_method": column_init,
        "model.peft.peft_scheme": lambda v: None,
    })
    for key, value in flat.items():
        short = key[len("model.peft."):] if key.startswith("model.peft.") and key != "model.peft.restore_from_path" \
            and key != "model.peft.peft_scheme" else key
        where = f"{stage}.{key}"
        if short.split(".")[0] in SCHEME_SECTIONS.values() and short.split(".")[0] != section:
            continue  # another scheme's settings: NeMo ignores them too
        _translate_key(where, short, value, out, special, DIRECT, VARIABLES, ACCEPTED, "peft")
    if method == "lora":
        lora = (out.get("peft") or {}).get("lora") or {}
        if "lora_alpha" not in lora:  # NeMo's alpha defaults to the rank: scale 1
            from lmforge.finetune.config import LoRASection

            _set(out, "peft.lora.lora_alpha", lora.get("r", LoRASection.r))
        if "target_modules" not in lora:
            _set(out, "peft.lora.target_modules", list(LORA_TARGETS["attention_qkv"]))  # NeMo's default
    if model.get("answer_only_loss") is not None:
        _set(out, "sft.train_on_prompt", not model["answer_only_loss"])
    if "data" not in out:
        raise ConfigError(f"{stage}.model.data.train_ds.file_names is required: the training JSONL file")
    if "model" not in out or out["model"] in (None, "???"):
        raise ConfigError(f"{stage}.model.restore_from_path is required: the base model (an lmforge checkpoint, an "
                          f"HF folder or a .nemo file)")
    if str(out["model"]).endswith(".nemo"):
        raise ConfigError(f"{stage}.model.restore_from_path={out['model']}: lmforge fine-tunes an lmforge checkpoint or "
                          f"an HF folder, not a .nemo archive; point it at the training stage's results folder, or "
                          f"convert the archive first (`lmforge convert {out['model']} FOLDER --to lmforge`) and name "
                          f"FOLDER")
    return out
