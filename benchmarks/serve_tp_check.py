"""Tensor-parallel serving on N GPUs against one GPU: the same tokens, and decode speed (run by hand; CI has one
CPU machine, where tests/serve/test_serve_tensor_parallel.py runs 2 gloo ranks).

A Llama-shaped model with random weights (the same on every rank: built from one seed) is served by
:class:`lmforge.serve.tensor_parallel.LockstepEngine` on N ranks (``launch``: one process a GPU, NCCL), then by one
plain :class:`~lmforge.serve.engine.Engine` on GPU 0 (skipped with ``--no-baseline``, e.g. for a shape that does
not fit one GPU). Both run the same greedy workload: ``--batch`` random prompts of 32 to 512 tokens, ``--new``
tokens each, then the same at batch 1. Checks: in float32 every request's tokens equal one GPU's; in bf16 the
tokens before the first difference are reported, and the check passes when at least half the requests agree on
their first 32 tokens (the all-reduced partial sums round differently from one GPU's matmuls, and a near tie
flips; a broken split agrees on none). Reported: decode tokens/s of each (generated tokens over the wall time of
the workload after start-up), batch-1 decode tokens/s, and each rank's KV cache size. The numbers go to
``--out`` (JSON) and standard output. Exits non-zero when the check fails.

    python benchmarks/serve_tp_check.py --tp 2 --shape 8b --dtype bfloat16 --out benchmarks/results/serve_tp_8b.json
    python benchmarks/serve_tp_check.py --tp 2 --shape small --dtype float32        # the exact check
    python benchmarks/serve_tp_check.py --tp 2 --shape tiny --dtype float32 --device cpu   # CPU gloo smoke run
    python benchmarks/serve_tp_check.py --tp 1 --shape small --dtype float32     # one GPU: the spawned NCCL path

Both engines are eager (``--compile`` is not supported with tensor parallelism yet); the KV cache of each is
sized from ``--gpu-memory-utilization`` of its card.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128),
    "small": dict(vocab_size=32000, hidden_size=1024, num_layers=8, num_attention_heads=16, num_query_groups=8,
                  ffn_hidden_size=2816),
    "8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=14336),
    "13b": dict(vocab_size=32000, hidden_size=5120, num_layers=40, num_attention_heads=40, num_query_groups=40,
                ffn_hidden_size=13824),
}


def build_model(shape: str, dtype: torch.dtype):
    """The shape's Llama model with seeded random weights, on the CPU (every rank builds the same one)."""
    from lmforge.models import ModelConfig, Transformer

    cfg = ModelConfig(**SHAPES[shape], max_position_embeddings=2048, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=False,
                      init_method_std=0.02)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    model.init_weights(seed=1)
    return model.eval()


def workload(vocab: int, batch: int):
    """``batch`` prompts of 32 to 512 random tokens (seeded) and one prompt for the batch-1 run."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 513, (batch,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return prompts, prompts[:1]


def run(engine, args) -> dict:
    """The greedy workload on ``engine`` (an Engine or rank 0's LockstepEngine): tokens and speeds."""
    from lmforge.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    prompts, single = workload(engine.cfg.vocab_size, args.batch)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    sync = torch.cuda.synchronize if torch.cuda.is_available() and args.device != "cpu" else (lambda: None)
    sync()
    start = time.perf_counter()
    tokens = engine.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    one = engine.generate(single, params)
    sync()
    seconds_1 = time.perf_counter() - start
    return {"tokens": tokens, "tok_s": sum(map(len, tokens)) / seconds, "batch1_tok_s": len(one[0]) / seconds_1,
            "seconds": seconds, "kv_blocks": engine.cache.num_blocks - 1, "kv_gib": engine.memory_bytes() / 2**30}


def engine_kwargs(args) -> dict:
    return dict(max_batch_size=args.batch, max_seq_len=512 + args.new + 16,
                gpu_memory_utilization=args.gpu_memory_utilization, log=lambda m: None)


def rank_main(ctx, args, out: str) -> None:
    """One rank: the sharded model, the lockstep engine; rank 0 runs the workload and writes the result."""
    from lmforge.serve.engine import Engine
    from lmforge.serve.tensor_parallel import LockstepEngine, shard_model

    dtype = getattr(torch, args.dtype)
    model = shard_model(build_model(args.shape, dtype), ctx.rank, ctx.tp, ctx.group).to(ctx.device)
    engine = LockstepEngine(Engine(model, agree_blocks=ctx.agree_blocks, **engine_kwargs(args)), ctx.control, ctx.rank)
    if ctx.rank > 0:
        engine.follow()
        return
    try:
        result = run(engine, args)
        if ctx.device.type == "cuda":
            result["peak_gib_rank0"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    finally:
        engine.close()
    with open(out, "w") as f:
        json.dump(result, f)


def compare(tp_tokens: list, one_tokens: list, exact: bool) -> dict:
    same_prefix = []
    for a, b in zip(tp_tokens, one_tokens):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_prefix.append(n)
    agree32 = sum(n >= min(32, len(a)) for n, a in zip(same_prefix, tp_tokens)) / len(tp_tokens)
    ok = tp_tokens == one_tokens if exact else agree32 >= 0.5
    return {"equal": tp_tokens == one_tokens, "same_prefix_tokens": same_prefix,
            "requests_agreeing_on_32_tokens": agree32, "ok": ok}


def main() -> int:
    import tempfile
    from pathlib import Path

    from lmforge.serve.tensor_parallel import launch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--no-baseline", action="store_true", help="skip the one-GPU run (a shape that does not fit)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        print(f"error: --tp {args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "tp.json")
        launch(args.tp, args.device, rank_main, args, out)
        tp = json.loads(Path(out).read_text())
    report = {"shape": args.shape, "dtype": args.dtype, "tp": args.tp, "batch": args.batch, "new": args.new,
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "tp_tok_s": tp["tok_s"], "tp_batch1_tok_s": tp["batch1_tok_s"], "tp_kv_blocks": tp["kv_blocks"],
              "tp_kv_gib_per_rank": tp["kv_gib"], "tp_peak_gib_rank0": tp.get("peak_gib_rank0")}
    ok = True
    if not args.no_baseline:
        from lmforge.serve.engine import Engine

        device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        model = build_model(args.shape, getattr(torch, args.dtype)).to(device)
        one = run(Engine(model, **engine_kwargs(args)), args)
        check = compare(tp["tokens"], one["tokens"], exact=args.dtype == "float32")
        ok = check["ok"]
        report.update(one_tok_s=one["tok_s"], one_batch1_tok_s=one["batch1_tok_s"], one_kv_blocks=one["kv_blocks"],
                      speedup=tp["tok_s"] / one["tok_s"], **check)
    print(json.dumps({k: v for k, v in report.items() if k != "same_prefix_tokens"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("OK" if ok else "FAILED: tensor-parallel tokens differ from one GPU's", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
