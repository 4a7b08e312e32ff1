"""Training throughput of lmforge's own loop on one GPU (run by hand; never by the test suite).

Measures tokens/s, model TFLOP/s (PaLM convention, as ../shared/bench/hf_peer.py counts them) and
peak memory for a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV groups, ffn 8192,
vocab 128256, seq 2048) or a Llama-3.1-8B-shaped one (hidden 4096, 8 KV groups, ffn 14336, untied head; on one
80 GB card only a few of its 32 layers fit fp32 master weights + AdamW: ``--layers``, default 4), fp32 master
weights + bf16 autocast, fused AdamW, eager and compiled.
The step is lmforge's real one (``Trainer.train_step``), on random tokens. Cases ``fsdp`` and
``fsdp_compiled`` shard the same model with FSDP2 on one rank (``lmforge.parallel.fsdp.apply_fsdp``:
bf16 compute parameters, fp32 master weights and reductions), what ``model.fsdp=true`` does.

Switches (each one a training config key; every case of a call runs with them):
    --fused / --no-fused      q/k/v and gate/up as one matmul each (model.fused_projections; default on, off
                              under --fp8 as in training: measured slower joined there)
    --chunked-loss N          head + cross-entropy over N-token chunks (model.loss_chunk_size; 0 off; default auto:
                              2048 at a 128k vocabulary)
    --fp8 RECIPE              torchao float8 block projections (model.fp8=true, model.fp8_recipe: tensorwise, rowwise,
                              rowwise_with_gw_hp; default none). With --fused (the default) q/k/v and gate/up run as
                              one float8 matmul each (``joined`` in the record: 2 per block); --no-fused runs the
                              seven separate float8 projections of the first float8 runs (``joined: 0``)

    python benchmarks/train_throughput.py [--shape 1b|8b] [--cases eager,compiled,fsdp,fsdp_compiled] [--mbs 4]
        [--steps 20] [--no-fused] [--chunked-loss 0] [--fp8 tensorwise] [--tag before] [--trace PATH]
        [--compile-mode max-autotune-no-cudagraphs] [--inductor coordinate_descent_tuning=True ...]

``--trace PATH`` writes a torch.profiler Chrome trace (CPU and CUDA) of two more steps after the timed ones (the
timing stays clean), for the profile of the step (``.bench``-style summaries: kernel time by name).

Prints one JSON line per case and appends them to $OUT/lmforge_train.json when OUT is set.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import time

import numpy as np
import torch

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer, set_joint_projections
from lmforge.parallel.runtime import Runtime
from lmforge.parallel.transforms import apply_activation_checkpointing, apply_compile
from lmforge.train.loop import LoopSettings, MicroBatches, Trainer
from lmforge.train.assembly import resolve_loss_chunk_size
from lmforge.train.fp8 import RECIPES
from lmforge.train.objectives import CausalLMLoss
from lmforge.train.optim import build_optimizer, build_schedule

LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8,
                  ffn_hidden_size=8192, max_position_embeddings=4096, normalization="rmsnorm", activation="swiglu",
                  bias=False, position_embedding_type="rope", rotary_base=500000.0,
                  share_embeddings_and_output_weights=True, layernorm_epsilon=1e-5)
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8,
                  ffn_hidden_size=14336, max_position_embeddings=8192, normalization="rmsnorm", activation="swiglu",
                  bias=False, position_embedding_type="rope", rotary_base=500000.0,
                  share_embeddings_and_output_weights=False, layernorm_epsilon=1e-5)
SHAPES = {"1b": (LLAMA32_1B, None), "8b": (LLAMA31_8B, 4)}  # shape, default layers on one card (None: all)


class RandomTokens:
    """A dataset of random token windows (what the GPT dataset returns: seq+1 int64 tokens)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, vocab, size=(n, seq + 1), dtype=np.int64)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def compile_blocks(model, mode=None) -> None:
    """Each block compiled as training compiles it (``apply_compile``), or with inductor's ``mode`` (--compile-mode:
    e.g. max-autotune-no-cudagraphs, whose Triton GEMM templates can take the norms and casts around a product into
    its prologue/epilogue; not a training key yet, measured here first)."""
    if mode is None:
        apply_compile(model)
        return
    from lmforge.parallel.tensor import blocks_of

    for block in blocks_of(model):
        block.compile(mode=mode)


def bench(case: str, mbs: int, seq: int, steps: int, warm: int, shape: str = "1b", layers=None, fused: bool = True,
          chunk=None, fp8=None, sync_every_step: bool = False, trace=None, compile_mode=None) -> dict:
    device = torch.device("cuda")
    arch, default_layers = SHAPES[shape]
    cfg = ModelConfig(**{**arch, "num_layers": layers or default_layers or arch["num_layers"]})
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.init_weights(seed=0)
    if fp8:  # as build_training: float8 projections before joining (one float8 matmul per group), compile and FSDP
        from lmforge.train.fp8 import apply_fp8, fp8_problem

        problem = fp8_problem(device)
        if problem:
            raise SystemExit(problem)
        apply_fp8(model, fp8)
    joined = set_joint_projections(model, fused)
    if "ckpt" in case:
        apply_activation_checkpointing(model)
    chunk = resolve_loss_chunk_size(chunk, cfg)
    objective = CausalLMLoss(model, loss_chunk_size=chunk)
    if "compiled" in case and "fsdpfirst" not in case and "fsdpfwd" not in case:
        compile_blocks(model, compile_mode)
        objective.compile_loss()
    forward = objective
    if "fsdp" in case:
        from lmforge.parallel.dims import ParallelDims
        from lmforge.parallel.fsdp import apply_fsdp

        apply_fsdp(objective, model.layers, ParallelDims(1, fsdp="full"), Runtime(device=device),
                   precision="bf16-mixed", cpu_offload="offload" in case)
        if "fsdpfirst" in case:  # compile after sharding (the other order, for comparison)
            apply_compile(model)
            objective.compile_loss()
        if "fsdpfwd" in case:  # compile only each block's forward: FSDP's hooks stay outside the graphs
            for block in model.layers:
                block.forward = torch.compile(block.forward)
            objective.compile_loss()
    opt = build_optimizer(model, "fused_adam", 1e-4, 0.01, [0.9, 0.95], 1e-8, device)
    extra = 2 if trace else 0  # traced steps after the timed ones (the timing stays untraced)
    settings = LoopSettings(max_steps=warm + steps + extra, micro_batch_size=mbs, global_batch_size=mbs, accumulate=1,
                            gradient_clip_val=1.0, precision="bf16-mixed")
    rt = Runtime(device=device)
    trainer = Trainer(forward, model, opt, build_schedule("constant", 1e-4, warm + steps + extra), rt, settings)
    batches = MicroBatches(RandomTokens(mbs * (warm + steps + extra), seq, cfg.vocab_size), settings, rt)
    torch.cuda.reset_peak_memory_stats()
    for s in range(warm):
        loss, _ = trainer.train_step(batches, s)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(warm, warm + steps):
        loss, norm = trainer.train_step(batches, s)
        if sync_every_step:  # what the loop did before: loss and grad norm read back after every step
            float(loss), float(norm)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    tps = mbs * seq * steps / dt
    if trace:
        from serve_load import start_trace, stop_trace

        profiler = start_trace("cuda")
        for s in range(warm + steps, warm + steps + extra):
            trainer.train_step(batches, s)
        torch.cuda.synchronize()
        stop_trace(profiler, trace)
    rec = dict(case=f"lmforge_train_{shape.upper()}_{case}", layers=cfg.num_layers, fused=fused, joined=joined,
               loss_chunk_size=chunk, fp8=fp8, sync_every_step=sync_every_step, compile_mode=compile_mode, mbs=mbs,
               seq=seq, tokens_per_s=round(tps),
               model_tflops=round(tps * model.flops_per_token(seq) / 1e12, 1),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=float(loss),
               gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    del model, opt, trainer
    gc.collect()  # a checkpointed model can sit in a reference cycle; else its memory counts in the next case's peak
    torch.cuda.empty_cache()
    return rec


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="eager,compiled")
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="1b: Llama-3.2-1B, 8b: Llama-3.1-8B")
    p.add_argument("--layers", type=int, default=None, help="blocks (default: all for 1b, 4 for 8b)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="q/k/v and gate/up as one matmul each (model.fused_projections; default: on, off under --fp8)")
    p.add_argument("--chunked-loss", type=int, default=None, metavar="TOKENS",
                   help="head + cross-entropy over token chunks (model.loss_chunk_size; 0: off; default: auto)")
    p.add_argument("--fp8", choices=["none", *RECIPES], default="none",
                   help="torchao float8 block projections (model.fp8=true, model.fp8_recipe); joined unless --no-fused")
    p.add_argument("--sync-every-step", action="store_true",
                   help="read the loss and grad norm back after every step (the loop before it deferred them)")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="a torch.profiler Chrome trace of 2 more steps after the timed ones (one case per call)")
    p.add_argument("--tag", default="", help="a label copied into every record (e.g. before / after)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled cases' blocks (default: training's own compile)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY to the Python literal VALUE before compiling (repeatable; "
                        "e.g. coordinate_descent_tuning=True); copied into every record")
    a = p.parse_args(argv)
    a.inductor_config = {}
    for item in a.inductor:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--inductor {item!r}: expected KEY=VALUE, e.g. coordinate_descent_tuning=True")
        try:
            a.inductor_config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            p.error(f"--inductor {item!r}: VALUE must be a Python literal (True, 4, 'name')")
    return a


def main():
    a = parse()
    torch.backends.cuda.matmul.allow_tf32 = True
    import torch._inductor.config as inductor_config

    for key, value in a.inductor_config.items():
        if not hasattr(inductor_config, key):
            raise SystemExit(f"--inductor {key}=...: torch._inductor.config has no {key!r}")
        setattr(inductor_config, key, value)
    fp8 = None if a.fp8 == "none" else a.fp8
    if a.fused is None:  # model.fused_projections left unset: training's rule, from its one source
        from types import SimpleNamespace

        from lmforge.train.pretrain import joint_projections
        a.fused = joint_projections(SimpleNamespace(fused_projections=None, fp8=fp8 is not None))
    out = os.path.join(os.environ["OUT"], "lmforge_train.json") if os.environ.get("OUT") else None
    results = []
    if out and os.path.exists(out):  # several invocations in one device call add to one file
        with open(out) as f:
            results = json.load(f)
    for case in a.cases.split(","):
        for mbs in ([a.mbs] if ":" not in case else [int(case.split(":")[1])]):
            name = case.split(":")[0]
            try:
                rec = bench(name, mbs, a.seq, a.steps, a.warm, a.shape, a.layers, a.fused, a.chunked_loss, fp8,
                            a.sync_every_step, a.trace, a.compile_mode)
            except Exception as e:  # one OOM must not lose the other figures
                rec = dict(case=f"lmforge_train_{a.shape.upper()}_{name}", mbs=mbs, fused=a.fused,
                           loss_chunk_size=a.chunked_loss, fp8=fp8, error=repr(e)[:300])
                torch.cuda.empty_cache()
            rec["tag"] = a.tag
            if a.inductor_config:
                rec["inductor"] = a.inductor_config
            print(json.dumps(rec), flush=True)
            results.append(rec)
            if out:
                with open(out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
