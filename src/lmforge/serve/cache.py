"""The serving engine's KV cache: one preallocated slot per sequence, each sequence at its own position.

:class:`SlotKVCache` implements the model's cache protocol (``update(layer_idx, start_pos, k, v, positions)``,
see :class:`lmforge.models.transformer.KVCache`); the engine (:mod:`lmforge.serve.engine`) binds each forward
first: a prefill (:meth:`SlotKVCache.bind`) or a decode step (:meth:`SlotKVCache.bind_decode`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["SlotKVCache", "bucket"]



def bucket(n: int, step: int, limit: Optional[int] = None) -> int:
    """``n`` rounded up to a multiple of ``step`` (a power of two when ``step`` is 0), capped at ``limit``."""
    m = 1 << max(0, (n - 1).bit_length()) if step == 0 else step * math.ceil(n / step)
    return min(m, limit) if limit is not None else m


class SlotKVCache:
    """A preallocated key/value cache with one slot per sequence, each sequence at its own position.

    ``k[layer]`` and ``v[layer]`` are ``(num_slots + 1, max_seq_len, nkv, hd)`` buffers (grouped-query
    aware: ``nkv = num_query_groups`` heads are stored). Slot ``s`` holds one sequence, its token at
    position ``p`` at index ``p``; the extra last slot is scratch that padding tokens write into.

    Before each forward the engine describes it: :meth:`bind` (a prefill: any slots, padding tokens) or
    :meth:`bind_decode` (a decode step: row ``b`` is slot ``b``, one token per row, everything derived
    from the positions on the device, so the step can be captured as a CUDA graph); the model then
    calls :meth:`update` once per layer (the model's cache protocol).

    Sliding-window hook: the returned mask says which keys a query may see by filling and causality
    only, and key index ``j`` is position ``j`` of its row, so a model with an attention window ANDs
    ``positions[:, None, :, None] - j < window`` into it.
    """

    def __init__(self, cfg, num_slots: int, max_seq_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"SlotKVCache needs num_slots >= 1 and max_seq_len >= 1, got {num_slots}, {max_seq_len}")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.scratch = num_slots  # index of the padding slot
        shape = (num_slots + 1, max_seq_len, cfg.num_query_groups, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self._bound: Optional[tuple] = None

    def bind(self, first_slot: int, lengths: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
             span: int) -> None:
        """Describe the next forward.

        Args:
            first_slot: batch row ``b`` is slot ``first_slot + b``.
            lengths: (B,) int64 filled length of each row after the new tokens are written.
            positions: (B, T) int64 position of each new token.
            valid: (B, T) bool, False for padding tokens (written into the scratch slot, seen by nobody).
            span: keys attended, ``S >= max(lengths)``; the rows' views are ``[0, S)``.
        """
        B, T = positions.shape
        device = positions.device  # computed where the inputs are (the CPU, in the engine), then moved once
        slots = torch.arange(first_slot, first_slot + B, device=device)[:, None].expand(B, T)
        write_slots = torch.where(valid, slots, torch.full_like(slots, self.scratch))
        write_pos = torch.where(valid, positions, torch.zeros_like(positions))
        keys = torch.arange(span, device=device)
        mask = (keys[None, None, :] < lengths[:, None, None]) & (keys[None, None, :] <= positions[:, :, None])
        # A padding query sees key 0 only (never an empty row, which would give NaN).
        mask = mask | ((~valid)[:, :, None] & (keys == 0)[None, None, :])
        dev = self.k[0].device
        self._bound = ("prefill", first_slot, first_slot + B, span, write_slots.to(dev, non_blocking=True),
                       write_pos.to(dev, non_blocking=True), mask[:, None].to(dev, non_blocking=True))  # (B, 1, T, S)

    def update(self, layer_idx: int, start_pos: int, k: torch.Tensor, v: torch.Tensor,
               positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (B, nkv, T, hd) of layer ``layer_idx`` at the bound slots and positions.

        Returns:
            keys and values (B, nkv, S, hd) of the bound rows over ``[0, S)``, and the bool visibility
            mask (B, 1, T, S): key j is visible to new token i iff j is filled for that row and
            ``j <= position(i)``. ``start_pos`` is ignored: every row has its own positions.
        """
        if self._bound is None:
            raise RuntimeError("SlotKVCache.update called before bind()")
        if self._bound[0] == "decode":
            return self._update_decode(layer_idx, k, v, positions, self._bound[1])
        _, lo, hi, span, write_slots, write_pos, mask = self._bound
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb.index_put_((write_slots, write_pos), k.transpose(1, 2).to(kb.dtype))  # (B, T, nkv, hd) rows
        vb.index_put_((write_slots, write_pos), v.transpose(1, 2).to(vb.dtype))
        return kb[lo:hi, :span].transpose(1, 2), vb[lo:hi, :span].transpose(1, 2), mask

    def bind_decode(self, keys: torch.Tensor) -> None:
        """Describe a decode step: batch row ``b`` is slot ``b`` and feeds one token at ``positions[b]``
        (given to :meth:`update`); the rows attend over keys ``[0, S)`` with ``keys = arange(S)`` on the
        cache's device (its length is the span; a tensor, so a compiled step need not specialise on it).

        Rows past the running sequences are padding: they write into their own free slot at position 0
        and see that key only, which no running sequence reads.
        """
        self._bound = ("decode", keys)

    def _update_decode(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = k.shape[0]
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        rows = torch.arange(B, device=kb.device)[:, None]  # (B, 1): row b is slot b
        kb.index_put_((rows, positions), k.transpose(1, 2).to(kb.dtype))  # (B, 1, nkv, hd)
        vb.index_put_((rows, positions), v.transpose(1, 2).to(vb.dtype))
        return self.decode_view(layer_idx, positions)

    def decode_buffers(self, layer_idx: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """During a decode step, the whole key and value buffers of ``layer_idx`` (``(num_slots + 1,
        max_seq_len, nkv, hd)``; row ``b`` of the step writes slot ``b`` at its position), for a kernel that
        writes them itself and then reads :meth:`decode_view`; None outside a decode step."""
        if self._bound is None or self._bound[0] != "decode":
            return None
        return self.k[layer_idx], self.v[layer_idx]

    def decode_view(self, layer_idx: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode step's keys and values (B, nkv, S, hd) of ``layer_idx`` for the rows of ``positions`` (B, 1),
        and their visibility mask (B, 1, 1, S): key j is visible iff ``j <= position``."""
        B, keys = positions.shape[0], self._bound[1]
        S = keys.shape[0]
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, 1, S)
        return self.k[layer_idx][:B, :S].transpose(1, 2), self.v[layer_idx][:B, :S].transpose(1, 2), mask

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (every layer)."""
        for buf in self.k + self.v:
            buf[dst, :length] = buf[src, :length]
