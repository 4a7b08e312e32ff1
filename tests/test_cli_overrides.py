"""Overrides on the command line mean what the user typed, and stand anywhere after the command's options.

``sft.prompt_template='Q: {input}\\nA: '`` reaches lmforge (after the shell removed the quotes) as
``sft.prompt_template=Q: {input}\\nA: `` with a backslash-n and a trailing space: it must become a newline, and the
space must stay. A real newline (``$'...'``) must not turn the template into a YAML mapping.
"""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.config.loader import parse_override
from lmforge.finetune import load_finetune_config

TEMPLATE = "Q: {input}\nA: "
SHELL_FORMS = [
    "sft.prompt_template=Q: {input}\\nA: ",  # bash: sft.prompt_template='Q: {input}\nA: '
    "sft.prompt_template='Q: {input}\\nA: '",  # the quotes reached lmforge (a YAML list of overrides, subprocess)
    'sft.prompt_template="Q: {input}\\nA: "',
    "sft.prompt_template=Q: {input}\nA: ",  # bash: sft.prompt_template=$'Q: {input}\nA: ' (a real newline)
    "'sft.prompt_template=Q: {input}\\nA: '",  # the whole argument quoted
]


@pytest.mark.parametrize("text", SHELL_FORMS)
def test_template_override_means_what_was_typed(text):
    assert parse_override(text) == ("sft.prompt_template", TEMPLATE)
    assert load_finetune_config({"model": "m", "data": "d"}, [text]).sft.prompt_template == TEMPLATE


def test_text_values_keep_spaces_and_decode_escapes():
    assert parse_override("sft.prompt_template=  indented\\t{input} ") == ("sft.prompt_template",
                                                                           "  indented\t{input} ")
    assert parse_override("a.b=C:\\\\data\\\\x") == ("a.b", "C:\\data\\x")  # \\ is one backslash
    assert parse_override("a.b=keep \\d as typed") == ("a.b", "keep \\d as typed")  # not an escape lmforge knows
    assert parse_override("a.b=x # not a comment") == ("a.b", "x # not a comment")
    # YAML 1.1's base-60 numbers are text, as in YAML 1.2 (trainer.max_time=00:03:50:00 is a time)
    assert parse_override("trainer.max_time=00:03:50:00") == ("trainer.max_time", "00:03:50:00")


def test_other_values_are_still_yaml():
    assert parse_override("trainer.devices=4") == ("trainer.devices", 4)
    assert parse_override("model.optim.betas=[0.9,0.95]") == ("model.optim.betas", [0.9, 0.95])
    assert parse_override("model.rope_scaling={rope_type: linear, factor: 2.0}") == (
        "model.rope_scaling", {"rope_type": "linear", "factor": 2.0})
    assert parse_override("model.tokenizer.model=null") == ("model.tokenizer.model", None)
    assert parse_override("trainer.precision='16'") == ("trainer.precision", 16)  # quotes the shell left
    assert load_config("tiny/llama", ["trainer.precision='bf16'"]).trainer.precision == "bf16-mixed"


def test_text_fields_of_the_finetune_schema_take_the_text():
    """{input} alone is a YAML flow mapping; for a str field it is the template."""
    assert parse_override("sft.prompt_template={input}") == ("sft.prompt_template", {"input": None})  # no schema
    cfg = load_finetune_config({"model": "m", "data": "d"}, ["sft.prompt_template={input}", "trainer.precision=16",
                                                             "sft.chat_template=null"])
    assert cfg.sft.prompt_template == "{input}" and cfg.trainer.precision == "16-mixed"
    assert cfg.sft.chat_template is None


@pytest.fixture
def preview_files(tmp_path):
    from lmforge.data.tokenizers import train_bpe

    records = [{"input": "Which food is red?", "output": "apple"}] * 4
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "Q: Which food is red?\nA: apple"}) + "\n", encoding="utf-8")
    train_bpe([str(corpus)], 300, tmp_path / "tok")
    return data, tmp_path / "tok"


def test_data_preview_shows_the_template_and_takes_overrides_after_options(preview_files, capsys):
    data, tok = preview_files
    # an override before an option and one after it (the shell's form of the --help example)
    assert main(["data", "preview", str(data), "sft.add_eos=false", "--tokenizer", str(tok), "--count", "1",
                 "sft.prompt_template=Q: {input}\\nA: "]) == 0
    out = capsys.readouterr().out
    assert "Q: Which food is red?\nA: apple" in out and "\\n" not in out


def test_launch_takes_overrides_after_options(monkeypatch, tmp_path):
    import lmforge.launch

    seen = {}

    def fake_launch(config, overrides, dry_run=False, force=False):
        seen.update(config=config, overrides=list(overrides), dry_run=dry_run, force=force)
        return 0

    monkeypatch.setattr(lmforge.launch, "launch", fake_launch)
    assert main(["launch", "conf/config.yaml", "training=gpt3/126m", "--dry-run",
                 "training.trainer.max_steps=5", "--force", "cluster_type=slurm"]) == 0
    assert seen == {"config": "conf/config.yaml", "dry_run": True, "force": True,
                    "overrides": ["training=gpt3/126m", "training.trainer.max_steps=5", "cluster_type=slurm"]}
