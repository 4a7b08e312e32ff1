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
