"""Triton kernels of the serving engine's decode step: single-row matrix products and paged decode attention.

A decode step of one sequence multiplies one row by every weight matrix: it is bound by reading the
weights once. The library's kernels run well below the memory bandwidth on the small matrices of a 1B
model (a 2048 x 2048 projection, 8 MB, took 6.5 us in a decode step on an H100: 1.3 TB/s of about 3).
:func:`matvec` is a Triton kernel for exactly this product: each program streams a few whole rows of the
matrix (all their loads issued together), multiplies by the row vector in fp32 and sums once.

:func:`swiglu_matvec` is the same product for a gated MLP's down projection, computing ``silu(gate) * up``
as it reads the row (one kernel less per layer); either can add a bias and a residual as it stores, and
:func:`matvec` can RMS-normalise the row first. :func:`rope_cache_write` rotates one token's query and key and
stores its key and value in the cache, in one kernel. :func:`paged_decode_attention` attends one new token per
row over a paged KV cache through each row's block table (flash-decoding: the row's blocks are shared out over
several programs, each computing a partial softmax with grouped-query heads reading their shared keys once, and
a second kernel combines them); it reads each row's length on the device, so one launch shape serves every
length. Each program reads ``TILE`` cache positions per loop iteration (:func:`paged_config`): 128 by default
(several blocks gathered through a vector of table entries, for larger loads in flight), or the op's ``tile``
argument, or :data:`PAGED_TILE`; benchmarks/paged_attention.py times the choices.
:func:`paged_attention_reference` computes the same in plain PyTorch (any device; the tests and the CPU engine's
reference). :func:`decode_attention` is the same over contiguous keys with a boolean mask
(benchmarks/decode_kernels.py). With them, :class:`DecodeBlock` runs a Llama block's row in five kernels.
:func:`sampled_draw` is a sampled decode step's draw (:func:`lmforge.serve.sampler.next_tokens`) in two kernels.

All are custom ops (``torch.ops.lmforge.*``): ``torch.compile`` keeps each as one call inside the compiled
step and CUDA graphs capture them. :func:`use_decode_kernels` installs the products in a model (public
``forward`` methods); the attention is installed through the cache's public hook
(:meth:`lmforge.serve.cache.PagedKVCache.attention`). They take over only where they apply (a CUDA device with
Triton); anything else runs the model's own code.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.transformer import Block, GatedMLP, RMSNorm

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without Triton
    triton = None
try:
    from triton.language.extra import libdevice
except ImportError:
    libdevice = None

__all__ = ["MatVecLinear", "DecodeGatedMLP", "DecodeBlock", "use_decode_kernels", "matvec",
           "swiglu_matvec", "rope_cache_write", "linear", "matvec_config", "decode_attention", "available",
           "paged_decode_attention", "paged_attention_reference", "paged_splits", "paged_config", "PAGED_TILE",
           "PAGED_DEFAULT_TILE", "paged_kernel_applies", "sampled_draw", "DRAW_BLOCK", "DRAW_KERNEL"]


def available(device: torch.device) -> bool:
    """Whether :func:`matvec` can run on ``device`` (a CUDA device and Triton)."""
    return triton is not None and torch.device(device).type == "cuda"


# Triton's interpreter (TRITON_INTERPRET=1, read when Triton is imported) runs the kernels on CPU tensors: the
# tests use it to check the kernels and the decode paths that call them without a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _on_device(t: torch.Tensor) -> bool:
    """Whether the kernels run on ``t``: a CUDA tensor with Triton (or any tensor under the interpreter)."""
    return triton is not None and (t.is_cuda or _INTERPRET)


if triton is not None:
    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, y_ptr, b_ptr, r_ptr, N, K, stride_w, eps, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr = False, NORM: tl.constexpr = False,
                       BIAS: tl.constexpr = False, RESIDUAL: tl.constexpr = False):
        # SWIGLU: x_ptr holds (gate, up), 2K values, and the row multiplied is silu(gate) * up.
        # NORM: the row is RMS-normalised first (its norm weight is already folded into w), so the product is
        # scaled by 1 / rms(x) at the end. BIAS: b_ptr is added. RESIDUAL: r_ptr is added after the result is
        # rounded to the output dtype (the order of ``x + linear(h)`` in the model).
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if SWIGLU:
                up = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
                x = x / (1.0 + tl.exp(-x)) * up
            if NORM:
                squares += x * x
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if NORM:
            y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _rope_cache_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, qo_ptr,
                                 skc_s, skc_h, svc_s, svc_h, n_heads, HD: tl.constexpr):
        # One program per head: programs [0, n_heads) rotate a query head into qo; the others rotate a key
        # head and store it, and its value head, at the token's position of the cache (slot 0).
        h = tl.program_id(0)
        d = tl.arange(0, HD)
        partner = (d + HD // 2) % HD  # rotate_half: [x1, x2] -> [-x2, x1]
        sign = tl.where(d < HD // 2, -1.0, 1.0)
        dt = qo_ptr.dtype.element_ty
        c = tl.load(cos_ptr + d).to(dt).to(tl.float32)  # the tables in the model's dtype, as apply_rotary
        s = tl.load(sin_ptr + d).to(dt).to(tl.float32)
        if h < n_heads:
            x = tl.load(q_ptr + h * HD + d).to(tl.float32)
            xp = tl.load(q_ptr + h * HD + partner).to(tl.float32)
            tl.store(qo_ptr + h * HD + d, (x * c + sign * xp * s).to(dt))
        else:
            kh = h - n_heads
            pos = tl.load(pos_ptr)
            x = tl.load(k_ptr + kh * HD + d).to(tl.float32)
            xp = tl.load(k_ptr + kh * HD + partner).to(tl.float32)
            tl.store(kc_ptr + pos * skc_s + kh * skc_h + d, (x * c + sign * xp * s).to(kc_ptr.dtype.element_ty))
            tl.store(vc_ptr + pos * svc_s + kh * svc_h + d, tl.load(v_ptr + kh * HD + d).to(vc_ptr.dtype.element_ty))

    @triton.jit
    def _attn_blocks_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, S, scale,
                            sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, n_heads, n_blocks,
                            GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr):
        b, kvh, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD)
        g_ok = g < GROUP
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g_ok[:, None], other=0.0)
        s_idx = blk * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s_idx < S
        seen = tl.load(mask_ptr + b * sm_b + s_idx, mask=s_ok, other=0) != 0
        k = tl.load(k_ptr + b * sk_b + kvh * sk_h + s_idx[:, None] * sk_s + d[None, :], mask=s_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale  # (G_PAD, BLOCK_S) fp32
        scores = tl.where(seen[None, :], scores, float("-inf"))
        m = tl.max(scores, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a block with nothing visible adds nothing
        p = tl.exp(scores - m_safe[:, None])
        v = tl.load(v_ptr + b * sv_b + kvh * sv_h + s_idx[:, None] * sv_s + d[None, :], mask=s_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v)  # (G_PAD, HD) fp32
        out = (b * n_heads + heads) * n_blocks + blk  # partials laid out (B, heads, blocks)
        tl.store(m_ptr + out, m, mask=g_ok)
        tl.store(l_ptr + out, tl.sum(p, axis=1), mask=g_ok)
        tl.store(acc_ptr + out[:, None] * HD + d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, so_b, so_h, n_heads, n_blocks,
                             HD: tl.constexpr, BLOCKS_PAD: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        j = tl.arange(0, BLOCKS_PAD)
        d = tl.arange(0, HD)
        j_ok = j < n_blocks
        base = (b * n_heads + h) * n_blocks
        m = tl.load(m_ptr + base + j, mask=j_ok, other=float("-inf"))
        l = tl.load(l_ptr + base + j, mask=j_ok, other=0.0)
        acc = tl.load(acc_ptr + (base + j)[:, None] * HD + d[None, :], mask=j_ok[:, None], other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))  # the row sees key 0 at least, so some block has a finite max
        w = tl.where(j_ok & (m != float("-inf")), w, 0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))


    @triton.jit
    def _paged_attn_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, scale, window,
                           sq_b, sq_h, skc_n, skc_s, skc_h, svc_n, svc_s, svc_h, sbt_b, n_heads, n_splits,
                           GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr,
                           WINDOW: tl.constexpr, IEEE: tl.constexpr, TILE: tl.constexpr):
        # One program per (row, key/value head, split): the row's visible positions, in tiles of TILE (a
        # multiple of the block size BS, aligned to TILE), are shared out evenly over the splits; each split
        # walks its tiles with an online softmax and stores its partial (max, sum, weighted values) for the
        # combine kernel. The row's length is read on the device, so one launch shape serves every length (a
        # CUDA graph per batch size, not per span).
        # TILE == BS: one block per iteration, its table entry one scalar load and its keys one (BS, HD) tile.
        # TILE > BS: TILE // BS blocks per iteration, gathered per position (position p of the row is at offset
        # p % BS of block table[p // BS]): fewer, larger loads in flight; positions outside [lo, length) are
        # masked (neither read nor attended).
        b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD)
        s = tl.arange(0, TILE)
        g_ok = g < GROUP
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g_ok[:, None], other=0.0)
        length = tl.load(lens_ptr + b).to(tl.int32)
        lo = 0
        if WINDOW:
            lo = tl.maximum(length - window, 0)
        first = lo // TILE
        n_tiles = tl.cdiv(length, TILE)
        per = tl.cdiv(n_tiles - first, n_splits)
        start = first + split * per
        end = tl.minimum(start + per, n_tiles)
        m = tl.full((G_PAD,), -1e30, dtype=tl.float32)  # finite: an empty split adds exp(-1e30 - max) = 0
        lsum = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, HD), dtype=tl.float32)
        for i in range(start, end):
            key = i * TILE + s
            visible = (key < length) & (key >= lo)
            if TILE == BS:
                blk = tl.load(bt_ptr + b * sbt_b + i).to(tl.int64)
                k = tl.load(kc_ptr + blk * skc_n + s[:, None] * skc_s + kvh * skc_h + d[None, :])
            else:
                blk = tl.load(bt_ptr + b * sbt_b + key // BS, mask=visible, other=0).to(tl.int64)
                k_off = blk[:, None] * skc_n + (key % BS)[:, None] * skc_s + kvh * skc_h + d[None, :]
                k = tl.load(kc_ptr + k_off, mask=visible[:, None], other=0.0)
            if IEEE:  # fp32 caches: full-precision products (tl.dot would round fp32 inputs to tf32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale  # (G_PAD, TILE) fp32
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # every tile walked holds a visible key: finite
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            if TILE == BS:
                v = tl.load(vc_ptr + blk * svc_n + s[:, None] * svc_s + kvh * svc_h + d[None, :])
            else:
                v_off = blk[:, None] * svc_n + (key % BS)[:, None] * svc_s + kvh * svc_h + d[None, :]
                v = tl.load(vc_ptr + v_off, mask=visible[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            lsum = lsum * alpha + tl.sum(p, axis=1)
            m = m_new
        out = (b * n_heads + heads) * n_splits + split  # partials laid out (B, heads, splits)
        tl.store(m_ptr + out, m, mask=g_ok)
        tl.store(l_ptr + out, lsum, mask=g_ok)
        tl.store(acc_ptr + out[:, None] * HD + d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def _draw_logit(x, t, limit, FILTER: tl.constexpr, TEMPER: tl.constexpr):
        # One logit of the sampled draw as :func:`lmforge.serve.sampler.filter_rows` leaves it when no top-k,
        # top-p or min-p applies (FILTER: divided by the row's temperature t when TEMPER, correctly rounded as
        # torch divides, then clamped to +-limit), or as given (already filtered). Returns it and whether it makes
        # the row's distribution not finite: NaN, or +inf as given (softmax gives NaN); clamped, +inf is limit.
        bad = x != x
        if FILTER:
            if TEMPER:
                x = tl.math.div_rn(x, t)
            x = tl.minimum(tl.maximum(x, -limit), limit)
        else:
            bad = bad | (x == float("inf"))
        return x, bad

    @triton.jit
    def _draw_exp(x, PRECISE: tl.constexpr):
        # exp in fp32: libdevice's correctly rounded-ish expf on a GPU (tl.exp is ex2.approx there: its argument's
        # rounding by log2(e) errs ~|x| * 6e-8, more than float32 rounding of the probabilities); the interpreter
        # has no libdevice and computes tl.exp in full precision.
        if PRECISE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _draw_row_logits(x_ptr, t_ptr, row, cols, ok, stride_x, limit, FILTER: tl.constexpr, TEMPER: tl.constexpr):
        # Row ``row``'s logits at ``cols`` (-inf past the vocabulary), in float32, as _draw_logit leaves them (the
        # row's temperature read when TEMPER), and which of them make the row not finite: both draw kernels read so.
        t = 1.0
        if TEMPER:
            t = tl.load(t_ptr + row)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
        return _draw_logit(x, t, limit, FILTER, TEMPER)

    @triton.jit
    def _draw_chunks_kernel(x_ptr, t_ptr, m_ptr, s_ptr, V, stride_x, n_chunks, limit, FILTER: tl.constexpr,
                            TEMPER: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (row, chunk of BLOCK tokens): the chunk's largest logit m and its mass relative to it,
        # sum(exp(x - m)) added in float64 (0 when every token is -inf; -1 when a logit makes the row not finite).
        row, c = tl.program_id(0), tl.program_id(1)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        x, bad = _draw_row_logits(x_ptr, t_ptr, row, cols, ok, stride_x, limit, FILTER, TEMPER)
        x = tl.where(ok & ~bad, x, float("-inf"))
        m = tl.max(x, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(_draw_exp(x - m_safe, PRECISE).to(tl.float64), axis=0)
        s = tl.where(tl.max(bad.to(tl.int32), axis=0) > 0, -1.0, s)
        tl.store(m_ptr + row * n_chunks + c, m)
        tl.store(s_ptr + row * n_chunks + c, s)

    @triton.jit
    def _draw_pick_kernel(x_ptr, t_ptr, m_ptr, s_ptr, u_ptr, out_ptr, V, stride_x, n_chunks, limit,
                          FILTER: tl.constexpr, TEMPER: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr,
                          CHUNKS: tl.constexpr):
        # One program per row: the chunks' masses relative to the row's largest logit M, their running sum (the
        # row's distribution function at chunk ends, unnormalised: the total last), the chunk j where the target
        # u * total falls (before[j] < target <= before[j + 1]), then a scan of that chunk's exp(x - M) finds the
        # first token whose running mass reaches target - before[j]. -1 for a row that is not finite (a flagged
        # chunk, or every logit -inf). The probabilities are float32 (exp of the float32 logits less M, as
        # softmax computes them); their sums, scans and the target are float64 (a few hundred values a row), so
        # the only float32 roundings left are each probability's own.
        row = tl.program_id(0)
        j = tl.arange(0, CHUNKS)
        j_ok = j < n_chunks
        m = tl.load(m_ptr + row * n_chunks + j, mask=j_ok, other=float("-inf"))
        s = tl.load(s_ptr + row * n_chunks + j, mask=j_ok, other=0.0)
        top = tl.max(m, axis=0)
        failed = (tl.max((s < 0).to(tl.int32), axis=0) > 0) | (top == float("-inf"))
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.where(j_ok & (s > 0), s * _draw_exp(m - top, PRECISE).to(tl.float64), 0.0)
        cum = tl.cumsum(w, axis=0)  # cum[j] = before[j + 1]
        total = tl.max(cum, axis=0)  # the last (the masses are >= 0): the target below never passes it
        target = tl.load(u_ptr + row).to(tl.float64) * total  # in (0, total): u in (0, 1), total >= 1 (exp(0))
        chunk = tl.minimum(tl.sum((cum < target).to(tl.int32), axis=0), n_chunks - 1)
        before = tl.max(tl.where(j < chunk, cum, 0.0), axis=0)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        x, bad = _draw_row_logits(x_ptr, t_ptr, row, cols, ok, stride_x, limit, FILTER, TEMPER)
        p = tl.where(ok & ~bad, _draw_exp(x - top, PRECISE), 0.0)
        inner = tl.cumsum(p.to(tl.float64), axis=0)
        # the target within the chunk: > 0 (before < target, exactly) and at most the chunk's scanned mass (its
        # mass from the first pass may round above it), so the token found has a positive probability
        rest = tl.minimum(target - before, tl.max(inner, axis=0))
        pick = tl.minimum(chunk * BLOCK + tl.sum((inner < rest).to(tl.int32), axis=0), V - 1)
        tl.store(out_ptr + row, tl.where(failed, -1, pick).to(tl.int64))


MATVEC_ROWS = 2  # rows per program of the plain and RMS-prologue products (generate_throughput.py --matvec-rows)


def matvec_config(N: int, K: int, norm: bool = False, swiglu: bool = False) -> dict:
    """Block sizes, warps and pipeline stages for an (N, K) matrix (``norm``/``swiglu``: the kernel's prologue).

    From sweeps on an H100 (benchmarks/decode_kernels.py --sweep, weights cycled beyond the L2 cache): two
    rows per program was fastest for every plain product of the 1B and 7B shapes; small matrices prefer
    1024-wide loads over 4 warps, large ones 2048 over 8 warps with loads pipelined over 3 stages. With the
    RMS prologue the 1B's q/k/v and gate/up products prefer the small matrices' blocks (gate/up 23.5 us against
    25.6 us with the large blocks); the SwiGLU prologue reads two vectors as long as the rows, so eight rows per
    program share them (1B down: 13.8 us against 16.7 us with two rows).
    """
    bk = max(16, 1 << (K - 1).bit_length())
    if swiglu:
        return {"BLOCK_N": 8, "BLOCK_K": min(2048, bk), "num_warps": 8, "num_stages": 3}
    small = (N <= 4096 or norm) and K <= 2048
    return {"BLOCK_N": MATVEC_ROWS, "BLOCK_K": min(1024 if small else 2048, bk),
            "num_warps": 4 if small else 8, "num_stages": 3 if N * K >= (32 << 20) and not small else 1}


@torch.library.custom_op("lmforge::matvec", mutates_args=())
def _matvec_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               rms_eps: Optional[float], swiglu: bool) -> torch.Tensor:
    N, K = weight.shape
    if x.numel() != (2 * K if swiglu else K) or weight.stride(1) != 1:
        raise ValueError(f"matvec takes one row of {'2 x ' if swiglu else ''}{K} values and a row-major matrix; "
                         f"got {tuple(x.shape)}, strides {weight.stride()}")
    y = torch.empty(N, device=x.device, dtype=x.dtype)
    cfg = matvec_config(N, K, norm=rms_eps is not None, swiglu=swiglu)
    _matvec_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        x.contiguous(), weight, y, bias if bias is not None else y, residual.contiguous() if residual is not None else y,
        N, K, weight.stride(0), rms_eps or 0.0, SWIGLU=swiglu, NORM=rms_eps is not None, BIAS=bias is not None,
        RESIDUAL=residual is not None, **cfg)
    return y.view(*x.shape[:-1], N)


@_matvec_op.register_fake
def _(x, weight, bias, residual, rms_eps, swiglu):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None, rms_eps: Optional[float] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)`` for ``x`` (..., K) holding one row and ``weight`` (N, K) (Triton).

    With ``rms_eps`` the row is RMS-normalised first (``x / sqrt(mean(x^2) + rms_eps)``), the norm's weight
    being already folded into ``weight`` (:func:`use_decode_kernels` folds it); ``residual`` (N values) is
    added after the product is rounded to ``x``'s dtype, as ``residual + linear(x)`` rounds.
    """
    return _matvec_op(x, weight, bias, residual, rms_eps, False)


def swiglu_matvec(gate_up: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T (+ bias) (+ residual)`` for one row ``gate_up`` (..., 2K) = (gate, up) and
    ``weight`` (N, K): a gated MLP's down projection with its activation read on the fly (no separate kernel,
    nothing written)."""
    return _matvec_op(gate_up, weight, bias, residual, None, True)


@torch.library.custom_op("lmforge::rope_cache_write", mutates_args=("k_cache", "v_cache"))
def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     position: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One token's rotary embedding and cache write in one kernel: ``q`` (1, 1, nh*hd) and ``k`` (1, 1, nkv*hd)
    are rotated by ``cos``/``sin`` (hd values each, fp32 tables), the rotated key and ``v`` are stored in slot 0
    of ``k_cache``/``v_cache`` (``(slots, max_seq_len, nkv, hd)``) at ``position`` (one int64 on the device).
    Returns the rotated queries (1, 1, nh, hd)."""
    nkv, hd = k_cache.shape[-2:]
    nh = q.shape[-1] // hd
    if (q.numel() != nh * hd or k.numel() != nkv * hd or v.numel() != nkv * hd or cos.numel() != hd
            or sin.numel() != hd or position.numel() != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
        raise ValueError(f"rope_cache_write takes one token: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}, cos {tuple(cos.shape)} for a cache of {nkv} heads of {hd}")
    out = torch.empty(1, 1, nh, hd, device=q.device, dtype=q.dtype)
    _rope_cache_write_kernel[(nh + nkv,)](q, k, v, cos.contiguous(), sin.contiguous(), position, k_cache, v_cache, out,
                                          k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
                                          nh, HD=hd, num_warps=1)
    return out


@rope_cache_write.register_fake
def _(q, k, v, cos, sin, position, k_cache, v_cache):
    hd = k_cache.shape[-1]
    return q.new_empty(1, 1, q.shape[-1] // hd, hd)


@torch.library.custom_op("lmforge::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     block_s: int = 64) -> torch.Tensor:
    """Attention of one new token per row: ``q`` (B, nh, 1, hd), ``k``/``v`` (B, nkv, S, hd) (any strides with
    a contiguous last dimension), ``mask`` (B or 1, 1, 1, S) bool, True where a key is visible (every row must
    see at least one key). Returns (B, nh, 1, hd) in ``q``'s dtype, as ``F.scaled_dot_product_attention``."""
    B, nh, _, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    group = nh // nkv
    n_blocks = triton.cdiv(S, block_s)
    m = torch.empty(B * nh * n_blocks, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(B * nh * n_blocks, hd, device=q.device, dtype=torch.float32)
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    _attn_blocks_kernel[(B, nkv, n_blocks)](
        q, k, v, mask_u8, m, lsum, acc, S, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask_u8.stride(0) if mask.shape[0] > 1 else 0, nh, n_blocks,
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK_S=block_s, num_warps=4)
    out = torch.empty(B, nh, 1, hd, device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(B, nh)](m, lsum, acc, out, out.stride(0), out.stride(1), nh, n_blocks, HD=hd,
                                  BLOCKS_PAD=max(2, triton.next_power_of_2(n_blocks)), num_warps=4)
    return out


@decode_attention.register_fake
def _(q, k, v, mask, scale, block_s=64):
    return torch.empty_like(q, memory_format=torch.contiguous_format)



def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                              window: Optional[int] = None) -> torch.Tensor:
    """Decode attention over a paged cache in plain PyTorch (any device): the reference of
    :func:`paged_decode_attention`, with the same arguments and result.

    Each row's keys are gathered through its block table (key ``j`` is position ``j``), the keys at or past
    its length are hidden (and, with ``window``, those ``window`` or more positions back), then
    ``F.scaled_dot_product_attention`` with grouped-query heads, in fp32 (float64 inputs stay float64: an exact
    reference, for fp32 kernels on a GPU, where fp32 attention may use tf32 products).
    """
    B, nh, hd = q.shape
    nb = block_tables.shape[1]
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    k = k_cache[block_tables.long()].reshape(B, nb * bs, nkv, hd).transpose(1, 2)  # (B, nkv, S, hd)
    v = v_cache[block_tables.long()].reshape(B, nb * bs, nkv, hd).transpose(1, 2)
    keys = torch.arange(nb * bs, device=q.device)
    lengths = lengths.to(q.device).long()[:, None]
    visible = keys[None, :] < lengths  # (B, S)
    if window is not None:
        visible &= keys[None, :] >= lengths - window
    if nkv != nh:
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    dt = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(q[:, :, None].to(dt), k.to(dt), v.to(dt),
                                         attn_mask=visible[:, None, None, :], scale=scale)
    return out[:, :, 0].to(q.dtype)  # (B, nh, hd)


PAGED_TILE = 0  # positions per iteration of the paged kernel; 0: paged_config's choice (benchmarks set it)
PAGED_DEFAULT_TILE = 128  # measured on an H100 (docs/benchmarks.md, session 10): 128 beat one block per iteration


PAGED_STAGE_BYTES = 128 << 10  # the larger tiles' keys and values in flight (all stages): within an H100's shared memory


def paged_config(block_size: int, head_dim: int, tile: int = 0, itemsize: int = 2) -> dict:
    """Positions per loop iteration (``TILE``), warps and pipeline stages of :func:`paged_decode_attention`'s kernel.

    ``tile`` (else :data:`PAGED_TILE`, else :data:`PAGED_DEFAULT_TILE` positions, at least one block) picks how
    many cache positions each iteration reads: a power of two, a multiple of ``block_size``. One block per
    iteration (16 positions: a dependent load of the table entry, then 16 x ``head_dim`` keys and values) leaves
    few bytes in flight; several blocks per iteration gather a (TILE, head_dim) tile of keys and values through a
    vector of table entries. benchmarks/paged_attention.py times 16, 64 and 128 against each other: on an H100,
    bf16, 128 rows of 64-1500 positions, 128 took 165 us against one block's 195 us (Llama-3.1-8B heads) and
    91 us against 138 us (Llama-3.2-1B heads), and the served 1B and 8B shapes gained 14% and 4% output tokens/s
    (docs/benchmarks.md). Warps and stages as that sweep found good: 4 warps and 3 stages up to a
    (64, 128) tile, 8 warps and 2 stages above it, fewer stages where the keys and values of all stages
    (``2 * TILE * head_dim * itemsize`` bytes each) would pass :data:`PAGED_STAGE_BYTES` (fp32 caches), and a
    smaller tile where even one stage would (the same results: only the speed depends on the tile).
    """
    tile = tile or PAGED_TILE or max(block_size, PAGED_DEFAULT_TILE)
    if tile < block_size or tile & (tile - 1):
        raise ValueError(f"the paged kernel's tile must be a power of two of at least the block size "
                         f"({block_size}); got {tile}")
    while tile > block_size and 2 * tile * head_dim * itemsize > PAGED_STAGE_BYTES:
        tile //= 2  # not even one stage would fit (fp32, large heads): the largest tile that does
    if tile == block_size:
        return {"TILE": tile, "num_warps": 4, "num_stages": 3}  # Triton's default stages: the launch as before
    big = tile * head_dim > 64 * 128
    stage_bytes = 2 * tile * head_dim * itemsize
    stages = max(1, min(2 if big else 3, PAGED_STAGE_BYTES // stage_bytes))
    return {"TILE": tile, "num_warps": 8 if big else 4, "num_stages": stages}


def paged_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device, tile_blocks: int = 1) -> int:
    """How many splits :func:`paged_decode_attention` shares a row's tiles over (``tile_blocks`` cache blocks a
    tile): enough programs to fill the device twice over (a long context at batch 1 still runs on every
    multiprocessor), at most one per tile of the table and 64."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 8
    tiles = -(-max_blocks // max(1, tile_blocks))
    return max(1, min(tiles, 64, -(-2 * sms // max(1, batch * kv_heads))))


@torch.library.custom_op("lmforge::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           lengths: torch.Tensor, scale: float, window: int, splits: int,
                           tile: int = 0) -> torch.Tensor:
    """Attention of one new token per row over a paged cache (Triton, flash-decoding).

    Args:
        q: (B, nh, hd) queries (contiguous last dimension).
        k_cache, v_cache: (num_blocks, block_size, nkv, hd): block ``n`` holds ``block_size`` positions.
        block_tables: (B, max_blocks) int32/int64: row ``b``'s position ``p`` is in block
            ``block_tables[b, p // block_size]`` at offset ``p % block_size``.
        lengths: (B,) keys of each row (positions ``[0, length)``, the new token's included), at least 1.
        scale: the softmax scale.
        window: keys less than ``window`` positions back from the newest are visible (0: all).
        splits: programs per (row, head) the tiles are shared over (0: :func:`paged_splits` chooses).
        tile: cache positions each program reads per loop iteration, a power of two and a multiple of the block
            size (0: :data:`PAGED_TILE`, else :data:`PAGED_DEFAULT_TILE`; see :func:`paged_config`). Every tile gives the same
            result up to the order of the sums; only the speed differs.

    Returns:
        (B, nh, hd) in ``q``'s dtype; :func:`paged_attention_reference` computes the same.
    """
    return _paged_attention(q, k_cache, v_cache, block_tables, lengths, scale, window, splits,
                            paged_config(k_cache.shape[1], q.shape[-1], tile, k_cache.element_size()))


def _paged_attention(q, k_cache, v_cache, block_tables, lengths, scale: float, window: int, splits: int,
                     cfg: dict) -> torch.Tensor:
    """:func:`paged_decode_attention` with the kernel's launch ``cfg`` given (``TILE``, ``num_warps``,
    ``num_stages``): benchmarks/paged_attention.py sweeps it."""
    B, nh, hd = q.shape
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    group = nh // nkv
    if splits <= 0:
        splits = paged_splits(B, nkv, block_tables.shape[1], q.device, cfg["TILE"] // bs)
    m = torch.empty(B * nh * splits, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(B * nh * splits, hd, device=q.device, dtype=torch.float32)
    _paged_attn_kernel[(B, nkv, splits)](
        q, k_cache, v_cache, block_tables, lengths, m, lsum, acc, scale, window, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), nh, splits, GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)),
        HD=hd, BS=bs, WINDOW=window > 0, IEEE=q.dtype == torch.float32, **cfg)
    out = torch.empty(B, nh, hd, device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(B, nh)](m, lsum, acc, out, out.stride(0), out.stride(1), nh, splits, HD=hd,
                                  BLOCKS_PAD=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, lengths, scale, window, splits, tile=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_kernel_applies(attn, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_decode_attention` can serve ``attn``'s (an :class:`Attention`) decode step: Triton
    on this device, no ALiBi bias or soft-capped scores, power-of-two head size and block size (16 at least),
    the cache in the queries' dtype, not training."""
    bs = k_cache.shape[1]
    return (_on_device(q) and attn.alibi_slopes is None and attn.logit_cap is None and not attn.training
            and _pow2(attn.head_dim) and _pow2(bs) and k_cache.dtype == q.dtype)


#: Tokens per program of :func:`sampled_draw`'s first kernel (a power of two; fewer for a smaller vocabulary): the
#: second kernel scans one chunk of this many tokens per row. 126 chunks at Llama 3's 128,256.
DRAW_BLOCK = 1024

#: Whether the engine's on-device sampled steps draw with :func:`sampled_draw` where the decode kernels run (a CUDA
#: device with Triton, ``decode_kernels`` on); False: the tensor operations of
#: :func:`lmforge.serve.sampler._invert`. Read when a :class:`~lmforge.serve.runner.ModelRunner` is built
#: (benchmarks/grpo_rollout.py --draw-kernel / --no-draw-kernel set it, for before/after timings). On since session
#: 12's H100 call (docs/benchmarks.md): compiled, 1 draw in 1,280 unlike a float64 draw (the tensor draw: 3), 0.135 ms
#: a draw of 64 rows x 128,256 instead of 0.222, rollouts 30,082 tok/s instead of 28,304.
DRAW_KERNEL = True


@torch.library.custom_op("lmforge::sampled_draw", mutates_args=())
def sampled_draw(logits: torch.Tensor, u: torch.Tensor, temperature: Optional[torch.Tensor], apply_filter: bool,
                 limit: float) -> torch.Tensor:
    """Each row's sampled token in two Triton kernels: the first token whose cumulative probability (softmax of
    the row) reaches the row's uniform, as :func:`lmforge.serve.sampler.invert` draws it (the same distribution;
    the sums are added in another order and in float64, so a uniform within float32 rounding of a boundary
    between two tokens may pick the other one).

    Args:
        logits: (n, V) logits (any float dtype, read as fp32; contiguous last dimension).
        u: (n,) fp32 uniforms in (0, 1) (:func:`lmforge.serve.sampler.uniforms`).
        temperature: (n,) or (n, 1) fp32 temperatures, or None (every row's 1); only with ``apply_filter``.
        apply_filter: apply :func:`~lmforge.serve.sampler.filter_rows`' temperature and clamp to +-``limit`` to the
            logits as they are read (the whole filter when no row has top-k, top-p or min-p); False: the logits
            are already filtered (filtered tokens -inf).
        limit: the clamp's bound (``LOGIT_LIMIT / MIN_TEMPERATURE``).

    Returns:
        (n,) int64 picks; -1 for a row whose distribution is not finite (a NaN logit; as given, a +inf one or
        every one -inf), as :func:`lmforge.serve.sampler.next_tokens` marks it.

    Kernel 1, a program per (row, chunk of :data:`DRAW_BLOCK` tokens): the chunk's largest logit and its mass
    relative to it. Kernel 2, a program per row: the chunk masses rescaled to the row's largest logit and scanned,
    the chunk where ``u * total`` falls, a scan of that chunk alone. The logits are read once and one chunk of
    them again: at 64 x 128,256 a draw of ~30 tensor operations (softmax, sums, scans, searches, gathers) becomes
    two launches. The probabilities are float32 as softmax's; their sums and scans are float64, so the picks are
    nearer a float64 draw's than the tensor operations' float32 sums are (``benchmarks/sampled_draw.py
    --agreement``).
    """
    n, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    block = min(DRAW_BLOCK, max(16, triton.next_power_of_2(V)))
    chunks = triton.cdiv(V, block)
    m = torch.empty(n, chunks, device=logits.device, dtype=torch.float32)
    s = torch.empty(n, chunks, device=logits.device, dtype=torch.float64)
    out = torch.empty(n, device=logits.device, dtype=torch.int64)
    t = temperature.reshape(n) if temperature is not None else u  # not read without a temperature
    flags = dict(FILTER=apply_filter, TEMPER=temperature is not None, PRECISE=libdevice is not None and not _INTERPRET,
                 BLOCK=block)
    _draw_chunks_kernel[(n, chunks)](logits, t, m, s, V, logits.stride(0), chunks, limit, **flags, num_warps=4)
    _draw_pick_kernel[(n,)](logits, t, m, s, u, out, V, logits.stride(0), chunks, limit, **flags,
                            CHUNKS=max(16, triton.next_power_of_2(chunks)), num_warps=4)
    return out


@sampled_draw.register_fake
def _(logits, u, temperature, apply_filter, limit):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, or :func:`matvec` (plus the bias) for a single row on a CUDA device with Triton."""
    if x.numel() == x.shape[-1] and _on_device(x) and weight.stride(-1) == 1:
        return matvec(x, weight, bias)
    return F.linear(x, weight, bias)


class MatVecLinear(nn.Linear):
    """An ``nn.Linear`` whose single-row products use :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


class DecodeGatedMLP(GatedMLP):
    """A :class:`~lmforge.models.transformer.GatedMLP` (SwiGLU, gate and up fused) whose single-row steps
    apply the activation inside the down projection's kernel (:func:`swiglu_matvec`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.gate_up_proj is not None and self.act is F.silu and x.numel() == x.shape[-1] and _on_device(x)
                and self.down_proj.weight.stride(-1) == 1):
            return swiglu_matvec(self.gate_up_proj(x), self.down_proj.weight, self.down_proj.bias)
        return super().forward(x)


class DecodeBlock(Block):
    """A pre-norm :class:`~lmforge.models.transformer.Block` whose single-row steps run in five kernels: RMSNorm
    + q/k/v product, rotary + cache write, attention, output product + residual, RMSNorm + gate/up product,
    SwiGLU + down product + residual. The norms' weights are folded into the products that follow them
    (:func:`use_decode_kernels` does it and sets ``folded``), so a norm is only its ``1 / rms`` scale, applied
    inside the product's kernel; every other step is the block's own code, which computes the same function."""

    folded = False

    def forward(self, x, rope=None, kv_cache=None, start_pos=0, positions=None, attn_mask=None):
        if not self.folded or x.shape[0] * x.shape[1] != 1 or self.training or not _on_device(x):
            return super().forward(x, rope, kv_cache, start_pos, positions, attn_mask)
        attn, mlp = self.self_attn, self.mlp
        qkv = matvec(x, attn.qkv_proj.weight, attn.qkv_proj.bias, rms_eps=self.input_layernorm.eps)
        q, k, v = qkv.split(attn.qkv_sizes, dim=-1)
        h = attn.attend(q, k, v, rope, kv_cache, start_pos, positions, attn_mask)  # (1, 1, nh*hd)
        x = matvec(h, attn.o_proj.weight, attn.o_proj.bias, residual=x)
        gate_up = matvec(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, rms_eps=self.post_attention_layernorm.eps)
        return swiglu_matvec(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, residual=x)


def _foldable(block: nn.Module) -> bool:
    """A Llama-style block whose norms can move into fused, plain, row-major projections (read before
    :func:`use_decode_kernels` swaps the block's children, which it visits after the block)."""
    attn, mlp = block.self_attn, block.mlp
    linears = [getattr(attn, "qkv_proj", None), attn.o_proj, getattr(mlp, "gate_up_proj", None),
               getattr(mlp, "down_proj", None)]
    return (type(block.input_layernorm) is RMSNorm and type(block.post_attention_layernorm) is RMSNorm
            and type(block.attn_output_norm) is nn.Identity and type(block.mlp_output_norm) is nn.Identity
            and isinstance(mlp, GatedMLP) and mlp.act is F.silu
            and all(type(m) is nn.Linear and m.weight.stride(-1) == 1 for m in linears))


@torch.no_grad()
def _fold_norm(norm: RMSNorm, linear: nn.Linear) -> None:
    """Move ``norm``'s scale into the columns of ``linear``: ``linear(norm(x))`` is unchanged (up to rounding) and
    ``norm`` keeps only ``x / rms(x)``."""
    scale = norm.weight.float() + norm.offset  # (C,)
    linear.weight.copy_((linear.weight.float() * scale).to(linear.weight.dtype))
    norm.weight.fill_(1.0 - norm.offset)


def use_decode_kernels(model: nn.Module) -> int:
    """Install the kernels in ``model``, in place: every plain ``nn.Linear`` becomes a :class:`MatVecLinear`,
    every gated MLP a :class:`DecodeGatedMLP` and every
    :class:`Block` a :class:`DecodeBlock` (same parameters, same state dict). A Llama-style block whose q/k/v
    and gate/up projections were fused (:func:`~lmforge.models.transformer.fuse_projections`) also has its
    RMSNorm weights folded into them (the function is the same, the stored values change: like fusing, for a
    model that serves, not one that is saved). Returns how many modules changed. Without Triton nothing changes.
    """
    n = 0
    if triton is None:
        return n
    for module in list(model.modules()):
        if type(module) is Block:
            foldable = _foldable(module)
            module.__class__ = DecodeBlock
            if foldable:
                _fold_norm(module.input_layernorm, module.self_attn.qkv_proj)
                _fold_norm(module.post_attention_layernorm, module.mlp.gate_up_proj)
                module.folded = True
            n += 1
        elif type(module) is nn.Linear:
            module.__class__ = MatVecLinear
            n += 1
        elif type(module) is GatedMLP:
            module.__class__ = DecodeGatedMLP
            n += 1
    return n
