"""A torch_dist ``model_weights/.metadata`` is a pickle: lmforge reads it through an allowlist unpickler. A payload
(a global outside torch.distributed.checkpoint's metadata classes) is refused with one message naming the class
and the file, and its side effect never happens; zarr folders are refused with how to convert."""

import io
import json
import pickle
import tarfile

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lmforge.cli import main
from lmforge.convert.dcp import load_metadata
from lmforge.convert.hf import convert
from lmforge.errors import CheckpointError, UserError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

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


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def real_metadata(tmp_path) -> bytes:
    dcp.save({"model.embedding.word_embeddings.weight": torch.zeros(4, 2)}, checkpoint_id=str(tmp_path / "real"))
    return (tmp_path / "real" / ".metadata").read_bytes()


def dist_members(metadata: bytes, backend: str = "torch_dist") -> dict:
    members = {"model_config.yaml": CONFIG,
               "model_weights/metadata.json": json.dumps({"sharded_backend": backend,
                                                          "sharded_backend_version": 1}).encode(),
               "model_weights/common.pt": b"\x80\x04N.",
               "tokenizer.model": b"spm-bytes"}
    if backend == "torch_dist":
        members["model_weights/.metadata"] = metadata
        members["model_weights/__0_0.distcp"] = b"\x00" * 64
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
def test_payload_in_metadata_is_refused_never_run(tmp_path, as_folder):
    marker = tmp_path / "unpickled.txt"
    src = tmp_path / ("extracted" if as_folder else "m.nemo")
    (write_folder if as_folder else write_tar)(src, dist_members(pickle.dumps(_Trap(str(marker)))))
    with pytest.raises(CheckpointError) as err:
        convert(src, tmp_path / "out", to="lmforge", progress=False)
    assert isinstance(err.value, UserError)
    msg = str(err.value)
    assert f"{src}/model_weights/.metadata refers to io.open" in msg
    assert "allowlist" in msg and "HF" in msg and "\n" not in msg
    assert not marker.exists()  # never unpickled
    assert not (tmp_path / "out").exists()


def test_payload_hidden_inside_real_metadata_is_refused(tmp_path):
    md = pickle.loads(real_metadata(tmp_path))  # the test's own file
    load_metadata(pickle.dumps(md), "ok/.metadata")  # the genuine article passes the allowlist
    md.storage_meta.modules = [_Eval()]
    with pytest.raises(CheckpointError, match=r"x/\.metadata refers to builtins\.eval, which is not a torch"):
        load_metadata(pickle.dumps(md), "x/.metadata")
    with pytest.raises(CheckpointError, match=r"refers to collections\.Counter"):
        load_metadata(pickle.dumps({"a": __import__("collections").Counter("ab")}), "x/.metadata")
    with pytest.raises(CheckpointError, match=r"not a readable torch\.distributed\.checkpoint index"):
        load_metadata(b"\x80\x04garbage", "x/.metadata")
    with pytest.raises(CheckpointError, match=r"does not hold torch\.distributed\.checkpoint Metadata"):
        load_metadata(pickle.dumps({"a": 1}), "x/.metadata")


def test_refusal_is_one_cli_line(tmp_path, capsys):
    marker = tmp_path / "unpickled.txt"
    write_tar(tmp_path / "m.nemo", dist_members(pickle.dumps(_Trap(str(marker)))))
    assert main(["convert", str(tmp_path / "m.nemo"), str(tmp_path / "out"), "--to", "hf", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_weights/.metadata" in err and "io.open" in err
    assert not marker.exists()


def test_unknown_tensor_names_in_torch_dist_are_refused(tmp_path):
    dcp.save({"model.decoder.layers.mlp.experts.linear_fc1.weight": torch.zeros(2, 4, 3)},
             checkpoint_id=str(tmp_path / "moe"))
    members = dist_members(b"")
    members.update({f"model_weights/{p.name}": p.read_bytes() for p in (tmp_path / "moe").iterdir()})
    write_tar(tmp_path / "moe.nemo", members)
    with pytest.raises(CheckpointError, match=r"experts.linear_fc1.weight'\] are not in a known NeMo GPT key layout"):
        convert(tmp_path / "moe.nemo", tmp_path / "out", to="lmforge", progress=False)


def test_zarr_nemo_is_refused_with_how_to_convert(tmp_path):
    write_tar(tmp_path / "z.nemo", dist_members(b"", backend="zarr"))
    with pytest.raises(CheckpointError, match=r"sharded distributed-checkpoint folder \(model_weights/.*model_weights\.ckpt"):
        convert(tmp_path / "z.nemo", tmp_path / "out", to="lmforge", progress=False)
