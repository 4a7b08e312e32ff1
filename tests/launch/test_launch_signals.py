"""The local launcher under signals: SIGTERM/Ctrl-C reach the training stage, which saves and stops; a launcher
killed with -9 (or whose pid now belongs to another process) is reported as dead, never as RUNNING."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.launch.record import launcher_identity, write_record

SRC = Path(__file__).resolve().parents[2] / "src"


def _training_conf(tmp_path, h, corpus, max_steps=100_000):
    """A training-only launch whose stage runs until it is stopped (no validation or periodic save)."""
    train = h.training_body(corpus, max_steps=max_steps, val_check_interval=1_000_000, limit_test_batches=0)
    return h.write_conf(tmp_path, {"stages": ["training"], "cluster_type": "local",
                                   "base_results_dir": str(tmp_path / "r")}, {"training": train})


def _start_launcher(tmp_path, conf):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge", "launch", str(conf)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps_logged(results: Path) -> int:
    """The last step the running training wrote to its metrics.jsonl (0 before the first)."""
    steps = [0]
    for path in results.rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line).get("step", 0)))
            except ValueError:  # a line being written
                pass
    return max(steps)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _status(capsys, r) -> str:
    capsys.readouterr()
    assert main(["launch", "status", str(r)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_saves_and_stops_the_training_stage(sig, tmp_path, launch_helpers, tiny_corpus,
                                                                    capsys, monkeypatch):
    """SIGTERM (or Ctrl-C's SIGINT) to `lmforge launch` reaches the training processes: they save a checkpoint at
    the step they reached and exit; the launch exits 75, records `stopped`, and the same launch resumes there."""
    monkeypatch.chdir(tmp_path)
    conf = _training_conf(tmp_path, launch_helpers, tiny_corpus)
    r = tmp_path / "r"
    proc = _start_launcher(tmp_path, conf)
    try:
        launch_helpers.wait_for(lambda: _steps_logged(r / "tiny") >= 3, 180, "the training stage to reach step 3")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, out
    assert "run the same launch command again to resume" in out and "Traceback" not in out
    summary = json.loads((r / "tiny" / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_early"] and 3 <= stopped_at < 100_000
    assert Path(summary["checkpoint"]).name == f"step_{stopped_at:07d}"
    assert json.loads((r / "launch.json").read_text())["stages"][0]["state"] == "stopped"
    assert not (r / "tiny" / "COMPLETED").exists()
    status = _status(capsys, r)
    assert "STOPPED" in status and "RUNNING" not in status
    if sig != signal.SIGTERM:
        return
    # the same launch, a few steps further: resumes at the step it stopped at, then completes
    assert main(["launch", str(conf), f"training.trainer.max_steps={stopped_at + 2}"]) == 0
    summary = json.loads((r / "tiny" / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{stopped_at:07d}") and summary["steps"] == stopped_at + 2
    status = _status(capsys, r)
    assert "COMPLETED" in status and "STOPPED" not in status


def test_a_killed_launcher_is_not_reported_running(tmp_path, launch_helpers, tiny_corpus, capsys, monkeypatch):
    """kill -9 of the launcher: `launch status` says LAUNCHER DIED with the reason (before and after the dead
    process is reaped); the orphaned stage gets SIGTERM when its launcher dies (Linux), saves and stops, and the
    same launch resumes from there."""
    monkeypatch.chdir(tmp_path)
    conf = _training_conf(tmp_path, launch_helpers, tiny_corpus)
    r = tmp_path / "r"
    proc = _start_launcher(tmp_path, conf)
    try:
        launch_helpers.wait_for(lambda: _steps_logged(r / "tiny") >= 2, 180, "the training stage to reach step 2")
        status = _status(capsys, r)
        assert "RUNNING" in status and "LAUNCHER DIED" not in status
        proc.kill()
        launch_helpers.wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] == "Z",
                                30, "the killed launcher to exit")
        for reaped in (False, True):  # a zombie (not yet waited for), then no process at all
            status = _status(capsys, r)
            assert "LAUNCHER DIED" in status and "RUNNING" not in status, status
            assert f"launcher pid {proc.pid} on {socket.gethostname()}" in status
            assert "run the same launch command again" in status
            proc.wait()
        stage_pid = json.loads((r / "launch.json").read_text())["stages"][0]["pid"]
        launch_helpers.wait_for(lambda: not _alive(stage_pid), 120, "the orphaned stage to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    summary = json.loads((r / "tiny" / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_early"] and Path(summary["checkpoint"]).name == f"step_{stopped_at:07d}"
    assert "step 2/" in (r / "tiny" / "launch.log").read_text()  # the stage's output outlived the launcher
    assert main(["launch", str(conf), f"training.trainer.max_steps={stopped_at + 1}"]) == 0
    summary = json.loads((r / "tiny" / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{stopped_at:07d}") and summary["steps"] == stopped_at + 1


def test_status_tells_a_reused_pid_and_another_host_apart(tmp_path, capsys):
    """The launcher is recorded by host, pid and start time: a live process with that pid but another start time is
    not the launcher; a launcher on another host cannot be checked from here, so its recorded state stands."""
    r = tmp_path / "r"
    stages = [{"stage": "training", "name": "tiny", "results_dir": str(r / "tiny"), "job_id": None,
               "array_count": None, "state": "running", "pid": 1},
              {"stage": "convert", "name": "hf", "results_dir": str(r / "hf"), "job_id": None,
               "array_count": None, "state": "pending"}]
    me = launcher_identity()
    assert me["started"], "this test needs /proc"
    cases = [(me, "RUNNING", "PENDING"),
             ({**me, "started": me["started"] + "0"}, "LAUNCHER DIED", "NOT RUN"),
             ({**me, "host": "elsewhere-" + me["host"], "started": "x"}, "RUNNING", "PENDING")]
    for launcher, training, convert in cases:
        write_record(r, {"cluster_type": "local", "launcher": launcher, "stages": stages})
        out = _status(capsys, r)
        rows = [line for line in out.splitlines() if "tiny" in line or " hf " in line]
        assert training in rows[0] and convert in rows[1], out
        if training == "LAUNCHER DIED":
            assert "that pid now belongs to another process" in out


def test_sigusr1_reaches_the_workers_of_a_torchrun_stage(tmp_path, launch_helpers, tiny_corpus, capsys, monkeypatch):
    """Two processes through torchrun: SIGUSR1 to the launcher goes to the workers (not to torchrun's agent, which
    would shut them down on its own deadline); both save one checkpoint at the same step and the launch records
    `stopped`."""
    monkeypatch.chdir(tmp_path)
    train = launch_helpers.training_body(tiny_corpus, devices=2, max_steps=100_000, val_check_interval=1_000_000,
                                         limit_test_batches=0)
    train["model"]["global_batch_size"] = 8
    conf = launch_helpers.write_conf(tmp_path, {"stages": ["training"], "cluster_type": "local",
                                                "base_results_dir": str(tmp_path / "r")}, {"training": train})
    r = tmp_path / "r"
    proc = _start_launcher(tmp_path, conf)
    try:
        launch_helpers.wait_for(lambda: _steps_logged(r / "tiny") >= 2, 240, "the training stage to reach step 2")
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, out
    summary = json.loads((r / "tiny" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["world_size"] == 2
    assert Path(summary["checkpoint"]).name == f"step_{summary['steps']:07d}"
    assert json.loads((r / "launch.json").read_text())["stages"][0]["state"] == "stopped"
    assert "SIGUSR1: the stage saved a checkpoint and stopped (exit code 75)" in out  # not torchrun's 1
    assert "run the same launch command again to resume" in out
