"""Fixtures for fine-tuning tests: a small synthetic task, a BPE tokenizer trained on it, a tiny base model."""

from __future__ import annotations

import json
import random

import pytest
import torch

PAIRS = [("red", "apple"), ("yellow", "banana"), ("purple", "grape"), ("orange", "carrot"), ("green", "lime"),
         ("brown", "walnut"), ("white", "rice"), ("black", "olive"), ("pink", "salmon"), ("blue", "berry"),
         ("gold", "honey"), ("gray", "pepper")]


def task_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        color, food = PAIRS[rng.randrange(len(PAIRS))]
        recs.append({"input": f"Which food is {color}? Answer:", "output": f" {food}"})
    return recs


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def sft_tokenizer(tmp_path_factory):
    from lmforge.data.tokenizers import load_tokenizer, train_bpe

    folder = tmp_path_factory.mktemp("sft_tok")
    corpus = folder / "corpus.jsonl"
    texts = [r["input"] + r["output"] for r in task_records(200)] + ["user assistant system hello there"] * 5
    write_jsonl(corpus, [{"text": t} for t in texts])
    train_bpe([str(corpus)], 300, folder / "tok")
    return load_tokenizer(folder / "tok")


def save_tiny_model(folder, tokenizer, **fields) -> str:
    """A tiny Llama-style checkpoint (random weights, seed 0) saved as lmforge saves checkpoints; ``fields``
    change the ModelConfig (hidden size, experts, ...)."""
    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.checkpoint import save_model
    from lmforge.train.pretrain import saved_state_dict

    shape = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_attention_heads=4,
                 num_query_groups=2, ffn_hidden_size=128, max_position_embeddings=128, normalization="rmsnorm",
                 activation="swiglu", bias=False, position_embedding_type="rope",
                 share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0)
    cfg = ModelConfig(**{**shape, **fields})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_model(folder, saved_state_dict(model), cfg.to_dict(), tokenizer=tokenizer)
    return str(folder)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, sft_tokenizer):
    """A tiny Llama-style checkpoint (random weights) saved as lmforge saves checkpoints."""
    # init std large enough that a frozen head can express the answers
    return save_tiny_model(tmp_path_factory.mktemp("sft_base") / "base", sft_tokenizer, init_method_std=0.25)


@pytest.fixture(scope="session")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft_data")
    return (write_jsonl(folder / "train.jsonl", task_records(96, seed=1)),
            write_jsonl(folder / "val.jsonl", task_records(16, seed=2)))

