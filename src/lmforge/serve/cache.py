"""The serving engine's paged KV cache: fixed-size blocks, per-sequence block tables, a block allocator.

Keys and values of every layer live in ``num_blocks`` blocks of ``block_size`` positions
(:class:`PagedKVCache`); a sequence holds a list of blocks (its block table), position ``p`` sitting in block
``table[p // block_size]`` at offset ``p % block_size``. Memory is taken a block at a time as sequences grow,
not reserved for the longest possible sequence, so many more sequences fit, and the engine admits requests by
free blocks. :class:`BlockAllocator` hands blocks out from a free list and counts references: a full block
whose tokens (and every token before them) are known is registered under a hash of them, so a later request
with the same prefix reuses it (prefix caching); blocks nobody references keep their contents in a
least-recently-used list and are evicted (reused for other tokens) only when the free list is empty.

:class:`PagedKVCache` implements the model's cache protocol (``update(layer_idx, start_pos, k, v, positions)``,
see :class:`lmforge.models.transformer.KVCache`): the engine binds each forward first, a prefill of chunks
(:meth:`PagedKVCache.bind`) or a decode step (:meth:`PagedKVCache.bind_decode`, everything derived on the
device from the positions and the static block-table buffer ``tables``, so the step can be captured as a
CUDA graph). The reference path gathers each row's keys through its table (key ``j`` is position ``j``) and
returns them with a visibility mask, so the model's own attention (sliding windows, ALiBi, soft-capping)
runs unchanged. The serving hook :meth:`PagedKVCache.attention` (called by the model's attention before
anything else, when a cache offers it) runs a decode step's attention with lmforge's Triton paged kernel
(:func:`lmforge.serve.kernels.paged_decode_attention`) where it applies.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict, deque
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.models.transformer import apply_rotary

#: SDPA attends grouped-query heads itself from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)

__all__ = ["BlockAllocator", "PagedKVCache", "NoFreeBlocks", "block_hash", "bucket", "block_bytes",
           "prefill_mask"]


def bucket(n: int, step: int, limit: Optional[int] = None) -> int:
    """``n`` rounded up to a multiple of ``step`` (a power of two when ``step`` is 0), capped at ``limit``."""
    m = 1 << max(0, (n - 1).bit_length()) if step == 0 else step * math.ceil(n / step)
    return min(m, limit) if limit is not None else m


def prefill_mask(positions: torch.Tensor, valid: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The (B, 1, T, S) bool visibility mask of a prefill, on the device of ``positions`` (B, T) and ``valid``
    (B, T): key ``j < num_keys`` is visible to new token ``i`` iff ``j <= position(i)``; a padding query sees key 0
    only (never an empty row, which would give NaN)."""
    keys = torch.arange(num_keys, device=positions.device)
    mask = keys[None, None, :] <= positions[:, :, None]
    mask = mask | ((~valid)[:, :, None] & (keys == 0)[None, None, :])
    return mask[:, None]


def block_bytes(cfg, block_size: int, dtype: torch.dtype, kv_heads: Optional[int] = None) -> int:
    """Bytes one block takes: keys and values of every layer for ``block_size`` positions (of ``kv_heads``
    key/value heads; default the model's, a tensor-parallel rank holds its share)."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_heads = cfg.num_query_groups if kv_heads is None else kv_heads
    return 2 * cfg.num_layers * block_size * kv_heads * cfg.head_dim * elem


def block_hash(parent: bytes, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """The prefix-cache key of a full block: its tokens, the key of the block before it (so equal keys mean equal
    prefixes) and ``extra`` (what else changes the keys and values: the LoRA adapter)."""
    h = hashlib.sha256(parent)
    h.update(array("q", tokens).tobytes())
    h.update(extra)
    return h.digest()


class NoFreeBlocks(RuntimeError):
    """The allocator has no block left (the scheduler preempts a sequence, or waits)."""


class BlockAllocator:
    """Blocks ``1 .. num_blocks-1`` with reference counts, a free list and a prefix cache.

    Block 0 is never handed out: padding rows write into it. ``allocate`` takes a block from the free list, or
    else evicts the least recently used unreferenced cached block. ``release`` drops references; a block that
    reaches 0 goes back to the free list, or, when it is registered in the prefix cache, to the end of the
    LRU list (its contents kept for a later :meth:`lookup`).
    """

    def __init__(self, num_blocks: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"BlockAllocator needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))
        self.lru: OrderedDict[int, bytes] = OrderedDict()  # unreferenced cached blocks, oldest first
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.hits = 0  # blocks found by lookup
        self.queries = 0  # blocks looked up

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free, or cached and unreferenced)."""
        return len(self.free) + len(self.lru)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - 1 - self.num_free

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.lru:
            block, h = self.lru.popitem(last=False)
            del self.by_hash[h], self.hash_of[block]
        else:
            raise NoFreeBlocks("no free KV-cache block")
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of ``blocks`` (a sequence's table: the last blocks become the oldest in the
        LRU list, so a shared prefix outlives the tails that follow it)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.lru[block] = self.hash_of[block]
                else:
                    self.free.append(block)

    def lookup(self, h: bytes) -> Optional[int]:
        """The cached block of key ``h`` with one more reference, or None."""
        if not self.prefix_caching:
            return None
        self.queries += 1
        block = self.by_hash.get(h)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.lru[block]
        self.refs[block] += 1
        self.hits += 1
        return block

    def register(self, block: int, h: bytes) -> None:
        """Make full block ``block`` findable under ``h`` (no-op when another block already holds that key)."""
        if self.prefix_caching and h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def drop_cached(self) -> None:
        """Forget the prefix cache's unreferenced blocks (they become free); blocks in use keep their keys."""
        for block, h in self.lru.items():
            del self.by_hash[h], self.hash_of[block]
            self.free.append(block)
        self.lru.clear()

    def check(self) -> None:
        """Raise if the books do not balance (tests): every block is scratch, free, cached-unreferenced or
        referenced, exactly once."""
        free, lru = set(self.free), set(self.lru)
        referenced = {b for b in range(1, self.num_blocks) if self.refs[b] > 0}
        if len(free) != len(self.free) or free & lru or (free | lru) & referenced or \
                len(free) + len(lru) + len(referenced) != self.num_blocks - 1:
            raise AssertionError(f"allocator books: {len(free)} free, {len(lru)} cached, {len(referenced)} used of "
                                 f"{self.num_blocks - 1}")


class PagedKVCache:
    """Keys and values in blocks: ``k[layer]``, ``v[layer]`` are ``(num_blocks, block_size, nkv, hd)``.

    Args:
        cfg: the model's config (layers, query groups, head size).
        num_blocks: blocks of every layer (block 0 is scratch: padding writes there).
        block_size: positions per block.
        max_seq_len: longest sequence (the width of a block table is ``ceil(max_seq_len / block_size)``).
        max_rows: rows of a decode step (the static block-table buffer ``tables`` the decode step reads).
        prefix_caching: keep full blocks findable by their tokens.
        kv_heads: key/value heads stored per layer (default the model's ``num_query_groups``; a tensor-parallel
            rank stores its own share, :mod:`lmforge.serve.tensor_parallel`).
    """

    def __init__(self, cfg, num_blocks: int, block_size: int, max_seq_len: int, max_rows: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 prefix_caching: bool = True, kv_heads: Optional[int] = None):
        if block_size < 1 or max_seq_len < 1 or max_rows < 1:
            raise ValueError(f"PagedKVCache needs block_size, max_seq_len and max_rows >= 1, got {block_size}, "
                             f"{max_seq_len}, {max_rows}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks = math.ceil(max_seq_len / block_size)  # blocks of the longest sequence
        shape = (num_blocks, block_size, cfg.num_query_groups if kv_heads is None else kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.allocator = BlockAllocator(num_blocks, prefix_caching)
        # The decode step's block tables (row b: the table of the sequence in row b, zeros = scratch for padding)
        self.tables = torch.zeros(max_rows, self.max_blocks, dtype=torch.int32, device=device)
        self.use_kernel = False  # the engine turns the Triton decode kernel on (compiled, GPU)
        self._bound: Optional[tuple] = None
        self._mask_rows: Optional[tuple] = None  # a bound prefill's (positions, valid): its mask is built from them
        self._fresh = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -- prefill (chunks) ----------------------------------------------------------------------------

    def bind(self, tables: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Describe a prefill forward: row ``b`` feeds tokens at ``positions[b]`` (any start: a chunk after
        earlier ones attends to them through its table too).

        Args:
            tables: (B, nb) int64 block table of each row (its first ``nb`` blocks, padded with 0).
            positions: (B, T) int64 position of each new token.
            valid: (B, T) bool, False for padding tokens (written into the scratch block, seen by nobody).
        """
        slots = self.prefill_slots(tables, positions, valid)
        dev = self.k[0].device
        # The (B, 1, T, S) mask is built when a layer first needs it (:meth:`_prefill_mask`): a prefill of fresh
        # prompts attends causally in the hook and needs none, unless a layer falls back to the reference path.
        self._bound = ("prefill", slots.to(dev, non_blocking=True), tables.to(dev, non_blocking=True), None)
        self._mask_rows = (positions, valid)
        # Every row starts at position 0 (fresh prompts): the hook attends the new keys causally (flash attention on
        # a GPU) instead of gathering through the tables with a mask.
        self._fresh = bool((positions[:, 0] == 0).all())

    def prefill_slots(self, tables: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The flat slot (block * block_size + offset) of each new token (B, T); padding tokens get slot 0 (the
        scratch block). Arguments as :meth:`bind`."""
        bs = self.block_size
        blocks = tables.gather(1, (positions // bs).clamp(max=tables.shape[1] - 1))
        return torch.where(valid, blocks * bs + positions % bs, torch.zeros_like(positions))

    def bind_prefill(self, slots: torch.Tensor, tables: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                     fresh: bool) -> None:
        """Describe a prefill forward from tensors already on the device (the compiled prefill binds inside its
        graph): ``slots`` (B, T) from :meth:`prefill_slots`, ``tables`` (B, nb) and ``mask`` (B, 1, T, S) from
        :func:`prefill_mask` for the reference path (None when every layer takes the fresh hook), ``fresh`` when
        every row starts at position 0."""
        self._bound = ("prefill", slots, tables, mask)
        self._mask_rows = None
        self._fresh = fresh

    def unbind(self) -> None:
        """Forget the bound forward (the compiled prefill's last act: its graph then returns no tensor it bound)."""
        self._bound = None
        self._mask_rows = None

    def _prefill_mask(self) -> torch.Tensor:
        """The bound prefill's (B, 1, T, S) visibility mask on the device (:func:`prefill_mask`), built on first
        use."""
        kind, slots, tables, mask = self._bound
        if mask is None:
            positions, valid = self._mask_rows
            mask = prefill_mask(positions, valid, tables.shape[1] * self.block_size)
            mask = mask.to(self.k[0].device, non_blocking=True)
            self._bound = (kind, slots, tables, mask)
        return mask

    def update(self, layer_idx: int, start_pos: int, k: torch.Tensor, v: torch.Tensor,
               positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (B, nkv, T, hd) of layer ``layer_idx`` at the bound positions.

        Returns:
            keys and values (B, nkv, S, hd) gathered through the rows' tables (key ``j`` is position ``j``) and
            the bool visibility mask (B, 1, T, S): key j is visible to new token i iff ``j <= position(i)``.
            ``start_pos`` is ignored: every row has its own positions.
        """
        if self._bound is None:
            raise RuntimeError("PagedKVCache.update called before bind()")
        if self._bound[0] == "decode":
            return self._update_decode(layer_idx, k, v, positions, self._bound[1])
        mask = self._prefill_mask()
        _, slots, tables, _ = self._bound
        self._write(layer_idx, slots, k.transpose(1, 2), v.transpose(1, 2))
        return self._gather(layer_idx, tables) + (mask,)

    def _write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` (B, T, nkv, hd) at flat positions ``slots`` (B, T) (block * block_size + offset)."""
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        index = (slots // self.block_size, slots % self.block_size)  # the buffers themselves, no view (compile)
        kb.index_put_(index, k.to(kb.dtype))
        vb.index_put_(index, v.to(vb.dtype))

    def _gather(self, layer_idx: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, nb = tables.shape
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        k = kb[tables].reshape(B, nb * self.block_size, *kb.shape[2:]).transpose(1, 2)  # (B, nkv, S, hd)
        v = vb[tables].reshape(B, nb * self.block_size, *vb.shape[2:]).transpose(1, 2)
        return k, v

    # -- decode ------------------------------------------------------------------------------------------

    def bind_decode(self, keys: torch.Tensor) -> None:
        """Describe a decode step: row ``b`` feeds one token at ``positions[b]`` (given to :meth:`update`) through
        block table ``tables[b]``; the rows attend over positions ``[0, S)``, ``S = len(keys)`` rounded up to
        whole blocks (a tensor, so a compiled step need not specialise on it). Padding rows have an all-zero
        table: they write into the scratch block and read only it."""
        self._bound = ("decode", keys)

    def _decode_slots(self, positions: torch.Tensor) -> torch.Tensor:
        B, bs = positions.shape[0], self.block_size
        return self.tables[:B].long().gather(1, positions // bs) * bs + positions % bs  # (B, 1)

    def _update_decode(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = k.shape[0]
        self._write(layer_idx, self._decode_slots(positions), k.transpose(1, 2), v.transpose(1, 2))
        nb = min(-(-keys.shape[0] // self.block_size), self.max_blocks)
        k_all, v_all = self._gather(layer_idx, self.tables[:B, :nb].long())
        key_pos = torch.arange(nb * self.block_size, device=positions.device)
        mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, 1, S)
        return k_all, v_all, mask

    def attention(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, positions: Optional[torch.Tensor]
                  ) -> Optional[torch.Tensor]:
        """The serving hook of :meth:`lmforge.models.transformer.Attention.attend`, from the projections ``q``
        (B, T, nh*hd), ``k``, ``v`` (B, T, nkv*hd) before rotary: rotates, stores the new keys and values and
        attends. A decode step runs the Triton paged kernel; a prefill of fresh prompts attends causally over the
        new keys alone. Returns (B, T, nh*hd), or None where neither applies (the model then goes the reference
        way: :meth:`update`)."""
        if self._bound is not None and self._bound[0] == "prefill":
            return self._fresh_prefill(attn, q, k, v, rope)
        if not self.use_kernel or self._bound is None or self._bound[0] != "decode" or q.shape[1] != 1:
            return None
        from lmforge.serve import kernels as K

        kb, vb = self.k[attn.layer_idx], self.v[attn.layer_idx]
        if not K.paged_kernel_applies(attn, q, kb) or (attn.use_rope and rope is None):
            return None
        B, hd = q.shape[0], attn.head_dim
        slots = self._decode_slots(positions)  # (B, 1)
        if (B == 1 and attn.use_rope and rope[0].shape[-1] == hd and k.dtype == kb.dtype):
            # one row: rotary and the cache write in one kernel; it stores at ``slot * stride(1)``, which is block
            # ``slot // block_size``, offset ``slot % block_size`` of the (contiguous) buffers
            qr = K.rope_cache_write(q, k, v, rope[0].reshape(-1), rope[1].reshape(-1), slots.reshape(1), kb, vb)
        else:
            qr = q.view(B, 1, -1, hd)
            kr = k.view(B, 1, -1, hd)
            if attn.use_rope:
                qr, kr = apply_rotary(qr, *rope), apply_rotary(kr, *rope)
            self._write(attn.layer_idx, slots, kr, v.view(B, 1, -1, hd))
        scale = attn.scale if attn.scale is not None else hd ** -0.5
        out = K.paged_decode_attention(qr.reshape(B, -1, hd), kb, vb, self.tables[:B], positions[:, 0] + 1, scale,
                                       attn.window or 0, 0)
        return out.reshape(B, 1, -1)

    def _fresh_prefill(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> Optional[torch.Tensor]:
        """A prefill whose rows all start at position 0: store the keys and values, then causal attention over the
        new ones alone (right padding only follows a row's tokens, so causality keeps it unseen). None for a chunk
        after earlier ones, a window, ALiBi or soft-capped scores (the reference path handles those)."""
        if (not self._fresh or attn.window is not None or attn.alibi_slopes is not None or attn.logit_cap is not None
                or attn.training or (attn.use_rope and rope is None)):
            return None
        B, T, hd = q.shape[0], q.shape[1], attn.head_dim
        qr, kr, vr = q.view(B, T, -1, hd), k.view(B, T, -1, hd), v.view(B, T, -1, hd)
        if attn.use_rope:
            qr, kr = apply_rotary(qr, *rope), apply_rotary(kr, *rope)
        self._write(attn.layer_idx, self._bound[1], kr, vr)
        qr, kr, vr = qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2)  # (B, n, T, hd)
        extra = {}
        if kr.shape[1] != qr.shape[1]:
            if _SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:
                group = qr.shape[1] // kr.shape[1]
                kr, vr = kr.repeat_interleave(group, dim=1), vr.repeat_interleave(group, dim=1)
        # Causal even for one token (it sees itself): no test of T, which a compiled prefill holds as a symbol
        y = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=attn.scale, **extra)
        return y.transpose(1, 2).reshape(B, T, -1)
