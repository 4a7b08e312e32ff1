"""Run under ``torchrun --nproc-per-node 2`` by tests/train/test_sharded_checkpoint.py (gloo, CPU).

For each tiny config (a dense Llama with tied embeddings, a Mixtral-style MoE): build the model, keep its
full weights as an ordinary checkpoint (rank 0, ``save_model``), shard it with FSDP2 (``fully_shard`` per
block + root), write a sharded checkpoint folder (``model/`` + ``training_state/optimizer/``), then load
both back into a differently initialised sharded model and optimizer and check them here. Rank 0 also
writes the optimizer's full tensors as a plain safetensors reference for the test process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import lmforge
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.train.checkpoint import save_model
from lmforge.train.sharded import load_sharded, save_sharded

CONFIGS = {
    "dense": dict(vocab_size=67, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=48, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu",
                  bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=True),
    "moe": dict(vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2, num_query_groups=1,
                ffn_hidden_size=24, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu",
                bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=False,
                num_moe_experts=3, moe_router_topk=2),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def sharded_model(cfg: ModelConfig, seed: int, mesh) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_step(model, opt, cfg: ModelConfig, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for name, fields in CONFIGS.items():
        cfg = ModelConfig(**fields)
        step = out / name / "step_0000001"
        # the same weights as an ordinary one-process checkpoint
        plain = Transformer(cfg)
        plain.init_weights(1)
        if rank == 0:
            save_model(out / name / "plain", plain.state_dict(), cfg.to_dict())
        model = sharded_model(cfg, 1, mesh)
        sd = get_model_state_dict(model)
        assert any(isinstance(v, DTensor) for v in sd.values())
        save_sharded(step / "model", sd)
        want = {k: full(v).clone() for k, v in sd.items()}  # sd aliases the parameters, which the step changes
        if rank == 0:
            (step / "config.json").write_text(json.dumps({"lmforge_version": lmforge.__version__, "format": "lmforge",
                                                          "model": cfg.to_dict(), "sharded": {"world_size": world}}))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train_step(model, opt, cfg, seed=5)
        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        tensors = {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}
        save_sharded(step / "training_state" / "optimizer", tensors)
        ref = {k: full(v).clone() for k, v in tensors.items()}  # full_tensor is collective: every rank
        if rank == 0:
            save_file(ref, str(out / name / "ref_optimizer.safetensors"))

        # load both back into another sharded model + optimizer (other init, other step)
        model2 = sharded_model(cfg, 2, mesh)
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
        train_step(model2, opt2, cfg, seed=6)
        sd2 = get_model_state_dict(model2)
        load_sharded(step / "model", sd2)
        set_model_state_dict(model2, sd2)
        after = {k: full(v) for k, v in get_model_state_dict(model2).items()}
        assert after.keys() == want.keys()
        for k in want:
            assert torch.equal(after[k], want[k]), (name, k)
        osd2 = get_optimizer_state_dict(model2, opt2, options=StateDictOptions(flatten_optimizer_state_dict=True))
        tensors2 = {k: v for k, v in osd2.items() if isinstance(v, torch.Tensor)}
        assert tensors2.keys() == tensors.keys()
        load_sharded(step / "training_state" / "optimizer", tensors2)
        set_optimizer_state_dict(model2, opt2, {**osd2, **tensors2},
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))
        got = get_optimizer_state_dict(model2, opt2, options=StateDictOptions(flatten_optimizer_state_dict=True))
        for k in ref:
            assert torch.equal(full(got[k]), ref[k]), (name, k)
        if rank == 0:
            print(f"{name}: {len(sd)} weights, {len(tensors)} optimizer tensors round-tripped on {world} ranks")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
