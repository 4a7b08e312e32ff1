"""The shipped example pipeline examples/pipeline/conf/alignment.yaml (SFT -> reward model -> DPO -> evaluation,
NeMo-Aligner's stage names) as a dry run, every stage checked at launch."""

from __future__ import annotations

from pathlib import Path

from lmforge.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipeline" / "conf" / "alignment.yaml"


def test_example_alignment_pipeline_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    r = tmp_path / "r"
    assert main(["launch", str(EXAMPLE), "cluster_type=local", "--dry-run", f"base_results_dir={r}"]) == 0
    out = capsys.readouterr().out
    for line in ("lmforge finetune", "lmforge align " + str(r / "reward_model" / "rlhf_rm_config.yaml"),
                 "lmforge align " + str(r / "dpo" / "dpo_config.yaml"), "lmforge convert " + str(r / "dpo"),
                 "lmforge evaluate " + str(r / "convert_dpo_hf" / "hf")):
        assert line in out, line
    assert not (r / "dpo" / "COMPLETED").exists()

    # every stage's keys are checked at launch, before anything runs
    assert main(["launch", str(EXAMPLE), "cluster_type=local", "--dry-run", f"base_results_dir={r}",
                 "rlhf_rm.align.margin_ky=score"]) == 2
    assert "rlhf_rm: " in capsys.readouterr().err


def test_ppo_stage_is_refused_with_the_way_out(tmp_path, capsys):
    assert main(["launch", str(EXAMPLE), "cluster_type=local", "--dry-run", f"base_results_dir={tmp_path}",
                 "stages=[rlhf_ppo]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stage 'rlhf_ppo' is not available: PPO") and "dpo stage" in err


def test_a_dpo_stage_refuses_the_reward_method(tmp_path, capsys):
    assert main(["launch", str(EXAMPLE), "cluster_type=local", "--dry-run", f"base_results_dir={tmp_path}",
                 "dpo.method=rm"]) == 2
    assert "a dpo stage trains one of dpo, ipo" in capsys.readouterr().err
