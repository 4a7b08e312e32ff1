"""Lazy package attributes (PEP 562), so that ``import lmforge.<package>.cli`` stays cheap.

A package's ``__init__`` that re-exports its API would otherwise import torch (and numpy, transformers, ...)
whenever any of its modules is imported, e.g. when ``lmforge --help`` registers the package's commands.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``exports[name]`` (a module) on first use of
    ``name`` and return its attribute of that name."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(importlib.import_module(package), name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
