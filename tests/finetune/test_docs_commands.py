"""docs/finetuning.md holds true: its commands run verbatim (in a folder with a tiny base model and the data files
the page names), its YAML example is the file they read, and its key table lists every key of FinetuneConfig
with the default `lmforge config --finetune` prints."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.config.loader import _YamlLoader
from lmforge.finetune.config import FinetuneConfig
from tests.finetune.conftest import save_tiny_model, task_records, write_jsonl

DOC = Path(__file__).resolve().parents[2] / "docs" / "finetuning.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def doc_commands() -> list[str]:
    lines = [line.split("  #")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line]


def doc_table() -> dict[str, str]:
    """key -> default cell of the 'Every key' table."""
    table = DOC.read_text(encoding="utf-8").split("## Every key", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| `([^`]*)` \|", table, flags=re.M)}


def _leaves(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def test_the_table_lists_every_key_with_its_default():
    table, defaults = doc_table(), _leaves(FinetuneConfig())
    assert sorted(table) == sorted(defaults)
    for key, cell in table.items():
        assert yaml.load(cell, Loader=_YamlLoader) == defaults[key], key


@pytest.fixture
def doc_folder(tmp_path, monkeypatch, sft_tokenizer):
    """The folder the page's commands run in: base/, train.jsonl, val.jsonl, chat.jsonl and the page's ft.yaml."""
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "base", sft_tokenizer, init_method_std=0.25)
    write_jsonl(tmp_path / "train.jsonl", task_records(64, seed=1))
    write_jsonl(tmp_path / "val.jsonl", task_records(8, seed=2))
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": r["input"]},
                                                         {"role": "assistant", "content": r["output"]}]}
                                          for r in task_records(64, seed=3)])
    (ft_yaml,) = [b for b in _blocks("yaml") if b.startswith("# ft.yaml\n")]
    (tmp_path / "ft.yaml").write_text(ft_yaml, encoding="utf-8")
    return tmp_path


def test_every_command_runs_verbatim(doc_folder, capsys):
    commands = doc_commands()
    assert len(commands) == 9 and all(c.startswith("lmforge ") for c in commands)
    outputs = {}
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
        outputs[command] = capsys.readouterr().out

    defaults = yaml.load(outputs[commands[0]], Loader=_YamlLoader)  # lmforge config --finetune
    assert defaults == dataclasses.asdict(FinetuneConfig())
    resolved = yaml.load(outputs[commands[1]], Loader=_YamlLoader)
    assert resolved["method"] == "full" and resolved["sft"]["prompt_template"] == "Q: {input}\nA: "
    assert "Q: Which food is" in outputs[commands[2]] and "Answer:\nA: " in outputs[commands[2]]  # data preview

    assert (doc_folder / "ft_lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert (doc_folder / "merged" / "config.json").is_file()
    assert outputs[commands[5]].startswith("Which food is red? Answer:")  # generate from the run folder
    assert json.loads((doc_folder / "ft_full" / "summary.json").read_text())["steps"] == 20
    chat = json.loads((doc_folder / "ft_chat" / "summary.json").read_text())  # after `finetune ft.yaml ...=25`
    assert chat["steps"] == 25 and chat["resumed_from"].endswith("step_0000020")
    (ft_yaml,) = [b for b in _blocks("yaml") if b.startswith("# ft.yaml\n")]
    template = yaml.safe_load(ft_yaml)["sft"]["chat_template"]
    assert json.loads((doc_folder / "ft_chat" / "adapter" / "tokenizer_config.json").read_text())["chat_template"] \
        == template  # the template trained on is carried
