"""GPU check of the serving engine's captured decode step and paged cache (run by hand on a GPU; CI has none).

The Triton paged decode-attention kernel must match its PyTorch reference (bf16, fp16, fp32; batch 1 with a long
context, large batches of mixed lengths, grouped and plain heads, a sliding window), with each tile of its loop
(one block per iteration, the default, and 64 and 128 positions). The compiled, CUDA-graph
decode path must give the greedy tokens of the eager reference path (PyTorch attention) for a batch of
prompts of different lengths joining and leaving (continuous batching), in fp32, for a dense model, a
grouped-query model with a sliding window, a tied head, an ALiBi model, a model serving two LoRA adapters
per request (MultiLoRA's row buffer read by the captured graphs) and a p-tuned model (virtual tokens in
front of every prompt). Each dense model also decodes prompts alone (batch 1, the graphs of one row). Then the
scheduler on the GPU: a compiled engine with a tiny KV cache (preemptions), a small token budget (chunked
prefill) and shared prompt prefixes (prefix-cache hits) gives the reference tokens, and a cache sized by
``gpu_memory_utilization`` stays within it. The compiled prefill (``compile_prefill=True``) gives the same tokens
in that scheduling mix, compiles nothing after start-up and never runs cuDNN's SDPA (fresh and gather paths; every
prefill of the sliding-window model takes the gather path). A compiled engine with one captured batch size
(``decode_batches``) whose requests end on stop tokens one by one goes on chaining past them (their rows padding)
and gives the reference tokens.
The compiled engines use lmforge's Triton decode kernels (:mod:`lmforge.serve.kernels`, at batch 1) unless
``--no-kernels``; ``--only="paged kernel,ended rows"`` runs the named checks alone (names as the list in
:func:`main`). Every check prints its result line; one that raises prints an ``ERROR`` line (its traceback on
standard error) and the next check runs. Exits non-zero on any mismatch or error.

    python benchmarks/engine_gpu_check.py [--no-kernels] [--only="paged kernel,ended rows"]
"""

from __future__ import annotations

import sys
import traceback
from functools import partial

import torch

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.serve.engine import Engine, SamplingParams

SHAPES = {
    "llama-gqa": dict(vocab_size=503, hidden_size=96, num_layers=3, num_attention_heads=6, num_query_groups=2,
                      ffn_hidden_size=160, max_position_embeddings=1024, normalization="rmsnorm",
                      activation="swiglu", bias=False, position_embedding_type="rope",
                      share_embeddings_and_output_weights=False),
    "mistral-window": dict(vocab_size=503, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=128, max_position_embeddings=1024, normalization="rmsnorm",
                           activation="swiglu", bias=False, position_embedding_type="rope", sliding_window=37),
    "gpt": dict(vocab_size=503, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                max_position_embeddings=1024),
    "alibi": dict(vocab_size=503, hidden_size=72, num_layers=5, num_attention_heads=6, ffn_hidden_size=128,
                  max_position_embeddings=1024, position_embedding_type="alibi"),
}


KERNELS = "--no-kernels" not in sys.argv[1:]
BLOCKS = 3 * 44  # three sequences of 700 positions in blocks of 16 (engines made one after another share the card)


def check_paged_kernel() -> int:
    """paged_decode_attention against paged_attention_reference on the GPU; returns the mismatches."""
    from lmforge.serve import kernels as K

    failures = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [(1, 32, 8, 64, 4000, torch.bfloat16, 0), (64, 32, 8, 128, 2048, torch.bfloat16, 0),
             (8, 32, 32, 128, 1500, torch.float16, 0), (5, 6, 2, 64, 700, torch.float32, 37),
             (128, 32, 8, 64, 300, torch.bfloat16, 0)]
    for case in cases:
        for tile in (0, 64, 128):  # the default (one block per loop iteration), then several blocks gathered
            try:
                failures += _paged_case(K, g, *case, tile=tile)
            except Exception as e:  # noqa: BLE001 - reported, and the next case runs
                traceback.print_exc()
                print(f"paged kernel {case} tile {tile}: ERROR {type(e).__name__}: {e}", flush=True)
                failures += 1
    return failures


def _paged_case(K, g, B, nh, nkv, hd, max_len, dt, window, tile=0) -> int:
    """One case of :func:`check_paged_kernel` against the exact (float64) reference; an fp32 case also prints
    its distance to the fp32 reference, whose attention may run tf32 products on the GPU."""
    bs = 16
    per = -(-max_len // bs)
    blocks = B * per + 1
    kc = torch.randn(blocks, bs, nkv, hd, device="cuda", dtype=dt, generator=g)
    vc = torch.randn(blocks, bs, nkv, hd, device="cuda", dtype=dt, generator=g)
    tables = (torch.randperm(blocks - 1, device="cuda", generator=g)[: B * per] + 1).view(B, per).int()
    lens = torch.randint(1, max_len + 1, (B,), device="cuda", generator=g)
    lens[0] = max_len
    q = torch.randn(B, nh, hd, device="cuda", dtype=dt, generator=g)
    ref = K.paged_attention_reference(q.double(), kc.double(), vc.double(), tables, lens, hd ** -0.5,
                                      window or None)
    out = K.paged_decode_attention(q, kc, vc, tables, lens, hd ** -0.5, window, 0, tile).double()
    err = (out - ref).abs().max().item()
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dt]  # fp32: ieee products
    ok = err <= tol
    extra = ""
    if dt == torch.float32:
        ref32 = K.paged_attention_reference(q, kc, vc, tables, lens, hd ** -0.5, window or None).double()
        extra = (f" (the fp32 reference is {(ref32 - ref).abs().max().item():.2e} from it, the kernel "
                 f"{(out - ref32).abs().max().item():.2e} from the fp32 reference)")
    print(f"paged kernel B={B} heads {nh}/{nkv} hd={hd} len<={max_len} {dt} window={window} tile={tile or 'default'}: "
          f"max error {err:.2e} "
          f"from the float64 reference{extra} {'ok' if ok else 'MISMATCH'}", flush=True)
    return int(not ok)


def check_scheduling(shape: dict, g: torch.Generator) -> int:
    """Preemption, chunked prefill and prefix caching on the GPU (compiled) against the eager reference."""
    model = Transformer(ModelConfig(**shape)).cuda()
    model.init_weights(seed=1)
    model.eval()
    shared = torch.randint(0, 503, (100,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 503, (n,), generator=g).tolist() for n in (5, 150, 1, 60, 33, 200)]
    prompts += [torch.randint(0, 503, (n,), generator=g).tolist() for n in (300, 7)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (80, 20, 150, 64, 3, 40, 90, 120)]
    ref = Engine(model, None, max_batch_size=8, max_seq_len=700, decode_kernels=False, num_kv_blocks=8 * 44,
                 enable_prefix_caching=False).generate(prompts, params)
    failures = 0
    for tight in (False, True):
        eng = Engine(model, None, max_batch_size=8, max_seq_len=700, compile_decode=True, decode_kernels=KERNELS,
                     num_kv_blocks=50 if tight else 8 * 44, max_num_batched_tokens=64)
        got = eng.generate(prompts, params)
        same = [a == b for a, b in zip(ref, got)]
        alloc = eng.cache.allocator
        alloc.check()
        print(f"scheduling ({'50 blocks' if tight else 'roomy cache'}, 64-token steps): {sum(same)}/{len(same)} equal; "
              f"preemptions {eng.metrics.preemptions}, prefix-cache hits {alloc.hits}/{alloc.queries}, blocks in use "
              f"after {alloc.num_used}; start-up {eng.startup_seconds:.1f} s", flush=True)
        failures += len(same) - sum(same) + (alloc.num_used != 0) + (tight and eng.metrics.preemptions == 0)
        del eng
    import gc

    gc.collect()  # the compiled engines' graphs and caches
    torch.cuda.empty_cache()
    eng = Engine(model, None, max_batch_size=8, max_seq_len=700, gpu_memory_utilization=0.5)
    total = torch.cuda.mem_get_info()[1]
    ok = 0 < eng.memory_bytes() <= 0.5 * total
    print(f"gpu_memory_utilization=0.5: {eng.cache.num_blocks - 1} blocks, {eng.memory_bytes() / 2**30:.2f} GiB of "
          f"{total / 2**30:.0f} GiB; reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB "
          f"{'ok' if ok else 'MISMATCH'}", flush=True)
    return failures + (not ok)


def check_ended_rows(shape: dict, g: torch.Generator) -> int:
    """Compiled with ``decode_batches`` (one captured size, 8 rows), requests that end on their stop token leave
    padding rows behind while the steps go on chained (the graphs' advance buffer zeroed for those rows): the
    eager reference's tokens, and padded steps did run."""
    model = Transformer(ModelConfig(**shape)).cuda()
    model.init_weights(seed=1)
    model.eval()
    prompts = [torch.randint(0, 503, (n,), generator=g).tolist() for n in (5, 40, 17, 1, 90, 26, 33)]
    plain = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)] * len(prompts)
    first = Engine(model, None, max_batch_size=8, max_seq_len=700, decode_kernels=False,
                   num_kv_blocks=BLOCKS).generate(prompts, plain)
    params = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, stop_token_ids=[out[8 + 5 * i]])
              for i, out in enumerate(first)]  # each request stops at its own step
    ref = Engine(model, None, max_batch_size=8, max_seq_len=700, decode_kernels=False,
                 num_kv_blocks=BLOCKS).generate(prompts, params)
    eng = Engine(model, None, max_batch_size=8, max_seq_len=700, compile_decode=True, decode_kernels=KERNELS,
                 num_kv_blocks=BLOCKS, decode_batches=[8])
    padded = []
    launch = eng.runner.launch_chained
    eng.runner.launch_chained = lambda d, seqs=None: padded.append(sum(s is None for s in seqs or [])) or launch(d, seqs)
    got = eng.generate(prompts, params)
    same = [a == b for a, b in zip(ref, got)]
    ok = sum(same) == len(same) and max(padded, default=0) >= 2 and eng.cache.allocator.num_used == 0
    print(f"ended rows as padding (decode_batches=[8]): {sum(same)}/{len(same)} prompts equal; most padding rows in a "
          f"chained step {max(padded, default=0)}; chained steps {eng.metrics.chained_steps} of "
          f"{eng.metrics.decode_steps}; graphs {sorted(eng.runner.graphs.graphs)} {'ok' if ok else 'MISMATCH'}",
          flush=True)
    return int(not ok)


def check_compiled_prefill(name: str, shape: dict, g: torch.Generator) -> int:
    """``compile_prefill=True`` (beside the compiled decode step): a tiny KV cache (preemptions), 64-token steps
    (chunks: the gather path) and shared prefixes (prefix-cache hits) give the eager reference's tokens; no graph is
    compiled after start-up, and start-up compiled one graph per path (two with a torch that compiles a row of 1
    apart: ``runner.SIZE_OBLIVIOUS``); the prefill's attention never runs cuDNN's SDPA (the profiler's aten ops
    say which)."""
    from torch._dynamo.utils import counters

    from lmforge.serve.runner import SIZE_OBLIVIOUS
    from torch.profiler import ProfilerActivity, profile

    model = Transformer(ModelConfig(**shape)).cuda()
    model.init_weights(seed=1)
    model.eval()
    shared = torch.randint(0, 503, (100,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 503, (n,), generator=g).tolist() for n in (5, 150, 1, 60, 33, 200)]
    prompts += [torch.randint(0, 503, (n,), generator=g).tolist() for n in (300, 7, 41, 2)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (80, 20, 150, 64, 3, 40, 90, 120, 9, 30)]
    ref = Engine(model, None, max_batch_size=8, max_seq_len=700, decode_kernels=False, num_kv_blocks=8 * 44,
                 enable_prefix_caching=False).generate(prompts, params)
    eng = Engine(model, None, max_batch_size=8, max_seq_len=700, compile_decode=True, compile_prefill=True,
                 decode_kernels=KERNELS, num_kv_blocks=50, max_num_batched_tokens=64)
    compiled = counters["stats"]["unique_graphs"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = eng.generate(prompts, params)
    after = counters["stats"]["unique_graphs"] - compiled
    sdpa = sorted({e.name for e in prof.events()
                   if e.name.startswith("aten::") and ("scaled_dot_product" in e.name or "attention" in e.name)})
    cudnn = [n for n in sdpa if "cudnn" in n]
    same = [a == b for a, b in zip(ref, got)]
    calls = eng.runner.compiled_prefill.calls
    graphs = eng.runner.compiled_prefill.graphs
    recompiled = sum(n > (1 if SIZE_OBLIVIOUS else 2) for n in graphs.values())
    print(f"{name} compiled prefill: {sum(same)}/{len(same)} equal; preemptions {eng.metrics.preemptions}, prefix-cache "
          f"hits {eng.cache.allocator.hits}; prefill forwards fresh {calls['fresh']} gather {calls['gather']}; prefill "
          f"graphs compiled at start-up {graphs}; graphs compiled after start-up {after}; attention ops {sdpa}; "
          f"start-up {eng.startup_seconds:.1f} s", flush=True)
    return len(same) - sum(same) + after + len(cudnn) + recompiled


def lora_engine(shape: dict, folders: dict, compiled: bool) -> Engine:
    from lmforge.peft.multi_lora import MultiLoRA

    model = Transformer(ModelConfig(**shape)).cuda()
    model.init_weights(seed=1)
    lora = MultiLoRA(model.eval(), folders, max_rows=4)
    return Engine(model, None, max_batch_size=3, max_seq_len=700, compile_decode=compiled, lora=lora,
                  decode_kernels=KERNELS if compiled else False, num_kv_blocks=BLOCKS)


def write_adapters(shape: dict, root) -> dict:
    from lmforge.peft import LoRAConfig, apply_peft, save_adapter

    folders = {}
    for i, (name, targets) in enumerate((("qv", ["q_proj", "v_proj"]), ("all", ["all-linear"]))):
        model = Transformer(ModelConfig(**shape))
        model.init_weights(seed=1)
        cfg = LoRAConfig(r=4 + 4 * i, lora_alpha=8, target_modules=targets)
        apply_peft(model, "lora", cfg)
        g = torch.Generator().manual_seed(5 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        folders[name] = save_adapter(model, "lora", cfg, f"{root}/{name}")
    return folders


def run_checks(checks) -> int:
    """Run every ``(name, check)`` in order (a check returns its mismatches); one that raises counts as one
    failure: its traceback goes to standard error, an ``ERROR`` line to standard output, and the next check runs.
    Prints the summary line and returns the exit status (1 if anything failed)."""
    failures = 0
    for name, check in checks:
        try:
            failures += check()
        except Exception as e:  # noqa: BLE001 - reported, and the next check runs
            traceback.print_exc()
            print(f"{name}: ERROR {type(e).__name__}: {e}", flush=True)
            failures += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("OK" if not failures else f"FAILED: {failures} mismatches or errors", flush=True)
    return 1 if failures else 0


def check_model(name: str, shape: dict, g: torch.Generator) -> int:
    """The compiled engine (two rounds, then batch 1) against the eager reference for one model shape."""
    failures = 0
    model = Transformer(ModelConfig(**shape)).cuda()
    model.init_weights(seed=1)
    model.eval()
    prompts = [torch.randint(0, 503, (n,), generator=g).tolist() for n in (5, 300, 17, 1, 90, 260, 33)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (40, 7, 300, 12, 64, 3, 20)]
    ref = Engine(model, None, max_batch_size=3, max_seq_len=700, decode_kernels=False,
                 num_kv_blocks=BLOCKS).generate(prompts, params)
    for rounds in range(2):  # the second round replays the graphs recorded by the first
        eng = Engine(model, None, max_batch_size=3, max_seq_len=700, compile_decode=True, decode_kernels=KERNELS,
                     num_kv_blocks=BLOCKS)
        got = eng.generate(prompts, params)
        same = [a == b for a, b in zip(ref, got)]
        print(f"{name} round {rounds}: {sum(same)}/{len(same)} prompts equal; graphs {sorted(eng.runner.graphs.graphs)}",
              flush=True)
        failures += len(same) - sum(same)
    eng = Engine(model, None, max_batch_size=1, max_seq_len=700, compile_decode=True, decode_kernels=KERNELS,
                 num_kv_blocks=44)
    got = [eng.generate([p], q)[0] for p, q in zip(prompts[:4], params[:4])]
    same = [a == b for a, b in zip(ref[:4], got)]
    print(f"{name} batch 1: {sum(same)}/{len(same)} prompts equal", flush=True)
    return failures + len(same) - sum(same)


def check_lora(shape: dict, g: torch.Generator) -> int:
    """Two LoRA adapters mixed per request: compiled against eager."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        folders = write_adapters(shape, root)
        prompts = [torch.randint(0, 503, (n,), generator=g).tolist() for n in (5, 300, 17, 1, 90, 260, 33)]
        adapters = [None, "qv", "all", "all", "qv", None, "all"]

        def run(engine):
            for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
                engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                                   adapter=adapter)
            out = {f"r{i}": [] for i in range(len(prompts))}
            while engine.has_work():
                for o in engine.step():
                    out[o.request_id].extend(o.token_ids)
            return [out[f"r{i}"] for i in range(len(prompts))]

        ref = run(lora_engine(shape, folders, compiled=False))
        got = run(lora_engine(shape, folders, compiled=True))
    same = [a == b for a, b in zip(ref, got)]
    print(f"multi-lora: {sum(same)}/{len(same)} prompts equal", flush=True)
    return len(same) - sum(same)


def check_ptuning(shape: dict, g: torch.Generator) -> int:
    """p-tuning: the virtual tokens (a frozen table in the embedding) in front of every prompt."""
    from lmforge.peft import PTuningConfig, apply_peft

    def ptuned():
        model = Transformer(ModelConfig(**shape)).cuda()
        model.init_weights(seed=1)
        tuned = apply_peft(model, "ptuning", PTuningConfig(num_virtual_tokens=7, encoder_hidden_size=32))
        gen = torch.Generator(device="cuda").manual_seed(3)
        with torch.no_grad():
            for p in tuned.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen, device="cuda"))
        return tuned.eval()

    prompts = [torch.randint(0, 503, (n,), generator=g).tolist() for n in (5, 300, 17, 1, 90)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = Engine(ptuned(), None, max_batch_size=3, max_seq_len=700, decode_kernels=False,
                 num_kv_blocks=BLOCKS).generate(prompts, params)
    got = Engine(ptuned(), None, max_batch_size=3, max_seq_len=700, compile_decode=True,
                 decode_kernels=KERNELS, num_kv_blocks=BLOCKS).generate(prompts, params)
    same = [a == b for a, b in zip(ref, got)]
    print(f"p-tuning: {sum(same)}/{len(same)} prompts equal", flush=True)
    return len(same) - sum(same)


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    checks = [("paged kernel", check_paged_kernel)]
    checks += [(name, partial(check_model, name, shape, g)) for name, shape in SHAPES.items()]
    checks += [("multi-lora", partial(check_lora, SHAPES["llama-gqa"], g)),
               ("p-tuning", partial(check_ptuning, SHAPES["llama-gqa"], g)),
               ("scheduling", partial(check_scheduling, SHAPES["llama-gqa"], g)),
               ("ended rows", partial(check_ended_rows, SHAPES["llama-gqa"], g))]
    checks += [(f"{name} compiled prefill", partial(check_compiled_prefill, name, SHAPES[name], g))
               for name in ("llama-gqa", "mistral-window")]
    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
    if only:  # --only="paged kernel,ended rows": these checks alone (names as printed; a short call)
        wanted = [w.strip() for w in only[-1].split(",")]
        unknown = [w for w in wanted if w not in {name for name, _ in checks}]
        if unknown:
            raise SystemExit(f"--only: no check named {unknown[0]!r}; the checks: {', '.join(n for n, _ in checks)}")
        checks = [(name, fn) for name, fn in checks if name in wanted]
    return run_checks(checks)


if __name__ == "__main__":
    sys.exit(main())
