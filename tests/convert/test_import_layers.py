"""Layering of model loading: models <- convert (plan <- nemo <- hf) <- open, with lmforge.locate (which folder
is meant) below convert. Each module imports on its own, fresh, and no import, at module level or inside a
function, points up a layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmforge
from tests.forked import ForkedPython

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


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory):
    """Runs code in a fork of a process that imported torch alone (not lmforge: each module's import is its own,
    as in a new interpreter; torch, imported by most of them, is paid for once)."""
    python = ForkedPython(tmp_path_factory.mktemp("imports"), ["torch"])
    yield python.run
    python.close()


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_fresh(module, fresh_python):
    rc, out = fresh_python(f"import sys\nassert not any(m.startswith('lmforge') for m in sys.modules)\nimport {module}")
    assert rc == 0, out[-2000:]
