"""Pipeline parallelism through the pretraining stage (gloo ranks): 1F1B over 2 stages and interleaved 1F1B
(2 stages a rank) give the loss curve of one process, with a tied output head too; a pipeline checkpoint resumes
on one process (and a tied one converts to Hugging Face)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from tests.conftest import run_cases
from tests.train.test_fsdp import _in_process, _pretrain_args, _pretrain_here, _refused, _same_curve
from tests.train.test_pretrain import _losses

PP2 = ["trainer.devices=2", "model.pipeline_model_parallel_size=2"]
FOUR_LAYERS = ["model.num_layers=4"]
TIED = ["model.share_embeddings_and_output_weights=true"]  # the head is the embedding: a copy on the last stage
VPP = ["model.virtual_pipeline_model_parallel_size=2", "model.micro_batch_size=2", *FOUR_LAYERS]
RUNS = {  # name: (arguments, environment): the file's 2-rank runs, in ONE torchrun launch (``pp_runs``)
    "pp": (PP2, {}),
    "vpp": ([*PP2, *VPP], {}),
    "pp_fp16": ([*PP2, "trainer.precision=16-mixed"], {}),  # the users' V100 precision: dynamic loss scaling
    "pp_tied": ([*PP2, *TIED], {}),
    "vpp_tied": ([*PP2, *VPP, *TIED], {}),
    "pp_tied_gathered": ([*PP2, *TIED, "model.fsdp_sharded_checkpoint=false"], {}),  # full weights on rank 0
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


def _parameters_line(output: str) -> str:
    """The "model: N M parameters" figure a run prints."""
    return re.search(r"model: ([\d.]+M) parameters", output).group(1)


def test_pipeline_1f1b_matches_one_process_and_resumes_unsharded(tiny_corpus, capsys, plain_run, pp_runs):
    run, out = pp_runs["pp"]
    pp_output = run.ok()
    assert "pipeline parallel 2" in pp_output
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    assert json.loads((out / "checkpoints" / "step_0000010" / "config.json").read_text())["sharded"]["world_size"] == 2
    run, moved = pp_runs["pp_then_plain"]
    assert run.ran and not run.codes  # killed: no rank returned
    assert (moved / "checkpoints" / "latest").read_text().strip() == "step_0000005"
    output = _in_process(capsys, tiny_corpus, moved, "trainer.devices=1")  # one process, in this one
    assert "resuming from" in output
    assert _parameters_line(pp_output) == _parameters_line(output)  # the whole model's count, not rank 0's stage
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


def _tensor_count(folder, name: str) -> int:
    """How many of a sharded folder's files hold tensor ``name`` (or a slice of it)."""
    from safetensors import safe_open

    return sum(name in safe_open(str(f), "pt").keys() for f in folder.glob("*.safetensors"))


def test_tied_head_pipeline_matches_one_process_resumes_and_converts(tiny_corpus, tmp_path, capsys, pp_runs,
                                                                     tied_plain_run):
    from safetensors.torch import load_file

    one = tied_plain_run
    run, out = pp_runs["pp_tied"]
    assert "pipeline parallel 2" in run.ok()
    _same_curve(_losses(one), _losses(out))
    _same_curve(_losses(one, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    _same_curve(_losses(one, "grad_norm"), _losses(out, "grad_norm"))  # the tied weight's gradient counted once
    # the two stages' copies were saved once: the weight and its optimizer state, under the model's own name
    last = out / "checkpoints" / "step_0000010"
    assert _tensor_count(last / "model", "embed_tokens.weight") == 1
    assert _tensor_count(last / "training_state" / "optimizer", "state.embed_tokens.weight.exp_avg") == 1

    # its step-5 checkpoint resumes on one process, to the one-process curve
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    for later in ("step_0000008", "step_0000010"):
        shutil.rmtree(moved / "checkpoints" / later)
    (moved / "checkpoints" / "latest").write_text("step_0000005\n")
    kept = [line for line in (moved / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("step", 0) <= 5]
    (moved / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    assert "resuming from" in _in_process(capsys, tiny_corpus, moved, "trainer.devices=1", *TIED)
    _same_curve(_losses(one), _losses(moved))

    # and converts to Hugging Face as any checkpoint: a tied head, the one-process run's weights
    from lmforge.cli import main

    assert main(["convert", str(last), str(tmp_path / "hf"), "--to", "hf", "--no-progress"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in hf
    reference = load_file(str(one / "checkpoints" / "step_0000010" / "model.safetensors"))["embed_tokens.weight"]
    torch.testing.assert_close(hf["model.embed_tokens.weight"].float(), reference, rtol=1e-4, atol=1e-5)


def test_pipeline_full_weights_checkpoint_holds_every_stage(pp_runs, tied_plain_run):
    # fsdp_sharded_checkpoint=false (NeMo's default): rank 0 writes one model.safetensors, every stage's weights in it
    from safetensors.torch import load_file

    one = tied_plain_run
    run, out = pp_runs["pp_tied_gathered"]
    run.ok()
    step = "checkpoints/step_0000010/model.safetensors"
    gathered, reference = load_file(str(out / step)), load_file(str(one / step))
    assert sorted(gathered) == sorted(reference)  # the tied weight once, as one process writes it
    for name, tensor in reference.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=1e-4, atol=1e-5)


def test_tied_head_interleaved_pipeline_matches_one_process(tiny_corpus, tmp_path, pp_runs):
    _pretrain_here(tiny_corpus, tmp_path / "one", "trainer.devices=1", *FOUR_LAYERS, *TIED)
    run, out = pp_runs["vpp_tied"]
    run.ok()
    _same_curve(_losses(tmp_path / "one"), _losses(out))
    _same_curve(_losses(tmp_path / "one", "grad_norm"), _losses(out, "grad_norm"))


@pytest.mark.parametrize("nproc,overrides,message", [
    (1, ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.num_layers=3"], "not divisible by"),
    (1, ["trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.micro_batch_size=8"],
     "model.pipeline_model_parallel_size=2 needs at least 2 micro batches a step"),  # one: torch's traceback before
])
def test_bad_pipeline_layouts_are_refused(tiny_corpus, tmp_path, capsys, nproc, overrides, message):
    assert nproc == 1  # refused before any process group: checked in this process
    code, err = _refused(capsys, tiny_corpus, tmp_path / "bad", *overrides)
    assert code != 0 and message in err, err[-1500:]
    assert not [line for line in err.splitlines() if line.strip().startswith("File") and "/lmforge/" in line]
