"""The sampler: next tokens of a batch of rows from their logits, in a few batched operations.

:func:`process_logits` applies penalties, temperature, top-k, top-p and min-p to every row at once (each row
its own values); :class:`Sampler` then draws each sampled row's token by the exponential race
(``argmax(p / E)`` with ``E ~ Exp(1)`` drawn from the request's own generator, which picks token ``i`` with
probability ``p_i``), so one argmax over the batch and one read to the host give every row's token: no
per-row host round trip, and a request's tokens depend only on its seed, whatever else is in the batch.
Greedy rows take the argmax. Log-probabilities (of the model's raw distribution) are gathered in the same pass.

Extreme values cannot overflow: penalised and tempered logits are clamped (``LOGIT_LIMIT``), temperatures below
``MIN_TEMPERATURE`` are greedy, and a row whose distribution is not finite (NaN logits from broken weights)
fails that request alone.
"""

from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch
import torch.nn.functional as F

from lmforge.models.generate import MIN_TEMPERATURE
from lmforge.serve.request import LOGIT_LIMIT, SamplingParams, Sequence, TokenLogprob

__all__ = ["process_logits", "argmax_rows", "Sampler"]


def process_logits(logits: torch.Tensor, params: Seq[SamplingParams], histories: Seq[tuple[list, list]]
                   ) -> torch.Tensor:
    """Apply penalties, temperature, top-k, top-p and min-p to next-token logits.

    Args:
        logits: (B, V) fp32 logits, one row per request.
        params: each row's sampling parameters.
        histories: each row's ``(prompt_ids, output_ids)`` (penalties read them).

    Returns:
        (B, V) logits with filtered tokens at -inf and temperature applied (greedy rows: penalties only).

    No value can overflow: penalised and tempered logits are clamped to +-``LOGIT_LIMIT`` (a repetition penalty
    of 1e-40 would otherwise turn a logit into inf, and softmax into NaN), and temperatures below
    ``MIN_TEMPERATURE`` are greedy rows.
    """
    logits = logits.float().clone()
    B, V = logits.shape
    for b, p in enumerate(params):
        if not p.needs_penalties:
            continue
        prompt, output = histories[b]
        row = logits[b]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if output and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=V)[:V].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        row.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if not sampled:
        return logits
    idx = torch.tensor(sampled, device=logits.device)
    rows = logits[idx]  # (b, V)
    sp = [params[b] for b in sampled]
    temp = torch.tensor([p.temperature for p in sp], device=logits.device)[:, None]
    rows = (rows / temp).clamp(-LOGIT_LIMIT / MIN_TEMPERATURE, LOGIT_LIMIT / MIN_TEMPERATURE)
    top_k = [p.top_k if p.top_k and p.top_k < V else V for p in sp]
    if min(top_k) < V:
        sorted_desc = rows.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(-1, torch.tensor(top_k, device=logits.device)[:, None] - 1)  # (b, 1)
        rows = rows.masked_fill(rows < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in sp], device=logits.device)[:, None]
    if any(p.top_p < 1 for p in sp):
        sorted_rows, order = rows.sort(dim=-1, descending=True)
        probs = sorted_rows.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens; the first token is always kept
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        rows = rows.masked_fill(drop, float("-inf"))
    min_p = torch.tensor([p.min_p for p in sp], device=logits.device)[:, None]
    if any(p.min_p > 0 for p in sp):
        probs = rows.softmax(-1)
        rows = rows.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    logits[idx] = rows
    return logits



def argmax_rows(logits: torch.Tensor, groups: int = 128) -> torch.Tensor:
    """``logits.argmax(-1)`` of (B, V) in two passes: the best of each of ``groups`` blocks of the vocabulary,
    then the best block. One pass over a 128k vocabulary runs on few multiprocessors (24 us on an H100 for one
    row); this spreads the first pass over the whole device. Ties may pick another of the tied tokens."""
    B, V = logits.shape
    pad = (-V) % groups
    if pad:
        logits = F.pad(logits, (0, pad), value=float("-inf"))
    values, index = logits.view(B, groups, -1).max(-1)  # (B, groups)
    best = values.argmax(-1, keepdim=True)  # (B, 1)
    return (best * ((V + pad) // groups) + index.gather(-1, best))[:, 0]



class Sampler:
    """Chooses each row's next token (see the module's docstring)."""

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Optional[int]]:
        """Each sequence's next token from its row of ``logits`` (n, V); None for a sequence that failed (its
        distribution is not finite). Asked-for logprobs are queued on the sequence."""
        params = [s.params for s in seqs]
        processed = process_logits(logits, params, [(s.prompt_ids, s.output_ids) for s in seqs])
        sampled = [b for b, p in enumerate(params) if not p.greedy]
        failed: list[bool] = [False] * len(seqs)
        if sampled:
            probs = processed[sampled].softmax(-1)  # (s, V)
            race = torch.empty_like(probs)
            for j, b in enumerate(sampled):  # each row's noise from its own generator: same seed, same tokens
                race[j].exponential_(generator=seqs[b].generator)
            race.clamp_(min=1e-30)  # never a division by 0
            pick = (probs / race).argmax(-1)
            ok = torch.isfinite(probs).all(-1)
            chosen_t = processed.argmax(-1)
            chosen_t[torch.tensor(sampled, device=logits.device)] = pick
            chosen, ok_list = chosen_t.tolist(), ok.tolist()  # the one read of the batch
            for j, b in enumerate(sampled):
                failed[b] = not ok_list[j]
        else:
            chosen = processed.argmax(-1).tolist()
        want_lp = [b for b, p in enumerate(params) if p.logprobs is not None and not failed[b]]
        if want_lp:
            logp = logits[want_lp].float().log_softmax(-1)
            k = max(params[b].logprobs for b in want_lp)
            top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
            chosen_lp = logp.gather(-1, torch.tensor([chosen[b] for b in want_lp], device=logp.device)[:, None])
            chosen_lp = chosen_lp[:, 0].tolist()
            top_v = top_v.tolist() if k else None
            top_i = top_i.tolist() if k else None
            for j, b in enumerate(want_lp):
                kb = params[b].logprobs
                top = list(zip(top_i[j][:kb], top_v[j][:kb])) if kb else []
                seqs[b].pending_logprobs.append(TokenLogprob(chosen[b], chosen_lp[j], top))
        out: list[Optional[int]] = []
        for b, token in enumerate(chosen):
            if failed[b]:  # NaN logits (broken weights): this request fails, the batch goes on
                seqs[b].fail("the model's next-token distribution is not finite (NaN or inf logits)")
                out.append(None)
            else:
                out.append(int(token))
        return out
