"""The pretraining config schema: dataclasses whose keys mirror NeMo's ``megatron_gpt_config.yaml``.

The dataclasses are the schema (names, types, defaults); YAML recipes and ``a.b.c=value``
overrides hold values. A NeMo user's ``trainer.*``, ``exp_manager.*`` and ``model.*`` overrides
work unchanged.

NeMo keys that lmforge has no use for are accepted too, so a NeMo command line or YAML does not
fail; they live in two tables at the end of this module, not in the dataclasses:

* :data:`NEMO_IGNORED` - accepted and dropped (kernel fusions, Transformer Engine, FP8, apex,
  Megatron O2, ...). Setting one to a value other than NeMo's default gives a one-line warning.
* :data:`NEMO_FIXED` - accepted only at NeMo's default value, because any other value would change
  the model in a way lmforge does not implement (e.g. ``model.rotary_percentage=0.5``).

Fields that are derived when left at ``None`` (see :func:`lmforge.config.loader.load_config`):
``trainer.accumulate_grad_batches`` (batch arithmetic), ``model.max_position_embeddings`` and
``model.data.seq_length`` (= ``model.encoder_seq_length``), ``model.optim.sched.max_steps``
(= ``trainer.max_steps``).
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, List, Optional

from lmforge.errors import ConfigError

# Accepted spellings -> the canonical value lmforge uses.
PRECISION_ALIASES = {
    "32": "32", "32-true": "32",
    "16": "16-mixed", "16-mixed": "16-mixed",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
}
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
FP8_PRECISIONS = ("fp8", "fp8-mixed", "transformer-engine")  # trainer.precision values meaning bf16-mixed + model.fp8
ACCELERATORS = ("auto", "gpu", "cpu")
ACTIVATION_ALIASES = {"fast-swiglu": "swiglu", "swiglu": "swiglu", "gelu": "gelu"}
OPTIMIZERS = ("fused_adam", "adamw", "adam")
# NeMo's distributed optimizer: AdamW with its state sharded over the data-parallel ranks. lmforge runs it as
# fused AdamW under FSDP (model.fsdp_sharding_strategy=grad unless model.fsdp=true chooses another strategy).
OPTIMIZER_ALIASES = {"distributed_fused_adam": "fused_adam"}
# NeMo's fsdp_grad_reduce_dtype spellings -> torch dtype names (lmforge.parallel.fsdp reads this table)
FSDP_REDUCE_DTYPES = {"32": "float32", "fp32": "float32", "float32": "float32", "bf16": "bfloat16",
                      "bfloat16": "bfloat16", "16": "float16", "fp16": "float16", "float16": "float16"}
SCHEDULERS = ("CosineAnnealing", "constant", "none")
CHECKPOINT_GRANULARITIES = ("full", "selective")
CHECKPOINT_METHODS = ("uniform", "block")
CHECKPOINT_MODES = ("min", "max")
DATA_IMPLS = ("mmap",)
DATALOADER_TYPES = ("single", "cyclic")


@dataclass
class TrainerConfig:
    """NeMo's ``trainer.*`` (PyTorch Lightning Trainer arguments)."""

    devices: int = 1  # processes (GPUs) per node
    num_nodes: int = 1
    accelerator: str = "auto"  # auto | gpu | cpu
    precision: Any = "bf16-mixed"  # 32 | 16-mixed | bf16-mixed (aliases: 32-true, 16, bf16)
    max_steps: int = -1  # optimizer steps; -1: not set (then max_epochs must be)
    max_epochs: Optional[int] = None
    val_check_interval: Any = 100  # int: every N steps; float in (0, 1]: that fraction of max_steps
    limit_val_batches: Any = 50  # int: batches per validation; float in [0, 1]: fraction of the split
    limit_test_batches: Any = 500
    log_every_n_steps: int = 10
    accumulate_grad_batches: Optional[int] = None  # None: derived from the batch sizes
    gradient_clip_val: float = 1.0  # 0: no clipping
    # Lightning's: stop (after saving) once training ran this long in this process; "DD:HH:MM:SS" or
    # {days, hours, minutes, seconds}; None: no limit. A rerun with resume_if_exists continues.
    max_time: Any = None
    # Accepted for NeMo compatibility, ignored by lmforge:
    #   num_sanity_val_steps - lmforge runs no sanity validation before training.
    #   enable_checkpointing - NeMo sets it False because exp_manager owns checkpointing; lmforge
    #                          writes checkpoints when exp_manager.create_checkpoint_callback is true.
    #   logger               - NeMo sets it False (exp_manager provides loggers); so does lmforge.
    num_sanity_val_steps: int = 2
    enable_checkpointing: bool = True
    logger: bool = False

    def val_check_steps(self, total_steps: Optional[int] = None) -> int:
        """Validation period in optimizer steps.

        An int ``val_check_interval`` is a number of steps; a float is a fraction of
        ``total_steps`` (default ``max_steps``).
        """
        interval = self.val_check_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise ConfigError(f"trainer.val_check_interval={interval!r} must be an integer number of steps "
                              "or a fraction in (0, 1]")
        if isinstance(interval, int):
            return interval
        total = self.max_steps if total_steps is None else total_steps
        if total is None or total <= 0:
            raise ConfigError(f"trainer.val_check_interval={interval} is a fraction of max_steps, but the number "
                              "of steps is not known; set trainer.max_steps or give an integer interval")
        return max(1, int(round(interval * total)))


@dataclass
class WandbLoggerKwargs:
    project: Optional[str] = None
    name: Optional[str] = None


@dataclass
class CheckpointCallbackParams:
    monitor: str = "val_loss"
    save_top_k: int = 3  # -1: keep all; 0: keep none but the last
    mode: str = "min"  # min | max
    save_last: bool = True
    every_n_train_steps: Optional[int] = None  # None: save after each validation
    async_save: bool = False  # write checkpoints in the background (staged to CPU memory first)


@dataclass
class ExpManagerConfig:
    """NeMo's ``exp_manager.*``: where a run writes logs and checkpoints, and how it resumes."""

    explicit_log_dir: Optional[str] = None  # when set, the run folder itself
    exp_dir: Optional[str] = "results"
    name: str = "megatron_gpt"  # run folder: exp_dir/name unless explicit_log_dir is set
    create_tensorboard_logger: bool = True
    create_wandb_logger: bool = False
    wandb_logger_kwargs: WandbLoggerKwargs = field(default_factory=WandbLoggerKwargs)
    resume_if_exists: bool = True
    resume_ignore_no_checkpoint: bool = True
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)
    log_step_timing: bool = True

    @property
    def log_dir(self) -> str:
        """The run folder: ``explicit_log_dir``, else ``exp_dir/name`` (``exp_dir`` null: ``results``)."""
        if self.explicit_log_dir:
            return str(self.explicit_log_dir)
        return os.path.join(self.exp_dir or "results", self.name)


@dataclass
class TokenizerConfig:
    """``model.tokenizer.*``: ``model`` is a path to a ``tokenizer.json``, a folder holding one, or a
    SentencePiece / tiktoken ``.model``; ``type`` is accepted as the same with the ``huggingface`` library
    (NeMo puts a Hugging Face name or folder there); ``type=GPT2BPETokenizer`` (or no type) with ``vocab_file``
    and ``merge_file`` is GPT-2's BPE. See :func:`lmforge.data.tokenizers.open_tokenizer`."""

    library: str = "huggingface"
    type: Optional[str] = None
    model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None


@dataclass
class DataConfig:
    """``model.data.*``: Megatron indexed datasets."""

    data_prefix: Any = None  # path prefix, or [weight1, prefix1, weight2, prefix2, ...]; required to train
    index_mapping_dir: Optional[str] = None  # where sample-index caches go (default: beside the data)
    data_impl: str = "mmap"
    splits_string: str = "980,10,10"  # train,validation,test weights
    seq_length: Optional[int] = None  # None: model.encoder_seq_length
    skip_warmup: bool = True
    num_workers: int = 0
    dataloader_type: str = "single"  # single | cyclic
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    validation_drop_last: bool = True


@dataclass
class SchedConfig:
    name: Optional[str] = "CosineAnnealing"  # CosineAnnealing | constant | none
    warmup_steps: int = 0
    constant_steps: int = 0  # steps held at min_lr at the end
    min_lr: float = 0.0
    max_steps: Optional[int] = None  # None: trainer.max_steps


@dataclass
class OptimConfig:
    name: str = "fused_adam"  # fused_adam | adamw | adam (distributed_fused_adam -> fused_adam)
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class ModelSection:
    """NeMo's ``model.*``: batch sizes, parallelism, architecture, tokenizer, data and optimizer."""

    # Batch and parallelism: global = micro x data_parallel x accumulate (give two, one is derived).
    micro_batch_size: Optional[int] = 4
    global_batch_size: Optional[int] = 8
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False  # Megatron SP: norms and dropouts split along the sequence (needs tensor parallel)
    virtual_pipeline_model_parallel_size: Optional[int] = None  # stages per pipeline rank (interleaved 1F1B); None: 1
    context_parallel_size: int = 1  # every sequence split over this many ranks (lmforge.parallel.context)
    expert_model_parallel_size: int = 1  # MoE experts spread over this many data-parallel ranks (all-to-all)
    # Sharded data parallelism (FSDP2): parameters, gradients and optimizer state split over the ranks.
    fsdp: bool = False
    fsdp_sharding_strategy: str = "full"  # full (ZeRO-3) | grad (ZeRO-2) | hybrid (shard in a node, replicate across)
    fsdp_grad_reduce_dtype: Any = 32  # dtype of the gradient reduce-scatter: 32 | bf16 | 16
    fsdp_cpu_offload: bool = False  # lmforge: keep sharded parameters, gradients and optimizer state in CPU memory
    fsdp_sharded_checkpoint: Optional[bool] = None  # None/true: each rank writes its shards (DCP); false: full weights
    # Architecture (mapped by name onto lmforge.models.config.ModelConfig).
    encoder_seq_length: int = 512
    max_position_embeddings: Optional[int] = None  # None: encoder_seq_length
    num_layers: int = 12
    hidden_size: int = 768
    ffn_hidden_size: int = 3072
    num_attention_heads: int = 12
    num_query_groups: Optional[int] = None  # None: num_attention_heads (no grouped-query attention)
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    normalization: str = "layernorm"  # layernorm | rmsnorm
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu | swiglu (NeMo's fast-swiglu is swiglu)
    bias: bool = True
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope | alibi
    rotary_base: float = 10000.0
    share_embeddings_and_output_weights: bool = True
    num_moe_experts: Optional[int] = None  # mixture-of-experts MLP with this many experts (Mixtral: 8); None: dense
    moe_router_topk: int = 2  # experts per token
    moe_aux_loss_coeff: float = 0.0  # router load-balancing loss weight (Mixtral: 0.02)
    make_vocab_size_divisible_by: int = 128
    seed: int = 1234
    activations_checkpoint_granularity: Optional[str] = None  # None | full | selective
    activations_checkpoint_method: Optional[str] = None  # None | uniform | block (None with full: uniform)
    activations_checkpoint_num_layers: Optional[int] = None  # layers per chunk (uniform) or checkpointed (block); None: 1
    compile: bool = False  # lmforge: torch.compile the blocks
    # lmforge training speed (docs/architecture.md, "Training speed"): each one changes no saved name or format
    fused_projections: Optional[bool] = None  # q/k/v, gate/up as one matmul each (not under TP); None: on unless fp8
    loss_chunk_size: Optional[int] = None  # tokens per chunk of the fused head + cross-entropy; None: auto, 0: off
    fp8: bool = False  # float8 block projections (torchao, H100-class GPU); trainer.precision=fp8 sets it
    fp8_recipe: str = "tensorwise"  # tensorwise | rowwise | rowwise_with_gw_hp: torchao's float8 scaling recipe
    fp8_fsdp_all_gather: str = "auto"  # auto | true | false: FSDP gathers float8 weights (tensorwise, sharded FSDP)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class PretrainConfig:
    """A whole pretraining run: NeMo's top-level ``name``, ``trainer``, ``exp_manager``, ``model``."""

    name: str = "megatron_gpt"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    model: ModelSection = field(default_factory=ModelSection)


def tokenizer_path(cfg: "PretrainConfig | ModelSection | TokenizerConfig") -> Optional[str]:
    """Where the tokenizer is: ``model.tokenizer.model``, else ``model.tokenizer.type`` when the
    library is ``huggingface`` (a folder or name); None when neither is set."""
    tok = cfg
    if isinstance(tok, PretrainConfig):
        tok = tok.model
    if isinstance(tok, ModelSection):
        tok = tok.tokenizer
    if tok.model:
        return str(tok.model)
    if tok.type and str(tok.library).lower() in ("huggingface", "hf"):
        return str(tok.type)
    return None


def normalize_precision(value: Any) -> str:
    """Canonical precision: ``"32"``, ``"16-mixed"`` or ``"bf16-mixed"`` (NeMo/Lightning aliases accepted)."""
    key = str(value).strip().lower() if not isinstance(value, bool) else ""
    if isinstance(value, float) and value.is_integer():
        key = str(int(value))
    if key in PRECISION_ALIASES:
        return PRECISION_ALIASES[key]
    raise ConfigError(f"trainer.precision={value!r} is not supported; use one of "
                      f"{', '.join(PRECISION_ALIASES)} (meaning {', '.join(PRECISIONS)}), or fp8 (pretraining: "
                      f"bf16-mixed with float8 block projections, model.fp8=true)")


def max_time_seconds(value: Any) -> Optional[float]:
    """``trainer.max_time`` in seconds: Lightning's ``"DD:HH:MM:SS"`` string or a mapping of ``days``, ``hours``,
    ``minutes``, ``seconds``; ``None`` when unset. Anything else is a ConfigError naming the key."""
    if value is None:
        return None
    units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
    try:
        if isinstance(value, str):
            parts = [float(x) for x in value.split(":")]
            if len(parts) != 4:
                raise ValueError
            total = sum(n * f for n, f in zip(parts, units.values()))
        elif isinstance(value, Mapping) and value and set(value) <= set(units):
            total = sum(float(value[k]) * units[k] for k in value)
        else:
            raise ValueError
    except (TypeError, ValueError):
        total = -1.0
    if not total > 0:
        raise ConfigError(f"trainer.max_time={value!r} is not a time limit; use \"DD:HH:MM:SS\" (e.g. "
                          f"\"00:03:30:00\") or {{hours: 3, minutes: 30}}")
    return total


def normalize_activation(value: str) -> str:
    """NeMo's ``fast-swiglu`` is ``swiglu``; other names pass through for ModelConfig to check."""
    return ACTIVATION_ALIASES.get(str(value), value)


# ---------------------------------------------------------------------------------------------
# NeMo keys lmforge accepts without a field of its own.
# ---------------------------------------------------------------------------------------------

ANY = object()  # marker: any value is accepted silently (and everything beneath the key)

# Accepted and ignored. Value: NeMo's default; a different value earns a one-line warning.
# A key marked ANY also covers every key beneath it (e.g. model.nsys_profile.start_step).
NEMO_IGNORED: dict[str, Any] = {
    # top level / launcher
    "restore_from_path": None,
    "run": ANY,
    "hydra": ANY,
    "defaults": ANY,
    # trainer
    "trainer.use_distributed_sampler": False,
    "trainer.replace_sampler_ddp": False,
    "trainer.benchmark": False,
    "trainer.enable_model_summary": ANY,
    "trainer.enable_progress_bar": ANY,
    "trainer.strategy": ANY,
    "trainer.callbacks": ANY,
    "trainer.plugins": ANY,
    # exp_manager
    "exp_manager.resume_from_checkpoint": None,
    "exp_manager.step_timing_kwargs": ANY,
    "exp_manager.create_dllogger_logger": False,
    "exp_manager.create_mlflow_logger": False,
    "exp_manager.log_global_rank_0_only": ANY,
    "exp_manager.log_local_rank_0_only": ANY,
    "exp_manager.seconds_to_sleep": ANY,
    "exp_manager.max_time_per_run": None,
    "exp_manager.version": ANY,
    "exp_manager.use_datetime_version": ANY,
    "exp_manager.ema": ANY,
    "exp_manager.checkpoint_callback_params.filename": ANY,
    "exp_manager.checkpoint_callback_params.model_parallel_size": ANY,
    "exp_manager.checkpoint_callback_params.save_weights_only": False,
    # model: parallelism and loading
    "model.resume_from_checkpoint": None,
    "model.mcore_gpt": ANY,
    "model.use_cpu_initialization": False,
    "model.overlap_p2p_comm": False,
    "model.batch_p2p_comm": True,
    "model.sync_batch_comm": False,
    "model.fsdp_use_orig_params": ANY,  # FSDP1's flat-parameter layout switch; FSDP2 keeps original parameters either way
    "model.sharp": False,
    "model.gradient_as_bucket_view": True,
    "model.pre_process": True,
    "model.post_process": True,
    # model: numerics and fused kernels (SDPA and torch.compile play these parts in lmforge)
    "model.megatron_amp_O2": False,
    "model.native_amp_init_scale": 4294967296,
    "model.native_amp_growth_interval": 1000,
    "model.hysteresis": 2,
    "model.fp32_residual_connection": False,
    "model.fp16_lm_cross_entropy": False,
    "model.grad_allreduce_chunk_size_mb": 125,
    "model.grad_div_ar_fusion": True,
    "model.gradient_accumulation_fusion": False,
    "model.bias_activation_fusion": True,
    "model.bias_dropout_add_fusion": True,
    "model.masked_softmax_fusion": True,
    "model.get_attention_mask_from_fusion": True,
    "model.persist_layer_norm": True,
    "model.apply_rope_fusion": ANY,
    "model.cross_entropy_loss_fusion": ANY,
    "model.use_flash_attention": ANY,
    "model.apply_query_key_layer_scaling": ANY,  # no effect on the result outside fp16 softmax
    "model.openai_gelu": False,
    "model.onnx_safe": False,
    "model.apex_transformer_log_level": ANY,
    "model.deterministic_mode": False,
    "model.gc_interval": 0,
    "model.nsys_profile.enabled": False,
    "model.nsys_profile": ANY,
    # model: initialisation and regularisation details lmforge does its own way
    "model.use_scaled_init_method": True,
    "model.do_layer_norm_weight_decay": False,
    "model.ffn_dropout": 0.0,
    "model.num_micro_batches_with_partial_activation_checkpoints": None,
    "model.activations_checkpoint_layers_per_pipeline": None,
    # model: Transformer Engine and FP8
    "model.transformer_engine": False,
    "model.fp8_e4m3": False,
    "model.fp8_hybrid": False,
    "model.fp8_margin": 0,
    "model.fp8_interval": 1,
    "model.fp8_amax_history_len": ANY,
    "model.fp8_amax_compute_algo": ANY,
    "model.fp8_wgrad": True,
    "model.reduce_amax": True,
    "model.use_emha": False,
    "model.ub_tp_comm_overlap": False,
    "model.ub_tp_comm_overlap_cfg": ANY,
    "model.tp_comm_atomic_ag": ANY,
    "model.tp_comm_atomic_rs": ANY,
    # model.tokenizer: lmforge reads model / vocab_file / merge_file (TokenizerConfig)
    "model.tokenizer.delimiter": None,
    "model.tokenizer.sentencepiece_legacy": False,
    "model.tokenizer.use_fast": ANY,
    # model.data
    "model.data.no_seqlen_plus_one_input_tokens": False,
    "model.data.pad_samples_to_global_batch_size": False,
    "model.data.shuffle_documents": True,
    "model.data.exchange_indices_distributed": False,
    # model.optim: distributed_fused_adam's buffers
    "model.optim.bucket_cap_mb": ANY,
    "model.optim.overlap_grad_sync": ANY,
    "model.optim.overlap_param_sync": ANY,
    "model.optim.contiguous_grad_buffer": ANY,
    "model.optim.contiguous_param_buffer": ANY,
    "model.optim.grad_sync_dtype": ANY,
}

# Accepted only at NeMo's default: any other value changes the model or the schedule in a way
# lmforge does not implement, so it is an error rather than a warning.
NEMO_FIXED: dict[str, Any] = {
    "model.rampup_batch_size": None,
    "model.rotary_percentage": 1.0,
    "model.seq_len_interpolation_factor": None,
    "model.transformer_block_type": "pre_ln",
    "model.normalize_attention_scores": True,
    "model.headscale": False,
    "model.attention_type": "multihead",
    # lmforge writes no .nemo archive while training: `lmforge export CHECKPOINT OUT.nemo --format nemo` afterwards
    "exp_manager.checkpoint_callback_params.always_save_nemo": False,
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end": False,
}

#: What to do instead of a NEMO_FIXED key's other values (appended to its error).
NEMO_FIXED_HINTS: dict[str, str] = {
    "exp_manager.checkpoint_callback_params.always_save_nemo":
        "lmforge writes no .nemo file while training; export a checkpoint afterwards with `lmforge export "
        "CHECKPOINT OUT.nemo --format nemo`",
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end":
        "lmforge writes no .nemo file while training; export the last checkpoint with `lmforge export "
        "CHECKPOINT OUT.nemo --format nemo`",
}
