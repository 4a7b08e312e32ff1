"""GPU check of the serving engine's captured decode step (run by hand on a GPU; CI has none).

The compiled, CUDA-graph decode path must give the greedy tokens of the eager path for a batch of
prompts of different lengths joining and leaving (continuous batching), in fp32, for a dense model, a
grouped-query model with a sliding window, a tied head, an ALiBi model, a model serving two LoRA adapters
per request (MultiLoRA's row buffer read by the captured graphs) and a p-tuned model (virtual tokens in
front of every prompt). Each dense model also decodes prompts alone (batch 1, the graphs of one row).
The compiled engines use lmforge's Triton decode kernels (:mod:`lmforge.serve.kernels`, at batch 1) unless
``--no-kernels``. Exits non-zero on a mismatch.

    python benchmarks/engine_gpu_check.py [--no-kernels]
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
    "alibi": dict(vocab_size=503, hidden_size=72, num_layers=5, num_attention_heads=6, ffn_hidden_size=128,
                  max_position_embeddings=1024, position_embedding_type="alibi"),
}


KERNELS = "--no-kernels" not in sys.argv[1:]


def lora_engine(shape: dict, folders: dict, compiled: bool) -> Engine:
    from lmforge.peft.multi_lora import MultiLoRA

    model = Transformer(ModelConfig(**shape)).cuda()
    model.init_weights(seed=1)
    lora = MultiLoRA(model.eval(), folders, max_rows=4)
    return Engine(model, None, max_batch_size=3, max_seq_len=700, compile_decode=compiled, lora=lora,
                  decode_kernels=KERNELS)


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
            eng = Engine(model, None, max_batch_size=3, max_seq_len=700, compile_decode=True, decode_kernels=KERNELS)
            got = eng.generate(prompts, params)
            same = [a == b for a, b in zip(ref, got)]
            print(f"{name} round {rounds}: {sum(same)}/{len(same)} prompts equal; graphs {sorted(eng.runner.graphs.graphs)}",
                  flush=True)
            failures += len(same) - sum(same)
        eng = Engine(model, None, max_batch_size=1, max_seq_len=700, compile_decode=True, decode_kernels=KERNELS)
        got = [eng.generate([p], q)[0] for p, q in zip(prompts[:4], params[:4])]
        same = [a == b for a, b in zip(ref[:4], got)]
        print(f"{name} batch 1: {sum(same)}/{len(same)} prompts equal", flush=True)
        failures += len(same) - sum(same)
    import tempfile

    shape = SHAPES["llama-gqa"]
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
        failures += len(same) - sum(same)
    # p-tuning: the virtual tokens (a frozen table in the embedding) in front of every prompt
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
    ref = Engine(ptuned(), None, max_batch_size=3, max_seq_len=700).generate(prompts, params)
    got = Engine(ptuned(), None, max_batch_size=3, max_seq_len=700, compile_decode=True,
                 decode_kernels=KERNELS).generate(prompts, params)
    same = [a == b for a, b in zip(ref, got)]
    print(f"p-tuning: {sum(same)}/{len(same)} prompts equal", flush=True)
    failures += len(same) - sum(same)
    print("OK" if not failures else f"FAILED: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
