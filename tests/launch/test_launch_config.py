"""Launcher config: composition, overrides, time limits, and the bad-input errors raised before anything runs."""

from __future__ import annotations

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError, UserError
from lmforge.launch import launch, load_launch_config
from lmforge.launch.config import format_time_limit, parse_time_limit
from lmforge.launch.stages import StageUnavailableError, build_stages

EXAMPLE = "examples/pipeline/conf/config.yaml"


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("10:30", 630), ("04:00:00", 14400), ("1-12:00:00", 129600),
                                          ("2-0", 172800), ("1-01:30", 91800)])
def test_time_limits(text, seconds):
    assert parse_time_limit(text) == seconds
    assert parse_time_limit(format_time_limit(seconds)) == seconds


@pytest.mark.parametrize("bad", ["4h", "1:2:3:4", "00:00:00", "12:75:00", "", "abc", None])
def test_malformed_time_limit(bad):
    with pytest.raises(ConfigError, match="time limit"):
        parse_time_limit(bad)


def test_example_composes_with_overrides(monkeypatch, tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / EXAMPLE
    monkeypatch.chdir(tmp_path)
    cfg = load_launch_config(example, ["cluster_type=bcm", "training.trainer.max_steps=70",
                                        "base_results_dir=/scratch/r", "cluster.partition=gpu"])
    assert cfg.cluster_type == "slurm"
    assert cfg.training.trainer.max_steps == 70
    assert cfg.cluster.partition == "gpu"
    # interpolations follow the overridden base folder
    assert cfg.training.run.results_dir == "/scratch/r/tiny_llama"
    assert cfg.training.model.data.data_prefix[1] == "/scratch/r/data/stdlib_text_document"
    stages = build_stages(cfg)
    assert [s.kind for s in stages] == ["data_preparation", "training", "conversion", "evaluation"]
    assert stages[1].module_args[:3] == ["-m", "lmforge", "pretrain"]
    # evaluation scores the converted folder on the held-out perplexity task data preparation writes
    assert stages[3].module_args == ["-m", "lmforge", "evaluate", "/scratch/r/convert_hf/hf",
                                     "--tasks", "/scratch/r/data/heldout_task.yaml",
                                     "--output", "/scratch/r/eval_perplexity/results.json"]
    assert stages[1].resumable and not stages[0].resumable


def test_group_choice_override(tmp_path, launch_helpers, tiny_corpus):
    path = launch_helpers.write_conf(tmp_path, {"stages": ["training"], "base_results_dir": str(tmp_path / "r")},
                                     {"training": launch_helpers.training_body(tiny_corpus)})
    other = launch_helpers.training_body(tiny_corpus, max_steps=3)
    other["run"]["name"] = "other"
    (tmp_path / "conf" / "training" / "other.yaml").write_text(__import__("yaml").safe_dump(other))
    cfg = load_launch_config(path, ["training=other"])
    assert cfg.training.run.name == "other" and cfg.training.trainer.max_steps == 3
    with pytest.raises(ConfigError, match="choose one of other, test"):
        load_launch_config(path, ["training=nope"])


def _conf(tmp_path, launch_helpers, tiny_corpus, stages=("training",), **top):
    return launch_helpers.write_conf(tmp_path, {"stages": list(stages), "base_results_dir": str(tmp_path / "r"), **top},
                                     {"training": launch_helpers.training_body(tiny_corpus)})


def test_unknown_stage_lists_known(tmp_path, launch_helpers, tiny_corpus):
    path = _conf(tmp_path, launch_helpers, tiny_corpus, stages=("training", "trainig"))
    with pytest.raises(ConfigError, match="unknown stage 'trainig'.*known stages: data_preparation, training, "
                                          "fine_tuning, alignment, conversion, evaluation, generation, export"):
        launch(path, dry_run=True)


def test_stage_without_config(tmp_path, launch_helpers, tiny_corpus):
    path = _conf(tmp_path, launch_helpers, tiny_corpus, stages=("data_preparation", "training"))
    with pytest.raises(ConfigError, match="stage 'data_preparation' has no config"):
        launch(path, dry_run=True)


def test_gpus_not_divisible_by_tp_pp(tmp_path, launch_helpers, tiny_corpus):
    path = _conf(tmp_path, launch_helpers, tiny_corpus)
    with pytest.raises(ConfigError, match=r"2 node\(s\) x 2 device\(s\) = 4 GPUs is not divisible by tensor x "
                                          r"pipeline x context parallel size = 3 x 1 x 1 = 3"):
        launch(path, ["training.trainer.num_nodes=2", "training.trainer.devices=2",
                      "training.model.tensor_model_parallel_size=3"], dry_run=True)


def test_malformed_stage_time_limit(tmp_path, launch_helpers, tiny_corpus):
    path = _conf(tmp_path, launch_helpers, tiny_corpus)
    with pytest.raises(ConfigError, match=r"training.run.time_limit='3 hours' is not a Slurm time limit"):
        launch(path, ["training.run.time_limit=3 hours"], dry_run=True)


def test_missing_container_image(tmp_path, launch_helpers, tiny_corpus):
    path = _conf(tmp_path, launch_helpers, tiny_corpus, cluster_type="slurm", container_runtime="apptainer",
                 container=str(tmp_path / "missing.sif"))
    with pytest.raises(ConfigError, match=r"container image .*missing.sif does not exist"):
        launch(path)
    assert not (tmp_path / "r" / "launch.json").exists()


def test_sbatch_not_on_path(tmp_path, launch_helpers, tiny_corpus, monkeypatch):
    path = _conf(tmp_path, launch_helpers, tiny_corpus, cluster_type="slurm")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        launch(path)
    assert not (tmp_path / "r" / "launch.json").exists()


def test_unavailable_stage_command_is_named(tmp_path, launch_helpers, tiny_corpus):
    path = launch_helpers.write_conf(tmp_path, {"stages": ["export"], "base_results_dir": str(tmp_path / "r")},
                                     {"export": {"args": ["x"], "command": "no-such-command"}})
    with pytest.raises(StageUnavailableError, match=r"stage 'export' needs `lmforge no-such-command`"):
        launch(path, dry_run=True)


def test_bad_training_key_is_caught_before_launch(tmp_path, launch_helpers, tiny_corpus):
    path = _conf(tmp_path, launch_helpers, tiny_corpus)
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        launch(path, ["training.trainer.max_stepz=3"], dry_run=True)


def test_cli_prints_one_line(tmp_path, launch_helpers, tiny_corpus, capsys):
    path = _conf(tmp_path, launch_helpers, tiny_corpus, stages=("nonsense",))
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown stage 'nonsense'") and "\n" not in err


def test_evaluation_options_tensor_parallel_size_is_one_process_with_its_gpus(monkeypatch, tmp_path):
    """An lmforge-style evaluation stage given options.tensor_parallel_size runs one process (the command starts
    its ranks) on that many GPUs; a run block asking for more processes per node is refused."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / EXAMPLE
    monkeypatch.chdir(tmp_path)
    base = ["cluster_type=bcm", "base_results_dir=/scratch/r", "+evaluation.options.tensor_parallel_size=2"]
    (ev,) = [s for s in build_stages(load_launch_config(example, base)) if s.kind == "evaluation"]
    assert ev.module_args[-2:] == ["--tensor-parallel-size", "2"]
    assert (ev.nodes, ev.ntasks_per_node, ev.gpus_per_node) == (1, 1, 2) and not ev.distributed
    with pytest.raises(ConfigError, match=r"^evaluation.run.ntasks_per_node=2: with tensor_parallel_size 2 the "
                                          r"command starts its own 2 processes; set run.ntasks_per_node: 1$"):
        build_stages(load_launch_config(example, [*base, "evaluation.run.ntasks_per_node=2"]))
    with pytest.raises(ConfigError, match=r"^evaluation.run.gpus_per_node=1 is fewer than the tensor parallel size 2"):
        build_stages(load_launch_config(example, [*base, "evaluation.run.gpus_per_node=1"]))
