"""Rollout speed of ``lmforge align --method grpo`` against Hugging Face ``generate`` (run by hand; never by the
test suite).

Both sample the same work from models of the same shape with random weights: ``--prompts`` prompts of
``--prompt-len`` random tokens, ``--generations`` completions each, ``--new-tokens`` new tokens (end-of-sequence
never ends them), temperature 1. lmforge: :meth:`lmforge.align.rl.RolloutLoss.sample`, the training step's
sampling path (the serving engine built on the policy module, eager); Hugging Face: ``LlamaForCausalLM.generate``
on the whole batch (``num_return_sequences``), as TRL's GRPO trainer calls it without vLLM. Both in ``--dtype``.

    python benchmarks/grpo_rollout.py [--shape 1b|tiny] [--dtype bfloat16|float32] [--prompts 8] [--generations 8]

Prints one JSON line per engine (generated tokens/s, seconds) and the speed-up; writes them to
$OUT/grpo_rollout.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch

from lmforge.align.rl import RolloutLoss
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    shape = SHAPES[a.shape]
    cfg = ModelConfig(**shape, normalization="rmsnorm", activation="swiglu", bias=False,
                      position_embedding_type="rope", layernorm_epsilon=1e-5)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model = model.to(device=device, dtype=dtype)
    prompts = torch.randint(1, cfg.vocab_size, (a.prompts, a.prompt_len)).tolist()
    settings = SimpleNamespace(num_generations=a.generations, max_completion_length=a.new_tokens, temperature=1.0,
                               reward_fn="json:loads", prompt_key="prompt", beta=0.0)
    seq = a.prompt_len + a.new_tokens
    rollout = RolloutLoss(model, "grpo", settings, None, _Ids(), None, seq, 0, a.prompts * a.generations)
    results = []

    def timed(name, fn):
        fn()  # warm-up (engine start-up, kernels)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        n = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t
        results.append({"engine": name, "generated_tokens": n, "seconds": round(s, 3), "tokens_per_s": round(n / s, 1),
                        "shape": a.shape, "dtype": a.dtype, "device": torch.cuda.get_device_name() if device == "cuda"
                        else "cpu", "prompts": a.prompts, "generations": a.generations})
        print(json.dumps(results[-1]), flush=True)

    timed("lmforge RolloutLoss.sample", lambda: sum(len(c) for c in rollout.sample(prompts)))
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
        results.append({"speedup": round(results[0]["tokens_per_s"] / results[1]["tokens_per_s"], 2)})
        print(json.dumps(results[-1]))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "grpo_rollout.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
