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

from lmforge.align import losses as L

PAIR_METHODS = ("dpo", "ipo", "rpo", "orpo", "simpo")
REFERENCE_METHODS = ("dpo", "ipo", "rpo", "kto")


def sequence_logps(net: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                   chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities of the masked tokens, their number) per row of ``tokens`` (N, T).

    Token ``t`` is predicted from tokens ``< t``; ``mask`` (N, T) marks the completion tokens (fp32 throughout).
    The output head runs on the counted tokens only (:func:`target_logps`); finding them reads the mask, so with
    ``mask`` on a device this waits for it (batches of :class:`~lmforge.align.data.PairDataset` carry their
    ``targets``, found on the host)."""
    return _target_logps(net, plain_rows(tokens, mask), chunk)


def plain_rows(tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """The arguments of :func:`target_logps` for rows ``tokens`` (N, T) whose completion tokens ``mask`` marks: one
    completion per row, causal attention."""
    from lmforge.align.data import mask_targets

    return dict(inputs=tokens[:, :-1], targets=mask_targets(tokens, mask), n_out=tokens.shape[0])


def target_logps(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, n_out: int,
                 chunk: Optional[int] = None, positions: Optional[torch.Tensor] = None,
                 attn_mask: Optional[torch.Tensor] = None, chunk_fn=None,
                 attn_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities, number of tokens) of each of ``n_out`` completions (fp32).

    ``net.hidden_states(inputs, positions, attn_mask, attn_rows)`` gives the hidden states (N, T, C); ``targets`` (3, M) lists
    the tokens read (:func:`lmforge.align.data.mask_targets`): the flat index of the hidden state predicting each,
    its id, and the completion it counts for. Only those M hidden states go through the output head (prompt
    positions never do; their log-probabilities are never read).

    ``chunk`` (tokens; 0: off; None: automatic, on for vocabularies of 65,536 and more, as the training loss):
    the head and the log-softmax run ``chunk`` tokens at a time (:func:`token_logps`), so the (tokens x vocabulary)
    fp32 logits never exist whole."""
    from lmforge.train.assembly import resolve_loss_chunk_size

    extra = {k: v for k, v in (("positions", positions), ("attn_mask", attn_mask), ("attn_rows", attn_rows))
             if v is not None}
    hidden = net.hidden_states(inputs, **extra)  # (N, T, C)
    src, ids, seq = targets
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src)  # (M, C): the completion tokens' only
    chunk = resolve_loss_chunk_size(chunk, net.cfg)
    per_token = token_logps(picked, net.output_weight(), ids, getattr(net.cfg, "final_logit_softcapping", None),
                            chunk, chunk_fn)  # (M,)
    logps = torch.zeros(n_out, dtype=per_token.dtype, device=per_token.device).index_add(0, seq, per_token)
    counts = torch.zeros(n_out, dtype=torch.float32, device=per_token.device).index_add_(
        0, seq, torch.ones_like(per_token, dtype=torch.float32))
    return logps, counts


def _logp_chunk(logits: torch.Tensor, ids: torch.Tensor, cap: Optional[float], with_grad: bool):
    """``log p(id)`` of each row of one chunk of logits (n, V) in fp32 (soft-capped first when ``cap``), and its
    gradient with respect to the logits (in their dtype; None unless ``with_grad``): ``onehot(id) - softmax``,
    times the cap's derivative. A pure function of tensors (:meth:`PreferenceLoss.compile_loss` compiles it)."""
    logp, grad, _ = _logp_entropy_chunk(logits, ids, cap, with_grad, False)
    return logp, grad


def _logp_entropy_chunk(logits: torch.Tensor, ids: torch.Tensor, cap: Optional[float], with_grad: bool,
                        entropy: bool):
    """:func:`_logp_chunk`'s ``(log p(id), gradient)``, and with ``entropy`` each row's next-token entropy (fp32,
    else None) from the same softmax."""
    z = logits.float()
    t = None
    if cap is not None:
        t = torch.tanh(z / cap)
        z = t * cap
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    logp = z.gather(1, ids[:, None])[:, 0] - lse
    ent = p = None
    if entropy:
        lp = z - lse[:, None]  # the log-softmax
        p = lp.exp()
        ent = -(p * lp).sum(-1)
    if not with_grad:
        return logp, None, ent
    if torch.compiler.is_compiling():
        # onehot(id) - softmax as one elementwise expression (the one-hot from a column index compared with the id):
        # inductor computes it in the logsumexp's kernel, where a scatter into the softmax wrote it in fp32 and
        # passed over it again (the train loss's _ce_chunk does the same)
        hit = torch.arange(z.shape[-1], device=z.device) == ids[:, None]
        grad = hit.to(z.dtype) - (p if p is not None else torch.exp(z - lse[:, None]))
    else:  # eagerly in place: -softmax over the fp32 logits (a temporary), then +1 at each id
        grad = p.neg_() if p is not None else z.sub_(lse[:, None]).exp_().neg_()
        grad.scatter_add_(1, ids[:, None], torch.ones_like(lse)[:, None])
    if t is not None:
        grad = grad * (1 - t * t)
    return logp, grad.to(logits.dtype), ent


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[id]`` per row of ``hidden`` (M, C), ``chunk`` rows at a time, without the
    (M, V) logits; with ``entropy`` also each row's next-token entropy from the same chunk's logits (a second
    output, not differentiable: a logged metric), else an empty tensor there.

    With a frozen head (PEFT) each chunk's gradient with respect to ``hidden`` is computed in the forward pass
    and kept, (M, C) in ``hidden``'s dtype; the backward pass only scales its rows by the incoming gradients (two
    head matmuls per chunk in all, where recomputing the chunk in the backward pass takes three). With a trained
    head the backward pass recomputes each chunk's logits for both gradients (the weight's accumulated in fp32),
    unless ``save_logit_grads``: then each chunk's (n, V) gradient with respect to its logits is computed in the
    forward pass and kept for the backward (autograd's memory, one head matmul less: the unchunked case's speed)."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, cap, chunk, dtype, chunk_fn, entropy, save_logit_grads):
        keep = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        save_g = bool(save_logit_grads) and ctx.needs_input_grad[1]
        M = hidden.shape[0]
        out = torch.empty(M, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(M if entropy else 0, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if keep else None
        logit_grads = []
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, M, chunk):
                logits = F.linear(hidden[s:s + chunk].to(dtype), w)
                if entropy:  # the entropy from the same softmax
                    out[s:s + chunk], g, ent[s:s + chunk] = _logp_entropy_chunk(logits, ids[s:s + chunk], cap,
                                                                                keep or save_g, True)
                else:
                    out[s:s + chunk], g = chunk_fn(logits, ids[s:s + chunk], cap, keep or save_g)
                if keep:
                    grad_h[s:s + chunk] = (g @ w).to(hidden.dtype)
                elif save_g:
                    logit_grads.append(g)
        ctx.keep, ctx.cap, ctx.chunk, ctx.dtype, ctx.chunk_fn = keep, cap, chunk, dtype, chunk_fn
        ctx.saved_logit_grads = save_g
        if keep:
            ctx.save_for_backward(grad_h)
        elif save_g:
            ctx.save_for_backward(hidden, weight, *logit_grads)
        elif ctx.needs_input_grad[1]:
            ctx.save_for_backward(hidden, weight, ids)
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        if ctx.keep:
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None, None, None, None, None
        hidden, weight, *rest = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for k, s in enumerate(range(0, hidden.shape[0], ctx.chunk)):
                h = hidden[s:s + ctx.chunk].to(ctx.dtype)
                if ctx.saved_logit_grads:
                    g = rest[k]
                else:
                    _, g = ctx.chunk_fn(F.linear(h, w), rest[0][s:s + ctx.chunk], ctx.cap, True)
                g = (g.float() * grad_out[s:s + ctx.chunk, None]).to(ctx.dtype)  # (n, V)
                if grad_h is not None:
                    grad_h[s:s + ctx.chunk] = (g @ w).to(hidden.dtype)
                grad_w.add_(g.t() @ h)  # (V, C), accumulated in fp32
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None, None


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, cap: Optional[float] = None,
                chunk: int = 0, chunk_fn=None, entropy: bool = False, save_logit_grads: bool = False):
    """``log p(id)`` (fp32, (M,)) of each row of ``hidden`` (M, C) under the output head ``weight`` (V, C):
    :class:`_ChunkedTokenLogps`, ``chunk`` rows at a time (0: all at once). The matmuls run in autocast's dtype
    when it is on, as the plain head would. With ``entropy``: ``(log-probs, entropies)``, the second (fp32, (M,),
    detached) each row's next-token entropy, from the logits the log-probs are read from (the one pass that builds
    a (tokens x vocabulary) tensor: chunk the rows to bound it). ``save_logit_grads``: a trained head keeps each
    chunk's logit gradient from the forward pass instead of recomputing the chunk (:class:`_ChunkedTokenLogps`)."""
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    chunk = int(chunk) if chunk and chunk > 0 else max(int(hidden.shape[0]), 1)
    logps, ent = _ChunkedTokenLogps.apply(hidden, weight, ids, cap, chunk, dtype, chunk_fn or _logp_chunk,
                                          bool(entropy), bool(save_logit_grads))
    return (logps, ent) if entropy else logps


def pair_inputs(tokens: torch.Tensor, mask: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, part: Optional[torch.Tensor] = None,
                rows_gather: Optional[torch.Tensor] = None, rows_scatter: Optional[torch.Tensor] = None) -> dict:
    """The arguments of :func:`target_logps` for a batch of pairs in either layout of
    :class:`~lmforge.align.data.PairDataset`: completions ``0..B-1`` chosen, ``B..2B-1`` rejected.

    Two rows per pair (``tokens`` (B, 2, T)): the chosen rows, then the rejected ones, under causal attention.
    One row per pair (``tokens`` (B, L), the prompt shared): ``positions`` restart for the rejected completion and
    attention is causal except that rejected tokens do not see chosen ones, so each completion token has the
    context, position and hidden state it has in its own row. That attention runs as causal attention over
    ``[prompt | chosen]`` and ``[prompt | rejected]`` rows gathered per layer (``rows_gather``/``rows_scatter``:
    :class:`~lmforge.models.transformer.AttentionRows`, SDPA's flash kernel), else as a dense (B, L, L) mask from
    ``part`` (SDPA's memory-efficient kernel, every query against every key); the two give the same values."""
    from lmforge.align.data import shared_row_visibility

    B = tokens.shape[0]
    if tokens.dim() == 3:
        rows = torch.cat([tokens[:, 0], tokens[:, 1]])  # (2B, T)
        if targets is None:
            return plain_rows(rows, torch.cat([mask[:, 0], mask[:, 1]]))
        return dict(inputs=rows[:, :-1], targets=targets, n_out=2 * B)
    rows = dict(inputs=tokens[:, :-1], positions=positions[:, :-1], targets=targets, n_out=2 * B)
    if rows_gather is not None:
        from lmforge.models.transformer import AttentionRows

        return dict(rows, attn_rows=AttentionRows(rows_gather, rows_scatter))
    return dict(rows, attn_mask=shared_row_visibility(part[:, :-1]))  # (B, L-1, L-1)


def _target_logps(net: nn.Module, rows: dict, chunk: Optional[int] = None, chunk_fn=None):
    """:func:`target_logps` of the arguments :func:`pair_inputs` gives."""
    return target_logps(net, rows["inputs"], rows["targets"], rows["n_out"], chunk, rows.get("positions"),
                        rows.get("attn_mask"), chunk_fn, rows.get("attn_rows"))


def shared_prompt_problem(cfg) -> Optional[str]:
    """Why a model of config ``cfg`` cannot read pairs that share their prompt in one row (None: it can): its
    attention measures token-index distances (ALiBi, sliding windows), which the shared row changes."""
    if getattr(cfg, "position_embedding_type", None) == "alibi":
        return "ALiBi biases attention by token-index distance"
    if any(cfg.window_for_layer(i) is not None for i in range(cfg.num_layers)):
        return "sliding-window attention measures token-index distance"
    return None


class _Stats:
    """Sums of logged statistics per mode (train/val); ``pop`` hands them to the loop and starts again.

    The sums stay on the device (fp64, detached) until ``pop``: adding a step's rewards never waits for the
    device, so the host queues the backward pass and the next step while the forward pass runs."""

    def __init__(self):
        self.sums = {"train": defaultdict(float), "val": defaultdict(float)}

    def add(self, mode: str, chosen: torch.Tensor, rejected: torch.Tensor, paired: bool = True, **more) -> None:
        s = self.sums[mode]
        chosen, rejected = chosen.detach().double(), rejected.detach().double()
        if paired:
            s["n"] += chosen.numel()
            s["rewards_chosen"] += chosen.sum()
            s["rewards_rejected"] += rejected.sum()
            s["rewards_margin"] += (chosen - rejected).sum()
            s["rewards_accuracy"] += (chosen > rejected).double().sum()
        else:  # KTO: desirable and undesirable examples are apart; each mean has its own count
            s["n"] += chosen.numel() + rejected.numel()
            s["rewards_chosen"] += chosen.sum()
            s["rewards_chosen#n"] += chosen.numel()
            s["rewards_rejected"] += rejected.sum()
            s["rewards_rejected#n"] += rejected.numel()
        for k, v in more.items():
            s[k] += v.detach().double() if torch.is_tensor(v) else v

    def pop(self, mode: str) -> dict:
        out = {k: float(v) for k, v in self.sums[mode].items()}  # the one read of the device
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
        self.loss_chunk_size: Optional[int] = None  # tokens per head chunk (see target_logps); the assembly sets it
        self.chunk_fn = _logp_chunk  # compile_loss() compiles it

    # -- what the loop asks ---------------------------------------------------------------------
    unit = "examples"  # what count() counts (pairs, or KTO's single completions): the loop logs examples_per_s
    token_nll = False  # a preference loss (ORPO's and RPO's include an NLL term): no perplexity, no val_ppl

    def count(self, batch: dict):
        """Examples in a micro batch; RPO/ORPO also their chosen completion tokens."""
        n = int(batch["tokens"].shape[0])
        if self.method in ("rpo", "orpo"):
            if batch.get("targets") is not None:  # its completions 0..n-1 are the chosen ones
                return n, float((batch["targets"][2] < n).sum())
            return n, float(batch["mask"][:, 0, 1:].sum())
        return n

    def count_tokens(self, batch: dict) -> int:
        """The tokens a micro batch trains (the loop's ``tokens_trained``): the completion tokens whose
        log-probabilities the loss reads, a pair's chosen and rejected ones, KTO's completion (not its KL side, read
        without gradients)."""
        if batch.get("targets") is not None:
            return int(batch["targets"].shape[1])
        return int(batch["mask"][..., 1:].sum())

    def compile_loss(self) -> None:
        """Fuse each head chunk's fp32 upcast, log-softmax and gradient with torch.compile (model.compile)."""
        self.chunk_fn = torch.compile(_logp_chunk)

    def set_totals(self, totals: list) -> None:
        self._totals = totals

    def pop_metrics(self, mode: str) -> dict:
        return self.stats.pop(mode)

    # -- log-probabilities ----------------------------------------------------------------------
    def _net(self, reference: bool = False) -> nn.Module:
        from lmforge.peft import base_model

        return base_model(self.model) if reference else self.model

    def _logps(self, net: nn.Module, rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return _target_logps(net, rows, self.loss_chunk_size, self.chunk_fn)

    def _reference(self, rows: dict, index, columns: tuple) -> torch.Tensor:
        """Reference log-prob sums of the completions of ``rows`` (:func:`pair_inputs`): the table's ``columns``
        of ``index`` one after the other (precomputed), or one forward of the model with its adapters off."""
        if self.reference == "precomputed":
            table = self.ref_table.to(index.device)
            return torch.cat([table[index, c] for c in columns])
        from lmforge.peft import adapters_disabled

        with torch.no_grad(), adapters_disabled(self.model):
            return self._logps(self._net(reference=True), rows)[0]

    # -- the loss -------------------------------------------------------------------------------
    def forward(self, tokens, mask=None, index=None, lengths=None, margin=None, label=None, kl_tokens=None,
                kl_mask=None, targets=None, positions=None, part=None, ends=None, rows_gather=None,
                rows_scatter=None):
        """A micro batch of :class:`~lmforge.align.data.PairDataset` (either layout) or of
        :class:`~lmforge.align.data.UnpairedDataset` (KTO)."""
        mode = "train" if self.training else "val"
        if self.method == "kto":
            return self._kto(mode, tokens, mask, index, label, kl_tokens, kl_mask)
        B = tokens.shape[0]
        rows = pair_inputs(tokens, mask, targets, positions, part, rows_gather, rows_scatter)
        logps, n_tok = self._logps(self.model, rows)
        pc, pr = logps[:B], logps[B:]
        nc, nr = n_tok[:B].clamp(min=1), n_tok[B:].clamp(min=1)
        s, m = self.s, self.method
        extra = torch.zeros((), device=tokens.device)
        if m in ("dpo", "rpo", "ipo"):
            ref = self._reference(rows, index, (0, 1)).to(logps.dtype)
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
        rows, kl_rows = plain_rows(tokens, mask), plain_rows(kl_tokens, kl_mask)
        logps, _ = self._logps(self.model, rows)
        with torch.no_grad():
            kl_logps, _ = self._logps(self.model, kl_rows)
        ref = self._reference(rows, index, (0,)).to(logps.dtype)
        ref_kl = self._reference(kl_rows, index, (1,)).to(logps.dtype)
        kl = (kl_logps - ref_kl).mean().detach()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # the mean over the data-parallel ranks' batches
            dist.all_reduce(kl)
            kl = kl / dist.get_world_size()
        kl = kl.clamp(min=0)
        s = self.s
        losses, cr, rj = L.kto_losses(logps, ref, label, kl, float(s.beta), float(s.desirable_weight),
                                      float(s.undesirable_weight))
        self.stats.add(mode, cr, rj, paired=False, kl=kl * tokens.shape[0])
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
    token_nll = False  # a ranking loss: no perplexity, no val_ppl

    def count(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0])

    def count_tokens(self, batch: dict) -> int:
        """The tokens a micro batch trains (the loop's ``tokens_trained``): every token of the scored rows (the
        score reads the whole sequence), a prompt shared by both sides once."""
        if batch.get("ends") is not None:  # one row per pair: [prompt | chosen | rejected] ends at the second end
            return int(batch["ends"][:, 1].sum())
        return int(batch["lengths"].sum())

    def pop_metrics(self, mode: str) -> dict:
        return self.stats.pop(mode)

    def forward(self, tokens, mask=None, index=None, lengths=None, margin=None, positions=None, part=None,
                ends=None, rows_gather=None, rows_scatter=None, **_):
        """A micro batch of :class:`~lmforge.align.data.PairDataset`, in either layout: the reward of each side is
        read at its last token, whose hidden state is the same in both (see :func:`pair_inputs`)."""
        B = tokens.shape[0]
        if tokens.dim() == 3:  # two rows per pair
            rows = torch.cat([tokens[:, 0], tokens[:, 1]])  # (2B, T)
            last = torch.cat([lengths[:, 0], lengths[:, 1]]) - 1
            rewards = score_rows(self.model, rows, last)
        else:  # one row per pair: [prompt | chosen | rejected], each side's last token where its part ends
            from lmforge.align.data import shared_row_visibility

            # every token (the last one is read): the dense mask (rows_gather covers the inputs, one column less)
            rewards = score_rows(self.model, tokens, torch.cat([ends[:, 0], ends[:, 1]]) - 1,
                                 row=torch.arange(B, device=tokens.device).repeat(2), positions=positions,
                                 attn_mask=shared_row_visibility(part))
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
    token_nll = False  # a squared error: no perplexity, no val_ppl

    def count(self, batch: dict) -> int:
        return int(batch["mask"].sum())

    def count_tokens(self, batch: dict) -> int:
        """The tokens a micro batch trains (the loop's ``tokens_trained``): every token of the scored sequences."""
        return int(batch["lengths"].sum())

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


def score_rows(model: nn.Module, rows: torch.Tensor, last: torch.Tensor, squeeze: bool = True,
               row: Optional[torch.Tensor] = None, **hidden_kw) -> torch.Tensor:
    """The reward of each row: ``model.score`` of the final hidden state at position ``last`` (fp32): (N,) for a
    one-output head (``squeeze``), else (N, outputs). ``row`` (default: each row once, in order) says which row of
    ``rows`` each ``last`` reads (a shared-prompt row holds two ends); ``hidden_kw`` go to ``hidden_states``."""
    hidden = model.hidden_states(rows, **hidden_kw)  # (N, T, C)
    row = torch.arange(rows.shape[0], device=rows.device) if row is None else row
    picked = hidden[row, last]  # (N, C)
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
                else:  # either layout of PairDataset
                    rows = pair_inputs(batch["tokens"], batch.get("mask"), batch.get("targets"),
                                       batch.get("positions"), batch.get("part"), batch.get("rows_gather"),
                                       batch.get("rows_scatter"))
                    both = _target_logps(model, rows)[0]
                    first, second = both[:len(chunk)], both[len(chunk):]
            table[batch["index"], 0] = first.double()
            table[batch["index"], 1] = second.double()
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(table)
    model.train(was)
    return table.float().cpu()
