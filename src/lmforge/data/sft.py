"""Supervised fine-tuning data: records -> token ids + loss masks -> fixed-length (optionally packed) rows.

Record kinds (one JSON object per line):

* prompt/response: ``{"input": ..., "output": ...}`` (NeMo's SQuAD-style format; field names are
  configurable). With a ``prompt_template`` such as ``"Context: {context}\\nQuestion: {input}\\nAnswer: "``
  the prompt is the template filled from the record's fields.
* chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``
  rendered with the tokenizer's chat template (Jinja, in a sandbox, as transformers renders it).

Loss counts only response tokens (every assistant turn for chat) unless ``train_on_prompt``.
A sample longer than ``max_length`` is truncated at the end or dropped (``truncation``); both are
counted in :class:`SFTStats`. Packing concatenates samples into rows of ``max_length`` with
``segment_ids`` (attention stays within a sample) and ``positions`` restarting at 0 per sample.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

from lmforge.data.jsonl import iter_jsonl
from lmforge.data.prompts import (NotIncremental, assistant_spans, chat_template_of, encode_plain,  # noqa: F401
                                   encode_prompt, render_chat)  # (re-exported)
from lmforge.data.steer import DEFAULT_RANGE, DEFAULT_TEMPLATE, AttributeFormat, problems_of
from lmforge.errors import ConfigError, DataError


@dataclass
class SFTDataConfig:
    """How records become training samples.

    Attributes:
        input_key, output_key: fields of prompt/response records.
        messages_key: field of chat records.
        prompt_template: optional ``str.format`` template over the record's fields for the prompt.
        chat_template: optional Jinja template overriding the tokenizer's own.
        add_bos: None (default): the prompt is encoded by :func:`lmforge.data.prompts.encode_prompt`, the rule
            ``generate``, the server and evaluation use too (BOS as the tokenizer's convention says); True /
            False force the BOS on or off for training alone (the served prompts then differ).
        add_eos: put the tokenizer's EOS after the response (prompt/response records; a chat template places
            its own special tokens).
        train_on_prompt: count the prompt tokens in the loss too.
        truncation: ``truncate`` (cut the end of a long sample) or ``drop`` (skip it).
        pack: pack several samples per row (per-sample attention, restarting positions).
        attributes: SteerLM attribute-conditioned SFT (:mod:`lmforge.data.steer`): the attribute names in the fixed
            order of the attribute string; each record's ``attributes_key`` object gives every one a whole value
            in ``attribute_range``, and the prompt becomes ``attribute_template`` filled with ``{prompt}`` and
            ``{attributes}`` (chat records: its text after ``{prompt}`` follows every assistant turn's generation
            prompt). None: off.
        attributes_key, attribute_range, attribute_template: the record field, the values' range, the template.
    """

    input_key: str = "input"
    output_key: str = "output"
    messages_key: str = "messages"
    prompt_template: Optional[str] = None
    chat_template: Optional[str] = None
    add_bos: Optional[bool] = None
    add_eos: bool = True
    train_on_prompt: bool = False
    truncation: str = "truncate"
    pack: bool = False
    attributes: Optional[List[str]] = None
    attributes_key: str = "attributes"
    attribute_range: List[int] = field(default_factory=lambda: list(DEFAULT_RANGE))
    attribute_template: str = DEFAULT_TEMPLATE

    def attribute_format(self) -> Optional[AttributeFormat]:
        """The SteerLM format of ``attributes`` (None when off)."""
        if not self.attributes:
            return None
        return AttributeFormat.of(self.attributes, self.attribute_range, self.attribute_template)

    def validate(self) -> None:
        if self.attributes is not None:
            problems = problems_of(list(self.attributes), list(self.attribute_range), self.attribute_template, "sft.")
            if problems:
                raise ConfigError(problems[0])
        else:
            for key, default in (("attributes_key", "attributes"), ("attribute_range", list(DEFAULT_RANGE)),
                                 ("attribute_template", DEFAULT_TEMPLATE)):
                if getattr(self, key) != default:
                    raise ConfigError(f"sft.{key} applies to attribute-conditioned SFT: set sft.attributes too")
        if self.truncation not in ("truncate", "drop"):
            raise ConfigError(f"sft.truncation={self.truncation!r} is not known; use truncate or drop")
        if self.prompt_template is not None:
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None]
            except ValueError as e:
                raise ConfigError(f"sft.prompt_template={self.prompt_template!r} is not a valid template: {e}") from e
            if any(not f or not f.isidentifier() for f in fields):
                raise ConfigError(f"sft.prompt_template={self.prompt_template!r}: placeholders must be field names "
                                  f"such as {{input}} (write {{{{ and }}}} for literal braces)")


@dataclass
class SFTSample:
    """One tokenized record: ``ids`` and a 0/1 ``mask`` (1: the token is trained), plus where it came from."""

    ids: list
    mask: list
    source: str
    prompt_text: str = ""
    response_text: str = ""
    prompt_len: int = 0


@dataclass
class SFTStats:
    records: int = 0
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    no_trained_tokens: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self, name: str) -> str:
        return (f"{name}: {self.records} records -> {self.samples} samples in {self.rows} rows "
                f"({self.trained_tokens}/{self.tokens} tokens trained); {self.truncated} truncated, "
                f"{self.dropped} dropped as too long, {self.no_trained_tokens} dropped with no response left")


# -- reading ------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """``[(\"file:line\", record), ...]`` of a JSONL file; a bad line is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give a JSONL file with one record per line")
    out = [(f"{path}:{n}", rec) for n, rec in iter_jsonl(path)]
    if not out:
        raise DataError(f"data file {path} holds no records")
    return out


# -- tokenizing ---------------------------------------------------------------------------------

def _encode_plain(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text`` without the post-processor's special tokens."""
    return encode_plain(tokenizer, text)


def _chat_template(tokenizer, cfg: SFTDataConfig) -> Optional[str]:
    return chat_template_of(tokenizer, cfg.chat_template)


def _field(rec: dict, key: str, where: str, kind: str) -> str:
    if key not in rec:
        raise DataError(f"{where}: the record has no {key!r} field (fields: {sorted(rec)}); set "
                        f"sft.{kind}_key to the field that holds it")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, not {type(value).__name__}")
    return value


def encode_record(rec: dict, where: str, tokenizer, cfg: SFTDataConfig) -> SFTSample:
    """Tokenize one record into ids and a loss mask (see the module doc). Bad records raise DataError."""
    if cfg.messages_key in rec:
        return _encode_chat(rec, where, tokenizer, cfg)
    response = _field(rec, cfg.output_key, where, "output")
    if not response.strip():
        raise DataError(f"{where}: field {cfg.output_key!r} is empty; every record needs a response to learn")
    if cfg.prompt_template is not None:
        try:
            prompt = cfg.prompt_template.format(**rec)
        except KeyError as e:
            raise DataError(f"{where}: sft.prompt_template needs field {e.args[0]!r}, which the record lacks "
                            f"(fields: {sorted(rec)})") from None
    else:
        prompt = _field(rec, cfg.input_key, where, "input")
    fmt = cfg.attribute_format()
    if fmt is not None:  # SteerLM: the attribute string between the prompt and the response
        prompt = fmt.prompt(prompt, _record_values(rec, where, cfg, fmt))
    if cfg.add_bos is None:
        p_ids = encode_prompt(tokenizer, prompt)  # the one rule (generate, serve and evaluate use it too)
    else:
        p_ids = ([tokenizer.bos_id] if cfg.add_bos and tokenizer.bos_id is not None else []) + \
            _encode_plain(tokenizer, prompt)[0]
    r_ids = _encode_plain(tokenizer, response)[0]
    if cfg.add_eos and tokenizer.eod_id is not None:
        r_ids = r_ids + [tokenizer.eod_id]
    mask = [1 if cfg.train_on_prompt else 0] * len(p_ids) + [1] * len(r_ids)
    return SFTSample(p_ids + r_ids, mask, where, prompt, response, len(p_ids))


def _record_values(rec: dict, where: str, cfg: SFTDataConfig, fmt: AttributeFormat) -> dict:
    """A record's checked SteerLM attribute values (``sft.attributes_key``); DataError naming ``where``."""
    if cfg.attributes_key not in rec:
        raise DataError(f"{where}: the record has no {cfg.attributes_key!r} field (fields: {sorted(rec)}); "
                        f"sft.attributes needs each record's attribute values (label them with `lmforge "
                        f"reward ATTRIBUTE_MODEL --data FILE --out LABELLED`)")
    return fmt.values(rec[cfg.attributes_key], where)


def _encode_chat(rec: dict, where: str, tokenizer, cfg: SFTDataConfig) -> SFTSample:
    from jinja2 import TemplateError

    messages = rec[cfg.messages_key]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{where}: {cfg.messages_key!r} must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        f"objects with string values")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: the conversation has no non-empty assistant message to learn")
    template = _chat_template(tokenizer, cfg)
    if not template:
        raise DataError(f"{where}: chat records need a chat template, but the tokenizer "
                        f"{getattr(tokenizer, 'source', '')} has none (no chat_template in tokenizer_config.json, "
                        f"no chat_template.jinja); "
                        f"set sft.chat_template to a Jinja template or use input/output records")
    try:
        # Each assistant turn is the text it adds after the prompt that asks for it.
        text, spans = assistant_spans(template, messages, tokenizer)
    except NotIncremental:
        raise DataError(f"{where}: the chat template does not render conversations incrementally, so the "
                        f"assistant tokens cannot be located; set sft.chat_template to one that does") from None
    except TemplateError as e:
        raise DataError(f"{where}: the chat template failed: {e}") from None
    fmt = cfg.attribute_format()
    if fmt is not None:  # SteerLM: the attribute string before every assistant turn
        text, spans = fmt.condition_chat(text, spans, _record_values(rec, where, cfg, fmt), where)
    ids, offsets = _encode_plain(tokenizer, text)
    mask = []
    for start, end in offsets:
        inside = any(s <= start < e for s, e in spans) and end > start
        mask.append(1 if inside or cfg.train_on_prompt else 0)
    first = mask.index(1) if 1 in mask else len(ids)
    return SFTSample(ids, mask, where, text[:spans[0][0]], text[spans[0][0]:spans[0][1]], first)


def encode_records(records: Sequence[tuple[str, dict]], tokenizer, cfg: SFTDataConfig, max_length: int,
                   stats: Optional[SFTStats] = None) -> list[SFTSample]:
    """Tokenize, then apply the truncation policy to samples longer than ``max_length`` (counted in ``stats``)."""
    cfg.validate()
    stats = stats if stats is not None else SFTStats()
    out = []
    for where, rec in records:
        stats.records += 1
        s = encode_record(rec, where, tokenizer, cfg)
        if len(s.ids) > max_length:
            if cfg.truncation == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            s.ids, s.mask = s.ids[:max_length], s.mask[:max_length]
        if not any(s.mask[1:]):  # the first token is never predicted
            stats.no_trained_tokens += 1
            continue
        out.append(s)
    stats.samples = len(out)
    return out


# -- rows -----------------------------------------------------------------------------------------

@dataclass
class SFTDataset:
    """Rows of ``length`` tokens as dicts of int64 arrays: ``tokens``, ``loss_mask`` and (packed)
    ``positions`` and ``segment_ids``. Unpacked rows hold one sample padded with ``pad_id`` (masked out;
    padding sits after the sample, so causal attention never sees it)."""

    rows: list
    length: int
    packed: bool
    stats: SFTStats = field(default_factory=SFTStats)
    samples: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _row(samples: Sequence[SFTSample], length: int, pad_id: int, packed: bool) -> dict:
    tokens = np.full(length, pad_id, dtype=np.int64)
    mask = np.zeros(length, dtype=np.int64)
    positions = np.zeros(length, dtype=np.int64)
    segments = np.full(length, len(samples), dtype=np.int64)  # padding: a segment of its own
    at = 0
    for k, s in enumerate(samples):
        n = len(s.ids)
        tokens[at:at + n] = s.ids
        mask[at:at + n] = s.mask
        mask[at] = 0  # a sample's first token is never predicted (in a packed row, not from the one before)
        positions[at:at + n] = np.arange(n)
        segments[at:at + n] = k
        at += n
    positions[at:] = np.arange(length - at)
    row = {"tokens": tokens, "loss_mask": mask}
    if packed:
        row["positions"] = positions
        row["segment_ids"] = segments
    return row


def build_sft_dataset(samples: Sequence[SFTSample], length: int, pad_id: int, pack: bool = False, seed: int = 0,
                      shuffle: bool = True, stats: Optional[SFTStats] = None) -> SFTDataset:
    """Arrange samples (each at most ``length`` tokens) into rows; packing is greedy first-fit in shuffled order."""
    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    stats = stats if stats is not None else SFTStats(samples=len(samples))
    groups: list[list[SFTSample]] = []
    if pack:
        free: list[int] = []
        for i in order:
            n = len(samples[i].ids)
            for g, room in enumerate(free):
                if n <= room:
                    groups[g].append(samples[i])
                    free[g] -= n
                    break
            else:
                groups.append([samples[i]])
                free.append(length - n)
    else:
        groups = [[samples[i]] for i in order]
    rows = [_row(g, length, pad_id, pack) for g in groups]
    stats.rows = len(rows)
    stats.tokens = sum(len(s.ids) for s in samples)
    stats.trained_tokens = int(sum(int(r["loss_mask"].sum()) for r in rows))
    return SFTDataset(rows, length, pack, stats, list(samples))


def load_sft_dataset(path: str | Path, tokenizer, cfg: SFTDataConfig, length: int, seed: int = 0,
                     shuffle: bool = True) -> SFTDataset:
    """Read a JSONL file and build its rows of ``length`` tokens (see :func:`build_sft_dataset`)."""
    stats = SFTStats()
    samples = encode_records(read_jsonl(path), tokenizer, cfg, length, stats)
    if not samples:
        raise DataError(f"{path}: no usable sample ({stats.summary(str(path))}); raise the sequence length or "
                        f"use sft.truncation=truncate")
    pad = tokenizer.eod_id if tokenizer.eod_id is not None else 0
    return build_sft_dataset(samples, length, pad, cfg.pack, seed, shuffle, stats)


def preview(path: str | Path, tokenizer, cfg: SFTDataConfig, length: int, count: int = 2, console=None) -> SFTStats:
    """Print the first ``count`` samples with trained tokens highlighted (rich), then the statistics."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    stats = SFTStats()
    samples = encode_records(read_jsonl(path), tokenizer, cfg, length, stats)
    for s in samples[:count]:
        text = Text()
        for tid, m in zip(s.ids, s.mask):
            piece = tokenizer.decode([tid])
            text.append(piece, style="bold black on green" if m else "dim")
        console.rule(f"{s.source}  ({len(s.ids)} tokens, {sum(s.mask)} trained)")
        console.print(text)
    console.rule()
    console.print("[bold black on green]highlighted[/] tokens are trained; [dim]dim[/] ones are context only")
    pad = tokenizer.eod_id if tokenizer.eod_id is not None else 0
    build_sft_dataset(samples, length, pad, cfg.pack, stats=stats)
    console.print(stats.summary(str(path)))
    return stats
