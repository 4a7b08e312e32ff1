"""Single-row matrix products for the compiled batch-1 decode step.

A decode step of one sequence multiplies one row by every weight matrix: it is bound by reading the
weights, and the library's matrix-vector kernels run well below the memory bandwidth on the small matrices
of a 1B model (a 2048 x 2048 projection, 8 MB, took 6.4 us on an H100: 1.3 TB/s of about 3). Written as a
multiply and a sum over the input dimension, ``torch.compile`` turns the product into one reduction kernel
that streams the matrix once, and fuses the operations around it (the norm before, the activation before
the down projection, the residual add after) into the same kernels.

Only traced code takes this path (:func:`torch.compiler.is_compiling`): in eager mode the multiply would
materialise the whole product. Everything else (batches of several rows, eager runs) stays ``F.linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MatVecLinear", "use_matvec", "matvec", "linear"]


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` as a multiply and an fp32 sum: ``x`` (..., K) with one row, ``weight`` (N, K)."""
    y = (x.float().unsqueeze(-2) * weight.float()).sum(-1)  # (..., N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, or :func:`matvec` when compiling a product of a single row."""
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        return matvec(x, weight, bias)
    return F.linear(x, weight, bias)


class MatVecLinear(nn.Linear):
    """An ``nn.Linear`` that computes a single row with :func:`linear` (see the module's text)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_matvec(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` in ``model`` a :class:`MatVecLinear`, in place (same parameters, same
    state dict); returns how many. Linears wrapped by adapters are changed too (their base layer)."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
            n += 1
    return n
