"""Online RL (``lmforge align --method grpo|reinforce``): the loss against a hand computation, learning on a tiny
model, several optimizer steps per rollout (the clip acts), the reward function's bad inputs, and the PEFT path.
PPO has tests/align/test_ppo.py.

The learning test's reward is deliberately trivial: the fraction of completion characters that are ``a``. A
2-layer, 32-wide model with random weights cannot learn arithmetic or any real task in a CPU test's few seconds;
what the test proves is the loop itself (rollouts from the engine on the policy's live weights, rewards, group
advantages, the policy gradient): a reward the policy can raise only if those are right rises clearly within
ten steps (when it takes off depends on the sampling seeds: with these, after four to six steps). A sign error,
stale engine weights or a broken advantage would leave it flat or make it fall.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align import losses as L
from lmforge.cli import main


def _align(base, out, *extra) -> int:
    return main(["align", "--model", base, "--data", "prompts.jsonl", "--out", out, "align.max_completion_length=6",
                 "micro_batch_size=4", "global_batch_size=4", "trainer.log_every_n_steps=1", *extra])


def test_policy_loss_equals_a_hand_computation():
    """Two completions of three token slots (the second has two), ratios both inside and outside the clip range,
    positive and negative advantages, KL on: every value computed term by term with math."""
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
    old = torch.tensor([[-1.5, -0.45, -1.0], [-0.3, -2.0, -0.1]])
    ref = torch.tensor([[-1.1, -0.4, -2.5], [-0.2, -1.0, -0.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.8, -1.3])
    beta, eps = 0.05, 0.2
    losses, kl = L.policy_losses(logps, old, ref, adv, mask, beta, eps)
    want, want_kl = [], []
    for i in range(2):
        terms, kls = [], []
        for t in range(3):
            if not mask[i, t]:
                continue
            q = math.exp(logps[i, t].item() - old[i, t].item())
            a = adv[i].item()
            clipped = min(max(q, 1 - eps), 1 + eps)
            d = ref[i, t].item() - logps[i, t].item()
            k3 = math.exp(d) - d - 1
            terms.append(-(min(q * a, clipped * a) - beta * k3))
            kls.append(k3)
        want.append(sum(terms) / len(terms))
        want_kl.append(sum(kls) / len(kls))
    assert torch.allclose(losses, torch.tensor(want), atol=1e-6, rtol=0)
    assert torch.allclose(kl, torch.tensor(want_kl), atol=1e-6, rtol=0)
    # the clip acts here: without it the first completion's loss differs
    unclipped, _ = L.policy_losses(logps, old, ref, adv, mask, beta, epsilon=100.0)
    assert abs(unclipped[0] - losses[0]) > 1e-2


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]])
    mean, std = 0.5, math.sqrt(((0.5 ** 2) * 2) / 3)  # sample std of 1, 0, .5, .5
    grpo = L.group_advantages(r, "grpo")
    assert torch.allclose(grpo[0], torch.tensor([(x - mean) / (std + 1e-4) for x in (1.0, 0.0, 0.5, 0.5)]),
                          atol=1e-6)
    assert torch.equal(grpo[1], torch.zeros(4))  # a group with one reward teaches nothing
    rloo = L.group_advantages(r, "reinforce")
    assert torch.allclose(rloo[0], torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0.5 - 1.5 / 3, 0.5 - 1.5 / 3]), atol=1e-6)


def _rewards(out) -> list[float]:
    return [r["reward"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def test_grpo_raises_a_learnable_reward(rl_folder, tiny_base, capsys):
    assert _align(tiny_base, "grpo", "--method", "grpo", "--reward-fn", "rl_rewards:frac_a", "trainer.max_steps=10",
                  "optim.lr=0.05", "align.beta=0.01") == 0
    rewards = _rewards(rl_folder / "grpo")
    assert len(rewards) == 10
    assert ("rollouts: eager decode step (align.rollout_compile=auto: no CUDA device (cpu)); sampling in float32, the "
            "policy's own weights (no copy) (align.rollout_dtype=auto)") in capsys.readouterr().out
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3  # about 0.02 (1 character in 29) at the start
    assert last > first + 0.2, rewards
    rows = [json.loads(x) for x in (rl_folder / "grpo" / "metrics.jsonl").read_text().splitlines()]
    row = rows[-1]
    assert row["kl"] > 0 and 1 <= row["completion_length"] <= 7 and "reward_std" in row
    # one optimizer step per rollout (the default): the trained policy is the sampling one, the clip never acts
    assert all(r["clipfrac"] == 0 and r["approx_kl"] == 0 for r in rows)
    summary = json.loads((rl_folder / "grpo" / "summary.json").read_text())
    assert summary["method"] == "grpo" and summary["reference"] == "frozen_copy"


def test_several_optimizer_steps_per_rollout_make_the_clip_act(rl_folder, tiny_base, capsys):
    """align.ppo_epochs=2 x align.num_mini_batches=2: four optimizer steps per rollout, so from the second on the
    trained policy has moved from the sampling one (approx_kl > 0) and the clip takes tokens (clipfrac > 0)."""
    assert _align(tiny_base, "grpo4", "--method", "grpo", "--reward-fn", "rl_rewards:frac_a", "trainer.max_steps=1",
                  "optim.lr=0.05", "align.ppo_epochs=2", "align.num_mini_batches=2", "align.cliprange=0.1") == 0
    (row,) = [json.loads(x) for x in (rl_folder / "grpo4" / "metrics.jsonl").read_text().splitlines()]
    assert row["approx_kl"] > 1e-4 and row["clipfrac"] > 0, row
    # tokens_trained counts the sampled tokens (4 prompts x 4 completions of the logged mean length), not completions
    state = rl_folder / "grpo4" / "checkpoints" / "step_0000001" / "training_state" / "state.json"
    tokens = json.loads(state.read_text())["state"]["tokens_trained"]
    assert tokens == round(16 * row["completion_length"]) and tokens > 16, (tokens, row["completion_length"])


def test_bf16_mixed_rollouts_sample_in_bf16_from_a_copy(rl_folder, tiny_base, capsys):
    """trainer.precision=bf16-mixed keeps fp32 weights: the rollouts (align.rollout_dtype=auto) sample in bf16 from
    a copy of the policy, which the run's rollouts line names with its size; the step trains to finite metrics."""
    assert _align(tiny_base, "grpo_bf16", "--method", "grpo", "--reward-fn", "rl_rewards:frac_a",
                  "trainer.max_steps=1", "trainer.precision=bf16-mixed") == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("rollouts:"))
    assert "; sampling in bfloat16 from a copy of the policy (0.00 GiB" in line and "rollout_dtype=auto)" in line
    (row,) = [json.loads(x) for x in (rl_folder / "grpo_bf16" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(row["loss"]) and 1 <= row["completion_length"] <= 7, row


def test_reinforce_and_lora_run(rl_folder, tiny_base, capsys):
    """REINFORCE (RLOO) on a LoRA adapter: the reference is the model with its adapter off."""
    assert _align(tiny_base, "rl_lora", "--method", "reinforce", "--peft", "lora", "--reward-fn",
                  "rl_rewards:frac_a", "trainer.max_steps=2", "optim.lr=0.05", "peft.lora.r=4") == 0
    summary = json.loads((rl_folder / "rl_lora" / "summary.json").read_text())
    assert summary["reference"] == "adapters_off" and summary["adapter"] is not None
    rows = [json.loads(x) for x in (rl_folder / "rl_lora" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert kls[0] == 0.0 and kls[-1] > 0  # LoRA starts as the base model, then moves away from it


@pytest.mark.parametrize("fn, says", [
    ("raises", "reward function rl_rewards:raises raised ValueError: cannot score (scoring the completions of "
               "prompts.jsonl:1"),
    ("nan", "reward function rl_rewards:nan returned nan for completion 0 of the prompt of prompts.jsonl:1"),
    ("short", "reward function rl_rewards:short returned 1 values for 16 completions (4 prompts x "
              "align.num_generations=4) of prompts.jsonl:1"),
    ("missing", "--reward-fn rl_rewards:missing: module 'rl_rewards' has no function 'missing'"),
])
def test_bad_reward_functions_stop_with_one_line(rl_folder, tiny_base, capsys, fn, says):
    assert _align(tiny_base, "bad", "--method", "grpo", "--reward-fn", f"rl_rewards:{fn}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and says in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (rl_folder / "bad").exists()  # nothing written


def test_rollout_compile_true_on_cpu_is_refused(rl_folder, tiny_base, capsys):
    """align.rollout_compile=true asks for the CUDA-graph decode step, which a CPU run cannot give: one line,
    nothing written."""
    assert _align(tiny_base, "bad", "--method", "grpo", "--reward-fn", "rl_rewards:frac_a",
                  "align.rollout_compile=true") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: align.rollout_compile=true needs a CUDA GPU") and "Traceback" not in str(err)
    assert not (rl_folder / "bad").exists()


def test_a_reward_module_that_does_not_import(rl_folder, tiny_base, capsys):
    assert _align(tiny_base, "bad", "--method", "grpo", "--reward-fn", "no_such_module:f") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --reward-fn no_such_module:f: module 'no_such_module' does "
                                               "not import (ModuleNotFoundError"), err
    assert not (rl_folder / "bad").exists()


@pytest.mark.parametrize("overrides, says", [
    (["method=dpo", "align.num_generations=8"], "align.num_generations applies to grpo, reinforce and ppo, not dpo"),
    (["method=grpo", "align.reward_fn=m:f", "align.num_generations=1"], "align.num_generations=1 must be at least 2"),
    (["method=grpo"], "method=grpo needs a reward: a function (--reward-fn module:function"),
    (["method=ppo"], "method=ppo needs a reward: a function (--reward-fn module:function, align.reward_fn) or a "
                     "reward model (--reward-model PATH, align.reward_model)"),
    (["method=ppo", "align.reward_fn=m:f", "align.reward_model=rm"], "give one reward"),
    (["method=grpo", "align.reward_fn=m:f", "align.vf_coef=0.5"], "align.vf_coef applies to ppo"),
    (["method=grpo", "align.reward_fn=m:f", "align.num_mini_batches=3"], "align.num_mini_batches=3 must divide the "
                                                                         "rollout's 32 completions"),
    (["method=grpo", "align.reward_fn=m:f", "trainer.devices=2", "micro_batch_size=1", "global_batch_size=2",
      "align.num_generations=3", "align.num_mini_batches=2"],
     "align.num_mini_batches=2 must divide each of the 2 data-parallel ranks' 3 completions into equal shares"),
    (["method=reinforce", "align.reward_fn=m:f", "align.reference=precomputed"],
     "align.reference=precomputed: reinforce compares with"),
    (["method=grpo", "align.reward_fn=m:f", "peft.method=ptuning"], "--peft ptuning is not supported"),
    (["method=grpo", "align.reward_fn=m:f", "val_data=v.jsonl"], "has no validation pass yet"),
    (["method=grpo", "align.reward_fn=m:f", "align.rollout_compile=1"], "align.rollout_compile=1; use auto"),
    (["method=dpo", "align.rollout_compile=false"], "align.rollout_compile applies to grpo, reinforce and ppo"),
    (["method=grpo", "align.reward_fn=m:f", "align.rollout_dtype=float64"],
     "align.rollout_dtype='float64'; use auto (the trainer's compute dtype under mixed precision), float32, bfloat16 "
     "or float16"),
    (["method=dpo", "align.rollout_dtype=bfloat16"], "align.rollout_dtype applies to grpo, reinforce and ppo"),
])
def test_settings_online_rl_cannot_honour_are_refused(overrides, says):
    from lmforge.align.config import load_align_config
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=None) as e:
        load_align_config(None, ["model=m", "data=d.jsonl", *overrides])
    assert says in str(e.value)


def test_the_mini_batch_check_reads_the_run_layouts_data_parallel_size(monkeypatch):
    """align.num_mini_batches is checked against each data-parallel rank's share of the rollout, the data-parallel
    size read from the run's layout (lmforge.finetune.config.parallel_dims: what the stage trains with), not from
    trainer.devices x trainer.num_nodes: in a layout of 2-way tensor parallelism 4 processes are 2 data-parallel
    ranks. Alignment has no tensor-parallel key yet, so the layout is replaced here."""
    from lmforge.align import config as align_config
    from lmforge.errors import ConfigError
    from lmforge.parallel.dims import ParallelDims

    monkeypatch.setattr(align_config, "parallel_dims",
                        lambda cfg: ParallelDims(int(cfg.trainer.devices) * int(cfg.trainer.num_nodes), tp=2))
    base = ["model=m", "data=d.jsonl", "method=grpo", "align.reward_fn=m:f", "trainer.devices=4",
            "micro_batch_size=1", "global_batch_size=4", "align.num_generations=2"]  # 8 completions
    cfg = align_config.load_align_config(None, base + ["align.num_mini_batches=4"])  # 2 ranks x 4: 4 shares of 1
    assert cfg.align.num_mini_batches == 4
    with pytest.raises(ConfigError) as e:
        align_config.load_align_config(None, base + ["align.num_mini_batches=8"])
    assert "must divide each of the 2 data-parallel ranks' 4 completions" in str(e.value)
