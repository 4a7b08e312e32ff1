"""Checkpoint folders: weights round trip, sharding, validation, exact resume, top-k, atomic saves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import lmforge
from lmforge.errors import CheckpointError
from lmforge.parallel.runtime import Runtime
from lmforge.train import checkpoint as ckpt
from lmforge.train.checkpoint import (
    CheckpointManager,
    is_complete,
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)

RT = Runtime()
CONFIG = {"hidden_size": 8, "num_layers": 2, "vocab_size": 16}


class TinyNet(nn.Module):
    """A small model with tied embedding/head and dropout (so resuming needs the RNG state)."""

    def __init__(self, vocab: int = 16, hidden: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.head(self.norm(self.drop(torch.relu(self.fc(self.emb(ids))))))


class FakeTokenizer:
    def save(self, folder):
        Path(folder, "tokenizer.json").write_text('{"fake": true}', encoding="utf-8")


def train_step(model, opt):
    """One step whose batch and dropout both draw from torch's RNG."""
    ids = torch.randint(0, 16, (4, 6))
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def draws():
    return torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)]


def assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def test_round_trip_values_dtypes_config_tokenizer(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(2, 2, generator=g).to(torch.float16),
        "d.index": torch.arange(7, dtype=torch.int64),
        "e.t": torch.randn(3, 4, generator=g).t(),  # non-contiguous
    }
    save_model(tmp_path / "ck", state, CONFIG, tokenizer=FakeTokenizer())
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    assert not (tmp_path / "ck" / "model.safetensors.index.json").exists()
    assert (tmp_path / "ck" / "tokenizer.json").is_file()
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    sha = ckpt.file_sha256(tmp_path / "ck" / "model.safetensors")
    assert doc == {"lmforge_version": lmforge.__version__, "format": "lmforge", "model": CONFIG,
                   "sha256": {"model.safetensors": sha}}
    loaded, config = load_model(tmp_path / "ck")
    assert config == doc and config["model"] == CONFIG
    assert_same_state(loaded, {k: v.contiguous() for k, v in state.items()})
    assert loaded["b.weight"].dtype == torch.bfloat16
    assert is_complete(tmp_path / "ck")


def test_sharding_writes_index_and_loads_back(tmp_path):
    state = {f"layer{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    save_model(tmp_path / "ck", state, CONFIG, max_shard_bytes=900)
    folder = tmp_path / "ck"
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    for name, fname in index["weight_map"].items():
        assert name in load_file(str(folder / fname))
    loaded, _ = load_model(folder)
    assert_same_state(loaded, state)
    # Saving unsharded into the same folder removes the old shards and index.
    save_model(folder, state, CONFIG)
    assert not list(folder.glob("model-*.safetensors"))
    assert not (folder / "model.safetensors.index.json").exists()
    assert_same_state(load_model(folder)[0], state)


def test_tied_tensors_are_saved_once(tmp_path):
    model = TinyNet()
    state = model.state_dict()
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
    base = torch.arange(12.0)
    state["view.part"] = base[:4]  # a view into a larger storage is written as its own values
    state["view.whole"] = base
    save_model(tmp_path / "ck", state, CONFIG)
    loaded, _ = load_model(tmp_path / "ck")
    assert "emb.weight" in loaded and "head.weight" not in loaded
    assert torch.equal(loaded["emb.weight"], model.emb.weight.detach())
    assert torch.equal(loaded["view.part"], torch.arange(4.0))
    assert torch.equal(loaded["view.whole"], base)


def _make_ck(folder: Path, sharded: bool = False) -> Path:
    state = {f"w{i}": torch.ones(10, 10) * i for i in range(3)}
    save_model(folder, state, CONFIG, max_shard_bytes=500 if sharded else 5 * 2**30)
    return folder


@pytest.mark.parametrize("case, expect", [
    ("no_folder", "does not exist"),
    ("no_config", "incomplete: no config.json"),
    ("no_weights", "incomplete: no model.safetensors or model.safetensors.index.json"),
    ("missing_shard", "model-00002-of-00003.safetensors"),
    ("bad_config_json", "not readable JSON"),
    ("bad_index_json", "not readable JSON"),
    ("truncated_weights", "cannot be read as safetensors"),
    ("config_without_model", "no 'model' section"),
    ("file_not_folder", "not a folder"),
])
def test_incomplete_folders_raise_helpful_errors(tmp_path, case, expect):
    folder = tmp_path / "ck"
    if case == "no_folder":
        pass
    elif case == "file_not_folder":
        folder.write_text("x")
    else:
        _make_ck(folder, sharded=case in ("missing_shard", "bad_index_json"))
        if case == "no_config":
            (folder / "config.json").unlink()
        elif case == "no_weights":
            (folder / "model.safetensors").unlink()
        elif case == "missing_shard":
            (folder / "model-00002-of-00003.safetensors").unlink()
        elif case == "bad_config_json":
            (folder / "config.json").write_text("{not json")
        elif case == "bad_index_json":
            (folder / "model.safetensors.index.json").write_text("{")
        elif case == "truncated_weights":
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif case == "config_without_model":
            (folder / "config.json").write_text('{"lmforge_version": "0"}')
    with pytest.raises(CheckpointError) as info:
        # truncated weights fail their checksum first (tested below); unverified, safetensors itself refuses them
        load_model(folder, verify=case != "truncated_weights")
    message = str(info.value)
    assert expect in message
    assert str(folder) in message
    if case not in ("truncated_weights",):
        assert not is_complete(folder)


# ------------------------------------------------------------------------------------------------
# training state
# ------------------------------------------------------------------------------------------------
def _seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_optimizer_and_rng_resume_is_bit_identical(tmp_path):
    _seed_all(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        train_step(model, opt)
    folder = tmp_path / "ck"
    save_model(folder, {k: v for k, v in model.state_dict().items() if k != "head.weight"}, CONFIG)
    save_training_state(folder, opt, {"step": 3, "consumed_samples": 12, "scheduler": {"last": 2}}, RT)
    # The uninterrupted run.
    train_step(model, opt)
    expected_params = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = draws()

    # Layout on disk: flattened optimizer tensors, 0-dim step included.
    tensors = load_file(str(folder / "training_state" / "optimizer.safetensors"))
    assert "state.0.exp_avg" in tensors and "state.0.exp_avg_sq" in tensors
    assert tensors["state.0.step"].dim() == 0 and float(tensors["state.0.step"]) == 3.0
    assert (folder / "training_state" / "rng_rank0.safetensors").is_file()
    assert (folder / "training_state" / "rng_rank0.json").is_file()

    # The resumed run: another init, another RNG position.
    _seed_all(123)
    model2 = TinyNet()
    weights, config = load_model(folder)
    assert config["model"] == CONFIG
    missing, unexpected = model2.load_state_dict(weights, strict=False)
    assert missing == ["head.weight"] and not unexpected  # tied: it is emb.weight
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0, betas=(0.1, 0.2), weight_decay=0.0)
    state = load_training_state(folder, opt2, RT)
    assert state == {"step": 3, "consumed_samples": 12, "scheduler": {"last": 2}}
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.1
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    train_step(model2, opt2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_params[k]), k
    t, n, p = draws()
    assert torch.equal(t, expected_draws[0])
    assert np.array_equal(n, expected_draws[1])
    assert p == expected_draws[2]


def test_grad_scaler_round_trip(tmp_path):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=3.0, backoff_factor=0.25,
                                  growth_interval=7)
    loss = model(torch.randn(2, 4)).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    saved = scaler.state_dict()
    assert saved["_growth_tracker"] == 1
    save_training_state(tmp_path, opt, {"step": 1}, RT, scaler=scaler)
    doc = json.loads((tmp_path / "training_state" / "state.json").read_text())
    assert doc["grad_scaler"]["scale"] == 1024.0
    fresh = torch.amp.GradScaler("cpu")
    opt2 = torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=0.5)
    load_training_state(tmp_path, opt2, RT, scaler=fresh)
    assert fresh.state_dict() == saved
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])


def test_missing_rank_rng_warns_and_keeps_current_rng(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path, opt, {"step": 0}, RT)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with pytest.warns(RuntimeWarning, match="no RNG state for rank 1"):
        load_training_state(tmp_path, opt, Runtime(rank=1, world_size=2))
    assert torch.equal(torch.rand(3), expected)


def test_training_state_errors(tmp_path):
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(CheckpointError, match="training_state"):
        load_training_state(tmp_path, opt, RT)
    save_training_state(tmp_path, opt, {"step": 0}, RT)
    (tmp_path / "training_state" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="state.json"):
        load_training_state(tmp_path, opt, RT)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_training_state(tmp_path, opt, {"step": object()}, RT)
    # An optimizer over another model shape.
    big = nn.Linear(2, 2)
    opt_big = torch.optim.AdamW(big.parameters())
    big(torch.randn(1, 2)).sum().backward()
    opt_big.step()
    save_training_state(tmp_path, opt_big, {"step": 1}, RT)
    other = torch.optim.AdamW([nn.Parameter(torch.zeros(3))])
    with pytest.raises(CheckpointError, match="does not fit"):
        load_training_state(tmp_path, other, RT)


# ------------------------------------------------------------------------------------------------
# the manager
# ------------------------------------------------------------------------------------------------
def _save(manager: CheckpointManager, step: int, metrics=None, value: float | None = None):
    model = nn.Linear(3, 2)
    if value is not None:
        with torch.no_grad():
            model.weight.fill_(value)
    opt = torch.optim.AdamW(model.parameters())
    return manager.save(step, model.state_dict(), CONFIG, opt, {"step": step}, metrics=metrics)


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def test_manager_layout_and_latest(tmp_path):
    m = CheckpointManager(tmp_path, RT)
    assert m.latest() is None and m.best() is None
    path = _save(m, 100, {"val_loss": 2.0}, value=1.5)
    assert path == tmp_path / "step_0000100"
    assert (tmp_path / "latest").read_text().strip() == "step_0000100"
    for rel in ("model.safetensors", "config.json", "training_state/state.json",
                "training_state/optimizer.safetensors", "training_state/rng_rank0.safetensors"):
        assert (path / rel).is_file(), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    records = json.loads((tmp_path / "checkpoints.json").read_text())
    assert records["checkpoints"] == [{"name": "step_0000100", "step": 100, "metrics": {"val_loss": 2.0},
                                       "metric": 2.0, "last": True}]
    assert m.latest() == path and m.best() == path
    # Saving the same step again replaces the folder.
    _save(m, 100, {"val_loss": 1.0}, value=-3.0)
    assert torch.equal(load_model(path)[0]["weight"], torch.full((2, 3), -3.0))
    assert _steps(tmp_path) == [100]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mode, values, kept_after_4, kept_final, best", [
    ("min", [3.0, 1.0, 2.0, 5.0, 4.0], [2, 3, 4], [2, 3, 5], 2),
    ("max", [0.1, 0.5, 0.3, 0.05, 0.2], [2, 3, 4], [2, 3, 5], 2),
])
def test_top_k(tmp_path, mode, values, kept_after_4, kept_final, best):
    m = CheckpointManager(tmp_path, RT, monitor="score", mode=mode, save_top_k=2)
    for step, v in enumerate(values, start=1):
        _save(m, step, {"score": v})
        if step == 4:
            assert _steps(tmp_path) == kept_after_4  # the newest (and worst) one survives as last
    assert _steps(tmp_path) == kept_final
    assert m.best() == tmp_path / f"step_{best:07d}"
    assert m.latest() == tmp_path / "step_0000005"
    records = json.loads((tmp_path / "checkpoints.json").read_text())
    assert [r["step"] for r in records["checkpoints"]] == kept_final
    assert [r["last"] for r in records["checkpoints"]] == [False, False, True]


def test_top_k_special_values_and_unmonitored(tmp_path):
    m = CheckpointManager(tmp_path / "all", RT, save_top_k=-1)
    for step in range(1, 4):
        _save(m, step, {"val_loss": float(step)})
    assert _steps(tmp_path / "all") == [1, 2, 3]

    m = CheckpointManager(tmp_path / "none", RT, save_top_k=0)
    for step in range(1, 4):
        _save(m, step, {"val_loss": 1.0 / step})
    assert _steps(tmp_path / "none") == [3]

    m = CheckpointManager(tmp_path / "off", RT, save_top_k=0, save_last=False)
    assert _save(m, 1, {"val_loss": 1.0}) is None
    assert not (tmp_path / "off").exists()

    # Checkpoints without the metric are kept only while newest; they never displace the best.
    m = CheckpointManager(tmp_path / "mixed", RT, save_top_k=1)
    _save(m, 1, {"val_loss": 2.0})
    _save(m, 2)  # periodic save, no validation
    assert _steps(tmp_path / "mixed") == [1, 2]
    _save(m, 3, {"val_loss": float("nan")})
    assert _steps(tmp_path / "mixed") == [1, 3]
    _save(m, 4, {"val_loss": 3.0})
    assert _steps(tmp_path / "mixed") == [1, 4]
    _save(m, 5, {"val_loss": 1.0})
    assert _steps(tmp_path / "mixed") == [5]
    assert m.best() == m.latest() == tmp_path / "mixed" / "step_0000005"


def test_top_k_survives_a_new_manager(tmp_path):
    m = CheckpointManager(tmp_path, RT, save_top_k=1)
    _save(m, 1, {"val_loss": 1.0})
    _save(m, 2, {"val_loss": 2.0})
    (tmp_path / "checkpoints.json").unlink()  # rebuilt from the folders' state.json
    m2 = CheckpointManager(tmp_path, RT, save_top_k=1)
    assert m2.best() == tmp_path / "step_0000001"
    _save(m2, 3, {"val_loss": 3.0})
    assert _steps(tmp_path) == [1, 3]


def test_latest_fallback_and_stale_temporaries(tmp_path):
    m = CheckpointManager(tmp_path, RT, save_top_k=-1)
    for step in (1, 2, 3):
        _save(m, step, {"val_loss": 1.0})
    (tmp_path / "latest").unlink()
    assert m.latest() == tmp_path / "step_0000003"
    (tmp_path / "latest").write_text("step_0000003\n")
    (tmp_path / "step_0000003" / "config.json").unlink()  # damaged
    assert m.latest() == tmp_path / "step_0000002"
    (tmp_path / "latest").write_text("../elsewhere\n")
    assert m.latest() == tmp_path / "step_0000002"
    # A temporary of a killed save is never a checkpoint, and a new manager removes it.
    stale = tmp_path / ".step_0000009.tmp"
    _make_ck(stale)
    (stale / "training_state").mkdir()
    (stale / "training_state" / "state.json").write_text("{}")
    assert m.latest() == tmp_path / "step_0000002"
    # A read-only manager (inference while a run may be saving) leaves temporaries alone.
    CheckpointManager(tmp_path, RT, cleanup=False)
    assert stale.is_dir()
    # A folder caught mid-replacement (old moved aside, new not yet in place) is put back.
    (tmp_path / "step_0000002").rename(tmp_path / ".step_0000002.old")
    CheckpointManager(tmp_path, RT)
    assert not stale.exists() and not (tmp_path / ".step_0000002.old").exists()
    assert m.latest() == tmp_path / "step_0000002"


class Killed(BaseException):
    """Stands in for SIGKILL: no handler of ours runs."""


@pytest.mark.parametrize("how", ["error", "kill"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, how):
    m = CheckpointManager(tmp_path, RT)
    _save(m, 1, {"val_loss": 1.0}, value=7.0)
    real_save_file = ckpt.save_file

    def failing_save_file(tensors, filename, metadata=None):
        if "optimizer" in str(filename):
            raise OSError("No space left on device") if how == "error" else Killed()
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(CheckpointError if how == "error" else Killed) as info:
        _save(m, 2, {"val_loss": 0.5}, value=8.0)
    if how == "error":  # disk full: one line naming the folder, the cause and the checkpoint that survived
        message = str(info.value)
        assert "\n" not in message and "No space left on device" in message
        assert str(tmp_path / "step_0000002") in message and f"{tmp_path / 'step_0000001'} is intact" in message
    monkeypatch.undo()
    assert m.latest() == tmp_path / "step_0000001"
    assert (tmp_path / "latest").read_text().strip() == "step_0000001"
    assert _steps(tmp_path) == [1]
    assert m.best() == tmp_path / "step_0000001"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == ([] if how == "error" else [".step_0000002.tmp"])
    # The next run starts clean and resumes from step 1.
    m2 = CheckpointManager(tmp_path, RT)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert torch.equal(load_model(m2.latest())[0]["weight"], torch.full((2, 3), 7.0))
    assert _save(m2, 2, {"val_loss": 0.5}) == tmp_path / "step_0000002"
    assert m2.latest() == tmp_path / "step_0000002"


# ------------------------------------------------------------------------------------------------
# two ranks (gloo)
# ------------------------------------------------------------------------------------------------
def _two_rank_worker(rank: int, world_size: int, init_file: str, root: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rt = Runtime(rank=rank, world_size=world_size)
        torch.manual_seed(100 + rank)
        model = nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters())
        m = CheckpointManager(root, rt)
        path = m.save(5, model.state_dict(), CONFIG, opt, {"step": 5}, metrics={"val_loss": 1.0})
        expected = torch.rand(4)
        torch.manual_seed(0)
        load_training_state(path, opt, rt)
        got = torch.rand(4)
        assert torch.equal(got, expected), f"rank {rank} RNG not restored"
        assert m.latest() == path
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_save_one_folder_with_per_rank_rng(tmp_path):
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ck")), nprocs=2, join=True)
    folder = tmp_path / "ck" / "step_0000005"
    assert is_complete(folder)
    rng0 = load_file(str(folder / "training_state" / "rng_rank0.safetensors"))["torch_cpu"]
    rng1 = load_file(str(folder / "training_state" / "rng_rank1.safetensors"))["torch_cpu"]
    assert not torch.equal(rng0, rng1)
    assert json.loads((folder / "training_state" / "state.json").read_text())["world_size"] == 2
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]
