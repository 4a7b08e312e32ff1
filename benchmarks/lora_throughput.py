"""LoRA fine-tuning throughput on one GPU: a Llama-2-7B-shaped lmforge model, bf16 weights, r=16 on all
linear layers, seq 2048, micro-batch 2, with and without gradient checkpointing (not a test).

Cases: ``nogc`` (no checkpointing), ``gc`` (every block recomputed: ``activations_checkpoint_granularity=full``),
``gclora`` (every block checkpointed with the LoRA save list: ``activations_checkpoint_granularity=lora``, the
attention outputs and the x @ A products kept, the rest recomputed).

The setup mirrors ``../shared/bench/hf_peer.py``'s ``bench_lora`` (the Hugging Face transformers + peft
peer): random weights, bf16 base, LoRA r=16 / alpha 32 / no dropout on q,k,v,o,gate,up,down, fused AdamW
over the LoRA weights, loss over every next token, 3 warm-up steps then 10 timed ones, no autocast
(LoRA weights fp32 as peft keeps them for a bf16 base). Prints one JSON line per case and writes all
of them to ``$OUT/lmforge_lora.json``.

Switches (every case of a call runs with them):
    --fused / --no-fused            q/k/v and gate/up as one base matmul and one ``x @ [A_q; A_k; A_v]`` each
                                    (set_joint_projections; default on, as fine-tuning does)
    --master-cast / --no-master-cast  LoRA weights cast to bf16 at use (default) / the input cast to fp32 (peft's way)
    --chunked-loss N                head + cross-entropy over N-token chunks (0: off); default: the training
                                    default (resolve_loss_chunk_size): off at a 32k vocabulary without
                                    checkpointing, 2048 with it (gc, gclora and the sac* probes)
    --compile                       torch.compile each block (LoRA inside), and the loss
    --kept-report                   after the timed steps, one more step that records what the forward leaves
                                    alive for backward: the allocated bytes and the largest kept outputs by
                                    aten op, shape and dtype (the record's ``kept_after_forward_gib``, ``kept``)

    python benchmarks/lora_throughput.py                  # both cases
    python benchmarks/lora_throughput.py --cases gc       # gradient checkpointing only
    python benchmarks/lora_throughput.py --cases gc gclora  # full against LoRA-aware checkpointing
    python benchmarks/lora_throughput.py --no-fused --no-master-cast --tag before
    python benchmarks/lora_throughput.py --cases gc gclora --steps 2 --warm 1 --kept-report  # where memory goes
    python benchmarks/lora_throughput.py --cases sacnone sacattn sacxa --steps 2 --warm 1 --kept-report
                                    # gclora's save list in parts: nothing, attention only, x @ A only

Records are appended to ``$OUT/lmforge_lora.json`` (several invocations in one device call share the file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Optional

import torch

from lmforge.models import ModelConfig, Transformer
from lmforge.models.transformer import set_joint_projections
from lmforge.parallel.transforms import apply_activation_checkpointing, apply_compile
from lmforge.peft import LoRAConfig, apply_peft
from lmforge.peft.lora import LoRALinear
from lmforge.train.assembly import resolve_loss_chunk_size
from lmforge.train.objectives import CausalLMLoss

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=32,
                 ffn_hidden_size=11008, max_position_embeddings=4096, normalization="rmsnorm", activation="swiglu",
                 bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=False,
                 hidden_dropout=0.0, attention_dropout=0.0)

#: case -> activation checkpointing granularity (False: none)
CASES = {"nogc": False, "gc": "full", "gclora": "lora"}
#: diagnostic cases, every block selectively checkpointed with part of gclora's save list, to tell which part costs
#: memory: nothing saved (selective checkpointing's own cost), the attention kernels only, the x @ A products only
PROBES = {"sacnone": (False, False), "sacattn": (True, False), "sacxa": (False, True)}
CASES.update({name: name for name in PROBES})


def probe_checkpointing(model, attention: bool, products: bool) -> None:
    """Every block checkpointed as ``lora`` does, keeping the attention outputs only if ``attention``, the LoRA
    products x @ A.T only if ``products`` (both: the ``lora`` granularity itself)."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    from lmforge.parallel.transforms import ATTENTION_OPS, _checkpointed, _lora_widths, lora_save_policy

    lora = lora_save_policy(_lora_widths(model) if products else set())

    def policy(ctx, op, *args, **kwargs):
        if op in ATTENTION_OPS and not attention:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return lora(ctx, op, *args, **kwargs)

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    for block in model.layers:
        block.forward = _checkpointed(block.forward, context_fn)


class _KeptOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Every tensor output of an aten op while on, by weak reference to its storage: ``alive()`` groups those still
    held (after a forward: what is kept for backward, in autograd's saved tensors or a checkpoint's cache) by op,
    shape and dtype; views of ``model``'s parameters and buffers left out. Outer to checkpointing's own modes, so it
    sees the ops they run and cache."""

    def __init__(self, model):
        super().__init__()
        self.own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.outputs = {}  # id(storage) -> (weakref, bytes, label)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and \
                    t.untyped_storage().data_ptr() not in self.own:
                storage = t.untyped_storage()
                label = f"{func} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                self.outputs.setdefault(id(storage), (weakref.ref(storage), storage.nbytes(), label))
        return out

    def alive(self, top: int = 20) -> list:
        gc.collect()
        groups = {}
        for ref, nbytes, label in self.outputs.values():
            if ref() is not None:
                n, total = groups.get(label, (0, 0))
                groups[label] = (n + 1, total + nbytes)
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
        return [dict(output=label, count=n, gib=round(total / 2**30, 3)) for label, (n, total) in ranked]


def kept_report(model, objective, x) -> dict:
    """One forward and backward: the bytes allocated by the forward and still held when backward starts, and the
    largest of those by producing op (what checkpointing keeps, or fails to drop)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with _KeptOutputs(model) as mode:
        loss_sum, n = objective(x)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    top = mode.alive()
    (loss_sum / n).backward()
    torch.cuda.synchronize()
    return dict(kept_after_forward_gib=round(kept / 2**30, 3),
                report_step_peak_above_start_gib=round((torch.cuda.max_memory_allocated() - before) / 2**30, 3),
                kept=top)


def bench(grad_ckpt, seq: int, mbs: int, steps: int, warm: int, compile_loss: bool, fused: bool = True,
          master_cast: bool = True, chunk: Optional[int] = None, compile_blocks: bool = False,
          report: bool = False) -> dict:
    LoRALinear.master_cast = master_cast
    start = torch.cuda.memory_allocated()  # what an earlier case left behind: 0 when each case frees its model
    cfg = ModelConfig(**LLAMA2_7B)
    chunk = resolve_loss_chunk_size(chunk, cfg, checkpointing=bool(grad_ckpt))  # as build_training does
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cuda")
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16)
    apply_peft(model, "lora", LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["all-linear"]))
    joined = set_joint_projections(model, fused)
    if grad_ckpt in PROBES:
        probe_checkpointing(model, *PROBES[grad_ckpt])
    elif grad_ckpt:  # "full" or "lora" (the granularity), or False
        apply_activation_checkpointing(model, grad_ckpt)
    model.train()
    objective = CausalLMLoss(model, loss_chunk_size=chunk)
    if compile_blocks:
        apply_compile(model)
    if compile_loss or compile_blocks:
        objective.compile_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        loss_sum, n = objective(x)
        loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    rec = dict(case="lmforge_lora_7B", grad_ckpt=bool(grad_ckpt), checkpointing=grad_ckpt or "none", seq=seq, mbs=mbs,
               tokens_per_s=round(mbs * seq * steps / dt),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=float(loss),
               trainable_params=sum(p.numel() for p in params), compile_loss=compile_loss, fused=fused, joined=joined,
               master_cast=master_cast, loss_chunk_size=chunk, compile=compile_blocks,
               start_allocated_gib=round(start / 2**30, 2), card=torch.cuda.get_device_name(), torch=torch.__version__)
    if report:
        opt.zero_grad(set_to_none=True)
        rec.update(kept_report(model, objective, x))
        opt.zero_grad(set_to_none=True)
    # Rebound, not deleted: step() reads opt and objective from this scope (a del of a name a nested function
    # uses reads as an undefined name to pyflakes). gc.collect: a model that ran under checkpointing can sit in a
    # reference cycle (torch's first checkpoint call imports lazily, and the import's frames hold the block); left to
    # the cyclic collector its 13 GB of weights stayed allocated into the next case's peak (gclora after gc read
    # 28.85 GiB, 13.3 GiB of it gc's model).
    model = opt = objective = step = None
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["nogc", "gc"], choices=list(CASES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--compile-loss", action="store_true", help="fuse head + cross-entropy with torch.compile")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="joint q/k/v and gate/up (one base matmul, one x @ A)")
    ap.add_argument("--master-cast", action=argparse.BooleanOptionalAction, default=True,
                    help="LoRA weights cast to the compute dtype at use (else the input to fp32)")
    ap.add_argument("--chunked-loss", type=int, default=None, metavar="TOKENS",
                    help="loss over token chunks (0: off; default: as training resolves it)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block and the loss")
    ap.add_argument("--kept-report", action="store_true",
                    help="one more step recording what the forward keeps for backward (bytes, largest outputs by op)")
    ap.add_argument("--tag", default="", help="a label copied into every record")
    a = ap.parse_args()
    out = os.environ.get("OUT", ".")
    results = []
    path = os.path.join(out, "lmforge_lora.json")
    if os.path.exists(path):  # several invocations in one device call add to one file
        with open(path) as f:
            results = json.load(f)
    for case in a.cases:
        try:
            rec = bench(CASES[case], a.seq, a.mbs, a.steps, a.warm, a.compile_loss, a.fused, a.master_cast,
                        a.chunked_loss, a.compile, a.kept_report)
        except torch.cuda.OutOfMemoryError as e:
            rec = dict(case="lmforge_lora_7B", grad_ckpt=bool(CASES[case]),
                       checkpointing=CASES[case] or "none", seq=a.seq, mbs=a.mbs, error=f"OOM: {e}"[:300])
            torch.cuda.empty_cache()
        rec["tag"] = a.tag
        print(json.dumps(rec), flush=True)
        results.append(rec)
        with open(os.path.join(out, "lmforge_lora.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
