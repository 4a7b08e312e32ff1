"""Fine-tuning on several processes and in every precision: two torchrun ranks give the losses of one
process with the same global batch; bf16-mixed, 16-mixed and gradient checkpointing train."""

from __future__ import annotations

import json

import pytest

from lmforge.finetune import run
from tests.conftest import assert_run_plots, run_cases
from tests.finetune.test_finetune_stage import config


def _finetune_here(args) -> None:
    """``lmforge finetune ARGS`` in this process: the one-process reference (no interpreter to start)."""
    from lmforge.cli import main

    assert main(["finetune", *args]) == 0


def _lora_common(base_model_dir, task_files) -> list[str]:
    train, val = task_files
    return ["--model", base_model_dir, "--data", train, "--val-data", val, "--method", "lora",
            "seq_length=32", "micro_batch_size=2", "global_batch_size=8", "trainer.max_steps=5",
            "trainer.accelerator=cpu", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "generation.num_samples=2", "generation.max_new_tokens=2", "optim.lr=0.02", "sft.pack=true"]


def _full_common(base_model_dir, task_files) -> list[str]:
    train, val = task_files
    return ["--model", base_model_dir, "--data", train, "--val-data", val, "--method", "full",
            "seq_length=32", "micro_batch_size=2", "global_batch_size=4", "trainer.max_steps=4",
            "trainer.accelerator=cpu", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "generation.num_samples=0", "optim.lr=0.001", "sft.pack=true"]


TP2 = ["trainer.devices=2", "tensor_model_parallel_size=2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, base_model_dir, task_files) -> dict:
    """``name -> (CaseRun, out folder)`` of this file's 2-rank fine-tuning runs, one after the other in ONE torchrun
    launch (tests/run_cases.py): LoRA on 2 data-parallel ranks ("lora"), full fine-tuning on tensor parallel 2
    ("tp") and with sequence parallelism ("tp_sp")."""
    root = tmp_path_factory.mktemp("ft_two_ranks")
    args = {"lora": [*_lora_common(base_model_dir, task_files), "trainer.devices=2"],
            "tp": [*_full_common(base_model_dir, task_files), *TP2],
            "tp_sp": [*_full_common(base_model_dir, task_files), *TP2, "sequence_parallel=true"]}
    runs = run_cases([{"name": name, "args": ["finetune", "--out", str(root / name), *a]} for name, a in args.items()],
                     2, root / "launch")
    return {name: (runs[name], root / name) for name in args}


def test_two_ranks_match_one_process(tmp_path, base_model_dir, task_files, two_ranks):
    _finetune_here(["--out", str(tmp_path / "one")] + _lora_common(base_model_dir, task_files) + ["trainer.devices=1"])
    run, two_dir = two_ranks["lora"]
    run.ok()
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((two_dir / "summary.json").read_text())
    assert [s for s, _ in one["losses"]] == [s for s, _ in two["losses"]] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert two["best_metrics"]["val_loss"] == pytest.approx(one["best_metrics"]["val_loss"], rel=1e-5)
    assert_run_plots(two_dir)  # rank 0 alone writes the TensorBoard events and the loss curve
    # the trained tokens, summed over the ranks on the device and read at the logging steps, are one process's
    trained = [json.loads((d / "checkpoints" / "step_0000005" / "training_state" / "state.json")
                          .read_text())["state"]["tokens_trained"] for d in (tmp_path / "one", two_dir)]
    assert trained[0] == trained[1] > 5 * 8, trained


@pytest.mark.parametrize("precision,checkpointing", [("bf16-mixed", False), ("16-mixed", True), ("32", True)])
def test_precisions_and_gradient_checkpointing_train(tmp_path, base_model_dir, task_files, precision, checkpointing):
    cfg = config(base_model_dir, *task_files, tmp_path / "run", "lora", steps=12, **{
        "optim.lr": 2e-2, "peft.lora.target_modules": "[all-linear]", "trainer.precision": precision,
        "gradient_checkpointing": str(checkpointing).lower()})
    summary = run(cfg, console_log=lambda *a: None)
    losses = [l for _, l in summary["losses"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_tensor_parallel_full_finetuning_matches_one_process(tmp_path, base_model_dir, task_files, two_ranks):
    """tensor_model_parallel_size=2 (and with sequence_parallel=true), packed SFT batches with a loss mask: the
    losses and the validation loss of one process."""
    _finetune_here(["--out", str(tmp_path / "one")] + _full_common(base_model_dir, task_files) + ["trainer.devices=1"])
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    for name in ("tp", "tp_sp"):
        run, out = two_ranks[name]
        run.ok()
        two = json.loads((out / "summary.json").read_text())
        assert [s for s, _ in two["losses"]] == [1, 2, 3, 4]
        for (_, a), (_, b) in zip(one["losses"], two["losses"]):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert two["best_metrics"]["val_loss"] == pytest.approx(one["best_metrics"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--method", "lora", "tensor_model_parallel_size=2"], "PEFT under tensor parallelism is not supported yet"),
    (["--method", "full", "tensor_model_parallel_size=2", "generation.num_samples=2"],
     "set generation.num_samples=0"),
    (["--method", "full", "sequence_parallel=true"], "set tensor_model_parallel_size above 1"),
])
def test_tensor_parallel_finetuning_refusals(tmp_path, capsys, base_model_dir, task_files, extra, message):
    from lmforge.cli import main

    train, val = task_files
    capsys.readouterr()
    code = main(["finetune", "--model", base_model_dir, "--data", train, "--val-data", val,
                 "--out", str(tmp_path / "bad"), "trainer.devices=2", "trainer.accelerator=cpu", *extra])
    err = capsys.readouterr().err  # (an exception other than the one-line errors would fail the test here)
    assert code == 2 and message in err, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "bad").exists()
