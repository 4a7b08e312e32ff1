"""Perplexity belongs to objectives whose loss is a per-token negative log-likelihood (``objective.token_nll``):
alignment's preference, reward, attribute and RL losses log no val_ppl, and monitoring it is refused."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError


def test_only_token_nll_objectives_say_so():
    from lmforge.align.objective import AttributeLoss, PreferenceLoss, RewardLoss
    from lmforge.align.rl import RolloutLoss
    from lmforge.train.objectives import CausalLMLoss

    assert CausalLMLoss.token_nll is True
    assert not any(cls.token_nll for cls in (PreferenceLoss, RewardLoss, AttributeLoss, RolloutLoss))


@pytest.mark.parametrize("method", ["dpo", "orpo", "rm", "regression_rm", "grpo"])
def test_monitor_val_ppl_is_refused_for_alignment(method):
    from lmforge.align.config import load_align_config

    with pytest.raises(ConfigError) as e:
        load_align_config({"method": method, "model": "m", "data": "d.jsonl", "monitor": "val_ppl"})
    assert f"monitor=val_ppl: method={method}'s loss is not a per-token negative log-likelihood" in str(e.value)


def test_the_assembly_refuses_val_ppl_for_an_objective_without_perplexity(tmp_path):
    """The one place an objective and the checkpoint monitor meet refuses the pair, whichever stage built it."""
    from lmforge.align.objective import RewardLoss
    from lmforge.models import ModelConfig, Transformer
    from lmforge.parallel.dims import ParallelDims
    from lmforge.parallel.runtime import Runtime
    from lmforge.train.assembly import CheckpointSpec, OptimSpec, TrainJob, build_training
    from lmforge.train.loop import LoopSettings

    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                                    ffn_hidden_size=64, max_position_embeddings=16))
    job = TrainJob(out=tmp_path, dims=ParallelDims(1), optim=OptimSpec(),
                   loop=LoopSettings(max_steps=1, micro_batch_size=1, global_batch_size=1, accumulate=1,
                                     precision="32"),
                   checkpoint=CheckpointSpec(monitor="val_ppl", save_top_k=0, save_last=False))
    with pytest.raises(ConfigError, match=r"^monitor=val_ppl: the RewardLoss objective's loss is not a per-token "
                                          r"negative log-likelihood, so it has no perplexity; monitor val_loss$"):
        build_training(job, model, Runtime(device=torch.device("cpu")), objective_fn=RewardLoss,
                       console_log=lambda *a: None)
