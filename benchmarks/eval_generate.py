"""``Scorer.generate_until`` through the serving engine against the one-prompt-at-a-time loop it replaced (run by
hand; never by the test suite).

A random Llama-like model built from a config (no download) and few-shot prompts that share a prefix, as a
generation task's are: ``--prompts`` prompts of a shared ``--shots``-example prefix and a question each, greedy,
``--new-tokens`` tokens each (no stop string, no EOS: every prompt generates them all). Times both paths on the
same scorer inputs, checks that they give the same texts and prints one JSON line with the seconds of each, the
speed-up and the engine's prefix-cache hits.

    python benchmarks/eval_generate.py                      # CPU, ~32 prompts x 32 new tokens
    python benchmarks/eval_generate.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --prompts 256
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.tokenizers import train_bpe
from lmforge.eval.scorer import Scorer
from lmforge.models import ModelConfig, Transformer

WORDS = ("question answer number plus minus times equals total apples pears each has gives takes left "
         "many how what is the of and then so").split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--shots", type=int, default=4, help="few-shot examples in the shared prefix")
    ap.add_argument("--batch-size", type=int, default=16, help="the scorer's batch size: the engine's max batch")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--skip-loop", action="store_true", help="time the engine only (the loop is slow on big runs)")
    a = ap.parse_args()

    rng = random.Random(0)
    sentence = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": sentence(30)}) + "\n" for _ in range(200)))
        tok = train_bpe([corpus], vocab_size=512, out_dir=Path(tmp) / "tok")
    heads = max(1, a.hidden // 64)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=a.hidden, num_layers=a.layers,
                      num_attention_heads=heads, num_query_groups=max(1, heads // 2), ffn_hidden_size=a.hidden * 8 // 3,
                      max_position_embeddings=a.max_length, normalization="rmsnorm", activation="swiglu", bias=False,
                      position_embedding_type="rope")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model = model.to(device=a.device, dtype=getattr(torch, a.dtype)).eval()
    prefix = "".join(f"Question: {sentence(12)}\nAnswer: {sentence(6)}\n\n" for _ in range(a.shots))
    prompts = [f"{prefix}Question: {sentence(rng.randint(6, 14))}\nAnswer:" for _ in range(a.prompts)]

    def timed(fn):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    engine_scorer = Scorer(model, tok, a.max_length, batch_size=a.batch_size)
    engine_scorer.generate_until(prompts[:2], [], 2)  # builds the engine (start-up timed apart)
    engine_scorer._engine = None
    _, startup = timed(lambda: engine_scorer._engine_for(max(len(engine_scorer.encode(p)) for p in prompts)
                                                         + a.new_tokens))
    engine_out, engine_s = timed(lambda: engine_scorer.generate_until(prompts, [], a.new_tokens))
    result = {"device": a.device, "dtype": a.dtype, "hidden": a.hidden, "layers": a.layers, "prompts": a.prompts,
              "new_tokens": a.new_tokens, "prompt_tokens_mean": sum(len(engine_scorer.encode(p)) for p in prompts)
              / len(prompts), "batch_size": a.batch_size, "engine_s": round(engine_s, 3),
              "engine_startup_s": round(startup, 3),
              "prefix_cache_hits": engine_scorer._engine.stats()["prefix_cache_hits"]}
    if not a.skip_loop:
        loop_scorer = Scorer(model, tok, a.max_length, batch_size=a.batch_size)
        loop_scorer.engine_model = lambda: None  # the one-prompt-at-a-time loop, as before the engine
        loop_out, loop_s = timed(lambda: loop_scorer.generate_until(prompts, [], a.new_tokens))
        result.update(loop_s=round(loop_s, 3), speedup=round(loop_s / engine_s, 2), same_text=loop_out == engine_out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
