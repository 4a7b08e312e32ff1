"""Every message that names a config key names a real one.

Walks every module of src/lmforge, takes the text of each message (the string and f-string arguments of
exceptions, warnings, prints, logs and ``problems.append``), finds the dotted keys in it (``sft.*``, ``model.*``,
``trainer.*``, ``data.*``, ``exp_manager.*``, ``peft.*``, ``optim.*``, ``generation.*``) and checks that each is a
key of the pretraining schema (PretrainConfig), of the fine-tuning schema (FinetuneConfig), of the alignment
schema (AlignConfig, also ``align.*``) or, for ``model.*``, of
the model's own config (ModelConfig: a checkpoint's config.json "model", which models/config.py checks). A key
built in an f-string (``model.activations_checkpoint_{key}``) must match at least one real key.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from lmforge.config.schema import PretrainConfig
from lmforge.align.config import AlignConfig
from lmforge.finetune.config import FinetuneConfig
from lmforge.models.config import ModelConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
HOLE = "\x00"  # where an f-string puts a value
ROOTS = ("sft", "model", "trainer", "data", "exp_manager", "peft", "optim", "generation", "align")
# a dotted key: not part of a longer name or path, not followed by more of a name (a tensor name's prefix such as
# model.layers.{i}); tensor names (...weight) are not keys
TOKEN = re.compile(r"(?<![\w./\\-])((?:%s)(?:\.[A-Za-z_\x00][A-Za-z0-9_\x00]*)+)(?![\w.\x00-])" % "|".join(ROOTS))
MESSAGE_CALL = re.compile(r"(Error|Exception|Warning)$|^(print|warn|_warn|append|console_log|log|note)$")


def schema_keys(cls, prefix: str = "") -> set[str]:
    """Every dotted key of a dataclass schema, sections included."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.add(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= schema_keys(hints[f.name], key + ".")
    return keys


KEYS = (schema_keys(PretrainConfig) | schema_keys(FinetuneConfig) | schema_keys(AlignConfig)
        | schema_keys(ModelConfig, "model."))


def _text(node) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
    return None


def _call_name(func) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def message_keys() -> list[tuple[str, str]]:
    """(where, key) for every dotted key named in a message in src/lmforge."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and MESSAGE_CALL.search(_call_name(call.func))):
                continue
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                nodes = list(ast.walk(arg))
                parts = {id(v) for n in nodes if isinstance(n, ast.JoinedStr) for v in n.values}
                for node in nodes:
                    text = None if id(node) in parts else _text(node)  # an f-string's pieces: read as a whole
                    for m in TOKEN.finditer(text or ""):
                        key = m.group(1)
                        # tensor names (model.layers.{i}.mlp..., ...weight) are not keys
                        if not key.endswith(".weight") and HOLE not in key.split("."):
                            found.append((f"{path.relative_to(SRC.parent)}:{node.lineno}", key))
    return found


def _exists(key: str) -> bool:
    if HOLE not in key:
        return key in KEYS
    pattern = re.compile(re.escape(key).replace(re.escape(HOLE), "[A-Za-z0-9_.]+"))
    return any(pattern.fullmatch(k) for k in KEYS)


def test_the_walk_finds_the_messages():
    """The walk sees messages (so the next test cannot pass by finding nothing), f-string keys included."""
    keys = {k for _, k in message_keys()}
    assert {"model.global_batch_size", "trainer.devices", "sft.prompt_template", "peft.lora.r"} <= keys
    assert any(HOLE in k for k in keys)
    assert _exists("model.activations_checkpoint_" + HOLE) and not _exists("data." + HOLE + "_key")


@pytest.mark.parametrize("where,key", message_keys(), ids=lambda x: x.replace(HOLE, "{}") if isinstance(x, str) else x)
def test_message_names_a_real_key(where, key):
    assert _exists(key), f"{where}: the message names {key.replace(HOLE, '{...}')!r}, which is no config key"
