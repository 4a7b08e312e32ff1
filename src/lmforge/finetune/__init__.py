"""Fine-tuning: SFT of all weights or a PEFT method, on prompt/response or chat JSONL data.

``run(cfg)`` is the stage (see :mod:`lmforge.finetune.stage`); ``load_finetune_config`` builds ``cfg``
from a YAML file and dotted overrides. Both are imported on first use (:mod:`lmforge.lazy`), so that
registering the commands (``lmforge --help``) imports no torch.
"""

from lmforge.lazy import lazy_exports

__all__ = ["FinetuneConfig", "load_finetune_config", "run"]
__getattr__, __dir__ = lazy_exports(__name__, {"FinetuneConfig": "lmforge.finetune.config",
                                               "load_finetune_config": "lmforge.finetune.config",
                                               "run": "lmforge.finetune.stage"})
