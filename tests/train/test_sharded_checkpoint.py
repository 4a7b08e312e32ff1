"""Sharded (FSDP) checkpoints: one 2-process gloo run writes them (tests/train/sharded_worker.py); this process
reads them back without a process group, loads them as models, converts them and reshards them onto one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_torchrun
from lmforge.errors import CheckpointError
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.train.checkpoint import is_complete, load_model
from lmforge.train.sharded import MANIFEST_NAME, is_sharded, load_sharded, read_full, save_sharded

WORKER = Path(__file__).with_name("sharded_worker.py")
NAMES = ("dense", "moe")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The worker's output: ``<name>/plain`` (save_model), ``<name>/step_0000001`` (sharded), reference optimizer."""
    out = tmp_path_factory.mktemp("sharded")
    p = run_torchrun(WORKER, str(out))
    for name in NAMES:
        assert f"{name}:" in p.stdout and "round-tripped on 2 ranks" in p.stdout
    return out


def _cfg(run: Path, name: str) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((run / name / "plain" / "config.json").read_text())["model"])


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_layout_on_disk(run):
    step = run / "moe" / "step_0000001"
    shards = ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert sorted(p.name for p in (step / "model").iterdir()) == sorted([MANIFEST_NAME, *shards])
    assert sorted(p.name for p in (step / "training_state" / "optimizer").iterdir()) == sorted([MANIFEST_NAME, *shards])
    manifest = json.loads((step / "model" / MANIFEST_NAME).read_text())
    assert manifest["world_size"] == 2 and manifest["files"] == shards
    from safetensors import safe_open

    with safe_open(str(step / "model" / shards[1]), "pt") as f:
        info = json.loads(f.metadata()["DCP_SHARDING_INFO"])
    assert info["embed_tokens.weight"]["saved_offsets"] == [32, 0]  # rank 1 holds rows 32.. of 64
    assert is_sharded(step) and is_sharded(step / "model") and not is_sharded(run / "moe" / "plain")


@pytest.mark.parametrize("name", NAMES)
def test_read_full_equals_the_unsharded_weights(run, name):
    plain = load_file(str(run / name / "plain" / "model.safetensors"))
    full = dict(read_full(run / name / "step_0000001"))
    _assert_same(full, plain)
    # a chosen subset, in the order asked
    names = list(plain)[::-3]
    assert [n for n, _ in read_full(run / name / "step_0000001" / "model", names)] == names
    # the optimizer's full tensors (state.<param>.step / exp_avg / exp_avg_sq)
    ref = load_file(str(run / name / "ref_optimizer.safetensors"))
    _assert_same(dict(read_full(run / name / "step_0000001" / "training_state" / "optimizer")), ref)


@pytest.mark.parametrize("name", NAMES)
def test_load_model_and_is_complete_read_the_sharded_layout(run, name):
    step = run / name / "step_0000001"
    assert is_complete(step)
    state, config = load_model(step)
    assert config["sharded"] == {"world_size": 2}
    plain, plain_config = load_model(run / name / "plain")
    assert config["model"] == plain_config["model"]
    _assert_same(state, plain)


def test_load_for_inference_opens_a_sharded_checkpoint(run, tiny_corpus, tmp_path):
    from lmforge.open import load_for_inference

    step, plain = tmp_path / "step", tmp_path / "plain"
    shutil.copytree(run / "dense" / "step_0000001", step)
    shutil.copytree(run / "dense" / "plain", plain)
    for folder in (step, plain):
        shutil.copy(tiny_corpus["tokenizer"] / "tokenizer.json", folder / "tokenizer.json")
    a, _ = load_for_inference(step, device="cpu", dtype="float32")
    b, _ = load_for_inference(plain, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 3, 2]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("name", NAMES)
def test_convert_to_hf_gives_the_same_files_as_an_ordinary_checkpoint(run, name, tmp_path):
    from lmforge.cli import main

    assert main(["convert", str(run / name / "step_0000001"), str(tmp_path / "a"), "--to", "hf", "--no-progress"]) == 0
    assert main(["convert", str(run / name / "plain"), str(tmp_path / "b"), "--to", "hf", "--no-progress"]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert list(a) == list(b)
    _assert_same(a, b)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads((tmp_path / "b" / "config.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_load_sharded_reshards_onto_one_process(run, name):
    step = run / name / "step_0000001"
    model = Transformer(_cfg(run, name))
    model.init_weights(123)
    state = model.state_dict()
    load_sharded(step / "model", state)  # in place, no process group: 2 ranks' slices -> plain tensors
    _assert_same(dict(model.state_dict()), load_file(str(run / name / "plain" / "model.safetensors")))
    ref = load_file(str(run / name / "ref_optimizer.safetensors"))
    optim = {k: torch.zeros_like(v) for k, v in ref.items()}
    load_sharded(step / "training_state" / "optimizer", optim)
    _assert_same(optim, ref)


def test_one_process_save_round_trips_and_refuses_non_tensors(tmp_path):
    state = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor(3, dtype=torch.int64),
             "c": torch.ones(2, dtype=torch.bfloat16)}
    save_sharded(tmp_path / "s", state)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["shard-00001-model-00001-of-00001.safetensors",
                                                                 MANIFEST_NAME]
    _assert_same(dict(read_full(tmp_path / "s")), state)
    with pytest.raises(TypeError, match=r"state_dict\['lr'\] is a float, not a tensor"):
        save_sharded(tmp_path / "t", {"w": torch.ones(2), "lr": 0.1})


def test_missing_keys_wrong_shapes_and_damaged_shards_are_checkpoint_errors(run, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(run / "dense" / "step_0000001", step)
    model = step / "model"
    with pytest.raises(CheckpointError, match=rf"{model}.*'layers\.9\.mlp\.up_proj\.weight' is missing"):
        load_sharded(model, {"layers.9.mlp.up_proj.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=rf"{model}.*'norm\.weight' has shape \(32,\) but the model expects \(7,\)"):
        load_sharded(model, {"norm.weight": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"tensors \['nope'\] are missing"):
        read_full(step, ["nope"])
    shard = model / "shard-00002-model-00001-of-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=rf"shard file {shard} cannot be read"):
        read_full(step)
    assert not is_complete(step)
    shard.unlink()  # missing
    with pytest.raises(CheckpointError, match=r"names shard-00002-model-00001-of-00001\.safetensors but the file"):
        load_model(step)
    assert not is_complete(step)
    # no manifest (a DCP folder written by other code): the full shapes come from the slices, and a gap shows
    shutil.copy(run / "dense" / "step_0000001" / "model" / shard.name, shard)
    (model / MANIFEST_NAME).unlink()
    _assert_same(dict(read_full(step)), load_file(str(run / "dense" / "plain" / "model.safetensors")))
    (model / "shard-00001-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"the slices of 'embed_tokens\.weight' hold 1056 of its 2144 elements"):
        read_full(step)
    shutil.rmtree(model)
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json \(nor a sharded model/ folder\)"):
        load_model(step)
