"""benchmarks/align_gpu_check.py (the one-command GPU check of ``lmforge align``'s online methods) on its tiny
CPU path: a case runs the real CLI to the end, reports the run's own metrics and exports, and a failing case
fails the script with the case's error (one case each: every case is the same code path with other flags)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_benchmark


def test_tiny_cpu_cases_run_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    rows = load_benchmark("align_gpu_check").main(["--shape", "tiny", "--device", "cpu", "--cases", "grpo_full_ac",
                                                   "--workdir", str(tmp_path / "work")])
    assert [r["case"] for r in rows] == ["grpo_full_ac"]
    for r in rows:
        assert r["rc"] == 0 and r["finite"] and r["steps_logged"] == 2, r
        m = r["metrics"]
        assert {"loss", "reward", "kl", "completion_length", "completions_per_s"} <= set(m), m
        assert all(math.isfinite(v) for v in m.values())
        assert 1 <= m["completion_length"] <= 8 and r["completion_tokens_per_s"] > 0
        assert r["peak_memory_gib"] is None  # CPU: the run logs none
        assert r["rollouts"].startswith("rollouts: eager decode step")
    assert "activations_checkpoint_num_layers=2" in rows[0]["overrides"]
    assert "align.rollout_compile=auto" in rows[0]["overrides"]  # true is refused off CUDA
    assert rows[0]["export"] == "ok"  # the first all-weight case converts to HF
    saved = json.loads((tmp_path / "align_gpu_check.json").read_text())
    assert saved["cases"] == rows and saved["context"]["vocab"] == 512
    assert not list((tmp_path / "work").glob("out_*"))  # results folders removed without --keep


def test_a_failing_case_fails_the_script_with_its_error(tmp_path, capsys):
    """Every case runs and reports, also after one failed; the script then exits naming the failed ones, with each
    one's stderr tail. A case past --case-timeout counts as failed (rc 124)."""
    bench = load_benchmark("align_gpu_check")
    with pytest.raises(SystemExit, match="failed: grpo_lora, grpo_selective"):
        bench.main(["--shape", "tiny", "--device", "cpu", "--cases", "grpo_lora,grpo_selective", "--workdir",
                    str(tmp_path), "--override", "base_dtype=float64"])
    out, err = capsys.readouterr()
    assert [json.loads(line)["rc"] for line in out.splitlines()[1:]] == [2, 2]
    assert "error: base_dtype='float64'" in err and "keep base_dtype=float32" in err
    with pytest.raises(SystemExit, match="failed: grpo_selective"):
        bench.main(["--shape", "tiny", "--device", "cpu", "--cases", "grpo_selective", "--workdir", str(tmp_path),
                    "--case-timeout", "0.01"])
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["rc"] == 124 and "timed out after 0.01s" in err
