"""Training objectives: what a batch holds and how its loss is computed.

An objective wraps the plain model in a small module whose ``forward`` returns
``(loss_sum, n_tokens)``. Data parallelism wraps the objective (so DDP sees the whole forward), and
the loss, head included, can be compiled as one fused graph without touching the model.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.transformer import softcap


IGNORE_INDEX = -100  # a label that counts for nothing (no loss, no gradient), as F.cross_entropy's default


def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor, logit_softcap: Optional[float], with_grad: bool):
    """Cross-entropy of one chunk of logits (n, V), in fp32: ``(loss summed over the counted labels, d loss /
    d logits)`` (the gradient in the logits' dtype, None unless ``with_grad``). Labels equal to
    :data:`IGNORE_INDEX` count for nothing. Soft-capping (``cap * tanh(z / cap)``) is applied first and
    differentiated through. A pure function of tensors: :meth:`CausalLMLoss.compile_loss` compiles it."""
    z = logits.float()
    if logit_softcap is not None:
        t = torch.tanh(z / logit_softcap)
        z = t * logit_softcap
    counted = labels != IGNORE_INDEX
    safe = torch.where(counted, labels, 0)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    target = z.gather(1, safe[:, None])[:, 0]
    loss = torch.where(counted, lse - target, 0.0).sum()
    if not with_grad:
        return loss, None
    if torch.compiler.is_compiling():
        # softmax minus the label's one-hot as one elementwise expression of z (the one-hot from a column index
        # compared with the label): inductor computes it in the logsumexp's kernel, where a scatter into the
        # softmax wrote the (n, V) softmax in fp32 and passed over it twice more to scatter, mask and cast
        hit = torch.arange(z.shape[-1], device=z.device) == safe[:, None]
        grad = torch.where(counted[:, None], torch.exp(z - lse[:, None]) - hit.to(z.dtype), 0.0)
    else:  # eagerly the same values in place in one (n, V) fp32 buffer (the expression above holds several)
        grad = torch.exp(z - lse[:, None])  # softmax
        grad.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
        grad.mul_(counted[:, None])
    if logit_softcap is not None:
        grad = grad * (1 - t * t)
    return loss, grad.to(logits.dtype)


def _gemm_accumulates(grad_w: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the head's fp32 gradient accumulator ``grad_w`` takes each chunk's ``g.t() @ h`` inside the GEMM
    (cuBLAS with fp32 output and beta 1, ``torch.addmm(..., out_dtype=torch.float32, out=grad_w)``) instead of a
    (V, C) product in ``g``'s dtype added afterwards (``grad_w.add_(g.t() @ h)``: that product written and read back,
    and one more kernel, per chunk). Only on CUDA, for an fp32 accumulator and bf16/fp16 matmuls: the ``out_dtype``
    overloads are CUDA-only and need torch 2.8+ (an fp32 ``self`` a later fix; :func:`_fp32_gemm_accumulate_works`
    checks)."""
    return (grad_w.device.type == "cuda" and grad_w.dtype == torch.float32
            and g.dtype in (torch.bfloat16, torch.float16) and _fp32_gemm_accumulate_works(grad_w.device, g.dtype))


@functools.lru_cache(maxsize=None)
def _fp32_gemm_accumulate_works(device: torch.device, dtype: torch.dtype) -> bool:
    """``torch.addmm`` with ``out_dtype=torch.float32`` into an fp32 accumulator runs on ``device`` for ``dtype``
    inputs (older torch lacks the overload or refuses an fp32 ``self``): tried once per device and dtype on 2 x 2."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
        torch.mm(a, a, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError):
        return False


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` without the (N, V) logits: ``chunk`` rows of tokens at a time,
    the gradients of ``hidden`` and ``weight`` computed in the forward pass chunk by chunk (the loss is a sum, so the
    backward pass only scales them by the incoming scalar). Peak extra memory: one chunk's logits and their gradient,
    plus an fp32 (V, C) gradient accumulator, instead of the whole batch's logits in fp32 and their gradient.
    On CUDA with bf16/fp16 matmuls the accumulator is the GEMM's own fp32 output (:func:`_gemm_accumulates`): the
    first chunk's product is written into it (no zero fill), the next ones added by cuBLAS."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, logit_softcap, chunk, dtype, chunk_fn):
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_w = None
            if ctx.needs_input_grad[1]:  # the first chunk's product is written into it: no fill (none: zeros)
                grad_w = (torch.empty if hidden.shape[0] else torch.zeros)(weight.shape, dtype=torch.float32,
                                                                           device=weight.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)  # (n, C)
                loss, g = chunk_fn(F.linear(h, w), labels[start:start + chunk], logit_softcap, with_grad)
                total = total + loss
                if grad_h is not None:
                    grad_h[start:start + chunk] = (g @ w).to(hidden.dtype)  # (n, C)
                if grad_w is None:
                    continue
                # (V, C), accumulated in fp32: inside the GEMM where it can, else a product added
                if _gemm_accumulates(grad_w, g):
                    if start == 0:
                        torch.mm(g.t(), h, out_dtype=torch.float32, out=grad_w)
                    else:
                        torch.addmm(grad_w, g.t(), h, out_dtype=torch.float32, out=grad_w)
                elif start == 0:
                    grad_w.copy_(g.t() @ h)  # the first product (what a zero fill plus it gave)
                else:
                    grad_w.add_(g.t() @ h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        if grad_w is None or ctx.weight_dtype == torch.float32:
            gw = None if grad_w is None else grad_w * grad_out
        else:  # a bf16 weight (FSDP's compute copy): cast as it is written, one pass (the same rounding)
            gw = torch.mul(grad_w, grad_out, out=torch.empty(grad_w.shape, dtype=ctx.weight_dtype,
                                                            device=grad_w.device))
        return gh, gw, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 logit_softcap: Optional[float] = None, chunk: int = 4096,
                                 chunk_fn=None) -> torch.Tensor:
    """The fp32 sum over counted tokens of the cross-entropy of the output head ``weight`` (V, C) over ``hidden``
    (N, C), ``chunk`` tokens at a time (labels :data:`IGNORE_INDEX` do not count). Equal to
    ``token_cross_entropy(hidden, weight, labels, cap)[labels != -100].sum()`` and its gradients, without ever
    holding the (N, V) logits. The matmuls run in autocast's dtype when it is on (as the plain head would)."""
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, logit_softcap, int(chunk), dtype,
                                            chunk_fn or _ce_chunk)


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

    ``loss_chunk_size`` (tokens; 0 or None: off): the head and the cross-entropy run ``loss_chunk_size`` tokens
    at a time (:func:`chunked_linear_cross_entropy`), so the (tokens x vocabulary) logits never exist whole. Not
    under tensor parallelism (``loss_fn`` is then the vocabulary-sharded loss and chunking is not used).

    ``n_tokens`` is an int for unmasked batches and a 0-dim tensor (no device sync) for masked ones.
    """

    #: the loss is a per-token negative log-likelihood: exp(val_loss) is a perplexity (the loop logs val_ppl)
    token_nll = True

    def __init__(self, model: nn.Module, loss_chunk_size: Optional[int] = None):
        super().__init__()
        self.model = model
        self.loss_fn = token_cross_entropy
        self.loss_chunk_size = loss_chunk_size
        self.chunk_fn = _ce_chunk  # compile_loss() compiles it
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
        hidden, labels = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
        if self.loss_chunk_size and self.loss_fn is token_cross_entropy:
            n_tokens = labels.numel()
            if loss_mask is not None:
                counted = loss_mask[:, 1:].reshape(-1) != 0
                labels = torch.where(counted, labels, IGNORE_INDEX)
                n_tokens = counted.sum()
            loss_sum = chunked_linear_cross_entropy(hidden, self.model.output_weight(), labels, cap,
                                                    self.loss_chunk_size, self.chunk_fn)
        else:
            losses = self.loss_fn(hidden, self.model.output_weight(), labels, cap)
            if loss_mask is None:
                loss_sum, n_tokens = losses.sum(), labels.numel()
            else:
                mask = loss_mask[:, 1:].reshape(-1).to(losses.dtype)
                loss_sum, n_tokens = (losses * mask).sum(), mask.sum()
        coeff = float(getattr(getattr(self.model, "cfg", None), "moe_aux_loss_coeff", 0.0) or 0.0)
        if coeff > 0 and self.model.training:
            aux = self.model.moe_aux_loss()  # MoE router load balancing, pooled over layers (HF Mixtral's)
            if aux is not None:
                # times n_tokens: the trainer divides by the token count, so this stays a per-token-mean term
                loss_sum = loss_sum + coeff * aux * n_tokens
        return loss_sum, n_tokens

    def compile_loss(self) -> None:
        """Fuse the head matmul, the fp32 upcast and the softmax cross-entropy with torch.compile (chunked: each
        chunk's softmax, loss and logits gradient as one kernel)."""
        if self.loss_chunk_size:
            self.chunk_fn = torch.compile(_ce_chunk)
        else:
            self.loss_fn = torch.compile(token_cross_entropy)
