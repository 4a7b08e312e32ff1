"""The alignment stage's config: ``lmforge align`` settings as a dataclass schema, YAML values and overrides.

    cfg = load_align_config("dpo.yaml", ["method=dpo", "align.beta=0.05", "trainer.max_steps=200"])

Shares fine-tuning's loader (:func:`lmforge.finetune.config.load_structured`), its PEFT, trainer and optimizer
sections and their meaning; the method's own settings live in ``align``. Every key is documented, with its
default, in docs/alignment.md (a test checks the table against this schema).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

from lmforge.data.steer import DEFAULT_ATTRIBUTES, DEFAULT_RANGE, problems_of
from lmforge.errors import ConfigError
from lmforge.finetune.config import (OptimSection, PeftSection, TrainerSection, activations_checkpoint,
                                     check_activations_checkpoint_keys, check_fsdp_keys, check_training_keys,
                                     load_structured, parallel_dims, raise_problems)

METHODS = ("dpo", "ipo", "rpo", "kto", "orpo", "simpo", "rm", "regression_rm", "grpo", "reinforce", "ppo")
REWARD_METHODS = ("rm", "regression_rm")
ONLINE_METHODS = ("grpo", "reinforce", "ppo")
#: align.* keys of the online methods (with their defaults): refused for the offline ones
ONLINE_KEYS = {"reward_fn": None, "reward_model": None, "num_generations": 4, "max_completion_length": 16,
               "temperature": 1.0, "ppo_epochs": 1, "num_mini_batches": 1, "cliprange": 0.2, "rollout_compile": "auto",
               "rollout_dtype": "auto"}
#: align.* keys of PPO alone (its critic, GAE and value loss), with their defaults
PPO_KEYS = {"critic_model": None, "critic_lr": None, "vf_coef": 0.1, "cliprange_value": 0.2, "gamma": 1.0,
            "lam": 0.95, "normalize_advantages": True, "absolute_kl": False}
#: align.rollout_dtype's explicit values (lmforge.align.rl.ROLLOUT_DTYPES), besides auto
ROLLOUT_DTYPE_NAMES = ("float32", "bfloat16", "float16")
PEFT_METHODS = ("none", "lora", "ia3", "adapter", "ptuning")
REFERENCES = ("auto", "precomputed", "adapters_off")
#: the methods whose pairs can share their prompt in one row (align.shared_prompt)
SHARED_PROMPT_METHODS = ("dpo", "ipo", "rpo", "orpo", "simpo", "rm")


@dataclass
class AlignSection:
    """The preference method's settings (see docs/alignment.md for each formula)."""

    beta: float = 0.1  # DPO/IPO/RPO/KTO: strength of the tie to the reference; ORPO: weight of the odds-ratio term
    label_smoothing: float = 0.0  # DPO/RPO (cDPO) and SimPO: probability that a pair's preference is flipped
    rpo_alpha: float = 1.0  # RPO: weight of the chosen completions' negative log-likelihood
    simpo_gamma: float = 0.5  # SimPO: target reward margin
    desirable_weight: float = 1.0  # KTO: weight of desirable examples' losses
    undesirable_weight: float = 1.0  # KTO: weight of undesirable examples' losses
    reference: str = "auto"  # auto | precomputed | adapters_off
    shared_prompt: Optional[bool] = None  # paired methods: a pair as one row [prompt | chosen | rejected]; null: auto
    center_rewards_coefficient: Optional[float] = None  # reward models: weight of mean((r_c + r_r)^2)
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    completion_key: str = "completion"  # KTO
    label_key: str = "label"  # KTO
    margin_key: str = "margin"  # reward models: an optional numeric field subtracted inside the loss
    chat_template: Optional[str] = None  # a Jinja chat template instead of the tokenizer's
    reward_fn: Optional[str] = None  # grpo/reinforce/ppo: module:function scoring completions (--reward-fn)
    reward_model: Optional[str] = None  # grpo/reinforce/ppo: a reward model scoring completions (--reward-model)
    num_generations: int = 4  # grpo/reinforce: completions sampled per prompt (the group); ppo: per prompt
    max_completion_length: int = 16  # online: most new tokens per completion
    temperature: float = 1.0  # online: sampling temperature of the rollouts
    rollout_compile: Any = "auto"  # online: auto | true | false: compiled decode graphs on the live policy (auto: CUDA)
    rollout_dtype: str = "auto"  # online: auto | float32 | bfloat16 | float16: the dtype rollouts sample in (auto: amp's)
    ppo_epochs: int = 1  # online: passes of optimizer steps over each rollout (TRL's ppo_epochs)
    num_mini_batches: int = 1  # online: optimizer steps per pass over a rollout (TRL's num_mini_batches)
    cliprange: float = 0.2  # online: the policy ratio's clip range (NeMo-Aligner's ratio_eps)
    critic_model: Optional[str] = None  # ppo: the critic's starting weights (default: the reward model, else policy)
    critic_lr: Optional[float] = None  # ppo: the critic's peak learning rate (default: optim.lr)
    vf_coef: float = 0.1  # ppo: weight of the value loss beside the policy loss
    cliprange_value: float = 0.2  # ppo: how far a value may move from the rollout's (NeMo's loss_clip_val)
    gamma: float = 1.0  # ppo: discount (NeMo's discount_factor)
    lam: float = 0.95  # ppo: GAE's lambda (NeMo's gae_lambda)
    normalize_advantages: bool = True  # ppo: whiten the advantages over each rollout's tokens
    absolute_kl: bool = False  # ppo: |log p - log ref| as the per-token KL penalty (NeMo's use_absolute_kl)
    attributes: List[str] = field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))  # regression_rm: outputs
    attribute_range: List[int] = field(default_factory=lambda: list(DEFAULT_RANGE))  # regression_rm: label range
    response_key: str = "response"  # regression_rm: field of the response scored
    attributes_key: str = "attributes"  # regression_rm: field of the {name: value} labels


@dataclass
class AlignPeftSection(PeftSection):
    method: str = "none"  # none | lora | ia3 | adapter | ptuning (--peft)


@dataclass
class AlignConfig:
    model: Optional[str] = None  # the policy to start from (an SFT model): checkpoint, run or HF folder
    data: Optional[str] = None  # training JSONL
    val_data: Optional[str] = None  # validation JSONL
    out: str = "align_out"
    method: str = "dpo"  # dpo | ipo | rpo | kto | orpo | simpo | rm | regression_rm | grpo | reinforce | ppo
    seq_length: Optional[int] = None  # None: the model's max_position_embeddings (less p-tuning's virtual tokens)
    micro_batch_size: int = 4  # examples (pairs) per process in one forward/backward
    global_batch_size: int = 8  # examples (pairs) per optimizer step over all processes
    seed: int = 1234
    base_dtype: str = "float32"
    gradient_checkpointing: Optional[bool] = None  # true: activations_checkpoint_granularity=full; false: off
    activations_checkpoint_granularity: Optional[str] = None  # None | full | selective (NeMo's meaning) | lora
    activations_checkpoint_method: Optional[str] = None  # None (uniform) | uniform | block
    activations_checkpoint_num_layers: Optional[int] = None  # None: 1
    compile: bool = False  # torch.compile each block and the preference head's chunks (offline methods)
    fsdp: bool = False
    fsdp_sharding_strategy: str = "full"
    fsdp_grad_reduce_dtype: Any = 32
    fsdp_cpu_offload: bool = False
    fsdp_sharded_checkpoint: Optional[bool] = None
    resume: bool = True
    monitor: str = "val_loss"  # val_loss | val_rewards_accuracy
    save_top_k: int = 1
    align: AlignSection = field(default_factory=AlignSection)
    peft: AlignPeftSection = field(default_factory=AlignPeftSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    optim: OptimSection = field(default_factory=OptimSection)

    @property
    def monitor_mode(self) -> str:
        return "min" if self.monitor == "val_loss" else "max"

    @property
    def shared_prompt(self) -> bool:
        """Whether a pair's chosen and rejected completions are read from one row that holds their prompt once
        (``align.shared_prompt``; auto: the paired methods, except with p-tuning). The model's own condition
        (no ALiBi, no sliding window) is checked when it is open (:func:`lmforge.align.stage.load_datasets`)."""
        if self.method not in SHARED_PROMPT_METHODS:
            return False
        if self.align.shared_prompt is None:
            return self.peft.method != "ptuning"
        return bool(self.align.shared_prompt)

    @property
    def activations_checkpoint(self) -> Optional[dict]:
        """The policy's activation checkpointing as :func:`~lmforge.parallel.transforms.apply_activation_checkpointing`
        takes it (``{granularity, method, num_layers}``), or None for off: ``activations_checkpoint_*`` with NeMo's
        meaning, ``gradient_checkpointing=true`` the shorthand for ``full`` (every block recomputed). Checked by
        :func:`validate`."""
        return activations_checkpoint(self)

    @property
    def critic_activations_checkpoint(self) -> Optional[dict]:
        """PPO's critic: the policy's setting, except that ``lora`` (which keeps the LoRA products) is ``full`` for
        the critic, which trains all its weights and has no LoRA layers (every block recomputed, as ``lora`` does)."""
        ac = self.activations_checkpoint
        return dict(granularity="full", method=None, num_layers=None) if ac and ac["granularity"] == "lora" else ac

    @property
    def reference(self) -> Optional[str]:
        """How reference log-probabilities are had: None for methods without one."""
        if self.method in ONLINE_METHODS:
            return "frozen_copy" if self.peft.method == "none" else "adapters_off"
        if self.method not in ("dpo", "ipo", "rpo", "kto"):
            return None
        if self.align.reference == "auto":
            return "precomputed" if self.peft.method == "none" else "adapters_off"
        return self.align.reference


def load_align_config(source: Union[None, str, Path, Mapping] = None, overrides: Sequence[str] = (),
                      need_paths: bool = True) -> AlignConfig:
    cfg: AlignConfig = load_structured(AlignConfig, source, overrides, "alignment")
    validate(cfg, need_paths)
    return cfg


def validate(cfg: AlignConfig, need_paths: bool = True) -> None:
    """Collect every problem, then raise one ConfigError."""
    problems = []
    if not cfg.model and need_paths:
        problems.append("model is not set: give the model to align (--model PATH or model=PATH)")
    if not cfg.data and need_paths:
        problems.append("data is not set: give a preference JSONL file (--data prefs.jsonl or data=PATH)")
    if cfg.method not in METHODS:
        problems.append(f"method={cfg.method!r} is not known; use one of {', '.join(METHODS)}")
    if cfg.peft.method not in PEFT_METHODS:
        problems.append(f"peft.method={cfg.peft.method!r} is not known; use one of {', '.join(PEFT_METHODS)}")
    if cfg.method == "rm" and cfg.peft.method != "none":
        problems.append("method=rm trains every weight and its score head; PEFT reward models are not supported yet: "
                        "drop --peft (a SteerLM attribute model, method=regression_rm, trains with --peft lora)")
    elif cfg.method == "regression_rm" and cfg.peft.method not in ("none", "lora"):
        problems.append(f"method=regression_rm with --peft {cfg.peft.method}: an attribute model trains all weights or "
                        f"LoRA (merged into the exported reward_model/), not {cfg.peft.method}")
    elif cfg.method == "regression_rm" and cfg.peft.method != "none" and cfg.fsdp:
        problems.append("method=regression_rm with --peft lora and fsdp=true is not supported yet (the merged export "
                        "needs the whole model on one process): drop fsdp or --peft")
    a = cfg.align
    if cfg.method == "regression_rm":
        problems.extend(problems_of(list(a.attributes), list(a.attribute_range), None, "align."))
    else:
        for key, default in (("attributes", list(DEFAULT_ATTRIBUTES)), ("attribute_range", list(DEFAULT_RANGE)),
                             ("response_key", "response"), ("attributes_key", "attributes")):
            if getattr(a, key) != default:
                problems.append(f"align.{key} applies to method=regression_rm, not {cfg.method}")
    online = cfg.method in ONLINE_METHODS
    if online:
        _validate_online(cfg, problems)
    else:
        for key, default in ONLINE_KEYS.items():
            if getattr(a, key) != default:
                problems.append(f"align.{key} applies to grpo, reinforce and ppo, not {cfg.method}")
    if cfg.method != "ppo":
        for key, default in PPO_KEYS.items():
            if getattr(a, key) != default:
                problems.append(f"align.{key} applies to ppo (its critic and advantages), not {cfg.method}")
    if online and a.reference != "auto":
        problems.append(f"align.reference={a.reference}: {cfg.method} compares with the model with its adapters "
                        f"off (PEFT) or a frozen copy of the starting model; remove it")
    elif a.reference not in REFERENCES:
        problems.append(f"align.reference={a.reference!r}; use auto, precomputed or adapters_off")
    elif a.reference == "adapters_off" and cfg.peft.method == "none":
        problems.append("align.reference=adapters_off needs a PEFT method (--peft lora): a full-weight run has no "
                        "adapters to switch off; use precomputed")
    elif a.reference != "auto" and cfg.method not in ("dpo", "ipo", "rpo", "kto"):
        problems.append(f"align.reference={a.reference}: method={cfg.method} has no reference model; remove it")
    if online and not float(a.beta) >= 0:
        problems.append(f"align.beta={a.beta} must be 0 (no KL penalty) or above")
    elif cfg.method not in REWARD_METHODS + ONLINE_METHODS and not float(a.beta) > 0:
        problems.append(f"align.beta={a.beta} must be above 0")
    if not 0.0 <= float(a.label_smoothing) < 0.5:
        problems.append(f"align.label_smoothing={a.label_smoothing} must be in [0, 0.5)")
    elif float(a.label_smoothing) > 0 and cfg.method not in ("dpo", "rpo", "simpo"):
        problems.append(f"align.label_smoothing applies to dpo, rpo and simpo, not {cfg.method}")
    if a.shared_prompt is not None and cfg.method not in SHARED_PROMPT_METHODS:
        problems.append(f"align.shared_prompt applies to the paired methods ({', '.join(SHARED_PROMPT_METHODS)}), "
                        f"not {cfg.method}; remove it")
    elif a.shared_prompt and cfg.peft.method == "ptuning":
        problems.append("align.shared_prompt=true with --peft ptuning is not supported (the virtual tokens are not "
                        "placed in a shared row); set align.shared_prompt=false or use lora, ia3 or adapter")
    if a.center_rewards_coefficient is not None and cfg.method != "rm":
        problems.append("align.center_rewards_coefficient applies to method=rm")
    check_training_keys(cfg, problems)
    check_activations_checkpoint_keys(cfg, problems, cfg.peft.method == "lora", f"--peft {cfg.peft.method}",
                                      "--peft lora")
    if cfg.monitor == "val_ppl":
        problems.append(f"monitor=val_ppl: method={cfg.method}'s loss is not a per-token negative log-likelihood, so "
                        f"it has no perplexity (none is logged); use val_loss or val_rewards_accuracy")
    elif cfg.monitor not in ("val_loss", "val_rewards_accuracy"):
        problems.append(f"monitor={cfg.monitor!r}; use val_loss or val_rewards_accuracy")
    elif cfg.monitor == "val_rewards_accuracy" and (not cfg.val_data or cfg.method in ("kto", "regression_rm")):
        problems.append("monitor=val_rewards_accuracy needs val_data and a paired method (not kto or regression_rm)")
    if cfg.base_dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"base_dtype={cfg.base_dtype!r}; use float32, bfloat16 or float16")
    if cfg.peft.method == "none" and cfg.base_dtype != "float32":
        problems.append("a full-weight run trains every weight: keep base_dtype=float32 (mixed precision comes from "
                        "trainer.precision)")
    check_fsdp_keys(cfg, problems)
    if cfg.fsdp_sharded_checkpoint and cfg.peft.method != "none":
        problems.append("fsdp_sharded_checkpoint=true: a PEFT run saves only its adapter weights, whole; remove it")
    raise_problems(problems, "alignment")


def _validate_online(cfg: AlignConfig, problems: list) -> None:
    """What GRPO, REINFORCE and PPO need, and what they refuse."""
    a = cfg.align
    if not a.reward_fn and not a.reward_model:
        problems.append(f"method={cfg.method} needs a reward: a function (--reward-fn module:function, "
                        f"align.reward_fn) or a reward model (--reward-model PATH, align.reward_model)")
    elif a.reward_fn and a.reward_model:
        problems.append(f"method={cfg.method}: give one reward, --reward-fn ({a.reward_fn}) or --reward-model "
                        f"({a.reward_model}), not both")
    if cfg.method != "ppo" and int(a.num_generations) < 2:
        problems.append(f"align.num_generations={a.num_generations} must be at least 2: advantages compare the "
                        f"completions of one prompt")
    elif int(a.num_generations) < 1:
        problems.append(f"align.num_generations={a.num_generations} must be at least 1")
    if int(a.ppo_epochs) < 1:
        problems.append(f"align.ppo_epochs={a.ppo_epochs} must be at least 1")
    rows = int(cfg.global_batch_size) * int(a.num_generations)
    try:  # each data-parallel rank trains on its share of every mini batch
        dp = parallel_dims(cfg).dp
    except ConfigError:  # a layout that cannot be (an unknown fsdp_sharding_strategy): its own key's check says so
        dp = 1
    if int(a.num_mini_batches) < 1 or rows % int(a.num_mini_batches):
        problems.append(f"align.num_mini_batches={a.num_mini_batches} must divide the rollout's {rows} completions "
                        f"(global_batch_size x align.num_generations) into equal mini batches")
    elif dp > 1 and rows % dp == 0 and (rows // dp) % int(a.num_mini_batches):
        problems.append(f"align.num_mini_batches={a.num_mini_batches} must divide each of the {dp} data-parallel "
                        f"ranks' {rows // dp} completions into equal shares of the mini batches; use a divisor of "
                        f"{rows // dp}")
    if not 0 < float(a.cliprange) < 1:
        problems.append(f"align.cliprange={a.cliprange} must be in (0, 1)")
    if cfg.method == "ppo":
        if not float(a.cliprange_value) > 0:
            problems.append(f"align.cliprange_value={a.cliprange_value} must be above 0")
        if not float(a.vf_coef) > 0:
            problems.append(f"align.vf_coef={a.vf_coef} must be above 0: the critic learns from the value loss")
        if not 0 < float(a.gamma) <= 1 or not 0 <= float(a.lam) <= 1:
            problems.append(f"align.gamma={a.gamma} must be in (0, 1] and align.lam={a.lam} in [0, 1]")
        if a.critic_lr is not None and not float(a.critic_lr) > 0:
            problems.append(f"align.critic_lr={a.critic_lr} must be above 0 (or null: optim.lr)")

    if not (isinstance(a.rollout_compile, bool) or a.rollout_compile == "auto"):
        problems.append(f"align.rollout_compile={a.rollout_compile!r}; use auto (compiled on a CUDA device), true or "
                        f"false")
    if a.rollout_dtype != "auto" and a.rollout_dtype not in ROLLOUT_DTYPE_NAMES:
        problems.append(f"align.rollout_dtype={a.rollout_dtype!r}; use auto (the trainer's compute dtype under mixed "
                        f"precision), float32, bfloat16 or float16")
    if int(a.max_completion_length) < 1:
        problems.append(f"align.max_completion_length={a.max_completion_length} must be at least 1")
    if not 0 < float(a.temperature) <= 2:
        problems.append(f"align.temperature={a.temperature} must be in (0, 2]: rollouts are sampled")
    if cfg.val_data:
        problems.append(f"val_data: method={cfg.method} has no validation pass yet; remove --val-data")
    if cfg.monitor != "val_loss":
        problems.append(f"monitor={cfg.monitor}: method={cfg.method} has no validation metric")
    if cfg.peft.method == "ptuning":
        problems.append(f"method={cfg.method} with --peft ptuning is not supported: use lora, ia3 or adapter")
    if cfg.compile:
        problems.append(f"compile=true with method={cfg.method} is not supported yet (the rollouts run the policy "
                        f"through the serving engine)")


def to_dict(cfg: AlignConfig) -> dict:
    return dataclasses.asdict(cfg)
