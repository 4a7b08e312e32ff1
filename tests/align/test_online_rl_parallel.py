"""Online RL (grpo, ppo) on two torchrun ranks, plain data parallel and FSDP, against one process on the same
prompts and seeds: the same losses, logged statistics and updated weights (policy, PPO's critic, LoRA adapters), to
float32 tolerance. Each rank samples its share of the prompts with its own engine (seeds from the prompt's place in
the global batch), so a rank-dependent seed, a loss normalised by the rank's share, gradients not averaged, PPO
advantages whitened per rank or a critic left unsynchronised would each break the match. One torchrun launch runs
every two-rank case, the docs' torchrun command among them. Gradient checkpointing: one GRPO step with and without
it gives the same loss and gradients, with the checkpoint acting in the loss and never in the rollout.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from tests.align.conftest import REWARDS, save_tiny_base, write_jsonl
from tests.align.test_docs_commands import DOC, torchrun_commands
from tests.conftest import run_cases

WORDS = ["abcd", "bcda", "cdab", "dabc", "efgh", "fghe", "ghef", "hefg"]
COMMON = ["--model", "base", "--data", "prompts.jsonl", "--reward-fn", "rl_rewards:distinct",
          "align.max_completion_length=6", "global_batch_size=4", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
          "trainer.accelerator=cpu", "optim.lr=0.01", "align.beta=0.1", "trainer.gradient_clip_val=0.5"]
RUNS = {  # name: (arguments of both runs, arguments of the two-rank run alone)
    "grpo": (["--method", "grpo"], ["gradient_checkpointing=true"]),
    "ppo": (["--method", "ppo", "align.num_generations=2"], ["fsdp=true", "fsdp_sharded_checkpoint=false"]),
    "lora": (["--method", "grpo", "--peft", "lora"], ["fsdp=true"]),
}
TWO_RANKS = ["trainer.devices=2", "micro_batch_size=1"]  # 2 ranks x 2 micro batches of 1 prompt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run in one folder (the working folder of all of them): each of RUNS on one process (in this one) as
    ``NAME_one`` and on two ranks as ``NAME_two``, and the docs' torchrun command; returns (folder, two-rank runs)."""
    folder = tmp_path_factory.mktemp("rl_parallel")
    save_tiny_base(folder / "base")
    write_jsonl(folder / "prompts.jsonl", [{"prompt": w + ":", "word": w} for w in WORDS])
    (folder / "rl_rewards.py").write_text(REWARDS, encoding="utf-8")
    (reward,) = re.findall(r"`(def frac_a\(.*?)`", DOC.read_text(encoding="utf-8").replace("\n", " "))
    (folder / "rewards.py").write_text(reward.replace(": return", ":\n    return") + "\n", encoding="utf-8")
    (docs,) = torchrun_commands()
    launcher = "torchrun --nproc-per-node 2 -m lmforge "
    assert docs.startswith(launcher)  # run_cases launches its ranks as this does
    cases = [{"name": name, "args": ["align", "--out", f"{name}_two", *COMMON, *both, *TWO_RANKS, *two],
              "cwd": str(folder)} for name, (both, two) in RUNS.items()]
    ppo = ["align", "--out", "ppo_cut", *COMMON, *RUNS["ppo"][0], *TWO_RANKS, "fsdp=true"]  # sharded checkpoints
    cases += [{"name": "ppo_cut", "args": ppo + ["trainer.max_steps=1"], "cwd": str(folder)},
              {"name": "ppo_resumed", "args": ppo, "cwd": str(folder)}]
    cases.append({"name": "fsdp_bf16", "args": ["align", "--out", "fsdp_bf16", *COMMON, "--method", "grpo",
                                                 *TWO_RANKS, "fsdp=true", "trainer.precision=bf16-mixed"],
                  "cwd": str(folder)})
    cases.append({"name": "docs", "args": shlex.split(docs[len(launcher):]), "cwd": str(folder)})
    two = run_cases(cases, 2, folder / "logs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delitem(sys.modules, "rl_rewards", raising=False)
        for name, (both, _) in RUNS.items():
            assert main(["align", "--out", f"{name}_one", *COMMON, *both, "micro_batch_size=2"]) == 0
        sys.modules.pop("rl_rewards", None)
    return folder, two


def _summary(folder: Path, run: str) -> dict:
    return json.loads((folder / run / "summary.json").read_text())


def _logged(folder: Path, run: str) -> list[dict]:
    return [r for r in map(json.loads, (folder / run / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def _weights(folder: Path, run: str, part: str = "") -> dict:
    return load_file(str(folder / run / "checkpoints" / "step_0000002" / part / "model.safetensors"))


def _assert_two_ranks_match_one(folder: Path, name: str, keys: tuple, clipped: bool = True) -> None:
    one, two = _summary(folder, f"{name}_one"), _summary(folder, f"{name}_two")
    assert [s for s, _ in one["losses"]] == [s for s, _ in two["losses"]] == [1, 2]
    for (_, a), (_, b) in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    rows_one, rows_two = _logged(folder, f"{name}_one"), _logged(folder, f"{name}_two")
    assert len(rows_one) == len(rows_two) == 2
    for a, b in zip(rows_one, rows_two):
        assert a["consumed_samples"] == b["consumed_samples"]
        for key in keys:  # global means over both ranks' completions
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert rows_two[1]["kl"] > 0  # the reference acts
    assert rows_two[0]["grad_norm"] > 0.5 or not clipped  # trainer.gradient_clip_val=0.5 acts
    parts = [""] + (["critic"] if name == "ppo" else [])
    for part in parts:
        a, b = _weights(folder, f"{name}_one", part), _weights(folder, f"{name}_two", part)
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (part, k, (a[k] - b[k]).abs().max())


def test_grpo_on_two_data_parallel_ranks_matches_one_process(runs):
    """DDP (fsdp off), full weights with a frozen reference, gradient checkpointing on the two ranks only."""
    folder, two = runs
    out = two["grpo"].ok()
    assert "data parallel 2" in out and "FSDP" not in out
    _assert_two_ranks_match_one(folder, "grpo", ("reward", "reward_std", "kl", "entropy", "grad_norm",
                                                 "completion_length"))


def test_ppo_under_fsdp_matches_one_process(runs):
    """FSDP: the engine on a whole copy refreshed per rollout, the reference sharded, the critic replicated (its
    gradients averaged, one clip norm with the sharded policy's) and saved beside the gathered checkpoint."""
    folder, two = runs
    out = two["ppo"].ok()
    assert "FSDP full" in out and "rollouts: each rank samples its share of the prompts from a whole copy" in out
    _assert_two_ranks_match_one(folder, "ppo", ("reward", "kl", "value", "return", "policy_loss", "value_loss",
                                                "grad_norm"))
    assert (folder / "ppo_two" / "critic" / "model.safetensors").is_file()


def test_ppo_under_fsdp_resumes_from_a_sharded_checkpoint_as_if_uninterrupted(runs):
    """One step, then a second run resuming it: the sharded checkpoint holds the critic (whole, beside the policy's
    shards), and the resumed step is the uninterrupted run's second (the cosine schedule's first learning rate
    does not depend on trainer.max_steps)."""
    folder, two = runs
    two["ppo_cut"].ok()
    assert "resuming from" in two["ppo_resumed"].ok()
    last = folder / "ppo_cut" / "checkpoints" / "step_0000002"  # (step 1's, of the same layout: kept until then)
    assert (last / "model").is_dir() and (last / "critic" / "model.safetensors").is_file()
    (step, loss), = _summary(folder, "ppo_cut")["losses"]  # the resumed run's
    assert step == 2 and loss == pytest.approx(_summary(folder, "ppo_two")["losses"][1][1], rel=1e-5, abs=1e-7)
    a, b = (load_file(str(folder / run / "critic" / "model.safetensors")) for run in ("ppo_two", "ppo_cut"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def test_lora_grpo_under_fsdp_matches_one_process(runs):
    """FSDP with LoRA: the reference is the policy with its adapters off, run through the FSDP root."""
    folder, two = runs
    assert "FSDP full" in two["lora"].ok()
    _assert_two_ranks_match_one(folder, "lora", ("reward", "kl", "entropy", "grad_norm"), clipped=False)
    assert (folder / "lora_two" / "adapter").is_dir()


def test_fsdp_bf16_mixed_rollouts_sample_from_a_whole_bf16_copy(runs):
    """FSDP under bf16-mixed: the one rollout copy is both whole and in bf16 (align.rollout_dtype=auto), its
    trained weights gathered from the fp32 shards and cast into it once per rollout; both steps train."""
    folder, two = runs
    out = two["fsdp_bf16"].ok()
    line = next(x for x in out.splitlines() if x.startswith("rollouts: eager decode step"))
    assert "; sampling in bfloat16 from a copy of the policy (" in line, line
    assert "rollouts: each rank samples its share of the prompts from a whole copy" in out
    rows = _logged(folder, "fsdp_bf16")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and 1 <= r["completion_length"] <= 7 for r in rows), rows


def test_the_docs_torchrun_command_runs(runs):
    folder, two = runs
    out = two["docs"].ok()
    assert "FSDP full" in out
    summary = _summary(folder, "grpo_fsdp")
    assert summary["method"] == "grpo" and summary["steps"] == 2 and summary["world_size"] == 2


def test_gradient_checkpointing_leaves_a_grpo_step_unchanged(monkeypatch):
    """One GRPO step (rollout, reference, loss, backward) on the same weights with and without checkpointing, for
    each kind (whole blocks, chunks of two, the first block only, NeMo's selective core attention): the same
    completions, loss and gradients. The checkpoint acts in the loss's forward and never in the rollout or the
    no-grad forwards (reference log-probabilities)."""
    from lmforge.align.config import AlignSection
    from lmforge.align.rl import RolloutLoss
    from lmforge.parallel import transforms
    from lmforge.parallel.transforms import apply_activation_checkpointing
    from tests.align.test_rollout_engine import PROMPTS, _Ids, _model

    calls = []
    real = transforms.checkpoint
    monkeypatch.setattr(transforms, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = AlignSection(num_generations=3, max_completion_length=6, reward_fn="json:loads", beta=0.1)
    batch = {"tokens": torch.tensor([p + [0] * (4 - len(p)) for p in PROMPTS]),
             "lengths": torch.tensor([len(p) for p in PROMPTS]), "index": torch.arange(len(PROMPTS))}
    # (granularity, method, num_layers) -> checkpointed regions in the loss's forward of the 2-layer model
    kinds = {None: 0, ("full", None, None): 2, ("full", "uniform", 2): 1, ("full", "block", 1): 1,
             ("selective", "uniform", None): 2}
    results = []
    for kind, regions in kinds.items():
        model = _model()
        reference = copy.deepcopy(model).requires_grad_(False)
        if kind:
            apply_activation_checkpointing(model, *kind)
        rl = RolloutLoss(model, "grpo", settings, None, _Ids(), reference, 16, 7, 6)
        rl.rewards = lambda index, completions, prompts: torch.tensor([len(set(c)) / 6 for c in completions])
        calls.clear()
        exp = rl.collect([batch], 0, contextlib.nullcontext)
        assert calls == [], kind  # the rollout and the reference: plain forwards
        rl._exp = exp
        loss = rl(torch.arange(exp["rows"].shape[0]))
        loss.backward()
        assert len(calls) == regions, kind
        results.append((exp["rows"], loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    rows_a, loss_a, grads_a = results[0]
    assert any(g.abs().max() > 0 for g in grads_a.values())
    for kind, (rows_b, loss_b, grads_b) in zip(list(kinds)[1:], results[1:]):
        assert torch.equal(rows_a, rows_b), kind
        assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7), kind
        assert sorted(grads_a) == sorted(grads_b), kind
        for name in grads_a:
            assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), (kind, name)
