"""Pipeline parallelism through the pretraining stage (gloo ranks): 1F1B over 2 stages and interleaved 1F1B
(2 stages a rank) give the loss curve of one process; a pipeline checkpoint resumes on one process."""

from __future__ import annotations

import json

import pytest

from tests.train.test_fsdp import _pretrain, _pretrain_here, _refused, _same_curve
from tests.train.test_pretrain import _env, _losses


def test_pipeline_1f1b_matches_one_process_and_resumes_unsharded(tiny_corpus, tmp_path, plain_run):
    out = tmp_path / "pp"
    p = _pretrain(tiny_corpus, out, 2, "trainer.devices=2", "model.pipeline_model_parallel_size=2")
    assert "pipeline parallel 2" in p.stdout + p.stderr
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    assert json.loads((out / "checkpoints" / "step_0000010" / "config.json").read_text())["sharded"]["world_size"] == 2
    moved = tmp_path / "pp_then_plain"
    p = _pretrain(tiny_corpus, moved, 2, "trainer.devices=2", "model.pipeline_model_parallel_size=2",
                  env=_env(LMFORGE_TEST_KILL_AT_STEP="6"), check=False)
    assert p.returncode != 0
    p = _pretrain(tiny_corpus, moved, 1, "trainer.devices=1")
    assert "resuming from" in p.stdout + p.stderr
    _same_curve(_losses(plain_run), _losses(moved))


def test_interleaved_pipeline_matches_one_process(tiny_corpus, tmp_path):
    four = ["model.num_layers=4"]
    _pretrain_here(tiny_corpus, tmp_path / "one", "trainer.devices=1", *four)
    p = _pretrain(tiny_corpus, tmp_path / "vpp", 2, "trainer.devices=2", "model.pipeline_model_parallel_size=2",
                  "model.virtual_pipeline_model_parallel_size=2", "model.micro_batch_size=2", *four)
    _same_curve(_losses(tmp_path / "one"), _losses(tmp_path / "vpp"))


@pytest.mark.parametrize("nproc,overrides,message", [
    (1, ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "trainer.precision=16-mixed"],
     "trainer.precision=16-mixed with model.pipeline_model_parallel_size=2 is not supported yet"),
    (1, ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.num_layers=3"], "not divisible by"),
    (1, ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.share_embeddings_and_output_weights=true"],
     "tied output head"),
])
def test_bad_pipeline_layouts_are_refused(tiny_corpus, tmp_path, capsys, nproc, overrides, message):
    assert nproc == 1  # refused before any process group: checked in this process
    code, err = _refused(capsys, tiny_corpus, tmp_path / "bad", *overrides)
    assert code != 0 and message in err, err[-1500:]
    assert not [line for line in err.splitlines() if line.strip().startswith("File") and "/lmforge/" in line]
