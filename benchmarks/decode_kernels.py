"""The matrix products and the argmax of a batch-1 decode step, one at a time (run by hand on a GPU;
never by the test suite).

For the Llama-3.2-1B and Llama-2-7B shapes (bf16), times each single-row product (q/k/v fused, o, gate/up
fused, down, the head) through ``F.linear`` (the library's kernel) and through
:func:`lmforge.serve.kernels.matvec` (the Triton kernel, with its chosen blocks and with a sweep of others),
through the same kernel with the prologue/epilogue that :class:`lmforge.serve.kernels.DecodeBlock` uses
("fused": 1/rms for q/k/v and gate/up, the residual for o, SwiGLU and the residual for down; the sweep times
these), and the argmax over the vocabulary (one pass, and two passes: per block of the vocabulary, then over
the blocks). Each product is captured in a CUDA graph of 48 calls that cycle through copies of the matrix
larger together than the L2 cache (a decode step never finds its weights there), so the time is the
kernels' alone from device memory; GB/s counts the matrix bytes.

    python benchmarks/decode_kernels.py [--models 1b,7b] [--sweep]

Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from lmforge.serve import kernels as mv
from lmforge.serve.engine import argmax_rows as argmax_two_pass

# each matrix's prologue/epilogue in DecodeBlock: (rms norm, residual, swiglu)
FUSED = {"qkv": (True, False, False), "o": (False, True, False), "gate_up": (True, False, False),
         "down": (False, True, True), "head": (False, False, False)}

SHAPES = {  # name -> (N, K) of each decode matrix
    "1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
           "head": (128256, 2048)},
    "7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
           "head": (32000, 4096)},
}


def capture(fn, xs: list, reps: int = 48) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``reps`` calls ``fn(*xs[i % len(xs)])``, after two warm-up calls on a side stream (also
    benchmarks/decode_gemm.py's)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in xs[:2]:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(*xs[i % len(xs)])
    return graph


def graph_time_us(fn, xs: list, reps: int = 48) -> float:
    """Mean time of one call, from a CUDA graph of ``reps`` calls ``fn(*xs[i % len(xs)])``."""
    graph = capture(fn, xs, reps)
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (10 * reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,7b")
    ap.add_argument("--sweep", action="store_true", help="also time other block sizes of the Triton kernel")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for shape in a.models.split(","):
        for name, (N, K) in SHAPES[shape].items():
            mbytes = N * K * 2 / 1e6
            copies = max(1, min(16, int(240 // mbytes)))  # > 200 MB together: beyond the 50 MB of L2
            ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, ws[0]).float()
            xs = [(x, w) for w in ws]
            row = {"shape": shape, "matrix": name, "N": N, "K": K, "mbytes": round(mbytes, 1), "copies": copies}
            for case, fn in (("F.linear", F.linear), ("matvec", mv.matvec)):
                err = (fn(x, ws[0]).float() - ref).abs().max().item()
                us = graph_time_us(fn, xs)
                row[case] = {"us": round(us, 2), "gbs": round(mbytes * 1e3 / us), "max_err": err}
            norm, residual, swiglu = FUSED[name]
            xf = torch.randn(1, 1, 2 * K if swiglu else K, device=dev, dtype=torch.bfloat16)
            r = torch.randn(N, device=dev, dtype=torch.bfloat16) if residual else None
            xfs = [(xf, w) for w in ws]

            def fused(x, w, r=r, norm=norm, swiglu=swiglu):
                return torch.ops.lmforge.matvec(x, w, None, r, 1e-5 if norm else None, swiglu)
            us = graph_time_us(fused, xfs)
            row["fused"] = {"us": round(us, 2), "gbs": round(mbytes * 1e3 / us), "norm": norm, "residual": residual,
                            "swiglu": swiglu}
            row["matvec_config"] = mv.matvec_config(N, K)
            if a.sweep:
                best = None
                for bn, bk, warps, stages in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (4, 8), (1, 3)):
                    if bn * bk > 16384 or bk > max(512, 1 << (K - 1).bit_length()):
                        continue
                    y = torch.empty(N, device=dev, dtype=torch.bfloat16)

                    def fn(x, w, bn=bn, bk=bk, warps=warps, stages=stages, y=y):
                        mv._matvec_kernel[(triton_cdiv(N, bn),)](
                            x, w, y, y, r if residual else y, N, K, K, 1e-5, BLOCK_N=bn, BLOCK_K=bk, SWIGLU=swiglu,
                            NORM=norm, RESIDUAL=residual, num_warps=warps, num_stages=stages)
                    us = graph_time_us(fn, xfs)
                    if best is None or us < best[0]:
                        best = (us, dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
                row["sweep_best_fused"] = {"us": round(best[0], 2), "gbs": round(mbytes * 1e3 / best[0]), **best[1]}
            print(json.dumps(row), flush=True)
            del ws, xs
        V = SHAPES[shape]["head"][0]
        ls = [(torch.randn(1, V, device=dev),) for _ in range(4)]
        same = all(int(argmax_two_pass(t)) == int(t.argmax(-1)) for (t,) in ls)
        row = {"shape": shape, "op": "argmax", "V": V, "two_pass_equal": same,
               "eager_us": round(graph_time_us(lambda t: t.argmax(-1), ls), 2),
               "compiled_us": round(graph_time_us(torch.compile(lambda t: t.argmax(-1)), ls), 2),
               "two_pass_eager_us": round(graph_time_us(argmax_two_pass, ls), 2),
               "two_pass_compiled_us": round(graph_time_us(torch.compile(argmax_two_pass), ls), 2)}
        print(json.dumps(row), flush=True)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    main()
