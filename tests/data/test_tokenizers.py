"""Byte-level BPE training, the Tokenizer interface, saving, and loading through transformers."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest

from lmforge.data.tokenizers import HFAutoTokenizer, Tokenizer, load_tokenizer, train_bpe
from lmforge.errors import ConfigError, DataError

SAMPLE = "def añadir(x, y):\n    \"\"\"Suma — 合計\"\"\"\n    return x + y  # 🙂\n\n\tfinal  spaces  "


def _module_texts() -> list[str]:
    import argparse
    import difflib
    import textwrap as tw

    return [inspect.getsource(m) for m in (argparse, difflib, tw)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    jsonl = root / "train.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for text in _module_texts():
            f.write(json.dumps({"text": text}) + "\n")
    tok = train_bpe([jsonl], 400, root / "out")
    return {"root": root, "jsonl": jsonl, "tok": tok, "folder": root / "out"}


def test_training_writes_a_loadable_folder(trained):
    tok, folder = trained["tok"], trained["folder"]
    assert isinstance(tok, Tokenizer)
    assert sorted(p.name for p in folder.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert tok.vocab_size == 400
    assert tok.eod_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.bos_id is None
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>"
    # nothing but the output folder is left in the parent (no temporary folders)
    assert sorted(p.name for p in trained["root"].iterdir()) == ["out", "train.jsonl"]


def test_encode_decode_round_trip(trained):
    tok = trained["tok"]
    ids = tok.encode(SAMPLE)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == SAMPLE
    # merges learned from Python source make common code shorter than its bytes
    code = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tok.encode(code)) < len(code.encode()) / 2
    assert tok.encode("") == []
    assert tok.encode_batch([SAMPLE, code, ""]) == [tok.encode(SAMPLE), tok.encode(code), []]
    eod_text = tok.decode([tok.eod_id])
    assert eod_text == "<|endoftext|>"
    assert tok.encode("a<|endoftext|>b")[1] == tok.eod_id


def test_save_and_load_again(trained, tmp_path):
    tok = trained["tok"]
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert again.vocab_size == tok.vocab_size and again.eod_id == tok.eod_id
    # a bare tokenizer.json (no config beside it): the EOD comes from the known names
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_text((tmp_path / "copy" / "tokenizer.json").read_text())
    bare = load_tokenizer(tmp_path / "bare" / "tokenizer.json")
    assert bare.eod_id == 0 and bare.encode(SAMPLE) == tok.encode(SAMPLE)


def test_transformers_autotokenizer_loads_the_saved_folder(trained, tmp_path):
    import transformers

    tok = trained["tok"]
    tok.save(tmp_path / "ckpt")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True)
    for text in (SAMPLE, _module_texts()[2][:2000]):
        assert hf(text).input_ids == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    assert hf.eos_token_id == tok.eod_id
    assert len(hf) == tok.vocab_size


def test_folder_without_tokenizer_json_goes_through_autotokenizer(trained, tmp_path):
    tok = trained["tok"]
    slow = tmp_path / "gpt2_style"
    slow.mkdir()
    tok.backend.model.save(str(slow))  # vocab.json + merges.txt
    (slow / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "add_prefix_space": False}))
    wrapped = load_tokenizer(slow)
    assert isinstance(wrapped, HFAutoTokenizer)
    assert wrapped.encode(SAMPLE) == tok.encode(SAMPLE)
    assert wrapped.encode_batch([SAMPLE, "x"]) == [tok.encode(SAMPLE), tok.encode("x")]
    assert wrapped.decode(wrapped.encode(SAMPLE)) == SAMPLE
    assert wrapped.eod_id == 0 and wrapped.vocab_size == 400
    wrapped.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode(SAMPLE) == tok.encode(SAMPLE)


def test_plain_text_training_input(tmp_path):
    txt = tmp_path / "code.py.txt"
    txt.write_text("\n".join(_module_texts()), encoding="utf-8")
    tok = train_bpe(txt, 300, tmp_path / "t", min_frequency=2)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_existing_output_folder_keeps_other_files(trained, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    train_bpe([trained["jsonl"]], 300, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert load_tokenizer(out).vocab_size == 300


def test_errors(tmp_path, trained):
    with pytest.raises(DataError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="minimum is 257"):
        train_bpe([trained["jsonl"]], 100, tmp_path / "small")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no text"):
        train_bpe([empty], 300, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        train_bpe([bad], 300, tmp_path / "b")
    with pytest.raises(DataError, match="missing.jsonl"):
        train_bpe([tmp_path / "missing.jsonl"], 300, tmp_path / "m")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text(textwrap.dedent("{ nope"))
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer(broken)


def test_existing_tokenizer_needs_overwrite(trained, tmp_path):
    """Issue 15.12: tokenizer files already in --out are replaced only with overwrite."""
    out = tmp_path / "t"
    train_bpe([trained["jsonl"]], 300, out)
    before = (out / "tokenizer.json").read_bytes()
    with pytest.raises(DataError, match=r"already holds a tokenizer \(tokenizer\.json, tokenizer_config\.json, "
                                        r"special_tokens_map\.json\); pass --overwrite"):
        train_bpe([trained["jsonl"]], 280, out)
    assert (out / "tokenizer.json").read_bytes() == before
    assert train_bpe([trained["jsonl"]], 280, out, overwrite=True).vocab_size == 280
