"""Tensor parallelism through the pretraining stage (gloo ranks): TP 2 (with and without sequence parallelism)
gives the loss curve of one process (TP 2 x FSDP 2 on 4 ranks: test_parallel_compose.py, in its 4-rank launch); a TP
checkpoint resumes on one unsharded process, on FSDP and the reverse, and converts to the HF folder of its
weights."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import convert_to_hf, run_cases
from tests.train.test_fsdp import _pretrain_args, _same_curve
from tests.train.test_pretrain import _losses

TP2 = ["trainer.devices=2", "model.tensor_model_parallel_size=2"]


LAYOUTS = {  # name: (ranks, arguments)
    "tp2": (2, TP2),
    "tp2_sp": (2, [*TP2, "model.sequence_parallel=true", "model.activations_checkpoint_granularity=full"]),
}
FSDP2 = ["trainer.devices=2", "model.fsdp=true"]
RESUMES = {"tp_then_fsdp": (TP2, FSDP2), "fsdp_then_tp": (FSDP2, TP2)}  # killed after step 6 on the first


@pytest.fixture(scope="module")
def tp_runs(tiny_corpus, tmp_path_factory, killed_run) -> dict:
    """``name -> (CaseRun, results folder)`` of this file's runs on 2 gloo ranks (``LAYOUTS`` from step 0,
    ``RESUMES`` from a copy of the killed run) one after the other in ONE torchrun launch (tests/run_cases.py)."""
    root = tmp_path_factory.mktemp("tp")
    by_nproc = {}
    for name, (nproc, args) in LAYOUTS.items():
        by_nproc.setdefault(nproc, []).append({"name": name, "args": _pretrain_args(tiny_corpus, root / name, *args)})
    for name, (first, then) in RESUMES.items():
        killed_run(2, *first, into=root / name)
        by_nproc[2].append({"name": name, "args": _pretrain_args(tiny_corpus, root / name, *then)})
    runs = {}
    for nproc, cases in by_nproc.items():
        runs.update(run_cases(cases, nproc, root / f"launch{nproc}"))
    return {name: (runs[name], root / name) for name in [*LAYOUTS, *RESUMES]}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tensor_parallel_pretraining_matches_one_process(plain_run, tp_runs, name):
    run, out = tp_runs[name]
    assert "tensor parallel 2" in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
    step = out / "checkpoints" / "step_0000010"
    assert json.loads((step / "config.json").read_text())["sharded"]["world_size"] == LAYOUTS[name][0]


def test_tensor_parallel_checkpoint_resumes_unsharded_and_converts(tiny_corpus, tmp_path, capsys, plain_run,
                                                                   plain_hf, killed_run):
    from lmforge.cli import main

    out, _ = killed_run(2, *TP2, into=tmp_path / "tp_then_plain")  # TP 2 killed after step 6: latest is step 5
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a launched run (OMP_NUM_THREADS=1)
    try:  # one unsharded process, in this process (no interpreter to start)
        assert main(_pretrain_args(tiny_corpus, out, "trainer.devices=1")) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert "resuming from" in printed.out + printed.err
    _same_curve(_losses(plain_run), _losses(out))
    a, (_, b) = convert_to_hf(out / "checkpoints" / "step_0000005", tmp_path / "hf_tp"), plain_hf
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(RESUMES))
def test_tensor_parallel_and_fsdp_resume_on_each_other(plain_run, tp_runs, name):
    run, out = tp_runs[name]  # killed after step 6 (latest: step 5) on the first layout, resumed on the other
    assert "resuming from" in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
