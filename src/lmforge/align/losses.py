"""Preference losses as plain functions of sequence log-probabilities (one value per example).

Every function takes the policy's (and, where the method has one, the reference model's) log-probabilities of
the completions and returns ``(losses, chosen_rewards, rejected_rewards)``: one loss per example and the
implicit rewards that accuracies and margins are logged from. Notation: ``pc``/``pr`` the policy's summed
log-probabilities of the chosen/rejected completion, ``rc``/``rr`` the reference's, ``avg`` a per-token mean.

* DPO (Rafailov et al. 2023), with cDPO label smoothing ``e``:
  ``-(1-e) logsig(b d) - e logsig(-b d)``, ``d = (pc - rc) - (pr - rr)``.
* IPO (Azar et al. 2023), on per-token means: ``(d_avg - 1/(2b))^2``.
* RPO (Pang et al. 2024): DPO plus ``alpha`` x the chosen completion's negative log-likelihood (per token).
* KTO (Ethayarajh et al. 2024): desirable ``w_d (1 - sig(b (pc - rc - z)))``, undesirable
  ``w_u (1 - sig(b (z - (pr - rr))))``, ``z = max(0, mean(KL pairs' policy - reference log-probs))``, detached.
* ORPO (Hong et al. 2024), on per-token means: ``NLL(chosen) - b logsig(log odds(pc_avg) - log odds(pr_avg))``,
  ``log odds(p) = p - log(1 - exp(p))``.
* SimPO (Meng et al. 2024), on per-token means: ``-(1-e) logsig(b (pc_avg - pr_avg) - g) - e logsig(-...)``.
* Reward model (Bradley-Terry): ``-logsig(r_chosen - r_rejected - margin)``.
* Attribute model (SteerLM's regression reward model): the squared error of each labelled attribute,
  ``(prediction - label)^2``; unlabelled attributes (mask 0) count nothing. The step loss is their sum over the
  global batch divided by the number of labelled values (a masked mean squared error).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1-e) logsig(x) - e logsig(-x)``: the logistic loss with labels flipped with probability ``e``."""
    return -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_losses(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return _smoothed(chosen - rejected, label_smoothing), chosen.detach(), rejected.detach()


def ipo_losses(pc_avg, pr_avg, rc_avg, rr_avg, beta: float):
    d = (pc_avg - rc_avg) - (pr_avg - rr_avg)
    return (d - 1.0 / (2.0 * beta)) ** 2, (beta * (pc_avg - rc_avg)).detach(), (beta * (pr_avg - rr_avg)).detach()


def kto_losses(logps, ref_logps, labels, kl, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0):
    """KTO on unpaired examples: ``labels`` True for desirable completions. ``kl`` is the detached, clamped
    estimate ``z``. Rewards: ``b (p - r)`` of each example (desirable first, as the losses)."""
    ratio = logps - ref_logps
    good, bad = labels.bool(), ~labels.bool()
    chosen_losses = 1.0 - torch.sigmoid(beta * (ratio[good] - kl))
    rejected_losses = 1.0 - torch.sigmoid(beta * (kl - ratio[bad]))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    return losses, (beta * ratio[good]).detach(), (beta * ratio[bad]).detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_losses(pc_avg, pr_avg, beta: float):
    """ORPO's odds-ratio term alone (the caller adds the chosen NLL): ``-b logsig(log odds ratio)``."""
    pc_avg, pr_avg = pc_avg.float(), pr_avg.float()
    log_odds = (pc_avg - pr_avg) - (_log1mexp(pc_avg) - _log1mexp(pr_avg))
    return -beta * F.logsigmoid(log_odds), (beta * pc_avg).detach(), (beta * pr_avg).detach()


def simpo_losses(pc_avg, pr_avg, beta: float, gamma: float, label_smoothing: float = 0.0):
    logits = beta * (pc_avg - pr_avg) - gamma
    return _smoothed(logits, label_smoothing), (beta * pc_avg).detach(), (beta * pr_avg).detach()


def reward_losses(r_chosen, r_rejected, margin: Optional[torch.Tensor] = None):
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    return -F.logsigmoid(d), r_chosen.detach(), r_rejected.detach()


def attribute_squared_errors(predictions, labels, mask) -> torch.Tensor:
    """``(prediction - label)^2`` of each (example, attribute), 0 where ``mask`` is 0 (whatever the label there,
    NaN included, and with no gradient); all (N, K) in fp32."""
    keep = mask.bool()
    labels = torch.where(keep, labels.float(), torch.zeros_like(labels, dtype=torch.float32))
    return ((predictions.float() - labels) ** 2) * keep


# -- online RL (GRPO, REINFORCE with a leave-one-out baseline; PPO below) -----------------------------------

def group_advantages(rewards: torch.Tensor, method: str, eps: float = 1e-4) -> torch.Tensor:
    """Advantages of ``rewards`` (P, G): each prompt's G completions form a group.

    * ``grpo`` (Shao et al. 2024): ``(r - mean) / (std + eps)`` within the group (``std`` the sample standard
      deviation, with Bessel's correction).
    * ``reinforce`` with the leave-one-out baseline (RLOO, Ahmadian et al. 2024): ``r_i - mean_{j != i} r_j``.
    """
    r = rewards.float()
    G = r.shape[1]
    if method == "grpo":
        return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    if method == "reinforce":
        return r - (r.sum(1, keepdim=True) - r) / (G - 1)
    raise ValueError(f"unknown online method {method!r}")


def clipped_surrogate(logps, old_logps, advantages, epsilon: float):
    """PPO's clipped surrogate per token, as a loss: ``-min(q A, clip(q, 1-epsilon, 1+epsilon) A)``,
    ``q = exp(logps - old_logps)``; ``advantages`` is (N,) (one per completion) or (N, T) (one per token).
    Returns ``(loss (N, T), clipped (N, T) bool)``: ``clipped`` marks the tokens whose clipped term was the smaller,
    where the clip removes the gradient (the clip fraction counts them)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages.to(logps.dtype)
    if a.dim() == 1:
        a = a.unsqueeze(-1)
    unclipped = ratio * a
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * a
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def policy_losses(logps, old_logps, ref_logps, advantages, mask, beta: float, epsilon: float = 0.2):
    """The clipped policy-gradient loss with a KL penalty, one value per completion (the mean over its tokens).

    ``logps``, ``old_logps``, ``ref_logps``, ``mask``: (N, T) per-token log-probabilities of the sampled tokens
    under the policy being trained, the policy that sampled them and the reference; ``advantages``: (N,). Per
    token: ``-(min(q A, clip(q, 1-epsilon, 1+epsilon) A) - beta k3)``, ``q = exp(logps - old_logps)``, and the
    KL estimate ``k3 = exp(ref - logps) - (ref - logps) - 1`` (Schulman's k3, as GRPO uses it). Returns
    ``(losses (N,), kl (N,) detached)``.
    """
    surrogate, _ = clipped_surrogate(logps, old_logps, advantages, epsilon)
    d = ref_logps - logps
    kl = torch.exp(d) - d - 1.0
    m = mask.to(logps.dtype)
    n = m.sum(-1).clamp(min=1.0)
    per_token = surrogate + beta * kl
    return (per_token * m).sum(-1) / n, ((kl * m).sum(-1) / n).detach()


# -- PPO (Schulman et al. 2017; the RLHF form of Ziegler et al. 2019 / Ouyang et al. 2022) ------------------------

def token_rewards(logps, ref_logps, scores, mask, kl_coef: float, absolute_kl: bool = False) -> torch.Tensor:
    """PPO's per-token rewards (N, T): ``-kl_coef * (logps - ref_logps)`` on every completion token (``|...|`` with
    ``absolute_kl``), plus the completion's scalar score (N,) on its last token. Zero outside ``mask``."""
    m = mask.to(torch.float32)
    d = (logps - ref_logps).float()
    rewards = -float(kl_coef) * (d.abs() if absolute_kl else d) * m
    last = (m * torch.arange(m.shape[1], device=m.device)).argmax(-1)  # the last completion position of each row
    has = m.sum(-1) > 0
    rewards[torch.arange(m.shape[0], device=m.device)[has], last[has]] += scores.float()[has]
    return rewards


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's completion tokens.

    ``rewards``, ``values``, ``mask``: (N, T); the completion is the contiguous run of ``mask``; the value after
    its last token is 0 (the episode ends). ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam A_{t+1}``; returns ``(advantages, returns = A + V)``, zero outside ``mask``."""
    m = mask.to(torch.float32)
    r, v = rewards.float() * m, values.float() * m
    T = r.shape[1]
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = v[:, t]
    return adv, (adv + v) * m


def whiten(values, mask, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (var without Bessel's correction); 0 elsewhere.
    ``reduce`` (a function summing a tensor in place over processes, e.g. ``torch.distributed.all_reduce``): the
    mean and variance are those of every process's entries together (a rollout split over data-parallel ranks).
    The sums are float64."""
    m = mask.to(torch.float64)
    v = values.to(torch.float64)
    sums = torch.stack([(v * m).sum(), m.sum()])
    if reduce is not None:
        reduce(sums)
    n = sums[1].clamp(min=1.0)
    mean = sums[0] / n
    sq = (((v - mean) * m) ** 2).sum()
    if reduce is not None:
        reduce(sq)
    var = sq / n
    return ((v - mean) * torch.rsqrt(var + eps) * m).to(values.dtype)


def value_losses(values, old_values, returns, mask, cliprange_value: float):
    """The clipped value loss, one value per completion (the mean over its tokens):
    ``0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``. Returns ``(losses (N,), clipped (N, T) bool)``:
    ``clipped`` marks the tokens where the clipped term was the larger."""
    v = values.float()
    clipped_v = old_values + (v - old_values).clamp(-cliprange_value, cliprange_value)
    a, b = (v - returns) ** 2, (clipped_v - returns) ** 2
    m = mask.to(torch.float32)
    per_token = 0.5 * torch.maximum(a, b)
    return (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0), (b > a).detach()
