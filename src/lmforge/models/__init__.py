"""Model schema, the decoder-only Transformer, its KV cache and the generate loop."""

from lmforge.models.config import ModelConfig
from lmforge.models.generate import generate, sample_next
from lmforge.models.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache", "generate", "sample_next"]
