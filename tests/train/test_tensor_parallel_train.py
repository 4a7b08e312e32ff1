"""Tensor parallelism through the pretraining stage (gloo ranks): TP 2 and TP 2 x FSDP 2 give the loss curve of
one process; a TP checkpoint resumes on one unsharded process and converts to the HF folder of its weights."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import convert_to_hf
from tests.train.test_fsdp import STEPS, _pretrain, _same_curve
from tests.train.test_pretrain import _losses

TP2 = ["trainer.devices=2", "model.tensor_model_parallel_size=2"]


@pytest.mark.parametrize("layout", [
    (2, ["trainer.devices=2", "model.tensor_model_parallel_size=2"]),
    (4, ["trainer.devices=4", "model.tensor_model_parallel_size=2", "model.fsdp=true", "model.micro_batch_size=2"]),
    (2, ["trainer.devices=2", "model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
         "model.activations_checkpoint_granularity=full"]),
])
def test_tensor_parallel_pretraining_matches_one_process(tiny_corpus, tmp_path, plain_run, layout):
    nproc, args = layout
    out = tmp_path / "tp"
    p = _pretrain(tiny_corpus, out, nproc, *args)
    assert "tensor parallel 2" in p.stdout + p.stderr
    _same_curve(_losses(plain_run), _losses(out))
    step = out / "checkpoints" / "step_0000010"
    assert json.loads((step / "config.json").read_text())["sharded"]["world_size"] == nproc


def test_tensor_parallel_checkpoint_resumes_unsharded_and_converts(tiny_corpus, tmp_path, plain_run, plain_hf,
                                                                   killed_run):
    out, _ = killed_run(2, *TP2, into=tmp_path / "tp_then_plain")  # TP 2 killed after step 6: latest is step 5
    p = _pretrain(tiny_corpus, out, 1, "trainer.devices=1")
    assert "resuming from" in p.stdout + p.stderr
    _same_curve(_losses(plain_run), _losses(out))
    a, (_, b) = convert_to_hf(out / "checkpoints" / "step_0000005", tmp_path / "hf_tp"), plain_hf
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_tensor_parallel_and_fsdp_resume_on_each_other(tiny_corpus, tmp_path, plain_run, killed_run):
    fsdp = ["trainer.devices=2", "model.fsdp=true"]
    for first, then, name in ((TP2, fsdp, "tp_then_fsdp"), (fsdp, TP2, "fsdp_then_tp")):
        out, _ = killed_run(2, *first, into=tmp_path / name)  # killed after step 6: latest is step 5
        p = _pretrain(tiny_corpus, out, 2, *then)
        assert "resuming from" in p.stdout + p.stderr
        _same_curve(_losses(plain_run), _losses(out))
