"""The plan of a conversion: family rules expanded over a model's tensors, and the tensor transforms.

Shared by every converter (:mod:`lmforge.convert.hf`, :mod:`lmforge.convert.nemo`); imports nothing of
theirs, so the converters form a chain (plan <- nemo <- hf) with no import circle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from lmforge.errors import ConfigError
from lmforge.models.config import ModelConfig
from lmforge.models.families import Family

__all__ = ["Step", "Source", "expected_shapes", "plan", "to_hf_tensors", "to_our_tensors", "hf_shapes"]


@dataclass
class Step:
    """One rule applied to one layer (and expert): concrete names on both sides."""

    kind: str
    ours: list[str]
    hf: list[str]


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """lmforge tensor name -> shape, from a model built on the meta device (no memory)."""
    from lmforge.models.meta import meta_device
    from lmforge.models.transformer import Transformer

    with meta_device():
        model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(f"^{pattern}$")


def plan(cfg: ModelConfig, fam: Family) -> list[Step]:
    """Every rule of ``fam`` expanded over the tensors a ``cfg`` model has, in the model's order."""
    shapes = expected_shapes(cfg)
    rules = [(rule, _template_regex(rule.ours[0])) for rule in fam.rules(cfg)]
    steps, covered = [], set()
    for key in shapes:
        if key in covered:
            continue
        for rule, regex in rules:
            m = regex.match(key)
            if m is None:
                continue
            names = {k: v for k, v in m.groupdict().items() if v is not None}
            ours = [t.format(**names) for t in rule.ours]
            if not all(o in shapes for o in ours):
                continue
            steps.append(Step(rule.kind, ours, [t.format(**names) for t in rule.hf]))
            covered.update(ours)
            break
    left = [k for k in shapes if k not in covered]
    if left:
        raise ConfigError(f"the {fam.name} family cannot hold tensors {left[:3]} of this model config; "
                          f"pick another family with --family")
    return steps


def to_hf_tensors(step: Step, tensors: list[torch.Tensor], cfg: ModelConfig) -> list[torch.Tensor]:
    """HF tensors of ``step`` from its lmforge tensors."""
    kind = step.kind
    if kind == "copy":
        return [tensors[0]]
    if kind == "transpose":
        return [tensors[0].t()]
    if kind == "cat":
        return [torch.cat(tensors, dim=0)]
    if kind == "cat_t":
        return [torch.cat(tensors, dim=0).t()]
    if kind == "grouped_qkv":
        q, k, v = tensors
        g = cfg.num_query_groups
        rest = q.shape[1:]
        parts = [q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)]
        return [torch.cat(parts, dim=1).reshape(-1, *rest)]
    raise ValueError(f"unknown rule kind {kind!r}")


def to_our_tensors(step: Step, tensors: list[torch.Tensor], cfg: ModelConfig,
                   shapes: dict[str, torch.Size]) -> list[torch.Tensor]:
    """lmforge tensors of ``step`` from its HF tensors (``shapes``: the expected lmforge shapes)."""
    kind = step.kind
    (t,) = tensors
    if kind == "copy":
        return [t]
    if kind == "transpose":
        return [t.t()]
    sizes = [shapes[name][0] for name in step.ours]
    if kind == "cat":
        return [p.clone() for p in torch.split(t, sizes, dim=0)]
    if kind == "cat_t":
        return [p.clone() for p in torch.split(t.t(), sizes, dim=0)]
    if kind == "grouped_qkv":
        g = cfg.num_query_groups
        rest = t.shape[1:]
        q, k, v = torch.split(t.reshape(g, -1, *rest), [s // g for s in sizes], dim=1)
        return [p.reshape(-1, *rest).clone() for p in (q, k, v)]
    raise ValueError(f"unknown rule kind {kind!r}")


def hf_shapes(step: Step, cfg: ModelConfig, shapes: dict[str, torch.Size]) -> list[torch.Size]:
    meta = [torch.empty(shapes[name], device="meta") for name in step.ours]
    return [t.shape for t in to_hf_tensors(step, meta, cfg)]


@dataclass
class Source:
    """A model to convert: its config, family, lmforge-named tensors (streamed) and what travels with it."""

    cfg: ModelConfig
    family: Family
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    total_bytes: int
    hf_extra: dict = field(default_factory=dict)  # token ids / dtype to write back into an HF config
    carry_from: Optional[Path] = None  # folder whose CARRIED_FILES are copied
    tokenizer_files: dict = field(default_factory=dict)  # name -> bytes (from a .nemo archive)
