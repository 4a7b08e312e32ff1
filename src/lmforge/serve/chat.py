"""Chat prompts through the tokenizer's own chat template, by the one prompt rule of :mod:`lmforge.data.prompts`
(the same ids fine-tuning trained on).

A tokenizer has a template when its ``tokenizer_config.json`` holds ``chat_template`` or its folder has a
``chat_template.jinja`` / ``chat_template.json`` file (transformers' conventions). Without one, chat requests
are refused with a clear message rather than guessed at.
"""

from __future__ import annotations

from typing import Any, Optional

from lmforge.data.prompts import chat_template_of, encode_chat
from lmforge.serve.engine import InvalidRequestError

__all__ = ["ChatTemplate", "load_chat_template", "NoChatTemplateError"]


class NoChatTemplateError(InvalidRequestError):
    """The model's tokenizer has no chat template."""


class ChatTemplate:
    """Render OpenAI-style messages into prompt token ids with a tokenizer's chat template."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant's generation prompt
        (:func:`lmforge.data.prompts.encode_chat`).

        Raises:
            InvalidRequestError: the template rejected the messages (an unknown role, say).
        """
        try:
            return encode_chat(self.tokenizer, messages, self.template)
        except Exception as e:  # jinja2 errors, the template's own raise_exception(...)
            raise InvalidRequestError(f"the chat template could not render these messages: {e}", "messages") from e


def load_chat_template(tokenizer) -> Optional[ChatTemplate]:
    """The chat template of an lmforge tokenizer, or None when it has none."""
    template = chat_template_of(tokenizer)
    return ChatTemplate(tokenizer, template) if template else None
