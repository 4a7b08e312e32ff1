"""The sampler: next tokens of a batch of rows from their logits, in a few batched operations.

:func:`process_logits` applies penalties, temperature, top-k, top-p and min-p to every row at once (each row
its own values); :class:`Sampler` then draws each sampled row's token by inverting its distribution function at
a uniform (:func:`draw`: the first token whose cumulative probability reaches it), in two levels (:func:`invert`:
the masses of chunks of ~1,000 tokens, then a scan inside the one chunk chosen), so a few batched operations and
one read to the host give every row's token: no per-row host round trip, no scan over the whole vocabulary.
Greedy rows take the argmax. Log-probabilities (of the model's raw distribution) are gathered in the same pass.

The uniforms are counter-based (:func:`row_keys`, :func:`uniforms`): the one of the ``k``-th generated token of
a request is a fixed function of (the request's seed, ``k``), computed on the device by an integer hash. A
request's tokens thus depend only on its seed and its own logits, whatever else is in the batch, whichever step
draws them (after a preemption too), and a step can draw them with no host state: a decode step whose rows all
sample plainly (temperature, top-k, top-p, min-p; no penalties, no log-probabilities) draws its tokens on the
device (:class:`RowSampling`, :func:`next_tokens`) and the engine feeds them to the next step without reading
them first, as it does greedy steps. (Before, each request drew an exponential race from its own
``torch.Generator``: same seed, same tokens still holds, but a seed gives other tokens than it did then. Since the
two-level draw replaced one scan over the vocabulary, a seed's token may also differ from the one-scan draw's
where its uniform lay within float32 rounding of a boundary between two tokens: a few draws in a thousand at a
128k vocabulary.) Where the engine's decode kernels run (a CUDA device with Triton), a device step's draw is two
Triton kernels (:func:`lmforge.serve.kernels.sampled_draw`, :attr:`RowSampling.kernel`) instead of ~30 tensor
operations: the same distribution at the same uniforms, its sums added in another order (a few draws in a
thousand may pick the neighbouring token); the host-read sampler (:class:`Sampler`) keeps the tensor operations.

Extreme values cannot overflow: penalised and tempered logits are clamped (``LOGIT_LIMIT``), temperatures below
``MIN_TEMPERATURE`` are greedy, and a row whose distribution is not finite (NaN logits from broken weights)
fails that request alone.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence as Seq

import torch
import torch.nn.functional as F

from lmforge.models.generate import MIN_TEMPERATURE
from lmforge.serve import kernels
from lmforge.serve.request import LOGIT_LIMIT, SamplingParams, Sequence, TokenLogprob

__all__ = ["process_logits", "argmax_rows", "Sampler", "RowSampling", "next_tokens", "draw", "invert", "row_keys",
           "warm_up_draw_kernel"]


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
    logits[idx] = filter_rows(logits[idx], *filter_settings([params[b] for b in sampled], V, logits.device))
    return logits


def filter_settings(params: Seq[SamplingParams], V: int, device) -> tuple:
    """The per-row tensors :func:`filter_rows` takes for sampled rows with ``params``: temperature (s, 1) or None
    when every row's is 1 (a division by 1 changes nothing: one pass over the logits less), top-k (s, 1) or None
    when no row filters by it, top-p (s, 1) or None, min-p (s, 1) or None."""
    temp = torch.tensor([p.temperature for p in params], device=device)[:, None] \
        if any(p.temperature != 1.0 for p in params) else None
    top_k = [p.top_k if p.top_k and p.top_k < V else V for p in params]
    top_k = torch.tensor(top_k, device=device)[:, None] if min(top_k) < V else None
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None] if any(p.top_p < 1 for p in params) \
        else None
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None] if any(p.min_p > 0 for p in params) \
        else None
    return temp, top_k, top_p, min_p


def filter_rows(rows: torch.Tensor, temp: Optional[torch.Tensor], top_k: Optional[torch.Tensor],
                top_p: Optional[torch.Tensor], min_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on sampled rows (s, V) fp32 (settings from :func:`filter_settings`),
    all on the device (no host value read): the one implementation of both the host-read sampler and the device
    draws, so a row is filtered alike whichever draws it."""
    limit = LOGIT_LIMIT / MIN_TEMPERATURE
    rows = (rows / temp).clamp_(-limit, limit) if temp is not None else rows.clamp(-limit, limit)
    if top_k is not None:
        sorted_desc = rows.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(-1, top_k - 1)  # (s, 1)
        rows = rows.masked_fill(rows < kth, float("-inf"))
    if top_p is not None:
        sorted_rows, order = rows.sort(dim=-1, descending=True)
        probs = sorted_rows.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens; the first token is always kept
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        rows = rows.masked_fill(drop, float("-inf"))
    if min_p is not None:
        probs = rows.softmax(-1)
        rows = rows.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return rows


# -- counter-based noise ----------------------------------------------------------------------------------------
# 32-bit integer hashing in int32 tensors: products wrap modulo 2**32 and right shifts are made logical by a mask.

def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An invertible 32-bit integer hash of each element of an int32 tensor (Wellons' lowbias32 constants)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - (1 << 32))
    return x ^ ((x >> 16) & 0xFFFF)


def _int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as the int32 of the same bits."""
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def row_keys(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(n,) int32 keys of the draws: request seed (int64, any of the 64 bits) and which of its tokens (int64)."""
    lo, hi = _int32(seeds & 0xFFFFFFFF), _int32((seeds >> 32) & 0xFFFFFFFF)
    return _hash32(_hash32(_hash32(lo) ^ hi) ^ _int32(counters & 0xFFFFFFFF))


def uniforms(keys: torch.Tensor) -> torch.Tensor:
    """(n,) fp32 uniforms in (0, 1) of the draws ``keys`` (:func:`row_keys`), 24 bits each (as torch's own float
    draws)."""
    x = _hash32(keys ^ 0x2545F491)
    return ((x >> 8) & 0xFFFFFF).float().add_(0.5).mul_(2.0 ** -24)


#: Tokens per chunk of the two-level draw (:func:`invert`), about: the vocabulary is cut into chunks of about this
#: many tokens (:func:`draw_chunk`), each chunk's probability summed (one reduction over the batch, spread over the
#: whole device), then only the chosen chunk is scanned.
DRAW_CHUNK = 1024


@functools.lru_cache(maxsize=None)
def draw_chunk(V: int) -> int:
    """The chunk size of :func:`invert` for a vocabulary of ``V`` tokens: the divisor of ``V`` nearest
    :data:`DRAW_CHUNK` between half and twice it (the chunks then tile the vocabulary: no shorter last chunk to
    sum and mask apart; 1,002 for Llama 3's 128,256), else :data:`DRAW_CHUNK`; ``V`` when smaller."""
    if V <= DRAW_CHUNK:
        return V
    for d in range(DRAW_CHUNK):
        for c in (DRAW_CHUNK + d, DRAW_CHUNK - d):
            if DRAW_CHUNK // 2 <= c <= 2 * DRAW_CHUNK and V % c == 0:
                return c
    return DRAW_CHUNK


@functools.lru_cache(maxsize=None)
def _offsets(C: int, device: torch.device) -> torch.Tensor:
    """(C,) 0..C-1 on ``device``: the places in a chunk (made once, not a kernel every draw)."""
    return torch.arange(C, device=device)


def draw(processed: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token from its filtered logits (n, V) by the inverse of its distribution function: the first
    token whose cumulative probability reaches the row's uniform (:func:`uniforms`), which picks token ``i`` with
    probability ``p_i``; and whether the row's distribution is finite (n,) bool. Row by row, on the device (no
    vocabulary-wide noise, no scan over the whole vocabulary: :func:`invert`)."""
    return invert(processed, uniforms(keys))


def invert(processed: torch.Tensor, u: torch.Tensor, chunk: Optional[int] = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw` at given uniforms ``u`` (n,) fp32 (:func:`uniforms` of the rows' keys): the picks (n,) int64
    and whether each row is finite (n,) bool. ``chunk``: tokens per chunk (default :func:`draw_chunk`)."""
    pick, total = _invert(processed, u, chunk)
    return pick, total == total


def _invert(processed: torch.Tensor, u: torch.Tensor, chunk: Optional[int] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`invert`'s picks and each row's total probability (n,) (NaN for a row that is not finite), in two
    levels.

    The probabilities (one softmax) are cut into chunks of ``chunk`` tokens (the last chunk shorter when ``chunk``
    does not divide the vocabulary). Each chunk's mass is summed (a reduction), the few chunk masses are scanned,
    and the row's target ``u * total`` finds its chunk by a binary search; then only that chunk's probabilities
    are gathered and scanned, and the target less the mass of the chunks before finds the token. This is the
    inverse of the distribution function, as one scan over the whole vocabulary was (a token of zero probability,
    filtered or beyond the vocabulary, is never picked), but the sums are added in another order, so a target
    within rounding of a boundary between two tokens may pick the other one (a float64 scan agrees but within
    float32 rounding of a boundary). Why: on a GPU the scan over a 128k vocabulary was one slow kernel (0.2 ms a step for 64
    rows on an H100, session 10); the reduction reads the probabilities once at full bandwidth.

    Rows that are not finite are flagged as before: a NaN logit, a +inf one (unclamped) or every token filtered
    gives NaN probabilities (softmax) and a NaN total; their pick is some valid index.
    """
    n, V = processed.shape
    C = min(chunk or draw_chunk(V), V)
    full = V - V % C  # tokens in whole chunks
    probs = processed.softmax(-1)
    sums = probs[:, :full].view(n, full // C, C).sum(-1)  # (n, k) each chunk's mass
    if full < V:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], 1)
    k = sums.shape[1]
    before = F.pad(sums, (1, 0)).cumsum_(-1)  # (n, k + 1): mass of the chunks before each chunk; the total last
    total = before[:, -1:]
    target = u[:, None] * total  # in (0, total]: u > 0, total about 1 when finite
    j = torch.searchsorted(before, target).sub_(1).clamp_(0, k - 1)  # (n, 1): before[j] < target <= before[j + 1]
    idx = torch.add(_offsets(C, probs.device), j, alpha=C)  # (n, C) the chunk's tokens
    if full < V:  # the last chunk is shorter: its places beyond the vocabulary weigh 0
        vals = probs.gather(1, idx.clamp(max=V - 1)).masked_fill_(idx >= V, 0.0)
    else:
        vals = probs.gather(1, idx)
    inner = vals.cumsum_(-1)
    # the target within the chunk: > 0 (before[j] < target, exactly) and at most the chunk's scanned mass (its
    # reduction may round above it), so the token found has a positive probability
    rest = torch.minimum(target - before.gather(1, j), inner[:, -1:])
    pick = torch.add(torch.searchsorted(inner, rest), j, alpha=C)[:, 0]
    return pick.clamp_(max=V - 1), total[:, 0]


class RowSampling:
    """The sampled rows of a decode step drawn on the device: their indices in the step, filter settings, seeds
    and token counters (all device tensors), so a chained step draws with no host value (:meth:`advanced`).

    Built by :meth:`build` from the step's sequences (row ``i`` is ``seqs[i]``); None when no row samples.

    The uniforms of :data:`WINDOW` steps are computed at once (:meth:`uniforms`: the same values, key by key, as
    one step's :func:`row_keys` and :func:`uniforms`): the integer hashes are some sixty small kernels, which a
    chained step would otherwise launch every time (host time that held the device back). ``dense``: the sampled
    rows are the step's first rows in order (every sequence samples), so no gather or scatter of rows is needed.
    ``kernel``: draw with the Triton kernels (:func:`lmforge.serve.kernels.sampled_draw`, two launches) instead of
    :func:`_invert`'s tensor operations (the engine's decode-kernels switch sets it where they run).
    """

    #: chained steps whose uniforms are computed together
    WINDOW = 64

    def __init__(self, idx, settings, seeds, counters, dense: bool = False, offset: int = 0, window=None,
                 kernel: bool = False):
        self.idx, self.settings, self.seeds, self.counters = idx, settings, seeds, counters
        self.dense = dense
        self.kernel = kernel
        self.offset = offset  # steps since build: each row draws its token number counters + offset
        self._window = window  # (first offset, (WINDOW, s) uniforms) shared with the steps before

    @classmethod
    def build(cls, seqs: list[Sequence], V: int, device, kernel: bool = False) -> Optional["RowSampling"]:
        rows = [b for b, s in enumerate(seqs) if not s.params.greedy]
        if not rows:
            return None
        params = [seqs[b].params for b in rows]
        return cls(torch.tensor(rows, device=device), filter_settings(params, V, device),
                   torch.tensor([seqs[b].seed for b in rows], device=device),
                   torch.tensor([seqs[b].num_generated for b in rows], device=device), dense=len(rows) == len(seqs),
                   kernel=kernel)

    def uniforms(self) -> torch.Tensor:
        """(s,) this step's uniforms: :func:`uniforms` of :func:`row_keys` (seed, counter + offset) of each row."""
        if self._window is None or not 0 <= self.offset - self._window[0] < self.WINDOW:
            steps = torch.arange(self.offset, self.offset + self.WINDOW, device=self.counters.device)
            keys = row_keys(self.seeds[None, :], self.counters[None, :] + steps[:, None])  # (WINDOW, s)
            self._window = (self.offset, uniforms(keys))
        first, u = self._window
        return u[self.offset - first]

    def advanced(self) -> "RowSampling":
        """The same rows one token further (the chained step after)."""
        return RowSampling(self.idx, self.settings, self.seeds, self.counters, self.dense, self.offset + 1,
                           self._window, self.kernel)

    def draw(self, rows: torch.Tensor) -> torch.Tensor:
        """This step's picks (s,) int64 from the sampled rows' raw logits ``rows`` (s, V), -1 for a row whose
        distribution is not finite: :func:`filter_rows` then :func:`_invert`, or with :attr:`kernel` the Triton
        draw (:func:`lmforge.serve.kernels.sampled_draw`), which applies the temperature and clamp itself when
        no row filters by top-k, top-p or min-p (a GRPO rollout's step: two kernel launches in all)."""
        u = self.uniforms()
        if self.kernel:
            temp, top_k, top_p, min_p = self.settings
            limit = LOGIT_LIMIT / MIN_TEMPERATURE
            if top_k is None and top_p is None and min_p is None:
                return kernels.sampled_draw(rows, u, temp, True, limit)
            return kernels.sampled_draw(filter_rows(rows.float(), *self.settings), u, None, False, limit)
        pick, total = _invert(filter_rows(rows.float(), *self.settings), u)
        return pick.masked_fill_(total.isnan(), -1)


def warm_up_draw_kernel(V: int, device) -> None:
    """Compile :func:`lmforge.serve.kernels.sampled_draw`'s variants that :meth:`RowSampling.draw` launches (plain
    rows, tempered rows, rows filtered first) for a vocabulary of ``V`` on ``device``, at start-up rather than at
    the first sampled step (Triton compiles a kernel at its first launch: about a second each)."""
    logits = torch.zeros(1, V, device=device)
    u = torch.full((1,), 0.5, device=device)
    limit = LOGIT_LIMIT / MIN_TEMPERATURE
    for temp, apply_filter in ((None, True), (torch.ones(1, 1, device=device), True), (None, False)):
        kernels.sampled_draw(logits, u, temp, apply_filter, limit)


def next_tokens(logits: torch.Tensor, greedy: torch.Tensor, sampling: Optional[RowSampling]) -> torch.Tensor:
    """A decode step's next token of every row (B,), on the device: greedy rows their argmax ``greedy``, sampled
    rows their draw (-1 for a row whose distribution is not finite: the request fails when read)."""
    if sampling is None:
        return greedy
    if sampling.dense:  # rows 0..s-1 sample; rows after them (the graph's padding) keep their argmax
        s = sampling.seeds.shape[0]
        drawn = sampling.draw(logits[:s])
        return drawn if s == greedy.shape[0] else torch.cat([drawn, greedy[s:]])
    return greedy.clone().index_copy_(0, sampling.idx, sampling.draw(logits[sampling.idx]))



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
            dev = logits.device
            keys = row_keys(torch.tensor([seqs[b].seed for b in sampled], device=dev),
                            torch.tensor([seqs[b].num_generated for b in sampled], device=dev))
            pick, ok = draw(processed[sampled], keys)  # each row's uniform from its seed and token count alone
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
