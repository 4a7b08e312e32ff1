"""Triton kernels for the compiled batch-1 decode step: single-row matrix products and decode attention.

A decode step of one sequence multiplies one row by every weight matrix: it is bound by reading the
weights once. The library's kernels run well below the memory bandwidth on the small matrices of a 1B
model (a 2048 x 2048 projection, 8 MB, took 6.5 us in a decode step on an H100: 1.3 TB/s of about 3).
:func:`matvec` is a Triton kernel for exactly this product: each program streams a few whole rows of the
matrix (all their loads issued together), multiplies by the row vector in fp32 and sums once.

:func:`swiglu_matvec` is the same product for a gated MLP's down projection, computing ``silu(gate) * up``
as it reads the row (one kernel less per layer). :func:`decode_attention` attends one new token per row over the cache with a boolean mask (grouped-query
heads read their shared keys once): the keys are split into blocks, one program per (row, key/value head,
block) computes a partial softmax, and a second kernel combines the blocks (flash-decoding). The library's
attention took 6.9 us per layer for a 1B model's single token; see docs/benchmarks.md for this one.

Both are custom ops (``torch.ops.lmforge.*``): ``torch.compile`` keeps each as one call inside the compiled
step and CUDA graphs capture them. :func:`use_decode_kernels` installs them in a model; they take over only
where they apply (one row on a CUDA device with Triton); anything else runs the model's own code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.transformer import Attention, GatedMLP

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without Triton
    triton = None

__all__ = ["MatVecLinear", "DecodeAttention", "DecodeGatedMLP", "use_decode_kernels", "matvec", "swiglu_matvec",
           "linear", "matvec_config", "decode_attention", "available"]


def available(device: torch.device) -> bool:
    """Whether :func:`matvec` can run on ``device`` (a CUDA device and Triton)."""
    return triton is not None and torch.device(device).type == "cuda"


if triton is not None:
    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SWIGLU: tl.constexpr = False):
        # SWIGLU: x_ptr holds (gate, up), 2K values, and the row multiplied is silu(gate) * up
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if SWIGLU:
                up = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
                x = x / (1.0 + tl.exp(-x)) * up
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)

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


MATVEC_ROWS = 2  # rows of the matrix per program (benchmarks/generate_throughput.py --matvec-rows tries others)


def matvec_config(N: int, K: int) -> dict:
    """Block sizes, warps and pipeline stages for an (N, K) matrix.

    From a sweep on an H100 (benchmarks/decode_kernels.py --sweep, weights cycled beyond the L2 cache): two
    rows per program was fastest for every matrix of the 1B and 7B shapes; small matrices prefer 1024-wide
    loads over 4 warps, large ones 2048 over 8 warps with loads pipelined over 3 stages.
    """
    small = N <= 4096 and K <= 2048
    return {"BLOCK_N": MATVEC_ROWS, "BLOCK_K": min(1024 if small else 2048, max(16, 1 << (K - 1).bit_length())),
            "num_warps": 4 if small else 8, "num_stages": 3 if N * K >= (32 << 20) else 1}


@torch.library.custom_op("lmforge::matvec", mutates_args=())
def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` (..., K) holding one row and ``weight`` (N, K) (CUDA, Triton)."""
    N, K = weight.shape
    if x.numel() != K or weight.stride(1) != 1:
        raise ValueError(f"matvec takes one row of {K} values and a row-major matrix; got {tuple(x.shape)}, "
                         f"strides {weight.stride()}")
    y = torch.empty(N, device=x.device, dtype=x.dtype)
    cfg = matvec_config(N, K)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _matvec_kernel[grid](x.contiguous(), weight, y, N, K, weight.stride(0), **cfg)
    return y.view(*x.shape[:-1], N)


@matvec.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lmforge::swiglu_matvec", mutates_args=())
def swiglu_matvec(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T`` for one row ``gate_up`` (..., 2K) = (gate, up) and ``weight`` (N, K): a
    gated MLP's down projection with its activation read on the fly (no separate kernel, nothing written)."""
    N, K = weight.shape
    if gate_up.numel() != 2 * K or weight.stride(1) != 1:
        raise ValueError(f"swiglu_matvec takes one row of 2 x {K} values and a row-major matrix; got "
                         f"{tuple(gate_up.shape)}, strides {weight.stride()}")
    y = torch.empty(N, device=gate_up.device, dtype=gate_up.dtype)
    cfg = matvec_config(N, K)
    _matvec_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](gate_up.contiguous(), weight, y, N, K, weight.stride(0),
                                                        SWIGLU=True, **cfg)
    return y.view(*gate_up.shape[:-1], N)


@swiglu_matvec.register_fake
def _(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty(*gate_up.shape[:-1], weight.shape[0])


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, or :func:`matvec` (plus the bias) for a single row on a CUDA device with Triton."""
    if x.numel() == x.shape[-1] and x.is_cuda and triton is not None and weight.stride(-1) == 1:
        y = matvec(x, weight)
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


class MatVecLinear(nn.Linear):
    """An ``nn.Linear`` whose single-row products use :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class DecodeAttention(Attention):
    """An :class:`~lmforge.models.transformer.Attention` whose single-token steps over a boolean mask (the
    serving cache's decode) use :func:`decode_attention`; everything else is the model's own attention."""

    def _sdpa(self, q, k, v, mask, is_causal, dropout) -> torch.Tensor:
        hd = q.shape[-1]
        if (q.shape[2] == 1 and q.is_cuda and mask is not None and mask.dtype == torch.bool and not dropout
                and hd >= 16 and hd == triton.next_power_of_2(hd) and q.shape[0] == 1):
            scale = self.scale if self.scale is not None else hd ** -0.5
            return decode_attention(q, k, v, mask, scale)
        return super()._sdpa(q, k, v, mask, is_causal, dropout)


class DecodeGatedMLP(GatedMLP):
    """A :class:`~lmforge.models.transformer.GatedMLP` (SwiGLU, gate and up fused) whose single-row steps
    apply the activation inside the down projection's kernel (:func:`swiglu_matvec`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.gate_up_proj is not None and self.act is F.silu and self.down_proj.bias is None and x.is_cuda
                and x.numel() == x.shape[-1] and self.down_proj.weight.stride(-1) == 1):
            return swiglu_matvec(self.gate_up_proj(x), self.down_proj.weight)
        return super().forward(x)


def use_decode_kernels(model: nn.Module) -> int:
    """Install the kernels in ``model``, in place: every plain ``nn.Linear`` becomes a :class:`MatVecLinear`,
    every :class:`Attention` a :class:`DecodeAttention` and every gated MLP a :class:`DecodeGatedMLP` (same
    parameters, same state dict). Returns how many modules changed. Without Triton nothing changes."""
    n = 0
    if triton is None:
        return n
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
            n += 1
        elif type(module) is Attention:
            module.__class__ = DecodeAttention
            n += 1
        elif type(module) is GatedMLP:
            module.__class__ = DecodeGatedMLP
            n += 1
    return n
