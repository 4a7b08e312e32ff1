"""Rollout speed of ``lmforge align --method grpo`` against Hugging Face ``generate`` (run by hand; never by the
test suite).

Both sample the same work from models of the same shape with random weights: ``--prompts`` prompts of
``--prompt-len`` random tokens, ``--generations`` completions each, ``--new-tokens`` new tokens (end-of-sequence
never ends them), temperature 1. lmforge: :meth:`lmforge.align.rl.RolloutLoss.sample`, the training step's
sampling path (the serving engine built on the policy module; on a GPU its decode step compiled and captured as
CUDA graphs on the live weights, as ``align.rollout_compile=auto`` does; ``--eager`` for the eager decode step);
Hugging Face: ``LlamaForCausalLM.generate`` on the whole batch (``num_return_sequences``), as TRL's GRPO trainer
calls it without vLLM. Both in ``--dtype``.

``--master-fp32`` builds the policy as ``lmforge align`` does under ``trainer.precision=bf16-mixed``: fp32 weights
(the optimizer's master weights), the rollouts sampled in ``--dtype`` (``align.rollout_dtype=auto``) from a copy of
the policy in that dtype, built once with the engine and refreshed in place (its weights cast from the policy's)
before every rollout, as each training step does (:meth:`lmforge.align.rl.RolloutLoss.refresh_copy`; the refresh
is inside the timed rollout). Without it the policy itself is in ``--dtype`` (no copy). The JSON says which ran:
``path`` is ``master-fp32`` (with ``rollout_copy_gib`` and ``refresh_copy_seconds``, one refresh timed alone) or
``plain``. Hugging Face's model is in ``--dtype`` either way.

The policy is set up as ``lmforge align`` trains it: q/k/v and gate/up as joint projections
(:func:`lmforge.models.transformer.set_joint_projections`, ``joint_projections: true`` in the JSON), which the
rollout engine runs apart (:func:`~lmforge.models.transformer.separate_projections`): the decode steps read the
weights in place. ``--no-joint-projections`` measures a plain model (as this benchmark did before issue 18: its
numbers never saw the joint path); ``--joint-rollouts`` keeps the projections joined in the rollouts too, the
weights concatenated at every decode step (what ``lmforge align`` ran before issue 18's fix, for comparison;
``joint_rollouts: true`` in the JSON).

    python benchmarks/grpo_rollout.py [--shape 1b|tiny] [--dtype bfloat16|float32] [--prompts 8] [--generations 8]
                                      [--eager] [--check] [--skip-hf] [--repeats 3] [--master-fp32]
                                      [--no-joint-projections | --joint-rollouts]
                                      [--compile-mode default|max-autotune-no-cudagraphs] [--decode-batches 64]
                                      [--draw-kernel | --no-draw-kernel]
    python benchmarks/grpo_rollout.py --prompts 32 --generations 8      # a larger rollout: 256 completions
    python benchmarks/grpo_rollout.py --master-fp32 --skip-hf --check   # align's bf16-mixed path (fp32 policy)
    python benchmarks/grpo_rollout.py --eager --skip-hf                 # the eager engine alone (before/after)
    python benchmarks/grpo_rollout.py --skip-hf --trace /tmp/rollout_trace.json   # the GPU timeline of a rollout

``--compile-mode max-autotune-no-cudagraphs`` compiles the decode step with that ``torch.compile`` mode
(:attr:`lmforge.align.rl.RolloutLoss.compile_mode`, the engine's ``compile_mode``): inductor autotunes each matrix
product among cuBLAS and its Triton templates (start-up takes longer: ``startup_seconds``). ``default`` (or no flag)
is what ``lmforge align`` runs; the JSON's ``compile_mode`` says which ran. The decode pieces compile once for
every batch size (dynamic rows), at the first batch size captured, and inductor tunes for that size: align's sizes
are an eighth of the rows and all of them (8 and 64), so the products are tuned for 8 rows and run at 64 too;
``--decode-batches 64`` captures 64 alone (a rollout here never ends a completion early, so every step runs 64
rows either way) and tunes for 64 (``decode_batches`` in the JSON). Both are refused off CUDA and with ``--eager``
(only the compiled step has them). benchmarks/decode_gemm.py times the same choice on the block's products alone.

``--trace PATH`` writes a torch.profiler Chrome trace (CPU and CUDA activity; chrome://tracing, ui.perfetto.dev) of
one more lmforge rollout after every timed run, HF's included (``benchmarks/serve_load.py``'s
``start_trace``/``stop_trace``), so no timing runs under or after the profiler (HF's host-bound ``generate`` ran at
half speed after it); the lmforge record gives that traced rollout's seconds as ``traced_run_seconds``.

The engine's start-up (building it; compiled: capturing the decode graphs, once per run) is timed apart from the
rollouts: one warm-up rollout, then ``--repeats`` timed ones (default 3) for each engine, lmforge's and Hugging
Face's alike: ``seconds`` and ``tokens_per_s`` are the best run's, ``seconds_median`` and ``tokens_per_s_median``
the median's (HF ``generate``'s speed is bound by its host work and varies from call to call), ``seconds_all``
every run's. ``--check`` then takes an AdamW step on the policy and compares the long-lived engine's next rollout
with that of an engine built afresh on the updated weights (same seeds, same decode path; ``--master-fp32``: on a
fresh cast of the updated fp32 policy, while the long-lived engine reads its copy refreshed in place, and the
check fails unless the copy's tensors are the ones the engine was built on, ``copy_updated_in_place``): equal is
expected (a compiled engine reading stale weights parts from it within a few tokens; it fails below 90%
agreement); it also reports the agreement with a fresh eager engine's (floating-point differences of the compiled
kernels may flip a sampled token, and the completion goes its own way after it).

``--draw-kernel`` has the sampled steps draw with lmforge's Triton draw kernels
(:func:`lmforge.serve.kernels.sampled_draw`) where its decode kernels run (a CUDA device), ``--no-draw-kernel`` with
the tensor operations; default: :data:`lmforge.serve.kernels.DRAW_KERNEL` (on since session 12's H100
timing). ``draw_kernel`` in the JSON says which ran.

Prints one JSON line per engine (generated tokens/s, seconds, start-up seconds) and the speed-up (best over best,
``speedup``, and median over median, ``speedup_median``); writes them to $OUT/grpo_rollout.json when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

import lmforge.align.rl as rl_module
from lmforge.align.rl import RolloutLoss
from lmforge.serve import kernels as serve_kernels
from lmforge.serve.cache import bucket
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer, set_joint_projections

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load beside this file (also when imported)
from serve_load import start_trace, stop_trace  # noqa: E402

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=8192, max_position_embeddings=4096, rotary_base=500000.0,
               share_embeddings_and_output_weights=True),
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, max_position_embeddings=512, rotary_base=10000.0,
                 share_embeddings_and_output_weights=False),
}


class _Ids:
    """A stand-in tokenizer: no end-of-sequence token (every completion runs its full length), no text."""

    eod_id = None

    def decode(self, ids, *args, **kwargs) -> str:
        return ""


def main(argv=None) -> list[dict]:
    a = parse(argv)
    with patches(a):
        return _main(a)


def parse(argv=None) -> argparse.Namespace:
    """The command line's settings, or one error line (exit code 2)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--eager", action="store_true", help="the eager decode step (align.rollout_compile=false)")
    ap.add_argument("--check", action="store_true", help="after the timing: rollouts after an optimizer step equal "
                                                         "a fresh engine's")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each engine after its warm-up (best and median reported)")
    ap.add_argument("--master-fp32", action="store_true",
                    help="an fp32 policy (align under bf16-mixed): rollouts in --dtype from a copy refreshed in place")
    ap.add_argument("--no-joint-projections", dest="joint", action="store_false",
                    help="a plain policy, without training's joint q/k/v and gate/up projections")
    ap.add_argument("--joint-rollouts", action="store_true",
                    help="the rollout engine runs the joint projections too (weights concatenated per decode step)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the compiled decode step (RolloutLoss.compile_mode; default: "
                         "inductor's default kernels); max-autotune-no-cudagraphs autotunes the matrix products")
    ap.add_argument("--decode-batches", default=None, metavar="LIST",
                    help="the batch sizes whose decode graphs are captured (default: align's, rows and rows / 8); "
                         "64 alone: the first compile, which autotuning tunes for, is at 64 rows")
    ap.add_argument("--draw-kernel", action=argparse.BooleanOptionalAction, default=None,
                    help="sampled steps draw with the Triton draw kernels (--draw-kernel) or the tensor operations "
                         "(--no-draw-kernel); default: kernels.DRAW_KERNEL (on)")
    ap.add_argument("--trace", default=None, metavar="PATH",
                    help="write a torch.profiler Chrome trace (CPU and CUDA activity) of one more lmforge rollout "
                         "after the timed one")
    a = ap.parse_args(argv)
    if a.joint_rollouts and not a.joint:
        ap.error("--joint-rollouts needs the joint projections (drop --no-joint-projections)")
    if a.repeats < 1:
        ap.error(f"--repeats {a.repeats}: give at least 1 timed run")
    if a.master_fp32 and a.dtype == "float32":
        ap.error("--master-fp32 samples from a copy in --dtype: give --dtype bfloat16 or float16, not float32")
    if a.decode_batches:
        top = bucket(a.prompts * a.generations, 0)
        try:
            a.decode_batches = sorted({int(b) for b in a.decode_batches.split(",")})
        except ValueError:
            ap.error(f"--decode-batches {a.decode_batches}: give batch sizes separated by commas, e.g. 64")
        if not all(1 <= b <= top for b in a.decode_batches):
            ap.error(f"--decode-batches {','.join(map(str, a.decode_batches))}: give batch sizes from 1 to {top} "
                     f"(the rollout's {a.prompts * a.generations} rows rounded up to a power of two)")
    batches = ",".join(map(str, a.decode_batches or []))
    for flag, value in (("--compile-mode", a.compile_mode), ("--decode-batches", batches)):
        if value and (a.eager or not torch.cuda.is_available()):
            ap.error(f"{flag} {value}: it sets the compiled decode step, which runs on a CUDA device without "
                     f"--eager; drop {flag} here")
    return a


@contextlib.contextmanager
def patches(a):
    """What the benchmark changes in :mod:`lmforge.align.rl` for the run, put back after it: ``--joint-rollouts``
    keeps the joint projections in the engine's forwards and graph captures (as training set them);
    ``--decode-batches`` replaces :func:`~lmforge.align.rl.rollout_decode_batches`' sizes; ``--draw-kernel`` /
    ``--no-draw-kernel`` set :data:`lmforge.serve.kernels.DRAW_KERNEL` (the engines built meanwhile draw with the
    Triton kernels or the tensor operations)."""
    with contextlib.ExitStack() as stack:
        if a.draw_kernel is not None:
            stack.enter_context(mock.patch.object(serve_kernels, "DRAW_KERNEL", a.draw_kernel))
        if a.joint_rollouts:
            stack.enter_context(mock.patch.object(rl_module, "separate_projections",
                                                  lambda model: contextlib.nullcontext()))
        if a.decode_batches:
            stack.enter_context(mock.patch.object(rl_module, "rollout_decode_batches",
                                                  lambda max_rows: list(a.decode_batches)))
        yield


def _main(a) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    shape = SHAPES[a.shape]
    cfg = ModelConfig(**shape, normalization="rmsnorm", activation="swiglu", bias=False,
                      position_embedding_type="rope", layernorm_epsilon=1e-5)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    # --master-fp32: fp32 weights, as align trains under mixed precision; the rollouts sample in --dtype from a copy
    model = model.to(device=device, dtype=torch.float32 if a.master_fp32 else dtype)
    sample_dtype = dtype if a.master_fp32 else None
    if a.joint:  # as lmforge align's training assembly does (job.joint_projections, on by default)
        set_joint_projections(model)
    prompts = torch.randint(1, cfg.vocab_size, (a.prompts, a.prompt_len)).tolist()
    settings = SimpleNamespace(num_generations=a.generations, max_completion_length=a.new_tokens, temperature=1.0,
                               reward_fn="json:loads", prompt_key="prompt", beta=0.0)
    seq = a.prompt_len + a.new_tokens
    compiled = device == "cuda" and not a.eager

    def rollout_loss(compile_decode: bool = compiled):
        loss = RolloutLoss(model, "grpo", settings, None, _Ids(), None, seq, 0, a.prompts * a.generations,
                           compile_decode=compile_decode, log=lambda m: None, rollout_dtype=sample_dtype)
        # --compile-mode: the compiled decode step's torch.compile mode (a benchmark's knob, not a key of align)
        loss.compile_mode = None if a.compile_mode in (None, "default") else a.compile_mode
        return loss

    rollout = rollout_loss()
    results = []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    engine = rollout.engine()  # built once per run: compiled, the decode graphs are captured here
    sync()
    startup = time.perf_counter() - t

    def timed(name, fn, stats=None, **extra):
        """``fn`` once to warm up, then ``--repeats`` timed runs (best and median kept); ``stats()``: counters
        whose change per timed run is kept."""
        fn()  # warm-up (kernels, allocator)
        sync()
        pre = stats() if stats else {}
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            n = fn()
            sync()
            times.append(time.perf_counter() - t)
        s, median = min(times), statistics.median(times)
        extra.update({k: (v - pre[k]) // a.repeats for k, v in (stats() if stats else {}).items()})
        results.append({"engine": name, "generated_tokens": n, "seconds": round(s, 3), "tokens_per_s": round(n / s, 1),
                        "seconds_median": round(median, 3), "tokens_per_s_median": round(n / median, 1),
                        "repeats": a.repeats, "seconds_all": [round(x, 3) for x in times],
                        **extra, "shape": a.shape, "dtype": a.dtype, "joint_projections": a.joint,
                        "joint_rollouts": a.joint_rollouts, "prompts": a.prompts,
                        "generations": a.generations, "new_tokens": a.new_tokens,
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
        print(json.dumps(results[-1]), flush=True)

    def lmforge_rollout() -> int:
        rollout.refresh_copy()  # --master-fp32: the copy refreshed from the policy, as each training step does
        return sum(len(c) for c in rollout.sample(prompts))

    if a.master_fp32:
        copy_gib = sum(t.numel() * t.element_size() for t in rollout_copy_tensors(rollout)) / 2 ** 30
        sync()
        t = time.perf_counter()
        rollout.refresh_copy()
        sync()
        path = {"path": "master-fp32", "rollout_dtype": a.dtype, "rollout_copy_gib": round(copy_gib, 2),
                "refresh_copy_seconds": round(time.perf_counter() - t, 4)}
    else:
        path = {"path": "plain", "rollout_dtype": a.dtype}
    timed("lmforge RolloutLoss.sample", lmforge_rollout,
          stats=lambda: {"decode_steps": engine.metrics.decode_steps, "chained_steps": engine.metrics.chained_steps},
          compiled=engine.compiled, compile_mode=rollout.compile_mode or "default",
          draw_kernel=engine.runner.draw_kernel,
          decode_batches=rl_module.rollout_decode_batches(a.prompts * a.generations) if engine.compiled else None,
          startup_seconds=round(startup, 2), **path)
    if not a.skip_hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                             num_attention_heads=cfg.num_attention_heads,
                             num_key_value_heads=cfg.num_query_groups, max_position_embeddings=seq,
                             rope_theta=shape["rotary_base"],
                             tie_word_embeddings=cfg.share_embeddings_and_output_weights)
        hf = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
        ids = torch.tensor(prompts, device=device)

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_k=0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                  num_return_sequences=a.generations, pad_token_id=0)
            return int((out.shape[1] - ids.shape[1]) * out.shape[0])

        timed("transformers generate", hf_generate)
        results.append({"speedup": round(results[0]["tokens_per_s"] / results[1]["tokens_per_s"], 2),
                        "speedup_median": round(results[0]["tokens_per_s_median"]
                                                / results[1]["tokens_per_s_median"], 2)})
        print(json.dumps(results[-1]))
    if a.trace:
        # The traced rollout runs after every timing: a profiler that has run in the process slows host-bound work
        # after it (HF generate timed after a traced rollout measured 2,632 tok/s on an H100, 5,488 untraced).
        profiler = start_trace(device)
        t = time.perf_counter()
        lmforge_rollout()
        sync()
        results[0]["traced_run_seconds"] = round(time.perf_counter() - t, 3)
        stop_trace(profiler, a.trace)
        print(json.dumps({"traced_run_seconds": results[0]["traced_run_seconds"]}), flush=True)
    if a.check:
        results.append(check(model, prompts, rollout, rollout_loss, compiled))
        print(json.dumps(results[-1]), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "grpo_rollout.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def rollout_copy_tensors(rollout) -> list:
    """The parameters and buffers the rollout engine samples from when it samples from a copy (none otherwise)."""
    if rollout._rollout_policy() is rollout.model:
        return []
    policy = rollout._rollout_policy()
    return list({id(t): t for t in (*policy.parameters(), *policy.buffers())}.values())


def check(model, prompts, rollout, rollout_loss, compiled) -> dict:
    """An AdamW step on the policy (in place, as training does), then the long-lived engine's rollout against a
    fresh engine's on the updated weights (same seeds): equal expected; stale weights part within a few tokens.
    With a copy (``--master-fp32``) the long-lived engine samples after the copy's in-place refresh, the fresh
    one from a fresh cast of the updated policy; the copy's tensors must be those the engine was built on."""
    from lmforge.align.rl import token_logps

    before = rollout.sample(prompts, rollout=3)
    copied = rollout_copy_tensors(rollout)
    pointers = [t.data_ptr() for t in copied]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = torch.tensor(prompts[:2], device=next(model.parameters()).device)
    model.train()
    amp = torch.autocast(rows.device.type, dtype=rollout.rollout_dtype) if copied else contextlib.nullcontext()
    with amp:  # --master-fp32: as align trains under mixed precision
        loss = -token_logps(model, rows).sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    rollout.refresh_copy()  # as collect() does before each rollout (nothing without a copy)
    after = rollout.sample(prompts, rollout=3)
    fresh = rollout_loss().sample(prompts, rollout=3)

    def agreement(xs, ys) -> float:
        """The mean fraction of each completion's tokens before the first that differs."""
        total = 0.0
        for x, y in zip(xs, ys):
            n = 0
            while n < min(len(x), len(y)) and x[n] == y[n]:
                n += 1
            total += n / max(len(x), 1)
        return round(total / len(xs), 3)

    out = {"check": "rollout after an optimizer step vs a fresh engine's", "compiled": compiled,
           "rollout_copy": bool(copied), "equal": after == fresh, "agreement_with_fresh": agreement(after, fresh),
           "agreement_with_before_the_step": agreement(after, before)}
    if copied:
        out["copy_updated_in_place"] = [t.data_ptr() for t in rollout_copy_tensors(rollout)] == pointers
    if compiled:
        out["agreement_with_fresh_eager"] = agreement(after, rollout_loss(compile_decode=False).sample(prompts,
                                                                                                    rollout=3))
    # Stale weights make the draws follow the old policy: they part from the fresh engine's within a few tokens.
    # Equal is expected; a late parting alone (agreement near 1) would be the kernels' floating-point differences.
    if after == before or out["agreement_with_fresh"] < 0.9 or out.get("copy_updated_in_place") is False:
        raise SystemExit(f"check failed: {out}")
    return out

if __name__ == "__main__":
    main()
