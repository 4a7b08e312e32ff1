"""Serving: the generation engine (:mod:`.engine`), its async client (:mod:`.client`), the
OpenAI-compatible HTTP server (:mod:`.server`) and the ``serve`` / ``generate`` commands (:mod:`.cli`).

FastAPI and uvicorn are needed for the server only (``pip install lmforge[serve]``).

The engine's names are imported on first use (:mod:`lmforge.lazy`): registering the commands imports no torch.
"""

from lmforge.lazy import lazy_exports

__all__ = ["Engine", "SamplingParams", "RequestOutput", "RequestMetrics", "TokenLogprob", "PagedKVCache",
           "InvalidRequestError", "PromptTooLongError", "EngineBusyError"]
__getattr__, __dir__ = lazy_exports(__name__, {name: "lmforge.serve.engine" for name in __all__})
