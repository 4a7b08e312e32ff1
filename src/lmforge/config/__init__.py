"""Pretraining configs: a dataclass schema with NeMo's keys, YAML recipes, dotted overrides, validation.

    from lmforge.config import load_config, model_config_from
    cfg = load_config("llama3.2/1b", ["trainer.devices=4", "model.micro_batch_size=2"])
    model_cfg = model_config_from(cfg, vocab_size=tokenizer.vocab_size)
"""

from lmforge.config.batch import BatchPlan, check_world_size, resolve_batch
from lmforge.config.loader import (
    batch_plan,
    cfg_warnings,
    list_recipes,
    load_config,
    model_config_from,
    pad_vocab_size,
    parse_override,
    recipe_path,
    to_dict,
    to_yaml,
    tokenizer_path,
    validate,
)
from lmforge.config.schema import (
    CheckpointCallbackParams,
    DataConfig,
    ExpManagerConfig,
    ModelSection,
    OptimConfig,
    PretrainConfig,
    SchedConfig,
    TokenizerConfig,
    TrainerConfig,
)

__all__ = [
    "BatchPlan",
    "CheckpointCallbackParams",
    "DataConfig",
    "ExpManagerConfig",
    "ModelSection",
    "OptimConfig",
    "PretrainConfig",
    "SchedConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "batch_plan",
    "cfg_warnings",
    "check_world_size",
    "list_recipes",
    "load_config",
    "model_config_from",
    "pad_vocab_size",
    "parse_override",
    "recipe_path",
    "resolve_batch",
    "to_dict",
    "to_yaml",
    "tokenizer_path",
    "validate",
]
