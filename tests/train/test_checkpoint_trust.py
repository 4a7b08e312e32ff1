"""Checkpoints that cannot lie: checksums and finite weights at load, a resume that refuses a changed run, one
training per folder, interrupted retention finished at start, durable writes, umask permissions, disk full."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from lmforge import io as lio
from lmforge.errors import CheckpointError
from lmforge.parallel.runtime import Runtime
from lmforge.train import checkpoint as ckpt
from lmforge.train.checkpoint import CheckpointManager, load_model, save_model

RT = Runtime()
CONFIG = {"hidden_size": 8, "num_layers": 2, "vocab_size": 16}
SRC = str(Path(ckpt.__file__).resolve().parents[2])  # the lmforge under test, for subprocesses


def _weights(value: float = 1.0) -> dict:
    return {"a.weight": torch.full((4, 3), value), "b.weight": torch.arange(6, dtype=torch.float32)}


def _save(m: CheckpointManager, step: int, metrics: dict, value: float = 1.0):
    return m.save(step, _weights(value), CONFIG, None, {"step": step}, metrics=metrics)


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def _recorded(root: Path) -> list[str]:
    return [r["name"] for r in json.loads((root / "checkpoints.json").read_text())["checkpoints"]]


def _flip_byte(path: Path, offset_from_end: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------
# item 3: checksums and finite weights
# ------------------------------------------------------------------------------------------------
def test_flipped_bit_is_refused_by_its_checksum_and_no_verify_loads_it(tmp_path, monkeypatch):
    folder = save_model(tmp_path / "ck", _weights(), CONFIG)
    doc = json.loads((folder / "config.json").read_text())
    assert doc["sha256"] == {"model.safetensors": ckpt.file_sha256(folder / "model.safetensors")}
    _flip_byte(folder / "model.safetensors")  # a data byte: safetensors itself reads it without complaint
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(folder / "model.safetensors") in message and "sha256" in message and "\n" not in message
    monkeypatch.setenv("LMFORGE_NO_VERIFY", "1")  # the documented escape acts
    weights, _ = load_model(folder)
    assert not torch.equal(weights["b.weight"], _weights()["b.weight"])


def test_sharded_weights_are_checked_file_by_file(tmp_path):
    folder = save_model(tmp_path / "ck", _weights(), CONFIG, max_shard_bytes=40)
    recorded = json.loads((folder / "config.json").read_text())["sha256"]
    assert sorted(recorded) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    _flip_byte(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is damaged"):
        load_model(folder)


def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path):
    weights = _weights()
    weights["b.weight"][2] = float("nan")
    folder = save_model(tmp_path / "ck", weights, CONFIG)  # checksums match: the NaN was saved as it is
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    assert "'b.weight'" in str(info.value) and str(folder / "model.safetensors") in str(info.value)
    assert load_model(folder, verify=False)[0]["b.weight"].isnan().sum() == 1


def test_manager_records_checksums_of_weights_written_by_others(tmp_path):
    """Sharded and asynchronous saves write config.json before or beside their weights: the manager seals them."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> list:
        save_file(_weights(), str(tmp / "model.safetensors"))
        ckpt.write_model_config(tmp, CONFIG)  # no checksums known yet
        ckpt.save_training_state(tmp, None, {"step": 1}, RT)
        return []

    m = CheckpointManager(tmp_path, RT)
    folder = m.save(1, None, CONFIG, None, {"step": 1}, write_fn=write)
    doc = json.loads((folder / "config.json").read_text())
    assert doc["sha256"] == {"model.safetensors": ckpt.file_sha256(folder / "model.safetensors")}
    _flip_byte(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(folder)


def test_generate_and_serve_path_refuses_a_damaged_checkpoint(tiny_corpus, tmp_path):
    """load_for_inference (generate, evaluate, serve) reads through load_model: the damage is one error."""
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.models import ModelConfig, Transformer
    from lmforge.open import load_for_inference

    cfg = ModelConfig(vocab_size=512, hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32,
                      max_position_embeddings=32)
    model = Transformer(cfg)
    folder = save_model(tmp_path / "ck", model.state_dict(), cfg.to_dict(),
                        tokenizer=load_tokenizer(tiny_corpus["tokenizer"]))
    load_for_inference(folder, device="cpu")  # whole: loads
    _flip_byte(folder / "model.safetensors", offset_from_end=10)
    with pytest.raises(CheckpointError, match="is damaged: its sha256"):
        load_for_inference(folder, device="cpu")


# ------------------------------------------------------------------------------------------------
# item 2: resume refuses a changed run
# ------------------------------------------------------------------------------------------------
def _pretrain(corpus, out, **extra):
    from lmforge.config import load_config
    from lmforge.train.pretrain import run
    from tests.conftest import tiny_overrides

    base = {"trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.limit_test_batches": 0,
            "trainer.limit_val_batches": 1}
    base.update(extra)
    return run(load_config("tiny/llama", tiny_overrides(corpus, out, **base)), console_log=lambda *a: None)


@pytest.mark.parametrize("key,new,expect", [
    ("model.global_batch_size", 16, "model.global_batch_size: 8 -> 16"),
    ("model.seed", 7, "model.seed: 1234 -> 7"),
    ("model.data.splits_string", "80,10,10", 'model.data.splits_string: "90,5,5" -> "80,10,10"'),
])
def test_resume_with_a_changed_data_order_is_refused(tiny_corpus, tmp_path, key, new, expect):
    out = tmp_path / "run"
    _pretrain(tiny_corpus, out)
    with pytest.raises(CheckpointError) as info:
        _pretrain(tiny_corpus, out, **{"trainer.max_steps": 4, key: new})
    message = str(info.value)
    assert expect in message and "step_0000002" in message and "new run folder" in message
    assert _steps(out / "checkpoints") == [2]  # nothing trained, nothing written
    # the same data order resumes (a longer run is no change)
    summary = _pretrain(tiny_corpus, out, **{"trainer.max_steps": 4})
    assert summary["resumed_from"].endswith("step_0000002") and summary["steps"] == 4


def test_resume_changes_names_tokenizer_and_data_blend_and_finetune_keys():
    saved = {"model": {"global_batch_size": 8, "seed": 1, "tokenizer": {"library": "huggingface", "model": "tok_a"},
                       "data": {"data_prefix": [1.0, "a_text_document"], "seq_length": 32}}}
    current = json.loads(json.dumps(saved))
    current["model"]["tokenizer"]["model"] = "tok_b"
    current["model"]["data"]["data_prefix"] = [0.5, "a_text_document", 0.5, "b_text_document"]
    changes, fresh = ckpt.resume_changes(saved, current)
    assert changes == ['model.data.data_prefix: [1.0, "a_text_document"] -> '
                       '[0.5, "a_text_document", 0.5, "b_text_document"]',
                       'model.tokenizer.model: "tok_a" -> "tok_b"']
    assert "exp_manager" in fresh
    changes, fresh = ckpt.resume_changes({"model": "base", "data": "a.jsonl", "global_batch_size": 8, "seed": 1},
                                         {"model": "base", "data": "b.jsonl", "global_batch_size": 8, "seed": 1})
    assert changes == ['data: "a.jsonl" -> "b.jsonl"'] and "out=" in fresh


def test_resume_with_another_tokenizer_at_the_same_path_is_refused(tmp_path):
    """The config names the same tokenizer folder, but it was trained again on other text: ids mean other tokens."""
    from lmforge.data.tokenizers import load_tokenizer, train_bpe

    texts = {"a": ["the cat sat on the mat"] * 50, "b": ["zebras quietly jump over foxes"] * 50}
    toks = {}
    for name, lines in texts.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines))
        toks[name] = train_bpe([tmp_path / f"{name}.txt"], 300, tmp_path / f"tok_{name}")
    m = CheckpointManager(tmp_path / "run", RT)
    folder = m.save(1, _weights(), CONFIG, None, {"step": 1, "config": {"model": {"seed": 1}}}, tokenizer=toks["a"])
    run_config = {"model": {"seed": 1}}
    ckpt.check_resumable(folder, run_config, load_tokenizer(tmp_path / "tok_a"))  # the same tokenizer: resumes
    with pytest.raises(CheckpointError) as info:
        ckpt.check_resumable(folder, run_config, toks["b"])
    assert "tokenizer: the checkpoint's tokenizer differs from this run's" in str(info.value)
    assert "new run folder" in str(info.value)


# ------------------------------------------------------------------------------------------------
# item 9: interrupted save or retention
# ------------------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL: no handler of ours runs."""


def test_kill_inside_retention_is_finished_at_the_next_start(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, RT, save_top_k=1)
    _save(m, 1, {"val_loss": 2.0})
    _save(m, 2, {"val_loss": 3.0})  # kept: step 1 (best) and step 2 (newest)
    real_rmtree = ckpt.shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        if Path(path).name.startswith("step_"):  # the kill lands half way through deleting a checkpoint
            (Path(path) / "model.safetensors").unlink()
            raise Killed()
        return real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        _save(m, 3, {"val_loss": 1.0})  # best and newest: retention drops steps 1 and 2
    monkeypatch.undo()
    assert _steps(tmp_path) == [1, 2, 3] and _recorded(tmp_path) == ["step_0000003"]
    m2 = CheckpointManager(tmp_path, RT, save_top_k=1)
    assert _steps(tmp_path) == [3] and _recorded(tmp_path) == ["step_0000003"]
    assert m2.best() == m2.latest() == tmp_path / "step_0000003"


def test_checkpoint_published_but_not_recorded_is_recorded_at_start(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, RT, save_top_k=2)
    _save(m, 1, {"val_loss": 2.0})
    monkeypatch.setattr(CheckpointManager, "_retain", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        _save(m, 2, {"val_loss": 1.0})
    monkeypatch.undo()
    assert _recorded(tmp_path) == ["step_0000001"]
    assert m.best() == tmp_path / "step_0000001"  # the better step 2 is invisible to best-checkpoint lookup
    (tmp_path / ".checkpoints.json.tmp-x1y2").mkdir()  # a temporary of the manager's atomic write
    (tmp_path / "notes.txt").write_text("mine")  # not the manager's: left alone
    m2 = CheckpointManager(tmp_path, RT, save_top_k=2)
    assert _recorded(tmp_path) == ["step_0000001", "step_0000002"]
    assert m2.best() == m2.latest() == tmp_path / "step_0000002"
    assert not (tmp_path / ".checkpoints.json.tmp-x1y2").exists() and (tmp_path / "notes.txt").is_file()


def test_unlisted_incomplete_folder_is_removed_and_listed_ones_are_kept(tmp_path):
    m = CheckpointManager(tmp_path, RT, save_top_k=-1)
    _save(m, 1, {"val_loss": 2.0})
    _save(m, 2, {"val_loss": 1.0})
    (tmp_path / "checkpoints.json").unlink()
    (tmp_path / "step_0000002" / "model.safetensors").unlink()  # half deleted, no record left
    m2 = CheckpointManager(tmp_path, RT, save_top_k=-1)
    assert _steps(tmp_path) == [1] and _recorded(tmp_path) == ["step_0000001"]
    assert m2.latest() == tmp_path / "step_0000001"
    assert (tmp_path / "latest").read_text().strip() == "step_0000001"


# ------------------------------------------------------------------------------------------------
# item 10: one training per folder
# ------------------------------------------------------------------------------------------------
def _lock_of(pid: int, host: str | None = None) -> str:
    return json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": ckpt._process_start(pid),
                       "token": "other"})


def test_a_live_training_holds_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.joinpath("lmforge.lock").write_text(_lock_of(holder.pid))
        with pytest.raises(CheckpointError) as info:
            CheckpointManager(tmp_path, RT)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and str(tmp_path) in message
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_of_another_host_is_refused(tmp_path):
    tmp_path.joinpath("lmforge.lock").write_text(_lock_of(1, host="node-elsewhere-17"))
    with pytest.raises(CheckpointError, match="pid 1 on host node-elsewhere-17"):
        CheckpointManager(tmp_path, RT)


def test_a_killed_runs_lock_is_taken_over_with_a_message(tmp_path):
    code = ("import os, signal, sys; sys.path.insert(0, %r)\n"
            "from lmforge.parallel.runtime import Runtime\n"
            "from lmforge.train.checkpoint import CheckpointManager\n"
            "m = CheckpointManager(%r, Runtime())\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n") % (SRC, str(tmp_path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    stale = json.loads((tmp_path / "lmforge.lock").read_text())  # left behind by the killed process
    assert stale["pid"] != os.getpid() and stale["host"] == socket.gethostname()
    result = subprocess.run([sys.executable, "-c", code.replace("os.kill(os.getpid(), signal.SIGKILL)\n",
                                                                "m.close()\n")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"its owner (pid {stale['pid']} on {socket.gethostname()}) is no longer running" in result.stderr
    assert not (tmp_path / "lmforge.lock").exists()  # released at the end


def test_lock_is_released_and_taken_again(tmp_path):
    m = CheckpointManager(tmp_path, RT)
    assert json.loads((tmp_path / "lmforge.lock").read_text())["pid"] == os.getpid()
    m.close()
    assert not (tmp_path / "lmforge.lock").exists()
    CheckpointManager(tmp_path, RT, cleanup=False)  # a reader takes no lock
    assert not (tmp_path / "lmforge.lock").exists()


def test_unwritable_checkpoint_folder_is_found_before_step_1(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="is not writable"):
        CheckpointManager(tmp_path / "afile" / "checkpoints", RT)


# ------------------------------------------------------------------------------------------------
# item 13 and the rest: durable writes, umask, disk full
# ------------------------------------------------------------------------------------------------
def test_atomic_writes_fsync_file_and_folder_before_publishing(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(lio.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                    real_fsync(fd))[1])
    monkeypatch.setattr(lio.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "out.json"
    lio.write_json_atomic(target, {"a": 1})
    replace_at = events.index(("replace", str(target)))
    synced_before = [path for kind, path in events[:replace_at] if kind == "fsync"]
    assert any(p.endswith("/out.json") and ".tmp-" in p for p in synced_before)  # the data, before the rename
    assert ("fsync", str(tmp_path)) in events[replace_at:]  # the new name, after it


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_weights_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        folder = save_model(tmp_path / "ck", _weights(), CONFIG, max_shard_bytes=40)
        m = CheckpointManager(tmp_path / "run", RT)
        step = _save(m, 1, {"val_loss": 1.0})
    finally:
        os.umask(old)
    files = [p for p in [*folder.iterdir(), *step.rglob("*")] if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


def test_disk_full_during_save_is_one_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, RT)
    _save(m, 1, {"val_loss": 1.0}, value=7.0)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError) as info:
        _save(m, 2, {"val_loss": 0.5}, value=8.0)
    message = str(info.value)
    assert message.startswith(f"could not write checkpoint {tmp_path / 'step_0000002'}: No space left on device")
    assert "\n" not in message and f"{tmp_path / 'step_0000001'} is intact" in message
    monkeypatch.undo()
    assert _steps(tmp_path) == [1] and m.latest() == tmp_path / "step_0000001"
    assert torch.equal(load_model(m.latest())[0]["a.weight"], torch.full((4, 3), 7.0))


def test_disk_full_while_listing_a_written_checkpoint_warns_and_the_next_start_lists_it(tmp_path, monkeypatch, capsys):
    m = CheckpointManager(tmp_path, RT)
    _save(m, 1, {"val_loss": 1.0})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CheckpointManager, "_write_records", full)  # checkpoints.json cannot be rewritten
    assert _save(m, 2, {"val_loss": 0.5}) == tmp_path / "step_0000002"  # training goes on
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "No space left on device" in err
    assert _recorded(tmp_path) == ["step_0000001"]
    m2 = CheckpointManager(tmp_path, RT)
    assert _recorded(tmp_path) == ["step_0000001", "step_0000002"] and m2.best() == tmp_path / "step_0000002"


def test_a_save_that_cannot_start_is_one_error(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path / "run", RT)
    real_mkdir = Path.mkdir

    def full(self, *a, **k):
        if self.name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(CheckpointError, match="could not start writing checkpoint .*No space left on device"):
        _save(m, 1, {"val_loss": 1.0})
