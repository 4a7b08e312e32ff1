"""Where a batch-1 decode step's time goes (run by hand on a GPU; never by the test suite).

For each shape: the engine's compiled decode step at batch 1 (prompt 128, 256 new tokens), then
- the step's wall time in the engine loop (greedy steps are pipelined: the next is launched before the last
  is read, so this approaches the GPU time when the host keeps up),
- the GPU time of the step back to back (100 replays of its graphs, no host work between),
- the bandwidth limit (weight bytes / measured copy bandwidth) and both fractions of it,
- the top CUDA kernels of 10 replays (torch.profiler), to see which matrix products and small kernels cost.

    python benchmarks/decode_profile.py --models 1b,7b [--no-kernels] [--tune] [--compile-mode M] [--graph-chunks 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from generate_throughput import build_model, copy_bandwidth, weight_bytes
from lmforge.serve.engine import Engine, SamplingParams


def profile(shape: str, bandwidth: float, a) -> None:
    model = build_model(shape, torch.device("cuda"))
    limit_ms = 1000 * weight_bytes(model) / bandwidth
    options = {"coordinate_descent_tuning": True} if a.tune else None
    engine = Engine(model, None, max_batch_size=1, max_seq_len=384, max_num_batched_tokens=128, num_kv_blocks=24,
                    compile_decode=True,
                    compile_mode=a.compile_mode, compile_options=options, graph_chunks=a.graph_chunks,
                    decode_kernels=not a.no_kernels)
    prompt = torch.randint(0, model.cfg.vocab_size, (128,)).tolist()
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    engine.generate([prompt], params)  # compiles and records every graph used below
    warmup = time.perf_counter() - t

    engine.add_request("x", prompt, params)
    engine.step()  # the prefill (untimed)
    torch.cuda.synchronize()
    t = time.perf_counter()
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / (steps - 1) * 1000  # 255 decode steps over 256 calls

    pieces, _ = engine.runner.graphs.graphs[(1, engine.runner.span(0))]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        for g in pieces:
            g.replay()
    start.record()
    for _ in range(100):
        for g in pieces:
            g.replay()
    end.record()
    torch.cuda.synchronize()
    back_to_back = start.elapsed_time(end) / 100
    print(json.dumps({
        "shape": shape, "decode_kernels": not a.no_kernels, "tune": a.tune, "compile_mode": a.compile_mode,
        "graph_chunks": a.graph_chunks, "warmup_s": round(warmup, 1), "step_wall_ms": round(wall, 3),
        "gpu_step_back_to_back_ms": round(back_to_back, 3), "limit_ms": round(limit_ms, 3),
        "fraction_wall": round(limit_ms / wall, 3), "fraction_back_to_back": round(limit_ms / back_to_back, 3),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)

    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            for g in pieces:
                g.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60), flush=True)
    # the single-row products one by one: per step, 4 per block (q/k/v, o, gate/up, down) and the head
    products = sorted((e for e in prof.events() if e.name == "_matvec_kernel"), key=lambda e: e.time_range.start)
    L = len(model.layers)
    if products and len(products) == 10 * (4 * L + 1):
        roles = ["qkv", "o", "gate_up", "down"] * L + ["head"]
        per_role: dict[str, list[float]] = {}
        for i, e in enumerate(products):
            per_role.setdefault(roles[i % len(roles)], []).append(e.time_range.elapsed_us())
        print(json.dumps({"shape": shape, "matvec_us_per_call": {k: round(sum(v) / len(v), 2) for k, v in per_role.items()},
                          "matvec_us_per_step": round(sum(e.time_range.elapsed_us() for e in products) / 10, 1)}),
              flush=True)
    del engine, model, pieces
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,7b")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--no-kernels", action="store_true", help="without lmforge's Triton decode kernels")
    ap.add_argument("--tune", action="store_true", help="inductor's coordinate-descent tuning")
    ap.add_argument("--graph-chunks", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25, help="kernels listed")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU")
    bandwidth = copy_bandwidth(torch.device("cuda"))
    for shape in a.models.split(","):
        profile(shape, bandwidth, a)


if __name__ == "__main__":
    main()
