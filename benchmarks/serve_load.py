"""Serving under load: output tokens/s, time to first token and time per output token (p50/p99).

Offline mode (the default): a fresh :class:`~lmforge.serve.engine.Engine` over a model of a named shape with random
weights receives ``--num-requests`` requests at once, prompts of random tokens with lengths uniform in
``--prompt-len A B``, outputs uniform in ``--output-len C D`` (greedy, the end-of-sequence token ignored), and runs
them to completion; ``--passes 2`` runs the same requests again on the same engine (a warm engine: with graphs
captured at start-up, the first pass should already be as fast). Start-up (cache sizing, graph capture, with
``--compile-prefill`` the prefill's compilation) is reported apart, and each pass reports ``graphs_compiled``, the
graphs ``torch.compile`` built during it (0 when start-up compiled everything). Each pass also reports what its
steps did (the engine's step counters): ``step_calls``,
``decode_steps`` (of them ``chained_steps``, launched on the device after the step in flight, and ``mixed_steps``,
which also prefilled and so read their decode step at once), ``prefill_forwards``, ``prefill_tokens`` and
``decode_rows``. ``--trace PATH`` writes a torch.profiler Chrome trace of steps ``--trace-steps`` of the first
pass (that pass's timing then includes the profiler's cost).

    python benchmarks/serve_load.py --shape llama3.2/1b --num-requests 512 --prompt-len 64 1024 \\
        --output-len 32 512 --max-batch-size 128 --compile

Online mode (``--url``): Poisson arrivals at ``--rate`` requests/s against a running ``lmforge serve`` (streamed
completions of random token-id prompts below ``--vocab-size``, over plain HTTP with httpx), with the same report
and the number of requests the server refused (``benchmarks/serve_online.py`` does all of it in one command:
checkpoint, server, load, shutdown):

    lmforge serve CKPT --compile --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --model CKPT_NAME --rate 16 --vocab-size 32000

Several ``--shape`` values run one after another in one process (each with a fresh engine; its memory is given
back before the next): one that fails prints a ``FAILED`` line (its traceback on standard error), the next runs, and
the exit status is 1.

``--paged-tile N`` sets the positions per loop iteration of the paged decode kernel
(:data:`lmforge.serve.kernels.PAGED_TILE`; ``benchmarks/paged_attention.py`` times the kernel alone).

``--json PATH`` writes every pass's numbers (each row names its shape). Nothing here is run by the test suite except
CPU runs of the offline mode on the ``tiny`` shape and of the online mode against a tiny served model.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from typing import Optional

import numpy as np
import torch
from torch._dynamo.utils import counters

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.serve.engine import Engine, SamplingParams

_LLAMA = dict(normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
              layernorm_epsilon=1e-5)
#: Named shapes (the models' Hugging Face config.json values; weights are random).
SHAPES = {
    # meta-llama/Llama-3.2-1B
    "llama3.2/1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8,
                        ffn_hidden_size=8192, max_position_embeddings=131072, rotary_base=500000.0,
                        share_embeddings_and_output_weights=True, **_LLAMA),
    # meta-llama/Llama-3.1-8B
    "llama3.1/8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8,
                        ffn_hidden_size=14336, max_position_embeddings=131072, rotary_base=500000.0,
                        share_embeddings_and_output_weights=False, **_LLAMA),
    # meta-llama/Llama-2-7b-hf
    "llama2/7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=32,
                      ffn_hidden_size=11008, max_position_embeddings=4096, rotary_base=10000.0,
                      share_embeddings_and_output_weights=False, **_LLAMA),
    # a CPU smoke test
    "tiny": dict(vocab_size=257, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, max_position_embeddings=512, share_embeddings_and_output_weights=True, **_LLAMA),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["llama3.2/1b"],
                   help="one or more shapes, run in turn")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[64, 1024], metavar=("A", "B"))
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 512], metavar=("C", "D"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    # offline
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the longest prompt + output")
    p.add_argument("--admission-batch", type=int, default=1,
                   help="admit waiting requests once this many rows are free (Engine(admission_batch=...))")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--compile", action="store_true", help="CUDA graphs and Triton kernels (GPU)")
    p.add_argument("--paged-tile", type=int, default=0,
                   help="cache positions per loop iteration of the paged decode kernel (kernels.PAGED_TILE; a power "
                        "of two, a multiple of --block-size; 0: the kernel's default)")
    p.add_argument("--compile-prefill", action="store_true",
                   help="the prefill forward compiled at start-up (Engine(compile_prefill=True))")
    p.add_argument("--passes", type=int, default=2, help="runs of the same requests on the same engine")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="offline: write a torch.profiler Chrome trace (CPU and CUDA activity) of --trace-steps of the "
                        "first pass to PATH")
    p.add_argument("--trace-steps", type=int, nargs=2, default=[200, 220], metavar=("FIRST", "END"),
                   help="engine steps [FIRST, END) of the first pass that --trace records")
    # online
    p.add_argument("--url", default=None, help="an lmforge server's /v1 address: online mode")
    p.add_argument("--model", default=None, help="online: the served model's name")
    p.add_argument("--api-key", default="none")
    p.add_argument("--rate", type=float, default=16.0, help="online: requests per second (Poisson arrivals)")
    p.add_argument("--vocab-size", type=int, default=32000, help="online: prompt token ids are drawn below it")
    a = p.parse_args(argv)
    if a.paged_tile:
        from lmforge.serve.kernels import paged_config

        if a.url:
            p.error("--paged-tile sets this process's kernel: offline mode only, not with --url")
        try:
            paged_config(a.block_size, 64, a.paged_tile)
        except ValueError as e:
            p.error(f"--paged-tile {a.paged_tile}: {e}")
    return a


def workload(a, vocab: int) -> list[tuple[list[int], int]]:
    """``(prompt_ids, max_tokens)`` of every request, from ``--seed``."""
    rng = np.random.default_rng(a.seed)
    out = []
    for _ in range(a.num_requests):
        n = int(rng.integers(a.prompt_len[0], a.prompt_len[1] + 1))
        out.append((rng.integers(0, vocab, n).tolist(), int(rng.integers(a.output_len[0], a.output_len[1] + 1))))
    return out


def summarize(name: str, wall: float, output_tokens: int, ttft: list[float], tpot: list[float], **extra) -> dict:
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    row = {"pass": name, "seconds": wall, "output_tokens": output_tokens, "output_tok_per_s": output_tokens / wall,
           "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
           **extra}
    print(f"{name}: {output_tokens} output tokens in {wall:.1f} s = {row['output_tok_per_s']:,.0f} tok/s; "
          f"TTFT p50 {row['ttft_p50'] * 1e3:.0f} ms p99 {row['ttft_p99'] * 1e3:.0f} ms; "
          f"TPOT p50 {row['tpot_p50'] * 1e3:.1f} ms p99 {row['tpot_p99'] * 1e3:.1f} ms"
          + "".join(f"; {k} {v}" for k, v in extra.items()), flush=True)
    return row


def build_model(shape: str, device: str, dtype: torch.dtype) -> Transformer:
    """Random weights, made on ``device`` directly in ``dtype`` (an 8B model built in fp32 first would take
    32 GB of the card for a while)."""
    cfg = ModelConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.init_weights(seed=0)
    return model.eval()


def offline(a, shape: str) -> list[dict]:
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    model = build_model(shape, a.device, dtype)
    requests = workload(a, model.cfg.vocab_size)
    max_seq_len = a.max_seq_len or a.prompt_len[1] + a.output_len[1]
    start = time.perf_counter()
    engine = Engine(model, None, max_batch_size=a.max_batch_size, max_seq_len=max_seq_len,
                    max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                    gpu_memory_utilization=a.gpu_memory_utilization, num_kv_blocks=a.num_kv_blocks,
                    enable_prefix_caching=not a.no_prefix_caching, compile_decode=a.compile,
                    compile_prefill=a.compile_prefill, admission_batch=a.admission_batch)
    startup = time.perf_counter() - start
    blocks = engine.cache.num_blocks - 1
    print(f"{shape} on {torch.cuda.get_device_name() if a.device.startswith('cuda') else a.device}, {dtype}: "
          f"start-up {startup:.1f} s (compilation and graph capture {engine.startup_seconds:.1f} s); KV cache {blocks} blocks of "
          f"{a.block_size} = {blocks * a.block_size:,} tokens ({engine.memory_bytes() / 2**30:.1f} GiB); "
          f"{a.num_requests} requests, prompts {a.prompt_len}, outputs {a.output_len}, max batch {a.max_batch_size}",
          flush=True)
    rows = []
    counted = ("decode_steps", "chained_steps", "mixed_steps", "prefill_forwards", "prefill_tokens", "decode_rows")
    for i in range(a.passes):
        preempted = engine.metrics.preemptions
        before = {k: getattr(engine.metrics, k) for k in counted}
        compiled = counters["stats"]["unique_graphs"]  # graphs torch.compile built: none should come while serving
        for j, (prompt, n) in enumerate(requests):
            engine.add_request(f"p{i}-{j}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        tokens, ttft, tpot = 0, [], []
        step, profiler = 0, None
        while engine.has_work():
            if a.trace and i == 0 and step == a.trace_steps[0]:
                profiler = start_trace(a.device)
            if profiler is not None and step == a.trace_steps[1]:
                stop_trace(profiler, a.trace)
                profiler = None
            step += 1
            for out in engine.step():
                tokens += len(out.token_ids)
                if out.finished and out.metrics is not None:
                    if out.metrics.ttft is not None:
                        ttft.append(out.metrics.ttft)
                    if out.metrics.tpot is not None:
                        tpot.append(out.metrics.tpot)
        if profiler is not None:  # the pass ended inside the window
            stop_trace(profiler, a.trace)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        steps = {k: getattr(engine.metrics, k) - before[k] for k in counted}
        rows.append(summarize("fresh engine" if i == 0 else f"pass {i + 1}", time.perf_counter() - t0, tokens, ttft,
                              tpot, shape=shape, preemptions=engine.metrics.preemptions - preempted,
                              startup_seconds=round(startup, 2), step_calls=step, **steps,
                              graphs_compiled=counters["stats"]["unique_graphs"] - compiled))
    return rows


def start_trace(device: str):
    """A started torch.profiler recording CPU activity, and CUDA's on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def stop_trace(profiler, path: str) -> None:
    """Stop ``profiler`` and write its Chrome trace (chrome://tracing, ui.perfetto.dev) to ``path``."""
    profiler.__exit__(None, None, None)
    profiler.export_chrome_trace(path)
    print(f"trace of the profiled steps: {path}", flush=True)


def online(a) -> list[dict]:
    """Poisson arrivals against ``a.url``: streamed ``/v1/completions`` of token-id prompts over plain HTTP (httpx; no
    OpenAI client needed). A request the server refuses or breaks off counts in ``failed`` (its status or error is
    printed once per kind), not in the token and latency figures."""
    import asyncio

    import httpx

    requests = workload(a, a.vocab_size)
    rng = np.random.default_rng(a.seed + 1)
    gaps = rng.exponential(1.0 / a.rate, len(requests))
    headers = {"Authorization": f"Bearer {a.api_key}"}

    async def one(client, prompt, n, delay, results, errors):
        await asyncio.sleep(delay)
        body = {"model": a.model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        t0 = time.perf_counter()
        first: Optional[float] = None
        count = 0
        try:
            async with client.stream("POST", a.url.rstrip("/") + "/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        errors.append(f"stream error: {chunk['error'].get('message')}"[:200])
                        return
                    if chunk.get("choices") and first is None:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            errors.append(f"{type(e).__name__}: {e}"[:200])
            return
        end = time.perf_counter()
        results.append((first - t0 if first else None, (end - first) / (count - 1) if first and count > 1 else None,
                        count))

    async def run():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        results: list = []
        errors: list = []
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None), trust_env=False) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*[one(client, p, n, float(d), results, errors)
                                   for (p, n), d in zip(requests, np.cumsum(gaps))])
            return time.perf_counter() - t0, results, errors

    wall, results, errors = asyncio.run(run())
    for kind in sorted({e.split(":")[0] for e in errors}):
        print(f"failed requests: {sum(e.split(':')[0] == kind for e in errors)} x {kind}, e.g. "
              f"{next(e for e in errors if e.split(':')[0] == kind)}", flush=True)
    return [summarize(f"online {a.rate}/s", wall, sum(r[2] for r in results), [r[0] for r in results if r[0] is not None],
                      [r[1] for r in results if r[1] is not None], requests=len(requests), failed=len(errors))]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.url is not None and a.model is None:
        raise SystemExit("--url needs --model (the served model's name)")
    if a.url:
        rows, failed = online(a), []
    else:
        rows, failed = [], []
        from lmforge.serve import kernels

        default_tile = kernels.PAGED_TILE
        kernels.PAGED_TILE = a.paged_tile or default_tile  # read when the engine's graphs capture the kernel
        try:
            for shape in a.shape:
                try:
                    rows += offline(a, shape)
                except Exception as e:  # noqa: BLE001 - reported, and the next shape runs
                    traceback.print_exc()
                    print(f"{shape}: FAILED {type(e).__name__}: {e}", flush=True)
                    failed.append(shape)
                gc.collect()  # this shape's engine and model, before the next one sizes its cache
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        finally:
            kernels.PAGED_TILE = default_tile
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": rows, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
