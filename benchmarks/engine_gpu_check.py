"""GPU check of the serving engine's captured decode step (run by hand on a GPU; CI has none).

The compiled, CUDA-graph decode path must give the greedy tokens of the eager path for a batch of
prompts of different lengths joining and leaving (continuous batching), in fp32, for a dense model, a
grouped-query model with a sliding window and a tied head. Exits non-zero on a mismatch.

    python benchmarks/engine_gpu_check.py
"""

from __future__ import annotations

import sys

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
}


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = 0
    g = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        model = Transformer(ModelConfig(**shape)).cuda()
        model.init_weights(seed=1)
        model.eval()
        prompts = [torch.randint(0, 503, (n,), generator=g).tolist() for n in (5, 300, 17, 1, 90, 260, 33)]
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (40, 7, 300, 12, 64, 3, 20)]
        ref = Engine(model, None, max_batch_size=3, max_seq_len=700).generate(prompts, params)
        for rounds in range(2):  # the second round replays the graphs recorded by the first
            eng = Engine(model, None, max_batch_size=3, max_seq_len=700, compile_decode=True)
            got = eng.generate(prompts, params)
            same = [a == b for a, b in zip(ref, got)]
            print(f"{name} round {rounds}: {sum(same)}/{len(same)} prompts equal; graphs {sorted(eng._graphs.graphs)}",
                  flush=True)
            failures += len(same) - sum(same)
    print("OK" if not failures else f"FAILED: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
