"""Tensor parallelism (DTensor plans) on 2 CPU ranks (gloo): for Llama (GQA, untied head), GPT (biases, learned
positions, tied head), Qwen2 (q/k/v biases), Mistral (sliding window), Gemma 2 (soft-capping, sandwich norms,
GeGLU, alternating windows), StarCoder2 and Baichuan2-7B (NormHead) the loss curve, the gradient norms and the
trained weights equal the unsharded model's, with the loss computed on vocabulary-sharded logits. Falcon
(parallel attention), ALiBi models and Mixtral are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_torchrun
from lmforge.errors import ConfigError
from lmforge.models.config import ModelConfig
from lmforge.parallel.tensor import check_tensor_parallel

WORKER = Path(__file__).with_name("tp_worker.py")
FAMILIES = ("llama", "gpt", "qwen2", "mistral", "gemma2", "starcoder2", "baichuan2_7b",
            "llama+sp", "gemma2+sp", "starcoder2+sp")  # +sp: sequence parallel too


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tp") / "results.json"
    run_torchrun(WORKER, str(out), ",".join(FAMILIES))
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_matches_one_process(results, family):
    r = results[family]
    assert len(r["ref"]) == len(r["tp"]) == 6
    for a, b in zip(r["ref"], r["tp"]):
        assert b == pytest.approx(a, rel=1e-5)
    for a, b in zip(r["ref_norm"], r["tp_norm"]):
        assert b == pytest.approx(a, rel=1e-5)
    assert r["ref"][-1] < r["ref"][0]  # it trained
    assert r["max_weight_diff"] < 1e-4
    assert r["local_q_rows"] == 16  # 4 heads x 8 dims split over 2 ranks
    assert r["block_input_length"] == (8 if family.endswith("+sp") else 16)  # 16 positions, halved by SP


def test_layouts_tensor_parallelism_cannot_split_are_refused():
    gpt = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=64)
    with pytest.raises(ConfigError, match="learned position embeddings"):
        check_tensor_parallel(gpt, 2, sequence_parallel=True)
    base = dict(vocab_size=96, hidden_size=48, num_layers=2, num_attention_heads=6, ffn_hidden_size=64,
                max_position_embeddings=64)
    with pytest.raises(ConfigError, match="does not divide model.num_attention_heads=6"):
        check_tensor_parallel(ModelConfig(**base), 4)
    with pytest.raises(ConfigError, match="ALiBi"):
        check_tensor_parallel(ModelConfig(**{**base, "position_embedding_type": "alibi"}), 2)
    with pytest.raises(ConfigError, match="Falcon"):
        check_tensor_parallel(ModelConfig(**{**base, "parallel_attn_mlp": True}), 2)
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        check_tensor_parallel(ModelConfig(**{**base, "num_moe_experts": 4, "normalization": "rmsnorm",
                                             "activation": "swiglu"}), 2)
    check_tensor_parallel(ModelConfig(**base), 2)  # 6 heads, 64 ffn, 96 vocab: 2 divides all
