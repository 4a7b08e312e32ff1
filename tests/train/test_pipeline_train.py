"""Pipeline parallelism through the pretraining stage (gloo ranks): 1F1B over 2 stages and interleaved 1F1B
(2 stages a rank) give the loss curve of one process; a pipeline checkpoint resumes on one process."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cases
from tests.train.test_fsdp import _in_process, _pretrain_args, _pretrain_here, _refused, _same_curve
from tests.train.test_pretrain import _losses

PP2 = ["trainer.devices=2", "model.pipeline_model_parallel_size=2"]
FOUR_LAYERS = ["model.num_layers=4"]
RUNS = {  # name: (arguments, environment): the file's 2-rank runs, in ONE torchrun launch (``pp_runs``)
    "pp": (PP2, {}),
    "vpp": ([*PP2, "model.virtual_pipeline_model_parallel_size=2", "model.micro_batch_size=2", *FOUR_LAYERS], {}),
    "pp_fp16": ([*PP2, "trainer.precision=16-mixed"], {}),  # the users' V100 precision: dynamic loss scaling
    "pp_then_plain": (PP2, {"LMFORGE_TEST_KILL_AT_STEP": "6"}),  # killed after step 6: the launch's last case
}


@pytest.fixture(scope="module")
def pp_runs(tiny_corpus, tmp_path_factory) -> dict:
    """``name -> (CaseRun, results folder)`` of ``RUNS``, one after the other in one launch (tests/run_cases.py)."""
    root = tmp_path_factory.mktemp("pp")
    cases = [{"name": name, "args": _pretrain_args(tiny_corpus, root / name, *args), "env": env}
             for name, (args, env) in RUNS.items()]
    runs = run_cases(cases, 2, root / "launch")
    return {name: (runs[name], root / name) for name in RUNS}


def test_pipeline_1f1b_matches_one_process_and_resumes_unsharded(tiny_corpus, capsys, plain_run, pp_runs):
    run, out = pp_runs["pp"]
    assert "pipeline parallel 2" in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    assert json.loads((out / "checkpoints" / "step_0000010" / "config.json").read_text())["sharded"]["world_size"] == 2
    run, moved = pp_runs["pp_then_plain"]
    assert run.ran and not run.codes  # killed: no rank returned
    assert (moved / "checkpoints" / "latest").read_text().strip() == "step_0000005"
    output = _in_process(capsys, tiny_corpus, moved, "trainer.devices=1")  # one process, in this one
    assert "resuming from" in output
    _same_curve(_losses(plain_run), _losses(moved))


def test_interleaved_pipeline_matches_one_process(tiny_corpus, tmp_path, pp_runs):
    _pretrain_here(tiny_corpus, tmp_path / "one", "trainer.devices=1", *FOUR_LAYERS)
    run, out = pp_runs["vpp"]
    run.ok()
    _same_curve(_losses(tmp_path / "one"), _losses(out))


def test_pipeline_trains_fp16_with_the_loss_scaler_as_one_process(tiny_corpus, tmp_path, pp_runs):
    """trainer.precision=16-mixed (V100s): each micro batch's loss is multiplied by the loss scale inside the
    schedule, the gradients unscaled and checked for inf/NaN over every rank, as one process does."""
    _pretrain_here(tiny_corpus, tmp_path / "one", "trainer.devices=1", "trainer.precision=16-mixed")
    run, out = pp_runs["pp_fp16"]
    assert "precision 16-mixed" in run.ok()
    _same_curve(_losses(tmp_path / "one"), _losses(out))


@pytest.mark.parametrize("nproc,overrides,message", [
    (1, ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.num_layers=3"], "not divisible by"),
    (1, ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.share_embeddings_and_output_weights=true"],
     "tied output head"),
])
def test_bad_pipeline_layouts_are_refused(tiny_corpus, tmp_path, capsys, nproc, overrides, message):
    assert nproc == 1  # refused before any process group: checked in this process
    code, err = _refused(capsys, tiny_corpus, tmp_path / "bad", *overrides)
    assert code != 0 and message in err, err[-1500:]
    assert not [line for line in err.splitlines() if line.strip().startswith("File") and "/lmforge/" in line]
