"""Batch arithmetic: global = micro x data_parallel x accumulate, checked before any work."""

import pytest

from lmforge.config import BatchPlan, check_world_size, load_config, resolve_batch
from lmforge.errors import ConfigError


def test_derives_accumulation():
    assert resolve_batch(192, 6, None, devices=4, num_nodes=2) == BatchPlan(192, 6, 4, 8)


def test_derives_micro_batch():
    assert resolve_batch(256, None, 2, devices=8, num_nodes=2) == BatchPlan(256, 8, 2, 16)


def test_derives_global_batch():
    assert resolve_batch(None, 4, 3, devices=8, num_nodes=1) == BatchPlan(96, 4, 3, 8)


def test_model_parallel_shrinks_data_parallel():
    plan = resolve_batch(2048, 4, None, devices=8, num_nodes=1, tensor_parallel=4, pipeline_parallel=1)
    assert plan.data_parallel_size == 2 and plan.accumulate_grad_batches == 256
    plan = resolve_batch(64, 1, None, devices=8, num_nodes=2, tensor_parallel=2, pipeline_parallel=2)
    assert plan.data_parallel_size == 4 and plan.accumulate_grad_batches == 16


def test_all_three_must_agree():
    assert resolve_batch(64, 4, 2, devices=8, num_nodes=1) == BatchPlan(64, 4, 2, 8)
    with pytest.raises(ConfigError) as e:
        resolve_batch(100, 4, 2, devices=8, num_nodes=1)
    msg = str(e.value)
    assert "4 x 8 x 2 = 64" in msg and "accumulate_grad_batches=null" in msg


def test_global_not_a_multiple_of_micro_times_dp():
    with pytest.raises(ConfigError) as e:
        resolve_batch(100, 6, None, devices=8, num_nodes=1)
    msg = str(e.value)
    assert "model.global_batch_size=100" in msg
    assert "micro_batch_size x data_parallel_size = 6 x 8 = 48" in msg
    assert "global_batch_size = micro_batch_size x data_parallel_size x accumulate_grad_batches" in msg
    assert "96 (accumulate 2) or 144 (accumulate 3)" in msg


def test_suggests_micro_batch_sizes_that_fit():
    with pytest.raises(ConfigError) as e:
        resolve_batch(96, 5, None, devices=8, num_nodes=1)
    msg = str(e.value)
    assert "80 (accumulate 2) or 120 (accumulate 3)" in msg
    assert "model.micro_batch_size in {1, 2, 3, 4, 6, 12}" in msg


def test_global_smaller_than_one_step():
    with pytest.raises(ConfigError) as e:
        resolve_batch(8, 4, None, devices=8, num_nodes=1)
    assert "nearest valid: 32 (accumulate 1)" in str(e.value)


def test_micro_batch_derivation_failure():
    with pytest.raises(ConfigError) as e:
        resolve_batch(100, None, 2, devices=8, num_nodes=1)
    msg = str(e.value)
    assert "data_parallel_size x accumulate_grad_batches = 8 x 2 = 16" in msg
    assert "96 (micro_batch_size 6) or 112 (micro_batch_size 7)" in msg


def test_needs_two_of_three():
    with pytest.raises(ConfigError, match="give two of"):
        resolve_batch(64, None, None, devices=1, num_nodes=1)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_batch(64, 0, None, devices=1, num_nodes=1)


def test_world_size_not_divisible_by_model_parallel():
    with pytest.raises(ConfigError) as e:
        resolve_batch(64, 4, None, devices=6, num_nodes=1, tensor_parallel=4)
    msg = str(e.value)
    assert "6 x 1 = 6" in msg and "4 x 1 = 4" in msg and "4 or 8" in msg and "{1, 2, 3, 6}" in msg
    with pytest.raises(ConfigError, match="not divisible"):
        load_config("gpt3/20b", ["trainer.devices=2"])


def test_load_config_refuses_impossible_batches_before_any_work():
    with pytest.raises(ConfigError, match=r"96 \(accumulate 2\) or 144 \(accumulate 3\)"):
        load_config("gpt3/126m", ["trainer.devices=8", "model.micro_batch_size=6", "model.global_batch_size=100"])


def test_check_world_size():
    check_world_size(4, 2, 8)
    with pytest.raises(ConfigError) as e:
        check_world_size(8, 1, 4)
    msg = str(e.value)
    assert "4 process(es)" in msg and "8 x 1 = 8" in msg and "trainer.devices=4 trainer.num_nodes=1" in msg
    with pytest.raises(ConfigError, match="trainer.devices=3 trainer.num_nodes=1"):
        check_world_size(2, 2, 3)
