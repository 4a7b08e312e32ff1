"""Shared pieces of the evaluation tests: word-salad sentences and a tiny random lmforge checkpoint."""

from __future__ import annotations

import json
import random

from lmforge.data.tokenizers import train_bpe
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import save_model

WORDS = "alpha beta gamma delta river stone light water green small quick brown over lazy".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_lambada(path, rng, n: int) -> None:
    """``n`` lambada records (word salad of 3-30 words) as JSON lines at ``path``."""
    path.write_text("".join(json.dumps({"text": sentence(rng, rng.randint(3, 30))}) + "\n" for _ in range(n)))


def write_piqa(path, rng, n: int) -> None:
    """``n`` piqa records (a goal, two multi-token solutions, alternating labels) as JSON lines at ``path``."""
    path.write_text("".join(json.dumps({"goal": sentence(rng, 6), "sol1": sentence(rng, 3), "sol2": sentence(rng, 4),
                                        "label": i % 2}) + "\n" for i in range(n)))


def tiny_checkpoint(root, name: str):
    """A tokenizer trained on word salad and a random 2-layer Llama-style model saved at ``root/name``.

    Returns (folder, model in eval mode, tokenizer, config).
    """
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": sentence(rng, 20)}) + "\n" for _ in range(100)))
    tok = train_bpe([corpus], vocab_size=280, out_dir=root / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=32, normalization="rmsnorm",
                      activation="swiglu", bias=False, position_embedding_type="rope")
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_model(root / name, model.state_dict(), cfg.to_dict(), tokenizer=tok)
    return root / name, model.eval(), tok, cfg


def harness_generation_task(name: str, data, max_gen_toks: int) -> str:
    """An lm-evaluation-harness ``generate_until`` task file (YAML) over the JSON lines ``data`` ({"q", "ref"}
    records), cut at a blank line, scored by exact_match: what the tests run through the ``lmforge`` adapter."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{ref}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""
