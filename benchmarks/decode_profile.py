"""Where a batch-1 decode step's time goes (run by hand on a GPU; never by the test suite).

For each shape: the engine's compiled decode step at batch 1 (prompt 128, 256 new tokens), then
- host time around the step (building inputs + launching the graphs, and reading the argmax back),
- GPU time of the step in the engine loop (CUDA events around the replay) and back to back (100 replays,
  no host work between: what the step costs when the host is hidden),
- the bandwidth limit (weight bytes / measured copy bandwidth) and both fractions of it,
- the top CUDA kernels of 10 replays (torch.profiler), to see which matrix products and small kernels cost.

    python benchmarks/decode_profile.py --models 1b,7b [--compile-mode max-autotune-no-cudagraphs] [--graph-chunks 4]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from generate_throughput import build_model, copy_bandwidth, weight_bytes
from lmforge.serve.engine import Engine, SamplingParams


def profile(shape: str, bandwidth: float, compile_mode, graph_chunks: int) -> None:
    model = build_model(shape, torch.device("cuda"))
    limit_ms = 1000 * weight_bytes(model) / bandwidth
    engine = Engine(model, None, max_batch_size=1, max_seq_len=384, max_prefill_tokens=128, compile_decode=True,
                    compile_mode=compile_mode, graph_chunks=graph_chunks)
    prompt = torch.randint(0, model.cfg.vocab_size, (128,)).tolist()
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    engine.generate([prompt], params)  # compiles and records every graph used below
    warmup = time.perf_counter() - t

    host = {"decode_running": 0.0, "advance": 0.0}
    events = []
    graphs = engine._graphs
    run_decode, advance, replay = engine._decode_running, engine._advance, graphs.run

    def timed_decode(ready):
        t0 = time.perf_counter()
        out = run_decode(ready)
        host["decode_running"] += time.perf_counter() - t0
        return out

    def timed_advance(*args, **kwargs):
        t0 = time.perf_counter()
        out = advance(*args, **kwargs)
        host["advance"] += time.perf_counter() - t0
        return out

    def timed_replay(ids, positions, span):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay(ids, positions, span)
        end.record()
        events.append((start, end))
        return out

    engine._decode_running, graphs.run = timed_decode, timed_replay
    engine.add_request("x", prompt, params)
    engine.step()  # the prefill (untimed)
    engine._advance = timed_advance
    torch.cuda.synchronize()
    t = time.perf_counter()
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps * 1000
    gpu = sum(s.elapsed_time(e) for s, e in events) / len(events)

    pieces, _ = graphs.graphs[(1, 256)]
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
        "shape": shape, "compile_mode": compile_mode, "graph_chunks": graph_chunks, "warmup_s": round(warmup, 1),
        "step_wall_ms": round(wall, 3), "host_decode_running_ms": round(1000 * host["decode_running"] / steps, 3),
        "host_advance_incl_sync_ms": round(1000 * host["advance"] / steps, 3), "gpu_step_in_loop_ms": round(gpu, 3),
        "gpu_step_back_to_back_ms": round(back_to_back, 3), "limit_ms": round(limit_ms, 3),
        "fraction_wall": round(limit_ms / wall, 3), "fraction_back_to_back": round(limit_ms / back_to_back, 3),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)

    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            for g in pieces:
                g.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    del engine, model, graphs, pieces
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,7b")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--graph-chunks", type=int, default=4)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU")
    bandwidth = copy_bandwidth(torch.device("cuda"))
    for shape in a.models.split(","):
        profile(shape, bandwidth, a.compile_mode, a.graph_chunks)


if __name__ == "__main__":
    main()
