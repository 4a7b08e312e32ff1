"""Serving: the generation engine (:mod:`.engine`), its async client (:mod:`.client`), the
OpenAI-compatible HTTP server (:mod:`.server`) and the ``serve`` / ``generate`` commands (:mod:`.cli`).

FastAPI and uvicorn are needed for the server only (``pip install lmforge[serve]``).
"""

from lmforge.serve.engine import (Engine, EngineBusyError, InvalidRequestError, PromptTooLongError, RequestOutput,
                                  SamplingParams, SlotKVCache, TokenLogprob)

__all__ = ["Engine", "SamplingParams", "RequestOutput", "TokenLogprob", "SlotKVCache", "InvalidRequestError",
           "PromptTooLongError", "EngineBusyError"]
