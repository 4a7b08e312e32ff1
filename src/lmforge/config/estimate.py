"""Per-GPU memory of a pretraining config, before any work: ``lmforge config RECIPE ... --estimate``.

    est = estimate_memory(load_config("llama2/7b", ["trainer.devices=4", "model.fsdp=true"]),
                          gpu_memory_bytes=parse_memory_size("80GB"))
    print(est.render())

Nothing is allocated: the parameters are counted exactly on a ``meta``-device :class:`Transformer`; the
rest is arithmetic. What is counted, per GPU (bytes):

* **weights**: float32 (the master copy under mixed precision), 4 B/param.
* **gradients**: float32, 4 B/param (mixed precision accumulates into the float32 parameters' grads). The row is
  all of them; the step's peak (below) counts those resident at its moment: all of them while gradients accumulate
  over micro batches (``model.global_batch_size`` > micro batch x data-parallel ranks), else only those backward
  has made by then (the loop's ``zero_grad(set_to_none=True)`` frees them after each step).
* **optimizer state**: Adam's two float32 moments, 8 B/param. Weights + gradients + optimizer = 16 B/param.
* **compute copy** (mixed precision): the parameters in the compute dtype. Without FSDP, autocast casts every
  matrix-multiply weight once per forward (all parameters but the input embedding tables; the chunked loss casts
  the head itself) and its cast cache holds every copy until the forward ends, checkpointed blocks' too: the row is
  that. After the forward only the copies a linear saved for backward live: every block's and the whole loss's
  head's without checkpointing, none of a checkpointed block's (recomputation casts them again, one chunk at a
  time) and none of the head's with the chunked loss (it keeps only gradients). Under FSDP
  (``MixedPrecisionPolicy``) a block's bf16 parameters are gathered just before it runs: counted as two gathered
  blocks (the running one and the prefetched next one) plus the root (embedding, final norm, head), which stays
  gathered, throughout the step; with ``fsdp_sharding_strategy=grad`` gathered parameters stay from forward to
  backward, so all of them. In float32 training the FSDP working set is the same, at 4 B/param.
* **activations**, per micro batch: Korthikanti et al. (2022, "Reducing Activation Recomputation in Large
  Transformer Models") count ``s*b*h*(34 + 5*a*s/h)`` bytes per layer in 16-bit without recomputation. lmforge
  runs attention through SDPA (flash / memory-efficient kernels), which keep no ``a*s*s`` score matrix, so the
  ``5*a*s/h`` term is dropped. The ``34`` is recounted for lmforge's block, tensor by tensor: the norms keep
  their input in float32 for the statistics (RMSNorm also its normalized output, for the weight's gradient);
  each projection keeps its input in the compute dtype (q/k/v and gate/up each cast it separately when the
  residual stream is float32, as it is under autocast without FSDP); SDPA keeps q, k, v and its output
  (grouped-query attention: smaller k and v); the MLP keeps ``2*f`` values per token (``4*f`` for gated
  MLPs such as SwiGLU: gate, up, activation and product); dropout keeps a 1-byte mask when
  ``hidden_dropout > 0``. Outside the layers: the final norm and the head's input. A block's backward adds the
  gradients flowing through it: the residual stream's in and out (float32) and, in the MLP's backward, its hidden
  tensors' (``3*f`` values per token gated, ``2*f`` plain).
  (An earlier H100 check, a 4-layer Llama-2-7B shape at sequence 4096 and a 4-layer GPT-3 1.3B shape at 2048,
  matched the kept activations without recomputation within 1%.)
* **the loss, whole or chunked**: ``model.loss_chunk_size`` is resolved by training's own rule
  (:func:`lmforge.train.assembly.resolve_loss_chunk_size`: null = automatic, on for vocabularies of 64k and
  more and whenever activation checkpointing is on; 0 = off; N = N tokens; never under tensor or pipeline
  parallelism, which compute the loss their own way). Whole: the forward makes every token's float32 logits and
  their log-softmax (``8*V`` bytes a token); backward starts with the log-softmax kept, its gradient and the
  logits' gradient (``12*V``). Chunked (:func:`lmforge.train.objectives.chunked_linear_cross_entropy`), the head
  and the cross-entropy run in the forward pass one chunk of tokens at a time and the whole batch's logits never
  exist: the logits term is one chunk's at its peak, the logits in the compute dtype, their float32 copy,
  ``z - lse`` and its exp (the softmax gradient, then its masked copy): ``e + 12`` bytes per vocabulary entry and
  token (8 more with a final logit soft-cap), plus ``e`` for the previous chunk's gradient, alive while the next
  chunk's logits are made (from the second chunk on). So it stops growing once the micro batch holds one chunk
  of tokens. Beside it, for the whole micro batch, the head's input and its gradient, and the float32 ``(V, C)``
  gradient of the head weight accumulated over the chunks (scaled once more at the loss's backward).
* **checkpointing** (``model.activations_checkpoint_*``): ``full`` keeps only the input of each chunk of
  ``activations_checkpoint_num_layers`` blocks (``uniform``; default 1) and recomputes one chunk at a time in
  backward; ``block`` checkpoints the first N blocks and keeps the others whole; ``selective`` recomputes the
  core attention only, which SDPA already keeps no scores for: the estimate equals no recomputation.
* **the step's peak**: a step (forward under autocast, backward outside it, as lmforge's loop runs it) holds a
  different mix at each moment; the estimate adds, at each, the gradients and compute copy resident then and the
  micro batch's tensors, and takes the largest: the loss's forward (every kept activation, the whole compute copy,
  the logits being made and, chunked, the head-weight accumulator), the loss's backward, the last block's
  backward (the first to run: every kept activation, its recomputed chunk, the head's gradients), the first
  block's backward (the last to run: the gradients of every later block and of the head, the first chunk's
  activations and compute copy) and the end of backward (every gradient). Checked on an H100
  (``benchmarks/estimate_loss_check.py``, records in ``benchmarks/results``, tested by
  ``tests/config/test_estimate.py``) against ``torch.cuda.max_memory_allocated`` of one forward + backward,
  2-block Llama-3-8B shape at sequence 4096: 128k vocabulary chunked, micro batch 1 and 2 (peak in the loss's
  forward) within 1%; 32k vocabulary under full checkpointing, chunked and whole (peak in the first block's
  backward) 2-8% high. ``activations per micro batch`` is the micro batch's tensors at that peak.
* **parallel layouts**: world = ``trainer.devices x trainer.num_nodes``; tensor parallel (``tp``) divides
  parameters, state and most activations as Megatron does (norm inputs and dropout masks stay whole without
  ``model.sequence_parallel``); pipeline parallel (``pp``) divides the layers, the worst stage holding the
  embedding or the head (a tied head: the last stage's copy of the embedding), and its first stage keeps ``pp``
  micro batches in flight (1F1B), so all ``L`` layers' activations. FSDP (``model.fsdp``,
  :mod:`lmforge.parallel.fsdp`) keeps float32 weights, gradients and optimizer state sharded over the
  data-parallel ranks under every strategy; ``full`` frees a block's gathered parameters after its forward,
  ``grad`` (ZeRO-2) keeps them gathered until backward (the compute copy above), ``hybrid`` shards inside a
  node of ``trainer.devices`` ranks and replicates across nodes. ``model.optim.name=distributed_fused_adam``
  shards the optimizer state (lmforge's loader turns it into FSDP ``grad``).
* **CUDA context and workspace**: a fixed 1 GiB allowance (context, cuBLAS/NCCL workspaces). The allocator's
  fragmentation and transient buffers are what the users' rule of 60-80% of the card leaves room for.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from lmforge.errors import ConfigError

GiB = 1 << 30
DEFAULT_VOCAB = 32000
CUDA_CONTEXT_BYTES = 1 * GiB
BAND = (0.60, 0.80)  # the users' rule of thumb: a micro batch should fill 60-80% of the card
MAX_TABLE_MBS = 1024  # the table stops here even when every row fits

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 1 << 10,
    "m": 1 << 20, "mib": 1 << 20, "mb": 1 << 20,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1 << 30,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1 << 40,
}


def parse_memory_size(value: Any, flag: str = "--gpu-memory") -> int:
    """Bytes of a memory size: ``80GB``, ``80GiB``, ``80G``, ``40000MB``, ``1.5TB`` or a number of bytes.

    Units are binary, as GPU memory is counted (an "80GB" card has 80 GiB; ``nvidia-smi`` shows MiB):
    GB = GiB = G = 2^30 bytes, MB = MiB = 2^20.

    Raises:
        ConfigError: not a size, not positive, or a bare number too small to be a card (naming ``flag``).
    """
    example = "write e.g. 80GB, 80GiB, 80G or 40000MB"
    if isinstance(value, bool):
        raise ConfigError(f"{flag} {value!r} is not a memory size; {example}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{flag} {value!r} is not a memory size; {example}")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = int(number * _UNITS[unit])
    if not math.isfinite(number) or size <= 0:
        raise ConfigError(f"{flag} {value!r} must be a positive memory size; {example}")
    if unit in ("", "b") and size < (1 << 20):
        raise ConfigError(f"{flag} {value!r} is {size} bytes, too small for a GPU; give a unit, {example}")
    return size


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """The parallel layout the estimate used."""

    world_size: int
    devices: int
    num_nodes: int
    tp: int
    pp: int
    dp: int
    fsdp: Optional[str]  # None | full | grad | hybrid
    shard_group: int  # data-parallel ranks the sharded parts are split over
    params_sharded: bool
    grads_sharded: bool
    optimizer_sharded: bool
    cpu_offload: bool
    sequence_parallel: bool
    precision: str
    optimizer: str
    seq_length: int
    checkpointing: str  # "none", "full (uniform, 1 layer per chunk)", ...
    loss_chunk_size: int = 0  # tokens per chunk of the head + cross-entropy (resolved); 0: the whole micro batch
    loss_chunk_setting: Optional[int] = None  # model.loss_chunk_size as written (None: automatic)

    def describe_loss(self) -> str:
        """The loss layout counted: ``chunked, 2048 tokens a chunk (model.loss_chunk_size: automatic)``."""
        how = ("automatic" if self.loss_chunk_setting is None else str(self.loss_chunk_setting))
        if self.loss_chunk_size:
            return f"chunked, {self.loss_chunk_size} tokens a chunk (model.loss_chunk_size: {how})"
        why = "tensor/pipeline parallel loss" if self.tp > 1 or self.pp > 1 else f"model.loss_chunk_size: {how}"
        return f"whole: the micro batch's logits at once ({why})"

    def describe(self) -> str:
        gpus = f"{self.world_size} GPU" + ("s" if self.world_size > 1 else "")
        if self.num_nodes > 1:
            gpus += f" ({self.num_nodes} nodes x {self.devices})"
        parts = [gpus, f"data parallel {self.dp}"]
        if self.tp > 1 or self.pp > 1:
            parts.append(f"tensor parallel {self.tp}, pipeline parallel {self.pp}")
        if self.fsdp:
            parts.append(f"FSDP {self.fsdp} (sharded over {self.shard_group})")
        elif self.optimizer_sharded:
            parts.append(f"optimizer state sharded over {self.shard_group}")
        else:
            parts.append("no sharding (DDP)")
        if self.cpu_offload:
            parts.append("shards offloaded to CPU")
        return ", ".join(parts)


@dataclass
class MicroBatchRow:
    micro_batch_size: int
    total_bytes: int
    fraction: Optional[float]  # of the card; None without a card size


@dataclass
class Suggestion:
    """One change to try when nothing fits: the overrides to type and the total it gives at micro batch 1."""

    overrides: str
    total_bytes: int
    fraction: float
    fits: bool


@dataclass
class MemoryEstimate:
    """Per-GPU memory of a config, in bytes. ``total(mbs)`` adds the activations of ``mbs`` samples."""

    num_params: int  # the whole model, exact
    params_per_gpu: int  # held by one GPU's model-parallel part (tp/pp split), before FSDP sharding
    vocab_size: int  # padded, as the model has it
    vocab_assumed: bool  # no tokenizer: 32000 padded
    layout: Layout
    weights: int
    gradients: int
    optimizer: int
    compute_copy: int  # the most held at once (the forward pass's); at the peak: peak(mbs).compute_copy
    activations_per_sample: int  # one sequence's tensors at the step's peak, checkpointing applied: activations(1)
    logits_per_sample: int  # the loss's logits and their gradients at their own peak: logits(1)
    cuda_context: int
    terms: "ActivationTerms"  # the step's parts and the moments its peak can be at
    micro_batch_size: Optional[int]  # the config's
    gpu_memory_bytes: Optional[int]
    table: list[MicroBatchRow] = field(default_factory=list)
    pick: Optional[int] = None  # the largest power-of-two micro batch at <= 80% of the card
    max_micro_batch: Optional[int] = None  # the largest micro batch (any integer) at <= 80%
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    name: Optional[str] = None

    @property
    def state(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.weights + self.gradients + self.optimizer

    @property
    def fixed(self) -> int:
        """What every moment of the step holds, whatever the micro batch: weights, optimizer state, context."""
        return self.weights + self.optimizer + self.cuda_context

    def peak(self, micro_batch_size: int) -> "Phase":
        """The moment of one step that holds the most, with the gradients, compute copy and activations held then."""
        return self.terms.peak(micro_batch_size)

    def step(self, micro_batch_size: int) -> int:
        """What one step adds to :attr:`fixed` at its peak (gradients and compute copy resident then included)."""
        return self.peak(micro_batch_size).total

    def activations(self, micro_batch_size: int) -> int:
        """The micro batch's own tensors at the step's peak."""
        return self.terms.activations(micro_batch_size)

    def logits(self, micro_batch_size: int) -> int:
        """The loss's logits and their gradients at their own peak (chunked: one chunk's)."""
        return self.terms.logits(micro_batch_size)

    def total(self, micro_batch_size: int) -> int:
        return self.fixed + self.step(micro_batch_size)

    def fraction(self, micro_batch_size: int) -> Optional[float]:
        return self.total(micro_batch_size) / self.gpu_memory_bytes if self.gpu_memory_bytes else None

    @property
    def pick_in_band(self) -> bool:
        """True when the picked micro batch fills at least 60% of the card."""
        return self.pick is not None and self.gpu_memory_bytes is not None and \
            self.total(self.pick) >= BAND[0] * self.gpu_memory_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = self.state
        d["fixed"] = self.fixed
        d["pick_in_band"] = self.pick_in_band
        if self.micro_batch_size:
            d["total_at_config_micro_batch"] = self.total(self.micro_batch_size)
        return d

    def render(self) -> str:
        """The estimate as plain text lines (GiB = 2^30 bytes)."""
        lay = self.layout
        card = self.gpu_memory_bytes
        out = [f"memory estimate{' of ' + self.name if self.name else ''}, per GPU (GiB = 2^30 bytes)"]
        vocab = (f"vocabulary {self.vocab_size} (assumed: no tokenizer given, {DEFAULT_VOCAB} padded)"
                 if self.vocab_assumed else f"vocabulary {self.vocab_size}")
        out.append(f"  model        {_count(self.num_params)} parameters ({self.num_params:,}, exact), {vocab}")
        out.append(f"  layout       {lay.describe()}")
        out.append(f"  training     precision {lay.precision}, optimizer {lay.optimizer}, sequence {lay.seq_length}, "
                   f"activation checkpointing {lay.checkpointing}")
        out.append(f"  loss         {lay.describe_loss()}")
        out.append("")
        width = 34
        rows = [
            ("weights (fp32)", self.weights, _sharded(lay.params_sharded, lay)),
            ("gradients (fp32)", self.gradients, _sharded(lay.grads_sharded, lay)),
            ("optimizer state (Adam, fp32)", self.optimizer, _sharded(lay.optimizer_sharded, lay)),
            ("compute copy of the weights", self.compute_copy, _copy_note(lay)),
            ("activations per micro batch", self.activations_per_sample,
             f"one sequence at the step's peak; the logits at theirs {_gib(self.logits_per_sample)} GiB "
             f"({_logits_note(lay)})"),
            ("CUDA context + workspace", self.cuda_context, "fixed allowance"),
        ]
        for label, value, note in rows:
            out.append(f"  {label:<{width}}{_gib(value):>9} GiB   {note}")
        out.append(f"  {'fixed: weights, optimizer, context':<{width}}{_gib(self.fixed):>9} GiB")
        peak = self.peak(1)
        out.append(f"  {'peak of a step (micro batch 1)':<{width}}{_gib(peak.total):>9} GiB   at {peak.name}: "
                   f"gradients {_gib(peak.gradients)}, compute copy {_gib(peak.compute_copy)}, activations "
                   f"{_gib(peak.activations)} GiB{_accumulation_note(self.terms, 1)}")
        out.append("")
        if card is None:
            if self.micro_batch_size:
                out.append(f"  total at model.micro_batch_size={self.micro_batch_size}: "
                           f"{_gib(self.total(self.micro_batch_size))} GiB")
            return _join(out, self.notes)
        out.append(f"  micro batch   total GiB   % of a {_gib(card)} GiB card")
        for row in self.table:
            mark = ""
            if row.micro_batch_size == self.pick:
                mark = "  <- largest at <= 80%"
            elif row.fraction is not None and row.fraction > 1.0:
                mark = "  does not fit"
            elif row.fraction is not None and row.fraction > BAND[1]:
                mark = "  over 80%"
            if row.micro_batch_size == self.micro_batch_size:
                mark += "  (config)"
            out.append(f"  {row.micro_batch_size:>11} {_gib(row.total_bytes):>11} {100 * row.fraction:>9.0f}%{mark}")
        out.append("")
        if self.pick is not None:
            pct = 100 * self.fraction(self.pick)
            band = ("inside the 60-80% band" if self.pick_in_band else
                    "below 60%: the card has room for a longer sequence or a larger model")
            more = ""
            if self.max_micro_batch is not None and self.max_micro_batch > self.pick:
                more = f"; any micro batch up to {self.max_micro_batch} stays at <= 80%"
            out.append(f"  fits: model.micro_batch_size={self.pick} -> {_gib(self.total(self.pick))} GiB, "
                       f"{pct:.0f}% of the card, {band}{more}")
            if self.table and self.table[-1].fraction is not None and self.table[-1].fraction <= BAND[1]:
                out.append(f"  (the table stops at micro batch {MAX_TABLE_MBS})")
        else:
            out.append(f"  nothing fits: micro batch 1 needs {_gib(self.total(1))} GiB, "
                       f"{100 * self.fraction(1):.0f}% of the card (the rule: at most 80%)")
            if self.suggestions:
                out.append("  change, largest effect first (total at micro batch 1 after the change):")
                for s in self.suggestions:
                    out.append(f"    {s.overrides:<60} {_gib(s.total_bytes):>7} GiB {100 * s.fraction:>5.0f}%"
                               f"{'  fits' if s.fits else ''}")
        return _join(out, self.notes)


def _join(lines: list[str], notes: list[str]) -> str:
    if notes:
        lines = lines + [""] + [f"  note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _sharded(sharded: bool, lay: Layout) -> str:
    if lay.cpu_offload and lay.fsdp:
        return "in CPU memory (fsdp_cpu_offload)"
    split = f", split over tensor x pipeline parallel {lay.tp * lay.pp}" if lay.tp * lay.pp > 1 else ""
    if sharded and lay.shard_group > 1:
        return f"sharded over {lay.shard_group}{split}"
    return ("whole on every data-parallel rank" + split) if not sharded else "sharded over 1 (one data-parallel rank)"


def _logits_note(lay: Layout) -> str:
    if lay.loss_chunk_size:
        return "chunked: does not grow past one chunk"
    return "whole: every token's"


def _accumulation_note(terms: "ActivationTerms", micro_batch_size: int) -> str:
    if terms.accumulating(micro_batch_size):
        return " (gradients accumulate over micro batches: all resident)"
    return " (one micro batch a step)"


def _copy_note(lay: Layout) -> str:
    if lay.fsdp == "grad":
        return "all gathered from forward to backward (grad strategy)"
    if lay.fsdp:
        return "two gathered blocks + the root (FSDP)"
    if lay.precision == "32":
        return "none in float32"
    if lay.loss_chunk_size:
        return "autocast's bf16/fp16 casts of the matmul weights, held in forward (the head's: by the chunked loss)"
    return "autocast's bf16/fp16 casts of the matmul weights, held in forward"


# ---------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------

def _get(obj: Any, name: str, default: Any) -> Any:
    value = getattr(obj, name, default)
    return default if value is None else value


@dataclass
class _Counts:
    total: int
    layer: list[int]  # parameters of each block
    first_extra: int  # embedding tables (the first pipeline stage)
    last_extra: int  # final norm + head (the last pipeline stage; a tied head is a copy there)
    input_tables: int  # embedding tables not used by a matrix multiply (no autocast copy)


@dataclass
class Phase:
    """One moment of a training step and what it holds beyond the weights, the optimizer state and the context
    (bytes): the gradients and compute copy resident then, and the micro batch's own tensors."""

    name: str
    gradients: int
    compute_copy: int
    activations: int

    @property
    def total(self) -> int:
        return self.gradients + self.compute_copy + self.activations


@dataclass
class ActivationTerms:
    """What one micro batch's forward + backward holds, in parts (bytes), and the moments where its peak can be.

    A step (lmforge's loop: forward under autocast, backward outside it, ``zero_grad(set_to_none=True)`` after the
    optimizer step) peaks at one of a few moments, each holding a different mix; :meth:`phases` lists them and
    :meth:`peak` takes the largest. Per-sequence parts are multiplied by the micro batch size."""

    seq_length: int
    layers: int  # per sequence: what the blocks keep from forward for backward (checkpointing applied)
    head: int  # per sequence: final norm, the head's input (chunked: and its gradient), the embedding dropout mask
    recompute: int  # per sequence: what a recomputed chunk of blocks holds again in backward (full checkpointing)
    first_chunk: int  # per sequence: what the first chunk of blocks holds at its backward (the last one to run)
    backward_temps: int  # per sequence: the gradients flowing through a block's backward (residual stream, MLP)
    logits_per_token: float  # chunked: one chunk's logits and their gradients at their peak; whole: at backward
    logits_forward_per_token: float  # whole: the fp32 logits and their log-softmax in the forward pass
    overlap_per_token: float  # chunked: the previous chunk's logit gradient, alive while the next chunk's are made
    loss_chunk_size: int  # 0: every token's logits at once; N: N tokens' at most
    loss_forward: int  # chunked, per micro batch: the fp32 head-weight gradient accumulator
    loss_backward: int  # chunked, per micro batch: that accumulator and its scaled copy (the head's gradient)
    gradients: int  # all of them (fp32), as the gradients row
    gradients_after_loss: int  # the head's (and final norm's), made by the loss's backward
    gradients_before_first_chunk: int  # all but the first chunk of blocks' and the input tables'
    copy_forward: int  # compute copy held in the forward pass
    copy_loss_backward: int  # ... at the loss's backward
    copy_last_chunk: int  # ... at the backward of the last chunk of blocks (the first to run)
    copy_first_chunk: int  # ... at the backward of the first chunk of blocks
    accumulate_below: Optional[int] = None  # micro batches smaller than this accumulate; None: always

    def accumulating(self, micro_batch_size: int) -> bool:
        """True when a step runs several micro batches, so the gradients are resident from the second one on."""
        return self.accumulate_below is None or micro_batch_size < self.accumulate_below

    def logits(self, micro_batch_size: int) -> int:
        """The loss's logits at their peak: chunked, one chunk's (logits, fp32 copy, softmax gradient and its
        masked copy, and the previous chunk's gradient once there are two chunks); whole, every token's."""
        tokens = micro_batch_size * self.seq_length
        if self.loss_chunk_size:
            overlap = self.overlap_per_token if tokens > self.loss_chunk_size else 0
            return math.ceil((self.logits_per_token + overlap) * min(tokens, self.loss_chunk_size))
        return math.ceil(self.logits_per_token * tokens)

    def phases(self, micro_batch_size: int) -> list[Phase]:
        """The moments where a step's peak can be, in the order they happen."""
        b = micro_batch_size
        tokens = b * self.seq_length
        acc = self.accumulating(b)

        def grads(made: int) -> int:  # gradients resident: those made so far, or all while accumulating
            return self.gradients if acc else made

        kept = b * (self.layers + self.head)
        if self.loss_chunk_size:
            loss_fwd = kept + self.loss_forward + self.logits(b)
            loss_bwd = kept + self.loss_backward
        else:
            loss_fwd = kept + math.ceil(self.logits_forward_per_token * tokens)
            loss_bwd = kept + self.logits(b)
        return [
            Phase("the loss's forward", grads(0), self.copy_forward, loss_fwd),
            Phase("the loss's backward", grads(0), self.copy_loss_backward, loss_bwd),
            Phase("the last block's backward", grads(self.gradients_after_loss), self.copy_last_chunk,
                  b * (self.layers + self.recompute + self.backward_temps)),
            Phase("the first block's backward", grads(self.gradients_before_first_chunk), self.copy_first_chunk,
                  b * (self.first_chunk + self.backward_temps)),
            Phase("the end of backward", self.gradients, 0, 0),
        ]

    def peak(self, micro_batch_size: int) -> Phase:
        """The phase holding the most (the first of equals)."""
        return max(self.phases(micro_batch_size), key=lambda p: p.total)

    def activations(self, micro_batch_size: int) -> int:
        """The micro batch's own tensors at the step's peak."""
        return self.peak(micro_batch_size).activations


def _count_params(model_cfg) -> _Counts:
    import torch

    from lmforge.models.meta import meta_device
    from lmforge.models.transformer import Transformer

    with meta_device():
        model = Transformer(model_cfg)
    total = sum(p.numel() for p in model.parameters())
    layer = [sum(p.numel() for p in block.parameters()) for block in model.layers]
    embed = model.embed_tokens.weight.numel()
    positions = model.embed_positions.weight.numel() if model.embed_positions is not None else 0
    norm = sum(p.numel() for p in model.norm.parameters())
    head = model.lm_head.weight.numel() if model.lm_head is not None else embed
    tied = model.lm_head is None
    return _Counts(total=total, layer=layer, first_extra=embed + positions, last_extra=norm + head,
                   input_tables=positions + (0 if tied else embed))


def _norm_bytes(rmsnorm: bool, r: int) -> tuple[int, int]:
    """(bytes kept per hidden value, bytes of the output per hidden value) of one norm."""
    return (4 + (r if rmsnorm else 0)), (r if rmsnorm else 4)


def _layer_activation_bytes(mc, e: int, r: int, tp: int, sp: bool) -> int:
    """Bytes one block keeps for backward, per token (no recomputation)."""
    h, f = mc.hidden_size, mc.ffn_hidden_size
    q = mc.num_attention_heads * mc.head_dim
    kv = mc.num_query_groups * mc.head_dim
    rms = mc.normalization == "rmsnorm"
    norm_keep, norm_out = _norm_bytes(rms, r)
    gated = mc.activation in ("swiglu", "geglu")
    moe = mc.num_moe_experts
    cast = norm_out != e  # each projection casts the norm output separately
    dropout = 1 if (mc.hidden_dropout or 0) > 0 else 0

    # not split by tensor parallelism (unless sequence parallel): norms, dropout masks; split: the rest
    whole = 2 * norm_keep * h + 2 * dropout * h
    attn_in = (3 if cast else 1) * e * h
    attn = e * (q + 2 * kv) + e * q + 4 * mc.num_attention_heads  # q, k, v, output, log-sum-exp
    mlp_in = ((2 if gated else 1) if cast else 1) * e * h
    mlp = (4 if gated else 2) * e * f
    if moe:
        mlp = mlp * mc.moe_router_topk + 4 * moe  # each token through top-k experts; router scores
    split = attn_in + attn + mlp_in + mlp
    if sp:
        return (whole + split) // tp
    return whole + split // tp


def estimate_memory(cfg, vocab_size: Optional[int] = None, gpu_memory_bytes: Optional[int] = None,
                    name: Optional[str] = None, _suggest: bool = True) -> MemoryEstimate:
    """Per-GPU memory of training ``cfg`` (a loaded :class:`~lmforge.config.schema.PretrainConfig`).

    Args:
        cfg: the config; layout keys that the schema may not have are read with defaults.
        vocab_size: the tokenizer's vocabulary; None: 32000 (padded to ``model.make_vocab_size_divisible_by``).
        gpu_memory_bytes: the card; with it, the micro-batch table, the pick and (when nothing fits) what to change.
        name: the recipe or file, for the heading.

    See the module docstring for what is counted.
    """
    from lmforge.config.loader import model_config_from
    from lmforge.train.assembly import resolve_loss_chunk_size

    t, m = cfg.trainer, cfg.model
    vocab_assumed = vocab_size is None
    mc = model_config_from(cfg, DEFAULT_VOCAB if vocab_assumed else int(vocab_size))
    counts = _count_params(mc)
    notes: list[str] = []

    devices, nodes = int(_get(t, "devices", 1)), int(_get(t, "num_nodes", 1))
    world = devices * nodes
    tp = int(_get(m, "tensor_model_parallel_size", 1))
    pp = int(_get(m, "pipeline_model_parallel_size", 1))
    dp = max(1, world // (tp * pp))
    precision = str(_get(t, "precision", "bf16-mixed"))
    mixed = precision != "32"
    optimizer = str(_get(m.optim, "name", "fused_adam"))
    fsdp = bool(_get(m, "fsdp", False))
    strategy = str(_get(m, "fsdp_sharding_strategy", "full")) if fsdp else None
    cpu_offload = bool(_get(m, "fsdp_cpu_offload", False)) and fsdp
    sp = bool(_get(m, "sequence_parallel", False)) and tp > 1
    dist_opt = optimizer == "distributed_fused_adam"

    if strategy == "hybrid":
        shard = max(1, min(dp, devices // (tp * pp) or 1))
    else:
        shard = dp
    params_sharded = fsdp  # lmforge's FSDP keeps float32 shards at rest under every strategy
    grads_sharded = fsdp
    opt_sharded = fsdp or dist_opt

    # parameters one GPU's model-parallel part holds (the worst pipeline stage), then divided by tp
    layers = counts.layer
    L = len(layers)
    if pp > 1:
        per_stage = math.ceil(L / pp)
        stage_layers = sum(sorted(layers, reverse=True)[:per_stage])
        held = stage_layers + max(counts.first_extra, counts.last_extra)
    else:
        held = counts.total
    held = math.ceil(held / tp)

    def part(bytes_per_param: int, sharded: bool) -> int:
        if cpu_offload:
            return 0
        return math.ceil(held * bytes_per_param / (shard if sharded else 1))

    weights, grads, opt = part(4, params_sharded), part(4, grads_sharded), part(8, opt_sharded)

    # the parameters in the compute dtype: the largest set held at once (the compute copy row)
    e = 2 if mixed else 4
    block = max(layers) if layers else 0
    block_copy = math.ceil(block * e / tp)  # one block's matmul weights (its norms' few are counted too)
    if fsdp and strategy != "grad":
        root = counts.first_extra + counts.last_extra
        compute_copy = math.ceil((2 * block + root) * e / tp)
    elif fsdp or mixed:  # grad strategy: everything gathered; DDP + autocast: every matmul weight cast once
        matmul = held if fsdp else max(0, held - math.ceil(counts.input_tables / tp))
        compute_copy = matmul * e
    else:
        compute_copy = 0

    # activations of one sequence
    seq = int(_get(m.data, "seq_length", 0) or m.encoder_seq_length)
    r = 4 if (not mixed or not fsdp) else 2  # residual stream: float32 under autocast (float32 embeddings)
    per_layer = _layer_activation_bytes(mc, e, r, tp, sp) * seq
    granularity = _get(m, "activations_checkpoint_granularity", None)
    method = _get(m, "activations_checkpoint_method", None)
    n = int(_get(m, "activations_checkpoint_num_layers", 1))
    boundary = math.ceil(r * mc.hidden_size * seq / (tp if sp else 1))  # a chunk's input
    rms_keep, norm_out = _norm_bytes(mc.normalization == "rmsnorm", r)
    V, C = mc.vocab_size, mc.hidden_size
    head_copy = math.ceil(e * V * C / tp) if mixed else 0  # the head weight (or tied table) in the compute dtype
    # a block's backward: the residual stream's gradient in and out (float32 under autocast) and, in the MLP's
    # backward (it runs first), the gradients of its hidden tensors (gated: product, activation, gate/up)
    ffn = mc.ffn_hidden_size * (mc.moe_router_topk if mc.num_moe_experts else 1)
    gated = mc.activation in ("swiglu", "geglu")
    backward_temps = math.ceil(2 * r * C / (tp if sp else 1) + (3 if gated else 2) * e * ffn / tp) * seq
    # the loss: chunked as training resolves it (the causal LM loss of one process; TP and PP have their own)
    chunk_setting = _get(m, "loss_chunk_size", None)
    chunk = 0
    if tp == 1 and pp == 1:
        chunk = resolve_loss_chunk_size(chunk_setting, mc, checkpointing=bool(granularity))
    cap = 1 if mc.final_logit_softcapping else 0
    logits_forward_per_token = 0.0
    overlap_per_token = 0.0
    loss_forward = loss_backward = 0
    if chunk:
        # _ce_chunk on one chunk: the logits in the compute dtype (F.linear's output), their fp32 copy (the same
        # tensor in float32 training), then z - lse and its exp (the softmax: the gradient), the gradient's masked
        # copy replacing it; a soft-cap keeps tanh and its derivative besides. The previous chunk's gradient
        # (compute dtype, the loop's ``g``) is alive while the next chunk's logits are made: one more e per entry.
        logits_per_token = (e + (4 if mixed else 0) + 8 + 8 * cap) * V
        overlap_per_token = e * V
        head = (rms_keep + 2 * norm_out) * C  # final norm, the head's input and its gradient (grad_h)
        loss_forward = math.ceil(4 * V * C / tp)  # the head weight's gradient, accumulated in fp32 over the chunks
        # the loss's backward scales that accumulator (a second 4*V*C; under FSDP cast to the bf16 weight's dtype)
        loss_backward = 2 * loss_forward + (head_copy if fsdp else 0)
    else:
        # whole: the forward makes the fp32 logits and their log-softmax (kept; the compute-dtype logits are freed
        # by the fp32 copy, which the log-softmax frees); backward starts with the log-softmax, the gradient of it
        # and the gradient of the logits, all fp32 (a soft-cap adds its tanh)
        logits_forward_per_token = (8 + 4 * cap) * V / tp
        logits_per_token = (12 + 4 * cap) * V / tp
        head = (rms_keep + e) * C  # final norm, head input
    if (mc.hidden_dropout or 0) > 0:
        head += C  # the embedding dropout's mask
    # kept activations (layer_bytes), what a recomputed chunk adds at the last chunk's backward (recompute) and
    # what the first chunk holds at its own backward (first_chunk; later chunks' are freed by then)
    recompute = 0
    first_blocks = 1  # blocks in the first chunk (their gradients come last)
    checkpointed_copy = False  # the blocks' compute copies are recast at recomputation, not kept from forward
    if granularity == "full":
        method = method or "uniform"
        n = max(1, min(n, L)) if L else 1
        first_blocks = n if method != "block" else 1
        checkpointed_copy = True
        if method == "block":
            layer_bytes = n * boundary + (L - n) * per_layer
            recompute = per_layer if n >= L else 0  # the last block is recomputed only when all are checkpointed
            first_chunk = boundary + per_layer
            checkpointing = f"full (block: the first {n} of {L} layers recomputed)"
        else:
            layer_bytes = math.ceil(L / n) * boundary
            recompute = n * per_layer
            first_chunk = boundary + n * per_layer
            checkpointing = f"full (uniform, {n} layer(s) per chunk)"
    else:
        layer_bytes = L * per_layer
        first_chunk = per_layer
        checkpointing = "selective (core attention recomputed)" if granularity == "selective" else "none"
        if granularity == "selective":
            notes.append("selective checkpointing recomputes the core attention, whose score matrix SDPA does not "
                         "keep anyway: it saves nothing in this estimate")
    if pp > 1:
        notes.append(f"pipeline parallel: the first stage keeps {pp} micro batches in flight (1F1B), so all "
                     f"{L} layers' activations are counted")

    # the compute copy at each moment. FSDP: the gathered blocks (or all, grad strategy) throughout. Autocast
    # without FSDP: its cast cache holds every matmul weight's copy until the forward ends (checkpointed blocks'
    # too; the chunked loss casts the head itself); after it, only the copies a linear saved for backward live:
    # every block's and the head's without checkpointing, none of a checkpointed block's (recomputation casts
    # them again, one chunk at a time), none of the head's with the chunked loss (it keeps only gradients)
    blocks_copy = max(0, compute_copy - head_copy)
    if fsdp or not mixed:
        copy_loss_bwd = copy_last = copy_first = compute_copy
    else:
        whole_head = 0 if chunk else head_copy
        if not checkpointed_copy:
            copy_loss_bwd, copy_last, copy_first = blocks_copy + whole_head, blocks_copy, block_copy
        elif method == "block":
            kept_blocks = (L - n) * block_copy
            copy_loss_bwd, copy_last, copy_first = kept_blocks + whole_head, max(kept_blocks, block_copy), block_copy
        else:
            copy_loss_bwd, copy_last, copy_first = whole_head, n * block_copy, n * block_copy

    # the gradients made by each moment (backward runs from the head to the first block, the tables last)
    def grad_bytes(params: int) -> int:
        return 0 if cpu_offload else math.ceil(params * 4 / tp / (shard if grads_sharded else 1))

    grads_after_loss = min(grads, grad_bytes(counts.last_extra))
    grads_before_first = max(0, grads - grad_bytes(sum(layers[:first_blocks]) + counts.input_tables))
    # gradient accumulation (several micro batches a step): the gradients are resident from the second micro batch's
    # forward on; one micro batch a step: none before its backward (zero_grad sets them to None)
    gbs = _get(m, "global_batch_size", None)
    if pp > 1:
        accumulate_below = None  # the pipeline schedule runs several micro batches a step
    elif gbs:
        accumulate_below = math.ceil(int(gbs) / dp)
    else:
        accumulate_below = None if int(_get(t, "accumulate_grad_batches", 1)) > 1 else 0
    terms = ActivationTerms(seq_length=seq, layers=layer_bytes, head=head * seq, recompute=recompute,
                            first_chunk=first_chunk, backward_temps=backward_temps,
                            logits_per_token=logits_per_token, logits_forward_per_token=logits_forward_per_token,
                            overlap_per_token=overlap_per_token, loss_chunk_size=chunk, loss_forward=loss_forward,
                            loss_backward=loss_backward, gradients=grads, gradients_after_loss=grads_after_loss,
                            gradients_before_first_chunk=grads_before_first, copy_forward=compute_copy,
                            copy_loss_backward=copy_loss_bwd, copy_last_chunk=copy_last, copy_first_chunk=copy_first,
                            accumulate_below=accumulate_below)

    layout = Layout(world_size=world, devices=devices, num_nodes=nodes, tp=tp, pp=pp, dp=dp, fsdp=strategy,
                    shard_group=shard, params_sharded=params_sharded, grads_sharded=grads_sharded,
                    optimizer_sharded=opt_sharded, cpu_offload=cpu_offload, sequence_parallel=sp,
                    precision=precision, optimizer=optimizer, seq_length=seq, checkpointing=checkpointing,
                    loss_chunk_size=chunk, loss_chunk_setting=None if chunk_setting is None else int(chunk_setting))

    notes.append("attention runs through SDPA (flash / memory-efficient kernels): the 5*a*s/h score term of "
                 "Korthikanti et al. is not stored")
    if dist_opt and not fsdp:
        notes.append("model.optim.name=distributed_fused_adam: optimizer state sharded over the data-parallel ranks")
    if cpu_offload:
        notes.append("model.fsdp_cpu_offload=true: weights, gradients and optimizer state counted in CPU memory")
    if fsdp and world == 1:
        notes.append("FSDP on one GPU shards nothing")

    est = MemoryEstimate(
        num_params=counts.total, params_per_gpu=held, vocab_size=V, vocab_assumed=vocab_assumed, layout=layout,
        weights=weights, gradients=grads, optimizer=opt, compute_copy=compute_copy,
        activations_per_sample=terms.activations(1), logits_per_sample=terms.logits(1), terms=terms,
        cuda_context=CUDA_CONTEXT_BYTES,
        micro_batch_size=getattr(m, "micro_batch_size", None), gpu_memory_bytes=gpu_memory_bytes,
        notes=notes, name=name)
    if gpu_memory_bytes:
        _fill_table(est)
        if est.pick is None and _suggest:
            est.suggestions = _suggestions(cfg, vocab_size, gpu_memory_bytes)
    return est


def _fill_table(est: MemoryEstimate) -> None:
    card = est.gpu_memory_bytes
    mbs = 1
    while True:
        total = est.total(mbs)
        est.table.append(MicroBatchRow(mbs, total, total / card))
        if total <= BAND[1] * card:
            est.pick = mbs
        if total > card or mbs >= MAX_TABLE_MBS:
            break
        mbs *= 2
    # the largest micro batch at <= 80%: the total grows with the micro batch, except where the step stops
    # accumulating gradients (micro batch x data parallel = global batch), where it may drop: search each side
    limit = BAND[1] * card
    split = est.terms.accumulate_below
    ranges = [(1, None)] if not split or split <= 1 else [(1, split - 1), (split, None)]
    for first, last in ranges:
        best = _largest_fitting(est.total, limit, first, last)
        if best is not None:
            est.max_micro_batch = best


def _largest_fitting(total, limit: float, first: int, last: Optional[int]) -> Optional[int]:
    """The largest ``m`` in ``[first, last]`` (``last`` None: unbounded) with ``total(m) <= limit``, for a ``total``
    that grows with ``m``; None when ``first`` does not fit."""
    if total(first) > limit:
        return None
    lo, hi = first, first + 1
    while (last is None or hi <= last) and total(hi) <= limit:
        lo, hi = hi, first + 2 * (hi - first)
    if last is not None:
        hi = min(hi, last + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= limit else (lo, mid)
    return lo


def _suggestions(cfg, vocab_size: Optional[int], card: int) -> list[Suggestion]:
    """What to change when micro batch 1 does not fit 80% of ``card``, largest effect first."""
    t, m = cfg.trainer, cfg.model
    devices, nodes = int(_get(t, "devices", 1)), int(_get(t, "num_nodes", 1))
    fsdp = bool(_get(m, "fsdp", False))
    strategy = str(_get(m, "fsdp_sharding_strategy", "full"))
    seq = int(_get(m.data, "seq_length", 0) or m.encoder_seq_length)
    candidates: list[tuple[str, dict]] = []
    if not fsdp:
        if devices * nodes > 1:
            candidates.append(("model.fsdp=true", {"model.fsdp": True}))
        more = max(8, devices) if devices < 8 else devices
        if devices < 8:
            candidates.append((f"trainer.devices={more} model.fsdp=true",
                               {"trainer.devices": more, "model.fsdp": True}))
        else:
            candidates.append((f"trainer.num_nodes={nodes * 2} model.fsdp=true",
                               {"trainer.num_nodes": nodes * 2, "model.fsdp": True}))
    elif strategy != "full":
        candidates.append(("model.fsdp_sharding_strategy=full", {"model.fsdp_sharding_strategy": "full"}))
    else:
        if devices < 8:
            candidates.append(("trainer.devices=8", {"trainer.devices": 8}))
        candidates.append((f"trainer.num_nodes={nodes * 2}", {"trainer.num_nodes": nodes * 2}))
    if _get(m, "activations_checkpoint_granularity", None) != "full" or \
            _get(m, "activations_checkpoint_method", None) == "block":
        changes = {"model.activations_checkpoint_granularity": "full"}
        text = "model.activations_checkpoint_granularity=full"
        if _get(m, "activations_checkpoint_method", None) == "block":
            changes["model.activations_checkpoint_method"] = "uniform"
            text += " model.activations_checkpoint_method=uniform"
        candidates.append((text, changes))
    if seq >= 256:
        half = seq // 2
        text = f"model.encoder_seq_length={half}"
        if m.data.seq_length is not None and m.data.seq_length != m.encoder_seq_length:
            text = f"model.data.seq_length={half}"
        candidates.append((text, {"model.encoder_seq_length": half, "model.data.seq_length": half}))
    if str(_get(t, "precision", "bf16-mixed")) == "32":
        candidates.append(("trainer.precision=bf16-mixed", {"trainer.precision": "bf16-mixed"}))

    out = []
    for text, changes in candidates:
        changed = copy.deepcopy(cfg)
        for key, value in changes.items():
            obj = changed
            *path, leaf = key.split(".")
            for p in path:
                obj = getattr(obj, p)
            setattr(obj, leaf, value)
        if changes.get("model.encoder_seq_length") and changed.model.max_position_embeddings is not None:
            changed.model.max_position_embeddings = max(changed.model.max_position_embeddings, seq // 2)
        est = estimate_memory(changed, vocab_size, card, _suggest=False)
        total = est.total(1)
        out.append(Suggestion(text, total, total / card, total <= BAND[1] * card))
    out.sort(key=lambda s: s.total_bytes)
    return out
