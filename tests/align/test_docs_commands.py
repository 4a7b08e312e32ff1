"""docs/alignment.md holds true: its commands run verbatim (in a folder with a tiny model and the data files the
page names), its YAML example is the file they read, and its key table lists every key of AlignConfig with its
default."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lmforge.align.config import AlignConfig
from lmforge.cli import main
from lmforge.config.loader import _YamlLoader
from tests.align.conftest import pair_records, reverse_words, save_tiny_base, write_jsonl

DOC = Path(__file__).resolve().parents[2] / "docs" / "alignment.md"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Align on preferences", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def _blocks(kind: str) -> list[str]:
    """The page's ``kind`` blocks, less the SteerLM section's (tests/align/test_steerlm.py runs those)."""
    head, steerlm = DOC.read_text(encoding="utf-8").split("\n## SteerLM\n", 1)
    return re.findall(rf"```{kind}\n(.*?)```", head + steerlm.split("\n## ", 1)[1], flags=re.S)


def torchrun_commands() -> list[str]:
    """The page's commands launched with torchrun (several processes)."""
    return [line.strip() for block in _blocks("bash") for line in block.splitlines()
            if line.strip().startswith("torchrun ")]


def _leaves(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out.update(_leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name: value})
    return out


def test_the_table_lists_every_key_with_its_default():
    table = DOC.read_text(encoding="utf-8").split("## Every key", 1)[1]
    cells = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| `([^`]*)` \|", table, flags=re.M)}
    defaults = _leaves(AlignConfig())
    assert sorted(cells) == sorted(defaults)
    for key, cell in cells.items():
        assert yaml.load(cell, Loader=_YamlLoader) == defaults[key], key


@pytest.fixture
def doc_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny_base(tmp_path / "base")
    words = reverse_words(48, seed=11)
    write_jsonl(tmp_path / "prefs.jsonl", pair_records(words[:40]))
    write_jsonl(tmp_path / "prefs_val.jsonl", pair_records(words[40:]))
    write_jsonl(tmp_path / "kto.jsonl", [{"prompt": w + ":", "completion": w[::-1] if i % 2 else w,
                                          "label": bool(i % 2)} for i, w in enumerate(words[:16])])
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": w + ":", "word": w} for w in words[:8]])
    (reward,) = re.findall(r"`(def frac_a\(.*?)`", DOC.read_text(encoding="utf-8").replace("\n", " "))
    (tmp_path / "rewards.py").write_text(reward.replace(": return", ":\n    return") + "\n", encoding="utf-8")
    (doc,) = [b for b in _blocks("yaml") if b.startswith("# dpo.yaml\n")]
    (tmp_path / "dpo.yaml").write_text(doc, encoding="utf-8")
    return tmp_path


def test_every_command_runs_verbatim(doc_folder, capsys):
    """The README's alignment block first, then this page's (whose DPO and reward-model runs are the README's:
    they find their runs complete and only write their summaries again)."""
    readme = readme_commands()
    assert len(readme) == 3
    for command in readme:
        assert main(shlex.split(command)[1:]) == 0, command
    capsys.readouterr()
    commands = [line.strip() for block in _blocks("bash") for line in block.splitlines() if line.strip()]
    commands = [c for c in commands if c not in torchrun_commands()]  # test_online_rl_parallel.py runs those
    assert len(commands) == 11 and all(c.startswith("lmforge ") for c in commands)
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    capsys.readouterr()
    assert (doc_folder / "dpo_hf" / "config.json").is_file()
    assert (doc_folder / "dpo_lora_merged" / "config.json").is_file()
    for run, method in (("dpo", "dpo"), ("simpo", "simpo"), ("kto", "kto"), ("rm", "rm"), ("ipo", "ipo"), ("grpo", "grpo"),
                        ("ppo", "ppo")):
        assert json.loads((doc_folder / run / "summary.json").read_text())["method"] == method
    assert (doc_folder / "ppo" / "critic" / "model.safetensors").is_file()
    lines = (doc_folder / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all("chosen" in json.loads(x) for x in lines)
