"""Alignment: preference optimisation (DPO, IPO, RPO, KTO, ORPO, SimPO) and reward models.

``run(cfg)`` is the stage (:mod:`lmforge.align.stage`), on the training assembly fine-tuning uses;
``load_align_config`` builds ``cfg`` from a YAML file and dotted overrides. Both are imported on first use
(:mod:`lmforge.lazy`), so registering the commands imports no torch.
"""

from lmforge.lazy import lazy_exports

__all__ = ["AlignConfig", "load_align_config", "run"]
__getattr__, __dir__ = lazy_exports(__name__, {"AlignConfig": "lmforge.align.config",
                                               "load_align_config": "lmforge.align.config",
                                               "run": "lmforge.align.stage"})
