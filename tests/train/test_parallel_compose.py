"""Pipeline, tensor and data parallelism composed on one mesh (4 gloo ranks): TP 2 x PP 2, PP 2 x DP 2, PP 2 x FSDP 2
and TP 2 x DP 2 (replicas averaging gradients explicitly) each give the loss curve of one process; a TP 2 x PP 2
checkpoint resumes on FSDP 4 and the reverse, a one-process checkpoint resumes on TP 2 x PP 2, and a TP 2 x PP 2
checkpoint converts to the one-process model's HF folder."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import convert_to_hf
from tests.train.test_fsdp import _pretrain, _same_curve
from tests.train.test_pretrain import _losses

FOUR = ["trainer.devices=4", "model.micro_batch_size=2"]
TP2xPP2 = [*FOUR, "model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]


@pytest.mark.parametrize("name,args,shown", [
    # TP 2 x PP 2 alone runs in the resume test below (its first five steps, then five resumed ones)
    ("tp2xpp2_sp", [*TP2xPP2, "model.sequence_parallel=true", "model.activations_checkpoint_granularity=full"],
     "tensor parallel 2, pipeline parallel 2"),
    ("pp2xdp2", [*FOUR, "model.pipeline_model_parallel_size=2"], "data parallel 2, tensor parallel 1, pipeline parallel 2"),
    ("pp2xfsdp2", [*FOUR, "model.pipeline_model_parallel_size=2", "model.fsdp=true"], "pipeline parallel 2 (FSDP full"),
    ("tp2xdp2", [*FOUR, "model.tensor_model_parallel_size=2"], "data parallel 2, tensor parallel 2"),
])
def test_composed_layouts_match_one_process(tiny_corpus, tmp_path, plain_run, name, args, shown):
    out = tmp_path / name
    p = _pretrain(tiny_corpus, out, 4, *args)
    assert shown in p.stdout + p.stderr
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    assert json.loads((out / "checkpoints" / "step_0000010" / "config.json").read_text())["sharded"]["world_size"] == 4


def test_tp_pp_checkpoint_resumes_on_fsdp_and_back_and_converts(tiny_corpus, tmp_path, plain_run, plain_hf,
                                                                killed_run):
    fsdp4, one = (4, [*FOUR, "model.fsdp=true"]), (1, ["trainer.devices=1"])
    tppp = (4, TP2xPP2)
    for first, then, name in ((tppp, fsdp4, "tppp_then_fsdp"), (fsdp4, tppp, "fsdp_then_tppp"),
                              (one, tppp, "one_then_tppp")):  # the last: an optimizer saved by parameter index
        out, _ = killed_run(first[0], *first[1], into=tmp_path / name)  # killed after step 6: latest is step 5
        p = _pretrain(tiny_corpus, out, then[0], *then[1])
        assert "resuming from" in p.stdout + p.stderr
        _same_curve(_losses(plain_run), _losses(out))
    a = convert_to_hf(tmp_path / "tppp_then_fsdp" / "checkpoints" / "step_0000005", tmp_path / "hf_tppp")
    b = plain_hf[1]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
