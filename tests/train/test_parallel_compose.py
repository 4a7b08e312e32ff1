"""Pipeline, tensor and data parallelism composed on one mesh (4 gloo ranks): TP 2 x PP 2, PP 2 x DP 2, PP 2 x FSDP 2,
TP 2 x DP 2 (replicas averaging gradients explicitly) and TP 2 x FSDP 2 each give the loss curve of one process, as
TP 2 x PP 2, PP 2 x FSDP 2 and PP 4 of a tied-head model give the tied model's; a TP 2 x PP 2
checkpoint resumes on FSDP 4 and the reverse, a one-process checkpoint resumes on TP 2 x PP 2, and a TP 2 x PP 2
checkpoint converts to the one-process model's HF folder."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import convert_to_hf, run_cases
from tests.train.test_fsdp import _pretrain_args, _same_curve
from tests.train.test_pretrain import _losses

FOUR = ["trainer.devices=4", "model.micro_batch_size=2"]
TP2xPP2 = [*FOUR, "model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]


LAYOUTS = {  # name: (arguments, what the run prints about its layout)
    # TP 2 x PP 2 alone runs in the resume tests below (its first six steps, killed; two resumed ones)
    "tp2xpp2_sp": ([*TP2xPP2, "model.sequence_parallel=true", "model.activations_checkpoint_granularity=full"],
                   "tensor parallel 2, pipeline parallel 2"),
    "pp2xdp2": ([*FOUR, "model.pipeline_model_parallel_size=2"], "data parallel 2, tensor parallel 1, pipeline parallel 2"),
    "pp2xfsdp2": ([*FOUR, "model.pipeline_model_parallel_size=2", "model.fsdp=true"], "pipeline parallel 2 (FSDP full"),
    "tp2xdp2": ([*FOUR, "model.tensor_model_parallel_size=2"], "data parallel 2, tensor parallel 2"),
    "tp2xfsdp2": ([*FOUR, "model.tensor_model_parallel_size=2", "model.fsdp=true"],
                  "data parallel 2, tensor parallel 2, pipeline parallel 1 (FSDP full"),
}
TIED = ["model.share_embeddings_and_output_weights=true"]
TIED_LAYOUTS = {  # a tied head: the last stage's copy of the embedding, sharded by vocabulary (TP) or by FSDP
    "tp2xpp2_tied": ([*TP2xPP2, *TIED], "tensor parallel 2, pipeline parallel 2"),
    "pp2xfsdp2_tied": ([*FOUR, "model.pipeline_model_parallel_size=2", "model.fsdp=true", *TIED],
                       "pipeline parallel 2 (FSDP full"),
}
# 4 stages, 1 layer each: the first and the last stage sum over a group of their own, the middle ones hold no copy;
# full-weight checkpoints (rank 0 receives the three other stages' weights, one tensor at a time)
PP4_TIED = [*FOUR, "model.pipeline_model_parallel_size=4", "model.num_layers=4", *TIED,
            "model.fsdp_sharded_checkpoint=false"]
FSDP4, ONE = (4, [*FOUR, "model.fsdp=true"]), (1, ["trainer.devices=1"])
# name: (the layout killed after step 6 (latest: step 5) or 9 (latest: step 8), the layout that resumes it on 4
# ranks, the kill step): TP 2 x PP 2 is the slowest layout here (a step: ~6x PP 2 x DP 2's), so it resumes at step 8
# (steps 9 and 10: the restored weights, then one step of the restored optimizer and schedule); its own killed run
# stops at 6 (its step-5 checkpoint converts below)
RESUMES = {
    "tppp_then_fsdp": ((4, TP2xPP2), FSDP4[1], 6),
    "fsdp_then_tppp": (FSDP4, TP2xPP2, 9),
    "one_then_tppp": (ONE, TP2xPP2, 9),  # an optimizer saved by parameter index
}


@pytest.fixture(scope="module")
def four_rank_runs(tiny_corpus, tmp_path_factory, killed_run) -> dict:
    """``name -> (CaseRun, results folder)`` of every 4-rank run of this file (``LAYOUTS`` from step 0, ``RESUMES``
    from a copy of the killed run), one after the other in ONE torchrun launch (tests/run_cases.py)."""
    root = tmp_path_factory.mktemp("compose")
    cases = [{"name": name, "args": _pretrain_args(tiny_corpus, root / name, *args)}
             for name, (args, _) in {**LAYOUTS, **TIED_LAYOUTS, "pp4_tied": (PP4_TIED, None)}.items()]
    for name, ((nproc, first), then, at) in RESUMES.items():
        killed_run(nproc, *first, into=root / name, at=at)
        cases.append({"name": name, "args": _pretrain_args(tiny_corpus, root / name, *then)})
    runs = run_cases(cases, 4, root / "launch")
    return {name: (runs[name], root / name) for name in [*LAYOUTS, *TIED_LAYOUTS, "pp4_tied", *RESUMES]}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_composed_layouts_match_one_process(plain_run, four_rank_runs, name):
    run, out = four_rank_runs[name]
    assert LAYOUTS[name][1] in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    assert json.loads((out / "checkpoints" / "step_0000010" / "config.json").read_text())["sharded"]["world_size"] == 4


@pytest.mark.parametrize("name", list(TIED_LAYOUTS))
def test_tied_head_pipeline_layouts_match_one_process(tied_plain_run, four_rank_runs, name):
    run, out = four_rank_runs[name]
    assert TIED_LAYOUTS[name][1] in run.ok()
    _same_curve(_losses(tied_plain_run), _losses(out))
    _same_curve(_losses(tied_plain_run, "grad_norm"), _losses(out, "grad_norm"))  # the tied weight counted once


def test_tied_head_over_four_stages_matches_one_process(tiny_corpus, tmp_path, four_rank_runs):
    from tests.train.test_fsdp import _pretrain_here

    one = _pretrain_here(tiny_corpus, tmp_path / "one", "trainer.devices=1", "model.num_layers=4", *TIED)
    run, out = four_rank_runs["pp4_tied"]
    assert "pipeline parallel 4" in run.ok()
    _same_curve(_losses(one), _losses(out))
    _same_curve(_losses(one, "grad_norm"), _losses(out, "grad_norm"))
    from safetensors.torch import load_file  # rank 0's full weights: every stage's, the tied weight once

    step = "checkpoints/step_0000010/model.safetensors"
    gathered, reference = load_file(str(out / step)), load_file(str(one / step))
    assert sorted(gathered) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(RESUMES))
def test_tp_pp_checkpoint_resumes_on_fsdp_and_back(plain_run, four_rank_runs, name):
    run, out = four_rank_runs[name]  # killed after step 6 or 9 on its first layout, resumed on the other
    newest = 5 if RESUMES[name][2] == 6 else 8
    assert "resuming from" in run.ok() and f"step_{newest:07d} at step {newest}" in run.output
    _same_curve(_losses(plain_run), _losses(out))


def test_tp_pp_checkpoint_converts_to_the_one_process_hf_folder(tmp_path, plain_hf, killed_run):
    out, _ = killed_run(4, *TP2xPP2)  # its step-5 checkpoint, written by TP 2 x PP 2
    a = convert_to_hf(out / "checkpoints" / "step_0000005", tmp_path / "hf_tppp")
    b = plain_hf[1]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
