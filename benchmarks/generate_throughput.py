"""Generation throughput of lmforge's serving engine on one GPU (run by hand; never by the test suite).

Llama-3.2-1B and Llama-2-7B shapes with random weights in bf16, prompts of 128 random tokens, 256 new
tokens (greedy, end-of-sequence ignored), batch 1 and 32, the decode step eager and compiled (CUDA graphs
and lmforge's Triton decode kernels; "compiled-no-kernels": without those kernels; "compiled-1graph": the
whole step as one graph instead of the engine's default pieces; "compiled-autotune": inductor's
max-autotune kernels for the matrix products).
Reports generated tokens/s, the prefill time, the mean decode step, and for every case the decode step
as a fraction of the memory-bandwidth limit: (weight bytes read per step / measured device copy
bandwidth) / measured step time. The copy bandwidth is measured here (a 1 GiB device-to-device copy,
bytes read + written).

    python benchmarks/generate_throughput.py [--models 1b,7b] [--batches 1,32] [--cases eager,compiled,compiled-1graph,compiled-autotune]

Prints one JSON line per case and writes them all to $OUT/lmforge_generate.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.serve.engine import Engine, SamplingParams

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=8192, max_position_embeddings=4096, normalization="rmsnorm", activation="swiglu",
               bias=False, position_embedding_type="rope", rotary_base=500000.0,
               share_embeddings_and_output_weights=True, layernorm_epsilon=1e-5),
    "7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=32,
               ffn_hidden_size=11008, max_position_embeddings=4096, normalization="rmsnorm", activation="swiglu",
               bias=False, position_embedding_type="rope", rotary_base=10000.0,
               share_embeddings_and_output_weights=False, layernorm_epsilon=1e-5),
}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device copy bandwidth in bytes/s (read + write), from a ``nbytes`` device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    return 2 * nbytes * iters / seconds


def build_model(shape: str, device: torch.device) -> Transformer:
    cfg = ModelConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.init_weights(seed=0)
    return model.to(torch.bfloat16).eval()  # as load_for_inference(dtype="bfloat16") does


def weight_bytes(model: Transformer) -> int:
    """Bytes of every distinct parameter (a tied head counted once): what one decode step reads."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_once(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    generated = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.step()  # admission + prefill (+ the first token of each)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    generated += sum(len(o.token_ids) for o in outs)
    steps = 0
    while engine.has_work():
        outs = engine.step()
        generated += sum(len(o.token_ids) for o in outs)
        steps += 1
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"generated": generated, "total_s": t2 - t0, "prefill_s": t1 - t0, "decode_steps": steps,
            "decode_step_ms": 1000 * (t2 - t1) / max(steps, 1)}


def bench(shape: str, batch: int, case: str, prompt_len: int, new_tokens: int, bandwidth: float) -> dict:
    device = torch.device("cuda")
    model = build_model(shape, device)
    chunks = {"compiled": {}, "compiled-1graph": {"graph_chunks": 1},
              "compiled-autotune": {"compile_mode": "max-autotune-no-cudagraphs"},
              "compiled-no-kernels": {"decode_kernels": False}}
    engine = Engine(model, None, max_batch_size=batch, max_seq_len=prompt_len + new_tokens,
                    max_num_batched_tokens=batch * prompt_len, compile_decode=case in chunks,
                    num_kv_blocks=batch * -(-(prompt_len + new_tokens) // 16), enable_prefix_caching=False,
                    **chunks.get(case, {}))  # the cache the batch needs (the engines of one process share the card)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    t = time.perf_counter()
    run_once(engine, prompts, new_tokens)  # warm-up: compiles and records every decode shape used below
    warmup_s = time.perf_counter() - t
    r = run_once(engine, prompts, new_tokens)
    wbytes = weight_bytes(model)
    limit_ms = 1000 * wbytes / bandwidth  # a decode step cannot be faster than reading the weights once
    result = {
        "bench": "lmforge_generate", "model": f"llama-{shape}-shape", "case": case, "batch": batch,
        "prompt": prompt_len, "new_tokens": new_tokens, "dtype": "bfloat16",
        "tokens_per_s": round(r["generated"] / r["total_s"], 1),
        "decode_tokens_per_s": round(batch * 1000 / r["decode_step_ms"], 1),
        "total_s": round(r["total_s"], 3), "prefill_ms": round(1000 * r["prefill_s"], 2),
        "decode_step_ms": round(r["decode_step_ms"], 3), "generated": r["generated"],
        "weight_gb": round(wbytes / 1e9, 3), "copy_bandwidth_gbs": round(bandwidth / 1e9, 1),
        "bandwidth_limit_step_ms": round(limit_ms, 3),
        "fraction_of_bandwidth_limit": round(limit_ms / r["decode_step_ms"], 3),
        "warmup_s": round(warmup_s, 1), "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "matvec_rows": __import__("lmforge.serve.kernels").serve.kernels.MATVEC_ROWS,
    }
    del engine, model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,7b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--cases", default="eager,compiled")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--matvec-rows", type=int, default=None, help="rows per program of the single-row kernel")
    a = ap.parse_args()
    if a.matvec_rows:
        from lmforge.serve import kernels

        kernels.MATVEC_ROWS = a.matvec_rows
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    bandwidth = copy_bandwidth(torch.device("cuda"))
    results = []
    for shape in a.models.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            for case in a.cases.split(","):
                try:
                    r = bench(shape, batch, case, a.prompt, a.new_tokens, bandwidth)
                except Exception as e:  # report and go on with the other cases
                    r = {"bench": "lmforge_generate", "model": f"llama-{shape}-shape", "case": case, "batch": batch,
                         "error": f"{type(e).__name__}: {e}"[:2000]}
                    torch.cuda.empty_cache()
                print(json.dumps(r), flush=True)
                results.append(r)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "lmforge_generate.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
