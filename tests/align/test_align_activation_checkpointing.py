"""`lmforge align`'s activation-checkpointing keys (fine-tuning's, NeMo's meaning): a DPO step and a PPO step with
NeMo's ``selective`` and with ``full`` + ``block`` + one layer run exactly as without (same metrics, same weights),
each key acting (on the policy, and on PPO's critic too); ``gradient_checkpointing`` is their shorthand, and the two
saying different things is one error line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from tests.align.conftest import pair_records, reverse_words, write_jsonl

#: what each run sets -> the setting applied to each model
KINDS = {
    "none": ([], None),
    "selective": (["activations_checkpoint_granularity=selective", "activations_checkpoint_method=uniform"],
                  ("selective", None, None)),
    "block": (["activations_checkpoint_granularity=full", "activations_checkpoint_method=block",
               "activations_checkpoint_num_layers=1"], ("full", "block", 1)),
}


def _applied(monkeypatch) -> list:
    """The settings apply_activation_checkpointing applies (one per model it transforms), recorded."""
    from lmforge.parallel import transforms

    applied, real = [], transforms._plan

    def plan(*args, **kwargs):
        out = real(*args, **kwargs)
        if args[3] is not None:  # a model's layer count: applied to a model (not a config's check)
            applied.append(out)
        return out

    monkeypatch.setattr(transforms, "_plan", plan)
    return applied


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _same_runs(folder, names, metrics, parts=("",)):
    """The runs ``names`` logged the same ``metrics`` and saved the same weights (``parts``: checkpoint sub-folders)."""
    first = folder / names[0]
    for name in names[1:]:
        for a, b in zip(_rows(first), _rows(folder / name), strict=True):
            for key in metrics:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, key)
        for part in parts:
            wa = load_file(str(first / "checkpoints" / "step_0000001" / part / "model.safetensors"))
            wb = load_file(str(folder / name / "checkpoints" / "step_0000001" / part / "model.safetensors"))
            assert sorted(wa) == sorted(wb)
            for k in wa:
                assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), (name, part, k)


def test_a_dpo_step_is_the_same_with_each_kind_of_checkpointing(tiny_base, tmp_path, monkeypatch):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(reverse_words(4, seed=5)))
    applied = _applied(monkeypatch)
    for name, (keys, setting) in KINDS.items():
        applied.clear()
        assert main(["align", "--method", "dpo", "--model", tiny_base, "--data", pairs, "--out",
                     str(tmp_path / name), "trainer.max_steps=1", "micro_batch_size=4", "global_batch_size=4",
                     "trainer.log_every_n_steps=1", *keys]) == 0
        assert applied == ([setting] if setting else []), name  # the policy
    _same_runs(tmp_path, list(KINDS), ("loss", "rewards_chosen", "rewards_rejected"))


def test_a_ppo_step_is_the_same_with_each_kind_of_checkpointing(rl_folder, tiny_base, monkeypatch):
    applied = _applied(monkeypatch)
    for name, (keys, setting) in KINDS.items():
        applied.clear()
        assert main(["align", "--method", "ppo", "--model", tiny_base, "--data", "prompts.jsonl", "--out", name,
                     "--reward-fn", "rl_rewards:distinct", "align.max_completion_length=6", "micro_batch_size=4",
                     "global_batch_size=4", "align.num_generations=1", "trainer.max_steps=1", *keys]) == 0
        assert applied == ([setting] * 2 if setting else []), name  # the critic, then the policy
    _same_runs(rl_folder, list(KINDS), ("reward", "policy_loss", "value_loss", "value", "kl"), ("", "critic"))


@pytest.mark.parametrize("keys, says", [
    (["gradient_checkpointing=false", "activations_checkpoint_granularity=full"],
     "error: gradient_checkpointing=false turns activation checkpointing off, but "
     "activations_checkpoint_granularity=full turns it on; set one of them"),
    (["gradient_checkpointing=true", "activations_checkpoint_granularity=selective"],
     "error: gradient_checkpointing=true means activations_checkpoint_granularity=full, not selective"),
    (["activations_checkpoint_granularity=selective", "activations_checkpoint_num_layers=2"],
     "error: activations_checkpoint_num_layers=2 must be null with activations_checkpoint_granularity=selective"),
    (["activations_checkpoint_granularity=lora"],
     "error: activations_checkpoint_granularity=lora keeps the LoRA products of each block, but --peft none"),
])
def test_settings_that_disagree_are_one_error_line(tiny_base, tmp_path, capsys, keys, says):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_records(reverse_words(4, seed=5)))
    assert main(["align", "--model", tiny_base, "--data", pairs, "--out", str(tmp_path / "bad"), *keys]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(says), err
    assert not (tmp_path / "bad").exists()


def test_gradient_checkpointing_is_full_and_agrees_with_it():
    from lmforge.align.config import load_align_config

    full = dict(granularity="full", method="uniform", num_layers=1)
    for keys in (["gradient_checkpointing=true"], ["activations_checkpoint_granularity=full"],
                 ["gradient_checkpointing=true", "activations_checkpoint_granularity=full"]):
        assert load_align_config(None, ["model=m", "data=d", *keys]).activations_checkpoint == full, keys
    for keys in ([], ["gradient_checkpointing=false"]):
        assert load_align_config(None, ["model=m", "data=d", *keys]).activations_checkpoint is None, keys
    lora = load_align_config(None, ["model=m", "data=d", "peft.method=lora", "method=ppo",
                                    "align.reward_fn=m:f", "align.num_generations=1",
                                    "activations_checkpoint_granularity=lora"])
    assert lora.activations_checkpoint == dict(granularity="lora", method=None, num_layers=None)
    assert lora.critic_activations_checkpoint == dict(granularity="full", method=None, num_layers=None)
