"""Checkpoint conversion: Hugging Face folders <-> lmforge checkpoints, and NeMo 1.x (.nemo) import."""

from lmforge.convert.hf import convert, detect_format, load_hf_model, open_source

__all__ = ["convert", "detect_format", "load_hf_model", "open_source"]
