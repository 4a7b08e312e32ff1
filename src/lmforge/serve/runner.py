"""The model runner: builds a step's inputs, runs the model over the paged cache, owns graphs and kernels.

Two kinds of forward:

- :meth:`ModelRunner.prefill`: chunks of tokens of several sequences (right-padded rows, each at its own
  positions, attending through its block table to what earlier chunks computed); returns the next-token logits
  of the rows whose chunk ends their known tokens, and gathers prompt log-probabilities when asked. Eager by
  default; with ``compile_prefill=True`` the forward is :class:`CompiledPrefill` (``torch.compile`` with dynamic
  sizes, its two graphs compiled at start-up by :meth:`ModelRunner.capture_all`).
- :meth:`ModelRunner.launch_decode`: one token per row. On a GPU with ``compiled=True`` the step (embedding,
  every block, the head and the argmax) is compiled with ``torch.compile`` and captured as CUDA graphs
  (:class:`DecodeGraphs`) per batch bucket (powers of two), all at start-up (:meth:`ModelRunner.capture_all`):
  nothing compiles while requests wait. The attention of a decode step runs lmforge's Triton paged kernel
  (installed through the cache's public ``attention`` hook, :meth:`lmforge.serve.cache.PagedKVCache.attention`);
  it reads each row's length on the device, so one graph serves every length. Layers the kernel does not serve
  (ALiBi, soft-capped scores) take the reference path, whose graphs are per (batch, span bucket of 256 keys).

The inference-only transformations live here, not in the training model: fused q/k/v and gate/up projections
(:func:`~lmforge.models.transformer.fuse_projections`) and the batch-1 single-row kernels
(:func:`~lmforge.serve.kernels.use_decode_kernels`) are applied when ``compiled``. With the decode kernels on (and
:data:`lmforge.serve.kernels.DRAW_KERNEL`), an on-device sampled step draws its tokens with the Triton draw kernels
(:func:`~lmforge.serve.kernels.sampled_draw`, through :class:`~lmforge.serve.sampler.RowSampling`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as shape_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.models.transformer import fuse_projections
from lmforge.serve import kernels
from lmforge.serve.cache import PagedKVCache, bucket, prefill_mask
from lmforge.serve.kernels import available as kernels_available, linear, paged_kernel_applies, use_decode_kernels
from lmforge.serve.request import Sequence, TokenLogprob
from lmforge.serve.sampler import RowSampling, argmax_rows, next_tokens, warm_up_draw_kernel

__all__ = ["ModelRunner", "DecodeGraphs", "CompiledPrefill", "Decode", "prepare_model", "EAGER_SDPA_BACKENDS",
           "PREFILL_TOKEN_STEP"]

#: The attention backends of the eager forwards (every prefill, the eager decode step): cuDNN's is left out. It
#: builds an execution plan for each new shape, ~2 ms of host time per call (one H100, session 9: a prefill of the
#: 1B shape left the GPU idle ~38 ms while its 16 layers were planned, 7 times in 20 engine steps), and a server's
#: prefill shapes rarely repeat. Flash and memory-efficient attention need no plan; the math one is the CPU's.
EAGER_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

#: The compiled prefill pads each forward's token dimension up to a multiple of this: the compiled kernels take
#: the sizes as arguments (dynamic shapes), and Triton builds a kernel variant per size class it specialises on
#: (divisible by 16 or not); whole multiples of 16 keep that one class, warmed up at start-up.
PREFILL_TOKEN_STEP = 16

#: Whether this torch traces sizes size-obliviously on request (``torch.fx.experimental._config.backed_size_oblivious``,
#: torch 2.7 and later): a dynamic size then gets the range [0, inf) instead of [2, inf), so a size of 1 takes the
#: same graph as any other. Without it dynamo compiles a size of 1 apart (its "0/1 specialisation"): one graph more
#: per path of :class:`CompiledPrefill`, for prefills of one row.
SIZE_OBLIVIOUS = hasattr(shape_config, "backed_size_oblivious")

#: The ``torch.compile`` backend of :class:`CompiledPrefill`. The CPU tests set ``"aot_eager"`` (the same dynamo
#: graphs, shapes and guards, without inductor's code generation, which takes ~15 s a graph on a CPU).
PREFILL_BACKEND = "inductor"


def prepare_model(model, compiled: bool, decode_kernels: bool, live: bool = False) -> bool:
    """The inference-only transformations of a compiled engine's model, in place (nothing when not ``compiled``
    or ``live``): fused q/k/v and gate/up projections (one matrix read each: nearer the bandwidth at batch 1),
    frozen parameters (the model serves; it is not trained or saved afterwards) and, with ``decode_kernels`` and a
    GPU, the single-row Triton kernels. Idempotent. The engine calls it before it measures the weights and sizes
    the KV cache, so the cache is sized for the model that serves. Returns whether the kernels are installed.

    ``live``: the model is trained between uses (online RL's policy), so none of these apply: fusing would put
    new tensors (and new modules) in the place of the parameters the optimizer updates, and the kernels swap
    module classes. The decode graphs then read the parameters themselves."""
    if not compiled or live:
        return False
    fuse_projections(model)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    if decode_kernels and kernels_available(device):
        use_decode_kernels(model)
        return True
    return False


class DecodeGraphs:
    """The compiled decode step captured as CUDA graphs, per (batch bucket, span bucket).

    Inputs live in static device buffers (token ids, positions and advance of every row; the cache's block
    tables), filled by host-to-device copies per step; replaying the graphs then runs the whole step with no
    host work between kernels. The step is cut into ``chunks`` + 2 graphs (embedding, an even share of the
    blocks each, head). Each piece compiles once for all shapes (dynamic dimensions); every shape is recorded
    by :meth:`capture` (two warm-up runs, then the capture), at start-up.
    """

    def __init__(self, runner: "ModelRunner", chunks: int, mode: Optional[str] = None, options: Optional[dict] = None):
        kw = {"options": options} if options else {"mode": mode}
        self.embed = torch.compile(runner._decode_embed, **kw)
        self.blocks = torch.compile(runner._decode_blocks, **kw)
        self.head = torch.compile(runner._decode_head, **kw)
        L = len(runner.model.layers)
        bounds = sorted({round(i * L / max(1, min(chunks, L))) for i in range(max(1, min(chunks, L)) + 1)})
        self.spans = list(zip(bounds[:-1], bounds[1:]))  # blocks [lo, hi) of each graph
        self.keys = runner.keys
        rows = runner.max_rows
        # (ids, positions, advance) x rows; advance is 1 for a row that decodes a sequence, 0 for padding
        self.host = torch.zeros(3, rows, dtype=torch.long).pin_memory()
        self.inputs = torch.zeros(3, rows, dtype=torch.long, device=runner.device)
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

    def run_chained(self, tokens: torch.Tensor, span: int, stop: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """The step after the last one, fed on the device: each row's next token ``tokens`` (B,) (its argmax
        or its draw), one position further (padding rows stay). No host value is read. Rows ``stop`` become
        padding from this step on (their sequence ended: they no longer advance)."""
        B = tokens.shape[0]
        for r in stop:
            self.inputs[2, r] = 0  # a fill kernel (no copy from the host, which could wait for the stream)
        self.inputs[0, :B].copy_(tokens)
        self.inputs[1, :B].add_(self.inputs[2, :B])
        return self.replay(B, span)

    def replay(self, B: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (B, span) not in self.graphs:  # a shape capture_all did not foresee (never in the engine)
            self.capture(B, span)
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

    def capture(self, B: int, span: int) -> None:
        """Record the graphs of ``B`` rows attending ``span`` keys. Inputs are whatever the static buffers hold;
        padding rows (an all-zero block table) write only the scratch block."""
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
        self.graphs[(B, span)] = (graphs, out)


class CompiledPrefill:
    """The prefill forward compiled with ``torch.compile``, every shape it will see compiled at start-up.

    Two compiled functions: the fresh path (every row starts at position 0: causal attention over the new keys
    in the cache's hook) and the gather path (a chunk after cached blocks or earlier chunks: keys gathered through
    the block tables, the visibility mask built inside the graph). Sizes are dynamic: rows ``B``, tokens ``T``
    (padded up to a multiple of :data:`PREFILL_TOKEN_STEP`) and, on the gather path, table width ``nb`` (at
    least 2). Each path compiles once (two graphs): its sizes are traced size-obliviously
    (:data:`SIZE_OBLIVIOUS`), so one row takes the graph of several; on a torch without that, a size of 1 is
    compiled apart (four graphs). :meth:`warm_up` runs several rows and one row of each path before serving, and a
    server's ever new prefill shapes then reuse the graphs. Inside the graph the attention keeps
    :data:`EAGER_SDPA_BACKENDS` (no cuDNN SDPA: it would plan every new shape). Models with layers the fresh hook
    does not serve (sliding windows, ALiBi, soft-capped scores) take the gather path for every prefill.
    """

    def __init__(self, runner: "ModelRunner", mode: Optional[str] = None, options: Optional[dict] = None):
        kw = {"options": options} if options else {"mode": mode}
        if PREFILL_BACKEND != "inductor":
            kw = {"backend": PREFILL_BACKEND}
        self.runner = runner
        self.cache = runner.cache
        self.fresh_fn = torch.compile(self._fresh, fullgraph=True, **kw)
        self.gather_fn = torch.compile(self._gather, fullgraph=True, **kw)
        self.fresh_ok = all(layer.self_attn.window is None and layer.self_attn.alibi_slopes is None
                            and layer.self_attn.logit_cap is None for layer in runner.model.layers)
        self.calls = {"fresh": 0, "gather": 0}  # compiled forwards run (tests)
        self.graphs: dict[str, int] = {}  # graphs each path compiled during warm_up

    def _fresh(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self._hidden(ids, positions, slots, None, None, True)

    def _gather(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor,
                tables: torch.Tensor) -> torch.Tensor:
        mask = prefill_mask(positions, valid, tables.shape[1] * self.cache.block_size)
        return self._hidden(ids, positions, slots, tables, mask, False)

    def _hidden(self, ids, positions, slots, tables, mask, fresh: bool) -> torch.Tensor:
        """The model's hidden states with the cache bound to this prefill (and unbound again: the graph returns
        no tensor it bound)."""
        self.cache.bind_prefill(slots, tables, mask, fresh)
        with sdpa_kernel(EAGER_SDPA_BACKENDS):
            hidden = self.runner.model.hidden_states(ids, kv_cache=self.cache, positions=positions)
        self.cache.unbind()
        return hidden

    def run(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, tables: torch.Tensor,
            fresh: Optional[bool] = None) -> torch.Tensor:
        """The final hidden states (B, T, C) of a prefill given on the host: ``ids``, ``positions``, ``valid``
        (B, T) and ``tables`` (B, nb), as :meth:`lmforge.serve.cache.PagedKVCache.bind` takes them. ``fresh``
        picks the path (default: the fresh one when every row starts at position 0 and the model allows it)."""
        slots = self.cache.prefill_slots(tables, positions, valid)
        if fresh is None:
            fresh = self.fresh_ok and bool((positions[:, 0] == 0).all())
        dev = self.runner.device
        ids, positions, slots = (t.to(dev, non_blocking=True) for t in (ids, positions, slots))
        for t in (ids, positions, slots):
            _mark_dynamic(t)
        if fresh:
            self.calls["fresh"] += 1
            with _size_oblivious():
                return self.fresh_fn(ids, positions, slots)
        valid, tables = valid.to(dev, non_blocking=True), tables.to(dev, non_blocking=True)
        _mark_dynamic(valid)
        _mark_dynamic(tables)
        self.calls["gather"] += 1
        with _size_oblivious():
            return self.gather_fn(ids, positions, valid, slots, tables)

    def shapes(self) -> list[tuple[str, int, int, int]]:
        """The ``(path, rows, tokens, table blocks)`` :meth:`warm_up` runs: several rows and one row of each path,
        and sizes of 16 (a size class Triton compiles kernels apart for) where the engine allows them. The first
        shape of a path is the one its graph is compiled
        for: several rows (the sizes inductor tunes its kernels for are then a batch's, not one row's), and sizes
        that differ from one another, so that no two dynamic sizes are compiled as one (dynamo gives equal sizes
        one symbol, and a later shape where they differ would compile again)."""
        r = self.runner
        rows = [b for b in (16, 2, 1) if b <= r.max_rows]
        blocks = [3, 16]  # never 1: :meth:`ModelRunner.prefill` gives the gather path at least 2
        out = [("fresh", b, PREFILL_TOKEN_STEP * (4 + i), 1) for i, b in enumerate(rows)] if self.fresh_ok else []
        for i, b in enumerate(rows):
            for j, n in enumerate(blocks):
                out.append(("gather", b, PREFILL_TOKEN_STEP * (4 + i + 3 * j), n))
        return out

    def warm_up(self, log) -> float:
        """Compile and run every shape of :meth:`shapes` on padding (every token writes the scratch block); returns
        the seconds it took. ``log`` receives a line per shape: whether it compiled a graph (dynamo's count of
        graphs went up) or ran one compiled before, and for a graph compiled again why (the guard of the earlier
        graph that the shape failed, as dynamo records it: :func:`_recompile_reasons`). :attr:`graphs` then holds
        each path's count of graphs (1 each with :data:`SIZE_OBLIVIOUS`)."""
        from torch._dynamo.utils import counters  # here: importing dynamo takes ~1.5 s an eager engine never needs

        start = time.perf_counter()
        shapes = self.shapes()
        self.graphs = {}
        for i, (path, B, T, nb) in enumerate(shapes):
            before = counters["stats"]["unique_graphs"]
            records = _compile_records()
            if self.runner.lora is not None:
                self.runner.lora.set_rows([0] * B)
            ids, positions = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)  # apart: an
            # input that is another one is a guard of its own (the engine's never are)
            self.run(ids, positions, torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, nb, dtype=torch.long),
                     fresh=path == "fresh")
            compiled = counters["stats"]["unique_graphs"] - before
            self.graphs[path] = self.graphs.get(path, 0) + compiled
            what = "no new graph"
            if compiled:
                reasons = _recompile_reasons(records)
                what = "compiled a graph" + (": recompiled, " + "; ".join(reasons) if reasons else "")
            log(f"compiling prefill: {i + 1}/{len(shapes)} ({path} path, {B} rows, {T} tokens, {nb} blocks, "
                f"{what}) {time.perf_counter() - start:.1f}s")
        self.calls = {"fresh": 0, "gather": 0}
        return time.perf_counter() - start


def _compile_records() -> list:
    """dynamo's records of the compiles run so far (``torch._dynamo.utils.get_compilation_metrics()``: one per
    compiled frame, the latest few dozen), or none on a torch that keeps no such records."""
    get = getattr(torch._dynamo.utils, "get_compilation_metrics", None)
    try:
        return list(get()) if get is not None else []
    except Exception:  # a private API: a torch that changed it prints no reasons, it does not fail the start-up
        return []


def _recompile_reasons(before: list, limit: int = 300) -> list[str]:
    """Why the compiles recorded since ``before`` (an earlier :func:`_compile_records`) compiled again: each
    record's ``recompile_reason``, the first guard of the earlier graph that the new call failed (e.g. "tensor
    'ids' size mismatch at index 0. expected 16, actual 1", or a shape guard such as "Ne(s0, 1)"), as dynamo
    logs it under ``TORCH_LOGS=recompiles`` (read here without that setting). Whitespace is folded to one line
    and each reason cut at ``limit`` characters; empty where the torch records none."""
    seen = {id(record) for record in before}  # ``before`` holds the records: their ids are not reused
    reasons = []
    for record in _compile_records():
        reason = getattr(record, "recompile_reason", None)
        if id(record) not in seen and isinstance(reason, str) and reason:
            reason = " ".join(reason.split()).split(" (user code shown")[0]  # less dynamo's standard advice
            reasons.append(reason if len(reason) <= limit else reason[:limit] + "...")
    return reasons


def _mark_dynamic(t: torch.Tensor) -> None:
    """Compile ``t``'s sizes as symbols, sizes of 1 too (they stay symbols under :func:`_size_oblivious`)."""
    for dim in range(t.dim()):
        torch._dynamo.maybe_mark_dynamic(t, dim)


def _size_oblivious():
    """The context the compiled prefill is called in: dynamic sizes traced size-obliviously (one graph for one row
    and several, :data:`SIZE_OBLIVIOUS`), only for these calls (the setting is global to the process)."""
    if not SIZE_OBLIVIOUS:
        return contextlib.nullcontext()
    return shape_config.patch(backed_size_oblivious=True)


@dataclass
class Decode:
    """A decode step launched on the device: ``seqs[i]`` is row ``i`` of its outputs (None: a row whose sequence
    ended while the steps ran chained, now padding).

    ``logits`` (B, V) and ``greedy`` (B,) may be the CUDA graphs' buffers, valid until the next step runs.
    When ``tokens`` is set every row's next token was chosen on the device (``next``: the argmax of greedy rows,
    the draw of the rows in ``sampling``; -1 where a draw's distribution was not finite) and is on its way to that
    host buffer (``ready`` records its arrival): it can be read after the next step was launched.
    """
    seqs: list
    logits: torch.Tensor
    greedy: torch.Tensor
    positions: list[int]  # every row's input position (B,)
    advance: list[int]  # 1 for a row decoding a sequence, 0 for padding
    pos: Optional[torch.Tensor] = None  # eager path: the (B, 1) input positions on the device
    tokens: Optional[torch.Tensor] = None
    ready: Any = None
    sampling: Optional[RowSampling] = None  # the rows drawn on the device (None: every row greedy)
    next: Optional[torch.Tensor] = None  # (B,) each row's next token, on the device

    @property
    def fed(self) -> torch.Tensor:
        """``next`` as the chained step's input ids (a failed draw's -1 fed as 0: that request is over)."""
        return self.next if self.sampling is None else self.next.clamp(min=0)

    @property
    def rows(self) -> list[int]:
        return list(range(len(self.seqs)))

    def read_tokens(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class ModelRunner:
    """Runs the model for the engine (see the module's docstring).

    Args:
        model: the model (eval mode).
        cache: the paged KV cache.
        max_rows: most rows of a decode step (graph buckets up to it).
        max_seq_len: longest sequence.
        lora: a :class:`~lmforge.peft.multi_lora.MultiLoRA` applied to ``model``, or None.
        compiled, graph_chunks, compile_mode, compile_options, decode_kernels: as :class:`~lmforge.serve.engine.Engine`
            (``compiled`` is its ``compile_decode`` on a GPU).
        compile_prefill: run prefills through :class:`CompiledPrefill` (any device), compiled at start-up.
        decode_batches: compiled: the batch sizes captured (with ``max_rows``), instead of every power of two up to
            it (:meth:`batch_bucket`).
    """

    def __init__(self, model, cache: PagedKVCache, max_rows: int, max_seq_len: int, lora=None, compiled: bool = False,
                 graph_chunks: int = 1, compile_mode: Optional[str] = None, compile_options: Optional[dict] = None,
                 decode_kernels: bool = True, live: bool = False, compile_prefill: bool = False,
                 decode_batches=None):
        self.model = model
        self.cache = cache
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_rows = max_rows
        self.max_seq_len = max_seq_len
        self.lora = lora
        self.compiled = compiled
        self.keys = torch.arange(max_seq_len, device=self.device)  # a decode step attends keys[:span]
        # Read once: a normalised head (Baichuan) is not redone per step. A live model's head is read at every use
        # (the optimizer changes the weight a normalised head is computed from).
        self.live = live
        self.vocab = int(model.output_weight().shape[0])  # logits per row
        self._head = None if live else model.output_weight().detach()
        self._pointers: dict[str, int] = {}  # live + compiled: where each parameter was when the graphs were captured
        self._linear = F.linear  # the head's product (the Triton single-row kernel with decode_kernels)
        cache.use_kernel = bool(decode_kernels) and kernels_available(self.device) or (
            bool(decode_kernels) and _interpreting())
        # the on-device sampled steps draw with the Triton kernels where the decode kernels run (the same switch)
        self.draw_kernel = cache.use_kernel and kernels.DRAW_KERNEL
        # With CUDA graphs every decode shape is a recorded graph: batch rounded up to powers of two, and the span
        # (keys the reference attention reads) to multiples of 256, or one span when the kernel serves every layer.
        self.batch_step = 0 if compiled else 1
        # compiled with decode_batches: the captured batch sizes, ascending (None: every power of two)
        self.batches = sorted(set(decode_batches) | {max_rows}) if compiled and decode_batches else None
        probe = torch.empty(1, device=self.device, dtype=self.dtype)
        kernel_everywhere = cache.use_kernel and all(
            paged_kernel_applies(layer.self_attn, probe, cache.k[0]) for layer in model.layers)
        self.span_step = max_seq_len if (compiled and kernel_everywhere) else (
            256 if compiled else (64 if self.device.type == "cuda" else cache.block_size))
        # Pageable on purpose: a copy from it has taken the values when copy_ returns, so the host may rewrite rows
        # for a chained step while the step before it (and its copy) still waits on the device.
        self._host_tables = torch.zeros(max_rows, cache.max_blocks, dtype=torch.int32)
        # What the device tables are copied from: two pinned buffers in turn (CUDA), so the copy is asynchronous. A
        # blocking copy from pageable memory (``copy_`` without ``non_blocking``) synchronizes the stream: it would
        # wait for the step in flight before the next could be launched, and no two steps would ever overlap.
        cuda = self.device.type == "cuda"
        self._table_stage = [torch.zeros(max_rows, cache.max_blocks, dtype=torch.int32, pin_memory=cuda)
                             for _ in range(2)]
        self._stage_copied: list[Any] = [None, None]  # an event per buffer: its last copy to the device is done
        self._stage_flip = 0
        self._row_owner: list[Optional[list]] = [None] * max_rows  # the block table each row was written from
        self._row_len = [0] * max_rows
        self._rows_synced = 0  # rows [0, n) of the device tables equal the host's
        self._row_seq: list = []  # the sequence in each row of the last decode step launched
        self.rows_rewritten = 0  # decode-table rows written whole (a new sequence in the row), for tests
        self.table_copies = 0  # copies of the decode tables to the device (only when a row changed), for tests
        self._flip = 0
        self._token_host = ([torch.zeros(max_rows, dtype=torch.long).pin_memory() for _ in range(2)]
                            if self.device.type == "cuda" else [])
        self.graphs: Optional[DecodeGraphs] = None
        if prepare_model(model, compiled, decode_kernels, live):
            self._linear = linear
        if compiled or compile_prefill:
            limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 64))
        if compiled:
            self.graphs = DecodeGraphs(self, graph_chunks, compile_mode, compile_options)
        self.compiled_prefill = CompiledPrefill(self, compile_mode, compile_options) if compile_prefill else None

    # -- start-up --------------------------------------------------------------------------------------------

    def batch_bucket(self, n: int) -> int:
        """The rows of a decode step of ``n`` sequences: ``n`` eager; compiled, the smallest captured batch size
        ``>= n`` (a power of two, or one of ``decode_batches``)."""
        if self.batches is not None:
            return next(b for b in self.batches if b >= n)
        return bucket(n, self.batch_step, self.max_rows)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch bucket, span bucket) a decode step may take."""
        batches = sorted({self.batch_bucket(n) for n in range(1, self.max_rows + 1)})
        spans = sorted({bucket(n, self.span_step, self.max_seq_len) for n in range(1, self.max_seq_len + 1)})
        return [(b, s) for b in batches for s in spans]

    @torch.inference_mode()
    def capture_all(self, log=None, prefill: bool = True) -> float:
        """Compile every prefill shape class (:meth:`CompiledPrefill.warm_up`, with ``compile_prefill``) and
        compile and capture every decode shape (when compiled) now, before serving; returns the seconds it took.
        ``log`` (default: standard error) receives a progress line per shape and the time each part took.
        ``prefill=False`` captures the decode graphs only (:meth:`recapture`).

        Runs in inference mode, the mode :meth:`lmforge.serve.engine.Engine.step` replays the graphs in: compiled
        with grad enabled on parameters that require grad, the pieces would be traced for a backward pass (which
        the Triton custom ops do not have), and dynamo guards on the grad mode, so capture and replay must agree."""
        if self.graphs is None and self.compiled_prefill is None:
            return 0.0
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        start = time.perf_counter()
        self.cache.tables.zero_()  # every row is padding: the warm-up runs write the scratch block only
        if self.compiled_prefill is not None and prefill:
            seconds = self.compiled_prefill.warm_up(log)
            graphs = self.compiled_prefill.graphs
            log(f"compiled the prefill ({len(self.compiled_prefill.shapes())} shapes warmed up, graphs compiled: "
                f"{', '.join(f'{path} {n}' for path, n in graphs.items())}) in {seconds:.1f}s")
        if self.graphs is not None:
            self._capture_decode(log)
            self._pointers = self.parameter_pointers()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._row_owner = [None] * self.max_rows  # the device tables were zeroed: rewrite every row next step
        self._rows_synced = 0
        return time.perf_counter() - start

    def _capture_decode(self, log) -> None:
        shapes = self.shapes()
        start = time.perf_counter()
        self.graphs.inputs.zero_()
        if self.lora is not None:
            self.lora.set_rows([0] * self.max_rows)
        for i, (B, span) in enumerate(shapes):
            self.graphs.capture(B, span)
            log(f"capturing decode graphs: {i + 1}/{len(shapes)} (batch {B}, span {span}) "
                f"{time.perf_counter() - start:.1f}s")
        if self.draw_kernel:  # the sampled steps' draw kernels compiled now too, not at the first sampled step
            warm_up_draw_kernel(self.vocab, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        log(f"captured {len(shapes)} decode graph sets (batches {sorted({b for b, _ in shapes})}) in {seconds:.1f}s")

    def parameter_pointers(self) -> dict[str, int]:
        """Each parameter's and buffer's storage address: what the captured graphs read."""
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return {name: t.data_ptr() for name, t in named}

    def moved_parameters(self) -> list[str]:
        """Parameters and buffers that are no longer where the decode graphs read them (replaced rather than
        updated in place, e.g. by ``module.to()`` or ``p.data = ...``); empty when eager or nothing moved."""
        if self.graphs is None:
            return []
        now = self.parameter_pointers()
        return sorted(name for name in set(now) | set(self._pointers) if now.get(name) != self._pointers.get(name))

    def recapture(self, log=None) -> float:
        """Capture every decode shape again (after parameters moved): the old graphs are dropped first. (The
        compiled prefill needs nothing: no CUDA graphs, its parameters are inputs of each call.)"""
        self.graphs.graphs.clear()
        return self.capture_all(log, prefill=False)

    # -- prefill -----------------------------------------------------------------------------------------------

    def logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self._head if self._head is not None else self.model.output_weight()
        return self._linear(hidden, head).float()  # (B, V)

    def prefill(self, chunks: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Feed each chunk ``(seq, lo, hi)`` (tokens ``[lo, hi)`` of ``seq``); returns the logits (B, V) of each
        row's last token. Prompt logprobs asked for are added to ``seq.prompt_lp`` chunk by chunk."""
        B = len(chunks)
        bs = self.cache.block_size
        T = max(hi - lo for _, lo, hi in chunks)
        if self.compiled_prefill is not None:
            T = bucket(T, PREFILL_TOKEN_STEP)  # padding tokens write the scratch block; no query sees them
        nb = max(-(-hi // bs) for _, _, hi in chunks)
        if self.compiled_prefill is not None:
            nb = max(nb, 2)  # a width of 1 would be a graph of its own (block 0 pads: no key of it is visible)
        # Pinned on a GPU so the copies below are asynchronous (a blocking one would wait for the decode step
        # launched just before, and the device would then idle while this forward's kernels are queued).
        pin = self.device.type == "cuda"
        ids = torch.zeros(B, T, dtype=torch.long, pin_memory=pin)
        positions = torch.zeros(B, T, dtype=torch.long, pin_memory=pin)
        valid = torch.zeros(B, T, dtype=torch.bool)
        tables = torch.zeros(B, nb, dtype=torch.long)
        for b, (seq, lo, hi) in enumerate(chunks):
            ids[b, : hi - lo] = torch.tensor(seq.tokens(lo, hi))
            positions[b, : hi - lo] = torch.arange(lo, hi)
            valid[b, : hi - lo] = True
            table = seq.block_table[: -(-hi // bs)]
            tables[b, : len(table)] = torch.tensor(table)
        if self.lora is not None:
            self.lora.set_rows([seq.adapter for seq, _, _ in chunks])
        dev = self.device
        if self.compiled_prefill is not None:
            hidden = self.compiled_prefill.run(ids, positions, valid, tables)  # (B, T, C)
        else:
            self.cache.bind(tables, positions, valid)
            with sdpa_kernel(EAGER_SDPA_BACKENDS):
                hidden = self.model.hidden_states(ids.to(dev, non_blocking=True), kv_cache=self.cache,
                                                  positions=positions.to(dev, non_blocking=True))  # (B, T, C)
        last_index = torch.tensor([hi - lo - 1 for _, lo, hi in chunks], pin_memory=pin)
        last = hidden[torch.arange(B, device=dev), last_index.to(dev, non_blocking=True)]  # (B, C)
        for b, (seq, lo, hi) in enumerate(chunks):
            if seq.prompt_lp is not None and not seq.prompt_lp_sent:
                self._prompt_logprobs(seq, hidden[b], lo, hi)
        return self.logits_at(last)

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, lo: int, hi: int, chunk: int = 512) -> None:
        """Log-probabilities of the prompt tokens this chunk's positions predict (position ``p`` predicts token
        ``p + 1``), with the k most likely there; the head runs over ``chunk`` positions at a time."""
        n, P, k = len(seq.prefix_ids), len(seq.prompt_ids), seq.params.prompt_logprobs
        first, last = max(lo, n), min(hi, n + P - 1)  # predicting positions
        if first >= last:
            return
        targets = torch.tensor(seq.prompt_ids[first + 1 - n: last + 1 - n], device=hidden.device)
        for a in range(first, last, chunk):
            e = min(a + chunk, last)
            logp = self.logits_at(hidden[a - lo: e - lo]).log_softmax(-1)  # (m, V)
            chosen = logp.gather(-1, targets[a - first: e - first, None])[:, 0].tolist()
            top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
            top_v, top_i = (top_v.tolist(), top_i.tolist()) if k else (None, None)
            for j, value in enumerate(chosen):
                top = list(zip(top_i[j], top_v[j])) if k else []
                seq.prompt_lp.append(TokenLogprob(seq.prompt_ids[a + 1 - n + j], value, top))

    # -- decode --------------------------------------------------------------------------------------------------
    # The decode step in pieces: embedding, blocks lo..hi, then norm + head + argmax. Eager they run back to
    # back; compiled, each piece is its own CUDA graph. Everything they read is a device tensor (no host values).

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
        logits = self.logits_at(self.model.norm(x)[:, -1])  # (B, V) fp32
        return logits, argmax_rows(logits)

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One eager decode forward: ``ids``, ``positions`` (B, 1) through the bound tables, attending ``keys``.
        Returns the next-token logits (B, V) fp32 and their argmax (B,)."""
        with sdpa_kernel(EAGER_SDPA_BACKENDS):
            x, rope = self._decode_embed(ids, positions, keys)
            x = self._decode_blocks(x, rope, positions, keys, 0, len(self.model.layers))
        return self._decode_head(x)

    def _set_tables(self, seqs: list[Sequence], B: int) -> None:
        """Rows ``0..len(seqs)-1`` of the decode tables hold the sequences' block tables, rows up to ``B`` are
        padding (zeros); only rows that changed are rewritten on the host, then rows ``[0, B)`` are copied, unless
        none changed and the device holds them already (most chained steps: a row grows once a block)."""
        host = self._host_tables
        changed = False
        for b in range(B):
            # A row is known by the table list itself: it only grows while its sequence holds blocks, and freeing
            # the blocks (finish, preemption) gives the sequence a new list. (A None sequence: a padding row.)
            table = seqs[b].block_table if b < len(seqs) and seqs[b] is not None else None
            n = len(table) if table is not None else 0
            if self._row_owner[b] is not table or self._row_len[b] > n:
                changed = True
                if self._row_len[b] or self._row_owner[b] is not None:
                    host[b].zero_()
                if n:
                    host[b, :n] = torch.tensor(table, dtype=torch.int32)
                    self.rows_rewritten += 1
            elif self._row_len[b] < n:
                changed = True
                host[b, self._row_len[b]: n] = torch.tensor(table[self._row_len[b]:], dtype=torch.int32)
            self._row_owner[b], self._row_len[b] = table, n
        if not changed and B <= self._rows_synced:
            return  # rows [0, B) of the device tables are the host's (copied earlier, in stream order)
        self._rows_synced = max(self._rows_synced, B)  # (rows from B on were not touched: still the host's)
        self.table_copies += 1
        self._stage_flip ^= 1
        stage, copied = self._table_stage[self._stage_flip], self._stage_copied[self._stage_flip]
        if copied is not None:
            copied.synchronize()  # this buffer's copy of two steps ago (long done: that step was read since)
        stage[:B].copy_(host[:B])
        self.cache.tables[:B].copy_(stage[:B], non_blocking=True)
        if self.device.type == "cuda":
            self._stage_copied[self._stage_flip] = torch.cuda.Event()
            self._stage_copied[self._stage_flip].record()

    def span(self, last_position: int) -> int:
        return bucket(last_position + 1, self.span_step, self.max_seq_len)

    def _place(self, seqs: list[Sequence]) -> list[Sequence]:
        """``seqs`` in the order of the rows they decode in: each keeps its row of the last step where it can (its
        block-table row then only grows), and the others take the rows left free. Rows in the scheduler's order
        would shift every sequence after one that ended, and each shifted row's table would be written again."""
        n = len(seqs)
        rows: list[Optional[Sequence]] = [None] * n
        last = {id(s): b for b, s in enumerate(self._row_seq)}
        rest = []
        for s in seqs:
            b = last.get(id(s))
            if b is not None and b < n and rows[b] is None and self._row_seq[b] is s:
                rows[b] = s
            else:
                rest.append(s)
        free = iter([b for b in range(n) if rows[b] is None])
        for s in rest:
            rows[next(free)] = s
        self._row_seq = rows
        return rows

    def launch_decode(self, seqs: list[Sequence], on_device: bool) -> Decode:
        """Start a decode step of ``seqs`` (placed in rows by :meth:`_place`: row i of the step is
        ``Decode.seqs[i]``, feeding its newest token); ``on_device`` steps (every row greedy or plainly sampled)
        choose every row's token on the device and copy them to the host asynchronously (:attr:`Decode.tokens`)."""
        seqs = self._place(seqs)
        # built before the step is launched: its host-to-device copies then wait for nothing
        sampling = RowSampling.build(seqs, self.vocab, self.device, self.draw_kernel) if on_device else None
        n = len(seqs)
        B = self.batch_bucket(n)
        ids, pos, advance = [0] * B, [0] * B, [0] * B
        for i, s in enumerate(seqs):
            ids[i], pos[i], advance[i] = s.output_ids[-1], s.length - 1, 1
        self._set_tables(seqs, B)
        span = self.span(max(pos[:n]))
        if self.lora is not None:
            self.lora.set_rows([s.adapter for s in seqs] + [0] * (B - n))
        if self.graphs is not None:
            logits, greedy = self.graphs.run(ids, pos, advance, span)
            d = Decode(seqs, logits, greedy, pos, advance)
        else:
            dev = self.device
            ids_t, pos_t = torch.tensor(ids, device=dev)[:, None], torch.tensor(pos, device=dev)[:, None]
            logits, greedy = self.decode_step(ids_t, pos_t, self.keys[:span])
            d = Decode(seqs, logits, greedy, pos, advance, pos=pos_t)
        if on_device:
            d.sampling, d.next = sampling, next_tokens(logits, greedy, sampling)
            self._tokens_to_host(d)
        return d

    def launch_chained(self, d: Decode, seqs: Optional[list] = None) -> Decode:
        """Start the step after ``d`` without reading it: each row feeds ``d``'s next token (argmax or draw) one
        position on (the sequences' tables already hold that position: :meth:`Scheduler.reserve_next`).
        ``seqs``: ``d.seqs`` with None for rows whose sequence ended since (they become padding rows: no advance,
        an all-zero table, so they write only the scratch block); default ``d.seqs``."""
        seqs = d.seqs if seqs is None else seqs
        stop = [r for r, (a, s) in enumerate(zip(d.advance, seqs)) if a and s is None]
        advance = d.advance
        if stop:
            advance = list(advance)
            for r in stop:
                advance[r] = 0
        pos = [p + a for p, a in zip(d.positions, advance)]
        n = len(seqs)
        self._set_tables(seqs, len(pos))
        span = self.span(max(pos[:n]))
        if self.graphs is not None:
            logits, greedy = self.graphs.run_chained(d.fed, span, stop)
            nxt = Decode(seqs, logits, greedy, pos, advance)
        else:
            pos_t = d.pos + torch.tensor(advance, device=self.device)[:, None]
            logits, greedy = self.decode_step(d.fed[:, None], pos_t, self.keys[:span])
            nxt = Decode(seqs, logits, greedy, pos, advance, pos=pos_t)
        nxt.sampling = d.sampling.advanced() if d.sampling is not None else None
        nxt.next = next_tokens(logits, greedy, nxt.sampling)
        self._tokens_to_host(nxt)
        return nxt

    def _tokens_to_host(self, d: Decode) -> None:
        if self.device.type != "cuda":
            d.tokens = d.next
            return
        self._flip ^= 1  # two buffers: the next step's copy must not overwrite tokens not read yet
        d.tokens = self._token_host[self._flip][: d.next.shape[0]]
        d.tokens.copy_(d.next, non_blocking=True)
        d.ready = torch.cuda.Event()
        d.ready.record()


def _interpreting() -> bool:
    from lmforge.serve import kernels as K

    return K.triton is not None and K._INTERPRET
