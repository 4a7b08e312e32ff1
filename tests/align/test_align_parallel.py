"""Alignment on several processes: two torchrun ranks with FSDP give the losses, reward statistics and
validation of one process with the same global batch (RPO: the reference table computed in shares and summed,
the NLL term normalised by the global chosen-token count)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _align(args, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                      f"--master-port={_free_port()}", "--master-addr=127.0.0.1"]
    cmd = [sys.executable, *launcher, "-m", "lmforge", "align", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


def test_two_fsdp_ranks_match_one_process(tmp_path, tiny_base, reverse_task):
    train, val = reverse_task
    common = ["--method", "rpo", "--model", tiny_base, "--data", train, "--val-data", val, "micro_batch_size=4",
              "global_batch_size=8", "trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.limit_val_batches=2",
              "trainer.log_every_n_steps=1", "optim.lr=0.01", "align.rpo_alpha=0.5"]
    _align(["--out", str(tmp_path / "one")] + common, 1)
    _align(["--out", str(tmp_path / "two")] + common + ["trainer.devices=2", "fsdp=true"], 2)
    one, two = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert [s for s, _ in one["losses"]] == [s for s, _ in two["losses"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    for key in ("val_loss", "val_rewards_accuracy", "val_rewards_margin"):
        assert two["best_metrics"][key] == pytest.approx(one["best_metrics"][key], rel=1e-4, abs=1e-6), key
    rows = lambda n: [r for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if "rewards_margin" in r]
    assert len(rows("one")) == len(rows("two")) == 3
    trained = [json.loads((tmp_path / n / "checkpoints" / "step_0000003" / "training_state" / "state.json")
                          .read_text())["state"]["tokens_trained"] for n in ("one", "two")]
    assert trained[0] == trained[1] > 3 * 8 * 2, trained  # completion tokens, not pairs, summed over the ranks
    for a, b in zip(rows("one"), rows("two")):
        assert b["rewards_margin"] == pytest.approx(a["rewards_margin"], rel=1e-4, abs=1e-6)
