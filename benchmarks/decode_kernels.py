"""The pieces of a batch-1 decode step, one at a time (run by hand on a GPU; never by the test suite).

For the Llama-3.2-1B and Llama-2-7B shapes (bf16), times each single-row matrix product (q/k/v fused, o,
gate/up fused, down, the head) as
- ``F.linear`` (the library's kernel; what the engine used before :mod:`lmforge.serve.matvec`),
- :func:`lmforge.serve.matvec.matvec` compiled (inductor's reduction kernel),
- the same with inductor's coordinate-descent tuning of the kernel's block sizes,
and the argmax over the vocabulary and the decode attention (SDPA with a mask, grouped-query).
Each is captured in a CUDA graph of 50 back-to-back calls, so the time is the kernels' alone;
GB/s counts the matrix bytes only.

    python benchmarks/decode_kernels.py [--models 1b,7b]

Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from lmforge.serve.matvec import matvec

SHAPES = {  # name -> (N, K) of each decode matrix
    "1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
           "head": (128256, 2048)},
    "7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
           "head": (32000, 4096)},
}
ATTN = {"1b": (32, 8, 64), "7b": (32, 32, 128)}  # heads, kv heads, head dim


def graph_time_us(fn, *args, reps: int = 50) -> float:
    """Mean time of ``fn(*args)`` replayed from one CUDA graph of ``reps`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    for _ in range(3):
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
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    compiled = torch.compile(matvec, dynamic=False)
    tuned = torch.compile(matvec, dynamic=False, options={"coordinate_descent_tuning": True})
    for shape in a.models.split(","):
        for name, (N, K) in SHAPES[shape].items():
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            row = {"shape": shape, "matrix": name, "N": N, "K": K, "mbytes": round(N * K * 2 / 1e6, 1)}
            for case, fn in (("F.linear", F.linear), ("matvec", compiled), ("matvec-tuned", tuned)):
                err = (fn(x, w).float() - ref).abs().max().item()
                us = graph_time_us(fn, x, w)
                row[case] = {"us": round(us, 2), "gbs": round(N * K * 2 / us / 1e3, 0), "max_err": err}
            print(json.dumps(row), flush=True)
            del w
        V = SHAPES[shape]["head"][0]
        logits = torch.randn(1, V, device=dev)
        row = {"shape": shape, "op": "argmax", "V": V}
        row["eager_us"] = round(graph_time_us(lambda t: t.argmax(-1), logits), 2)
        row["compiled_us"] = round(graph_time_us(torch.compile(lambda t: t.argmax(-1)), logits), 2)
        print(json.dumps(row), flush=True)
        nh, nkv, hd = ATTN[shape]
        for S in (256, 384):
            q = torch.randn(1, nh, 1, hd, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, nkv, S, hd, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            mask = (torch.arange(S, device=dev) <= S - 40)[None, None, None, :]

            def sdpa(q, k, v, mask):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)

            def manual(q, k, v, mask):  # grouped heads as a batch of matrix products, fp32 softmax
                qg = q.view(1, nkv, nh // nkv, hd)
                s = (qg.float() @ k.float().transpose(-1, -2)) * hd ** -0.5
                s = s.masked_fill(~mask, float("-inf"))
                return (s.softmax(-1) @ v.float()).to(q.dtype).view(1, nh, 1, hd)

            err = (torch.compile(manual)(q, k, v, mask).float() - sdpa(q, k, v, mask).float()).abs().max().item()
            row = {"shape": shape, "op": "attention", "S": S, "sdpa_eager_us": round(graph_time_us(sdpa, q, k, v, mask), 2),
                   "sdpa_compiled_us": round(graph_time_us(torch.compile(sdpa), q, k, v, mask), 2),
                   "manual_compiled_us": round(graph_time_us(torch.compile(manual), q, k, v, mask), 2),
                   "manual_max_err": err}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
