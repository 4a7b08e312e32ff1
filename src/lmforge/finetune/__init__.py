"""Fine-tuning: SFT of all weights or a PEFT method, on prompt/response or chat JSONL data.

``run(cfg)`` is the stage (see :mod:`lmforge.finetune.stage`); ``load_finetune_config`` builds ``cfg``
from a YAML file and dotted overrides.
"""

from lmforge.finetune.config import FinetuneConfig, load_finetune_config
from lmforge.finetune.stage import run

__all__ = ["FinetuneConfig", "load_finetune_config", "run"]
