"""Training objectives: what a batch holds and how its loss is computed.

An objective wraps the plain model in a small module whose ``forward`` returns
``(loss_sum, n_tokens)``. Data parallelism wraps the objective (so DDP sees the whole forward), and
the loss, head included, can be compiled as one fused graph without touching the model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.transformer import softcap


def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        logit_softcap: Optional[float] = None) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of the output head ``weight`` (V, C) over ``hidden`` (N, C).

    ``logit_softcap`` squashes the logits first, as the model's own forward does (Gemma 2).
    """
    logits = F.linear(hidden, weight).float()  # (N, V)
    if logit_softcap is not None:
        logits = softcap(logits, logit_softcap)
    return F.cross_entropy(logits, labels, reduction="none")  # (N,)


class CausalLMLoss(nn.Module):
    """Next-token prediction: predict ``tokens[:, 1:]`` from ``tokens[:, :-1]``.

    ``forward(tokens, loss_mask=None)`` returns the summed loss over the counted tokens (fp32) and
    their number; ``loss_mask`` (B, T+1), aligned with ``tokens``, selects the tokens that count
    (fine-tuning masks the prompt), None counts all. ``positions`` and ``segment_ids`` (B, T+1), also
    aligned with ``tokens``, describe packed sequences (see ``Transformer.forward``).

    ``sequence_split`` (context parallelism, :meth:`lmforge.parallel.context.ContextParallel.split`) maps the
    full inputs and labels to this rank's part and their global positions; the sums returned are then this
    rank's part of the sequences' (the group's parts add up).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = token_cross_entropy
        self.sequence_split = None  # context parallelism: (inputs, labels) -> this rank's (inputs, labels, positions)

    def forward(self, tokens: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if self.sequence_split is not None:
            if loss_mask is not None or positions is not None or segment_ids is not None:
                raise ValueError("context parallelism trains on token batches (pretraining) only, not on masked "
                                 "or packed rows")
            inputs, labels, positions = self.sequence_split(inputs, labels)
        elif positions is not None:
            positions = positions[:, :-1]
        if segment_ids is not None:
            segment_ids = segment_ids[:, :-1]
        hidden = self.model.hidden_states(inputs, positions=positions, segment_ids=segment_ids)  # (B, T, C)
        if hasattr(hidden, "full_tensor"):  # sequence parallel: the final norm's output is split by position
            hidden = hidden.full_tensor()
        cap = getattr(getattr(self.model, "cfg", None), "final_logit_softcapping", None)
        losses = self.loss_fn(hidden.reshape(-1, hidden.size(-1)), self.model.output_weight(), labels.reshape(-1), cap)
        if loss_mask is None:
            loss_sum, n_tokens = losses.sum(), labels.numel()
        else:
            mask = loss_mask[:, 1:].reshape(-1).to(losses.dtype)
            loss_sum, n_tokens = (losses * mask).sum(), int(mask.sum().item())
        coeff = float(getattr(getattr(self.model, "cfg", None), "moe_aux_loss_coeff", 0.0) or 0.0)
        if coeff > 0 and self.model.training:
            aux = self.model.moe_aux_loss()  # MoE router load balancing, pooled over layers (HF Mixtral's)
            if aux is not None:
                # times n_tokens: the trainer divides by the token count, so this stays a per-token-mean term
                loss_sum = loss_sum + coeff * aux * n_tokens
        return loss_sum, n_tokens

    def compile_loss(self) -> None:
        """Fuse the head matmul, the fp32 upcast and the softmax cross-entropy with torch.compile."""
        self.loss_fn = torch.compile(token_cross_entropy)
