"""One source of the data-parallel size: the batch plan, the sampler and the loop read ParallelDims.

The users' 4-GPU example (NeMo's TP=4, global batch 192, micro batch 6) used to read 4x the global batch
per step; now it, and their 2-node TP 8 command (two torchrun launchers), read exactly one global batch a step
(run verbatim in test_users_pretraining_commands.py), and on 4 data-parallel processes every step reads the
same samples as one process.
"""

from __future__ import annotations

import pytest

from lmforge.config import load_config
from lmforge.config.loader import batch_plan, parallel_dims
from lmforge.errors import ConfigError
from lmforge.parallel.dims import ParallelDims
from lmforge.train.loop import LoopSettings, MicroBatches
from lmforge.parallel.runtime import Runtime
from tests.conftest import tiny_overrides
from tests.train.test_pretrain import _cli, _cli_here, _env, _losses


def test_rank_coordinates_of_a_composed_layout():
    # 16 ranks: pipeline 2 x data 2 x context 2 x tensor 2, tensor fastest (Megatron's and torchtitan's order)
    dims = [ParallelDims(16, r, tp=2, pp=2, cp=2) for r in range(16)]
    assert dims[0].dp == 2 and dims[0].non_data_parallel == 8
    assert [d.pp_rank for d in dims] == [0] * 8 + [1] * 8
    assert [d.dp_rank for d in dims] == [0, 0, 0, 0, 1, 1, 1, 1] * 2
    assert [d.cp_rank for d in dims] == [0, 0, 1, 1] * 4
    assert [ParallelDims(4, r, pp=2, tp=2).pp_rank for r in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="multiple of model.tensor_model_parallel_size"):
        ParallelDims(6, tp=2, pp=2)


def test_config_plan_and_dims_agree():
    cfg = load_config("tiny/llama", ["trainer.devices=4", "model.tensor_model_parallel_size=4",
                                     "model.global_batch_size=192", "model.micro_batch_size=6",
                                     "model.num_query_groups=4"])
    dims = parallel_dims(cfg)
    plan = batch_plan(cfg)
    assert dims.dp == plan.data_parallel_size == 1
    assert plan.micro_batch_size * plan.data_parallel_size * plan.accumulate_grad_batches == 192
    cfg = load_config("tiny/llama", ["trainer.devices=4", "model.global_batch_size=192", "model.micro_batch_size=6"])
    assert parallel_dims(cfg).dp == batch_plan(cfg).data_parallel_size == 4


def test_sampler_ranks_cover_each_global_batch_exactly_once():
    settings = LoopSettings(max_steps=3, micro_batch_size=6, global_batch_size=192, accumulate=8)
    data = list(range(10_000))
    for step in range(3):
        seen = []
        for rank in range(4):
            rt = Runtime(rank=rank, world_size=4)
            mb = MicroBatches(data, settings, rt, ParallelDims(4, rank))
            for micro in range(settings.accumulate):
                seen += mb.indices(step, micro)
        assert sorted(seen) == list(range(step * 192, (step + 1) * 192))
    with pytest.raises(ValueError, match="global batch"):  # a plan made for another layout is refused
        MicroBatches(data, settings, Runtime(world_size=4), ParallelDims(4, 0, tp=4))
    # tensor parallel 2 x data parallel 2: ranks 0, 1 (one group) read the same samples, ranks 2, 3 the others
    settings = LoopSettings(max_steps=1, micro_batch_size=6, global_batch_size=192, accumulate=16)
    reads = [MicroBatches(data, settings, Runtime(rank=r, world_size=4), ParallelDims(4, r, tp=2)).indices(0, 0)
             for r in range(4)]
    assert reads[0] == reads[1] != reads[2] == reads[3]


def test_four_processes_read_one_global_batch_per_step(tiny_corpus, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    common = {"trainer.max_steps": 4, "trainer.val_check_interval": 4, "trainer.limit_test_batches": 0,
              "model.global_batch_size": 24, "model.micro_batch_size": 3}
    _cli_here(["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, one, **common), "trainer.devices=1"])
    _cli(["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, four, **common), "trainer.devices=4"], _env(), nproc=4)
    consumed = _losses(four, "consumed_samples")
    assert consumed == {step: 24 * step for step in range(1, 5)}
    l1, l4 = _losses(one), _losses(four)
    assert sorted(l1) == sorted(l4) == [1, 2, 3, 4]
    for step in l1:
        assert l4[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6), step


def test_nemo_fsdp_defaults_load_and_act_as_unsharded():
    # megatron_gpt_config.yaml spells out its FSDP defaults; they describe an unsharded run
    cfg = load_config("tiny/llama", ["model.fsdp=false", "model.fsdp_sharding_strategy=full",
                                     "model.fsdp_grad_reduce_dtype=32", "model.fsdp_sharded_checkpoint=false"])
    assert parallel_dims(cfg).fsdp is None
    with pytest.raises(ConfigError, match="model.fsdp_sharded_checkpoint=true applies to FSDP runs only"):
        load_config("tiny/llama", ["model.fsdp_sharded_checkpoint=true"])
    cfg = load_config("tiny/llama", ["trainer.devices=4", "model.fsdp=true", "model.fsdp_sharding_strategy=grad",
                                     "model.global_batch_size=32"])
    assert parallel_dims(cfg).fsdp == "grad" and parallel_dims(cfg).dp_shard == 4
    cfg = load_config("tiny/llama", ["trainer.devices=4", "trainer.num_nodes=2", "model.fsdp=true",
                                     "model.fsdp_sharding_strategy=hybrid", "model.global_batch_size=64"])
    dims = parallel_dims(cfg)
    assert (dims.dp, dims.dp_shard, dims.dp_replicate) == (8, 4, 2)


@pytest.mark.parametrize("overrides,message", [
    (["model.tensor_model_parallel_size=4", "trainer.devices=4"], "does not divide model.num_query_groups=2"),
    (["model.tensor_model_parallel_size=2", "trainer.devices=2", "model.compile=true"], "model.compile=true with"),
    (["model.sequence_parallel=true"], "set model.tensor_model_parallel_size above 1"),
    (["model.tensor_model_parallel_size=2", "trainer.devices=2", "model.num_moe_experts=4"], "mixture-of-experts"),
])
def test_tensor_parallel_layouts_refused_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny/llama", overrides)


@pytest.mark.parametrize("overrides", [["model.fsdp_sharding_strategy=hybrid"], ["model.fsdp_grad_reduce_dtype=bf16"]])
def test_fsdp_settings_without_fsdp_are_refused_not_ignored(overrides):
    with pytest.raises(ConfigError, match="applies to FSDP runs only"):
        load_config("tiny/llama", overrides)
