"""Pre-Ampere GPUs (V100, T4): bf16 defaults become fp16 (loss-scaled for training), said in one line.

No GPU here: the capability check is monkeypatched. The end-to-end test makes the CPU play a V100 (no native bf16)
and checks that a recipe's ``bf16-mixed`` run trains with the fp16 GradScaler and prints the note.
"""

from __future__ import annotations

import torch

from lmforge.parallel import runtime as rt_mod
from tests.conftest import tiny_overrides


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.version, "hip", None)


def test_capability_decides_native_bf16(monkeypatch):
    cuda = torch.device("cuda", 0)
    _fake_gpu(monkeypatch, (7, 0))
    assert not rt_mod.has_native_bf16(cuda)
    assert rt_mod.has_native_bf16(torch.device("cpu"))
    _fake_gpu(monkeypatch, (8, 0))
    assert rt_mod.has_native_bf16(cuda)
    _fake_gpu(monkeypatch, (9, 0))
    assert rt_mod.has_native_bf16(cuda)


def test_training_precision_on_v100(monkeypatch):
    cuda = torch.device("cuda", 0)
    _fake_gpu(monkeypatch, (7, 0))
    precision, note = rt_mod.training_precision("bf16-mixed", cuda)
    assert precision == "16-mixed"
    assert "\n" not in note and "V100" in note and "7.0" in note and "fp16 with loss scaling" in note
    # what the user asked for otherwise is kept, silently
    assert rt_mod.training_precision("32", cuda) == ("32", None)
    assert rt_mod.training_precision("16-mixed", cuda) == ("16-mixed", None)
    # a layout without fp16 support keeps bf16, and says why
    precision, note = rt_mod.training_precision("bf16-mixed", cuda, fp16_supported=False)
    assert precision == "bf16-mixed" and "emulated" in note
    _fake_gpu(monkeypatch, (8, 0))  # A100: bf16 stays
    assert rt_mod.training_precision("bf16-mixed", cuda) == ("bf16-mixed", None)


def test_inference_auto_dtype_on_v100(monkeypatch, capsys):
    from lmforge import open as open_mod

    cuda = torch.device("cuda", 0)
    _fake_gpu(monkeypatch, (7, 0))
    monkeypatch.setattr(open_mod, "_NOTES_SHOWN", set())
    assert open_mod.pick_dtype("auto", cuda) == torch.float16
    assert open_mod.pick_dtype("auto", cuda) == torch.float16
    err = capsys.readouterr().err
    assert err.count("no native bf16") == 1 and "float16" in err  # one line, once
    assert open_mod.pick_dtype("bfloat16", cuda) == torch.bfloat16  # asked for: kept
    assert open_mod.pick_dtype("auto", torch.device("cpu")) == torch.float32
    _fake_gpu(monkeypatch, (8, 6))
    assert open_mod.pick_dtype("auto", cuda) == torch.bfloat16


def test_bf16_recipe_trains_in_fp16_with_loss_scaling_without_native_bf16(tiny_corpus, tmp_path, monkeypatch):
    """The CPU plays a V100: the run trains in 16-mixed with a GradScaler and prints the note once."""
    from lmforge.config import load_config
    from lmforge.train import assembly
    from lmforge.train.pretrain import run

    monkeypatch.setattr(rt_mod, "has_native_bf16", lambda device: False)
    monkeypatch.setattr(rt_mod, "_gpu_name", lambda device: "Tesla V100-SXM2-32GB (compute capability 7.0)")
    built = []
    real = assembly.build_training
    monkeypatch.setattr("lmforge.train.pretrain.build_training",
                        lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    lines = []
    cfg = load_config("tiny/llama", tiny_overrides(tiny_corpus, tmp_path, **{"trainer.precision": "bf16-mixed",
                                                                             "trainer.max_steps": 2}))
    summary = run(cfg, console_log=lambda *a: lines.append(" ".join(map(str, a))))
    notes = [l for l in lines if "no native bf16" in l]
    assert len(notes) == 1 and "16-mixed" in notes[0], lines
    training = built[0]
    assert training.job.loop.precision == "16-mixed" and training.scaler is not None
    assert training.trainer.amp_dtype == torch.float16
    assert summary["steps"] == 2
