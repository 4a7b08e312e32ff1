"""Checkpoint conversion: Hugging Face folders <-> lmforge checkpoints, and NeMo 1.x (.nemo) import.

The names below are imported on first use (:mod:`lmforge.lazy`): ``lmforge convert --help`` needs no torch.
"""

from lmforge.lazy import lazy_exports

__all__ = ["convert", "detect_format", "load_hf_model", "open_source"]
__getattr__, __dir__ = lazy_exports(__name__, {name: "lmforge.convert.hf" for name in __all__})
