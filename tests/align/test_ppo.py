"""PPO (``lmforge align --method ppo``): GAE, the per-token rewards and the clipped policy and value losses against
references written apart (numpy loops, plain math), learning on the tiny model with the trivial reward of
tests/align/test_online_rl.py (the fraction of completion characters that are ``a``), the critic saved in the run
folder and resumed to the same numbers, LoRA with a full critic, and bad input as one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.align import losses as L
from lmforge.cli import main


def _ppo(base, out, *extra) -> int:
    return main(["align", "--method", "ppo", "--model", base, "--data", "prompts.jsonl", "--out", out,
                 "align.max_completion_length=6", "micro_batch_size=4", "global_batch_size=4",
                 "trainer.log_every_n_steps=1", *extra])


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# -- the pieces against references -----------------------------------------------------------------------------

def _gae_reference(rewards, values, mask, gamma, lam):
    """Per row: the completion's slice, TD errors with V after the last token 0, the backward recursion."""
    adv = np.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        cols = np.flatnonzero(mask[i])
        r, v = rewards[i, cols], values[i, cols]
        v_next = np.append(v[1:], 0.0)
        running = 0.0
        for k in reversed(range(len(cols))):
            running = (r[k] + gamma * v_next[k] - v[k]) + gamma * lam * running
            adv[i, cols[k]] = running
    return adv, (adv + values) * mask


def test_gae_equals_a_numpy_reference():
    """Two rows: a completion after a two-token prompt with padding after it, and one filling the row; values
    and rewards outside the completions are junk that must not leak in."""
    rewards = np.array([[9.0, 9.0, 0.1, -0.2, 1.5, 9.0], [0.3, 0.0, -0.1, 0.2, 0.0, 2.0]], dtype=np.float32)
    values = np.array([[7.0, 7.0, 0.5, 0.4, 0.9, 7.0], [0.2, 0.1, 0.3, -0.4, 0.6, 0.8]], dtype=np.float32)
    mask = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
        adv, ret = L.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma, lam)
        want_adv, want_ret = _gae_reference(rewards * mask, values * mask, mask, gamma, lam)
        np.testing.assert_allclose(adv.numpy(), want_adv, atol=1e-6)
        np.testing.assert_allclose(ret.numpy(), want_ret, atol=1e-6)
    # lam = 1, gamma = 1: the advantage is the sum of the rewards still to come less the value
    adv, _ = L.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), 1.0, 1.0)
    assert adv[0, 2].item() == pytest.approx(0.1 - 0.2 + 1.5 - 0.5, abs=1e-6)


def test_token_rewards_and_whitening():
    logps = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.4, -0.9, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -3.0], [-0.1, -0.4, -0.2, -2.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0])
    r = L.token_rewards(logps, ref, scores, mask, 0.1)
    want = [[0.0, -0.1 * (-2.0 + 1.0), -0.1 * 0.0 + 2.0, 0.0],
            [-0.1 * -0.2, -0.1 * 0.0, -0.1 * -0.7, -0.1 * 1.0 - 1.0]]
    assert torch.allclose(r, torch.tensor(want), atol=1e-6)
    r_abs = L.token_rewards(logps, ref, scores, mask, 0.1, absolute_kl=True)
    assert r_abs[1, 0].item() == pytest.approx(-0.02) and r_abs[1, 3].item() == pytest.approx(-1.1)
    x = torch.tensor([[5.0, 1.0, 2.0, 5.0], [3.0, 4.0, 0.0, 0.0]])
    m = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = L.whiten(x, m)
    kept = np.array([1.0, 2.0, 3.0, 4.0])
    ref_w = (kept - kept.mean()) / math.sqrt(kept.var() + 1e-8)
    np.testing.assert_allclose(w[m].numpy(), ref_w, atol=1e-6)
    assert w[~m].abs().sum() == 0


def test_clipped_policy_and_value_losses_equal_plain_math():
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
    old = torch.tensor([[-1.5, -0.45, -1.0], [-0.3, -2.0, -0.1]])
    adv = torch.tensor([[0.8, -0.4, 1.1], [-1.3, 0.6, 2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    eps = 0.2
    loss, clipped = L.clipped_surrogate(logps, old, adv, eps)
    for i in range(2):
        for t in range(3):
            q = math.exp(logps[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            c = min(max(q, 1 - eps), 1 + eps)
            assert loss[i, t].item() == pytest.approx(-min(q * a, c * a), abs=1e-6)
            assert bool(clipped[i, t]) == (c * a < q * a)
    assert clipped.any() and not clipped.all()  # the numbers reach both sides

    values = torch.tensor([[0.5, 1.0, -0.2], [0.0, 0.9, 0.3]])
    old_v = torch.tensor([[0.1, 1.05, 0.4], [0.25, 0.2, 0.3]])
    returns = torch.tensor([[1.0, 0.0, 0.5], [-0.5, 0.1, 9.0]])
    cv = 0.2
    vl, vclipped = L.value_losses(values, old_v, returns, mask, cv)
    for i in range(2):
        terms = []
        for t in range(3):
            if not mask[i, t]:
                continue
            v, o, R = values[i, t].item(), old_v[i, t].item(), returns[i, t].item()
            vc = min(max(v, o - cv), o + cv)
            terms.append(0.5 * max((v - R) ** 2, (vc - R) ** 2))
            assert bool(vclipped[i, t]) == ((vc - R) ** 2 > (v - R) ** 2)
        assert vl[i].item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)


# -- end to end ------------------------------------------------------------------------------------------------

def test_ppo_raises_a_learnable_reward_and_keeps_its_critic(rl_folder, tiny_base, capsys):
    """Two epochs of two mini batches per rollout: the clip acts, the critic learns, the reward rises."""
    assert _ppo(tiny_base, "ppo", "--reward-fn", "rl_rewards:frac_a", "trainer.max_steps=5", "optim.lr=0.03",
                "align.ppo_epochs=2", "align.num_mini_batches=2", "align.beta=0.01") == 0
    rows = _rows(rl_folder / "ppo")
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 5
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2  # about 0.01 at the start
    assert last > first + 0.1, rewards
    assert all(r["value_loss"] > 0 and r["entropy"] > 0 for r in rows)
    assert any(r["clipfrac"] > 0 for r in rows) and any(r["approx_kl"] > 1e-4 for r in rows)
    assert rows[-1]["kl"] != 0
    summary = json.loads((rl_folder / "ppo" / "summary.json").read_text())
    assert summary["method"] == "ppo" and summary["critic"] == "ppo/critic"
    from safetensors.torch import load_file

    critic = load_file(str(rl_folder / "ppo" / "critic" / "model.safetensors"))
    assert critic["score.weight"].shape == (1, 32) and critic["score.weight"].abs().sum() > 0  # from 0, learned
    assert json.loads((rl_folder / "ppo" / "critic" / "config.json").read_text())["model"]["hidden_size"] == 32
    assert (rl_folder / "ppo" / "checkpoints" / "step_0000005" / "critic" / "training_state").is_dir()


def test_a_resumed_ppo_run_continues_with_its_critic(rl_folder, tiny_base, capsys):
    """Two steps at once, or one and then one more after a restart: the same policy and critic (the critic and its
    optimizer come back from the checkpoint; a critic started afresh would differ; a constant learning rate keeps
    the schedules the same)."""
    from safetensors.torch import load_file

    common = ["--reward-fn", "rl_rewards:frac_a", "optim.lr=0.02", "optim.min_lr=0.02", "align.num_mini_batches=2",
              "align.num_generations=2"]
    assert _ppo(tiny_base, "once", *common, "trainer.max_steps=2") == 0
    assert _ppo(tiny_base, "twice", *common, "trainer.max_steps=1") == 0
    assert _ppo(tiny_base, "twice", *common, "trainer.max_steps=2") == 0
    summary = json.loads((rl_folder / "twice" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_0000001")
    for part in ("critic", "checkpoints/step_0000002"):
        a = load_file(str(rl_folder / "once" / part / "model.safetensors"))
        b = load_file(str(rl_folder / "twice" / part / "model.safetensors"))
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (part, k)
    # a new run's critic may start from a finished run's (align.critic_model=RUN or RUN/critic): its values are not
    # the zero head's 0
    assert _ppo(tiny_base, "again", *common, "trainer.max_steps=1", "align.critic_model=once") == 0
    assert _rows(rl_folder / "again")[0]["value"] != 0
    assert _rows(rl_folder / "once")[0]["value"] == 0  # from the policy with a zero head


def test_vf_coef_weighs_the_value_loss_in_the_shared_clip(rl_folder, tiny_base, capsys):
    """The policy's and the critic's gradients are clipped as one (trainer.gradient_clip_val): with the clip acting,
    a larger align.vf_coef takes more of the norm for the critic and leaves the policy a smaller gradient."""
    from safetensors.torch import load_file

    # a reward above 0 for every completion (frac_a is 0 for all 8 completions of a draw without an `a`: no gradient)
    common = ["--reward-fn", "rl_rewards:distinct", "trainer.max_steps=1", "align.num_generations=2",
              "trainer.gradient_clip_val=0.01", "optim.lr=0.01"]
    assert _ppo(tiny_base, "vf_small", *common, "align.vf_coef=0.01") == 0
    assert _ppo(tiny_base, "vf_large", *common, "align.vf_coef=10") == 0
    base = load_file(str(rl_folder / "vf_small" / "checkpoints" / "step_0000001" / "model.safetensors"))
    big = load_file(str(rl_folder / "vf_large" / "checkpoints" / "step_0000001" / "model.safetensors"))
    from lmforge.train.checkpoint import load_model

    first, _ = load_model(tiny_base, device="cpu")
    moved_small = sum(float((base[k] - first[k]).abs().sum()) for k in first)
    moved_large = sum(float((big[k] - first[k]).abs().sum()) for k in first)
    # AdamW divides most of a gradient's scale away (the clip acts through its epsilon), so the step shrinks only a
    # little; a vf_coef that did not act, or a clip of its own per model, would give the same weights bit for bit
    assert moved_small - moved_large > 1e-3, (moved_small, moved_large)


def test_ppo_with_lora_trains_a_full_critic(rl_folder, tiny_base, capsys):
    assert _ppo(tiny_base, "ppo_lora", "--peft", "lora", "--reward-fn", "rl_rewards:frac_a", "trainer.max_steps=1",
                "peft.lora.r=4", "align.num_generations=2") == 0
    summary = json.loads((rl_folder / "ppo_lora" / "summary.json").read_text())
    assert summary["adapter"] is not None and summary["reference"] == "adapters_off"
    from safetensors.torch import load_file

    critic = load_file(str(rl_folder / "ppo_lora" / "critic" / "model.safetensors"))
    assert "layers.0.self_attn.q_proj.weight" in critic and not any("lora" in k for k in critic)


@pytest.mark.parametrize("extra, says", [
    (["--reward-fn", "rl_rewards:frac_a", "align.critic_model=no_such_critic"],
     "error: align.critic_model=no_such_critic does not exist: give a reward model"),
    ([], "error: method=ppo needs a reward: a function (--reward-fn module:function, align.reward_fn) or "
         "a reward model (--reward-model PATH, align.reward_model)"),
])
def test_bad_ppo_input_is_one_line(rl_folder, tiny_base, capsys, extra, says):
    assert _ppo(tiny_base, "bad", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(says), err
    assert not (rl_folder / "bad").exists()
