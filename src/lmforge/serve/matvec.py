"""Single-row matrix products for the compiled batch-1 decode step.

A decode step of one sequence multiplies one row by every weight matrix: it is bound by reading the
weights once. The library's kernels run well below the memory bandwidth on the small matrices of a 1B
model (a 2048 x 2048 projection, 8 MB, took 6.5 us in a decode step on an H100: 1.3 TB/s of about 3).
:func:`matvec` is a Triton kernel for exactly this product: each program streams a few whole rows of the
matrix (all their loads issued together), multiplies by the row vector in fp32 and sums once.

It is a custom op (``torch.ops.lmforge.matvec``): ``torch.compile`` keeps it as one call inside the
compiled step and CUDA graphs capture it. :func:`linear` uses it for a single row on a CUDA device with
Triton; anything else (batches of rows, the CPU) is ``F.linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without Triton
    triton = None

__all__ = ["MatVecLinear", "use_matvec", "matvec", "linear", "matvec_config", "available"]


def available(device: torch.device) -> bool:
    """Whether :func:`matvec` can run on ``device`` (a CUDA device and Triton)."""
    return triton is not None and torch.device(device).type == "cuda"


if triton is not None:
    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def matvec_config(N: int, K: int) -> dict:
    """Block sizes and warps for an (N, K) matrix (measured on an H100: benchmarks/decode_kernels.py)."""
    block_k = min(2048, triton.next_power_of_2(K))
    block_n = 8 if K <= 4096 else 4
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 1}


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


def use_matvec(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` in ``model`` a :class:`MatVecLinear`, in place (same parameters, same
    state dict); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
            n += 1
    return n
