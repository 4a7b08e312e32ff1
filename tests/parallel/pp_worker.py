"""Run by tests/parallel/test_pipeline_parallel.py under torchrun (gloo): a tiny Llama split into pipeline stages
(1F1B over 2 ranks; interleaved 1F1B with 2 stages a rank; 1F1B of a tied-head model, its head's copy on the last
stage summing gradients with the first stage's embedding), against the unsharded model in the same process."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.parallel.pipeline import PipelineStageModule, StagesView, TiedHeadSync, stage_indices
from lmforge.train.objectives import CausalLMLoss

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.run_cases
from tests.run_cases import write_gathered  # noqa: E402


def run(schedule_name: str, steps: int = 4) -> dict:
    pp, rank = dist.get_world_size(), dist.get_rank()
    virtual = 2 if schedule_name == "interleaved" else 1
    tied = schedule_name == "tied"
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=tied)
    ref, model = Transformer(cfg), Transformer(cfg)
    ref.init_weights(seed=0)
    model.load_state_dict(ref.state_dict())
    n_stages = pp * virtual
    modules = [PipelineStageModule(model, i, n_stages) for i in stage_indices(rank, pp, virtual)]
    stages = [PipelineStage(m, i, n_stages, torch.device("cpu")) for m, i in zip(modules, stage_indices(rank, pp, virtual))]
    tokens_per_step = 8 * 16

    def loss_fn(logits, target):  # summed over the micro batch, divided by the global token count
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum") / tokens_per_step

    if virtual == 1:
        schedule = Schedule1F1B(stages[0], n_microbatches=4, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=4, loss_fn=loss_fn, scale_grads=False)
    sync = None
    if tied:  # the first and the last stage's copies of the embedding: gradients summed after backward
        from torch.distributed.device_mesh import init_device_mesh

        sync = TiedHeadSync(init_device_mesh("cpu", (pp,), mesh_dim_names=("pp",)), StagesView(modules),
                            modules[0].first, any(m.last for m in modules))
    params = [p for m in modules for p in m.parameters()]
    opt, ref_opt = torch.optim.AdamW(params, lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (8, 17), generator=g) for _ in range(2)]
    out = {"ref": [], "pp": [], "grad_diff": []}
    for step in range(steps):
        tokens = batches[step % 2]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        loss_sum, n = CausalLMLoss(ref)(tokens)
        (loss_sum / n).backward()
        losses = []
        owns_first, owns_last = modules[0].first, any(m.last for m in modules)
        schedule.step(*((inputs,) if owns_first else ()), target=labels if owns_last else None, losses=losses)
        if sync is not None:
            sync.sync()
        pp_loss = torch.tensor([float(sum(l.detach() for l in losses)) if owns_last else 0.0])
        dist.all_reduce(pp_loss)  # the last stage's loss, known everywhere
        ref_grads = dict(ref.named_parameters())
        diff = max(float((p.grad - ref_grads[name].grad).abs().max())
                   for m in modules for name, p in m.named_parameters())
        out["ref"].append(float(loss_sum.detach()) / n)
        out["pp"].append(float(pp_loss))
        out["grad_diff"].append(diff)
        opt.step(), ref_opt.step()
        opt.zero_grad(set_to_none=True), ref_opt.zero_grad(set_to_none=True)
    out["names"] = sorted(name for m in modules for name, _ in m.named_parameters())
    if tied:  # each copy after the steps, to be compared bit for bit
        out["embedding"] = model.embed_tokens.weight.detach().flatten().tolist()
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    write_gathered(sys.argv[1], {name: run(name) for name in sys.argv[2].split(",")})
    dist.destroy_process_group()
