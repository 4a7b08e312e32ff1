"""The inference engine: a slot-per-sequence KV cache, a continuous-batching scheduler and sampling.

Nothing here knows about HTTP. The server (:mod:`lmforge.serve.server`) talks to an
:class:`~lmforge.serve.client.AsyncEngineClient`, which runs an :class:`Engine` in a thread.

How a step works (:meth:`Engine.step`):

1. *Admit*: waiting requests take free cache slots while the batch has room (``max_batch_size``) and
   the prompts of this step fit ``max_prefill_tokens``; they are prefilled together in one forward
   (right-padded), and each samples its first token.
2. *Decode*: every running sequence feeds its newest token at its own position in one batched
   forward (``positions`` (B, 1)); each samples its next token.
3. Finished sequences leave the batch; the last running sequence moves into the freed slot, so the
   running batch always occupies slots ``0..n-1`` and the decode step reads a plain slice of the cache.

Greedy decoding through the engine gives the tokens of :func:`lmforge.models.generate.generate` for
every request, whatever else is in the batch (up to floating-point ties).

On a GPU, ``compile_decode=True`` compiles the decode step (:meth:`Engine._decode_step`: every layer, the
head and the argmax) with ``torch.compile`` and captures it as CUDA graphs (:class:`_DecodeGraphs`) per
batch bucket (powers of two) and span bucket (multiples of 256 keys); a step is then one small copy and a
few graph replays (embedding, block chunks, head). The CPU path is plain eager PyTorch. The KV cache is
:class:`lmforge.serve.cache.SlotKVCache`.

Not supported yet: beam search, chunked prefill, prefix caching.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.models.generate import MIN_TEMPERATURE  # below it: greedy (dividing would overflow float32)
from lmforge.models.transformer import fuse_projections
from lmforge.serve.cache import SlotKVCache, bucket
from lmforge.serve.kernels import available as kernels_available, linear, use_decode_kernels

__all__ = ["SamplingParams", "RequestOutput", "TokenLogprob", "SlotKVCache", "Engine", "InvalidRequestError",
           "PromptTooLongError", "EngineBusyError", "RequestFailedError", "process_logits", "bucket"]


# ----------------------------------------------------------------------------------------------
# Errors a client can cause (the server maps them to HTTP statuses)


class InvalidRequestError(UserError):
    """A request the engine cannot run as given (a bad sampling value, an empty prompt): HTTP 400."""

    status = 400

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context or the server's prompt limit: HTTP 413."""

    status = 413


class EngineBusyError(UserError):
    """The queue is full or the engine is shutting down: HTTP 503 (try again later)."""

    status = 503


class RequestFailedError(UserError):
    """One request failed inside the engine (non-finite logits, a failed forward): HTTP 500 for that request
    alone; the engine goes on with the others."""

    status = 500


#: Logits are clamped to +-LOGIT_LIMIT after penalties and temperature, so no value becomes inf or NaN.
LOGIT_LIMIT = 1e30
#: Seeds accepted: a signed 64-bit integer (what torch.Generator.manual_seed takes).
SEED_RANGE = (-2**63, 2**63 - 1)


# ----------------------------------------------------------------------------------------------
# Values passed in and out


@dataclass
class SamplingParams:
    """How one request is decoded (OpenAI's parameters plus vLLM's usual extras).

    Args:
        max_tokens: most new tokens (the stop token, when one ends the sequence, counts as one).
        temperature: 0 to 2; 0 (or anything below ``MIN_TEMPERATURE``) means greedy (argmax).
        top_k: keep the k most likely tokens (0 or None: all).
        top_p: nucleus sampling mass (1.0: all).
        min_p: drop tokens whose probability is below ``min_p`` x the top probability (0: off).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL/HF rule:
            positive logits divided, negative multiplied).
        frequency_penalty, presence_penalty: OpenAI's: ``logit -= frequency * count + presence * (count > 0)``
            over the tokens generated so far.
        stop: strings that end the output; the stop string is not returned.
        stop_token_ids: token ids that end the output (as the end-of-sequence token does).
        ignore_eos: keep going past the tokenizer's end-of-sequence token.
        seed: seeds this request's own generator (same seed, same tokens); None draws a random seed.
        logprobs: None for none; k >= 0 returns the chosen token's log-probability and the k most likely,
            one entry per generated token (a stop token that ends the output included, though its text is not).
        prompt_logprobs: None for none; k >= 0 returns, for every prompt token after the first, its
            log-probability given the tokens before it and the k most likely there (OpenAI's ``echo`` with
            ``logprobs``; lm-evaluation-harness scores a served model this way). With ``max_tokens=0`` only
            the prompt is processed.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    MAX_LOGPROBS = 20

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad field.

        Ranges are OpenAI's (temperature 0..2, presence/frequency penalties -2..2, top_p in (0, 1]) plus vLLM's
        extras (repetition_penalty > 0, min_p in [0, 1]); every float must be finite and the seed a signed 64-bit
        integer (NaN and infinities are refused by name).
        """
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not _finite(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be a finite number, got {getattr(self, name)!r}", name)
        checks = [
            (_is_int(self.max_tokens) and (self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None)),
             "max_tokens", f"max_tokens must be >= 1 (0 only with prompt logprobs: echo), got {self.max_tokens}"),
            (0 <= self.temperature <= 2, "temperature", f"temperature must be between 0 and 2 (0: greedy), got "
                                                        f"{self.temperature}"),
            (self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0), "top_k",
             f"top_k must be an integer >= 0 (0: off), got {self.top_k}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, "repetition_penalty",
             f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]), "seed",
             f"seed must be an integer between -2**63 and 2**63 - 1, got {self.seed}"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= self.MAX_LOGPROBS), "logprobs",
             f"logprobs must be between 0 and {self.MAX_LOGPROBS}, got {self.logprobs}"),
            (self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                              and 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS), "logprobs",
             f"prompt logprobs must be between 0 and {self.MAX_LOGPROBS}, got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"),
            (all(_is_int(t) for t in self.stop_token_ids), "stop_token_ids", "stop_token_ids must be integers"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or one so small that dividing by it would overflow."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TokenLogprob:
    """The log-probability of a generated token and the ``top`` most likely alternatives ``[(id, logprob)]``.

    Log-probabilities are those of the model's raw distribution (before temperature and filters).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text since the last output.

    ``text`` is the new text only (a stop string and anything after it are never sent; text that
    could still become a stop string, or an incomplete UTF-8 character, is held back a step).
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: Optional[list[TokenLogprob]]
    finished: bool
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | "error" | None
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # first output only; None for token 0
    error: Optional[str] = None  # finish_reason "error": what failed (this request alone)


# ----------------------------------------------------------------------------------------------
# Sampling


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[tuple[list, list]]
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
    if (top_p < 1).any():
        sorted_rows, order = rows.sort(dim=-1, descending=True)
        probs = sorted_rows.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens; the first token is always kept
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        rows = rows.masked_fill(drop, float("-inf"))
    min_p = torch.tensor([p.min_p for p in sp], device=logits.device)[:, None]
    if (min_p > 0).any():
        probs = rows.softmax(-1)
        rows = rows.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    logits[idx] = rows
    return logits


# ----------------------------------------------------------------------------------------------
# The engine


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


class _DecodeGraphs:
    """The compiled decode step captured as CUDA graphs, per (batch bucket, span bucket).

    Inputs live in one static device buffer (token ids and positions of every row), filled by a single
    host-to-device copy per step; replaying the graphs then runs the whole step (embedding, every block,
    the head and the argmax) with no host work between kernels. The step is cut into ``chunks`` + 2 graphs
    (:meth:`Engine._decode_embed`, ``_decode_blocks`` over an even share of the blocks, ``_decode_head``).
    Each piece compiles once for all spans (a dynamic dimension); a shape is recorded at first use after
    two warm-up runs, which compute exactly what the step will (the same keys and values in the cache).
    """

    def __init__(self, engine: "Engine", chunks: int, mode: Optional[str] = None, options: Optional[dict] = None):
        kw = {"options": options} if options else {"mode": mode}
        self.embed = torch.compile(engine._decode_embed, **kw)
        self.blocks = torch.compile(engine._decode_blocks, **kw)
        self.head = torch.compile(engine._decode_head, **kw)
        L = len(engine.model.layers)
        bounds = sorted({round(i * L / max(1, min(chunks, L))) for i in range(max(1, min(chunks, L)) + 1)})
        self.spans = list(zip(bounds[:-1], bounds[1:]))  # blocks [lo, hi) of each graph
        self.keys = engine._keys
        num_slots = engine.cache.num_slots
        # (ids, positions, advance) x rows; advance is 1 for a row that decodes a sequence, 0 for padding
        self.host = torch.zeros(3, num_slots, dtype=torch.long).pin_memory()
        self.inputs = torch.zeros(3, num_slots, dtype=torch.long, device=engine.device)
        self.graphs: dict[tuple[int, int], tuple[list[torch.cuda.CUDAGraph], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, ids: list[int], positions: list[int], advance: list[int], span: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        B = len(ids)
        self.host[0, :B] = torch.tensor(ids)
        self.host[1, :B] = torch.tensor(positions)
        self.host[2, :B] = torch.tensor(advance)
        self.inputs[:, :B].copy_(self.host[:, :B], non_blocking=True)
        return self.replay(B, span)

    def run_chained(self, greedy: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step after the last one, fed on the device: each row's argmax ``greedy`` (B,) is its next
        token, one position further (padding rows stay). No host value is read."""
        B = greedy.shape[0]
        self.inputs[0, :B].copy_(greedy)
        self.inputs[1, :B].add_(self.inputs[2, :B])
        return self.replay(B, span)

    def replay(self, B: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (B, span) not in self.graphs:
            self.graphs[(B, span)] = self._capture(B, span)
        graphs, out = self.graphs[(B, span)]
        for graph in graphs:
            graph.replay()
        return out

    def _step(self, ids, positions, keys, graphs: Optional[list] = None):
        """Run the pieces in order; with ``graphs``, capture each into a new graph appended to it."""

        def piece(fn, *args):
            if graphs is None:
                return fn(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(*args)
            graphs.append(graph)
            return out

        x, rope = piece(self.embed, ids, positions, keys)
        for lo, hi in self.spans:
            x = piece(self.blocks, x, rope, positions, keys, lo, hi)
        return piece(self.head, x)

    def _capture(self, B: int, span: int):
        ids, positions = self.inputs[0, :B, None], self.inputs[1, :B, None]  # (B, 1) views of the static buffer
        keys = self.keys[:span]
        torch._dynamo.maybe_mark_dynamic(keys, 0)
        if B > 1:
            torch._dynamo.maybe_mark_dynamic(ids, 0)
            torch._dynamo.maybe_mark_dynamic(positions, 0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(ids, positions, keys)
        torch.cuda.current_stream().wait_stream(side)
        graphs: list[torch.cuda.CUDAGraph] = []
        out = self._step(ids, positions, keys, graphs)
        return graphs, out


@dataclass
class _Decode:
    """A decode step launched on the device: ``seqs[i]`` is row ``rows[i]`` of its outputs.

    ``logits`` (B, V) and ``greedy`` (B,) may be the CUDA graphs' buffers, valid until the next step runs.
    When ``tokens`` is set the step is greedy-only and its argmax is on its way to that host buffer (``ready``
    records its arrival): it can be read after the next step was launched.
    """
    seqs: list
    rows: list[int]
    logits: torch.Tensor
    greedy: torch.Tensor
    positions: list[int]  # every row's input position (B,)
    advance: list[int]  # 1 for a row decoding a sequence, 0 for padding
    pos: Optional[torch.Tensor] = None  # eager path: the (B, 1) input positions on the device
    tokens: Optional[torch.Tensor] = None
    ready: Any = None

    def read_tokens(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class _Sequence:
    """One request inside the engine."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, device: torch.device,
                 max_new: int):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new = max_new  # max_tokens clipped to the cache length
        self.output_ids: list[int] = []
        self.num_generated = 0  # output tokens plus a final stop token
        self.slot = -1
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = None if params.greedy else torch.Generator(device=device).manual_seed(seed)
        self.text = ""  # the decoded output: confirmed text + the undecided tail (maybe a partial character)
        self.confirmed = ""  # text of output_ids[:read_offset]
        self.prefix_offset = 0  # output_ids[prefix_offset:read_offset] is decoded again as the new text's left context
        self.read_offset = 0
        self.sent_chars = 0
        self.sent_tokens = 0
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # set at prefill, sent once
        self.finish_reason: Optional[str] = None
        self.adapter = 0  # slot of its LoRA adapter in the engine's MultiLoRA (0: the base model)
        self.prefix_len = 0  # p-tuning's virtual tokens in front of the prompt (in the cache, not in prompt_ids)
        self.error: Optional[str] = None

    def fail(self, message: str) -> None:
        """End this sequence with an error (finish_reason "error"); the engine releases it like a finished one."""
        self.finish_reason = "error"
        self.error = message

    @property
    def length(self) -> int:
        """Tokens in the cache once the newest output token is fed (virtual tokens of p-tuning included)."""
        return self.prefix_len + len(self.prompt_ids) + len(self.output_ids)


class Engine:
    """Continuous-batching generation over a :class:`~lmforge.models.transformer.Transformer`.

    Args:
        model: the model (eval mode; its parameters' device and dtype are used).
        tokenizer: an lmforge tokenizer (``decode``, ``eod_id``); None gives token ids only (no text,
            no stop strings).
        max_batch_size: most sequences decoded together (cache slots).
        max_seq_len: positions per slot (prompt + output); default ``min(max_position_embeddings, 8192)``.
        max_prefill_tokens: most (padded) prompt tokens prefilled in one step; a longer single prompt
            is still admitted alone.
        lora: a :class:`~lmforge.peft.multi_lora.MultiLoRA` already applied to ``model`` (its ``max_rows`` at
            least the batch, rounded up to a power of two when compiled): each request may then name one of
            its adapters (:meth:`add_request`), and a batch mixes adapters freely.
        compile_decode: compile the decode step and capture it in CUDA graphs (GPU only; ignored on CPU).
            This fuses the model's q/k/v and gate/up projections in place
            (:func:`~lmforge.models.transformer.fuse_projections`): do not train or save it afterwards.
        graph_chunks: CUDA graphs the blocks of a decode step are split into (evenly). Greedy steps are
            pipelined, so their launch is hidden and one graph is fastest (fewer gaps); with several, the launch
            of the next overlaps the GPU running this one, which helps steps that sample on the host.
        compile_mode: ``torch.compile`` mode of the decode pieces: None (default kernels) or one without
            CUDA graphs of its own, e.g. ``"max-autotune-no-cudagraphs"`` (tunes matrix kernels; slower start).
        compile_options: inductor options instead of a mode (``torch.compile(options=...)``), e.g.
            ``{"coordinate_descent_tuning": True}``.
        decode_kernels: in the compiled step, run single-row matrix products and single-token attention with
            lmforge's Triton kernels (:mod:`lmforge.serve.kernels`): the batch-1 decode runs nearer the
            memory bandwidth. Needs Triton (ignored without it).
    """

    def __init__(self, model, tokenizer=None, max_batch_size: int = 32, max_seq_len: Optional[int] = None,
                 max_prefill_tokens: int = 8192, compile_decode: bool = False, lora=None, graph_chunks: int = 1,
                 compile_mode: Optional[str] = None, compile_options: Optional[dict] = None, decode_kernels: bool = True):
        if max_batch_size < 1:
            raise InvalidRequestError(f"max_batch_size must be >= 1, got {max_batch_size}")
        # A p-tuned model (lmforge.peft.PromptTunedModel): every sequence starts with its virtual tokens, ids
        # vocab_size.. that the model's embedding maps to the prompt encoder's output (computed once here).
        self.prefix_ids: list[int] = []
        if hasattr(model, "num_virtual_tokens") and hasattr(model, "model"):
            vocab = model.model.embed_tokens.num_embeddings
            self.prefix_ids = list(range(vocab, vocab + model.num_virtual_tokens))
            model = model.model
            model.embed_tokens.freeze()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = min(max_seq_len or min(self.cfg.max_position_embeddings, 8192),
                               self.cfg.max_position_embeddings)
        if self.max_seq_len - len(self.prefix_ids) < 2:
            raise InvalidRequestError(f"max_seq_len={self.max_seq_len} leaves no room after the "
                                      f"{len(self.prefix_ids)} virtual tokens of p-tuning")
        self.context_len = self.max_seq_len - len(self.prefix_ids)  # prompt + output tokens a request may use
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.compiled = bool(compile_decode) and self.device.type == "cuda"
        # With CUDA graphs every decode shape is a recorded graph: round batch and span up to buckets.
        self.batch_step = 0 if self.compiled else 1
        self.span_step = 256 if self.compiled else (64 if self.device.type == "cuda" else 1)
        num_slots = bucket(max_batch_size, self.batch_step)
        self.cache = SlotKVCache(self.cfg, num_slots, self.max_seq_len, self.device, self.dtype)
        self.lora = lora
        if lora is not None and lora.max_rows < num_slots:
            raise InvalidRequestError(f"the MultiLoRA holds {lora.max_rows} rows but this engine decodes up to "
                                      f"{num_slots}; build it with max_rows={num_slots}")
        self.eos_id = getattr(tokenizer, "eod_id", None) if tokenizer is not None else None
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # running[i] sits in slot i
        self._ids: set[str] = set()
        self._keys = torch.arange(self.max_seq_len, device=self.device)  # a decode step attends keys[:span]
        self._head = model.output_weight().detach()  # read once: a normalised head (Baichuan) is not redone per step
        self._graphs: Optional[_DecodeGraphs] = None
        self._linear = F.linear  # the head's product (the Triton single-row kernel with decode_kernels)
        self._inflight: Optional[_Decode] = None  # a greedy-only decode step launched but not read yet
        self._flip = 0
        self._token_host = ([torch.zeros(num_slots, dtype=torch.long).pin_memory() for _ in range(2)]
                            if self.device.type == "cuda" else [])
        if self.compiled:
            fuse_projections(self.model)  # one matrix read for q/k/v and for gate/up: nearer the bandwidth at batch 1
            limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 64))
            if compile_mode in ("reduce-overhead", "max-autotune"):
                raise InvalidRequestError(f"compile_mode={compile_mode!r} records CUDA graphs itself; the engine "
                                          f"captures its own: use None or 'max-autotune-no-cudagraphs'")
            if compile_mode is not None and compile_options:
                raise InvalidRequestError("give compile_mode or compile_options, not both")
            if decode_kernels and kernels_available(self.device):
                use_decode_kernels(self.model)
                self._linear = linear
            self._graphs = _DecodeGraphs(self, graph_chunks, compile_mode, compile_options)

    # -- requests ----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                    adapter: Optional[str] = None) -> None:
        """Queue a request, decoded with LoRA adapter ``adapter`` (a name of the engine's ``lora``; None: the
        base model). Raises :class:`InvalidRequestError` / :class:`PromptTooLongError` at once."""
        params.validate()
        adapter_slot = 0
        if adapter is not None:
            names = self.lora.names if self.lora is not None else []
            if adapter not in names:
                raise InvalidRequestError(f"adapter {adapter!r} is not loaded; loaded adapters: "
                                          f"{', '.join(names) or '(none)'}", "model")
            adapter_slot = self.lora.index(adapter)
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
        if request_id in self._ids:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if len(prompt) >= self.context_len:
            raise PromptTooLongError(f"the prompt has {len(prompt)} tokens but this engine holds {self.context_len} "
                                     f"positions per sequence; shorten it to at most {self.context_len - 1} tokens",
                                     "prompt")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})", "prompt")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer", "stop")
        max_new = min(params.max_tokens, self.context_len - len(prompt))
        seq = _Sequence(request_id, prompt, params, self.device, max_new)
        seq.adapter = adapter_slot
        seq.prefix_len = len(self.prefix_ids)
        self.waiting.append(seq)
        self._ids.add(request_id)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Drop a request; returns its final output (finish_reason "abort") or None if unknown."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish_reason = "abort"
                self._ids.discard(request_id)
                return self._output(seq)
        for seq in self.running:
            if seq.request_id == request_id and seq.finish_reason != "abort":
                seq.finish_reason = "abort"
                out = self._output(seq)
                if self._inflight is None:
                    self._release([seq])  # else the next step releases it, once the step in flight is read
                return out
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the loop ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: admit and prefill waiting requests, then decode the running batch.

        Returns one :class:`RequestOutput` per request that produced tokens or finished.

        A greedy-only decode step is left running on the device: the next call launches the step after it
        (fed on the device with its argmax, see :meth:`_can_chain`) before reading its tokens, so the host's
        work of one step (reading tokens, stop checks, detokenizing, launching) overlaps the device's next.
        """
        touched: dict[str, _Sequence] = {}
        if self._inflight is not None:
            d, self._inflight = self._inflight, None
            nxt = self._launch_chained(d) if self._can_chain(d) else None
            self._finish_decode(d, touched)
            if nxt is not None:
                if any(s.finish_reason is not None for s in d.seqs):
                    self._finish_decode(nxt, touched)  # slots are about to move: read it now
                else:
                    self._inflight = nxt
        else:
            new = self._admit()
            if new:
                first = len(self.running)
                self.running.extend(new)
                for i, seq in enumerate(new):
                    seq.slot = first + i
                new = self._start_isolated(new, first, touched)
            ready = [s for s in self.running if s.finish_reason is None and s.output_ids and s not in new]
            if ready:
                d = self._launch_decode(ready)
                if d.tokens is not None and not new:
                    self._inflight = d  # read by the next call, after it launched the following step
                else:
                    self._finish_decode(d, touched)
        outputs = [self._output(s) for s in touched.values()
                   if s.finish_reason != "abort" and (s.finish_reason is not None or len(s.output_ids) > s.sent_tokens)]
        if self._inflight is None:
            self._release([s for s in self.running if s.finish_reason is not None])
        return outputs

    def _start_isolated(self, new: list[_Sequence], first: int, touched: dict[str, "_Sequence"]) -> list[_Sequence]:
        """:meth:`_start` the new sequences (already at the end of ``running``, from slot ``first``). When that
        fails (a prompt too big for memory, say), each is started alone so that only the ones that fail by
        themselves get an error; the running sequences are never touched. Returns the sequences started."""
        try:
            self._start(new, first, touched)
            return new
        except Exception as e:
            error = e
        del self.running[first:]  # the new ones sit at the end: no slot moves
        fresh = all(not s.output_ids and s.num_generated == 0 for s in new)
        started = []
        for s in new:
            s.finish_reason = None
            if fresh and len(new) > 1:
                s.slot = len(self.running)
                self.running.append(s)
                try:
                    self._start([s], s.slot, touched)
                    started.append(s)
                    continue
                except Exception as e:
                    error = e
                    self.running.pop()
            s.fail(f"the prompt's forward pass failed: {type(error).__name__}: {error}")
            self._ids.discard(s.request_id)
            touched[s.request_id] = s
        return started

    def _start(self, new: list[_Sequence], first: int, touched: dict[str, "_Sequence"]) -> None:
        """Prefill ``new`` (in slots ``first``...) and sample each one's first token."""
        logits = self._prefill(new, first)
        sample = [b for b, s in enumerate(new) if s.max_new > 0]
        for s in new:
            if s.max_new == 0:  # the prompt only (echo with prompt logprobs)
                s.finish_reason = "length"
                touched[s.request_id] = s
        if sample:
            self._advance([new[b] for b in sample], logits, touched, rows=sample)

    def fail_running(self, error: BaseException) -> list[RequestOutput]:
        """After a step failed outside one request's own work (a decode forward): end every running sequence
        with an error, free every slot and return their outputs. Waiting requests stay queued; the engine
        serves them next as if it had just started."""
        message = f"the engine step failed: {type(error).__name__}: {error}"
        outputs = []
        for seq in self.running:
            if seq.finish_reason != "abort":
                seq.fail(message)
                outputs.append(self._output(seq))
            self._ids.discard(seq.request_id)
        self.running = []
        self._inflight = None
        return outputs

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> list[list[int]]:
        """Run ``prompts`` to completion (offline use and tests); returns each one's new token ids."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [f"gen-{i}-{secrets.token_hex(4)}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        result: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work():
            for out in self.step():
                result[out.request_id].extend(out.token_ids)
        return [result[rid] for rid in ids]

    # -- scheduling ----------------------------------------------------------------------------------

    def _admit(self) -> list[_Sequence]:
        new: list[_Sequence] = []
        longest = 0
        while self.waiting and len(self.running) + len(new) < self.max_batch_size:
            seq = self.waiting[0]
            longest2 = max(longest, len(seq.prompt_ids))
            if new and longest2 * (len(new) + 1) > self.max_prefill_tokens:
                break
            new.append(self.waiting.popleft())
            longest = longest2
        return new

    def _release(self, done: list[_Sequence]) -> None:
        """Remove finished sequences; the last running sequence moves into each freed slot."""
        for seq in done:
            slot = self.running.index(seq)
            last = self.running[-1]
            if last is not seq:
                self.cache.move(last.slot, slot, last.length - 1)
                self.running[slot] = last
                last.slot = slot
            self.running.pop()
            self._ids.discard(seq.request_id)

    # -- forwards ------------------------------------------------------------------------------------

    def _logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(hidden, self._head).float()  # (B, V)

    def _prefill(self, seqs: list[_Sequence], first_slot: int) -> torch.Tensor:
        n = len(self.prefix_ids)
        lens = [n + len(s.prompt_ids) for s in seqs]
        T = max(lens)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : lens[b]] = torch.tensor(self.prefix_ids + s.prompt_ids)
        lengths = torch.tensor(lens)
        positions = torch.arange(T)[None, :].expand(len(seqs), T)
        valid = positions < lengths[:, None]
        positions = torch.where(valid, positions, torch.zeros_like(positions))
        dev = self.device
        span = bucket(T, self.span_step, self.max_seq_len)
        self.cache.bind(first_slot, lengths, positions, valid, span)
        if self.lora is not None:
            self.lora.set_rows([s.adapter for s in seqs])
        hidden = self.model.hidden_states(ids.to(dev), kv_cache=self.cache, positions=positions.to(dev))  # (B, T, C)
        last = hidden[torch.arange(len(seqs), device=dev), (lengths - 1).to(dev)]  # (B, C)
        for b, s in enumerate(seqs):
            if s.params.prompt_logprobs is not None:
                s.prompt_logprobs = self._prompt_logprobs(hidden[b, n: lens[b]], s.prompt_ids, s.params.prompt_logprobs)
        return self._logits_at(last)

    def _prompt_logprobs(self, hidden: torch.Tensor, ids: list[int], k: int, chunk: int = 512
                         ) -> list[Optional[TokenLogprob]]:
        """Each prompt token's log-probability given the ones before it (None for the first), with the k most
        likely there. ``hidden`` (T, C); the head runs over ``chunk`` positions at a time (bounded memory)."""
        out: list[Optional[TokenLogprob]] = [None]
        targets = torch.tensor(ids[1:], device=hidden.device)
        for lo in range(0, len(ids) - 1, chunk):
            logp = self._logits_at(hidden[lo: lo + chunk][: len(ids) - 1 - lo]).log_softmax(-1)  # (n, V)
            chosen = logp.gather(-1, targets[lo: lo + logp.shape[0], None])[:, 0].tolist()
            top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
            for j, value in enumerate(chosen):
                top = list(zip(top_i[j].tolist(), top_v[j].tolist())) if k else []
                out.append(TokenLogprob(ids[lo + j + 1], value, top))
        return out

    # The decode step in pieces: embedding, blocks lo..hi, then norm + head + argmax. Eager they run back to
    # back; compiled, each piece is its own CUDA graph, so launching the next one overlaps running this one.
    # Everything they read is a device tensor (no host values).

    def _decode_embed(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor):
        self.cache.bind_decode(keys)
        return self.model.embed(ids, positions=positions)  # (B, 1, C), rotary rows (or None)

    def _decode_blocks(self, x: torch.Tensor, rope, positions: torch.Tensor, keys: torch.Tensor, lo: int,
                       hi: int) -> torch.Tensor:
        self.cache.bind_decode(keys)
        for layer in self.model.layers[lo:hi]:
            x = layer(x, rope, self.cache, 0, positions, None)
        return x

    def _decode_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits_at(self.model.norm(x)[:, -1])  # (B, V) fp32
        return logits, argmax_rows(logits)

    def _decode_step(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode forward: ``ids``, ``positions`` (B, 1), row b in slot b, attending ``keys`` (S,).

        Returns the next-token logits (B, V) fp32 and their argmax (B,).
        """
        x, rope = self._decode_embed(ids, positions, keys)
        x = self._decode_blocks(x, rope, positions, keys, 0, len(self.model.layers))
        return self._decode_head(x)

    def _launch_decode(self, ready: list[_Sequence]) -> _Decode:
        """Start a decode step of every sequence in ``ready`` (row = slot); greedy-only steps copy their
        argmax to the host asynchronously (:attr:`_Decode.tokens`)."""
        n = len(self.running)
        B = bucket(n, self.batch_step, self.cache.num_slots)
        # Rows without a token this step (padding, or a sequence prefilled in this very step) write into the
        # last position of their own slot, which no sequence reads before writing it itself.
        ids, pos, advance = [0] * B, [self.max_seq_len - 1] * B, [0] * B
        for s in ready:
            ids[s.slot], pos[s.slot], advance[s.slot] = s.output_ids[-1], s.length - 1, 1
        rows = [s.slot for s in ready]
        span = self._span(max(pos[r] for r in rows))
        if self.lora is not None:
            adapters = [0] * B
            for s in ready:
                adapters[s.slot] = s.adapter
            self.lora.set_rows(adapters)
        if self._graphs is not None:
            logits, greedy = self._graphs.run(ids, pos, advance, span)
            d = _Decode(ready, rows, logits, greedy, pos, advance)
        else:
            dev = self.device
            ids_t, pos_t = torch.tensor(ids, device=dev)[:, None], torch.tensor(pos, device=dev)[:, None]
            logits, greedy = self._decode_step(ids_t, pos_t, self._keys[:span])
            d = _Decode(ready, rows, logits, greedy, pos, advance, pos=pos_t)
        if all(self._pipelinable(s) for s in ready):
            self._tokens_to_host(d)
        return d

    def _launch_chained(self, d: _Decode) -> _Decode:
        """Start the step after ``d`` without reading it: each row feeds ``d``'s argmax one position on."""
        pos = [p + a for p, a in zip(d.positions, d.advance)]
        span = self._span(max(pos[r] for r in d.rows))
        if self._graphs is not None:
            logits, greedy = self._graphs.run_chained(d.greedy, span)
            nxt = _Decode(d.seqs, d.rows, logits, greedy, pos, d.advance)
        else:
            pos_t = d.pos + torch.tensor(d.advance, device=self.device)[:, None]
            logits, greedy = self._decode_step(d.greedy[:, None], pos_t, self._keys[:span])
            nxt = _Decode(d.seqs, d.rows, logits, greedy, pos, d.advance, pos=pos_t)
        self._tokens_to_host(nxt)
        return nxt

    def _span(self, last_position: int) -> int:
        return bucket(last_position + 1, self.span_step, self.max_seq_len)

    def _tokens_to_host(self, d: _Decode) -> None:
        if self.device.type != "cuda":
            d.tokens = d.greedy
            return
        self._flip ^= 1  # two buffers: the next step's copy must not overwrite tokens not read yet
        d.tokens = self._token_host[self._flip][: d.greedy.shape[0]]
        d.tokens.copy_(d.greedy, non_blocking=True)
        d.ready = torch.cuda.Event()
        d.ready.record()

    @staticmethod
    def _pipelinable(seq: _Sequence) -> bool:
        """Whether the next token needs only the step's argmax (no sampling, penalties or logprobs)."""
        p = seq.params
        return p.greedy and not p.needs_penalties and p.logprobs is None

    def _can_chain(self, d: _Decode) -> bool:
        """Whether the step after ``d`` may start before ``d`` is read: ``d`` is greedy-only and decodes every
        running sequence, none of which was aborted or ends by length with ``d``'s token, and no waiting request
        could join the batch now. (A sequence that then stops on a token or a stop string only wastes its row.)"""
        if d.tokens is None or len(d.seqs) != len(self.running):
            return False
        if self.waiting and len(self.running) < self.max_batch_size:
            return False
        return all(s.finish_reason is None and s.num_generated + 1 < s.max_new and s.length + 1 < self.max_seq_len
                   for s in d.seqs)

    def _finish_decode(self, d: _Decode, touched: dict[str, "_Sequence"]) -> None:
        """Read ``d`` and append each sequence's token (sequences that finished meanwhile are skipped)."""
        live = [(s, r) for s, r in zip(d.seqs, d.rows) if s.finish_reason is None]
        if not live:
            return
        seqs, rows = [s for s, _ in live], [r for _, r in live]
        if d.tokens is not None:
            tokens = d.read_tokens()
            for seq, r in zip(seqs, rows):
                self._append(seq, tokens[r])
                touched[seq.request_id] = seq
        else:
            self._advance(seqs, d.logits, touched, rows, d.greedy)

    # -- sampling and stopping -------------------------------------------------------------------------

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor, touched: dict[str, "_Sequence"],
                 rows: Optional[list[int]] = None, greedy: Optional[torch.Tensor] = None) -> None:
        """Sample each sequence's next token from ``logits`` (row ``rows[i]`` for ``seqs[i]``; all rows in
        order when None), append it and note the sequence in ``touched``. ``greedy`` (the argmax of every row)
        serves plain greedy batches."""
        params = [s.params for s in seqs]
        rows = rows if rows is not None else list(range(len(seqs)))
        if greedy is not None and all(p.greedy and not p.needs_penalties and p.logprobs is None for p in params):
            argmax = greedy.tolist()
            chosen = [argmax[r] for r in rows]
        else:
            chosen = self._sample(seqs, logits[torch.tensor(rows, device=logits.device)])
        for seq, token in zip(seqs, chosen):
            if seq.finish_reason is None:  # a sequence that failed in sampling gets no token
                self._append(seq, token)
            touched[seq.request_id] = seq

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Each sequence's next token from its row of ``logits`` (n, V), its logprobs queued when asked for."""
        params = [s.params for s in seqs]
        processed = process_logits(logits, params, [(s.prompt_ids, s.output_ids) for s in seqs])
        chosen: list[int] = processed.argmax(-1).tolist()
        sampled = [b for b, p in enumerate(params) if not p.greedy]
        if sampled:
            probs = processed[sampled].softmax(-1)
            ok = torch.isfinite(probs).all(-1).tolist()
            for j, b in enumerate(sampled):
                if not ok[j]:  # NaN logits (broken weights): this request fails, the batch goes on
                    seqs[b].fail("the model's next-token distribution is not finite (NaN or inf logits)")
                    continue
                chosen[b] = int(torch.multinomial(probs[j], 1, generator=seqs[b].generator))
        want_lp = [b for b, p in enumerate(params) if p.logprobs is not None]
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
        return chosen

    def _append(self, seq: _Sequence, token: int) -> None:
        p = seq.params
        seq.num_generated += 1
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            # The stop token is not part of the text or token ids, but its logprob stays (as vLLM's and
            # OpenAI's do): clients such as lm-evaluation-harness expect one entry per generated token.
            seq.finish_reason = "stop"
            return
        seq.output_ids.append(token)
        if self.tokenizer is not None:
            self._detokenize(seq)
            if p.stop:
                search_from = max(0, seq.sent_chars - max(len(s) for s in p.stop))
                hits = [i for i in (seq.text.find(s, search_from) for s in p.stop) if i >= 0]
                if hits:
                    seq.text = seq.text[: min(hits)]
                    seq.finish_reason = "stop"
                    return
        if seq.num_generated >= seq.max_new or seq.length >= self.max_seq_len:
            seq.finish_reason = "length"

    def _detokenize(self, seq: _Sequence) -> None:
        """Update ``seq.text`` for its newest token, decoding only a few tokens (not the whole output).

        The new tokens are decoded together with the previous few (``output_ids[prefix_offset:]``) and the text
        of those previous ones is cut off, so tokenizers whose decoding depends on the left neighbour (a
        SentencePiece word-start space, byte-level pieces of one character) give the text a whole decode would.
        Text is confirmed once it does not end in an incomplete UTF-8 character.
        """
        ids = seq.output_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset: seq.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
        new = full[len(prefix):]
        if new and not new.endswith("\ufffd"):
            seq.confirmed += new
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            new = ""
        seq.text = seq.confirmed + new

    def _output(self, seq: _Sequence) -> RequestOutput:
        done = seq.finish_reason is not None
        text = ""
        if self.tokenizer is not None:
            upto = len(seq.text)
            if not done:
                if seq.params.stop:
                    upto -= max(len(s) for s in seq.params.stop) - 1  # could still become a stop string
                while upto > seq.sent_chars and seq.text[upto - 1] == "\ufffd":
                    upto -= 1  # an incomplete UTF-8 character
            upto = max(upto, seq.sent_chars)
            text = seq.text[seq.sent_chars: upto]
            seq.sent_chars = upto
        new_ids = seq.output_ids[seq.sent_tokens:]
        seq.sent_tokens = len(seq.output_ids)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None  # sent with the first output
        return RequestOutput(seq.request_id, new_ids, text, logprobs, done, seq.finish_reason, len(seq.prompt_ids),
                             seq.num_generated, prompt_logprobs, seq.error)

    def memory_bytes(self) -> int:
        """Bytes held by the KV cache."""
        return sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)

    def __repr__(self) -> str:
        return (f"Engine(max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, device={self.device}, "
                f"dtype={self.dtype}, compiled={self.compiled})")


def engine_from_checkpoint(path, device: str = "auto", dtype: str = "auto", adapter=None, loras=None,
                           **kwargs: Any) -> Engine:
    """Load a model folder (:func:`lmforge.open.load_for_inference`) and build an :class:`Engine`.

    ``adapter`` is a fine-tuned adapter folder (lmforge's or Hugging Face PEFT's): LoRA/DoRA and IA3 are
    folded into the weights (no cost per token), bottleneck adapters run as extra modules, p-tuning's
    virtual tokens are prepended to every prompt (computed once).
    ``loras`` maps names to LoRA adapter folders that requests pick by name (``add_request(adapter=...)``);
    they are kept apart from the weights (:class:`~lmforge.peft.multi_lora.MultiLoRA`), on top of ``adapter``.
    """
    from lmforge.open import load_for_inference

    model, tokenizer = load_for_inference(path, device=device, dtype=dtype, allow_ptuning=True)
    if adapter is not None:
        from lmforge.open import adapter_tokenizer
        from lmforge.peft import adapter_for_inference

        model = adapter_for_inference(model, adapter, use="the serving engine", allow_ptuning=True)
        tokenizer = adapter_tokenizer(adapter, tokenizer)  # fine-tuning saved its tokenizer (chat template) there
    if loras:
        from lmforge.peft.multi_lora import MultiLoRA

        inner = getattr(model, "model", model) if hasattr(model, "num_virtual_tokens") else model  # p-tuned: its base
        kwargs["lora"] = MultiLoRA(inner, dict(loras), max_rows=bucket(int(kwargs.get("max_batch_size", 32)), 0))
    return Engine(model, tokenizer, **kwargs)
