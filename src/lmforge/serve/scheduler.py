"""The scheduler: which sequences feed which tokens in the next step, within the KV cache's blocks.

Each step (:meth:`Scheduler.schedule`) works under two budgets: ``max_num_batched_tokens`` tokens fed in the
step and ``max_batch_size`` running sequences. Running sequences come first: every decoding one feeds one token,
then each prefilling one its next chunk (as many of its remaining tokens as the budget leaves). Then waiting
requests are admitted in arrival order (preempted ones first) while the budgets last and their first chunk's
blocks are free (beyond a small watermark); a prompt longer than the budget is prefilled over several steps,
so long prompts never stall the streams already decoding (chunked prefill).

Blocks come from the cache's :class:`~lmforge.serve.cache.BlockAllocator`. When a running sequence needs a block
and none is free, the youngest running sequence is preempted: its blocks are released and it goes back to the
front of the queue with its output so far, to be prefilled again (recomputed) when blocks free up. Any
``max_batch_size`` therefore runs in bounded memory; the engine requires the cache to hold one sequence of
``max_seq_len`` tokens, so the oldest sequence always makes progress.

Prefix caching: an admitted sequence first looks up its full blocks by their hash (tokens, the key of the
block before, the adapter) and takes the cached ones (their tokens count as computed); the blocks it fills
itself are registered as they fill (:meth:`Scheduler.register_full_blocks`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmforge.serve.cache import BlockAllocator, block_hash
from lmforge.serve.request import Sequence

__all__ = ["Scheduler", "Schedule"]


@dataclass
class Schedule:
    """One step's work: ``decode`` sequences feed one token each; ``chunks`` are ``(seq, lo, hi)``: feed tokens
    ``[lo, hi)``. ``preempted`` went back to the queue in this call."""

    decode: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[Sequence, int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(hi - lo for _, lo, hi in self.chunks)


class Scheduler:
    """Waiting and running sequences, admission, preemption and token budgets (see the module's docstring).

    Args:
        allocator: the KV cache's block allocator.
        block_size: positions per block.
        max_batch_size: most running sequences.
        max_num_batched_tokens: most tokens fed in one step (decode tokens and prefill chunks together).
        watermark: fraction of the blocks an admission leaves free (so running sequences can grow a while
            before anything is preempted).
        admission_batch: while sequences run, waiting requests are admitted only once this many (or every waiting
            one, if fewer wait) have a free row: their prompts then share prefill forwards and the steps between
            admissions are pure decode steps (chained on the device), instead of nearly every step prefilling
            the one request admitted into the row that just freed. 1 admits as soon as a row is free.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch_size: int, max_num_batched_tokens: int,
                 watermark: float = 0.01, admission_batch: int = 1):
        self.allocator = allocator
        self.admission_batch = admission_batch
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = int(watermark * (allocator.num_blocks - 1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the youngest
        self.num_preemptions = 0

    # -- blocks ------------------------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, tokens: int) -> int:
        """Blocks ``seq`` must add to hold ``tokens`` positions."""
        return max(0, -(-tokens // self.block_size) - len(seq.block_table))

    def grow(self, seq: Sequence, tokens: int) -> bool:
        """Give ``seq`` blocks for ``tokens`` positions; False (nothing taken) when there are not enough."""
        need = self.blocks_needed(seq, tokens)
        if need > self.allocator.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self.allocator.allocate())
        return True

    def free(self, seq: Sequence) -> None:
        """Give back ``seq``'s blocks (cached full blocks stay findable until evicted)."""
        self.allocator.release(seq.block_table)
        seq.block_table = []  # a new list: the runner knows a table by its list (ModelRunner._set_tables)
        seq.block_hashes = []
        seq.num_computed = 0

    def preempt(self, seq: Sequence) -> None:
        """Send running ``seq`` back to the front of the queue; its output so far is kept and recomputed later."""
        self.running.remove(seq)
        self.free(seq)
        seq.prefilling = True
        if seq.prompt_lp is not None and not seq.prompt_lp_sent:
            seq.prompt_lp = [None]  # its prompt logprobs are gathered again with the recomputed chunks
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _extra(self, seq: Sequence) -> bytes:
        return seq.adapter.to_bytes(4, "little")

    def _match_prefix(self, seq: Sequence) -> None:
        """Take the cached blocks of ``seq``'s longest cached prefix of full blocks (at least one token is left to
        compute: its logits give the next token)."""
        bs = self.block_size
        full = (seq.length - 1) // bs
        parent = b""
        for i in range(full):
            h = block_hash(parent, seq.tokens(i * bs, (i + 1) * bs), self._extra(seq))
            block = self.allocator.lookup(h)
            if block is None:
                break
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * bs
        if seq.num_computed > len(seq.prefix_ids):
            seq.cached_tokens = max(seq.cached_tokens, min(seq.num_computed - len(seq.prefix_ids), len(seq.prompt_ids)))

    def register_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that are now full of computed, known tokens in the prefix cache."""
        if not self.allocator.prefix_caching:
            return
        bs = self.block_size
        known = min(seq.num_computed, seq.length)
        while (len(seq.block_hashes) + 1) * bs <= known:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = block_hash(parent, seq.tokens(i * bs, (i + 1) * bs), self._extra(seq))
            self.allocator.register(seq.block_table[i], h)
            seq.block_hashes.append(h)

    # -- a step --------------------------------------------------------------------------------------------

    def schedule(self) -> Schedule:
        out = Schedule()
        budget = self.max_num_batched_tokens
        # Decoding sequences first (one token each, oldest first), then the chunks of those still prefilling: a
        # long prompt never holds a running stream back.
        order = [s for s in self.running if not s.prefilling] + [s for s in self.running if s.prefilling]
        for seq in order:
            if seq.finish_reason is not None or (out.preempted and seq in out.preempted):
                continue  # done, or preempted in this loop
            if budget <= 0:
                break
            want = min(seq.length - seq.num_computed, budget) if seq.prefilling else 1
            n = self._make_room(seq, want, out)
            if n == 0:
                continue  # preempted itself
            budget -= n
            if seq.prefilling:
                out.chunks.append((seq, seq.num_computed, seq.num_computed + n))
            else:
                out.decode.append(seq)
        if out.preempted:  # a victim may have been scheduled before a later sequence needed its blocks
            out.decode = [s for s in out.decode if s in self.running]
            out.chunks = [c for c in out.chunks if c[0] in self.running]
            budget = self.max_num_batched_tokens - out.num_tokens
        admit = self.can_admit()
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if self.allocator.prefix_caching and not seq.block_table and seq.prompt_lp is None:
                # (prompt logprobs need every prompt position's hidden state: computed, not taken from the cache)
                self._match_prefix(seq)
            n = min(seq.length - seq.num_computed, budget)
            if self.blocks_needed(seq, seq.num_computed + n) + self.watermark_blocks > self.allocator.num_free \
                    and self.running:
                self.free(seq)  # waits (cached blocks it matched stay cached)
                break
            if not self.grow(seq, seq.num_computed + n):
                self.free(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.prefilling = True
            budget -= n
            out.chunks.append((seq, seq.num_computed, seq.num_computed + n))
        return out

    def can_admit(self) -> bool:
        """Whether waiting requests may be admitted now (blocks aside): a row is free and, while sequences run,
        at least ``admission_batch`` rows are (or as many as requests wait)."""
        free = self.max_batch_size - len(self.running)
        return bool(self.waiting) and free > 0 and (not self.running or free >= min(self.admission_batch,
                                                                                      len(self.waiting)))

    def _make_room(self, seq: Sequence, want: int, out: Schedule) -> int:
        """Blocks for ``want`` more tokens of running ``seq``; a prefill chunk shrinks to the free blocks, and with
        none free the youngest running sequence is preempted (``seq`` itself when it is the youngest: 0)."""
        while True:
            if self.grow(seq, seq.num_computed + want):
                return want
            if seq.prefilling:
                room = (len(seq.block_table) + self.allocator.num_free) * self.block_size - seq.num_computed
                if room > 0:
                    self.grow(seq, seq.num_computed + room)
                    return room
            victim = self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return 0

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) running sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        self.free(seq)

    def reserve_next(self, seqs: list[Sequence]) -> bool:
        """Blocks for one more position of each of ``seqs`` (a decode step launched before the last was read);
        False when that would need a preemption (nothing is preempted here)."""
        bs = self.block_size
        short = [(s, n) for s in seqs if (n := -(-(s.num_computed + 1) // bs) - len(s.block_table)) > 0]
        if sum(n for _, n in short) > self.allocator.num_free:
            return False
        for s, n in short:  # (one pass over the rows: this runs at every chained step)
            s.block_table.extend(self.allocator.allocate() for _ in range(n))
        return True

