"""Pipeline stages (torch.distributed.pipelining) on 2 CPU ranks: 1F1B (2 stages) and interleaved 1F1B (4 stages,
2 a rank) train a tiny Llama to the unsharded model's losses and gradients; each stage's parameters keep the
model's names. Not wired into the stages yet (pipeline_model_parallel_size > 1 is still refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun
from lmforge.errors import ConfigError
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.parallel.pipeline import PipelineStageModule, split_layers, stage_indices

WORKER = Path(__file__).with_name("pp_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("pp") / "results.json"
    run_torchrun(WORKER, str(out), "1f1b,interleaved")
    return json.loads(out.read_text())


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_pipeline_schedules_match_one_process(results, schedule):
    names = set()
    for rank_results in results:
        r = rank_results[schedule]
        for a, b in zip(r["ref"], r["pp"]):
            assert b == pytest.approx(a, rel=1e-5)
        assert max(r["grad_diff"]) < 1e-5
        assert not names & set(r["names"])  # each parameter lives on one rank
        names |= set(r["names"])
    # together the ranks hold every parameter of the model, under its own name
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=32, num_layers=4, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=64,
                                    normalization="rmsnorm", activation="swiglu", bias=False,
                                    position_embedding_type="rope", share_embeddings_and_output_weights=False))
    assert names == {n for n, _ in model.named_parameters()}


def test_split_and_placement():
    assert split_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert stage_indices(1, 2, virtual=2) == [1, 3]
    with pytest.raises(ConfigError, match="cannot be split into 8 pipeline stages"):
        split_layers(4, 8)
    tied = Transformer(ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4,
                                   ffn_hidden_size=64, max_position_embeddings=64))
    with pytest.raises(ConfigError, match="tied output head"):
        PipelineStageModule(tied, 0, 2)


def test_a_pipeline_rank_allocates_only_its_stages_with_the_whole_models_weights():
    from lmforge.train.assembly import _materialize
    from lmforge.train.pretrain import build_model
    from lmforge.parallel.pipeline import StagesView

    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=False)
    whole = build_model(cfg, torch.device("cpu"), seed=7)
    meta = build_model(cfg, torch.device("cpu"), seed=7, materialize=False)
    view = StagesView([PipelineStageModule(meta, 1, 2)])  # the last stage: layers 2 and 3, norm, head
    _materialize(meta, view, torch.device("cpu"), seed=7)
    owned = {n for n, _ in view.named_parameters()}
    assert owned == {n for n, _ in whole.named_parameters() if n.startswith(("layers.2.", "layers.3.", "norm.", "lm_head."))}
    reference = dict(whole.named_parameters())
    for name, p in meta.named_parameters():
        if name in owned:
            torch.testing.assert_close(p, reference[name], rtol=0, atol=0)
        else:
            assert p.is_meta, name  # another stage's: never allocated
    torch.testing.assert_close(meta.rope_cos, whole.rope_cos)
