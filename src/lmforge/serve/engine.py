"""The inference engine: continuous batching over a paged KV cache, with chunked prefill and prefix caching.

Nothing here knows about HTTP. The server (:mod:`lmforge.serve.server`) talks to an
:class:`~lmforge.serve.client.AsyncEngineClient`, which runs an :class:`Engine` in a thread.

The engine is four parts, each its own module:

- the scheduler (:mod:`lmforge.serve.scheduler`): admission by free KV blocks, preemption by recompute when
  blocks run out, the per-step token budget that mixes prefill chunks with decode tokens;
- the model runner (:mod:`lmforge.serve.runner`): a step's inputs, the forwards over the paged cache
  (:mod:`lmforge.serve.cache`), the CUDA graphs and the Triton kernels (:mod:`lmforge.serve.kernels`);
- the sampler (:mod:`lmforge.serve.sampler`): penalties, filters and draws for a whole batch at once;
- the output processor (:mod:`lmforge.serve.output`): stop tokens and strings, detokenization, outputs.

How a step works (:meth:`Engine.step`): the scheduler picks the decoding sequences (one token each) and the
prefill chunks (waiting or partly prefilled sequences) that fit ``max_num_batched_tokens``; the decode step is
launched, then the chunks are prefilled in one padded forward; a chunk that ends its sequence's known tokens
samples the next token. Finished sequences give their blocks back. A decode step whose rows all take their
argmax or draw plainly (temperature, top-k, top-p, min-p with per-request seeds; no penalties, no
log-probabilities) chooses its tokens on the device (:func:`lmforge.serve.sampler.next_tokens`) and, with
nothing else to do, is left running: the next call launches the step after it (fed on the device with those
tokens) before reading it, so the host's work overlaps the device's. A sequence that ends meanwhile leaves a
padding row behind while the others still need the same batch size (a captured graph's), so a rollout's
completions ending one by one do not stop the chain; when it cannot go on (the batch would shrink, a waiting
request may join) the call reads the step and schedules the next itself: every call launches work.
Sampled requests draw the same tokens either way (the draws depend on the seed and the token's index alone).

Greedy decoding through the engine gives the tokens of :func:`lmforge.models.generate.generate` for every
request, whatever else is in the batch, however prompts are chunked, whether a prefix came from the cache or a
sequence was preempted and recomputed (up to floating-point ties).

Not supported yet: beam search, speculative decoding.
"""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any, Optional, Sequence as Seq

import torch
import torch.nn.functional as F

from lmforge.serve.cache import PagedKVCache, block_bytes, bucket
from lmforge.serve.metrics import EngineMetrics
from lmforge.serve.output import OutputProcessor
from lmforge.serve.request import (LOGIT_LIMIT, SEED_RANGE, EngineBusyError, InvalidRequestError, PromptTooLongError,
                                   RequestFailedError, RequestMetrics, RequestOutput, SamplingParams, Sequence,
                                   TokenLogprob)
from lmforge.serve.runner import Decode, ModelRunner, prepare_model
from lmforge.serve.sampler import Sampler, argmax_rows, process_logits
from lmforge.serve.scheduler import Scheduler

__all__ = ["SamplingParams", "RequestOutput", "RequestMetrics", "TokenLogprob", "PagedKVCache", "Engine",
           "InvalidRequestError", "PromptTooLongError", "EngineBusyError", "RequestFailedError", "process_logits",
           "bucket", "argmax_rows", "LOGIT_LIMIT", "SEED_RANGE", "engine_from_checkpoint"]


class Engine:
    """Continuous-batching generation over a :class:`~lmforge.models.transformer.Transformer`.

    Args:
        model: the model (eval mode; its parameters' device and dtype are used).
        tokenizer: an lmforge tokenizer (``decode``, ``eod_id``); None gives token ids only (no text,
            no stop strings).
        max_batch_size: most sequences running together (decoding or prefilling).
        max_seq_len: positions per sequence (prompt + output); default ``min(max_position_embeddings, 8192)``.
        max_num_batched_tokens: most tokens fed in one step, decode tokens and prefill chunks together; a longer
            prompt is prefilled in chunks over several steps while the running sequences go on decoding.
        admission_batch: while sequences run, admit waiting requests only once this many rows are free (or as
            many as requests wait), so several prompts share a prefill forward and the steps between are pure
            decode steps (:class:`~lmforge.serve.scheduler.Scheduler`); 1 admits into every row as it frees.
        block_size: positions per KV-cache block.
        num_kv_blocks: KV-cache blocks (each ``block_size`` positions of every layer); default: sized from
            ``kv_cache_memory``, else from the GPU's free memory (``gpu_memory_utilization``), else (CPU) enough
            for ``max_batch_size`` sequences of ``max_seq_len``.
        kv_cache_memory: bytes for the KV cache (instead of ``num_kv_blocks``).
        gpu_memory_utilization: on a GPU, the fraction of its memory this engine may use in all (vLLM's
            meaning): the blocks are what is left after the weights and the peak activations of a step of
            ``max_num_batched_tokens`` tokens (measured at start-up) and memory other processes hold.
        enable_prefix_caching: reuse full blocks of earlier requests with the same tokens (hash-addressed).
        lora: a :class:`~lmforge.peft.multi_lora.MultiLoRA` already applied to ``model`` (its ``max_rows`` at
            least the batch, rounded up to a power of two when compiled): each request may then name one of
            its adapters (:meth:`add_request`), and a batch mixes adapters freely.
        compile_decode: compile the decode step and capture it in CUDA graphs (GPU only; ignored on CPU), every
            batch bucket at start-up. This fuses the model's q/k/v and gate/up projections in place
            (:func:`~lmforge.models.transformer.fuse_projections`) and freezes its parameters, before the KV
            cache is sized: do not train or save it afterwards.
        live_weights: the model goes on training between uses of the engine (online RL's policy, updated in place
            by the optimizer): nothing is fused, frozen or swapped for decode kernels, the output head is read at
            every step and, compiled, the decode graphs read the parameters themselves, so each replay uses the
            weights of the moment. :meth:`sync_weights` (before each use) captures the graphs again if a
            parameter was replaced rather than updated in place.
        compile_prefill: run the prefill forward compiled with ``torch.compile`` (any device; dynamic sizes,
            tokens padded to a multiple of 16), every shape class compiled at start-up
            (:class:`~lmforge.serve.runner.CompiledPrefill`): fused rotary, norms and activations, and nothing
            compiles while requests wait. Off by default.
        graph_chunks: CUDA graphs the blocks of a decode step are split into (evenly).
        compile_mode: ``torch.compile`` mode of the decode pieces (and of the prefill with ``compile_prefill``):
            None (default kernels) or one without CUDA graphs of its own, e.g. ``"max-autotune-no-cudagraphs"``.
        compile_options: inductor options instead of a mode (``torch.compile(options=...)``).
        decode_kernels: run decode attention with lmforge's Triton paged kernel, the on-device sampled steps' draw
            with its two draw kernels (:func:`lmforge.serve.kernels.sampled_draw`) and, compiled, single-row matrix
            products with its Triton kernels (:mod:`lmforge.serve.kernels`). Needs Triton on a CUDA device
            (ignored without it).
        log: where start-up lines go (default: standard error): on a GPU, the KV cache's size and the memory it
            was sized from; compiled, the graph captures and the prefill's compilation (a line per shape, then the
            time it took).
        detokenize: keep each request's text (incremental detokenization, stop strings). False: token ids only,
            as without a tokenizer (outputs' ``text`` is empty, stop strings are refused), while the tokenizer's
            end-of-text still stops a request: for callers that need only ids (online RL's rollouts), which then
            spend no host time per token on text.
        stream_outputs: :meth:`step` returns a request's new tokens at every step. False: a request's output comes
            once, when it finishes, with all its tokens (callers that need only the final ids: no output objects
            per token).
        decode_batches: compiled only: the batch sizes whose decode graphs are captured (default: every power of
            two up to the batch, rounded up); a step of ``n`` rows runs in the smallest captured size ``>= n``
            (rows beyond ``n`` are padding), and the largest (the batch rounded up to a power of two) is always
            captured. Fewer sizes start up faster (each is a capture); a batch known to shrink only at its end
            (online RL's rollouts) loses little by running its last rows padded.
        agree_blocks: tensor-parallel serving (:mod:`lmforge.serve.tensor_parallel`): a function of this rank's
            KV block count returning the count every rank uses (the minimum over the ranks), so their schedulers
            see the same cache. The model is then a rank's shard: the cache holds its own key/value heads.
    """

    def __init__(self, model, tokenizer=None, max_batch_size: int = 32, max_seq_len: Optional[int] = None,
                 max_num_batched_tokens: int = 8192, block_size: int = 16, num_kv_blocks: Optional[int] = None,
                 kv_cache_memory: Optional[int] = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, compile_decode: bool = False, lora=None, graph_chunks: int = 1,
                 compile_mode: Optional[str] = None, compile_options: Optional[dict] = None,
                 decode_kernels: bool = True, admission_batch: int = 1, live_weights: bool = False,
                 compile_prefill: bool = False, log=None, detokenize: bool = True, stream_outputs: bool = True,
                 decode_batches: Optional[Seq[int]] = None, agree_blocks=None):
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("block_size", block_size, 1),
                                 ("max_num_batched_tokens", max_num_batched_tokens, 1),
                                 ("admission_batch", admission_batch, 1)):
            if not isinstance(value, int) or value < low:
                raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if num_kv_blocks is not None and kv_cache_memory is not None:
            raise InvalidRequestError("give num_kv_blocks or kv_cache_memory, not both")
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
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.compiled = bool(compile_decode) and self.device.type == "cuda"
        self.compile_prefill = bool(compile_prefill)
        if self.compiled or self.compile_prefill:
            if compile_mode in ("reduce-overhead", "max-autotune"):
                raise InvalidRequestError(f"compile_mode={compile_mode!r} records CUDA graphs itself; the engine "
                                          f"captures its own: use None or 'max-autotune-no-cudagraphs'")
            if compile_mode is not None and compile_options:
                raise InvalidRequestError("give compile_mode or compile_options, not both")
        max_rows = bucket(max_batch_size, 0 if self.compiled else 1)
        top = bucket(max_batch_size, 0)  # the largest captured batch (compiled)
        if decode_batches is not None and not (
                all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= top for b in decode_batches)):
            raise InvalidRequestError(f"decode_batches must be batch sizes from 1 to {top} (max_batch_size rounded "
                                      f"up to a power of two), got {list(decode_batches)!r}")
        self.lora = lora
        if lora is not None and lora.max_rows < max_rows:
            raise InvalidRequestError(f"the MultiLoRA holds {lora.max_rows} rows but this engine decodes up to "
                                      f"{max_rows}; build it with max_rows={max_rows}")
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.log, self.live_weights = log, bool(live_weights)
        # Fuse (and freeze) before measuring: the cache is sized for the weights that serve, and the fusion's own
        # temporary copies come and go before the cache takes the rest of the card.
        prepare_model(self.model, self.compiled, decode_kernels, live=self.live_weights)
        self.memory_profile: dict[str, float] = {}  # the numbers the cache was sized from (GPU), in bytes
        # key/value heads the cache stores: the model's, or a tensor-parallel rank's share of them
        self.kv_heads = self.model.layers[0].self_attn.n_kv_heads if len(self.model.layers) else None
        blocks = self._num_blocks(num_kv_blocks, kv_cache_memory, gpu_memory_utilization)
        if agree_blocks is not None:
            blocks = agree_blocks(blocks)
        per_seq = -(-self.max_seq_len // block_size)
        if blocks < per_seq:
            raise InvalidRequestError(
                f"the KV cache holds {blocks} blocks of {block_size} tokens ({blocks * block_size} tokens) but one "
                f"sequence of max_seq_len={self.max_seq_len} needs {per_seq}; give the cache more memory "
                f"(gpu_memory_utilization, kv_cache_memory or num_kv_blocks) or lower max_seq_len")
        self.cache = PagedKVCache(self.cfg, blocks + 1, block_size, self.max_seq_len, max_rows, self.device,
                                  self.dtype, prefix_caching=enable_prefix_caching, kv_heads=self.kv_heads)
        if self.device.type == "cuda":
            log(self._cache_line())
        self.scheduler = Scheduler(self.cache.allocator, block_size, max_batch_size, max_num_batched_tokens,
                                   admission_batch=admission_batch)
        self.runner = ModelRunner(self.model, self.cache, max_rows, self.max_seq_len, lora, self.compiled,
                                  graph_chunks, compile_mode, compile_options, decode_kernels, self.live_weights,
                                  self.compile_prefill, decode_batches)
        self.sampler = Sampler()
        self.eos_id = getattr(tokenizer, "eod_id", None) if tokenizer is not None else None
        self.detokenize, self.stream_outputs = bool(detokenize), bool(stream_outputs)
        self.outputs = OutputProcessor(tokenizer if self.detokenize else None, self.eos_id, self.max_seq_len)
        self.metrics = EngineMetrics()
        self._ids: set[str] = set()
        self._inflight: Optional[Decode] = None  # a decode step with its tokens on the device, not read yet
        self.startup_seconds = self.runner.capture_all(log)  # nothing compiles once requests come

    def sync_weights(self) -> list[str]:
        """Before a use of a ``live_weights`` engine: make the decode graphs read the model's weights of the
        moment. Weights updated in place (every optimizer step) need nothing: the graphs read them where they
        are. A parameter or buffer replaced by a new tensor (``module.to()``, ``p.data = ...``) is not where the
        graphs read: then every shape is captured again (a start-up's time, logged). Returns the names that moved.
        Eager engines read the model at every step and need nothing."""
        moved = self.runner.moved_parameters()
        if moved:
            self.log(f"rollout engine: {len(moved)} weights were replaced since the decode graphs were captured "
                     f"({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}); capturing them again")
            self.startup_seconds += self.runner.recapture(self.log)
        return moved

    def _num_blocks(self, num_kv_blocks: Optional[int], kv_cache_memory: Optional[int], utilization: float) -> int:
        """Usable KV blocks (the scratch block not counted): given, from a memory size, from the GPU's free memory
        after a profiled step, or (CPU) ``max_batch_size`` sequences of ``max_seq_len``."""
        per_block = block_bytes(self.cfg, self.block_size, self.dtype, self.kv_heads)
        if num_kv_blocks is not None:
            if not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
                raise InvalidRequestError(f"num_kv_blocks must be an integer >= 1, got {num_kv_blocks!r}")
            return num_kv_blocks
        if kv_cache_memory is not None:
            if kv_cache_memory < 2 * per_block:
                raise InvalidRequestError(f"kv_cache_memory={kv_cache_memory} bytes holds no block: one block of "
                                          f"{self.block_size} tokens takes {per_block} bytes")
            return int(kv_cache_memory // per_block) - 1
        if self.device.type != "cuda":
            return self.max_batch_size * -(-self.max_seq_len // self.block_size)
        peak = self._profile_peak()  # ends with empty_cache: reserved is what is allocated now (the weights)
        free, total = torch.cuda.mem_get_info(self.device)
        # memory on the card outside this process's PyTorch allocator: other processes, this process's CUDA context
        others = max(0, total - free - torch.cuda.memory_reserved(self.device))
        available = utilization * total - peak - others
        blocks = int(available // per_block) - 1
        self.memory_profile = {"total": total, "utilization": utilization, "peak": peak, "others": others,
                               "allocated": torch.cuda.memory_allocated(self.device), "per_block": per_block,
                               "blocks": max(blocks, 0)}
        if blocks < 1:
            raise InvalidRequestError(
                f"no memory is left for the KV cache: the card has {total / 2**30:.1f} GiB, "
                f"gpu_memory_utilization={utilization} allows {utilization * total / 2**30:.1f} GiB and the weights "
                f"and a step's activations take {peak / 2**30:.1f} GiB (other processes {others / 2**30:.1f} GiB); "
                f"raise gpu_memory_utilization or lower max_num_batched_tokens")
        return blocks

    def _cache_line(self) -> str:
        """The start-up line on the KV cache's size and, when sized from the GPU, the numbers it came from."""
        blocks, gib = self.cache.num_blocks - 1, 2 ** 30
        line = (f"KV cache: {blocks} blocks of {self.block_size} tokens = {blocks * self.block_size} tokens, "
                f"{self.memory_bytes() / gib:.2f} GiB")
        p = self.memory_profile
        if p:
            line += (f"; sized from the card's {p['total'] / gib:.2f} GiB x gpu_memory_utilization {p['utilization']}"
                     f" - weights and activation peak {p['peak'] / gib:.2f} GiB (weights {p['allocated'] / gib:.2f}"
                     f" GiB) - other memory {p['others'] / gib:.2f} GiB, {p['per_block']} bytes a block")
        return line

    def _profile_shape(self) -> tuple[int, int]:
        """``(rows, tokens)`` of the largest prefill forward :meth:`prefill_groups` may form: rows of the last
        chunk of a longest sequence (``tokens`` new tokens attending to ``max_seq_len`` keys), as many as fit both
        its limits (rows x tokens within the budget, rows x keys within ``max(budget, max_seq_len)``)."""
        T = min(self.max_num_batched_tokens, self.max_seq_len)
        keys = -(-self.max_seq_len // self.block_size) * self.block_size
        rows = min(self.max_num_batched_tokens // T, max(self.max_num_batched_tokens, self.max_seq_len) // keys,
                   self.max_batch_size)
        return max(1, rows), T

    @torch.inference_mode()
    def _profile_peak(self) -> int:
        """Peak bytes allocated by the weights and the largest step: the largest prefill forward
        (:meth:`_profile_shape`; through a temporary cache of its sequences, counted too: a margin), prompt
        logprobs over 512 positions and the logits of a full decode batch."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        # R rows of T new tokens each attending through its table to max_seq_len keys (the gather path: keys
        # gathered, a T x S mask per row): the most one forward of prefill_groups holds.
        R, T = self._profile_shape()
        nb = -(-self.max_seq_len // self.block_size)
        cache = PagedKVCache(self.cfg, R * nb + 1, self.block_size, self.max_seq_len, R, self.device, self.dtype,
                             False, kv_heads=self.kv_heads)
        positions = torch.arange(self.max_seq_len - T, self.max_seq_len)[None].expand(R, T)
        cache.bind(torch.arange(1, R * nb + 1).view(R, nb), positions, torch.ones(R, T, dtype=torch.bool))
        if self.lora is not None:
            self.lora.set_rows([0] * R)
        hidden = self.model.hidden_states(torch.zeros(R, T, dtype=torch.long, device=self.device), kv_cache=cache,
                                          positions=positions.to(self.device))
        head = self.model.output_weight()
        F.linear(hidden[0, :512], head).float().log_softmax(-1)
        F.linear(hidden[0, :1].expand(self.max_batch_size, -1), head).float().softmax(-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del cache, hidden
        torch.cuda.empty_cache()
        return peak

    # -- requests ----------------------------------------------------------------------------------

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams,
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
        if params.stop and not self.detokenize:
            raise InvalidRequestError("stop strings need the output text, and this engine was built with "
                                      "detokenize=False (token ids only); give stop_token_ids instead", "stop")
        max_new = min(params.max_tokens, self.context_len - len(prompt))
        seq = Sequence(request_id, prompt, params, self.device, max_new, self.prefix_ids, adapter_slot)
        self.outputs.prepare(seq)
        if params.prompt_logprobs is not None:
            seq.prompt_lp = [None]
        self.scheduler.waiting.append(seq)
        self._ids.add(request_id)
        self.metrics.prompt_tokens += len(prompt)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Drop a request; returns its final output (finish_reason "abort") or None if unknown."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self.scheduler.free(seq)
                seq.finish_reason = "abort"
                self._ids.discard(request_id)
                return self.outputs.output(seq)
        for seq in self.running:
            if seq.request_id == request_id and seq.finish_reason != "abort":
                seq.finish_reason = "abort"
                out = self.outputs.output(seq)
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
        """One scheduler iteration: decode the running sequences and prefill the scheduled chunks.

        Returns one :class:`RequestOutput` per request that produced tokens or finished.
        """
        touched: dict[str, Sequence] = {}
        launched = False
        if self._inflight is not None:
            d, self._inflight = self._inflight, None
            nxt = self._launch_chained(d) if self._can_chain(d) else None
            self._finish_decode(d, touched)
            if nxt is not None:
                launched = True
                ended = [s for s in d.seqs if s is not None and s.finish_reason is not None]
                if not ended:
                    self._inflight = nxt
                elif self._chain_on(nxt):
                    # Sequences ended with d's tokens, and the steps go on chained without them (their rows become
                    # padding: _launch_chained): their blocks go back now. nxt, still running, writes a key of
                    # each at a position no other sequence reads; any later use of those blocks is queued after it.
                    self._release(ended)
                    self._inflight = nxt
                else:
                    self._finish_decode(nxt, touched)  # read it now: the finished ones give their blocks back
            else:
                # No chained step (a sequence ended, or a waiting request may join): free the finished ones and
                # schedule the next step now, not in another call, so no call reads a step and launches nothing.
                self._release([s for s in self.running if s.finish_reason is not None])
        if not launched:
            sched = self.scheduler.schedule()
            self.metrics.preemptions += len(sched.preempted)
            d = None
            if sched.decode:
                d = self.runner.launch_decode(sched.decode, all(self._pipelinable(s) for s in sched.decode))
                self.metrics.decode_steps += 1
                self.metrics.mixed_steps += bool(sched.chunks)
                self.metrics.decode_rows += len(sched.decode)
                for s in sched.decode:
                    s.num_computed += 1
            if sched.chunks:
                self._prefill(sched.chunks, touched)
            if d is not None:
                if d.tokens is not None and not sched.chunks:
                    self._inflight = d  # read by the next call, after it launched the following step
                else:
                    self._finish_decode(d, touched)
        stream = self.stream_outputs
        outputs = [self._output(s) for s in touched.values() if s.finish_reason != "abort" and (
            s.finish_reason is not None or stream and len(s.output_ids) > s.sent_tokens)]
        if self._inflight is None:
            self._release([s for s in self.running if s.finish_reason is not None])
        return outputs

    def prefill_groups(self, chunks: list[tuple[Sequence, int, int]]) -> list[list[tuple[Sequence, int, int]]]:
        """The chunks in forwards whose padded size stays within what start-up sized memory for: rows x longest
        chunk at most ``max_num_batched_tokens`` tokens, and rows x keys gathered at most one ``max_seq_len``
        sequence's (or the budget's) keys. Longest chunks first, so rows of a forward have similar lengths."""
        bs = self.block_size
        limit_keys = max(self.max_num_batched_tokens, self.max_seq_len)
        groups: list[list[tuple[Sequence, int, int]]] = []
        longest = keys = 0
        for c in sorted(chunks, key=lambda c: c[2] - c[1], reverse=True):
            n, s = c[2] - c[1], -(-c[2] // bs) * bs
            if groups and (len(groups[-1]) + 1) * max(longest, n) <= self.max_num_batched_tokens \
                    and (len(groups[-1]) + 1) * max(keys, s) <= limit_keys:
                groups[-1].append(c)
                longest, keys = max(longest, n), max(keys, s)
            else:
                groups.append([c])
                longest, keys = n, s
        return groups

    def _prefill(self, chunks: list[tuple[Sequence, int, int]], touched: dict[str, Sequence]) -> None:
        """Prefill the chunks (:meth:`prefill_groups` forwards); when a forward fails (a chunk too big for memory,
        say) each of its chunks is run alone so only the ones that fail by themselves get an error. Chunks that end
        their sequence's known tokens sample."""
        done, failed = [], []
        for group in self.prefill_groups(chunks):
            self.metrics.prefill_forwards += 1
            self.metrics.prefill_tokens += sum(hi - lo for _, lo, hi in group)
            try:
                logits = self.runner.prefill(group)
                done += [(c, logits[b: b + 1]) for b, c in enumerate(group)]
            except Exception as e:
                if len(group) == 1:
                    failed.append((group[0], e))
                    continue
                for c in group:
                    try:
                        done.append((c, self.runner.prefill([c])))
                    except Exception as e1:
                        failed.append((c, e1))
        for (seq, _, _), error in failed:
            seq.fail(f"the prompt's forward pass failed: {type(error).__name__}: {error}")
            touched[seq.request_id] = seq
        ready, rows = [], []
        for (seq, lo, hi), row in done:
            seq.num_computed = hi
            self.scheduler.register_full_blocks(seq)
            if hi < seq.length:
                continue  # more chunks to come
            seq.prefilling = False
            if seq.prompt_lp is not None and seq.prompt_logprobs is None and not seq.prompt_lp_sent:
                seq.prompt_logprobs, seq.prompt_lp_sent = seq.prompt_lp, True
            if seq.max_new == 0 or seq.num_generated >= seq.max_new:  # the prompt only (echo with prompt logprobs)
                seq.finish_reason = "length"
                touched[seq.request_id] = seq
                continue
            ready.append(seq)
            rows.append(row)
        if ready:
            self._advance(ready, torch.cat(rows), touched)

    def fail_running(self, error: BaseException) -> list[RequestOutput]:
        """After a step failed outside one request's own work (a decode forward): end every running sequence
        with an error, free its blocks and return their outputs. Waiting requests stay queued; the engine
        serves them next as if it had just started."""
        message = f"the engine step failed: {type(error).__name__}: {error}"
        outputs = []
        for seq in list(self.running):
            if seq.finish_reason != "abort":
                seq.fail(message)
                outputs.append(self._output(seq))
            self._ids.discard(seq.request_id)
            self.scheduler.finish(seq)
        self._inflight = None
        return outputs

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
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

    def _release(self, done: list[Sequence]) -> None:
        """Remove finished sequences and give their blocks back."""
        for seq in done:
            self.scheduler.finish(seq)
            self._ids.discard(seq.request_id)

    # -- decode --------------------------------------------------------------------------------------------

    def _launch_chained(self, d: Decode) -> Decode:
        """Start the step after ``d`` without reading it: each row feeds ``d``'s token one position on; rows of
        sequences that ended are padding."""
        seqs = [s if s is not None and s.finish_reason is None else None for s in d.seqs]
        nxt = self.runner.launch_chained(d, seqs)
        self.metrics.decode_steps += 1
        self.metrics.chained_steps += 1
        for s in seqs:
            if s is not None:
                s.num_computed += 1
                self.metrics.decode_rows += 1
        return nxt

    def _chain_on(self, d: Decode) -> bool:
        """Whether steps may go on chained after ``d`` although some of its sequences ended (their rows then run
        as padding): no waiting request could join, and the live rows need the same batch size (a smaller one
        is a smaller step: then the next step is scheduled afresh; eager, any ended row makes it smaller)."""
        live = sum(1 for s in d.seqs if s is not None and s.finish_reason is None)
        return live > 0 and not self.scheduler.can_admit() and self.runner.batch_bucket(live) == len(d.positions)

    @staticmethod
    def _pipelinable(seq: Sequence) -> bool:
        """Whether the next token can be chosen on the device: the argmax, or a draw with temperature, top-k,
        top-p and min-p (no penalties: they read the host's history; no logprobs)."""
        p = seq.params
        return not p.needs_penalties and p.logprobs is None

    def _can_chain(self, d: Decode) -> bool:
        """Whether the step after ``d`` may start before ``d`` is read: ``d`` chose its tokens on the device
        (:meth:`_pipelinable` rows) and decodes every running sequence, none of which was aborted or ends by
        length with ``d``'s token, no waiting request could join the batch now, and every sequence has a block
        for one more position without preempting. Rows of ``d`` whose sequence ended (and was released) are
        padding in the next step, as long as the live rows need ``d``'s batch size (:meth:`_chain_on`).
        (A sequence that then stops on a token or a stop string only wastes its row.)"""
        if d.tokens is None:
            return False
        live = [s for s in d.seqs if s is not None and s.finish_reason is None]
        if len(live) != len(self.running) or len(live) < len(d.seqs) and not self._chain_on(d):
            return False  # a sequence that is not in d (or an aborted one not released yet); a smaller batch
        if self.scheduler.can_admit():
            return False
        if not all(s.num_generated + 1 < s.max_new and s.length + 1 < self.max_seq_len for s in live):
            return False
        return self.scheduler.reserve_next(live)

    def _finish_decode(self, d: Decode, touched: dict[str, Sequence]) -> None:
        """Read ``d`` and append each sequence's token (sequences that finished meanwhile are skipped)."""
        live = [(s, r) for r, s in enumerate(d.seqs) if s is not None and s.finish_reason is None]
        if not live:
            return
        seqs, rows = [s for s, _ in live], [r for _, r in live]
        if d.tokens is not None:
            tokens = d.read_tokens()
            now = time.monotonic()  # every row of every step passes here: the clock read once for the step
            for seq, r in zip(seqs, rows):
                token = tokens[r]
                if token < 0:  # a draw from a distribution that is not finite (NaN logits): this request fails
                    seq.fail("the model's next-token distribution is not finite (NaN or inf logits)")
                else:
                    self._append(seq, token, now)
                touched[seq.request_id] = seq
        else:
            self._advance(seqs, d.logits, touched, rows, d.greedy)
        if self.cache.allocator.prefix_caching:
            for seq in seqs:
                self.scheduler.register_full_blocks(seq)

    # -- sampling and outputs ---------------------------------------------------------------------------------

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor, touched: dict[str, Sequence],
                 rows: Optional[list[int]] = None, greedy: Optional[torch.Tensor] = None) -> None:
        """Sample each sequence's next token from ``logits`` (row ``rows[i]`` for ``seqs[i]``; all rows in
        order when None), append it and note the sequence in ``touched``. ``greedy`` (the argmax of every row)
        serves plain greedy batches."""
        rows = rows if rows is not None else list(range(len(seqs)))
        if greedy is not None and all(s.params.greedy and self._pipelinable(s) for s in seqs):
            argmax = greedy.tolist()
            chosen: list[Optional[int]] = [argmax[r] for r in rows]
        else:
            chosen = self.sampler.sample(seqs, logits[torch.tensor(rows, device=logits.device)])
        for seq, token in zip(seqs, chosen):
            if token is not None and seq.finish_reason is None:  # a sequence that failed in sampling gets no token
                self._append(seq, token)
            touched[seq.request_id] = seq

    def _append(self, seq: Sequence, token: int, now: Optional[float] = None) -> None:
        """``token`` appended to ``seq`` (its output, stop checks), at ``now`` (default: the clock's time)."""
        now = time.monotonic() if now is None else now
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        self.metrics.generation_tokens += 1
        self.outputs.append(seq, token)

    def _output(self, seq: Sequence) -> RequestOutput:
        out = self.outputs.output(seq)
        if out.finished and out.metrics is not None:
            self.metrics.observe(out.metrics, out.finish_reason)
        return out

    def memory_bytes(self) -> int:
        """Bytes held by the KV cache."""
        return self.cache.nbytes()

    def reset_prefix_cache(self) -> None:
        """Forget the blocks the prefix cache keeps for later requests (before an unrelated workload, such as the
        next task of ``lmforge evaluate``: its requests compute every block as a fresh engine would)."""
        self.cache.allocator.drop_cached()

    def stats(self) -> dict:
        """Numbers of the moment for /metrics: requests running and waiting, KV blocks used and in all, and the
        prefix cache's hits."""
        alloc = self.cache.allocator
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_blocks_used": alloc.num_used,
                "kv_blocks_total": alloc.num_blocks - 1, "prefix_cache_queries": alloc.queries,
                "prefix_cache_hits": alloc.hits}

    def __repr__(self) -> str:
        return (f"Engine(max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"kv_blocks={self.cache.num_blocks - 1}x{self.block_size}, device={self.device}, "
                f"dtype={self.dtype}, compiled={self.compiled}, compile_prefill={self.compile_prefill})")


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
