"""Many LoRA adapters served at once: every batch row picks its own adapter (or none), as in S-LoRA.

:class:`MultiLoRA` reads LoRA adapter folders (lmforge's or Hugging Face PEFT's), stacks their weights
and wraps the union of their target linears in :class:`MultiLoRALinear` in place. Each wrapper keeps the
frozen base ``weight``/``bias`` Parameters under their own names (``...q_proj.weight``) and adds

    y = x W^T + b + (x A[ids]^T) B[ids]^T        A (N+1, r_max, in), B (N+1, out, r_max)

where ``ids`` (B,) is the adapter slot of each batch row. Slot 0 is all zeros ("no adapter"); adapter
``i`` is slot ``i + 1``, its ``lora_alpha / r`` folded into its B, its rank zero-padded to ``r_max``, and
zeros where it does not target a module. The stacks are non-persistent buffers, so ``state_dict()`` of
the wrapped model is the base model's.

Decode steps are captured in CUDA graphs, so nothing here reads tensor values or depends on them for a
shape: ``ids`` is ONE preallocated (max_rows,) int64 buffer shared by every wrapper; the caller fills it
in place (:meth:`MultiLoRA.set_rows`) before a forward, and each forward reads ``ids[:B]``.

    lora = MultiLoRA(model, {"sql": "adapters/sql", "chat": "adapters/chat"}, max_rows=64)
    lora.set_rows([lora.index("sql"), 0, lora.index("chat")])  # before each forward of 3 rows
    logits = model(input_ids)                                   # (3, T, V)

Cost: two gathers and two small batched matmuls per wrapped linear, whatever the rows use (H100, bf16,
1.1B Llama shape, all-linear r=16: a captured decode step takes about 2x the plain model's). A fused
gather-matmul kernel (punica's BGMV/SGMV) is the way to make it cheaper.

Build it after the model is on its device and in its dtype (the buffers take the base weights' own).
DoRA, IA3, bottleneck and p-tuning adapters are refused (serve those one per server with ``--adapter``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.peft.core import linear_names, set_module

__all__ = ["MultiLoRA", "MultiLoRALinear", "RowAdapters"]

PathLike = Union[str, Path]


class RowAdapters:
    """The state every :class:`MultiLoRALinear` of one model shares: ``ids`` (max_rows,) int64, the adapter
    slot of each batch row (0 = no adapter), filled in place by the caller."""

    def __init__(self, max_rows: int, device: Optional[torch.device] = None):
        if int(max_rows) < 1:
            raise ConfigError(f"MultiLoRA max_rows={max_rows} must be at least 1 (the largest batch served)")
        self.ids = torch.zeros(int(max_rows), dtype=torch.long, device=device)


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one LoRA update per batch row, chosen by ``rows.ids``.

    Args:
        base: the linear layer; its ``weight`` (out, in) and ``bias`` Parameters are reused as they are.
        rows: the shared row -> adapter slot state.
        num_adapters: N; the stacks hold N + 1 slots (slot 0 is no adapter).
        r_max: the largest rank of any adapter.

    Buffers (base dtype and device, zeros until :meth:`set_slot`): ``lora_A`` (N+1, r_max, in),
    ``lora_B`` (N+1, out, r_max) with the scaling folded in.
    """

    def __init__(self, base: nn.Linear, rows: RowAdapters, num_adapters: int, r_max: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rows = rows
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.register_buffer("lora_A", torch.zeros(num_adapters + 1, r_max, self.in_features, **kw), persistent=False)
        self.register_buffer("lora_B", torch.zeros(num_adapters + 1, self.out_features, r_max, **kw), persistent=False)

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Store one adapter: ``a`` (r, in), ``b`` (out, r); ``b * scaling`` is stored (computed in fp32)."""
        r = a.shape[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r] = a.to(self.lora_A.dtype)
        self.lora_B[slot, :, :r] = (b.float() * scaling).to(self.lora_B.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, in) -> (B, T, out); row ``b`` uses adapter slot ``rows.ids[b]``.

        ``x`` of shape (N, in) reads as N rows of one token each.
        """
        if x.dim() == 2:
            return self.forward(x[:, None])[:, 0]
        result = nn.functional.linear(x, self.weight, self.bias)  # (B, T, out)
        ids = self.rows.ids[: x.shape[0]]  # (B,)
        a = self.lora_A.index_select(0, ids)  # (B, r, in)
        b = self.lora_B.index_select(0, ids)  # (B, out, r)
        xa = x.to(a.dtype) if not torch.is_autocast_enabled() else x
        update = torch.bmm(torch.bmm(xa, a.transpose(1, 2)), b.transpose(1, 2))  # (B, T, r) -> (B, T, out)
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        n, r = self.lora_A.shape[0] - 1, self.lora_A.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={n}, r_max={r}"


def _read_lora(name: str, folder: Path) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(scaling, {module name: (A (r, in), B (out, r))})`` of one LoRA folder, or a ConfigError."""
    from lmforge.peft import read_adapter  # the package imports this module

    method, cfg, weights = read_adapter(folder)
    where = f"adapter {name!r} ({folder})"
    merged_hint = f"serve it merged, one adapter per server (`--adapter {folder}`)"
    if method != "lora":
        kind, hint = {
            "ia3": ("an IA3 adapter", merged_hint),
            "adapter": ("a bottleneck adapter", f"serve it alone, one adapter per server (`--adapter {folder}`)"),
        }.get(method, ("a p-tuning adapter", f"serve it alone, one adapter per server (`--adapter {folder}`)"))
        raise ConfigError(f"{where} is {kind}; per-request adapters must be LoRA, so {hint}")
    if cfg.use_dora:
        raise ConfigError(f"{where} is DoRA (use_dora), which per-request serving cannot run; {merged_hint}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            raise ConfigError(f"{where} has weight {key!r}, which is no LoRA A/B matrix of a linear layer "
                              f"(embedding LoRA, DoRA, modules_to_save?); {merged_hint} if it is supported")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ConfigError(f"{where}: {module} needs lora_A (r, in) and lora_B (out, r) "
                              f"weights, found {({k: tuple(v.shape) for k, v in ab.items()})}")
        out[module] = (ab["A"], ab["B"])
    return float(cfg.lora_alpha) / int(cfg.r), out


class MultiLoRA:
    """LoRA adapters selectable per batch row, applied to ``model`` in place.

    Args:
        model: an lmforge :class:`~lmforge.models.transformer.Transformer`, already on its device and dtype.
        adapters: adapter name -> LoRA folder (lmforge's or Hugging Face PEFT's), a dict or (name, folder)
            pairs; adapter ``i`` (in this order) is slot ``i + 1``.
        max_rows: the largest batch a forward will have (size of the shared ``ids`` buffer).

    Attributes:
        names: adapter names in slot order (slot ``i + 1`` is ``names[i]``).
        ids: the (max_rows,) int64 row -> slot buffer every wrapper reads (fill it with :meth:`set_rows`).
        modules: names of the wrapped linear layers.

    Raises:
        ConfigError: an empty or repeated name; an adapter that is not plain LoRA (DoRA, IA3, bottleneck,
            p-tuning); a target module missing from the model or of another shape.
        CheckpointError: a folder that is not an adapter folder.
    """

    def __init__(self, model: nn.Module, adapters: Union[Mapping[str, PathLike], Sequence[tuple[str, PathLike]]],
                 max_rows: int):
        pairs = list(adapters.items()) if isinstance(adapters, Mapping) else [tuple(p) for p in adapters]
        self.names = [str(n) for n, _ in pairs]
        for n, folder in pairs:
            if not str(n).strip():
                raise ConfigError(f"MultiLoRA: the adapter at {folder} has an empty name; name it (name=folder)")
        repeated = sorted({n for n in self.names if self.names.count(n) > 1})
        if repeated:
            raise ConfigError(f"MultiLoRA: adapter name(s) {repeated} given more than once; give each adapter "
                              f"its own name")
        wanted = set(linear_names(model))
        linears = {n: m for n, m in model.named_modules() if n in wanted}
        loaded = []
        for name, folder in pairs:
            scaling, mods = _read_lora(name, Path(folder))
            for module, (a, b) in mods.items():
                lin = linears.get(module)
                if lin is None:
                    raise ConfigError(f"adapter {name!r} ({folder}) targets {module!r}, which is no linear layer "
                                      f"inside the blocks of this model (e.g. {next(iter(linears), '-')}); was it "
                                      f"trained on another model? lm_head/embedding LoRA can only be served merged")
                if not isinstance(lin, nn.Linear):
                    raise ConfigError(f"MultiLoRA: {module} is already wrapped ({type(lin).__name__}); apply "
                                      f"MultiLoRA once, to a model without other adapters")
                if (a.shape[1], b.shape[0]) != (lin.in_features, lin.out_features):
                    raise ConfigError(f"adapter {name!r} ({folder}): {module} has in/out features "
                                      f"{(a.shape[1], b.shape[0])} but the model's layer has "
                                      f"{(lin.in_features, lin.out_features)}; was it trained on another model?")
            loaded.append((scaling, mods))
        self.modules = [n for n in linears if any(n in mods for _, mods in loaded)]  # model order
        r_max = max([a.shape[0] for _, mods in loaded for a, _ in mods.values()], default=1)
        device = next(model.parameters()).device
        self.rows = RowAdapters(max_rows, device)
        for module in self.modules:
            wrapped = MultiLoRALinear(linears[module], self.rows, len(self.names), r_max)
            for slot, (scaling, mods) in enumerate(loaded, start=1):
                if module in mods:
                    wrapped.set_slot(slot, *mods[module], scaling)
            set_module(model, module, wrapped)

    @property
    def ids(self) -> torch.Tensor:
        """The shared (max_rows,) int64 row -> adapter slot buffer."""
        return self.rows.ids

    @property
    def max_rows(self) -> int:
        return self.rows.ids.shape[0]

    def index(self, name: Optional[str]) -> int:
        """The slot of adapter ``name`` (0 for None: the base model).

        Raises:
            ConfigError: ``name`` is not loaded (the message lists the loaded names).
        """
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise ConfigError(f"adapter {name!r} is not loaded; loaded adapters: "
                              f"{', '.join(self.names) or '(none)'} (or none for the base model)") from None

    def set_rows(self, slot_ids: Union[Sequence[int], torch.Tensor]) -> None:
        """Copy the slot of each batch row into :attr:`ids` in place; rows beyond ``len(slot_ids)`` get 0.

        Call it outside a captured graph, before the forward. Slot values are checked when given on the CPU.

        Raises:
            ValueError: more rows than ``max_rows``, or (CPU input) a slot outside ``0..len(names)``.
        """
        src = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1)
        n = src.shape[0]
        if n > self.max_rows:
            raise ValueError(f"MultiLoRA.set_rows got {n} rows but max_rows={self.max_rows}")
        if src.device.type == "cpu" and n and not (0 <= int(src.min()) and int(src.max()) <= len(self.names)):
            raise ValueError(f"MultiLoRA.set_rows: slots must be in 0..{len(self.names)}, got {src.tolist()}")
        full = torch.zeros(self.max_rows, dtype=torch.long, device=src.device)
        full[:n] = src
        self.rows.ids.copy_(full)

    def __repr__(self) -> str:
        return f"MultiLoRA(names={self.names}, modules={len(self.modules)}, max_rows={self.max_rows})"
