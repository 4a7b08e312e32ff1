"""Check two step savings on one GPU (run by hand; tests/train/test_speed_paths.py runs it on CPU with ``--small``):

1. The chunked head loss's weight gradient accumulated inside the GEMM (``torch.addmm(..., out_dtype=float32,
   out=acc)``, lmforge's path on CUDA, see ``lmforge.train.objectives._gemm_accumulates``) against the path before
   it (a zero-filled fp32 accumulator and ``acc.add_(g.t() @ h)`` per chunk, kept here as ``_AddChunked``): the
   chunked loss's forward + backward at V=128,256, C=2,048, N=8,192 tokens, chunk 2,048 under bf16 autocast (hidden
   states bf16, the head an fp32 master weight), from the same inputs. Reported: the max abs / rel difference of
   the hidden and weight gradients and of the loss, each weight gradient's difference from one whose chunk
   products are computed in fp32 (the GEMM path skips the bf16 rounding of each chunk's (V, C) product, so it
   should be the closer), ms per forward + backward of each.
2. Gradient clipping inside the fused AdamW step (``optimizer.grad_scale``, ``lmforge.train.optim.step_with_clip``)
   against clipping in place then stepping (``clip_grad_norm_`` + ``step``), on the Llama-3.2-1B parameter shapes
   (fp32, tied 128,256 x 2,048 embedding, 16 blocks, norms), lmforge's fused AdamW (``build_optimizer``), random
   gradients whose norm is well above the clip (1.0): the max weight difference after 3 steps from the same weights
   and gradients, and ms per clip + step of each (fresh gradients copied in before each timed step).

Times: CUDA events, the median of 20 after 5 warm-up runs (CPU: wall clock; ``--small``: 3 after 1). One JSON
line is printed.

    python benchmarks/head_grad_check.py                       # CUDA, the shapes above
    python benchmarks/head_grad_check.py --device cpu --small  # smoke run (the CPU takes lmforge's old paths)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.train import objectives
from lmforge.train.objectives import _ce_chunk, _ChunkedLinearCrossEntropy, chunked_linear_cross_entropy
from lmforge.train.optim import build_optimizer, clip_scale, step_with_clip

FULL = dict(vocab=128256, hidden=2048, tokens=8192, chunk=2048, layers=16, heads=32, kv_groups=8, ffn=8192)
SMALL = dict(vocab=256, hidden=32, tokens=64, chunk=16, layers=2, heads=4, kv_groups=2, ffn=64)
MAX_NORM = 1.0


class _AddChunked(_ChunkedLinearCrossEntropy):
    """The chunked loss as it was before the GEMM accumulated the head's gradient: a zero-filled fp32 accumulator,
    each chunk's product in the matmul dtype added to it (the backward is the current one: the same for fp32).
    ``upcast``: the product of the same bf16 values computed in fp32 instead (the reference both are held to)."""

    upcast = False

    @staticmethod
    def forward(ctx, hidden, weight, labels, logit_softcap, chunk, dtype, chunk_fn):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                loss, g = chunk_fn(F.linear(h, w), labels[start:start + chunk], logit_softcap, True)
                total = total + loss
                grad_h[start:start + chunk] = (g @ w).to(hidden.dtype)
                grad_w.add_(g.float().t() @ h.float() if _AddChunked.upcast else g.t() @ h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total


class Timer:
    """Per-run times in ms: CUDA events on a GPU (the device's own time), the wall clock on a CPU."""

    def __init__(self, device: torch.device, warmup: int = 5, runs: int = 20):
        self.cuda, self.warmup, self.runs = device.type == "cuda", warmup, runs

    def __call__(self, fn, before=None) -> float:
        """The median ms of ``fn()`` over ``runs`` after ``warmup``; ``before()`` runs ahead of each, untimed."""
        times, warmup = [], self.warmup
        for i in range(warmup + self.runs):
            if before is not None:
                before()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
        return statistics.median(times)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs().max().item()
    return {"max_abs": d, "max_rel": d / max(b.double().abs().max().item(), 1e-30)}


def head_check(s: dict, device: torch.device, timer: Timer, compile_chunk: bool) -> dict:
    """Part 1: the chunked loss with the GEMM accumulating (lmforge's path here) vs the add path."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(s["tokens"], s["hidden"], generator=g).to(device, torch.bfloat16).requires_grad_()
    weight = (0.02 * torch.randn(s["vocab"], s["hidden"], generator=g)).to(device).requires_grad_()
    labels = torch.randint(0, s["vocab"], (s["tokens"],), generator=g).to(device)
    chunk_fn = torch.compile(_ce_chunk) if compile_chunk else _ce_chunk
    scale = 1.0 / s["tokens"]  # the loop's per-token scale (the backward multiplies by it)

    def run(fn):
        hidden.grad = weight.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn()
        (loss * scale).backward()
        return loss

    def gemm():
        return chunked_linear_cross_entropy(hidden, weight, labels, None, s["chunk"], chunk_fn)

    def add():
        return _AddChunked.apply(hidden, weight, labels, None, s["chunk"], torch.bfloat16, chunk_fn)

    out = {}
    for name, fn in (("gemm", gemm), ("add", add), ("fp32", add)):
        _AddChunked.upcast = name == "fp32"
        loss = run(fn)
        out[name] = (loss.detach().clone(), hidden.grad.clone(), weight.grad.clone())
    _AddChunked.upcast = False
    accumulates = objectives._gemm_accumulates(torch.empty(0, device=device),
                                               torch.empty(0, device=device, dtype=torch.bfloat16))
    result = {"gemm_accumulate": accumulates, "loss": _diff(out["gemm"][0], out["add"][0]),
              "grad_hidden": _diff(out["gemm"][1], out["add"][1]), "grad_weight": _diff(out["gemm"][2], out["add"][2]),
              # each against the weight gradient with every chunk's product in fp32 (no bf16 rounding of it)
              "grad_weight_vs_fp32_products": {name: _diff(out[name][2], out["fp32"][2]) for name in ("gemm", "add")}}
    del out
    result["ms_gemm"] = timer(lambda: run(gemm))
    result["ms_add"] = timer(lambda: run(add))
    return result


def llama_1b_shapes(s: dict) -> list[tuple]:
    """The trainable parameter shapes of a Llama-3.2-1B-shaped model (tied head) at ``s``'s sizes."""
    c, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_groups"]
    block = [(c, c), (kv, c), (kv, c), (c, c), (s["ffn"], c), (s["ffn"], c), (c, s["ffn"]), (c,), (c,)]
    return [(s["vocab"], c)] + block * s["layers"] + [(c,)]


class Params(nn.Module):
    def __init__(self, shapes, device, seed: int = 1):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        self.params = nn.ParameterList(nn.Parameter(0.02 * torch.randn(sh, generator=g, device=device))
                                       for sh in shapes)


def clip_check(s: dict, device: torch.device, timer: Timer) -> dict:
    """Part 2: clipping inside the fused AdamW step vs clipping in place then stepping."""
    shapes = llama_1b_shapes(s)
    models = {name: Params(shapes, device) for name in ("folded", "in_place")}
    opts = {name: build_optimizer(m, "fused_adam", 1e-4, 0.01, [0.9, 0.95], 1e-8, device) for name, m in models.items()}
    g = torch.Generator(device=device).manual_seed(2)
    source = [torch.randn(sh, generator=g, device=device) for sh in shapes]
    torch._foreach_mul_(source, 30 * MAX_NORM / torch.nn.utils.get_total_norm(source).item())  # norm 30: clip acts
    norm_of_source = torch.nn.utils.get_total_norm(source).item()

    def fill(name):
        for p, src in zip(models[name].parameters(), source):
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(src)

    def folded():
        params = list(models["folded"].parameters())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        step_with_clip(opts["folded"], clip_scale(norm, MAX_NORM))

    def in_place():
        torch.nn.utils.clip_grad_norm_(list(models["in_place"].parameters()), MAX_NORM)
        opts["in_place"].step()

    for _ in range(3):
        for name, fn in (("folded", folded), ("in_place", in_place)):
            fill(name)
            fn()
    weight_diff = max((a - b).abs().max().item() for a, b in zip(models["folded"].parameters(),
                                                                  models["in_place"].parameters()))
    state_diff = max((opts["folded"].state[a][k] - opts["in_place"].state[b][k]).abs().max().item()
                     for a, b in zip(models["folded"].parameters(), models["in_place"].parameters())
                     for k in ("exp_avg", "exp_avg_sq"))
    result = {"params": sum(p.numel() for p in models["folded"].parameters()), "grad_norm": norm_of_source,
              "max_norm": MAX_NORM, "max_weight_diff_after_3_steps": weight_diff,
              "max_state_diff_after_3_steps": state_diff,
              "grad_scale_left": hasattr(opts["folded"], "grad_scale")}
    result["ms_folded"] = timer(folded, before=lambda: fill("folded"))
    result["ms_in_place"] = timer(in_place, before=lambda: fill("in_place"))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--small", action="store_true", help="small shapes (a CPU smoke run)")
    p.add_argument("--compile", action="store_true", help="compile the per-chunk cross-entropy as training does")
    p.add_argument("--parts", default="head,clip", help="which checks: head, clip or both (default)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sizes = SMALL if args.small else FULL
    timer = Timer(device, *((1, 3) if args.small else (5, 20)))
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "sizes": sizes}
    parts = args.parts.split(",")
    if "head" in parts:
        record["head"] = head_check(sizes, device, timer, args.compile)
    if "clip" in parts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record["clip"] = clip_check(sizes, device, timer)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
