"""Run by tests/parallel/test_expert_parallel.py under torchrun (gloo): a tiny Mixtral with its experts spread over
expert-parallel groups of 2 ranks (2 or 4 data-parallel ranks), trained under DDP with gradient accumulation, against
the plain model in the same process seeing the whole global batch micro batch by micro batch.

``ep_worker.py OUT.json|- NAMES [CASES.json]`` (``-``: the cases alone): with CASES.json, then the ``lmforge``
commands of tests/run_cases.py in the same launch (the pretraining runs of the test file)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.expert import apply_expert_parallel
from lmforge.parallel.transforms import apply_activation_checkpointing
from lmforge.train.objectives import CausalLMLoss

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.run_cases
from tests.run_cases import write_gathered, run_in_group  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
           max_position_embeddings=32, normalization="rmsnorm", activation="swiglu", bias=False,
           position_embedding_type="rope", share_embeddings_and_output_weights=False, num_moe_experts=4,
           moe_router_topk=2, moe_aux_loss_coeff=0.02, hidden_dropout=0.0, attention_dropout=0.0)


def run(variant: str, steps: int = 4, micro: int = 2, mbs: int = 2, seq: int = 12) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = ModelConfig(**CFG)
    ref, model = Transformer(cfg), Transformer(cfg)
    ref.init_weights(seed=0)
    model.load_state_dict(ref.state_dict())
    plan = apply_expert_parallel(model, ParallelDims(world, rank, ep=2))
    if variant == "checkpointing":
        apply_activation_checkpointing(model, "full")
    objective = CausalLMLoss(model)
    plan.ignore_in_ddp(objective)
    ddp = DistributedDataParallel(objective)
    ref_objective = CausalLMLoss(ref)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    out = {"ref_loss": [], "loss": [], "ref_norm": [], "norm": [], "grad_diff": []}
    for step in range(steps):
        batch = torch.randint(0, cfg.vocab_size, (micro, world, mbs, seq + 1), generator=g)  # [micro, rank]
        total = batch[..., 1:].numel()
        ref_loss = 0.0
        for k in range(micro):
            for r in range(world):  # one process: every rank's micro batch in turn (each its own aux term)
                loss_sum, _ = ref_objective(batch[k, r])
                (loss_sum / total).backward()
                ref_loss += float(loss_sum.detach()) / total
        loss = torch.zeros(())
        for k in range(micro):
            sync = ddp.no_sync() if k < micro - 1 else torch.enable_grad()
            with sync:
                loss_sum, _ = ddp(batch[k, rank])
                (loss_sum * world / total).backward()
            loss += loss_sum.detach() / total
        plan.reduce_gradients()
        dist.all_reduce(loss)
        refs = dict(ref.named_parameters())
        out["grad_diff"].append(max(float((p.grad - refs[n].grad).abs().max()) for n, p in model.named_parameters()))
        out["norm"].append(float(plan.clip_grad_norm(list(model.parameters()), 0.5)))
        out["ref_norm"].append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)))
        out["ref_loss"].append(ref_loss)
        out["loss"].append(float(loss))
        opt.step(), ref_opt.step()
        opt.zero_grad(set_to_none=True), ref_opt.zero_grad(set_to_none=True)
    refs = dict(ref.named_parameters())
    out["weight_diff"] = max(float((p.detach() - refs[n].detach()).abs().max()) for n, p in model.named_parameters())
    out["names"] = sorted(n for n, _ in model.named_parameters())
    out["all_names"] = sorted(refs)
    return out


def built_on_meta() -> dict:
    """Built on the meta device, split, then allocated: the rank holds its experts only, with the whole model's
    initial values (what pretraining does)."""
    from lmforge.train.assembly import _materialize

    world, rank = dist.get_world_size(), dist.get_rank()
    ref = Transformer(ModelConfig(**CFG))
    ref.init_weights(seed=0)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**CFG))
    apply_expert_parallel(model, ParallelDims(world, rank, ep=2))
    _materialize(model, model, torch.device("cpu"), seed=0)
    refs = dict(ref.named_parameters())
    return {"names": sorted(n for n, _ in model.named_parameters()),
            "on_meta": [n for n, p in model.named_parameters() if p.is_meta],
            "max_diff": max(float((p.detach() - refs[n].detach()).abs().max()) for n, p in model.named_parameters()),
            "rope_diff": float((model.rope_cos - ref.rope_cos).abs().max())}


def main(out: str, names: str, spec: str | None = None) -> int:
    """Rank 0 writes every rank's results of ``names`` to ``out`` (``-``: no checks); then, with ``spec``, the
    ``lmforge`` commands of tests/run_cases.py in the same process group (one launch for the checks here and the
    pretraining runs)."""
    dist.init_process_group("gloo")
    if out != "-":
        write_gathered(out, {name: (built_on_meta() if name == "meta" else run(name)) for name in names.split(",")})
    return run_in_group(spec)

if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
