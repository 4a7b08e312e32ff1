"""Building a model on the meta device (shapes and dtypes only, no storage) without running its initializers.

Under ``torch.device("meta")`` each module's ``reset_parameters`` still calls ``nn.init.normal_`` / ``uniform_`` /
..., whose meta implementations are torch's Python references: the first one imports ``torch._dynamo`` (about
1.5 s), which every command that plans a model on meta (convert, evaluate, generate, serve, the config estimate)
paid at start for values that do not exist. :func:`meta_device` skips those calls on meta tensors; a meta tensor
has no values, so nothing else changes.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INITIALIZERS = frozenset(getattr(torch.nn.init, name) for name in dir(torch.nn.init)
                          if name.endswith("_") and not name.startswith("_"))
_IN_PLACE_FILLS = frozenset(getattr(torch.Tensor, name) for name in (
    "normal_", "uniform_", "zero_", "fill_", "exponential_", "random_", "bernoulli_", "geometric_",
    "cauchy_", "log_normal_"))


class _SkipInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALIZERS or func in _IN_PLACE_FILLS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """``with meta_device(): model = Transformer(cfg)``: modules built inside have meta parameters and buffers
    (as under ``torch.device("meta")``) and their initializers are not run on them."""
    with torch.device("meta"), _SkipInitOnMeta():
        yield


def to_empty(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model.to_empty(device=device)``: every parameter and buffer as an uninitialised tensor of its shape and dtype
    on ``device``. torch's ``to_empty`` makes them with ``empty_like`` of the meta tensors, whose meta implementation
    is again a Python reference (it imports sympy's shape machinery, ~0.3 s); ``torch.empty`` from the shape does
    not. Same mechanism otherwise (``Module._apply``, what ``to_empty`` itself calls)."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
