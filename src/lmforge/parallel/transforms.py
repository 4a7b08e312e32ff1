"""Transformations applied to a plain model from outside (torchtitan's order: checkpointing, then compile).

Both keep parameter names unchanged, so checkpoints of a transformed model load into a plain one: they
replace methods of module instances (``block.forward``, ``attention._sdpa``), never modules.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from lmforge.errors import ConfigError

GRANULARITIES = ("full", "selective", "lora")
METHODS = ("uniform", "block")

#: The fused attention kernels (one aten op each: output, log-sum-exp, RNG state). ``lora`` checkpointing keeps
#: their outputs: their backward reads them, and attention is the part of a block's forward that grows with T.
ATTENTION_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(torch.ops.aten, name))


def _method(module: nn.Module, name: str) -> Callable:
    """``getattr(module, name)`` (``forward``, ``_sdpa``) as a callable that holds no strong reference to ``module``.

    The transforms store their wrappers on the module instance; a wrapper holding the bound method would make a
    reference cycle (module -> wrapper -> bound method -> module), so a dropped model were freed only by Python's
    cyclic garbage collector, whenever that runs: its GPU memory stays allocated (``torch.cuda.empty_cache`` cannot
    release it) and the next model built in the process starts with it. The class's function with a weak reference
    to the module breaks the cycle. An instance attribute already there (another wrapper) is returned as it is."""
    own = module.__dict__.get(name)
    if own is not None:
        return own
    function, ref = getattr(type(module), name), weakref.ref(module)

    def method(*args, **kwargs):
        return function(ref(), *args, **kwargs)

    return method


def _checkpointed(fn: Callable, context_fn: Optional[Callable] = None) -> Callable:
    """``fn`` run under non-reentrant ``torch.utils.checkpoint``: nothing it would save for backward is kept,
    it runs again (same RNG state, so the same dropout) when the backward pass needs its activations. With
    ``context_fn`` (selective checkpointing) what its policy saves is kept instead of recomputed.

    A function of this file, not a ``functools.partial`` of ``checkpoint``: torch.compile (``apply_compile``, after
    this) skips torch's own frames, so a block whose ``forward`` were ``checkpoint`` itself would run eagerly;
    from this frame it traces the checkpointed region as one graph.

    Without autograd (``no_grad``/``inference_mode``: evaluation, a serving engine's forwards on the trained model,
    online RL's rollouts) nothing would be kept for a backward pass: ``fn`` runs plainly, without checkpoint's
    saved-tensor hooks and RNG-state stashing."""
    def run(*args, **kw):
        if not torch.is_grad_enabled():
            return fn(*args, **kw)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_context_fn(context_fn), **kw)

    return run


def _recompute_all(ctx, op, *args, **kwargs):
    """The selective-checkpointing policy of full checkpointing: every op is recomputed."""
    return CheckpointPolicy.PREFER_RECOMPUTE


_RECOMPUTE_ALL = functools.partial(create_selective_checkpoint_contexts, _recompute_all)


def _context_fn(context_fn: Optional[Callable]) -> Callable:
    """``context_fn`` for ``torch.utils.checkpoint``: the given one (selective checkpointing), else, while torch.compile
    traces the region, a policy that recomputes every op, else checkpoint's default (nothing kept).

    Why full checkpointing needs a policy under compile: torch.compile turns a checkpointed region into one graph and
    tags its nodes "recompute" for the partitioner, which keeps for backward only what is not tagged. Before PyTorch
    2.12 (pytorch/pytorch#177396) a region without ``context_fn`` was tagged on dynamo's graph, before custom
    ``autograd.Function``s are inlined, so the ops inside them (the joint q/k/v and gate/up matmuls,
    ``_JointLinear``; the LoRA joint forward) went untagged and their outputs were kept: on an H100 (torch 2.11)
    compiled ``full`` held 31.6 GiB for a 7B LoRA step where eager ``full`` held 15.6, and ran at nearly the speed of
    no checkpointing. Selective checkpointing tags every aten op as it is traced, those inside a Function included;
    with a recompute-everything policy it is full checkpointing (what torch does itself for such regions since
    2.12). Eager runs keep plain checkpointing (no dispatch mode over every op)."""
    if context_fn is not None:
        return context_fn
    if torch.compiler.is_compiling():
        return _RECOMPUTE_ALL
    return noop_context_fn


def lora_save_policy(widths: set[int]) -> Callable:
    """The per-op policy of ``lora`` checkpointing (``torch.utils.checkpoint`` selective checkpointing): keep the
    outputs of the attention kernels (:data:`ATTENTION_OPS`) and of the LoRA down-projections ``x @ A.T`` (a
    matmul whose output has one of ``widths`` columns, the LoRA ranks and their sums over joined siblings, fewer
    than its input has), recompute everything else in the backward pass.

    Why these: with frozen base weights no base matmul needs its input for a weight gradient, so the tensors the
    backward reads are the attention's inputs and outputs, the LoRA inputs and ``x @ A.T`` (for ``B``'s
    gradient), the norms' and activation functions' inputs. ``x @ A.T`` is r columns wide (about r/C of a hidden
    state) and the attention output one hidden state; the rest (q/k/v, the MLP's wide activations, the norms'
    fp32 copies) is several hidden states per block and cheap to recompute relative to its size.
    """

    def policy(ctx, op, *args, **kwargs):
        if op in ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        if op is torch.ops.aten.mm.default and len(args) == 2:
            x, a_t = args  # (N, in) @ (in, out)
            if a_t.shape[-1] in widths and x.shape[-1] > a_t.shape[-1]:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _lora_widths(model: nn.Module) -> set[int]:
    """The column counts of ``model``'s LoRA products ``x @ A.T``: each rank r, and 2r, 3r for siblings joined into
    one matmul (gate/up, q/k/v; one config gives them one rank). Empty without LoRA."""
    from lmforge.peft.lora import LoRALinear

    ranks = {m.r for m in model.modules() if isinstance(m, LoRALinear)}
    return {k * r for r in ranks for k in (1, 2, 3)}


def _plan(granularity: Optional[str], method: Optional[str], num_layers: Optional[int],
          total: Optional[int], prefix: str = "model.",
          part: str = "the model") -> tuple[Optional[str], Optional[str], Optional[int]]:
    """The checked setting, NeMo's ``model.activations_checkpoint_*`` rules (those of its Megatron-core models,
    ``mcore_gpt: true``); None/None/None means off. ``total``: the layer count of ``part`` (the model, or a
    pipeline stage; None: not known yet, the ``block`` bound unchecked); ``prefix``: what the keys are called under
    (``model.`` in pretraining's config, nothing in fine-tuning's and alignment's)."""
    g, m, n = (f"{prefix}activations_checkpoint_{k}" for k in ("granularity", "method", "num_layers"))
    if granularity is None:
        for key, value in ((m, method), (n, num_layers)):
            if value is not None:
                raise ConfigError(f"{key}={value} has no effect without {g}; set it to full")
        return None, None, None
    if granularity not in GRANULARITIES:
        raise ConfigError(f"{g}={granularity!r} is not one of: {', '.join(GRANULARITIES)} (or null: off)")
    if method is not None and method not in METHODS:
        raise ConfigError(f"{m}={method!r} is not one of: {', '.join(METHODS)}, e.g. {m}=uniform")
    if granularity == "selective":
        # Megatron-core (NeMo's mcore_gpt models; NeMo Launcher's rlhf_ppo/gpt3/2b_ppo.yaml sets selective with
        # method uniform) accepts a method with selective and ignores it: there are no chunks to choose. It refuses
        # num_layers, as here.
        if num_layers is not None:
            raise ConfigError(f"{n}={num_layers} must be null with {g}=selective (the core attention of every layer "
                              f"is recomputed); set it to null, or use {g}=full")
        return "selective", None, None
    if granularity == "lora":  # lmforge's own value: no NeMo config sets it, so nothing to ignore
        for key, value in ((m, method), (n, num_layers)):
            if value is not None:
                raise ConfigError(f"{key}={value} must be null with {g}=lora (every block is checkpointed with "
                                  f"the LoRA save list); set it to null, or use {g}=full")
        return "lora", None, None
    method = "uniform" if method is None else method
    num_layers = 1 if num_layers is None else num_layers
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ConfigError(f"{n}={num_layers!r} must be a positive integer, e.g. {n}=1")
    if method == "block" and total is not None and num_layers > total:
        raise ConfigError(f"{n}={num_layers} exceeds the {total} layers of {part} with {m}=block; "
                          f"use at most {n}={total}")
    return "full", method, num_layers


def check_activations_checkpoint(granularity: Optional[str], method: Optional[str], num_layers: Optional[int],
                                 prefix: str = "") -> Optional[dict]:
    """The ``{granularity, method, num_layers}`` that :func:`apply_activation_checkpointing` takes, checked before
    any model is open (a config's loader), or None for off.

    Raises:
        ConfigError: what :func:`apply_activation_checkpointing` would refuse, except ``block`` with more layers than
            the model has (known once it is open), naming the key as the config spells it (``prefix``)."""
    granularity, method, num_layers = _plan(granularity, method, num_layers, None, prefix)
    return None if granularity is None else dict(granularity=granularity, method=method, num_layers=num_layers)


def apply_activation_checkpointing(model: nn.Module, granularity: Optional[str] = "full",
                                   method: Optional[str] = None, num_layers: Optional[int] = None,
                                   prefix: str = "model.", part: str = "the model") -> nn.Module:
    """Recompute activations in the backward pass instead of keeping them, as NeMo/Megatron's
    ``activations_checkpoint_granularity`` / ``_method`` / ``_num_layers`` do. In place; returns ``model``.

    Settings (``model.layers`` holds the L blocks; a block may be a dense or MoE block, LoRA-wrapped or not):

    * ``full`` + ``uniform`` (``method`` None means uniform, ``num_layers`` None means 1): the blocks are cut
      into consecutive chunks of ``num_layers`` (the last one may be shorter; ``num_layers >= L`` is one
      chunk). Only each chunk's input is kept; backward runs the whole chunk again. ``full`` alone is one
      block per chunk, what this function always did.
    * ``full`` + ``block``: the first ``num_layers`` blocks are checkpointed one by one, the others keep
      their activations (fewer recomputations when memory allows).
    * ``selective``: in every layer only the core attention (``Attention._sdpa`` / ``_eager``: softmax(QK^T)V,
      large and cheap to recompute) is recomputed; the projections, norms and MLPs keep their activations.
      As in Megatron-core (NeMo's ``mcore_gpt`` models), a ``method`` is accepted and has no effect (there are no
      chunks), and ``num_layers`` must be None.
    * ``lora`` (LoRA fine-tuning; lmforge's own value): every block is checkpointed, but selectively
      (:func:`lora_save_policy`): the attention kernels' outputs and the LoRA products ``x @ A.T`` are kept, the
      rest is recomputed. Backward then skips the attention forward that ``full`` runs again, for one more hidden
      state per block (plus r/C of one per LoRA layer). ``method`` and ``num_layers`` must be None; the model
      must carry LoRA layers.
    * ``granularity`` None: nothing (``method``/``num_layers`` must be None too).

    A chunk of n > 1 blocks without changing ``Transformer.forward`` (which calls each of ``model.layers`` in
    turn): the chunk's first block gets a ``forward`` that runs all n blocks' own forwards as one checkpointed
    function and remembers (a weak reference) the tensor it returned; each other block of the chunk gets a
    ``forward`` that hands that very tensor back untouched (its work is already in it), and runs normally for
    any other input. So the blocks must be called in order, each on the previous one's output, as
    ``Transformer`` does. Without autograd every block of a chunk runs its own forward plainly, as an unwrapped
    block does: a serving engine or online RL's rollouts may run the blocks in compiled pieces that split a chunk
    (``Runner._decode_blocks``), and a traced graph keeps no handed-off tensor.

    ``prefix``: what the keys are called in the command's config (``model.`` in pretraining's, nothing in
    fine-tuning's and alignment's), so an error names the key the user set; ``part``: what ``model`` is, for the
    ``block`` bound's message (``the model``, or ``a pipeline stage``).

    Raises:
        ConfigError: an unknown granularity or method, ``num_layers < 1``, ``num_layers > L`` with ``block``,
            ``num_layers`` with ``selective``, ``method``/``num_layers`` with ``lora`` or without a granularity, ``lora`` on a model
            without LoRA layers (the message names the ``{prefix}activations_checkpoint_*`` key and a value that
            works).
        ValueError: the model was already transformed by this function.
    """
    from lmforge.parallel.tensor import blocks_of

    layers = blocks_of(model)
    granularity, method, num_layers = _plan(granularity, method, num_layers, len(layers), prefix, part)
    if granularity is None:
        return model
    if getattr(model, "_activation_checkpointing", None) is not None:
        raise ValueError(f"activation checkpointing is already applied to this model "
                         f"({model._activation_checkpointing}); apply it once")
    if granularity == "lora":
        widths = _lora_widths(model)
        if not widths:
            raise ConfigError(f"{prefix}activations_checkpoint_granularity=lora keeps the LoRA products, but this "
                              f"model has no LoRA layers; use full or selective (or train with LoRA)")
        context_fn = functools.partial(create_selective_checkpoint_contexts, lora_save_policy(widths))
        for block in layers:
            block.forward = _checkpointed(_method(block, "forward"), context_fn)
    elif granularity == "selective":
        for block in layers:
            attn = block.self_attn
            attn._sdpa = _checkpointed(_method(attn, "_sdpa"))
            attn._eager = _checkpointed(_method(attn, "_eager"))  # the soft-capped path (Gemma 2): its scores
    elif method == "block":
        for block in list(layers)[:num_layers]:
            block.forward = _checkpointed(_method(block, "forward"))
    else:
        blocks = list(layers)
        for start in range(0, len(blocks), num_layers):
            _checkpoint_chunk(blocks[start:start + num_layers])
    model._activation_checkpointing = (granularity, method, num_layers)
    return model


def _checkpoint_chunk(blocks: list[nn.Module]) -> None:
    """Make ``blocks`` (consecutive) one checkpointed unit; see :func:`apply_activation_checkpointing`."""
    forwards = [_method(block, "forward") for block in blocks]
    if len(blocks) == 1:
        blocks[0].forward = _checkpointed(forwards[0])
        return
    handed_off = [lambda: None]  # weak reference to the chunk's last output (the activation is not kept alive)

    def run_chunk(x, *args, **kwargs):
        for forward in forwards:
            x = forward(x, *args, **kwargs)
        return x

    def first_forward(x, *args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to recompute (see _checkpointed): the block alone, plainly
            return forwards[0](x, *args, **kwargs)
        out = checkpoint(run_chunk, x, *args, use_reentrant=False, context_fn=_context_fn(None), **kwargs)
        handed_off[0] = weakref.ref(out)
        return out

    def other_forward(own_forward):
        def forward(x, *args, **kwargs):
            if not torch.is_grad_enabled():  # each block runs itself, as first_forward's block does
                return own_forward(x, *args, **kwargs)
            if handed_off[0]() is x:  # the chunk's output: this block already ran inside it
                return x
            return own_forward(x, *args, **kwargs)
        return forward

    blocks[0].forward = first_forward
    for block, forward in zip(blocks[1:], forwards[1:]):
        block.forward = other_forward(forward)


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each block separately with torch.compile (blocks share one compiled graph; names unchanged)."""
    from lmforge.parallel.tensor import blocks_of

    for block in blocks_of(model):
        block.compile()
    return model
