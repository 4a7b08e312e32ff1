"""trainer.max_time acts (NeMo/Lightning's time limit: stop after saving), and a run that stops before its last
step, by the time limit or by SIGTERM/SIGUSR1, prints one line saying how to resume: the same command again."""

from __future__ import annotations

import json
import os
import signal

import pytest

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.config.schema import max_time_seconds
from lmforge.errors import ConfigError
from lmforge.train import loop
from lmforge.train.pretrain import run
from tests.conftest import tiny_overrides


def test_max_time_values():
    assert max_time_seconds(None) is None
    assert max_time_seconds("00:00:01:30") == 90
    assert max_time_seconds("01:02:00:05") == 86400 + 7200 + 5
    assert max_time_seconds({"hours": 1, "minutes": 30}) == 5400
    for bad in ("90", "1:30", "00:00:00:00", {"weeks": 1}, 12, "aa:00:00:01"):
        with pytest.raises(ConfigError, match="trainer.max_time"):
            max_time_seconds(bad)


def test_bad_max_time_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"trainer.max_time='1:30'.*DD:HH:MM:SS"):
        load_config("tiny/llama", ["trainer.max_time='1:30'"])


def test_max_time_stops_after_saving_and_the_same_command_resumes(tiny_corpus, tmp_path, monkeypatch, capsys):
    """A clock that advances one second per reading: 5 s of trainer.max_time end the run at step 5 of 12."""
    clock = iter(range(10**6))
    monkeypatch.setattr(loop, "_now", lambda: float(next(clock)))
    args = ["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, tmp_path, **{"trainer.max_steps": 12,
                                                                             "trainer.max_time": "00:00:00:05"})]
    assert main(args) == 75  # stopped to be resumed, as after SIGUSR1
    out = capsys.readouterr().out
    notes = [l for l in out.splitlines() if l.startswith("stopped at step")]
    assert notes == [f"stopped at step 5 of 12 (trainer.max_time reached), saved in "
                     f"{tmp_path / 'checkpoints' / 'step_0000005'}: to resume, run the same command again"]
    assert (tmp_path / "checkpoints" / "step_0000005").is_dir()
    assert '"time_limit_reached": true' in out

    monkeypatch.setattr(loop, "_now", lambda: 0.0)  # the same command, on a machine that is fast now
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stopped at step" not in out and '"steps": 12' in out and "step_0000005" in out  # resumed_from


def test_signal_stop_says_how_to_resume(tiny_corpus, tmp_path, monkeypatch):
    """SIGUSR1 during step 3: saved at step 3, one line; with resuming turned off the line names the override."""
    real = loop.Trainer.train_step

    def step_then_signal(self, batches, step):
        result = real(self, batches, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_signal)
    lines = []
    cfg = load_config("tiny/llama", tiny_overrides(tiny_corpus, tmp_path, **{"exp_manager.resume_if_exists": "false"}))
    summary = run(cfg, console_log=lambda *a: lines.append(" ".join(map(str, a))))
    assert summary["stopped_early"] and summary["steps"] == 3
    notes = [l for l in lines if l.startswith("stopped at step")]
    assert notes == [f"stopped at step 3 of 8 (a stop signal (SIGTERM/SIGUSR1)), saved in "
                     f"{tmp_path / 'checkpoints' / 'step_0000003'}: to resume, run the same command again with "
                     f"exp_manager.resume_if_exists=true"]


def test_a_stopped_torchrun_run_writes_its_summary_before_any_rank_exits(tiny_corpus, tmp_path):
    """Two ranks stopped by a signal (tests/train/stop_slow_rank0.py: before step 1, rank 0 then slow to draw its
    loss curve) both exit 75; rank 1 must not exit before rank 0 has written summary.json, or torchrun's agent,
    which takes its non-zero exit for a failure, kills rank 0 first (seen under load: a launch's SIGUSR1 test
    left no summary)."""
    from pathlib import Path

    from tests.conftest import run_torchrun

    out = tmp_path / "run"
    p = run_torchrun(Path(__file__).with_name("stop_slow_rank0.py"), "pretrain", "tiny/llama",
                     *tiny_overrides(tiny_corpus, out), "trainer.devices=2", check=False,
                     env={"LMFORGE_TEST_RANK0_DELAY": "1"})  # torchrun looks every 0.1 s
    assert p.returncode != 0  # torchrun reports the workers' 75 as a failure
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    assert summary is not None, "no summary.json:\n" + (p.stdout + p.stderr)[-3000:]
    assert summary["stopped_early"] and summary["world_size"] == 2 and summary["steps"] == 1
    assert (out / "loss_curve.png").is_file() and (out / "checkpoints" / "step_0000001").is_dir()
