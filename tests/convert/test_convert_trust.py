"""convert never destroys what it did not write, never follows a link out of a .nemo, and refuses a damaged
lmforge checkpoint as every other load does."""

import hashlib
import io
import json
import os
import tarfile

import pytest
import torch

from lmforge.cli import main
from lmforge.convert.hf import convert
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import save_model

CFG = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32,
                  max_position_embeddings=32)


def _checkpoint(folder, nan: bool = False):
    torch.manual_seed(0)
    state = Transformer(CFG).state_dict()
    if nan:
        state["layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    return save_model(folder, state, CFG.to_dict())


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_holding_the_source_is_refused_and_the_source_survives(tmp_path, capsys):
    run = tmp_path / "run"
    src = _checkpoint(run / "ck")
    before = _tree(run)
    # the reported case: the output is the source's parent, with --overwrite
    assert main(["convert", str(src), str(run), "--to", "hf", "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "contains the source" in err
    for dst in (src, src / "inside"):
        with pytest.raises(ConfigError):
            convert(src, dst, to="hf", overwrite=True, progress=False)
    assert _tree(run) == before


def test_overwrite_replaces_only_a_folder_convert_wrote(tmp_path):
    src = _checkpoint(tmp_path / "ck")
    convert(src, tmp_path / "hf", to="hf", progress=False)
    convert(src, tmp_path / "hf", to="hf", overwrite=True, progress=False)  # its own output: replaced
    (tmp_path / "hf" / "my_notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="my_notes.txt, which convert did not write"):
        convert(src, tmp_path / "hf", to="hf", overwrite=True, progress=False)
    assert (tmp_path / "hf" / "my_notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        convert(src, tmp_path / "afile", to="hf", overwrite=True, progress=False)
    assert (tmp_path / "afile").read_text() == "x"


def test_converted_lmforge_checkpoint_records_checksums(tmp_path):
    src = _checkpoint(tmp_path / "ck")
    convert(src, tmp_path / "hf", to="hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "back", to="lmforge", progress=False)
    doc = json.loads((tmp_path / "back" / "config.json").read_text())
    assert doc["sha256"] == {"model.safetensors": hashlib.sha256((tmp_path / "back" / "model.safetensors").read_bytes()).hexdigest()}


def test_damaged_source_is_refused_and_no_verify_acts(tmp_path, capsys):
    src = _checkpoint(tmp_path / "ck")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (src / "model.safetensors").write_bytes(bytes(data))
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--no-progress"]) == 2
    assert "is damaged: its sha256" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--no-progress", "--no-verify"]) == 0
    nan = _checkpoint(tmp_path / "nan", nan=True)
    with pytest.raises(CheckpointError, match="'layers.0.self_attn.q_proj.weight' holds 1 NaN/inf"):
        convert(nan, tmp_path / "hf2", to="hf", progress=False)
    assert not (tmp_path / "hf2").exists()


def test_links_inside_a_nemo_are_refused_never_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    folder = tmp_path / "extracted"
    folder.mkdir()
    (folder / "model_config.yaml").write_text("num_layers: 1\n")
    os.symlink(secret, folder / "abc_tokenizer.model")
    with pytest.raises(CheckpointError, match="abc_tokenizer.model is a link"):
        convert(folder, tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()
    with tarfile.open(tmp_path / "m.nemo", "w:") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = 14
        tar.addfile(info, io.BytesIO(b"num_layers: 1\n"))
        link = tarfile.TarInfo("./abc_tokenizer.model")
        link.type, link.linkname = tarfile.SYMTYPE, str(secret)
        tar.addfile(link)
    with pytest.raises(CheckpointError, match="holds links"):
        convert(tmp_path / "m.nemo", tmp_path / "out", to="lmforge", progress=False)


def test_resolvers_in_an_imported_config_are_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("H15_SECRET", "s3cr3t-value")
    folder = tmp_path / "extracted"
    folder.mkdir()
    (folder / "model_config.yaml").write_text("num_layers: 1\nhidden_size: ${oc.env:H15_SECRET}\n")
    with pytest.raises(ConfigError) as info:
        convert(folder, tmp_path / "out", to="lmforge", progress=False)
    assert "oc.env" in str(info.value) and "s3cr3t-value" not in str(info.value)
    assert not (tmp_path / "out").exists()
