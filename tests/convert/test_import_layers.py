"""Layering of model loading: models <- convert (plan <- nemo <- hf) <- open, with lmforge.locate (which folder
is meant) below convert. Each module imports on its own, fresh, and no import, at module level or inside a
function, points up a layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge

SRC = Path(lmforge.__file__).parent
MODULES = ["lmforge.convert", "lmforge.convert.plan", "lmforge.convert.nemo", "lmforge.convert.dcp",
           "lmforge.convert.hf", "lmforge.convert.cli", "lmforge.locate", "lmforge.open", "lmforge.models",
           "lmforge.models.families", "lmforge.train.checkpoint", "lmforge.train.sharded", "lmforge.train.pretrain",
           "lmforge.serve.engine", "lmforge.finetune.cli", "lmforge.eval.evaluate"]
# lower layers first: a module may import only modules of its own layer or of layers before it
LAYERS = [["lmforge.models"], ["lmforge.locate"], ["lmforge.convert.dcp", "lmforge.convert.plan"],
          ["lmforge.convert.nemo"], ["lmforge.convert.hf", "lmforge.convert"], ["lmforge.convert.cli"], ["lmforge.open"]]


def _layer(module: str):
    for i, names in enumerate(LAYERS):
        if any(module == n or (n == "lmforge.models" and module.startswith(n + ".")) for n in names):
            return i
    return None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lmforge"))
    return out


def test_no_import_points_up_a_layer():
    assert not (SRC / "models" / "load.py").exists()
    upward = []
    for path in SRC.rglob("*.py"):
        module = ".".join(("lmforge", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        here = _layer(module)
        if here is None:
            continue
        for target in _imports(path):
            there = _layer(target)
            if there is not None and there > here:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_fresh(module):
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
