"""Run by tests/parallel/test_tensor_parallel.py under torchrun (gloo): train a tiny model tensor-parallel over
all ranks and, in the same process, the unsharded copy; write both loss curves and gradient norms as JSON."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.parallel.tensor import apply_tensor_parallel, clip_grad_norm, loss_context, sharded_cross_entropy
from lmforge.train.objectives import CausalLMLoss

FAMILIES = {
    "llama": dict(normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
                  share_embeddings_and_output_weights=False, num_query_groups=2),
    "gpt": dict(normalization="layernorm", activation="gelu", bias=True, position_embedding_type="learned_absolute",
                share_embeddings_and_output_weights=True),
    "qwen2": dict(normalization="rmsnorm", activation="swiglu", bias=False, qkv_bias=True,
                  position_embedding_type="rope", share_embeddings_and_output_weights=False, num_query_groups=2),
    "mistral": dict(normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False, num_query_groups=2, sliding_window=6),
    "gemma2": dict(normalization="rmsnorm", activation="geglu", bias=False, position_embedding_type="rope",
                   share_embeddings_and_output_weights=True, num_query_groups=2, norm_offset=1.0,
                   embedding_multiplier=32 ** 0.5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sandwich_norm=True, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    "starcoder2": dict(normalization="layernorm", activation="gelu", bias=True, position_embedding_type="rope",
                       share_embeddings_and_output_weights=True, num_query_groups=2, sliding_window=8),
    "baichuan2_7b": dict(normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
                         share_embeddings_and_output_weights=False, normalize_output_head=True),
}


def run(family: str, steps: int = 6, sequence_parallel: bool = False) -> dict:
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **FAMILIES[family])
    torch.manual_seed(0)
    ref = Transformer(cfg)
    ref.init_weights(seed=0)
    tp = Transformer(cfg)
    tp.load_state_dict(ref.state_dict())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    apply_tensor_parallel(tp, mesh["tp"], sequence_parallel=sequence_parallel)
    seen = []  # the residual stream's length as a block sees it: T, or T / tp with sequence parallelism
    tp.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    ref_obj, tp_obj = CausalLMLoss(ref), CausalLMLoss(tp)
    tp_obj.loss_fn = sharded_cross_entropy
    # lr 3e-3: Adam turns float noise in a near-zero gradient into a step of about lr, which the weight and
    # norm comparisons below would read as a difference between the layouts
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for m in (ref, tp)]
    g = torch.Generator().manual_seed(1)
    out = {"ref": [], "tp": [], "ref_norm": [], "tp_norm": []}
    batches = [torch.randint(0, cfg.vocab_size, (4, 17), generator=g) for _ in range(2)]
    for step in range(steps):
        tokens = batches[step % 2]  # two batches in turn: the loss must fall
        for name, obj, model, opt in (("ref", ref_obj, ref, opts[0]), ("tp", tp_obj, tp, opts[1])):
            with loss_context(model):
                loss_sum, n = obj(tokens)
                (loss_sum / n).backward()
            norm = clip_grad_norm(list(model.parameters()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out[name].append(float(loss_sum.detach()) / n)
            out[name + "_norm"].append(float(norm))  # a 0-dim tensor (read here, as a logging step would)
    # the sharded weights, gathered, equal the reference's
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in tp.state_dict().items()}
    out["max_weight_diff"] = max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items())
    out["local_q_rows"] = tp.layers[0].self_attn.q_proj.weight.to_local().shape[0]
    out["block_input_length"] = seen[0]
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    results = {}
    for name in sys.argv[2].split(","):
        family, _, sp = name.partition("+")
        results[name] = run(family, sequence_parallel=sp == "sp")
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
