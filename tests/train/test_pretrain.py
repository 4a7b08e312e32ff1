"""The pretraining stage end to end on a CPU: data parallel equivalence, exact resume after a kill,
precisions, activation checkpointing, epochs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import run
from tests.conftest import assert_run_plots, tiny_overrides


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LMFORGE_TEST_KILL_AT_STEP", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """The last logged value of ``key`` at each step (a resumed run re-logs the steps it repeats)."""
    out = {}
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        if key in rec:
            out[int(rec["step"])] = rec[key]
    return out


def _cli(args, env, nproc=1, check=True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", "--master-addr=127.0.0.1", "-m", "lmforge", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _cli_here(args, capsys=None) -> str:
    """``lmforge ARGS`` in this process (``lmforge.cli.main``): a one-process run, no interpreter to start. On one
    thread, as the runs ``_cli`` launches (OMP_NUM_THREADS=1): the exact-resume tests compare the two bit for bit.
    It must succeed; with ``capsys``, returns what it printed."""
    import torch

    from lmforge.cli import main

    if capsys is not None:
        capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in args]) == 0
    finally:
        torch.set_num_threads(threads)
    if capsys is None:
        return ""
    printed = capsys.readouterr()
    return printed.out + printed.err


def test_two_process_data_parallel_matches_one_process(tiny_corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(**{"trainer.max_steps": 6, "trainer.val_check_interval": 3, "trainer.limit_test_batches": 0})
    _cli_here(["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, one, **common), "trainer.devices=1"])
    _cli(["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, two, **common), "trainer.devices=2"], _env(), nproc=2)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6), step
    v1, v2 = _losses(one, "val_loss"), _losses(two, "val_loss")
    assert sorted(v1) == sorted(v2) and len(v1) >= 2
    for step in v1:
        assert v2[step] == pytest.approx(v1[step], rel=1e-5, abs=1e-6)
    # accumulation was derived: 1 process needs 2 micro-batches of 4 for a global batch of 8
    cfg1 = (one / "config.yaml").read_text()
    assert "accumulate_grad_batches: 2" in cfg1
    assert "accumulate_grad_batches: 1" in (two / "config.yaml").read_text()
    assert_run_plots(two, tensorboard=False)  # loss_curve.png by rank 0; create_tensorboard_logger=false acts


def test_killed_run_resumes_exactly(tiny_corpus, tmp_path, capsys):
    """The uninterrupted run and the resume run in this process; the killed run in its own."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = {"trainer.max_steps": 10, "trainer.val_check_interval": 4, "model.hidden_dropout": 0.1,
             "model.attention_dropout": 0.1}
    args_full = ["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, full, **extra)]
    args_killed = ["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, killed, **extra)]
    _cli_here(args_full)
    p = _cli(args_killed, _env(LMFORGE_TEST_KILL_AT_STEP="6"), check=False)
    assert p.returncode != 0  # killed with SIGKILL after step 6; the last checkpoint is step 4
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text().strip().endswith("step_0000004")
    assert "resuming from" in _cli_here(args_killed, capsys)
    lf, lk = _losses(full), _losses(killed)
    assert sorted(lf) == sorted(lk) == list(range(1, 11))
    for step in lf:
        assert lk[step] == lf[step], f"step {step}: {lk[step]} != {lf[step]}"
    assert _losses(full, "val_loss") == _losses(killed, "val_loss")
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_0000004") and summary["steps"] == 10


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_on_cpu(tiny_corpus, tmp_path, precision):
    cfg = load_config("tiny/llama", tiny_overrides(tiny_corpus, tmp_path, **{
        "trainer.precision": precision, "trainer.max_steps": 12, "trainer.val_check_interval": 12}))
    summary = run(cfg)
    assert summary["val_loss_after"] < summary["val_loss_before"]


def test_activation_checkpointing_gives_the_same_losses(tiny_corpus, tmp_path):
    a = run(load_config("tiny/llama", tiny_overrides(tiny_corpus, tmp_path / "a", **{"trainer.max_steps": 4})))
    b = run(load_config("tiny/llama", tiny_overrides(tiny_corpus, tmp_path / "b", **{
        "trainer.max_steps": 4, "model.activations_checkpoint_granularity": "full"})))
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for k in la:
        assert lb[k] == pytest.approx(la[k], rel=1e-5)
    assert b["val_loss_after"] == pytest.approx(a["val_loss_after"], rel=1e-5)


def test_max_epochs_derives_steps_and_gpt_style_trains(tiny_corpus, tmp_path):
    from lmforge.data.gpt_dataset import build_datasets

    # a training split of 8% of the documents: one epoch is tens of steps (90% took hundreds)
    splits = "8,46,46"
    cfg = load_config("tiny/gpt", tiny_overrides(tiny_corpus, tmp_path, **{
        "trainer.max_steps": -1, "trainer.max_epochs": 1, "trainer.val_check_interval": 1.0,
        "model.num_query_groups": "null", "model.max_position_embeddings": 32, "model.data.splits_string": splits}))
    summary = run(cfg)
    # one epoch of the training split, in global batches of 8
    train = build_datasets([1.0, tiny_corpus["prefix"]], splits, 32, (None, None, None))[0]
    assert summary["max_steps"] == train.samples_per_epoch // 8 > 8
    assert summary["val_loss_after"] < summary["val_loss_before"]


def test_data_made_with_a_larger_tokenizer_is_refused_before_training(tiny_corpus, tmp_path):
    """Issue 15.4: token ids the configured tokenizer does not have are one error line, not an IndexError at step 1."""
    from lmforge.data.tokenizers import train_bpe

    small = train_bpe([tiny_corpus["jsonl"]], 300, tmp_path / "small_tokenizer")
    assert small.vocab_size < tiny_corpus["vocab_size"]
    out = tmp_path / "run"
    args = ["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, out, **{"model.tokenizer.model": tmp_path / "small_tokenizer"})]
    p = _cli(args, _env(), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "token id" in lines[0], p.stderr
    assert f"vocabulary of {small.vocab_size}" in lines[0] and "small_tokenizer" in lines[0]
    assert not (out / "checkpoints").exists()


def test_dataloader_workers_and_document_masks_act(tiny_corpus, tmp_path):
    """model.data.num_workers=2 reads the same batches through DataLoader workers (the same curve, also across a
    resume); eod_mask_loss / reset_position_ids / reset_attention_mask change what is trained (another curve),
    and the loss is the mean over the tokens the mask keeps."""
    common = {"trainer.max_steps": 4, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1}
    runs = {}
    for name, extra in (("inline", {}), ("workers", {"model.data.num_workers": 2}),
                        ("documents", {"model.data.eod_mask_loss": True, "model.data.reset_position_ids": True,
                                       "model.data.reset_attention_mask": True, "model.data.num_workers": 1})):
        out = tmp_path / name
        args = ["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, out, **common, **extra)]
        if name == "workers":  # killed after step 3 (no checkpoint there): resumes from step 2's checkpoint
            p = _cli(args, _env(LMFORGE_TEST_KILL_AT_STEP="3"), check=False)
            assert p.returncode != 0
        _cli_here(args)  # the other runs and the resume: in this process
        runs[name] = _losses(out)
    assert runs["workers"] == runs["inline"]
    assert sorted(runs["documents"]) == sorted(runs["inline"])
    # (identical runs agree exactly: inline == workers; the flags move every step, by about 1e-4 to 6e-4 here)
    assert all(abs(runs["documents"][s] - runs["inline"][s]) > 1e-5 for s in runs["inline"])


def test_dataloader_cyclic_and_document_masks_under_pipeline_are_refused(tiny_corpus, tmp_path):
    for extra, message in (({"model.data.dataloader_type": "cyclic"}, "dataloader_type=cyclic"),
                           ({"model.data.eod_mask_loss": True, "trainer.devices": 2,
                             "model.pipeline_model_parallel_size": 2}, "is not supported yet (document masks")):
        p = _cli(["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, tmp_path / "bad", **extra)], _env(),
                 check=False)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_document_masks_need_an_end_of_document_token(tiny_corpus, tmp_path):
    """eod_mask_loss with a tokenizer that has no end-of-document token: one line naming the tokenizer key."""
    from tokenizers import Tokenizer, models

    folder = tmp_path / "no_eod_tokenizer"
    folder.mkdir()
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(tiny_corpus["vocab_size"])}, unk_token="t0")).save(
        str(folder / "tokenizer.json"))
    out = tmp_path / "run"
    p = _cli(["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, out, **{"model.tokenizer.model": folder,
                                                                              "model.data.eod_mask_loss": True})],
             _env(), check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "model.data.eod_mask_loss=true needs the end-of-document token" in lines[0]
    assert f"model.tokenizer.model={folder}" in lines[0]
