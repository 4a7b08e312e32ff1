"""benchmarks/scaling.py (issue 20's multi-GPU runs) in its CPU form: the weak-scaling run on 1 and 2 gloo ranks and
the 8B run's TP 2 x FSDP 2 and PP 2 x FSDP 2 layouts on 4, each through torchrun and lmforge's training assembly
from the config keys, on the tiny shape. The numbers are no measurement; the test checks that every case trained on
the layout asked for and reported what the GPU runs will read."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_benchmark


def test_scaling_benchmark_runs_weak_and_8b_layouts_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    scaling = load_benchmark("scaling")
    tiny = ["--device", "cpu", "--shape", "tiny", "--steps", "2", "--warm", "1"]
    weak = scaling.main(["weak", "--nproc", "1,2", *tiny])
    big = scaling.main(["8b", "--layouts", "tp2_fsdp2,pp2_fsdp2", "--launch", "merged", *tiny])

    cases, summary = weak[:-1], weak[-1]
    assert [r["world_size"] for r in cases] == [1, 2]
    assert [r["global_batch"] for r in cases] == [4, 8]  # the same micro batch of 4 on every rank
    assert [r["layout"]["sharded"] for r in cases] == [False, True]  # one process: FSDP has nothing to shard
    assert summary["summary"] and set(summary["efficiency"]) == {"1", "2"} and summary["target"] == 0.9
    assert [(r["case"], r["world_size"], r["layout"]["tp"], r["layout"]["pp"], r["layout"]["dp"]) for r in big] == \
        [("tp2_fsdp2", 4, 2, 1, 2), ("pp2_fsdp2", 4, 1, 2, 2)]
    for r in cases + big:
        assert "error" not in r, r.get("error")
        assert r["layout"]["fsdp"] == "full" and r["steps"] == 2
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / r["world_size"], abs=0.1)
        assert math.isfinite(r["loss_last"]) and r["peak_mem_gib"] is None  # CPU: no CUDA peak to read
    assert big[1]["accumulate"] == 4  # --pp-microbatches: the pipeline's micro batches a step
    assert json.loads((tmp_path / "scaling_weak.json").read_text()) == weak
    assert json.loads((tmp_path / "scaling_8b.json").read_text()) == big
