"""DPO learns a preference the base model does not have (reverse the word) and generalises to held-out words;
the run folder is a fine-tuning-like run: metrics with reward accuracies and margins, TensorBoard events, the loss
curve, and `lmforge convert OUT DST --to hf` exports it."""

from __future__ import annotations

import json

import torch

from lmforge.cli import main


def held_out_accuracy(model_path, pairs_file) -> float:
    """Fraction of pairs whose chosen completion the model finds likelier than the rejected one."""
    from lmforge.align.data import load_pairs
    from lmforge.align.config import AlignSection
    from lmforge.align.objective import sequence_logps
    from lmforge.open import load_for_inference

    model, tok = load_for_inference(model_path, device="cpu", dtype="float32")
    ds = load_pairs(pairs_file, tok, AlignSection(), None, 32)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        c = sequence_logps(model, batch["tokens"][:, 0], batch["mask"][:, 0])[0]
        r = sequence_logps(model, batch["tokens"][:, 1], batch["mask"][:, 1])[0]
    return float((c > r).float().mean())


def test_dpo_learns_to_prefer_the_reversed_word(tiny_base, reverse_task, tmp_path, capsys):
    train, held = reverse_task
    before = held_out_accuracy(tiny_base, held)
    assert 0.3 <= before <= 0.7, before  # the base model has no such preference
    out = tmp_path / "dpo"
    assert main(["align", "--method", "dpo", "--model", tiny_base, "--data", train, "--val-data", held,
                 "--out", str(out), "trainer.max_steps=40", "optim.lr=0.01", "align.beta=0.5",
                 "micro_batch_size=32", "global_batch_size=32", "trainer.val_check_interval=20",
                 "trainer.log_every_n_steps=10"]) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert progress and all("examples/s" in line and "tok/s" not in line for line in progress)  # what it counts
    after = held_out_accuracy(out, held)
    assert after >= 0.9, (before, after)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "rewards_accuracy" in r]
    assert train_rows and all({"rewards_chosen", "rewards_rejected", "rewards_margin"} <= set(r) for r in train_rows)
    assert all("examples_per_s" in r and "tokens_per_s" not in r for r in train_rows)  # the rate counts pairs
    val = [r for r in rows if "val_rewards_accuracy" in r]
    assert all("val_loss" in r and "val_ppl" not in r for r in val)  # a preference loss has no perplexity
    assert len(val) == 2 and val[-1]["val_rewards_accuracy"] > max(0.6, val[0]["val_rewards_accuracy"])
    assert val[-1]["val_rewards_margin"] > val[0]["val_rewards_margin"] > 0
    assert (out / "loss_curve.png").stat().st_size > 0 and list(out.glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "precomputed" and summary["steps"] == 40

    # the run exports like a fine-tuning run, and the exported model scores the same
    assert main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf"]) == 0
    from transformers import AutoModelForCausalLM

    from lmforge.open import load_for_inference

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    ours, _ = load_for_inference(out, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4, 9, 4, 3, 2, 1]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
