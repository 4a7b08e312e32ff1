"""Fixtures for the launcher's tests: a real one-node Slurm cluster, and a writer of launch configs.

``slurm_cluster`` (session) starts munged, slurmctld and slurmd on 127.0.0.1 with 4 fake GPUs through
the project's own ``.ci/slurm.sh start DIR`` and stops them by pid (``.ci/slurm.sh stop DIR``) when
the session ends. It needs root (CI runs as root) and installs Debian's packages if they are missing.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SLURM_SH = REPO / ".ci" / "slurm.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """``{"SLURM_CONF": path, "dir": state folder}`` of a running one-node cluster."""
    state = tmp_path_factory.mktemp("slurm")
    out = subprocess.run(["bash", str(SLURM_SH), "start", str(state)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f".ci/slurm.sh start failed:\n{out.stdout}\n{out.stderr}"
    conf = state / "slurm.conf"
    try:
        yield {"SLURM_CONF": str(conf), "dir": state}
    finally:
        subprocess.run(["bash", str(SLURM_SH), "stop", str(state)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """SLURM_CONF set for this test (client commands and ``lmforge launch`` need it)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    return slurm_cluster


def write_conf(root: Path, top: dict, stages: dict[str, dict]) -> Path:
    """Write ``root/conf/config.yaml`` (``top`` plus a defaults list) and ``root/conf/<stage>/test.yaml`` files."""
    conf = root / "conf"
    for stage, body in stages.items():
        (conf / stage).mkdir(parents=True, exist_ok=True)
        (conf / stage / "test.yaml").write_text(yaml.safe_dump(body))
    config = {"defaults": ["_self_", *({s: "test"} for s in stages)], **top}
    (conf / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return conf / "config.yaml"


def training_body(corpus: dict, **trainer) -> dict:
    """A training stage on the session's tiny corpus: a 2-layer model, seconds on a CPU."""
    t = {"devices": 1, "num_nodes": 1, "accelerator": "cpu", "precision": "32", "max_steps": 8,
         "val_check_interval": 4, "limit_val_batches": 2, "limit_test_batches": 1, "log_every_n_steps": 1}
    t.update(trainer)
    return {
        "run": {"name": "tiny", "results_dir": "${base_results_dir}/tiny", "time_limit": "00:20:00"},
        "trainer": t,
        "exp_manager": {"create_tensorboard_logger": False},
        "model": {"micro_batch_size": 4, "global_batch_size": 4, "encoder_seq_length": 32, "num_layers": 2,
                  "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                  "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "tokenizer": {"model": str(corpus["tokenizer"])},
                  "data": {"data_prefix": [1.0, corpus["prefix"]], "splits_string": "90,5,5"},
                  "optim": {"name": "adamw", "lr": 3e-3, "sched": {"warmup_steps": 2, "min_lr": 3e-4}}},
    }


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_info(job_id: str) -> dict:
    """``scontrol show job`` as a dict of its Key=Value fields (empty when the job is unknown)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    fields = {}
    for word in out.stdout.split():
        if "=" in word:
            k, v = word.split("=", 1)
            fields.setdefault(k, v)
    return fields


def job_done(job_id: str) -> bool:
    """True once squeue no longer lists the job (all array tasks included)."""
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip() or "Invalid job id" in out.stderr


@pytest.fixture
def launch_helpers():
    """The helpers above, for test modules (they are not importable: tests/launch has no __init__.py)."""
    return type("H", (), {"write_conf": staticmethod(write_conf), "training_body": staticmethod(training_body),
                          "wait_for": staticmethod(wait_for), "job_info": staticmethod(job_info),
                          "job_done": staticmethod(job_done)})
