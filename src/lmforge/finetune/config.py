"""The fine-tuning stage's config: a dataclass schema, YAML values and ``a.b.c=value`` overrides.

    cfg = load_finetune_config("sft.yaml", ["method=lora", "peft.lora.r=16", "trainer.max_steps=500"])

Unknown keys and wrong types raise one :class:`~lmforge.errors.ConfigError` naming the key, where
it came from and, for a typo, the nearest known key. Gradient accumulation is derived:
``global_batch_size = micro_batch_size x data-parallel processes x accumulation``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmforge.data.sft import SFTDataConfig
from lmforge.errors import ConfigError

METHODS = ("full", "lora", "ptuning", "adapter", "ia3")
PRECISIONS = {"32": "32", "32-true": "32", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "16": "16-mixed",
              "16-mixed": "16-mixed"}


@dataclass
class LoRASection:
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_dora: bool = False


@dataclass
class IA3Section:
    target_modules: List[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: List[str] = field(default_factory=lambda: ["down_proj"])


@dataclass
class AdapterSection:
    dim: int = 32
    activation: str = "gelu"
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["self_attn", "mlp"])


@dataclass
class PTuningSection:
    num_virtual_tokens: int = 10
    encoder_type: str = "mlp"
    encoder_hidden_size: int = 128
    dropout: float = 0.0


@dataclass
class PeftSection:
    lora: LoRASection = field(default_factory=LoRASection)
    ia3: IA3Section = field(default_factory=IA3Section)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    ptuning: PTuningSection = field(default_factory=PTuningSection)


@dataclass
class TrainerSection:
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed
    max_steps: int = 100
    val_check_interval: int = 50
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    gradient_clip_val: float = 1.0


@dataclass
class OptimSection:
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class GenerationSection:
    """Generation metrics on the validation set (exact match and token F1, as NeMo's SQuAD SFT reports)."""

    num_samples: int = 32  # validation records scored; 0 turns generation metrics off
    max_new_tokens: int = 32


@dataclass
class FinetuneConfig:
    model: Optional[str] = None  # base model: a checkpoint folder (or what load_for_inference accepts)
    data: Optional[str] = None  # training JSONL
    val_data: Optional[str] = None  # validation JSONL
    out: str = "finetune_out"
    method: str = "lora"  # full | lora | ptuning | adapter | ia3
    seq_length: Optional[int] = None  # None: the model's max_position_embeddings (less p-tuning's virtual tokens)
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    base_dtype: str = "float32"  # dtype of the frozen base weights for PEFT (bfloat16 saves memory)
    gradient_checkpointing: Optional[bool] = None  # true: activations_checkpoint_granularity=full; false: off
    activations_checkpoint_granularity: Optional[str] = None  # None | full | selective (NeMo's meaning) | lora
    activations_checkpoint_method: Optional[str] = None  # None (uniform) | uniform | block
    activations_checkpoint_num_layers: Optional[int] = None  # None: 1
    compile: bool = False  # torch.compile each block (adapters inside) and the loss head
    tensor_model_parallel_size: int = 1  # split every block over this many consecutive ranks (method=full)
    sequence_parallel: bool = False  # with tensor parallelism: norms and dropouts split along the sequence too
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    fsdp_sharding_strategy: str = "full"  # full | grad | hybrid (shard in a node, replicate across nodes)
    fsdp_grad_reduce_dtype: Any = 32  # 32 | bf16 | 16
    fsdp_cpu_offload: bool = False
    fsdp_sharded_checkpoint: Optional[bool] = None  # None/true: per-rank shards; false: full weights on rank 0
    async_save: bool = False  # write checkpoints in the background (staged to CPU memory first)
    resume: bool = True
    monitor: str = "val_loss"  # val_loss | val_ppl | exact_match | f1 (best checkpoint)
    save_top_k: int = 1
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    generation: GenerationSection = field(default_factory=GenerationSection)

    @property
    def monitor_mode(self) -> str:
        return "min" if self.monitor in ("val_loss", "val_ppl") else "max"


def _known_keys(cls, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None):
            out.extend(_known_keys(f.type, key + "."))
    return out


def _all_keys(obj, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        out.append(key)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_all_keys(value, key + "."))
    return out


def _merge(base, data: Mapping, where: str, schema=None):
    try:
        return OmegaConf.merge(base, OmegaConf.create(dict(data)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        known = _all_keys((schema or FinetuneConfig)())
        hint = difflib.get_close_matches(str(key), known, n=1)
        more = f"; did you mean {hint[0]}?" if hint and hint[0] != key and "id you mean" not in str(e) else ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: {key or 'config'}: {msg}{more}") from None


def _text_keys(cls, prefix: str = "") -> frozenset:
    """Dotted keys of the fields typed ``str`` / ``Optional[str]``: an override of one is the text as typed
    (``sft.prompt_template={input}`` is a template, not a YAML mapping)."""
    import typing

    keys = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys |= _text_keys(hint, f"{prefix}{name}.")
        elif hint in (str, Optional[str]):
            keys.add(prefix + name)
    return frozenset(keys)


def load_finetune_config(source: Union[None, str, Path, Mapping] = None, overrides: Sequence[str] = (),
                         need_paths: bool = True) -> FinetuneConfig:
    """Schema defaults <- a YAML file or dict <- dotted overrides; validated. Returns a :class:`FinetuneConfig`.

    ``need_paths=False`` (``lmforge config --finetune``) accepts a config without ``model`` / ``data`` yet."""
    obj: FinetuneConfig = load_structured(FinetuneConfig, source, overrides, "fine-tuning")
    validate(obj, need_paths=need_paths)
    return obj


def load_structured(schema, source: Union[None, str, Path, Mapping] = None, overrides: Sequence[str] = (),
                    what: str = "fine-tuning"):
    """An instance of the dataclass ``schema``: its defaults <- a YAML file or dict <- dotted overrides (text keys
    taken as typed). Unknown keys and wrong types are one ConfigError naming the key (and the nearest known one).
    Fine-tuning and alignment (:mod:`lmforge.align.config`) share it; each validates its own result."""
    from lmforge.config.loader import parse_override

    cfg = OmegaConf.structured(schema)
    if source is not None:
        if isinstance(source, Mapping):
            data, where = dict(source), "config"
        else:
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"{what} config {path} does not exist; give a YAML file or use flags/overrides")
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
            where = str(path)
        cfg = _merge(cfg, data, where, schema)
    for text in overrides:
        key, value = parse_override(text, string_keys=_text_keys(schema))
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = _merge(cfg, nested, f"override {text!r}", schema)
    return OmegaConf.to_object(cfg)


def validate(cfg: FinetuneConfig, need_paths: bool = True) -> None:
    """Collect every problem, then raise one ConfigError."""
    problems = []
    if not cfg.model and need_paths:
        problems.append("model is not set: give the base model folder (--model PATH or model=PATH)")
    if not cfg.data and need_paths:
        problems.append("data is not set: give a training JSONL file (--data train.jsonl or data=PATH)")
    if cfg.method not in METHODS:
        problems.append(f"method={cfg.method!r} is not known; use one of {', '.join(METHODS)}")
    check_training_keys(cfg, problems)
    if cfg.monitor not in ("val_loss", "val_ppl", "exact_match", "f1"):
        problems.append(f"monitor={cfg.monitor!r}; use val_loss, val_ppl, exact_match or f1")
    elif cfg.monitor in ("exact_match", "f1") and (not cfg.val_data or cfg.generation.num_samples < 1):
        problems.append(f"monitor={cfg.monitor} needs val_data and generation.num_samples >= 1")
    if cfg.base_dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"base_dtype={cfg.base_dtype!r}; use float32, bfloat16 or float16")
    if cfg.method == "ptuning" and cfg.sft.pack:
        problems.append("method=ptuning cannot use sft.pack=true: virtual tokens belong to one sample per row")
    if cfg.method == "full" and cfg.base_dtype != "float32":
        problems.append("method=full trains every weight: keep base_dtype=float32 (mixed precision comes from "
                        "trainer.precision)")
    check_activations_checkpoint_keys(cfg, problems, cfg.method == "lora", f"method={cfg.method}", "method=lora")
    tp = cfg.tensor_model_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        problems.append(f"tensor_model_parallel_size={tp!r} must be a positive integer")
    elif tp > 1:
        if cfg.method != "full":
            problems.append(f"tensor_model_parallel_size={tp} with method={cfg.method}: PEFT under tensor parallelism "
                            "is not supported yet; use method=full, or fsdp=true for adapters")
        if cfg.compile:
            problems.append(f"compile=true with tensor_model_parallel_size={tp} is not supported yet: drop one of them")
        if cfg.val_data and cfg.generation.num_samples > 0:
            problems.append(f"tensor_model_parallel_size={tp}: generation metrics during validation are not "
                            "supported under tensor parallelism yet; set generation.num_samples=0 (val_loss is "
                            "still computed)")
    if cfg.sequence_parallel and not (isinstance(tp, int) and tp > 1):
        problems.append("sequence_parallel=true splits the tensor-parallel group's sequence: set "
                        "tensor_model_parallel_size above 1")
    if cfg.fsdp_sharded_checkpoint and cfg.method != "full":
        problems.append(f"fsdp_sharded_checkpoint=true: method={cfg.method} saves only its adapter weights, whole "
                        "(they are small); remove the key")
    check_fsdp_keys(cfg, problems)
    if cfg.fsdp and cfg.fsdp_sharding_strategy == "hybrid" and cfg.trainer.num_nodes == 1:
        problems.append("fsdp_sharding_strategy=hybrid replicates across nodes but trainer.num_nodes=1: use full")
    try:
        cfg.sft.validate()
    except ConfigError as e:
        problems.append(str(e))
    raise_problems(problems, "fine-tuning")


def parallel_dims(cfg, rank: int = 0):
    """The :class:`~lmforge.parallel.dims.ParallelDims` a fine-tuning or alignment config asks for, the one source
    of its data-parallel size (as :func:`lmforge.config.loader.parallel_dims` is pretraining's): the world of
    ``trainer.devices`` x ``trainer.num_nodes``, ``tensor_model_parallel_size``-way tensor parallelism (alignment
    has no such key: 1), FSDP as ``fsdp``/``fsdp_sharding_strategy`` say; ``rank``: 0 when only planning.

    Raises:
        ConfigError: a layout that does not divide the world, naming the keys."""
    from lmforge.parallel.dims import ParallelDims, fsdp_strategy

    t = cfg.trainer
    return ParallelDims(int(t.devices) * int(t.num_nodes), rank=rank, devices_per_node=int(t.devices),
                        tp=int(getattr(cfg, "tensor_model_parallel_size", 1)),
                        fsdp=fsdp_strategy(cfg.fsdp, cfg.fsdp_sharding_strategy))


def activations_checkpoint(cfg) -> Optional[dict]:
    """A fine-tuning or alignment config's activation checkpointing as
    :func:`~lmforge.parallel.transforms.apply_activation_checkpointing` takes it (``{granularity, method,
    num_layers}``), or None for off: ``activations_checkpoint_*`` with NeMo's meaning, ``gradient_checkpointing=true``
    the shorthand for ``full`` (every block recomputed).

    Raises:
        ConfigError: what ``apply_activation_checkpointing`` refuses (but ``block`` beyond the model's layer count,
            known once it is open), naming the key."""
    from lmforge.parallel.transforms import check_activations_checkpoint

    granularity = cfg.activations_checkpoint_granularity or ("full" if cfg.gradient_checkpointing else None)
    return check_activations_checkpoint(granularity, cfg.activations_checkpoint_method,
                                        cfg.activations_checkpoint_num_layers)


def check_activations_checkpoint_keys(cfg, problems: list, lora_ok: bool, peft_given: str, peft_lora: str) -> None:
    """The ``activations_checkpoint_*`` keys (NeMo's rules, :func:`activations_checkpoint`) and
    ``gradient_checkpointing``, their shorthand for ``full``, saying the same where both are given; ``lora``
    granularity only where ``lora_ok`` (the run trains LoRA: ``peft_given`` says what it trains, ``peft_lora`` how to
    ask for LoRA); chunks of several blocks not under FSDP (each block gathers its own parameters)."""
    g, switch = cfg.activations_checkpoint_granularity, cfg.gradient_checkpointing
    if switch is not None and not isinstance(switch, bool):
        problems.append(f"gradient_checkpointing={switch!r} must be true or false")
        return
    if switch is True and g not in (None, "full"):
        problems.append(f"gradient_checkpointing=true means activations_checkpoint_granularity=full, not {g}; set one "
                        f"of them")
        return
    if switch is False and g is not None:
        problems.append(f"gradient_checkpointing=false turns activation checkpointing off, but "
                        f"activations_checkpoint_granularity={g} turns it on; set one of them")
        return
    try:
        ac = activations_checkpoint(cfg)
    except ConfigError as e:
        problems.append(str(e))
        return
    if ac is None:
        return
    if ac["granularity"] == "lora" and not lora_ok:
        problems.append(f"activations_checkpoint_granularity=lora keeps the LoRA products of each block, but "
                        f"{peft_given}; use full or selective, or {peft_lora}")
    if cfg.fsdp and ac["method"] == "uniform" and ac["num_layers"] > 1:
        problems.append(f"activations_checkpoint_num_layers={ac['num_layers']} with method uniform recomputes several "
                        f"blocks as one unit, but under fsdp=true each block gathers its own parameters: use "
                        f"activations_checkpoint_num_layers=1 or activations_checkpoint_method=block")


def check_training_keys(cfg, problems: list) -> None:
    """The ``trainer.*`` and size keys fine-tuning and alignment configs share: precision (normalized to the
    loop's name when known), seq_length and batch sizes, max_steps. Problems are appended to ``problems``."""
    if cfg.trainer.precision not in PRECISIONS:
        problems.append(f"trainer.precision={cfg.trainer.precision!r}; use 32, bf16-mixed or 16-mixed")
    else:
        cfg.trainer.precision = PRECISIONS[str(cfg.trainer.precision)]
    for key in ("seq_length", "micro_batch_size", "global_batch_size"):
        if getattr(cfg, key) is not None and int(getattr(cfg, key)) < 1:
            problems.append(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.trainer.max_steps < 1:
        problems.append(f"trainer.max_steps={cfg.trainer.max_steps} must be at least 1")


def check_fsdp_keys(cfg, problems: list) -> None:
    """The FSDP keys fine-tuning and alignment configs share: known sharding strategy and gradient-reduce dtype,
    and none of them set away from its default unless ``fsdp=true``. Problems are appended to ``problems``."""
    from lmforge.config.schema import FSDP_REDUCE_DTYPES
    from lmforge.parallel.dims import FSDP_STRATEGIES

    if cfg.fsdp_sharding_strategy not in FSDP_STRATEGIES:
        problems.append(f"fsdp_sharding_strategy={cfg.fsdp_sharding_strategy!r}; use full, grad or hybrid")
    if str(cfg.fsdp_grad_reduce_dtype).lower() not in FSDP_REDUCE_DTYPES:
        problems.append(f"fsdp_grad_reduce_dtype={cfg.fsdp_grad_reduce_dtype!r}; use 32, bf16 or 16")
    if not cfg.fsdp:
        for key, default in (("fsdp_sharding_strategy", "full"), ("fsdp_grad_reduce_dtype", "32")):
            if str(getattr(cfg, key)).lower() != default:
                problems.append(f"{key}={getattr(cfg, key)} applies to FSDP runs: set fsdp=true too")
        for key in ("fsdp_cpu_offload", "fsdp_sharded_checkpoint"):
            if getattr(cfg, key):
                problems.append(f"{key}={getattr(cfg, key)} applies to FSDP runs: set fsdp=true too")


def raise_problems(problems: list, what: str) -> None:
    """Raise one ConfigError of every problem found in the ``what`` config (nothing when there are none)."""
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          f"the {what} config has problems:\n  - " + "\n  - ".join(problems))


def to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)
