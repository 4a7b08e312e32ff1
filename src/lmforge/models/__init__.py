"""Model schema, the decoder-only Transformer, its KV cache and the generate loop
(:func:`lmforge.models.generate.generate`).

The names below are imported on first use (:mod:`lmforge.lazy`): :mod:`lmforge.models.config` and
:mod:`lmforge.models.families` (read by the CLI's parsers) import no torch. ``generate`` is not among them:
it is also the name of the submodule, which replaces a lazy attribute once imported.
"""

from lmforge.lazy import lazy_exports

__all__ = ["ModelConfig", "Transformer", "KVCache", "sample_next"]
__getattr__, __dir__ = lazy_exports(__name__, {"ModelConfig": "lmforge.models.config",
                                               "Transformer": "lmforge.models.transformer",
                                               "KVCache": "lmforge.models.transformer",
                                               "sample_next": "lmforge.models.generate"})
