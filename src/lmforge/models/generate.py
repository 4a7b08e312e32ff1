"""Sampling and the generate loop for one prompt.

:func:`sample_next` turns next-token logits into token ids (greedy, temperature, top-k, top-p);
:func:`generate` runs a :class:`~lmforge.models.transformer.Transformer` with a
:class:`~lmforge.models.transformer.KVCache`: one prefill of the prompt, then one token per step.
Batched serving with its own scheduler lives in ``lmforge.serve``; this is the simple, exact path
used by tests, examples and evaluation.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from lmforge.models.transformer import KVCache, Transformer

__all__ = ["sample_next", "generate", "MIN_TEMPERATURE"]

#: Temperatures below this are greedy: dividing logits by less would overflow float32.
MIN_TEMPERATURE = 1e-5
#: Tempered logits are clamped to +-LOGIT_LIMIT (finite, so softmax never sees inf - inf).
LOGIT_LIMIT = 1e35


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token from logits.

    Args:
        logits: (B, V) or (V,) next-token logits.
        temperature: divides the logits; 0 (or below ``MIN_TEMPERATURE``, where the division would overflow)
            means greedy (argmax).
        top_k: keep only the k most likely tokens (None: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling; None or 1.0: all). The most likely token is always kept.
        generator: a seeded ``torch.Generator`` on the logits' device for reproducible draws.

    Returns:
        (B,) int64 token ids, or a 0-d tensor for 1-d logits.

    Raises:
        ValueError: temperature < 0, top_k < 1, or top_p outside (0, 1].
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    squeeze = logits.dim() == 1
    logits = logits.float().reshape(-1, logits.shape[-1])  # (B, V)
    if temperature < MIN_TEMPERATURE:  # 0, or so small that dividing by it would overflow float32 (inf -> NaN)
        ids = logits.argmax(dim=-1)
        return ids[0] if squeeze else ids

    logits = (logits / temperature).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept value
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before >= top_p  # the first token has before == 0 and is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    ids = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
    return ids[0] if squeeze else ids


def generate(model: Transformer, prompt_ids: Union[Sequence[int], torch.Tensor], max_new_tokens: int,
             greedy: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None, eod_id: Optional[int] = None,
             stop_at_eod: bool = True) -> list[int]:
    """Continue one prompt.

    The prompt is run once (prefill) into a :class:`KVCache`, then each new token is fed alone.
    Dropout is off while generating (the model is put in eval mode and its mode restored after).

    Args:
        model: a :class:`Transformer`.
        prompt_ids: the prompt's token ids (a list or a 1-d tensor), at least one.
        max_new_tokens: most tokens to generate.
        greedy: take the argmax (temperature, top_k and top_p are then ignored).
        temperature, top_k, top_p: sampling filters, see :func:`sample_next`.
        seed: seeds a ``torch.Generator`` on the model's device, so the same seed gives the same
            tokens; None draws from torch's global RNG.
        eod_id: the end-of-document token.
        stop_at_eod: stop when ``eod_id`` is generated; the EOD token itself is not returned.

    Returns:
        The new token ids only. Generation also stops when prompt + new tokens reach
        ``max_position_embeddings``.

    Raises:
        ValueError: an empty prompt, or one that leaves no room in ``max_position_embeddings``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt = [int(t) for t in (prompt_ids.reshape(-1).tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not prompt:
        raise ValueError("generate needs a prompt of at least one token")
    max_len = model.cfg.max_position_embeddings
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the model's context is max_position_embeddings="
                         f"{max_len}; shorten the prompt to at most {max_len - 1} tokens to leave room for new ones")
    if max_new_tokens == 0:
        return []
    steps = min(max_new_tokens, max_len - len(prompt))

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    temperature = 0.0 if greedy else temperature

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = KVCache(model.cfg, batch_size=1, max_seq_len=len(prompt) + steps, device=device, dtype=dtype)
            tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
            logits = model(tokens, kv_cache=cache, start_pos=0)[:, -1]  # (1, V)
            pos = len(prompt)
            new: list[int] = []
            for step in range(steps):
                next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
                token = int(next_id.item())
                if stop_at_eod and eod_id is not None and token == eod_id:
                    break
                new.append(token)
                if step + 1 == steps:
                    break  # the last token needs no forward
                logits = model(next_id.view(1, 1), kv_cache=cache, start_pos=pos)[:, -1]
                pos += 1
    finally:
        model.train(was_training)
    return new
