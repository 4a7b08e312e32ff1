"""`lmforge align --method rm` trains a Bradley-Terry reward model whose reward_model/ folder
transformers.AutoModelForSequenceClassification loads to the same scores `lmforge reward` gives; `lmforge reward`
reports held-out accuracy and writes one line of scores per record."""

from __future__ import annotations

import json

import torch

from lmforge.cli import main
from tests.align.conftest import write_jsonl


def letters_task(n: int, seed: int) -> list[dict]:
    """Prefer a word of the letters a-d over one of e-h (a reward a tiny model learns in a few steps)."""
    import random

    rng = random.Random(seed)
    word = lambda letters: "".join(rng.choice(letters) for _ in range(rng.randrange(2, 6)))  # noqa: E731
    return [{"prompt": word("abcdefgh") + ":", "chosen": word("abcd"), "rejected": word("efgh")} for _ in range(n)]


def test_reward_model_trains_exports_and_scores(tiny_base, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", letters_task(256, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", letters_task(64, seed=2))
    out = tmp_path / "rm"
    assert main(["align", "--method", "rm", "--model", tiny_base, "--data", train, "--val-data", held,
                 "--out", str(out), "trainer.max_steps=12", "optim.lr=0.01", "micro_batch_size=32",
                 "global_batch_size=32", "trainer.val_check_interval=12"]) == 0
    capsys.readouterr()
    folder = out / "reward_model"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]

    scores = tmp_path / "scores.jsonl"
    assert main(["reward", str(out), "--data", held, "--out", str(scores)]) == 0
    summary = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert summary["pairs"] == len(lines) == 64
    assert summary["accuracy"] == sum(r["correct"] for r in lines) / 64 and summary["accuracy"] >= 0.9
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_rewards_accuracy" in x]
    assert val[-1]["val_rewards_accuracy"] == summary["accuracy"]  # the run's validation scored the same pairs
    assert "val_loss" in val[-1] and "val_ppl" not in val[-1]  # a ranking loss has no perplexity

    # Hugging Face's sequence-classification model gives the same scores on the same token ids
    from transformers import AutoModelForSequenceClassification

    from lmforge.align.config import AlignSection
    from lmforge.align.data import load_pairs
    from lmforge.data.tokenizers import load_tokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(folder).float().eval()
    ds = load_pairs(held, load_tokenizer(folder), AlignSection(), None, 32, add_eos=False)
    for i in range(4):
        for side, key in enumerate(("chosen", "rejected")):
            ids = torch.tensor([ds[i]["sides"][side].ids])
            with torch.no_grad():
                got = float(hf(input_ids=ids).logits[0, 0])
            assert abs(got - lines[i][key]) < 1e-4, (i, key, got, lines[i][key])
    # a padded batch scores the same in Hugging Face too (it reads the last token that is not the pad)
    batch = ds.collate([ds[i] for i in range(4)])
    rows = batch["tokens"][:, 0]
    with torch.no_grad():
        padded = hf(input_ids=rows, attention_mask=(rows != hf.config.pad_token_id).long()).logits[:, 0]
    torch.testing.assert_close(padded, torch.tensor([lines[i]["chosen"] for i in range(4)]), atol=1e-4, rtol=1e-4)


def test_reward_refuses_a_model_without_a_score_head(tiny_base, reverse_task, capsys):
    assert main(["reward", tiny_base, "--data", reverse_task[1]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a sequence-classification (reward) model" in err
