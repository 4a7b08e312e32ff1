"""Float8 block projections that can join: :class:`Float8Projection`, torchao's ``Float8Linear`` plus one float8
matmul for sibling projections of one input (q/k/v, gate/up).

Imported only when float8 training is on (it needs torchao; :func:`lmforge.train.fp8.apply_fp8` swaps the modules).
Each projection stays its own module with its own weight Parameter under its own name, so checkpoints, the HF name
map, FSDP2 and the optimizer see the model exactly as in bf16. What changes is the step's work: where separate
float8 linears scale and cast the same input once per projection (three times for q/k/v, twice for gate/up), cast
each weight and each output gradient apart and run one GEMM each, :meth:`Float8Projection.joint_forward` runs
torchao's float8 matmul once over the siblings' weights side by side: one amax and cast of the input, one of the
joint weight, one of the joint output gradient, one GEMM for the output, one for the input's gradient and one for
all the weights' gradients.

Scales: with rowwise scaling (``rowwise``) the forward values equal the separate projections' (the input's scales
are per row, the weight's per output row); with tensorwise scaling the joint weight and the joint output gradient
get one scale each (the largest of the siblings'), as a model with one fused q/k/v weight would.
"""

from __future__ import annotations

import torch
from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args


class _Context:
    """Stands in for an autograd context while torchao's float8 matmul runs inside :class:`_JointFloat8Matmul`:
    it holds what that matmul saves (its input and the joint weight) and its configs, so the joint backward can
    hand them back. The joint weight itself is not kept; backward concatenates the weights again."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


@torch._dynamo.allow_in_graph  # as torchao's own matmul: compiled graphs call it whole, float8 tensors inside
class _JointFloat8Matmul(torch.autograd.Function):
    """``x @ cat(W_1..W_n).T`` as one torchao float8 matmul (its forward and backward, unchanged), with each
    ``W_i`` its own Parameter. Saves ``x`` and the separate weights (Parameters or FSDP's unsharded ones, no copy),
    not their concatenation, which backward rebuilds; the weights' gradient is split back by rows."""

    @staticmethod
    def forward(ctx, x, linear_mm_config, config, n, *weights):
        inner = _Context()
        y = matmul_with_hp_or_float8_args.forward(inner, x, torch.cat(weights).t(), linear_mm_config, config)
        ctx.linear_mm_config, ctx.config = linear_mm_config, config
        ctx.sizes = [w.shape[0] for w in weights]
        ctx.save_for_backward(x, *weights)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *weights = ctx.saved_tensors
        inner = _Context()
        inner.save_for_backward(x, torch.cat(weights).t())
        inner.linear_mm_config, inner.config = ctx.linear_mm_config, ctx.config
        grad_x, grad_w_t = matmul_with_hp_or_float8_args.backward(inner, grad_y)[:2]
        return (grad_x, None, None, None, *grad_w_t.t().split(ctx.sizes))


class Float8Projection(Float8Linear):
    """torchao's float8 linear (same forward, same Parameters) that :func:`lmforge.models.transformer.
    set_joint_projections` can join with its siblings (:meth:`can_join`, :meth:`joint_forward`)."""

    @staticmethod
    def can_join(parts: list) -> bool:
        """Siblings share one float8 matmul when they scale alike (one config), all or none have a bias, and their
        weights are plain tensors: not float8 all-gather weights under FSDP (each carries its own float8 scale)."""
        first = parts[0]
        return all(p.config == first.config and p.in_features == first.in_features for p in parts) \
            and len({p.bias is None for p in parts}) == 1 and not first.config.enable_fsdp_float8_all_gather \
            and not any(type(p.weight).__name__ == "DTensor" for p in parts)

    @staticmethod
    def joint_forward(x: torch.Tensor, parts: list) -> list[torch.Tensor]:
        """The outputs of sibling float8 projections ``parts`` of one input ``x``, from one float8 matmul. The input
        goes to the autocast dtype first, as in ``Float8Linear.forward``."""
        first = parts[0]
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _JointFloat8Matmul.apply(x, first.linear_mm_config, first.config, len(parts), *[p.weight for p in parts])
        if first.bias is not None:
            y = y + torch.cat([p.bias for p in parts]).to(y.dtype)
        return list(y.split([p.out_features for p in parts], dim=-1))
