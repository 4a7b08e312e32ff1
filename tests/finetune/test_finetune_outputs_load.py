"""A PEFT fine-tuning run's outputs open wherever a model is taken (generate, evaluate, serve): the run folder
or its adapter folder means the base model with the adapter applied; its checkpoints (adapter weights only)
and a run without a final adapter are one clear message each."""

import json
import shutil

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.open import load_for_inference
from lmforge.peft import adapter_for_inference


@pytest.fixture(scope="module")
def run(tmp_path_factory, base_model_dir, task_files):
    train, _ = task_files
    out = tmp_path_factory.mktemp("peft_run") / "run"
    assert main(["finetune", "--model", base_model_dir, "--data", train, "--method", "lora", "--out", str(out),
                 "seq_length=32", "micro_batch_size=4", "global_batch_size=4", "trainer.max_steps=3",
                 "trainer.accelerator=cpu", "optim.lr=0.05"]) == 0
    return out


def logits(model) -> torch.Tensor:
    x = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


def test_run_and_adapter_folders_load_base_plus_adapter(run, base_model_dir, tmp_path, monkeypatch, capsys):
    base, _ = load_for_inference(base_model_dir, device="cpu", dtype="float32")
    want = logits(adapter_for_inference(base, run / "adapter"))
    plain, _ = load_for_inference(base_model_dir, device="cpu", dtype="float32")
    assert (logits(plain) - want).abs().max() > 1e-4  # the adapter matters
    for path in (run, run / "adapter"):
        model, tok = load_for_inference(path, device="cpu", dtype="float32")
        assert torch.allclose(logits(model), want, atol=1e-6), path
        assert tok.vocab_size == model.cfg.vocab_size
    # the CLI: `lmforge generate RUN` == `lmforge generate BASE --adapter RUN/adapter`
    prompt = ["--prompt", "Which food is red? Answer:", "--max-new-tokens", "4", "--greedy", "--device", "cpu",
              "--dtype", "float32"]
    capsys.readouterr()
    assert main(["generate", str(run), *prompt]) == 0
    via_run = capsys.readouterr().out
    assert main(["generate", base_model_dir, "--adapter", str(run / "adapter"), *prompt]) == 0
    assert via_run == capsys.readouterr().out
    # a base model named relative to the directory training ran in is found next to the run as well
    moved = tmp_path / "moved"
    shutil.copytree(run, moved / "run")
    shutil.copytree(base_model_dir, moved / "base")
    config = json.loads((moved / "run" / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "base"
    (moved / "run" / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    model, _ = load_for_inference(moved / "run", device="cpu", dtype="float32")
    assert torch.allclose(logits(model), want, atol=1e-6)


def test_peft_checkpoints_and_unfinished_runs_are_one_clear_message(run, tmp_path, capsys):
    step = next((run / "checkpoints").glob("step_*"))
    with pytest.raises(CheckpointError, match=r"holds adapter weights only; give the run .* or its final adapter"):
        load_for_inference(step, device="cpu")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    shutil.rmtree(unfinished / "adapter")
    with pytest.raises(CheckpointError, match="has no final adapter/ yet"):
        load_for_inference(unfinished, device="cpu")
    lost = tmp_path / "lost"
    shutil.copytree(run / "adapter", lost)
    config = json.loads((lost / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "nowhere")
    (lost / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", str(lost), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "which is not found here" in err and f"BASE_MODEL --adapter {lost}" in err and "Traceback" not in err


def test_convert_of_a_peft_run_says_to_merge_first(run, tmp_path, capsys):
    for src in (run, run / "adapter", next((run / "checkpoints").glob("step_*"))):
        assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf"]) == 2
        err = capsys.readouterr().err
        assert "lmforge peft merge --model BASE --adapter" in err and "Traceback" not in err, src
        assert not (tmp_path / "out").exists()
