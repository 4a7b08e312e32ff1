"""Loglikelihood scoring of any causal language model, with lm-evaluation-harness's semantics.

Three requests cover every task:

* :meth:`Scorer.loglikelihood` -- ``(context, continuation)`` strings -> ``(log P(continuation | context),
  is_greedy)``. Trailing spaces of the context move to the continuation; the pair is encoded as a
  whole and the context's tokens are cut off the front, so a word keeps the tokens it has in running
  text. An empty context is replaced by the prefix token (BOS, else EOS).
* :meth:`Scorer.loglikelihood_rolling` -- a document -> its total loglikelihood, scored in disjoint
  windows of at most ``max_length`` predicted tokens; the first window is conditioned on the prefix
  token, every later one on as many preceding tokens as fit.
* :meth:`Scorer.generate_until` -- greedy generation that stops at any of the given strings (and at EOS): on
  lmforge Transformers through the serving engine (:mod:`lmforge.serve.engine`: continuous batching, a paged
  KV cache, the prefix cache), on any other model one full forward per token.

Speed: requests are reduced to distinct model inputs (``(context + continuation)[:-1]``; choices that
differ only in their last token, such as one-token answers, share one forward pass), sorted longest
first and batched with right padding. On an lmforge Transformer, a context shared by several multi-token
choices (hellaswag, piqa) is computed once into a KV cache and each choice is scored from it (contexts of
equal length are batched together); the numbers agree with full passes to float rounding. Only the positions that are scored go through the output head
when the model is an lmforge :class:`~lmforge.models.transformer.Transformer`.

A request longer than ``max_length + 1`` tokens is truncated from the left, as the harness does, and
counted in :attr:`Scorer.truncated`.

Data parallel: with ``world_size > 1`` (torch.distributed initialized) every rank forms the same sorted
batches, scores batches ``rank, rank + world_size, ...`` and the results are gathered, so every rank
returns all results, bit for bit those of one process (each batch is the one a single process runs).

Tensor parallel (``tensor_parallel``: the :class:`~lmforge.serve.tensor_parallel.RankContext` of a rank holding its
share of the model, :func:`~lmforge.serve.tensor_parallel.shard_model`): every rank runs the same requests in
the same batches, so their forwards (and the all-reduces inside them) pair up, and every rank gets the same
log-probabilities. Generation runs on rank 0's engine in lockstep with the others'
(:class:`~lmforge.serve.tensor_parallel.LockstepEngine`), and rank 0 sends the tokens to every rank after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lmforge.serve.engine import Engine

__all__ = ["Scorer", "rolling_windows"]

TokenRequest = tuple[list[int], list[int]]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[TokenRequest]:
    """Split a document's tokens into disjoint ``(context, continuation)`` windows for perplexity.

    The first window predicts the first ``max_length`` tokens from ``[prefix_token]``; each later
    window predicts the next (at most ``max_length``) tokens, conditioned on the tokens just before
    them so that the model input is ``max_length`` long. Every token is predicted exactly once.

    Args:
        tokens: the document's token ids.
        prefix_token: the token the first prediction is conditioned on (BOS or EOS).
        max_length: the model's context length.

    Returns:
        A list of ``(context_tokens, continuation_tokens)``; empty for an empty document.
    """
    tokens = list(tokens)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    windows: list[TokenRequest] = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix_token], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(max_length, len(tokens) - done)
        end = done + n
        # input covers tokens[end - max_length - 1 : end - 1]; the last n of them are predicted
        start = max(0, end - max_length - 1)
        windows.append((tokens[start:done], tokens[done:end]))
        done = end
    return windows


class Scorer:
    """Scores requests on a causal LM.

    Args:
        model: a module whose call on (B, T) token ids returns (B, T, V) logits, or an object with
            ``.logits`` (a transformers model). An lmforge ``Transformer`` is detected and only the
            scored positions are projected through its head.
        tokenizer: has ``encode(text) -> list[int]`` and ``decode(ids) -> str``; ``bos_id`` / ``eod_id``
            (lmforge) or ``bos_token_id`` / ``eos_token_id`` (transformers) give the prefix token.
        max_length: the model's context length (tokens).
        batch_size: an int, or ``"auto"``: the largest power of two up to 512 that fits on the GPU
            for the longest input (16 on a CPU).
        device: where the inputs go; default: the model's parameters' device.
        prefix_token_id: override of the token used for an empty context.
        progress: show a progress bar (rich).
        rank, world_size: this process's share under data parallelism (see the module's docstring).
        reuse_context: compute a context shared by several multi-token choices once (KV cache).
        tensor_parallel: this rank's :class:`~lmforge.serve.tensor_parallel.RankContext` when ``model`` is its
            share of a tensor-parallel model (see the module's docstring); needs an integer ``batch_size``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int, batch_size: Union[int, str] = 16,
                 device: Optional[Union[str, torch.device]] = None, prefix_token_id: Optional[int] = None,
                 progress: bool = False, rank: int = 0, world_size: int = 1, reuse_context: bool = True,
                 tensor_parallel=None):
        self.model = model
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.reuse_context = bool(reuse_context)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        self.batch_size = batch_size
        if tensor_parallel is not None and batch_size == "auto":
            raise ValueError("batch_size 'auto' cannot be used under tensor parallelism: the ranks would search "
                             "their memory apart and their forwards would no longer pair up")
        self.tensor_parallel = tensor_parallel
        if device is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.prefix_token_id = prefix_token_id if prefix_token_id is not None else self._default_prefix()
        self.progress = progress
        self.truncated = 0  # requests cut from the left because they exceeded max_length + 1 tokens
        self._auto_batch: Optional[int] = None
        self._engine = None  # the serving engine of generate_until (built on first use)
        self._requests = 0  # generate_until calls through the engine (request ids stay unique)

    def start_task(self, engine_from: Optional["Scorer"] = None) -> None:
        """Make this scorer score a new task as a fresh one would, keeping its serving engine (built once per
        ``lmforge evaluate``): the task's counters and its ``"auto"`` batch size start again, and the engine's
        prefix cache is emptied. ``engine_from``: take over that scorer's engine (same model) instead."""
        if engine_from is not None:  # moved, not shared: a scorer that outgrows it lets its KV cache go
            self._engine, engine_from._engine = engine_from._engine, None
        self.truncated = 0
        self._auto_batch = None
        if self._engine is not None:
            self._engine.reset_prefix_cache()

    # -- tokens --------------------------------------------------------------------------------------

    def _default_prefix(self) -> int:
        tok = self.tokenizer
        for name in ("bos_id", "bos_token_id", "eod_id", "eos_token_id"):
            value = getattr(tok, name, None)
            if value is not None:
                return int(value)
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; pass prefix_token_id")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: an lmforge tokenizer's by the one prompt rule
        (:func:`lmforge.data.prompts.encode_prompt`: BOS as the tokenizer's convention says, as fine-tuning,
        generate and the server encode), any other's default call."""
        if hasattr(self.tokenizer, "bos_id") and (hasattr(self.tokenizer, "backend") or hasattr(self.tokenizer, "hf")):
            from lmforge.data.prompts import encode_prompt

            return encode_prompt(self.tokenizer, text)
        return list(self.tokenizer.encode(text))

    def encode_pair(self, context: str, continuation: str) -> TokenRequest:
        """Tokens of ``context`` and of ``continuation`` as they appear in ``context + continuation``."""
        if context == "":
            cont = self._encode_plain(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        stripped = context.rstrip()
        if len(stripped) < len(context):
            continuation = context[len(stripped):] + continuation
            context = stripped
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def _encode_plain(self, text: str) -> list[int]:
        """Tokens without added special tokens (used for a continuation with an empty context)."""
        backend = getattr(self.tokenizer, "backend", None)
        if backend is not None and hasattr(backend, "encode"):
            return list(backend.encode(text, add_special_tokens=False).ids)
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return self.encode(text)

    # -- the model -------------------------------------------------------------------------------------

    def _is_lmforge(self) -> bool:
        return hasattr(self.model, "hidden_states") and hasattr(self.model, "output_weight")

    @torch.no_grad()
    def _scored_logprobs(self, batch: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Log-probabilities (float32) at positions ``[start, end)`` of every row of ``batch``."""
        if self._is_lmforge():
            hidden = self.model.hidden_states(batch)  # (B, T, C)
            weight = self.model.output_weight()
            return [F.log_softmax(F.linear(hidden[i, s:e], weight).float(), dim=-1) for i, (s, e) in enumerate(spans)]
        out = self.model(batch)
        logits = getattr(out, "logits", out)  # (B, T, V)
        return [F.log_softmax(logits[i, s:e].float(), dim=-1) for i, (s, e) in enumerate(spans)]

    def _resolve_batch_size(self, longest: int) -> int:
        if self.batch_size != "auto":
            return int(self.batch_size)
        if self._auto_batch is None:
            # every rank must form the same batches: take the smallest size any rank found
            self._auto_batch = min(self._gather(self.detect_batch_size(longest)))
        return self._auto_batch

    def _gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def detect_batch_size(self, length: int, start: int = 512) -> int:
        """The largest power of two <= ``start`` whose batch of ``length`` tokens runs without running out of
        GPU memory; 16 on a CPU (which has no out-of-memory signal to search with)."""
        if self.device.type != "cuda":
            return 16
        size = start
        while size > 1:
            try:
                ids = torch.zeros((size, max(1, length)), dtype=torch.long, device=self.device)
                self._scored_logprobs(ids, [(0, length)] * size)
                return size
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                size //= 2
        return 1

    # -- requests -------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy decode)`` for every pair."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_tokens(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        """As :meth:`loglikelihood`, on ``(context_tokens, continuation_tokens)`` pairs (both non-empty)."""
        # 1. the model input of every request; requests with the same input share one forward pass
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: context and continuation must both have tokens")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: a continuation of {len(cont)} tokens exceeds the context length "
                                 f"{self.max_length}")
            full = ctx + cont
            if len(full) > self.max_length + 1:
                self.truncated += 1
            groups.setdefault(tuple(full[-(self.max_length + 1):][:-1]), []).append(i)
        # 2. inputs that continue one shared context (multi-token choices) form families: the context is
        #    computed once into a KV cache and every choice is scored from it (lmforge Transformers only)
        inputs = sorted(groups, key=lambda t: (-len(t), t))  # longest first, ties broken by the tokens
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        if not inputs:
            return []
        families = self._families(requests, groups, inputs)
        in_family = {inp for _, members in families for inp in members}
        plain = [t for t in inputs if t not in in_family]
        batch_size = self._resolve_batch_size(len(plain[0]) if plain else len(inputs[0]))
        # 3. units of work: batches of plain inputs, then families batched by equal context length; under
        #    data parallelism rank r takes units r, r + world_size, ... (the same units as one process)
        units: list[tuple[str, list]] = [("plain", plain[b:b + batch_size]) for b in range(0, len(plain), batch_size)]
        units += [("family", chunk) for chunk in _family_batches(families, batch_size)]
        bar = _progress(self.progress and self.rank == 0, len(inputs), "loglikelihood")
        mine: list[tuple[int, float, bool]] = []  # (request index, loglikelihood, greedy) scored here
        for u in range(self.rank, len(units), self.world_size):
            kind, chunk = units[u]
            if kind == "plain":
                scored = zip(chunk, self._score_inputs(chunk, requests, groups))
            else:
                scored = self._score_family_batch(chunk, requests, groups)
            n = 0
            for inp, lp in scored:
                n += 1
                for i in groups[inp]:
                    cont = torch.tensor(requests[i][1], dtype=torch.long, device=lp.device)
                    rows = lp[lp.shape[0] - len(cont):]  # (len(cont), V)
                    ll = rows.gather(1, cont[:, None]).sum().item()
                    greedy = bool((rows.argmax(dim=-1) == cont).all().item())
                    mine.append((i, float(ll), greedy))
            bar.advance(n * self.world_size)
        bar.close()
        for share in self._gather(mine):
            for i, ll, greedy in share:
                results[i] = (ll, greedy)
        return results  # type: ignore[return-value]

    def _score_inputs(self, chunk: list[tuple[int, ...]], requests, groups) -> list[torch.Tensor]:
        """One right-padded forward pass over ``chunk``; the log-probabilities of each input's scored positions."""
        batch = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
        spans = []
        for row, inp in enumerate(chunk):
            batch[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            longest = max(len(requests[i][1]) for i in groups[inp])
            spans.append((len(inp) - longest, len(inp)))
        return self._scored_logprobs(batch.to(self.device), spans)

    def _families(self, requests, groups, inputs) -> list[tuple[tuple[int, ...], list[tuple[int, ...]]]]:
        """``[(shared context prefix, [inputs continuing it]), ...]``: two or more untruncated inputs whose
        requests share their context (all but its last token, whose output is the first scored position)."""
        if not self.reuse_context or not self._cacheable():
            return []
        by_prefix: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for inp in inputs:
            reqs = [requests[i] for i in groups[inp]]
            if any(len(c) + len(x) > self.max_length + 1 for c, x in reqs):
                continue  # truncated: its context is not the request's context
            n_prefix = min(len(c) for c, _ in reqs) - 1
            if n_prefix >= 1:
                by_prefix.setdefault(inp[:n_prefix], []).append(inp)
        return sorted(((p, m) for p, m in by_prefix.items() if len(m) > 1), key=lambda f: (-len(f[0]), f[0]))

    def _cacheable(self) -> bool:
        from lmforge.models.transformer import Transformer

        return isinstance(self.model, Transformer)

    @torch.no_grad()
    def _score_family_batch(self, families, requests, groups) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """Families with equal-length contexts: the contexts in one pass into a KV cache, then every member's
        remaining tokens from its family's cached rows. Returns ``[(input, scored log-probabilities)]``."""
        from lmforge.models.transformer import KVCache

        model = self.model
        n_prefix = len(families[0][0])
        members = [(f, inp) for f, (_, ms) in enumerate(families) for inp in ms]
        width = max(len(inp) for _, inp in members) - n_prefix
        dtype = next(model.parameters()).dtype
        kv_heads = model.layers[0].self_attn.n_kv_heads  # a tensor-parallel rank's share of them
        prefill = KVCache(model.cfg, len(families), n_prefix, self.device, dtype, kv_heads=kv_heads)
        prefix = torch.tensor([p for p, _ in families], dtype=torch.long, device=self.device)
        model.hidden_states(prefix, kv_cache=prefill, start_pos=0)
        rows = torch.tensor([f for f, _ in members], dtype=torch.long, device=self.device)
        cache = KVCache(model.cfg, len(members), n_prefix + width, self.device, dtype, kv_heads=kv_heads)
        for layer in range(len(cache.k)):
            cache.k[layer][:, :, :n_prefix] = prefill.k[layer].index_select(0, rows)
            cache.v[layer][:, :, :n_prefix] = prefill.v[layer].index_select(0, rows)
        batch = torch.zeros((len(members), width), dtype=torch.long)
        spans = []
        for row, (_, inp) in enumerate(members):
            rest = inp[n_prefix:]
            batch[row, :len(rest)] = torch.tensor(rest, dtype=torch.long)
            longest = max(len(requests[i][1]) for i in groups[inp])
            spans.append((len(rest) - longest, len(rest)))
        hidden = model.hidden_states(batch.to(self.device), kv_cache=cache, start_pos=n_prefix)
        weight = model.output_weight()
        return [(inp, F.log_softmax(F.linear(hidden[r, s:e], weight).float(), dim=-1))
                for r, ((_, inp), (s, e)) in enumerate(zip(members, spans))]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Total loglikelihood of every text, scored in rolling windows (see :func:`rolling_windows`)."""
        windows, owners = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                windows.append(w)
                owners.append(i)
        totals = [0.0] * len(texts)
        for owner, (ll, _) in zip(owners, self.loglikelihood_tokens(windows)):
            totals[owner] += ll
        return totals

    # -- generation -------------------------------------------------------------------------------------------

    def engine_model(self):
        """The lmforge :class:`~lmforge.models.transformer.Transformer` (or the p-tuned model around one) that
        :meth:`generate_until` runs on the serving engine, or None: any other model (a transformers model, a
        plain module returning logits) generates with full forwards (:meth:`_greedy_loop`)."""
        from lmforge.models.transformer import Transformer

        model = self.model
        inner = model.model if hasattr(model, "num_virtual_tokens") and hasattr(model, "model") else model
        return model if isinstance(inner, Transformer) else None

    def _engine_for(self, longest: int) -> "Engine":
        """The serving engine of this scorer (built on first use, on the scorer's model, device and dtype), with
        room for sequences of ``longest`` tokens (built again, larger, when a later call needs more).

        Its settings: ``batch_size`` sequences at most (``"auto"``: the size found for the scorer's forwards, at
        most 256), greedy, prefix caching on, no compiling (``lmforge evaluate`` has no such flag); the KV cache
        holds that many sequences of the longest one needed (not the GPU's free memory: the scorer's other
        requests need it too)."""
        from lmforge.serve.engine import Engine

        model = self.engine_model()
        virtual = int(getattr(model, "num_virtual_tokens", 0))
        limit = min(self.max_length + virtual, int(model.cfg.max_position_embeddings))
        needed = min(limit, -(-(longest + virtual) // 256) * 256)  # rounded up: fewer rebuilds
        if self._engine is not None and self._engine.max_seq_len >= needed:
            return self._engine
        self._engine = None  # its KV cache goes before the larger one is made
        if self.batch_size != "auto":
            rows = int(self.batch_size)
        else:  # no collective here: ranks may reach generation with different prompts (or none)
            rows = min(self._auto_batch or self.detect_batch_size(longest), 256)
        block = 16
        blocks = rows * -(-needed // block)
        first = self.rank == 0 and (self.tensor_parallel is None or self.tensor_parallel.rank == 0)
        quiet = None if first else (lambda msg: None)  # its start-up lines from rank 0 only
        self._engine = Engine(model, self.tokenizer, max_batch_size=rows, max_seq_len=needed, block_size=block,
                              num_kv_blocks=blocks, enable_prefix_caching=True, log=quiet)
        return self._engine

    def _eos(self) -> Optional[int]:
        eos = getattr(self.tokenizer, "eod_id", None)
        return eos if eos is not None else getattr(self.tokenizer, "eos_token_id", None)

    @torch.no_grad()
    def generate_until(self, prompts: Sequence[str], until: Sequence[str] = (), max_new_tokens: int = 256) -> list[str]:
        """Greedy continuation of every prompt, cut before the first of ``until`` and stopped at EOS.

        On an lmforge Transformer (or a p-tuned one) the prompts run together through the serving engine
        (:class:`lmforge.serve.engine.Engine`: continuous batching, a KV cache, the prefix cache, so few-shot
        contexts shared by the prompts are computed once); any other model generates one prompt at a time with
        a full forward per token (:meth:`_greedy_loop`). Both give the same text: token ``i`` is the argmax given
        the last ``max_length`` tokens of prompt + output so far. While prompt + output fit ``max_length`` that
        is the engine's KV cache; a prompt of ``n`` tokens that would outgrow it gets its first ``max_length - n``
        tokens from the engine and the rest from :meth:`_greedy_loop`, whose window then slides.

        Under data parallelism rank ``r`` generates prompts ``r, r + world_size, ...``; every rank returns all.
        """
        until = [s for s in until if s]
        mine = list(range(self.rank, len(prompts), self.world_size))
        ids = {p: self.encode(prompts[p]) for p in mine}
        new: dict[int, list[int]] = {p: [] for p in mine}
        done: set[int] = set()
        bar = _progress(self.progress and self.rank == 0, len(mine), "generate")
        if self.engine_model() is not None and max_new_tokens >= 1:
            done = self._engine_generate(ids, new, until, max_new_tokens, bar)
        outputs: list[Optional[str]] = [None] * len(prompts)
        for p in mine:
            if p not in done:
                self._greedy_loop(ids[p], new[p], until, max_new_tokens)
                bar.advance(1)
            text = self.tokenizer.decode(new[p]) if new[p] else ""
            for s in until:
                if s in text:
                    text = text[:text.index(s)]
            outputs[p] = text
        bar.close()
        if self.world_size > 1:
            for r, share in enumerate(self._gather(outputs[self.rank::self.world_size])):
                outputs[r::self.world_size] = share
        return outputs  # type: ignore[return-value]

    def _greedy_loop(self, ids: list[int], new: list[int], until: Sequence[str], max_new_tokens: int) -> None:
        """Append greedy tokens to ``new`` (the output so far) up to ``max_new_tokens`` in all, one full forward
        over the last ``max_length`` tokens each, until EOS or an ``until`` string appears in the decoded output."""
        eos = self._eos()
        for _ in range(max_new_tokens - len(new)):
            window = (ids + new)[-self.max_length:]
            x = torch.tensor([window], dtype=torch.long, device=self.device)
            nxt = int(self._scored_logprobs(x, [(len(window) - 1, len(window))])[0][-1].argmax())
            if eos is not None and nxt == eos:
                break
            new.append(nxt)
            if until and any(s in self.tokenizer.decode(new) for s in until):
                break

    def _engine_generate(self, ids: dict[int, list[int]], new: dict[int, list[int]], until: list[str],
                         max_new_tokens: int, bar) -> set[int]:
        """Run the prompts that fit through the engine, appending each one's tokens to ``new``; returns the prompts
        that are finished (EOS, a stop string, or all ``max_new_tokens``). The others (a prompt with no room left
        in ``max_length``) go on in :meth:`_greedy_loop`.

        For the prefix cache to serve prompts that share their start, one prompt of every group sharing a first
        KV block is prefilled first (requests admitted in one step cannot use each other's blocks).

        Under tensor parallelism rank 0 runs this through a :class:`~lmforge.serve.tensor_parallel.LockstepEngine`
        while the other ranks' engines follow its steps, then every rank gets rank 0's tokens and finished prompts
        (the same as their own engines', which the lockstep checks)."""
        from lmforge.serve.engine import RequestFailedError, SamplingParams

        eos = self._eos()
        stop_ids = [eos] if eos is not None else []  # stop strings that are special tokens: the engine stops on them
        fits = {p: t for p, t in ids.items() if 0 < len(t) < self.max_length}
        if not fits:
            return set()
        engine = self._engine_for(max(len(t) for t in fits.values()) + max_new_tokens)
        lockstep = None
        if self.tensor_parallel is not None:
            from lmforge.serve.tensor_parallel import LockstepEngine

            lockstep = LockstepEngine(engine, self.tensor_parallel.control, self.tensor_parallel.rank)
            if lockstep.rank > 0:
                lockstep.follow()  # until rank 0's engine has no work left
                shared = lockstep.share()
                for p, tokens in shared["new"]:
                    new[p].extend(tokens)
                return set(shared["done"])
            engine = lockstep
        room = engine.context_len
        todo = {p: t for p, t in fits.items() if len(t) < room}
        bs = engine.block_size
        groups: dict[tuple[int, ...], list[int]] = {}
        for p, t in todo.items():
            if len(t) > bs:
                groups.setdefault(tuple(t[:bs]), []).append(p)
        shared = [g for g in groups.values() if len(g) > 1]
        first = [g[0] for g in shared]
        # the others sharing a block next, while it is still cached, then the rest
        rest = [p for g in shared for p in g[1:]] + [p for p in todo if not any(p in g for g in shared)]
        rid = {p: f"eval-{p}-{self._requests}" for p in todo}
        self._requests += 1
        owner = {r: p for p, r in rid.items()}
        done: set[int] = set()
        started: set[int] = set()

        def submit(batch: list[int]) -> None:
            for p in batch:
                t = todo[p]
                params = SamplingParams(max_tokens=min(max_new_tokens, room - len(t)), temperature=0.0,
                                        stop=list(until), stop_token_ids=stop_ids)
                engine.add_request(rid[p], t, params)

        def run(primed: Optional[list[int]] = None) -> None:
            """Step until every prompt of ``primed`` has its first token (None: until all are finished)."""
            while engine.has_work() and (primed is None or not set(primed) <= started):
                for out in engine.step():
                    p = owner[out.request_id]
                    started.add(p)
                    new[p].extend(out.token_ids)
                    if not out.finished:
                        continue
                    if out.finish_reason == "error":
                        raise RequestFailedError(f"generating for prompt {p} failed in the serving engine: "
                                                 f"{out.error}")
                    if out.finish_reason == "stop" or len(new[p]) >= max_new_tokens:
                        done.add(p)
                        bar.advance(1)

        try:
            submit(first)
            run(first)  # their prompts' blocks are in the prefix cache now
            submit(rest)
            run()
        except BaseException:
            self._engine = None  # requests of this call may still be in it: the next call builds a fresh one
            if lockstep is not None:
                lockstep.close(check=False)  # the other ranks stop following; the launcher ends them
            raise
        if lockstep is not None:
            lockstep.close()
            lockstep.share({"new": [[p, new[p]] for p in sorted(todo)], "done": sorted(done)})
        return done


def _family_batches(families, batch_size: int) -> list[list]:
    """Families grouped by context length, each group cut into batches of about ``batch_size`` member rows."""
    by_len: dict[int, list] = {}
    for fam in families:
        by_len.setdefault(len(fam[0]), []).append(fam)
    out = []
    for _, fams in sorted(by_len.items(), reverse=True):
        chunk, rows = [], 0
        for fam in fams:
            if chunk and rows + len(fam[1]) > batch_size:
                out.append(chunk)
                chunk, rows = [], 0
            chunk.append(fam)
            rows += len(fam[1])
        out.append(chunk)
    return out


class _NoBar:
    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    """A rich progress bar over ``total`` items."""

    def __init__(self, total: int, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  transient=True)
        self._task = self._progress.add_task(label, total=total)
        self._progress.start()

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, total: int, label: str):
    return _RichBar(total, label) if enabled else _NoBar()


ModelFn = Callable[[torch.Tensor], torch.Tensor]
