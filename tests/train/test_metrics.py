"""MetricsLogger (JSONL, TensorBoard, progress), read_metrics and plot_loss_curve."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch
from rich.console import Console

from lmforge.errors import DataError
from lmforge.parallel.runtime import Runtime
from lmforge.train.metrics import (MetricsLogger, format_progress_line, plot_loss_curve, read_metrics,
                                   save_loss_curve)

RT = Runtime()


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def test_jsonl_lines_and_tensorboard_events(tmp_path):
    console, _ = plain_console()
    with MetricsLogger(tmp_path, RT, total_steps=3, console=console) as log:
        log.log(1, {"loss": 4.5, "lr": torch.tensor(3e-4), "grad_norm": None})
        log.log(2, {"loss": 4.0, "val_loss": float("nan")})
        log.log_text("sample", "def f(x): return x", 2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss"] == 4.5 and first["grad_norm"] is None
    assert first["lr"] == pytest.approx(3e-4)
    assert isinstance(first["time"], float)
    assert json.loads(lines[1])["val_loss"] is None  # strict JSON: no NaN
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]


def test_tensorboard_off_and_append_after_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a run killed mid-write
    console, _ = plain_console()
    with MetricsLogger(tmp_path, RT, total_steps=5, tensorboard=False, console=console) as log:
        log.log(2, {"loss": 1.5})
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    with pytest.warns(RuntimeWarning, match="skipped 1 malformed line"):
        records = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.5)]


def test_non_terminal_progress_prints_plain_lines(tmp_path):
    console, buf = plain_console()
    assert not console.is_terminal
    with MetricsLogger(tmp_path, RT, total_steps=12, tensorboard=False, console=console, every_n_steps=5) as log:
        for step in range(1, 13):
            log.update(step, loss=5.0 / step, lr=3e-4, rate=12345.6)
    lines = [line for line in buf.getvalue().splitlines() if line.startswith("step")]
    assert [line.split(" |")[0] for line in lines] == ["step 5/12", "step 10/12", "step 12/12"]
    pattern = r"^step 10/12 \| loss 0\.500 \| lr 3\.0e-04 \| 12,346 tok/s \| eta \d+:\d\d:\d\d$"
    assert re.match(pattern, lines[1]), lines[1]
    assert "\x1b[" not in buf.getvalue()  # no terminal control codes in a log file


def test_format_progress_line():
    line = format_progress_line(10, 100, loss=5.1234, lr=3e-4, rate=12345, eta_s=80)
    assert line == "step 10/100 | loss 5.123 | lr 3.0e-04 | 12,345 tok/s | eta 0:01:20"
    assert format_progress_line(1, 100) == "step 1/100 | eta ?"
    # a stage that counts something else (what its objective's count() counts) shows that unit
    for unit in ("examples", "pairs", "labels", "completions"):
        line = format_progress_line(10, 100, loss=0.5, rate=45.2, eta_s=80, unit=unit)
        assert line == f"step 10/100 | loss 0.500 | 45 {unit}/s | eta 0:01:20"


def test_terminal_progress_bar_draws(tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160)
    with MetricsLogger(tmp_path, RT, total_steps=4, tensorboard=False, console=console) as log:
        for step in range(1, 5):
            log.update(step, loss=1.0, lr=1e-3, rate=100.0)
    out = buf.getvalue()
    assert "4/4" in out and "loss 1.000" in out and "100 tok/s" in out
    buf = io.StringIO()
    with MetricsLogger(tmp_path / "pairs", RT, total_steps=2, tensorboard=False,
                       console=Console(file=buf, force_terminal=True, width=160)) as log:
        log.update(1, loss=1.0, lr=1e-3, rate=7.0, unit="pairs")
    assert "7 pairs/s" in buf.getvalue() and "tok/s" not in buf.getvalue()


def test_wandb_without_credentials_warns_once_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    console, buf = plain_console()
    with MetricsLogger(tmp_path / "run", RT, total_steps=2, tensorboard=False, console=console,
                       wandb={"project": "x"}) as log:
        log.log(1, {"loss": 1.0})
        log.log(2, {"loss": 0.5})
    assert buf.getvalue().count("W&B logging is off") == 1
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_non_main_rank_writes_nothing(tmp_path):
    console, buf = plain_console()
    log_dir = tmp_path / "run"
    log = MetricsLogger(log_dir, Runtime(rank=1, world_size=2), total_steps=10, console=console, wandb={"project": "x"})
    with log:
        log.log(1, {"loss": 1.0})
        log.log_text("t", "hello", 1)
        log.update(1, loss=1.0, lr=1e-3, rate=10.0)
    assert not log_dir.exists()
    assert buf.getvalue() == ""


def test_plot_loss_curve_writes_png(tmp_path):
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    console, _ = plain_console()
    with MetricsLogger(tmp_path, RT, total_steps=20, tensorboard=False, console=console) as log:
        for step in range(1, 21):
            log.log(step, {"loss": 6.0 / step, "lr": 1e-3})
            if step % 5 == 0:
                log.log(step, {"val_loss": 7.0 / step})
    out = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png", title="test run")
    data = out.read_bytes()
    assert out == tmp_path / "plots" / "loss.png"
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name != "loss.png"]  # no temporaries left
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # the global backend was never touched


def test_plot_and_read_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(DataError, match="no values of loss, val_loss"):
        plot_loss_curve(path, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_save_loss_curve_main_rank_only_and_nothing_to_draw(tmp_path):
    assert save_loss_curve(tmp_path / "empty") is None  # no metrics.jsonl yet (a run stopped before step 1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert save_loss_curve(tmp_path / "run", Runtime(rank=1, world_size=2)) is None
    assert not (tmp_path / "run" / "loss_curve.png").exists()
    out = save_loss_curve(tmp_path / "run", Runtime(rank=0, world_size=2), title="finetune")
    assert out == tmp_path / "run" / "loss_curve.png" and out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
