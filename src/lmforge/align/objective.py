"""The alignment objectives the one training loop calls: :class:`PreferenceLoss`, :class:`RewardLoss` and
:class:`AttributeLoss` (SteerLM attribute models).

Like :class:`~lmforge.train.objectives.CausalLMLoss` they wrap the model and return ``(loss_sum, units)``; the unit
is an example (a pair, or one KTO completion), so the loop's step loss is the mean over the global batch's
examples. RPO's and ORPO's log-likelihood term is a mean over the global batch's chosen completion tokens: the
loop hands the global counts to :meth:`PreferenceLoss.set_totals` before a step's forwards. Reward accuracies and
margins are summed per mode and read (all-reduced) by the loop at each logged step and validation.

Reference log-probabilities come from one of (``reference``):

* ``precomputed``: a table computed once before training with the base model (:func:`precompute_reference`),
  looked up by each example's index: no second model in memory, no reference forward per step.
* ``adapters_off``: PEFT runs: the model itself with its adapters switched off
  (:func:`lmforge.peft.adapters_disabled`) under ``no_grad``: no second copy of the weights.
* none: ORPO, SimPO and reward models have no reference.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.align import losses as L
from lmforge.models.transformer import softcap

PAIR_METHODS = ("dpo", "ipo", "rpo", "orpo", "simpo")
REFERENCE_METHODS = ("dpo", "ipo", "rpo", "kto")


def sequence_logps(net: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                   chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities of the masked tokens, their number) per row of ``tokens`` (N, T).

    Token ``t`` is predicted from tokens ``< t``; ``mask`` (N, T) marks the completion tokens (fp32 throughout).
    ``chunk`` (tokens; 0: off; None: automatic, on for vocabularies of 65,536 and more, as the training loss):
    the head and the log-softmax run ``chunk`` tokens at a time and are recomputed in the backward, so the
    (tokens x vocabulary) fp32 logits never exist whole (16 rows of 512 tokens at a 128k vocabulary would take
    4 GiB, twice with their log-softmax)."""
    from lmforge.train.assembly import resolve_loss_chunk_size

    hidden = net.hidden_states(tokens[:, :-1])  # (N, T-1, C)
    cap = getattr(net.cfg, "final_logit_softcapping", None)
    weight, labels = net.output_weight(), tokens[:, 1:]
    chunk = resolve_loss_chunk_size(chunk, net.cfg)
    if not chunk or labels.numel() <= chunk:
        per_token = _token_logps(hidden, weight, labels, cap)  # (N, T-1)
    else:
        flat_h, flat_l = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        parts = [checkpoint(_token_logps, flat_h[i:i + chunk], weight, flat_l[i:i + chunk], cap,
                            use_reentrant=False) for i in range(0, flat_l.numel(), chunk)]
        per_token = torch.cat(parts).view(labels.shape)
    m = mask[:, 1:].to(per_token.dtype)
    return (per_token * m).sum(-1), m.sum(-1)


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 cap: Optional[float]) -> torch.Tensor:
    """log p(label) of each position: the head over ``hidden`` (..., C), fp32 log-softmax, the label's entry."""
    logits = F.linear(hidden, weight).float()  # (..., V)
    if cap is not None:
        logits = softcap(logits, cap)
    return torch.gather(logits.log_softmax(-1), -1, labels.unsqueeze(-1)).squeeze(-1)


class _Stats:
    """Sums of logged statistics per mode (train/val); ``pop`` hands them to the loop and starts again."""

    def __init__(self):
        self.sums = {"train": defaultdict(float), "val": defaultdict(float)}

    def add(self, mode: str, chosen: torch.Tensor, rejected: torch.Tensor, paired: bool = True, **more) -> None:
        s = self.sums[mode]
        if paired:
            s["n"] += chosen.numel()
            s["rewards_chosen"] += float(chosen.sum())
            s["rewards_rejected"] += float(rejected.sum())
            s["rewards_margin"] += float((chosen - rejected).sum())
            s["rewards_accuracy"] += float((chosen > rejected).float().sum())
        else:  # KTO: desirable and undesirable examples are apart; each mean has its own count
            s["n"] += chosen.numel() + rejected.numel()
            s["rewards_chosen"] += float(chosen.sum())
            s["rewards_chosen#n"] += chosen.numel()
            s["rewards_rejected"] += float(rejected.sum())
            s["rewards_rejected#n"] += rejected.numel()
        for k, v in more.items():
            s[k] += v

    def pop(self, mode: str) -> dict:
        out = dict(self.sums[mode])
        self.sums[mode] = defaultdict(float)
        for key in ("n", "rewards_chosen", "rewards_rejected"):
            out.setdefault(key, 0.0)
        return out


class PreferenceLoss(nn.Module):
    """DPO, IPO, RPO, KTO, ORPO or SimPO (see :mod:`lmforge.align.losses`) on batches of
    :mod:`lmforge.align.data`.

    Args:
        model: what is trained (a Transformer, or a PEFT-wrapped one).
        method: one of ``dpo ipo rpo kto orpo simpo``.
        settings: the ``align`` config section (beta, label_smoothing, rpo_alpha, simpo_gamma, KTO weights).
        reference: ``precomputed``, ``adapters_off`` or None (see the module doc).
        ref_table: (examples, 2) reference log-probability sums (pairs: chosen, rejected; KTO: completion, KL side),
            with per-token means in two more columns for IPO.
    """

    def __init__(self, model: nn.Module, method: str, settings, reference: Optional[str] = None,
                 ref_table: Optional[torch.Tensor] = None):
        super().__init__()
        self.model, self.method, self.s = model, method, settings
        self.reference = reference
        self.ref_table = ref_table  # a plain attribute: DDP/FSDP neither broadcast nor shard it
        self._totals: Optional[list] = None
        self.stats = _Stats()
        self.loss_chunk_size: Optional[int] = None  # tokens per head chunk (see sequence_logps); the assembly sets it

    # -- what the loop asks ---------------------------------------------------------------------
    unit = "examples"  # what count() counts (pairs, or KTO's single completions): the loop logs examples_per_s

    def count(self, batch: dict):
        """Examples in a micro batch; RPO/ORPO also their chosen completion tokens."""
        n = int(batch["tokens"].shape[0])
        if self.method in ("rpo", "orpo"):
            return n, float(batch["mask"][:, 0, 1:].sum())
        return n

    def set_totals(self, totals: list) -> None:
        self._totals = totals

    def pop_metrics(self, mode: str) -> dict:
        return self.stats.pop(mode)

    # -- log-probabilities ----------------------------------------------------------------------
    def _net(self, reference: bool = False) -> nn.Module:
        from lmforge.peft import base_model

        return base_model(self.model) if reference else self.model

    def _reference(self, tokens, mask, index, columns: tuple) -> torch.Tensor:
        """Reference log-prob sums of the rows ``tokens``: the table's ``columns`` of ``index`` one after the
        other (precomputed), or one forward of the model with its adapters off."""
        if self.reference == "precomputed":
            table = self.ref_table.to(tokens.device)
            return torch.cat([table[index, c] for c in columns])
        from lmforge.peft import adapters_disabled

        with torch.no_grad(), adapters_disabled(self.model):
            return sequence_logps(self._net(reference=True), tokens, mask, self.loss_chunk_size)[0]

    # -- the loss -------------------------------------------------------------------------------
    def forward(self, tokens, mask, index, lengths=None, margin=None, label=None, kl_tokens=None, kl_mask=None):
        mode = "train" if self.training else "val"
        if self.method == "kto":
            return self._kto(mode, tokens, mask, index, label, kl_tokens, kl_mask)
        B = tokens.shape[0]
        rows, rmask = torch.cat([tokens[:, 0], tokens[:, 1]]), torch.cat([mask[:, 0], mask[:, 1]])  # (2B, T)
        logps, n_tok = sequence_logps(self.model, rows, rmask, self.loss_chunk_size)
        pc, pr = logps[:B], logps[B:]
        nc, nr = n_tok[:B].clamp(min=1), n_tok[B:].clamp(min=1)
        s, m = self.s, self.method
        extra = torch.zeros((), device=tokens.device)
        if m in ("dpo", "rpo", "ipo"):
            ref = self._reference(rows, rmask, index, (0, 1)).to(logps.dtype)
            rc, rr = ref[:B], ref[B:]
            if m == "ipo":
                losses, cr, rj = L.ipo_losses(pc / nc, pr / nr, rc / nc, rr / nr, float(s.beta))
            else:
                losses, cr, rj = L.dpo_losses(pc, pr, rc, rr, float(s.beta), float(s.label_smoothing))
            if m == "rpo":
                extra = float(s.rpo_alpha) * self._chosen_nll(pc, B)
        elif m == "orpo":
            losses, cr, rj = L.orpo_odds_losses(pc / nc, pr / nr, float(s.beta))
            extra = self._chosen_nll(pc, B)
        elif m == "simpo":
            losses, cr, rj = L.simpo_losses(pc / nc, pr / nr, float(s.beta), float(s.simpo_gamma),
                                            float(s.label_smoothing))
        else:
            raise ValueError(f"unknown preference method {m!r}")
        self.stats.add(mode, cr, rj)
        return losses.sum() + extra, B

    def _chosen_nll(self, pc: torch.Tensor, B: int) -> torch.Tensor:
        """``units x (-sum of chosen completion log-probs) / global chosen tokens``: after the loop divides by the
        global units, the mean negative log-likelihood per chosen completion token of the global batch."""
        units, tokens = (self._totals or [B, 1.0])[:2]
        return -pc.sum() * (float(units) / max(float(tokens), 1.0))

    def _kto(self, mode, tokens, mask, index, label, kl_tokens, kl_mask):
        logps, _ = sequence_logps(self.model, tokens, mask, self.loss_chunk_size)
        with torch.no_grad():
            kl_logps, _ = sequence_logps(self.model, kl_tokens, kl_mask, self.loss_chunk_size)
        ref = self._reference(tokens, mask, index, (0,)).to(logps.dtype)
        ref_kl = self._reference(kl_tokens, kl_mask, index, (1,)).to(logps.dtype)
        kl = (kl_logps - ref_kl).mean().detach()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # the mean over the data-parallel ranks' batches
            dist.all_reduce(kl)
            kl = kl / dist.get_world_size()
        kl = kl.clamp(min=0)
        s = self.s
        losses, cr, rj = L.kto_losses(logps, ref, label, kl, float(s.beta), float(s.desirable_weight),
                                      float(s.undesirable_weight))
        self.stats.add(mode, cr, rj, paired=False, kl=float(kl) * tokens.shape[0])
        return losses.sum(), tokens.shape[0]


class RewardLoss(nn.Module):
    """Bradley-Terry reward model: ``model.score`` (a bias-free Linear of the hidden size to 1) reads the final
    hidden state of each sequence's last token; the loss is ``-logsig(r_chosen - r_rejected - margin)``."""

    def __init__(self, model: nn.Module, center_rewards_coefficient: Optional[float] = None):
        super().__init__()
        self.model = model
        self.center = center_rewards_coefficient
        self.stats = _Stats()

    unit = "pairs"  # what count() counts: the loop logs pairs_per_s

    def count(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0])

    def pop_metrics(self, mode: str) -> dict:
        return self.stats.pop(mode)

    def forward(self, tokens, mask, index, lengths, margin=None, **_):
        B = tokens.shape[0]
        rows = torch.cat([tokens[:, 0], tokens[:, 1]])  # (2B, T)
        last = torch.cat([lengths[:, 0], lengths[:, 1]]) - 1
        rewards = score_rows(self.model, rows, last)
        rc, rr = rewards[:B], rewards[B:]
        losses, cr, rj = L.reward_losses(rc, rr, margin)
        loss = losses.sum()
        if self.center:
            loss = loss + float(self.center) * ((rc + rr) ** 2).sum()
        self.stats.add("train" if self.training else "val", cr, rj)
        return loss, B


class AttributeLoss(nn.Module):
    """SteerLM attribute model (a regression reward model): ``model.score`` (hidden size -> one output per
    attribute) reads the final hidden state of each sequence's last token; the loss is the squared error of each
    labelled attribute (:func:`lmforge.align.losses.attribute_squared_errors`). The unit is a labelled value, so
    the loop's step loss is the masked mean squared error of the global batch. Logged: ``mse_<attribute>`` (over
    that attribute's labelled values)."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        self.model, self.names = model, list(names)
        self.sums = {"train": defaultdict(float), "val": defaultdict(float)}

    unit = "labels"  # what count() counts: the loop logs labels_per_s

    def count(self, batch: dict) -> int:
        return int(batch["mask"].sum())

    def pop_metrics(self, mode: str) -> dict:
        out = dict(self.sums[mode])
        self.sums[mode] = defaultdict(float)
        out.setdefault("n", 0.0)
        return out

    def forward(self, tokens, lengths, labels, mask, **_):
        predictions = score_rows(self.model, tokens, lengths - 1, squeeze=False)  # (N, K)
        errors = L.attribute_squared_errors(predictions, labels, mask)
        s = self.sums["train" if self.training else "val"]
        per_attribute, counts = errors.detach().sum(0).tolist(), mask.sum(0).tolist()
        for name, e, c in zip(self.names, per_attribute, counts):
            s[f"mse_{name}"] += e
            s[f"mse_{name}#n"] += c
        return errors.sum(), int(mask.sum())


def score_rows(model: nn.Module, rows: torch.Tensor, last: torch.Tensor, squeeze: bool = True) -> torch.Tensor:
    """The reward of each row: ``model.score`` of the final hidden state at position ``last`` (fp32): (N,) for a
    one-output head (``squeeze``), else (N, outputs)."""
    hidden = model.hidden_states(rows)  # (N, T, C)
    picked = hidden[torch.arange(rows.shape[0], device=rows.device), last]  # (N, C)
    out = F.linear(picked.float(), model.score.weight.float())
    return out.squeeze(-1) if squeeze else out


@torch.no_grad()
def precompute_reference(model: nn.Module, datasets: list, micro_batch_size: int, runtime, autocast) -> torch.Tensor:
    """The reference table of every example of ``datasets`` (train, then validation; their ``offset`` is where
    their rows start), computed once with ``model`` (the plain base model, before any wrapping). Under several
    processes each computes a strided share and the shares are summed."""
    import torch.distributed as dist

    total = sum(len(d) for d in datasets)
    table = torch.zeros(total, 2, dtype=torch.float64, device=runtime.device)
    was = model.training
    model.eval()
    world, rank = runtime.world_size, runtime.rank
    for ds in datasets:
        chunks = [list(range(i, min(i + micro_batch_size, len(ds)))) for i in range(0, len(ds), micro_batch_size)]
        for chunk in chunks[rank::world]:
            batch = {k: v.to(runtime.device) for k, v in ds.collate([ds[i] for i in chunk]).items()}
            with autocast():
                if "kl_tokens" in batch:
                    first = sequence_logps(model, batch["tokens"], batch["mask"])[0]
                    second = sequence_logps(model, batch["kl_tokens"], batch["kl_mask"])[0]
                else:
                    first = sequence_logps(model, batch["tokens"][:, 0], batch["mask"][:, 0])[0]
                    second = sequence_logps(model, batch["tokens"][:, 1], batch["mask"][:, 1])[0]
            table[batch["index"], 0] = first.double()
            table[batch["index"], 1] = second.double()
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(table)
    model.train(was)
    return table.float().cpu()
