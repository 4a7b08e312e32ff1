"""Pipeline stages (torch.distributed.pipelining) on 2 CPU ranks: 1F1B (2 stages) and interleaved 1F1B (4 stages,
2 a rank) train a tiny Llama to the unsharded model's losses and gradients; each stage's parameters keep the
model's names. A rank allocates only its stages, with the whole model's weights (a tied head's copy on the last
stage too). The training runs themselves: tests/train/test_pipeline_train.py."""

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
    run_torchrun(WORKER, str(out), "1f1b,interleaved,tied")
    return json.loads(out.read_text())


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "tied"])
def test_pipeline_schedules_match_one_process(results, schedule):
    tied = schedule == "tied"
    names = set()
    for rank_results in results:
        r = rank_results[schedule]
        for a, b in zip(r["ref"], r["pp"]):
            assert b == pytest.approx(a, rel=1e-5)
        assert max(r["grad_diff"]) < 1e-5  # a tied head: both copies hold the whole weight's gradient
        # each parameter lives on one rank; a tied head's weight on both (the last stage's copy)
        assert names & set(r["names"]) == ({"embed_tokens.weight"} if tied and names else set())
        names |= set(r["names"])
    # together the ranks hold every parameter of the model, under its own name
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=32, num_layers=4, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=64,
                                    normalization="rmsnorm", activation="swiglu", bias=False,
                                    position_embedding_type="rope", share_embeddings_and_output_weights=tied))
    assert names == {n for n, _ in model.named_parameters()}
    if tied:  # the two copies took the same updates: still equal, bit for bit
        first, last = (rank_results[schedule]["embedding"] for rank_results in results)
        assert first == last


def test_split_and_placement():
    assert split_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert stage_indices(1, 2, virtual=2) == [1, 3]
    with pytest.raises(ConfigError, match="cannot be split into 8 pipeline stages"):
        split_layers(4, 8)
    tied = Transformer(ModelConfig(vocab_size=96, hidden_size=32, num_layers=3, num_attention_heads=4,
                                   ffn_hidden_size=64, max_position_embeddings=64))
    first, middle, last = (PipelineStageModule(tied, i, 3) for i in range(3))
    # a tied head: the last stage owns the embedding too (its head's weight), the middle one neither
    assert first.embed_tokens is last.embed_tokens is tied.embed_tokens and middle.embed_tokens is None
    assert {n.split(".")[0] for n, _ in last.named_parameters()} == {"embed_tokens", "layers", "norm"}
    x = torch.randn(2, 5, 32)  # the last stage's input: hidden states; its head is the embedding
    rope = None if tied.rope_cos is None else (tied.rope_cos[:5], tied.rope_sin[:5])
    expected = torch.nn.functional.linear(tied.norm(tied.layers[2](x, rope)), tied.embed_tokens.weight)
    torch.testing.assert_close(last(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_a_pipeline_rank_allocates_only_its_stages_with_the_whole_models_weights(tied):
    from lmforge.train.assembly import _materialize
    from lmforge.train.pretrain import build_model
    from lmforge.parallel.pipeline import StagesView

    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=tied)
    whole = build_model(cfg, torch.device("cpu"), seed=7)
    meta = build_model(cfg, torch.device("cpu"), seed=7, materialize=False)
    view = StagesView([PipelineStageModule(meta, 1, 2)])  # the last stage: layers 2 and 3, norm, head
    _materialize(meta, view, torch.device("cpu"), seed=7)
    owned = {n for n, _ in view.named_parameters()}
    head = "embed_tokens." if tied else "lm_head."  # tied: the last stage's copy, equal to the first stage's
    assert owned == {n for n, _ in whole.named_parameters() if n.startswith(("layers.2.", "layers.3.", "norm.", head))}
    reference = dict(whole.named_parameters())
    for name, p in meta.named_parameters():
        if name in owned:
            torch.testing.assert_close(p, reference[name], rtol=0, atol=0)
        else:
            assert p.is_meta, name  # another stage's: never allocated
    torch.testing.assert_close(meta.rope_cos, whole.rope_cos)
