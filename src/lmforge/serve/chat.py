"""Chat prompts through the tokenizer's own chat template, by the one prompt rule of :mod:`lmforge.data.prompts`
(the same ids fine-tuning trained on).

A tokenizer has a template when its ``tokenizer_config.json`` holds ``chat_template`` or its folder has a
``chat_template.jinja`` / ``chat_template.json`` file (transformers' conventions). Without one, chat requests
are refused with a clear message rather than guessed at.

A SteerLM model's conversation gets its attribute line after every assistant turn's generation prompt
(:meth:`ChatTemplate.encode_steered`), as ``generate`` and ``serve`` both build it.
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


    def encode_steered(self, messages, fmt, values: dict, where: str) -> list[int]:
        """The ids of ``messages`` and the generation prompt conditioned on SteerLM ``values`` as fine-tuning
        conditioned chat records (:meth:`lmforge.data.steer.AttributeFormat.condition_chat`): the attribute line
        after the generation prompt of every assistant turn, the history's and the one asking for the answer.

        Raises:
            DataError: naming ``where``: messages that are not role/content objects, or a template that does not
                render conversations incrementally (the places for the attribute lines cannot be found).
        """
        from jinja2 import TemplateError

        from lmforge.data.prompts import NotIncremental, assistant_spans, encode_plain
        from lmforge.errors import DataError

        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
        try:
            text, spans = assistant_spans(self.template, messages, self.tokenizer, add_generation_prompt=True)
        except NotIncremental:
            raise DataError(f"{where}: the chat template does not render conversations incrementally, so the "
                            f"attribute strings cannot be placed") from None
        except TemplateError as e:
            raise DataError(f"{where}: the chat template could not render these messages: {e}") from None
        return encode_plain(self.tokenizer, fmt.condition_chat(text, spans, values, where, at_end=True)[0])[0]


def load_chat_template(tokenizer) -> Optional[ChatTemplate]:
    """The chat template of an lmforge tokenizer, or None when it has none."""
    template = chat_template_of(tokenizer)
    return ChatTemplate(tokenizer, template) if template else None
