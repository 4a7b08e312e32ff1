"""ModelConfig: one schema for every decoder-only family lmforge builds.

Field names follow NeMo's ``model.*`` keys so a NeMo/Megatron config maps across by name.
GPT-2/GPT-3 style: learned_absolute positions, layernorm, gelu, bias=True.
Llama style: rope, rmsnorm, swiglu, bias=False, num_query_groups < num_attention_heads for GQA.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from lmforge.errors import ConfigError

NORMALIZATIONS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")


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
