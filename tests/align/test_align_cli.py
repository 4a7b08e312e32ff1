"""`lmforge align` on each method, with PEFT, and its refusals of bad data (one `error:` line naming the file and
line, exit code 2, nothing written)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.cli import main
from tests.align.conftest import pair_records, reverse_words, write_jsonl

SMALL = ["trainer.max_steps=2", "micro_batch_size=4", "global_batch_size=4", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "pairs.jsonl", pair_records(reverse_words(8, seed=5)))


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    words = reverse_words(8, seed=6)
    recs = [{"prompt": w + ":", "completion": w[::-1] if i % 2 else w, "label": bool(i % 2)} for i, w in enumerate(words)]
    return write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", recs)


def _tokens_trained(out, step: int) -> int:
    """``tokens_trained`` of the run in ``out`` at its checkpoint of ``step`` (what resuming carries on from)."""
    state = out / "checkpoints" / f"step_{step:07d}" / "training_state" / "state.json"
    return json.loads(state.read_text())["state"]["tokens_trained"]


@pytest.mark.parametrize("method", ["ipo", "rpo", "orpo", "simpo"])
def test_each_pair_method_trains(tiny_base, small_pairs, tmp_path, method):
    out = tmp_path / method
    assert main(["align", "--method", method, "--model", tiny_base, "--data", small_pairs, "--out", str(out),
                 *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss_last"])
    assert summary["reference"] == ("precomputed" if method in ("ipo", "rpo") else None)
    # tokens, not pairs: 2 steps x 4 pairs x 2 completions x (4 letters + EOS)
    assert _tokens_trained(out, 2) == 2 * 4 * 2 * 5


@pytest.mark.parametrize("shared, per_pair", [(True, 5 + 4 + 4), (False, 2 * (5 + 4))])
def test_a_reward_models_tokens_trained_are_its_rows_tokens(tiny_base, small_pairs, tmp_path, shared, per_pair):
    """A reward model trains on whole rows (its score reads the sequence): tokens_trained counts every token of
    them, the prompt ("abcd:", 5) once in a shared row, once per side in two rows, and each side's 4 letters (a
    reward model's rows end without EOS)."""
    out = tmp_path / "rm"
    assert main(["align", "--method", "rm", "--model", tiny_base, "--data", small_pairs, "--out", str(out),
                 f"align.shared_prompt={str(shared).lower()}", *SMALL]) == 0
    assert _tokens_trained(out, 2) == 2 * 4 * per_pair


def test_kto_trains_and_logs_its_kl(tiny_base, kto_file, tmp_path):
    out = tmp_path / "kto"
    assert main(["align", "--method", "kto", "--model", tiny_base, "--data", kto_file, "--out", str(out), *SMALL]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "kl" in r]
    assert logged and all(r["kl"] >= 0 and "rewards_chosen" in r and "rewards_rejected" in r for r in logged)
    assert not any("#" in key for r in rows for key in r)  # counts divide their own statistic, never logged
    assert _tokens_trained(out, 2) == 2 * 4 * 5  # steps x examples x (4 letters + EOS); not the KL side's


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_peft_dpo_uses_the_base_with_adapters_off_as_reference(tiny_base, small_pairs, tmp_path, peft):
    """LoRA (B = 0) and IA3 (scales 1) start as the base model, so the first step's loss is exactly log 2; the
    adapter is written, and switched off it gives the base model again."""
    out = tmp_path / peft
    assert main(["align", "--method", "dpo", "--model", tiny_base, "--data", small_pairs, "--out", str(out),
                 "--peft", peft, "optim.lr=0.05", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "adapters_off" and summary["peft"] == peft
    assert summary["losses"][0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    from lmforge.open import load_for_inference
    from lmforge.peft import adapters_disabled, apply_adapter

    base, _ = load_for_inference(tiny_base, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4, 9]])
    with torch.no_grad():
        want = base(ids)
        tuned = apply_adapter(base, out / "adapter")
        assert not torch.allclose(tuned(ids), want)  # the adapter learned something
        with adapters_disabled(tuned):
            torch.testing.assert_close(tuned(ids), want)  # ... and switched off it is the base model


def _bad(tmp_path, records, method="dpo"):
    return write_jsonl(tmp_path / "bad.jsonl", records)


@pytest.mark.parametrize("method,records,says", [
    ("dpo", [{"prompt": "ab:", "chosen": "ba", "rejected": "ab"}, {"prompt": "cd:", "chosen": "dc", "rejected": "dc"}],
     ":2: 'chosen' and 'rejected' are identical"),
    ("dpo", [{"prompt": "ab:", "chosen": "ba"}], ":1: the record has no 'rejected' field"),
    ("rm", [{"prompt": "ab:", "chosen": "ba", "rejected": "ab", "margin": "big"}], ":1: field 'margin' must be a number"),
    ("kto", [{"prompt": "ab:", "completion": "ba", "label": True}, {"prompt": "ab:", "completion": "ab", "label": "no"}],
     ":2: field 'label' must be true (desirable) or false (undesirable), not \"no\""),
    ("kto", [{"prompt": "ab:", "completion": "ba", "label": 1}], ":1: field 'label' must be true"),
])
def test_bad_records_are_one_error_line_naming_the_line(tiny_base, tmp_path, capsys, method, records, says):
    data = _bad(tmp_path, records)
    out = tmp_path / "out"
    assert main(["align", "--method", method, "--model", tiny_base, "--data", data, "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}{says}"), err
    assert not out.exists()  # nothing half-written


def test_bad_settings_are_refused_before_any_work(tiny_base, small_pairs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["align", "--method", "dpo", "--model", tiny_base, "--data", small_pairs, "--out", str(out),
                 "align.reference=adapters_off"]) == 2
    assert "align.reference=adapters_off needs a PEFT method" in capsys.readouterr().err
    assert main(["align", "--method", "dpo", "--model", tiny_base, "--data", small_pairs, "align.bta=1"]) == 2
    assert "Did you mean: 'beta'" in capsys.readouterr().err
    assert not out.exists()
