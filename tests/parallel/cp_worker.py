"""Run by tests/parallel/test_context_parallel.py under torchrun (gloo): one model's sequences split over all ranks
(context parallel) against the unsharded copy in the same process: losses and every parameter's gradient, for
RoPE + grouped-query attention (Llama), learned positions (GPT) and soft-capped attention (Gemma-2 style, without
its sliding window), with and without selective activation checkpointing.

``cp_worker.py OUT.json CASES [CASES.json]``: with CASES.json, then the ``lmforge`` commands of tests/run_cases.py in
the same launch (the pretraining runs of the test file)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.parallel.context import apply_context_parallel
from lmforge.parallel.transforms import apply_activation_checkpointing
from lmforge.train.objectives import CausalLMLoss

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.run_cases
from tests.run_cases import write_gathered, run_in_group  # noqa: E402

FAMILIES = {
    "llama": dict(normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
                  share_embeddings_and_output_weights=False, num_query_groups=2),
    "gpt": dict(normalization="layernorm", activation="gelu", bias=True, position_embedding_type="learned_absolute",
                share_embeddings_and_output_weights=True),
    "softcapped": dict(normalization="rmsnorm", activation="geglu", bias=False, position_embedding_type="rope",
                       share_embeddings_and_output_weights=True, num_query_groups=2, norm_offset=1.0,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def run(case: str) -> dict:
    family, _, checkpointing = case.partition("+")
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **FAMILIES[family])
    ref, model = Transformer(cfg), Transformer(cfg)
    ref.init_weights(seed=0)
    model.load_state_dict(ref.state_dict())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    ref_obj, obj = CausalLMLoss(ref), CausalLMLoss(model)
    obj.sequence_split = apply_context_parallel(model, mesh["cp"]).split
    if checkpointing:
        apply_activation_checkpointing(model, checkpointing)
    seen = []  # the sequence length a block sees: T / cp
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    tokens = torch.randint(0, cfg.vocab_size, (3, 33), generator=torch.Generator().manual_seed(1))
    ref_sum, ref_n = ref_obj(tokens)
    (ref_sum / ref_n).backward()
    part_sum, part_n = obj(tokens)
    (part_sum / ref_n).backward()  # each rank: its part of the global mean; the group's gradients add up
    total = torch.tensor([float(part_sum.detach()), float(part_n)], dtype=torch.float64)
    dist.all_reduce(total)
    grads = dict(ref.named_parameters())
    diff = 0.0
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        # relative to the gradient's size (a floor for gradients that are 0 in exact arithmetic: k_proj's bias)
        d = float((g - grads[name].grad).abs().max() / grads[name].grad.abs().max().clamp_min(1e-6))
        diff = max(diff, d)
    return {"ref_loss": float(ref_sum.detach()) / ref_n, "cp_loss": float(total[0] / total[1]), "tokens": float(total[1]),
            "ref_tokens": ref_n, "grad_rel_diff": diff, "block_len": seen[0]}


def main(out: str, cases: str, spec: str | None = None) -> int:
    """Rank 0 writes every rank's results of ``cases`` to ``out``; then, with ``spec``, the ``lmforge`` commands of
    tests/run_cases.py in the same process group (one launch for the checks here and the pretraining runs)."""
    dist.init_process_group("gloo")
    write_gathered(out, {case: run(case) for case in cases.split(",")})
    return run_in_group(spec)

if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
