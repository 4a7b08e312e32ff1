"""Generation metrics on validation data: exact match and token F1 after SQuAD's answer normalisation
(lower case, no punctuation, no articles a/an/the, single spaces), as NeMo's SQuAD fine-tuning reports."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import torch

from lmforge.models.transformer import KVCache

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_continue(model, prompt: Sequence[int], max_new_tokens: int, eod_id=None, autocast=None,
                    dtype=None) -> list[int]:
    """Greedy tokens after ``prompt`` with a KV cache; works for plain and p-tuned models."""
    import contextlib

    cfg = model.cfg
    extra = int(getattr(model, "num_virtual_tokens", 0))
    room = cfg.max_position_embeddings - extra - len(prompt)
    steps = max(0, min(max_new_tokens, room))
    if steps == 0:
        return []
    param = next(model.parameters())
    ctx = autocast or contextlib.nullcontext()
    cache_dtype = dtype or param.dtype  # the compute dtype (the autocast one under mixed precision)
    cache = KVCache(cfg, 1, extra + len(prompt) + steps, device=param.device, dtype=cache_dtype)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=param.device)
    new: list[int] = []
    with ctx:
        logits = model(tokens, kv_cache=cache, start_pos=0)[:, -1]
        pos = len(prompt)
        for step in range(steps):
            nxt = int(logits.argmax(-1).item())
            if eod_id is not None and nxt == eod_id:
                break
            new.append(nxt)
            if step + 1 == steps:
                break
            logits = model(torch.tensor([[nxt]], device=param.device), kv_cache=cache, start_pos=pos)[:, -1]
            pos += 1
    return new
