"""Chat prompts through the tokenizer's own chat template (``transformers.apply_chat_template``).

A tokenizer folder has a template when its ``tokenizer_config.json`` holds ``chat_template`` or the
folder has a ``chat_template.jinja`` file (transformers' two conventions). Without one, chat requests
are refused with a clear message rather than guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lmforge.serve.engine import InvalidRequestError

__all__ = ["ChatTemplate", "load_chat_template", "NoChatTemplateError"]


class NoChatTemplateError(InvalidRequestError):
    """The model's tokenizer has no chat template."""


def _folder_of(tokenizer) -> Optional[Path]:
    source = getattr(tokenizer, "source", None)
    if source is None:
        return None
    p = Path(source)
    return p if p.is_dir() else p.parent


def _has_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False


class ChatTemplate:
    """Render OpenAI-style messages into prompt token ids with a ``transformers`` tokenizer's template."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant's generation prompt.

        Raises:
            InvalidRequestError: the template rejected the messages (an unknown role, say).
        """
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2 errors, the template's own raise_exception(...)
            raise InvalidRequestError(f"the chat template could not render these messages: {e}", "messages") from e
        # The template writes special tokens (BOS...) itself: do not add them again.
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def load_chat_template(tokenizer) -> Optional[ChatTemplate]:
    """The chat template of an lmforge tokenizer (from the folder it was loaded from), or None."""
    hf = getattr(tokenizer, "hf", None)  # an HFAutoTokenizer already wraps a transformers tokenizer
    if hf is not None:
        return ChatTemplate(hf) if getattr(hf, "chat_template", None) else None
    folder = _folder_of(tokenizer)
    if folder is None or not _has_template(folder):
        return None
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return ChatTemplate(hf) if getattr(hf, "chat_template", None) else None
