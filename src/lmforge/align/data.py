"""Preference data: JSONL records -> token ids with completion masks -> batches.

Record kinds (one JSON object per line; field names are ``align.*_key`` settings):

* pairs (DPO, IPO, RPO, ORPO, SimPO, reward models): ``{"prompt": ..., "chosen": ..., "rejected": ...}``, and for
  reward models an optional numeric ``"margin"``.
* unpaired (KTO): ``{"prompt": ..., "completion": ..., "label": true|false}``.
* attribute records (SteerLM attribute models, ``regression_rm``): ``{"prompt": ..., "response": ...,
  "attributes": {"quality": 4, ...}}`` or ``{"messages": [...], "attributes": ...}`` ending with the response;
  an attribute left out (or null) is unlabelled (:func:`load_attributes`).

A prompt is text (encoded by the one prompt rule, :func:`lmforge.data.prompts.encode_prompt`) or a list of chat
messages rendered with the chat template (``align.chat_template``, else the tokenizer's); a completion is text, or
with a chat prompt a list of assistant messages (a text completion is one assistant message). Text completions end
with the tokenizer's EOS (a chat template places its own end-of-turn tokens); reward models score the last token,
so their completions get none. Only completion tokens count (the prompt is masked).

Every problem with a record (a missing field, a wrong type, chosen identical to rejected) is a
:class:`~lmforge.errors.DataError` naming ``file:line``, raised before any training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from lmforge.data.prompts import chat_template_of, encode_plain, encode_prompt, render_chat
from lmforge.data.sft import read_jsonl
from lmforge.errors import DataError


@dataclass
class Side:
    """A prompt and one completion as ids; ``mask`` is 1 on completion tokens."""

    ids: list
    mask: list


@dataclass
class AlignStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self, name: str) -> str:
        return (f"{name}: {self.records} records -> {self.examples} examples; {self.truncated} truncated, "
                f"{self.dropped} dropped with no completion token left within the sequence length")


def _messages(value, where: str, key: str) -> list:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise DataError(f"{where}: field {key!r} must be text or a non-empty list of {{\"role\": ..., "
                        f"\"content\": ...}} messages with string values")
    return value


def _get(rec: dict, key: str, where: str, setting: str):
    if key not in rec:
        raise DataError(f"{where}: the record has no {key!r} field (fields: {sorted(rec)}); set align.{setting} to "
                        f"the field that holds it")
    value = rec[key]
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}: field {key!r} must be text or a list of chat messages, not "
                        f"{type(value).__name__}")
    if isinstance(value, str) and setting != "prompt_key" and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


class Encoder:
    """Turns (prompt, completion) into ids and a completion mask (see the module doc)."""

    def __init__(self, tokenizer, chat_template: Optional[str], add_eos: bool, max_length: int):
        self.tok, self.template, self.add_eos, self.max_length = tokenizer, chat_template, add_eos, max_length

    def prompt_ids(self, prompt, where: str) -> tuple[list, Optional[str]]:
        """(ids, rendered chat prompt or None for a text prompt)."""
        if isinstance(prompt, str):
            return encode_prompt(self.tok, prompt), None
        messages = _messages(prompt, where, "prompt")
        template = chat_template_of(self.tok, self.template)
        if not template:
            raise DataError(f"{where}: chat prompts need a chat template, but the tokenizer has none; set "
                            f"align.chat_template to a Jinja template or give text prompts")
        text = self._render(template, messages, where, add_generation_prompt=True)
        return encode_plain(self.tok, text)[0], text

    def _render(self, template, messages, where, add_generation_prompt=False) -> str:
        from jinja2 import TemplateError

        try:
            return render_chat(template, messages, self.tok, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise DataError(f"{where}: the chat template failed: {e}") from None

    def completion_ids(self, prompt, completion, rendered: Optional[str], where: str, key: str) -> list:
        if rendered is None:  # a text prompt: the completion is text
            if not isinstance(completion, str):
                raise DataError(f"{where}: field {key!r} is a list of messages but the prompt is text; give both as "
                                f"text or both as chat messages")
            ids = encode_plain(self.tok, completion)[0]
            return ids + ([self.tok.eod_id] if self.add_eos and self.tok.eod_id is not None else [])
        turns = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else \
            _messages(completion, where, key)
        template = chat_template_of(self.tok, self.template)
        full = self._render(template, list(prompt) + turns, where)
        if not full.startswith(rendered):
            raise DataError(f"{where}: the chat template does not render the conversation as the prompt followed by "
                            f"the {key!r} turn, so the completion cannot be located; set align.chat_template to one "
                            f"that does")
        return encode_plain(self.tok, full[len(rendered):])[0]

    def side(self, p_ids: list, c_ids: list, stats: AlignStats) -> Optional[Side]:
        """Prompt + completion within ``max_length`` tokens (the end cut off); None when no completion token fits."""
        ids, mask = p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)
        if len(ids) > self.max_length:
            stats.truncated += 1
            ids, mask = ids[:self.max_length], mask[:self.max_length]
        if not any(mask[1:]):
            return None
        return Side(ids, mask)


def _pad(rows: list, pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def mask_targets(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The log-probabilities to read from rows ``tokens`` (N, T) whose completion tokens ``mask`` marks: a (3, M)
    int64 tensor of, per counted token ``t >= 1`` of row ``n`` (row-major order), the index ``n * (T-1) + t-1`` of
    the hidden state that predicts it among the rows' ``(N, T-1)`` inputs' hidden states, its id, and ``n``.
    On the host in ``collate``; on a device it waits for the device (the number of tokens is read back)."""
    rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)
    T = tokens.shape[1]
    return torch.stack([rows * (T - 1) + cols, tokens[rows, cols + 1], rows])


#: ``part`` of a shared-prompt row's tokens: prompt (and padding), chosen completion, rejected completion
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def shared_row_visibility(part: torch.Tensor) -> torch.Tensor:
    """The (B, L, L) bool attention mask of shared-prompt rows whose tokens are ``part`` (B, L): every key the
    causal mask allows, except that rejected tokens do not see chosen ones (the model adds causality)."""
    return ~((part == REJECTED)[:, :, None] & (part == CHOSEN)[:, None, :])


@dataclass
class PairDataset:
    """Preference pairs. Item ``i``: chosen and rejected :class:`Side`, its global ``index`` (the row of the
    precomputed reference table) and an optional margin. ``collate`` pads a micro batch to its longest row.

    Two batch layouts (``shared_prompt``), both read by :mod:`lmforge.align.objective`:

    * two rows per pair (default): ``tokens``/``mask`` (B, 2, T), chosen then rejected, each prompt + completion
      right-padded; ``lengths`` (B, 2) their lengths.
    * one row per pair (``shared_prompt=True``): ``tokens`` (B, L) = ``[prompt | chosen | rejected]`` (the prompt
      once), right-padded; ``positions`` (B, L): ``0..P-1`` for the prompt, ``P..`` for the chosen completion and
      again ``P..`` for the rejected one, which restarts where the chosen began; ``part`` (B, L) uint8: which
      part each token is (:data:`PROMPT`, :data:`CHOSEN`, :data:`REJECTED`; padding counts as prompt and comes
      last); ``ends`` (B, 2): where the chosen and the rejected completion end in the row. With attention that
      keeps rejected tokens from seeing chosen ones, every completion token sees what it sees in its own row:
      ``rows_gather`` (2B, T2) / ``rows_scatter`` (B, L-1) (:class:`lmforge.models.transformer.AttentionRows`)
      run it as causal attention over ``[prompt | chosen]`` and ``[prompt | rejected]`` rows gathered from the
      inputs (the model's other layers see the shared row).

    Both carry ``targets`` (3, M) (:func:`mask_targets`; for shared rows the rejected completion's first token is
    read from the prompt's last hidden state, as the chosen one's is), so the head runs on completion tokens
    only and nothing waits for the device; its rows ``0..B-1`` are the chosen completions, ``B..2B-1`` the
    rejected ones.
    """

    chosen: list
    rejected: list
    margins: list
    pad_id: int
    offset: int = 0
    stats: AlignStats = field(default_factory=AlignStats)
    shared_prompt: bool = False

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict:
        return {"sides": (self.chosen[i], self.rejected[i]), "index": self.offset + i, "margin": self.margins[i]}

    def collate(self, items: list) -> dict:
        batch = self._shared(items) if self.shared_prompt else self._two_rows(items)
        batch["index"] = torch.tensor([it["index"] for it in items])
        if any(it["margin"] is not None for it in items):
            batch["margin"] = torch.tensor([float(it["margin"] or 0.0) for it in items])
        return batch

    def _two_rows(self, items: list) -> dict:
        sides = [s for it in items for s in it["sides"]]  # c0, r0, c1, r1, ...
        tokens, mask = _pad([s.ids for s in sides], self.pad_id), _pad([s.mask for s in sides], 0)
        B = len(items)
        tokens, mask = tokens.view(B, 2, -1), mask.view(B, 2, -1)
        return {"tokens": tokens, "mask": mask, "lengths": torch.tensor([len(s.ids) for s in sides]).view(B, 2),
                "targets": mask_targets(torch.cat([tokens[:, 0], tokens[:, 1]]), torch.cat([mask[:, 0], mask[:, 1]]))}

    def _shared(self, items: list) -> dict:
        B = len(items)
        rows, pos, parts, ends, prompts = [], [], [], [], []
        src, ids, seq = [[], []], [[], []], [[], []]  # per side: chosen targets first, then rejected ones
        for b, it in enumerate(items):
            c, r = it["sides"]
            P = c.mask.index(1)  # both sides hold the whole prompt (a side whose prompt fills the length is dropped)
            if r.mask.index(1) != P or c.ids[:P] != r.ids[:P]:
                raise ValueError("a pair's chosen and rejected rows do not begin with the same prompt")
            Rc, Rr = len(c.ids) - P, len(r.ids) - P
            row = c.ids + r.ids[P:]
            rows.append(row)
            pos.append(list(range(P + Rc)) + list(range(P, P + Rr)))
            parts.append([PROMPT] * P + [CHOSEN] * Rc + [REJECTED] * Rr)
            ends.append((P + Rc, P + Rc + Rr))
            prompts.append(P)
            for t in range(max(P, 1), P + Rc):  # chosen token t is read from hidden state t-1
                src[0].append((b, t - 1))
                ids[0].append(row[t])
                seq[0].append(b)
            for k in range(Rr):  # rejected token k (at P+Rc+k) follows the prompt's last token, then its own
                if P + k == 0:
                    continue
                src[1].append((b, P - 1 if k == 0 else P + Rc + k - 1))
                ids[1].append(row[P + Rc + k])
                seq[1].append(B + b)
        tokens = _pad(rows, self.pad_id)
        L = tokens.shape[1]
        W = L - 1  # the inputs' width (the last column is only ever a label)
        flat = [bb * W + t for side in src for bb, t in side]
        targets = torch.tensor([flat, ids[0] + ids[1], seq[0] + seq[1]], dtype=torch.int64).view(3, -1)
        # Attention as two causal rows per pair ([prompt | chosen], [prompt | rejected]) gathered from the inputs
        # (lmforge.models.transformer.AttentionRows): the same attention as the mask `part` describes, with flash.
        gather, scatter = [], np.zeros((B, W), dtype=np.int64)
        for b, ((pc, pr), P) in enumerate(zip(ends, prompts)):
            gather.append([b * W + t for t in range(min(pc, W))])
            gather.append([b * W + t for t in range(P)] + [b * W + t for t in range(pc, min(pr, W))])
        T2 = max(len(g) for g in gather)
        gather = [g + [g[-1]] * (T2 - len(g)) for g in gather]  # a row's tail repeats its last token (unseen)
        gather = [gather[2 * b] for b in range(B)] + [gather[2 * b + 1] for b in range(B)]  # chosen rows first
        for b, ((pc, pr), P) in enumerate(zip(ends, prompts)):
            scatter[b, :min(pc, W)] = b * T2 + np.arange(min(pc, W))
            scatter[b, pc:min(pr, W)] = (B + b) * T2 + P + np.arange(min(pr, W) - pc)
        return {"tokens": tokens, "positions": _pad(pos, 0), "part": _pad(parts, PROMPT).to(torch.uint8),
                "ends": torch.tensor(ends, dtype=torch.int64), "targets": targets,
                "rows_gather": torch.tensor(gather, dtype=torch.int64), "rows_scatter": torch.from_numpy(scatter)}


@dataclass
class UnpairedDataset:
    """KTO's examples: a completion, its label, and a mismatched ``kl`` side (this prompt with the next record's
    completion) for the reference point's KL estimate."""

    sides: list
    labels: list
    kl_sides: list
    pad_id: int
    offset: int = 0
    stats: AlignStats = field(default_factory=AlignStats)

    def __len__(self) -> int:
        return len(self.sides)

    def __getitem__(self, i: int) -> dict:
        return {"side": self.sides[i], "label": self.labels[i], "kl": self.kl_sides[i], "index": self.offset + i}

    def collate(self, items: list) -> dict:
        return {"tokens": _pad([it["side"].ids for it in items], self.pad_id),
                "mask": _pad([it["side"].mask for it in items], 0),
                "label": torch.tensor([int(it["label"]) for it in items]),
                "kl_tokens": _pad([it["kl"].ids for it in items], self.pad_id),
                "kl_mask": _pad([it["kl"].mask for it in items], 0),
                "index": torch.tensor([it["index"] for it in items])}


def load_pairs(path, tokenizer, keys, chat_template: Optional[str], max_length: int, add_eos: bool = True,
               offset: int = 0, margin_key: Optional[str] = None) -> PairDataset:
    """Read preference pairs (see the module doc). ``keys`` holds ``prompt_key``, ``chosen_key``, ``rejected_key``."""
    enc, stats = Encoder(tokenizer, chat_template, add_eos, max_length), AlignStats()
    chosen, rejected, margins = [], [], []
    for where, rec in read_jsonl(path):
        stats.records += 1
        prompt = _get(rec, keys.prompt_key, where, "prompt_key")
        c = _get(rec, keys.chosen_key, where, "chosen_key")
        r = _get(rec, keys.rejected_key, where, "rejected_key")
        if c == r:
            raise DataError(f"{where}: {keys.chosen_key!r} and {keys.rejected_key!r} are identical, so the pair "
                            f"prefers nothing; remove the record or fix one side")
        margin = None
        if margin_key and margin_key in rec:
            margin = rec[margin_key]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                raise DataError(f"{where}: field {margin_key!r} must be a number, not {type(margin).__name__}")
        p_ids, rendered = enc.prompt_ids(prompt, where)
        sc = enc.side(p_ids, enc.completion_ids(prompt, c, rendered, where, keys.chosen_key), stats)
        sr = enc.side(p_ids, enc.completion_ids(prompt, r, rendered, where, keys.rejected_key), stats)
        if sc is None or sr is None:
            stats.dropped += 1
            continue
        if sc.ids == sr.ids:
            raise DataError(f"{where}: {keys.chosen_key!r} and {keys.rejected_key!r} are the same tokens within "
                            f"the sequence length, so the pair prefers nothing; raise seq_length or fix the record")
        chosen.append(sc)
        rejected.append(sr)
        margins.append(margin)
    stats.examples = len(chosen)
    if not chosen:
        raise DataError(f"{path}: no usable pair ({stats.summary(str(path))}); raise seq_length")
    pad = tokenizer.eod_id if tokenizer.eod_id is not None else 0
    return PairDataset(chosen, rejected, margins, pad, offset, stats)


def load_unpaired(path, tokenizer, keys, chat_template: Optional[str], max_length: int,
                  offset: int = 0) -> UnpairedDataset:
    """Read KTO's ``{"prompt", "completion", "label"}`` records (``label`` true: desirable)."""
    enc, stats = Encoder(tokenizer, chat_template, True, max_length), AlignStats()
    prompts, completions, labels = [], [], []
    for where, rec in read_jsonl(path):
        stats.records += 1
        prompt = _get(rec, keys.prompt_key, where, "prompt_key")
        completion = _get(rec, keys.completion_key, where, "completion_key")
        if keys.label_key not in rec:
            raise DataError(f"{where}: the record has no {keys.label_key!r} field (fields: {sorted(rec)}); set "
                            f"align.label_key to the field that holds it")
        label = rec[keys.label_key]
        if not isinstance(label, bool):
            raise DataError(f"{where}: field {keys.label_key!r} must be true (desirable) or false (undesirable), not "
                            f"{json_repr(label)}")
        p_ids, rendered = enc.prompt_ids(prompt, where)
        c_ids = enc.completion_ids(prompt, completion, rendered, where, keys.completion_key)
        prompts.append(p_ids)
        completions.append(c_ids)
        labels.append(label)
    sides, kept_labels, kl = [], [], []
    n = len(prompts)
    for i in range(n):
        s = enc.side(prompts[i], completions[i], stats)
        k = enc.side(prompts[i], completions[(i + 1) % n], stats)  # a completion written for another prompt
        if s is None or k is None:
            stats.dropped += 1
            continue
        sides.append(s)
        kept_labels.append(labels[i])
        kl.append(k)
    stats.examples = len(sides)
    if not sides:
        raise DataError(f"{path}: no usable example ({stats.summary(str(path))}); raise seq_length")
    pad = tokenizer.eod_id if tokenizer.eod_id is not None else 0
    return UnpairedDataset(sides, kept_labels, kl, pad, offset, stats)


def json_repr(value) -> str:
    import json

    return json.dumps(value)


# -- SteerLM attribute models (method=regression_rm) ------------------------------------------------------------

def attribute_input(rec: dict, where: str, enc: Encoder, keys) -> list:
    """The ids an attribute model scores for a record: prompt + response (``align.prompt_key`` /
    ``align.response_key``; text or chat messages), or a ``messages`` conversation whose last message is the
    assistant's response. No EOS: the model reads the last token."""
    if keys.prompt_key in rec:
        prompt = _get(rec, keys.prompt_key, where, "prompt_key")
        response = _get(rec, keys.response_key, where, "response_key")
        p_ids, rendered = enc.prompt_ids(prompt, where)
        return p_ids + enc.completion_ids(prompt, response, rendered, where, keys.response_key)
    if "messages" in rec:
        messages = _messages(rec["messages"], where, "messages")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must end with the assistant's response after at least one other "
                            f"message")
        p_ids, rendered = enc.prompt_ids(messages[:-1], where)
        return p_ids + enc.completion_ids(messages[:-1], messages[-1:], rendered, where, "messages")
    raise DataError(f"{where}: the record has neither {keys.prompt_key!r} (with {keys.response_key!r}) nor "
                    f"'messages' (fields: {sorted(rec)}); set align.prompt_key / align.response_key")


def attribute_labels(rec: dict, where: str, fmt, key: str) -> list:
    """A record's labels in the format's order: a number per labelled attribute, NaN for one not labelled
    (absent or null: masked out of the loss). Unknown names, non-numbers, values out of range and a record with
    no label at all are DataErrors naming ``where``."""
    if key not in rec:
        raise DataError(f"{where}: the record has no {key!r} field (fields: {sorted(rec)}); give its labels as "
                        f"{{\"{fmt.names[0]}\": {fmt.high}, ...}} or set align.attributes_key")
    given = rec[key]
    if not isinstance(given, dict):
        raise DataError(f"{where}: field {key!r} must be an object of attribute values, not {type(given).__name__}")
    for name, value in given.items():
        if value is not None:
            fmt.check_value(name, value, where)
        elif name not in fmt.names:
            fmt.check_value(name, 0, where)  # names the unknown attribute
    labels = [float("nan") if given.get(n) is None else float(given[n]) for n in fmt.names]
    if all(v != v for v in labels):
        raise DataError(f"{where}: no attribute is labelled; give at least one of {', '.join(fmt.names)}")
    return labels


@dataclass
class AttributeDataset:
    """Attribute-model examples: ``ids`` (prompt + response) and ``labels`` (one per attribute, NaN: unlabelled).
    ``collate`` pads a micro batch and gives ``labels`` (0 where unlabelled) with their 0/1 ``mask``."""

    ids: list
    labels: list
    pad_id: int
    stats: AlignStats = field(default_factory=AlignStats)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"ids": self.ids[i], "labels": self.labels[i]}

    def collate(self, items: list) -> dict:
        labels = torch.tensor([it["labels"] for it in items], dtype=torch.float32)
        mask = ~torch.isnan(labels)
        return {"tokens": _pad([it["ids"] for it in items], self.pad_id),
                "lengths": torch.tensor([len(it["ids"]) for it in items]),
                "labels": torch.where(mask, labels, torch.zeros_like(labels)), "mask": mask.float()}


def load_attributes(path, tokenizer, keys, chat_template: Optional[str], max_length: int) -> AttributeDataset:
    """Read ``{"prompt", "response", "attributes": {...}}`` records (or ``messages`` ending with the response) for
    an attribute model; ``keys`` is the ``align`` section (field names, ``attributes``, ``attribute_range``)."""
    from lmforge.data.steer import AttributeFormat

    fmt = AttributeFormat.of(keys.attributes, keys.attribute_range)
    enc, stats = Encoder(tokenizer, chat_template, False, max_length), AlignStats()
    ids, labels = [], []
    for where, rec in read_jsonl(path):
        stats.records += 1
        row_labels = attribute_labels(rec, where, fmt, keys.attributes_key)
        row = attribute_input(rec, where, enc, keys)
        if len(row) > max_length:  # cut at the end, as reward-model pairs are: the last kept token is read
            stats.truncated += 1
            row = row[:max_length]
        ids.append(row)
        labels.append(row_labels)
    stats.examples = len(ids)
    pad = tokenizer.eod_id if tokenizer.eod_id is not None else 0
    return AttributeDataset(ids, labels, pad, stats)

