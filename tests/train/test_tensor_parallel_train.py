"""Tensor parallelism through the pretraining stage (gloo ranks): TP 2 and TP 2 x FSDP 2 give the loss curve of
one process; a TP checkpoint resumes on one unsharded process and converts to the HF folder of its weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.train.test_fsdp import STEPS, _pretrain, _same_curve, plain_run  # noqa: F401 (fixture)
from tests.train.test_pretrain import _env, _losses


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


def test_tensor_parallel_checkpoint_resumes_unsharded_and_converts(tiny_corpus, tmp_path, plain_run):
    from safetensors.torch import load_file

    out = tmp_path / "tp_then_plain"
    p = _pretrain(tiny_corpus, out, 2, "trainer.devices=2", "model.tensor_model_parallel_size=2",
                  env=_env(LMFORGE_TEST_KILL_AT_STEP="6"), check=False)
    assert p.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step_0000005"
    p = _pretrain(tiny_corpus, out, 1, "trainer.devices=1")
    assert "resuming from" in p.stdout + p.stderr
    _same_curve(_losses(plain_run), _losses(out))
    hf_tp, hf_plain = tmp_path / "hf_tp", tmp_path / "hf_plain"
    for src, dst in ((out / "checkpoints" / "step_0000005", hf_tp), (plain_run / "checkpoints" / "step_0000005", hf_plain)):
        subprocess.run([sys.executable, "-m", "lmforge", "convert", str(src), str(dst), "--to", "hf"], check=True,
                       capture_output=True, env=_env())
    a, b = load_file(str(hf_tp / "model.safetensors")), load_file(str(hf_plain / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_tensor_parallel_and_fsdp_resume_on_each_other(tiny_corpus, tmp_path, plain_run):
    tp = ["trainer.devices=2", "model.tensor_model_parallel_size=2"]
    fsdp = ["trainer.devices=2", "model.fsdp=true"]
    for first, then, name in ((tp, fsdp, "tp_then_fsdp"), (fsdp, tp, "fsdp_then_tp")):
        out = tmp_path / name
        p = _pretrain(tiny_corpus, out, 2, *first, env=_env(LMFORGE_TEST_KILL_AT_STEP="6"), check=False)
        assert p.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step_0000005"
        p = _pretrain(tiny_corpus, out, 2, *then)
        assert "resuming from" in p.stdout + p.stderr
        _same_curve(_losses(plain_run), _losses(out))
