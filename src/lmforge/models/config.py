"""ModelConfig: one schema for every decoder-only family lmforge builds.

Field names follow NeMo's ``model.*`` keys so a NeMo/Megatron config maps across by name.
GPT-2/GPT-3 style: learned_absolute positions, layernorm, gelu, bias=True.
Llama style: rope, rmsnorm, swiglu, bias=False, num_query_groups < num_attention_heads for GQA.

The fields after ``attention_dropout`` switch on mechanisms other families need (each is read in one
place of :mod:`lmforge.models.transformer`); their defaults leave a GPT/Llama model unchanged:
QKV-only biases (Qwen2), sliding windows per layer (Mistral, StarCoder2, Gemma 2), norm weights
stored as ``w - 1`` (Gemma, Nemotron), embedding scaling (Gemma), logit soft-capping (Gemma 2),
parallel attention + MLP (Falcon), mixture of experts (Mixtral), partial rotary (Nemotron), RoPE
scaling (Llama 3.1), a row-normalised output head (Baichuan2's NormHead).
:mod:`lmforge.models.families` says which family sets which.

Positions: ``learned_absolute`` (a table added to the embeddings), ``rope`` (queries and keys rotated) or
``alibi`` (no position parameters: each head adds ``slope_h * (j - i)`` to the score of query i and key j,
slopes from :func:`lmforge.models.transformer.alibi_slopes`, times ``alibi_slope_scale``; Falcon-RW,
BLOOM-style models, Baichuan2-13B).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from lmforge.errors import ConfigError

NORMALIZATIONS = ("layernorm", "rmsnorm")
# gelu: exact (erf); gelu_tanh: tanh approximation (GPT-2's gelu_new); squared_relu: relu(x)^2 (Nemotron);
# swiglu / geglu: gated MLPs, silu(gate) * up / gelu_tanh(gate) * up.
ACTIVATIONS = ("gelu", "gelu_tanh", "squared_relu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "alibi")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_attention_heads: int = 12
    num_query_groups: Optional[int] = None  # None: = num_attention_heads (multi-head attention)
    ffn_hidden_size: int = 3072
    max_position_embeddings: int = 2048
    kv_channels: Optional[int] = None  # head dim; None: hidden_size // num_attention_heads
    normalization: str = "layernorm"
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    share_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # -- mechanisms of other families (defaults: off) --
    qkv_bias: Optional[bool] = None  # biases on q/k/v projections; None: = bias (Qwen2: True with bias=False)
    layernorm_bias: Optional[bool] = None  # LayerNorm bias; None: = bias (Falcon, Nemotron: True with bias=False)
    norm_offset: float = 0.0  # norms scale by (offset + weight): 1.0 for Gemma's RMSNorm and Nemotron's LayerNorm1P
    embedding_multiplier: Optional[float] = None  # input embeddings times this (Gemma: sqrt(hidden_size))
    attention_scale: Optional[float] = None  # softmax scale; None: 1/sqrt(kv_channels) (Gemma 2: query_pre_attn_scalar**-0.5)
    attn_logit_softcapping: Optional[float] = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: Optional[float] = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    sliding_window: Optional[int] = None  # a token sees itself and the sliding_window - 1 tokens before it
    layer_types: Optional[list] = None  # per layer "full_attention" | "sliding_attention"; None: all sliding when
    #                                     sliding_window is set (Gemma 2 alternates, Qwen2 limits it to some layers)
    sandwich_norm: bool = False  # extra norms on the attention and MLP outputs before the residual add (Gemma 2)
    parallel_attn_mlp: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (Falcon, GPT-J style)
    shared_input_norm: bool = False  # parallel blocks only: one norm feeds attention and MLP (Falcon-7B)
    num_moe_experts: Optional[int] = None  # mixture of experts MLP with this many experts (Mixtral)
    moe_router_topk: int = 2  # experts per token
    moe_aux_loss_coeff: float = 0.0  # router load-balancing loss weight in training (0: off; Mixtral: 0.02)
    rotary_percent: float = 1.0  # fraction of each head rotated by RoPE (Nemotron: 0.5)
    rope_scaling: Optional[dict] = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...} (Llama 3.1)
    alibi_slope_scale: float = 1.0  # alibi only: the slopes times this. The bias is added to the scaled scores
    #                                 (Baichuan2-13B, BLOOM); Falcon-RW adds it before the 1/sqrt(kv_channels)
    #                                 softmax scale, which is the same as slopes times 1/sqrt(kv_channels)
    alibi_bf16_bias: bool = False  # alibi only: the bias as HF's BLOOM/Falcon build it (bf16 slopes times the
    #                                absolute key position, rounded to bf16): Falcon-RW's own convention
    normalize_output_head: bool = False  # the output head's rows are L2-normalised at every use, in training
    #                                      too (Baichuan2's NormHead); read by Transformer.output_weight

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                                  f"{self.num_attention_heads}; pick a divisor or set model.kv_channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        self.validate()

    @property
    def head_dim(self) -> int:
        return int(self.kv_channels)

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that RoPE rotates (even)."""
        return int(self.head_dim * self.rotary_percent) // 2 * 2

    @property
    def gated(self) -> bool:
        """True for the gated MLPs (swiglu, geglu), which have a gate_proj."""
        return self.activation in GATED_ACTIVATIONS

    def window_for_layer(self, layer_idx: int) -> Optional[int]:
        """The sliding window of layer ``layer_idx`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return int(self.sliding_window)

    def validate(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                     "max_position_embeddings", "num_query_groups", "kv_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"model.{name}={value!r} must be a positive integer")
        if not problems:
            if self.num_attention_heads % self.num_query_groups:
                problems.append(f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                                f"model.num_query_groups={self.num_query_groups}")
            if self.position_embedding_type == "rope" and self.kv_channels % 2:
                problems.append(f"rope needs an even head size; kv_channels={self.kv_channels}")
            if self.layer_types is not None:
                if not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.num_layers:
                    problems.append(f"model.layer_types must list one entry per layer ({self.num_layers}); "
                                    f"got {self.layer_types!r}")
                else:
                    bad = [t for t in self.layer_types if t not in LAYER_TYPES]
                    if bad:
                        problems.append(f"model.layer_types has {bad[0]!r}; use {' or '.join(LAYER_TYPES)}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            problems.append(f"model.sliding_window={self.sliding_window!r} must be a positive integer or null")
        if self.num_moe_experts is not None:
            if not isinstance(self.num_moe_experts, int) or self.num_moe_experts < 1:
                problems.append(f"model.num_moe_experts={self.num_moe_experts!r} must be a positive integer or null")
            elif not 1 <= int(self.moe_router_topk) <= self.num_moe_experts:
                problems.append(f"model.moe_router_topk={self.moe_router_topk!r} must be in 1..num_moe_experts="
                                f"{self.num_moe_experts}")
            elif not self.gated:
                problems.append(f"model.num_moe_experts needs a gated activation (swiglu or geglu), "
                                f"not {self.activation!r}")
        if not float(self.moe_aux_loss_coeff) >= 0.0:
            problems.append(f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff!r} must be >= 0")
        if not 0.0 < float(self.rotary_percent) <= 1.0:
            problems.append(f"model.rotary_percent={self.rotary_percent!r} must be in (0, 1]")
        if self.position_embedding_type == "alibi":
            # Fields of rotary positions mean nothing here; a set one is a mistake (say which).
            for name, default in (("rope_scaling", None), ("rotary_percent", 1.0), ("rotary_base", 10000.0)):
                if getattr(self, name) != default:
                    problems.append(f"model.{name}={getattr(self, name)!r} is a rotary setting but "
                                    f"position_embedding_type=alibi; remove it (or use position_embedding_type=rope)")
        else:
            for name, default in (("alibi_slope_scale", 1.0), ("alibi_bf16_bias", False)):
                if getattr(self, name) != default:
                    problems.append(f"model.{name}={getattr(self, name)!r} needs position_embedding_type=alibi "
                                    f"(it is {self.position_embedding_type!r}); remove it")
        if not float(self.alibi_slope_scale) > 0:
            problems.append(f"model.alibi_slope_scale={self.alibi_slope_scale!r} must be > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict) else None
            if kind not in ROPE_SCALING_TYPES:
                problems.append(f"model.rope_scaling={self.rope_scaling!r}: rope_type must be one of "
                                f"{', '.join(ROPE_SCALING_TYPES)}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "embedding_multiplier", "attention_scale"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                problems.append(f"model.{name}={value!r} must be > 0 or null")
        if self.shared_input_norm and not self.parallel_attn_mlp:
            problems.append("model.shared_input_norm needs model.parallel_attn_mlp=true")
        if self.sandwich_norm and self.parallel_attn_mlp:
            problems.append("model.sandwich_norm and model.parallel_attn_mlp cannot be combined")
        for name, choices in (("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS),
                              ("position_embedding_type", POSITION_EMBEDDINGS)):
            if getattr(self, name) not in choices:
                problems.append(f"model.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                problems.append(f"model.{name}={value!r} must be in [0, 1)")
        if not float(self.init_method_std) > 0:
            problems.append(f"model.init_method_std={self.init_method_std!r} must be > 0")
        if problems:
            raise ConfigError("invalid model config:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown model field(s) {', '.join(hints)}; known fields: {', '.join(sorted(known))}")
        return cls(**data)
