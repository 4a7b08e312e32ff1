"""Run under ``torchrun --nproc-per-node 2`` by tests/train/test_fp8_fsdp.py (gloo, CPU, torchao's emulated float8):
``fp8_fsdp_worker.py OUT.json|- [CASES.json]`` (``-``: the cases alone).

First it trains the tiny model's float8 projections (tensorwise) sharded with lmforge's FSDP (``apply_fsdp``) for a few AdamW
steps twice from the same weights and batches: once with FSDP gathering the weights in the compute dtype, once in
float8 (``apply_fp8(..., fsdp_all_gather=True)`` and the scales precomputed after each step,
``precompute_scales_after_steps``), in fp32 and in bf16-mixed. Rank 0 writes OUT.json: per precision, both runs'
losses, the largest difference of any weight after the steps, and how the float8 all-gathers ran (torchao's
``fsdp_pre_all_gather`` calls, those with a precomputed scale, the gathered dtype).

Then, with CASES.json, the ``lmforge`` commands of tests/run_cases.py in the same process group, with float8 allowed
on the CPU (``fp8_problem`` answers None) and emulated (``apply_fp8(..., emulate=True)``): the whole pretraining
path, its checkpoints and resumption included.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torchao.float8 import fsdp_utils

from lmforge.models import ModelConfig, Transformer
from lmforge.parallel.dims import ParallelDims
from lmforge.parallel.fsdp import apply_fsdp
from lmforge.parallel.runtime import Runtime
from lmforge.train.fp8 import apply_fp8, precompute_scales_after_steps
from lmforge.train.objectives import CausalLMLoss

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.run_cases
from tests.run_cases import run_in_group  # noqa: E402

STEPS = 3
CONFIG = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
              ffn_hidden_size=64, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu", bias=False,
              position_embedding_type="rope", share_embeddings_and_output_weights=False)

gathers = {"calls": 0, "precomputed": 0, "dtypes": set()}
_pre_all_gather = fsdp_utils.WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather


def counting_pre_all_gather(self, mesh):
    gathers["calls"] += 1
    gathers["precomputed"] += self._precomputed_scale is not None
    out = _pre_all_gather(self, mesh)
    gathers["dtypes"].add(str(out[0][0].dtype))
    return out


fsdp_utils.WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = counting_pre_all_gather


def train(precision: str, all_gather: bool, rt: Runtime, dims: ParallelDims):
    model = Transformer(ModelConfig(**CONFIG))
    model.init_weights(seed=0)
    apply_fp8(model, "tensorwise", emulate=True, fsdp_all_gather=all_gather)
    objective = CausalLMLoss(model)
    apply_fsdp(objective, model.layers, dims, rt, precision=precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if all_gather:
        precompute_scales_after_steps(optimizer, model)
    dtype = {"32": None, "bf16-mixed": torch.bfloat16}[precision]
    losses = []
    for step in range(STEPS):
        tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(10 * step + rt.rank))
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss_sum, n = objective(tokens)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss_sum.detach().float()
        dist.all_reduce(total)
        losses.append(total.item() / (2 * n))
    weights = {k: v.full_tensor().float() for k, v in model.state_dict().items()}
    return losses, weights, type(model.layers[0].self_attn.q_proj.weight.to_local()).__name__


def counted(precision: str, all_gather: bool, rt: Runtime, dims: ParallelDims) -> tuple:
    """``train``, and how many float8 all-gathers it ran: (losses, weights, weight type, gathers dict)."""
    gathers.update(calls=0, precomputed=0, dtypes=set())
    losses, weights, kind = train(precision, all_gather, rt, dims)
    return losses, weights, kind, dict(gathers, dtypes=sorted(gathers["dtypes"]))


def compare(out: str, rt: Runtime, dims: ParallelDims) -> None:
    """Both all-gathers in fp32 and in bf16-mixed from the same weights and batches; rank 0 writes ``out``."""
    start = Transformer(ModelConfig(**CONFIG))
    start.init_weights(seed=0)
    result = {}
    for precision in ("32", "bf16-mixed"):
        plain, plain_w, plain_type, plain_gathers = counted(precision, False, rt, dims)
        ag, ag_w, ag_type, ag_gathers = counted(precision, True, rt, dims)
        result[precision] = dict(
            plain=plain, all_gather=ag, weight_types=[plain_type, ag_type], gathers=[plain_gathers, ag_gathers],
            max_weight_diff=max((plain_w[k] - ag_w[k]).abs().max().item() for k in plain_w),
            max_weight_change=max((plain_w[k] - v.float()).abs().max().item() for k, v in start.state_dict().items()))
    if rt.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()


def main(out: str, cases: str | None = None) -> int:
    dist.init_process_group("gloo")
    rt = Runtime(device=torch.device("cpu"), rank=dist.get_rank(), world_size=2, local_rank=dist.get_rank())
    if out != "-":
        compare(out, rt, ParallelDims(2, rt.rank, fsdp="full", devices_per_node=2))
    if cases is not None:
        import functools

        from lmforge.train import fp8

        fp8.fp8_problem = lambda device: None  # float8 on the CPU ranks, emulated
        fp8.apply_fp8 = functools.partial(fp8.apply_fp8, emulate=True)
    return run_in_group(cases)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
