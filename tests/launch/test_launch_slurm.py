"""The Slurm executor against a real one-node Slurm (started by the slurm_cluster fixture through .ci/slurm.sh).

A two-stage pipeline whose training gets SIGUSR1 and saves, requeues itself and resumes from the checkpoint, a
failed first stage cancelling the second, a singleton pair, and a job array.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import yaml

from lmforge.cli import main
from lmforge.launch.record import stage_states

TIMEOUT = 240


def _submitted(out: str) -> list[str]:
    return re.findall(r"submitted job (\d+)", out)


def _prep_body(tiny, inputs, **run):
    return {"run": {"time_limit": "00:10:00", **run}, "corpus": None, "inputs": [str(p) for p in inputs],
            "tokenizer": {"path": str(tiny["tokenizer"]), "train": False},
            "preprocess": {"json_keys": ["text"], "append_eod": True, "workers": 1}}


def _shards(tmp_path, tiny, n):
    lines = Path(tiny["jsonl"]).read_text().splitlines()
    paths = []
    for i in range(n):
        p = tmp_path / "in" / f"shard{i}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines[i::n][:40]) + "\n")
        paths.append(p)
    return paths


def test_failed_first_stage_cancels_the_second(tmp_path, slurm_env, launch_helpers, tiny_corpus, capsys, monkeypatch):
    h = launch_helpers
    monkeypatch.chdir(tmp_path)
    path = h.write_conf(tmp_path, {"stages": ["data_preparation", "training"], "cluster_type": "slurm",
                                   "base_results_dir": str(tmp_path / "r")},
                        {"data_preparation": _prep_body(tiny_corpus, [tmp_path / "missing.jsonl"]),
                         "training": h.training_body(tiny_corpus)})
    assert main(["launch", str(path)]) == 0
    prep, training = _submitted(capsys.readouterr().out)
    h.wait_for(lambda: h.job_done(prep) and h.job_done(training), TIMEOUT, "both jobs to end")
    assert h.job_info(prep)["JobState"] == "FAILED"
    info = h.job_info(training)
    assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied"
    states = [s["state"] for s in stage_states(tmp_path / "r")]
    assert states == ["FAILED", "CANCELLED"]
    err = (tmp_path / "r" / "data_preparation" / f"slurm-{prep}.err").read_text()
    assert "missing.jsonl does not exist" in err
    assert not (tmp_path / "r" / "tiny" / "COMPLETED").exists()


def test_singleton_pair_runs_one_after_the_other(tmp_path, slurm_env, launch_helpers, tiny_corpus, capsys, monkeypatch):
    """Two launches of one stage name with ``dependency: singleton``: the second waits (PENDING, Reason Dependency)
    while the first has not ended, and starts only after the first ended.

    The first is submitted held (``cluster.sbatch_args: [--hold]``) and released once the second is seen waiting:
    a one-shard preparation runs for half a second, shorter than a poll of ``scontrol`` on a loaded machine, so
    waiting to see it RUNNING missed it there (it was COMPLETED already, and the wait ran out after 240 s)."""
    h = launch_helpers
    monkeypatch.chdir(tmp_path)
    shards = _shards(tmp_path, tiny_corpus, 1)
    jobs = []
    for name, held in (("a", True), ("b", False)):
        root = tmp_path / name
        path = h.write_conf(root, {"stages": ["data_preparation"], "cluster_type": "slurm",
                                   "cluster": {"sbatch_args": ["--hold"] if held else []},
                                   "base_results_dir": str(root / "r"), "data_dir": str(root / "data")},
                            {"data_preparation": _prep_body(tiny_corpus, shards, name="same", dependency="singleton")})
        assert main(["launch", str(path)]) == 0
        jobs += _submitted(capsys.readouterr().out)
    first, second = jobs
    assert (h.job_info(first)["JobState"], h.job_info(first)["Reason"]) == ("PENDING", "JobHeldUser")
    h.wait_for(lambda: h.job_info(second).get("Reason") == "Dependency", TIMEOUT, "the second singleton to wait")
    info = h.job_info(second)
    assert info["JobState"] == "PENDING" and "singleton" in info["Dependency"], info
    subprocess.run(["scontrol", "release", first], check=True)
    h.wait_for(lambda: h.job_done(first) and h.job_done(second), TIMEOUT, "both singletons to end")
    one, two = h.job_info(first), h.job_info(second)
    assert one["JobState"] == two["JobState"] == "COMPLETED"
    assert two["StartTime"] >= one["EndTime"]  # ISO times compare as strings
    assert (tmp_path / "a" / "data" / "shard0_text_document.bin").is_file()
    assert (tmp_path / "b" / "data" / "shard0_text_document.bin").is_file()


def test_array_over_input_shards(tmp_path, slurm_env, launch_helpers, tiny_corpus, capsys, monkeypatch):
    h = launch_helpers
    monkeypatch.chdir(tmp_path)
    shards = _shards(tmp_path, tiny_corpus, 3)
    path = h.write_conf(tmp_path, {"stages": ["data_preparation"], "cluster_type": "slurm",
                                   "base_results_dir": str(tmp_path / "r"), "data_dir": str(tmp_path / "data")},
                        {"data_preparation": _prep_body(tiny_corpus, shards, array=True)})
    assert main(["launch", str(path)]) == 0
    (job,) = _submitted(capsys.readouterr().out)
    h.wait_for(lambda: h.job_done(job), TIMEOUT, "the array job")
    for i in range(3):
        assert h.job_info(f"{job}_{i}")["JobState"] == "COMPLETED"
        assert (tmp_path / "data" / f"shard{i}_text_document.idx").is_file()
        assert (tmp_path / "r" / "data_preparation" / f"COMPLETED.task{i}").is_file()
        assert f"preprocessed {shards[i]}" in (tmp_path / "r" / "data_preparation" / f"slurm-{job}_{i}.out").read_text()
    assert [s["state"] for s in stage_states(tmp_path / "r")] == ["COMPLETED"]


def test_two_stage_pipeline_whose_training_is_signalled_requeued_and_resumed(tmp_path, slurm_env, launch_helpers,
                                                                             tiny_corpus, capsys, monkeypatch):
    """Data preparation, then training on two processes after it (afterok); SIGUSR1 to the training job makes it
    save, requeue itself and resume from the checkpoint, and the pipeline completes.

    (One pipeline for what was two tests, a two-stage pipeline and a signalled one-stage training: a training job
    start less.)"""
    h = launch_helpers
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "r" / "data"
    # the first run never ends on its own: the signal always finds it training; once it has stopped and requeued,
    # its config asks for two steps past the saved one, so the resumed run completes in seconds
    body = h.training_body(tiny_corpus, max_steps=100_000, val_check_interval=1_000_000, devices=2)
    body["model"]["micro_batch_size"] = 2  # 2 per rank x 2 ranks = the global batch of 4
    body["model"]["data"]["data_prefix"] = [1.0, f"{data}/shard0_text_document"]
    with socket.socket() as s:  # test sessions running side by side each have a job 1: give a port of our own
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = h.write_conf(tmp_path, {"stages": ["data_preparation", "training"], "cluster_type": "slurm",
                                   "cluster": {"rdzv_port": port}, "base_results_dir": str(tmp_path / "r"),
                                   "data_dir": str(data)},
                        {"data_preparation": _prep_body(tiny_corpus, _shards(tmp_path, tiny_corpus, 1)),
                         "training": body})
    assert main(["launch", str(path)]) == 0
    out = capsys.readouterr().out
    prep, job = _submitted(out)
    assert f"submitted job {job} after afterok:{prep}" in out
    results = tmp_path / "r" / "tiny"
    metrics = results / "metrics.jsonl"
    h.wait_for(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), TIMEOUT, "the first training step")
    assert h.job_info(prep)["JobState"] == "COMPLETED" and (data / "shard0_text_document.idx").is_file()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # the job saves, requeues itself; Slurm holds a requeued job a while (BeginTime): release it now
    h.wait_for(lambda: h.job_info(job).get("Restarts") == "1" and h.job_info(job).get("JobState") == "PENDING",
               TIMEOUT, "the job to requeue")
    stopped_at = json.loads((results / "summary.json").read_text())["steps"]
    config = results / "training_config.yaml"  # what the requeued batch script trains from
    written = yaml.safe_load(config.read_text())
    assert written["trainer"]["max_steps"] == 100_000
    written["trainer"]["max_steps"] = steps = stopped_at + 2
    config.write_text(yaml.safe_dump(written))
    # slurmd revokes the old run's credential with one-second resolution: a restart within the same
    # second is refused ("Job credential revoked"). Slurm's own BeginTime hold avoids that; we shorten it.
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    h.wait_for(lambda: h.job_done(job), TIMEOUT, "the requeued job to finish")
    assert h.job_info(job)["JobState"] == "COMPLETED"
    log = (results / f"slurm-{job}.out").read_text()
    # two processes: the preflight all-reduce, then torchrun with c10d rendezvous on the head node, both times
    assert log.count("preflight: all-reduce across 2 ranks on 1 node(s) ok") == 2
    assert "on 2 process(es)" in log
    assert "SIGUSR1: asking the stage to save a checkpoint and stop" in log
    assert "requeueing job" in log and "restart 1" in log
    m = re.search(r"resuming from \S+step_(\d+) at step (\d+)", log)
    assert m and int(m.group(2)) == stopped_at > 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from"].endswith(f"step_{int(m.group(2)):07d}")
    assert summary["checkpoint"].endswith(f"step_{steps:07d}")
    assert (results / "COMPLETED").is_file()
    assert [s["state"] for s in stage_states(tmp_path / "r")] == ["COMPLETED", "COMPLETED"]
    assert [s["job_id"] for s in stage_states(tmp_path / "r")] == [prep, job]
    assert f"job {job} on" in log
