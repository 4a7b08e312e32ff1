"""A .nemo whose weights are a sharded torch.distributed.checkpoint folder (``model_weights/``, NeMo's
torch_dist format) is refused with a message naming the pickled index file and saying how to convert;
the pickle is never loaded (a payload that would create a file on unpickling stays inert)."""

import io
import json
import pickle
import tarfile

import pytest

from lmforge.cli import main
from lmforge.convert.hf import convert
from lmforge.errors import CheckpointError, UserError

CONFIG = b"""mcore_gpt: true
num_layers: 2
hidden_size: 48
num_attention_heads: 4
ffn_hidden_size: 88
dist_ckpt_format: torch_dist
"""


class _Trap:
    """Unpickling this opens (creates) ``path``: proof that lmforge unpickled the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def dist_members(marker, backend: str = "torch_dist") -> dict:
    members = {"model_config.yaml": CONFIG,
               "model_weights/metadata.json": json.dumps({"sharded_backend": backend,
                                                          "sharded_backend_version": 1}).encode(),
               "model_weights/common.pt": b"\x80\x04N.",
               "tokenizer.model": b"spm-bytes"}
    if backend == "torch_dist":
        members["model_weights/.metadata"] = pickle.dumps(_Trap(str(marker)))
        members["model_weights/__0_0.distcp"] = b"\x00" * 64
        members["model_weights/__1_0.distcp"] = b"\x00" * 64
    else:
        members["model_weights/model.embedding.word_embeddings.weight/.zarray"] = b"{}"
    return members


def write_tar(path, members: dict) -> None:
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_folder(path, members: dict) -> None:
    for name, data in members.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)


@pytest.mark.parametrize("as_folder", [False, True])
def test_torch_dist_nemo_is_refused_without_unpickling(tmp_path, as_folder):
    marker = tmp_path / "unpickled.txt"
    src = tmp_path / ("extracted" if as_folder else "m.nemo")
    if as_folder:
        write_folder(src, dist_members(marker))
    else:
        write_tar(src, dist_members(marker))
    with pytest.raises(CheckpointError) as err:
        convert(src, tmp_path / "out", to="lmforge", progress=False)
    assert isinstance(err.value, UserError)
    msg = str(err.value)
    assert str(src) in msg
    assert "model_weights/.metadata" in msg and "pickle" in msg and "torch_dist" in msg
    assert "model_weights.ckpt" in msg and "HF" in msg  # how to convert: NeMo's single-file save or HF export
    assert "\n" not in msg
    assert not marker.exists()  # never unpickled
    assert not (tmp_path / "out").exists()


def test_torch_dist_refusal_is_one_cli_line(tmp_path, capsys):
    marker = tmp_path / "unpickled.txt"
    write_tar(tmp_path / "m.nemo", dist_members(marker))
    assert main(["convert", str(tmp_path / "m.nemo"), str(tmp_path / "out"), "--to", "hf", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_weights/.metadata" in err
    assert not marker.exists()


def test_zarr_nemo_is_refused_with_how_to_convert(tmp_path):
    write_tar(tmp_path / "z.nemo", dist_members(tmp_path / "unused", backend="zarr"))
    with pytest.raises(CheckpointError, match=r"sharded distributed-checkpoint folder \(model_weights/.*model_weights\.ckpt"):
        convert(tmp_path / "z.nemo", tmp_path / "out", to="lmforge", progress=False)
