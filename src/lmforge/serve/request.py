"""What goes into and comes out of the serving engine, and a request's state inside it.

:class:`SamplingParams` (how to decode), :class:`RequestOutput` / :class:`TokenLogprob` / :class:`RequestMetrics`
(what a step produced), the errors a client can cause, and :class:`Sequence`: one request as the scheduler,
the model runner, the sampler and the output processor see it.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

import torch

from lmforge.errors import UserError
from lmforge.models.generate import MIN_TEMPERATURE  # below it: greedy (dividing would overflow float32)

__all__ = ["SamplingParams", "RequestOutput", "RequestMetrics", "TokenLogprob", "InvalidRequestError",
           "PromptTooLongError", "EngineBusyError", "RequestFailedError", "Sequence", "LOGIT_LIMIT", "SEED_RANGE"]

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
#: Seeds accepted: a signed 64-bit integer (all 64 bits key the draws: lmforge.serve.sampler.row_keys).
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
    stop: Seq[str] = ()
    stop_token_ids: Seq[int] = ()
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
    metrics: Optional["RequestMetrics"] = None  # the final output only


@dataclass
class RequestMetrics:
    """How one request was served (on its final output).

    ``ttft``: seconds from arrival to its first output token (None if it produced none); ``tpot``: mean seconds
    per output token after the first (None with fewer than two); ``cached_tokens``: prompt tokens whose keys
    and values came from the prefix cache; ``preemptions``: times it was sent back to the queue (its tokens
    recomputed) because the KV cache ran out of blocks.
    """

    arrival: float
    ttft: Optional[float]
    tpot: Optional[float]
    latency: float
    cached_tokens: int
    preemptions: int




class Sequence:
    """One request inside the engine: its tokens, its place in the paged KV cache and its output state.

    The tokens fed to the model are ``prefix_ids`` (p-tuning's virtual tokens) + ``prompt_ids`` + ``output_ids``;
    ``num_computed`` of them have their keys and values in the cache, in the blocks of ``block_table`` (position
    ``p`` in block ``block_table[p // block_size]``). A sequence is *prefilling* (its uncomputed tokens are fed in
    chunks, and the last chunk's logits give the next token) from its admission until it samples; then it
    decodes one token per step. Preemption frees its blocks and sets ``num_computed`` to 0: when it is admitted
    again its prompt and output so far are prefilled again (recomputed), and it goes on where it stopped.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, device: torch.device,
                 max_new: int, prefix_ids: Seq[int] = (), adapter: int = 0):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new = max_new  # max_tokens clipped to the context
        self.prefix_ids = list(prefix_ids)  # p-tuning's virtual tokens in front of the prompt (in the cache)
        self.adapter = adapter  # slot of its LoRA adapter in the engine's MultiLoRA (0: the base model)
        self.output_ids: list[int] = []
        self.num_generated = 0  # output tokens plus a final stop token
        # stop rules (OutputProcessor.prepare moves stop strings that are special tokens into stop_ids)
        self.stop_ids: set[int] = set(params.stop_token_ids)
        self.stop_texts: list[str] = list(params.stop)
        # the seed of the request's draws (lmforge.serve.sampler.uniforms: its k-th token's uniform depends on
        # (seed, k) alone)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        # paged cache
        self.block_table: list[int] = []
        self.num_computed = 0
        self.block_hashes: list[bytes] = []  # hashes of the full blocks registered in the prefix cache, in order
        self.prefilling = True
        # detokenization (lmforge.serve.output)
        self.text = ""  # the decoded output: confirmed text + the undecided tail (maybe a partial character)
        self.confirmed = ""  # text of output_ids[:read_offset]
        self.prefix_offset = 0  # output_ids[prefix_offset:read_offset] is decoded again as the new text's left context
        self.read_offset = 0
        self.sent_chars = 0
        self.sent_tokens = 0
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_lp: Optional[list[Optional[TokenLogprob]]] = None  # prompt logprobs gathered chunk by chunk
        self.prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # complete, sent once
        self.prompt_lp_sent = False  # complete and handed over (a recompute after preemption does not redo them)
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        # metrics
        self.arrival = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.cached_tokens = 0
        self.preemptions = 0

    def fail(self, message: str) -> None:
        """End this sequence with an error (finish_reason "error"); the engine releases it like a finished one."""
        self.finish_reason = "error"
        self.error = message

    @property
    def length(self) -> int:
        """Tokens fed or to feed: virtual tokens, prompt and output so far."""
        return len(self.prefix_ids) + len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, lo: int, hi: int) -> list[int]:
        """Tokens ``[lo, hi)`` of the fed sequence (virtual tokens, prompt, output)."""
        n, p = len(self.prefix_ids), len(self.prompt_ids)
        whole = self.prefix_ids + self.prompt_ids if hi <= n + p else self.prefix_ids + self.prompt_ids + self.output_ids
        return whole[lo:hi]

    def metrics(self, now: float) -> RequestMetrics:
        first, last = self.first_token_time, self.last_token_time
        n = len(self.output_ids)
        tpot = (last - first) / (n - 1) if first is not None and last is not None and n > 1 else None
        return RequestMetrics(self.arrival, None if first is None else first - self.arrival, tpot, now - self.arrival,
                              self.cached_tokens, self.preemptions)
