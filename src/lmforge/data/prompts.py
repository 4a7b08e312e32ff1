"""One rule for a prompt's token ids, used by every path that tokenizes a prompt: fine-tuning data and its
preview (:mod:`lmforge.data.sft`), ``generate``, the server, evaluation. A model fine-tuned on these ids is
then served and evaluated on the same ids.

* A text prompt (:func:`encode_prompt`): the text's tokens without special tokens, after the tokenizer's BOS
  when the tokenizer's own convention puts one there (:func:`adds_bos`): ``add_bos_token`` in its
  ``tokenizer_config.json`` when that says true or false, else what its default call (the post-processor of
  ``tokenizer.json``, or a transformers tokenizer's ``tokenizer(text)``) does. A prompt never ends in EOS.
* A chat prompt (:func:`encode_chat`): the chat template renders the messages (the template writes its own BOS
  and turn markers, as transformers' templates do) and the text is encoded without special tokens.
* The chat template (:func:`chat_template_of`): an explicit one (fine-tuning's ``sft.chat_template``), else the
  tokenizer's: ``chat_template`` in ``tokenizer_config.json`` or ``chat_template.jinja`` beside it (read by
  :func:`lmforge.data.tokenizers.load_tokenizer`), or a transformers tokenizer's own.

Templates render in a Jinja sandbox the way transformers renders them (trim/lstrip blocks, ``tojson``,
``raise_exception``, ``strftime_now``, the special tokens as variables).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Optional

__all__ = ["adds_bos", "encode_plain", "encode_prompt", "chat_template_of", "set_chat_template", "render_chat",
           "encode_chat", "assistant_spans", "NotIncremental"]


def encode_plain(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text`` without any special token."""
    if hasattr(tokenizer, "encode_plain"):  # SentencePiece, tiktoken, k-mer (lmforge.data.tokenizers)
        return tokenizer.encode_plain(text)
    if hasattr(tokenizer, "backend"):
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)
    enc = tokenizer.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's convention starts a text with its BOS (see the module doc)."""
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        return False
    config = getattr(tokenizer, "config", None)
    explicit = config.get("add_bos_token") if isinstance(config, dict) else None
    if explicit is None and hasattr(tokenizer, "hf"):
        explicit = getattr(tokenizer.hf, "add_bos_token", None)
    if isinstance(explicit, bool):
        return explicit
    probe = "a"
    with_special = list(tokenizer.encode(probe))
    return with_special[:1] == [bos] and encode_plain(tokenizer, probe)[0][:1] != [bos]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A text prompt's ids: [BOS if :func:`adds_bos`] + the text's tokens (no EOS)."""
    return ([tokenizer.bos_id] if adds_bos(tokenizer) else []) + encode_plain(tokenizer, text)[0]


def chat_template_of(tokenizer, override: Optional[str] = None) -> Optional[str]:
    """The chat template: ``override``, else the tokenizer's (see the module doc); None when there is none."""
    if override:
        return override
    config = getattr(tokenizer, "config", None)
    if isinstance(config, dict) and config.get("chat_template"):
        t = config["chat_template"]
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((x["template"] for x in t if x.get("name") == "default"), t[0]["template"])
        return t
    hf = getattr(tokenizer, "hf", None)
    return getattr(hf, "chat_template", None) or None


def set_chat_template(tokenizer, template: Optional[str]) -> None:
    """Make ``template`` the tokenizer's own, so that every checkpoint it is saved into carries it
    (``tokenizer_config.json``'s ``chat_template``). None leaves the tokenizer as it is."""
    if not template:
        return
    if isinstance(getattr(tokenizer, "config", None), dict):
        tokenizer.config["chat_template"] = template
    elif hasattr(tokenizer, "hf"):
        tokenizer.hf.chat_template = template


def _special(tokenizer, tid: Optional[int]) -> str:
    return "" if tid is None else (tokenizer.id_to_token(tid) or "")


def _token_variables(tokenizer) -> dict[str, str]:
    """The special tokens a template may name (bos_token, eos_token, unk_token, pad_token)."""
    out = {"bos_token": _special(tokenizer, getattr(tokenizer, "bos_id", None)),
           "eos_token": _special(tokenizer, getattr(tokenizer, "eod_id", None))}
    config = getattr(tokenizer, "config", None)
    hf = getattr(tokenizer, "hf", None)
    for key in ("unk_token", "pad_token"):
        value = config.get(key) if isinstance(config, dict) else getattr(hf, key, None)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def render_chat(template: str, messages: list, tokenizer, add_generation_prompt: bool = False,
                **variables: Any) -> str:
    """Render ``messages`` with a Jinja chat template the way transformers does (sandboxed, trim/lstrip blocks).

    Raises:
        jinja2.TemplateError: the template failed (its own ``raise_exception``, a syntax error...).
    """
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} ... {% endgeneration %}: renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(x, indent=indent,
                                                                                      ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **{**_token_variables(tokenizer), **variables})


def encode_chat(tokenizer, messages: list, template: str) -> list[int]:
    """A chat prompt's ids: ``messages`` rendered with the assistant's generation prompt, encoded without
    special tokens (the template places them)."""
    return encode_plain(tokenizer, render_chat(template, messages, tokenizer, add_generation_prompt=True))[0]


class NotIncremental(ValueError):
    """The chat template does not render a conversation as its prefixes followed by more text."""


def assistant_spans(template: str, messages: list, tokenizer,
                    add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it: the text that turn adds
    after the generation prompt that asks for it (used to train on assistant turns only, and to place SteerLM
    attribute strings before them).

    Raises:
        NotIncremental: the template does not render the conversation up to a turn as a prefix of the whole.
        jinja2.TemplateError: the template failed.
    """
    text = render_chat(template, messages, tokenizer, add_generation_prompt=add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], tokenizer, add_generation_prompt=True)
        upto = render_chat(template, messages[:i + 1], tokenizer)
        if not text.startswith(upto) or not upto.startswith(before):
            raise NotIncremental("the chat template does not render conversations incrementally")
        spans.append((len(before), len(upto)))
    return text, spans
