"""A fine-tuning run stopped by SIGTERM saves and prints one line saying how to resume: the same command again."""

from __future__ import annotations

import os
import signal

from lmforge.cli import main
from lmforge.train import loop


def test_sigterm_stop_says_run_the_same_command_again(tmp_path, base_model_dir, task_files, monkeypatch, capsys):
    real = loop.Trainer.train_step

    def step_then_signal(self, batches, step):
        result = real(self, batches, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_signal)
    train, val = task_files
    args = ["finetune", "--model", base_model_dir, "--data", train, "--val-data", val, "--out", str(tmp_path),
            "--method", "lora", "seq_length=32", "trainer.max_steps=6", "trainer.accelerator=cpu",
            "trainer.val_check_interval=0", "generation.num_samples=0"]
    assert main(args) == 75
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("stopped at step")]
    assert lines == [f"stopped at step 2 of 6 (a stop signal (SIGTERM/SIGUSR1)), saved in "
                     f"{tmp_path / 'checkpoints' / 'step_0000002'}: to resume, run the same command again"]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn up to the stop

    monkeypatch.setattr(loop.Trainer, "train_step", real)
    assert main(args) == 0  # the same command resumes and finishes
    out = capsys.readouterr().out
    assert "stopped at step" not in out and '"steps": 6' in out and "step_0000002" in out
