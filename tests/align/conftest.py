"""Fixtures for alignment tests: a character tokenizer, a tiny base model and a reverse-the-word preference task
(the base model prefers neither side; the preferred completion is the prompt's word reversed)."""

from __future__ import annotations

import json
import random

import pytest
import torch

ALPHABET = "abcdefgh"


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


CHARS = "abcdefghijklmnopqrstuvwxyz: "


def save_char_tokenizer(folder, chars: str = CHARS) -> None:
    """A character-level tokenizer.json of ``chars`` (a-z, ':' and space; ``<|endoftext|>`` = 0 is EOS and
    padding)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}), encoding="utf-8")


def save_tiny_base(folder, chars: str = CHARS, max_positions: int = 32) -> str:
    """A 2-layer, 32-wide Llama-style checkpoint (random weights, seed 0) with the character tokenizer of
    ``chars``, taking ``max_positions`` tokens."""
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.assembly import saved_state_dict
    from lmforge.train.checkpoint import save_model

    save_char_tokenizer(folder.parent / f"{folder.name}_tok", chars)
    tok = load_tokenizer(folder.parent / f"{folder.name}_tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=max_positions, normalization="rmsnorm",
                      activation="swiglu", bias=False, position_embedding_type="rope",
                      share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_model(folder, saved_state_dict(model), cfg.to_dict(), tokenizer=tok)
    return str(folder)


def reverse_words(n: int, seed: int, exclude=()) -> list[str]:
    """``n`` distinct 4-letter words that are not palindromes (and not in ``exclude``)."""
    rng, words = random.Random(seed), []
    while len(words) < n:
        w = "".join(rng.choice(ALPHABET) for _ in range(4))
        if w != w[::-1] and w not in words and w not in exclude:
            words.append(w)
    return words


def pair_records(words) -> list[dict]:
    return [{"prompt": w + ":", "chosen": w[::-1], "rejected": w} for w in words]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("align_base") / "base")


@pytest.fixture(scope="session")
def reverse_task(tmp_path_factory):
    """(train.jsonl, held-out.jsonl) of the reverse-the-word task: 384 training words, 64 others held out."""
    folder = tmp_path_factory.mktemp("align_data")
    train = reverse_words(384, seed=1)
    held = reverse_words(64, seed=2, exclude=set(train))
    return write_jsonl(folder / "train.jsonl", pair_records(train)), write_jsonl(folder / "val.jsonl",
                                                                                  pair_records(held))


# -- online RL: a prompts file and reward functions in a fresh working folder ----------------------------------

REWARDS = '''
def frac_a(prompts, completions, **fields):
    assert all(isinstance(w, str) for w in fields["word"])
    return [sum(ch == "a" for ch in c) / max(len(c), 1) for c in completions]

def distinct(prompts, completions, **fields):
    return [len(set(c)) / 6 for c in completions]  # above 0 for every completion with a character

def raises(prompts, completions, **fields):
    raise ValueError("cannot score")

def nan(prompts, completions, **fields):
    return [float("nan")] * len(completions)

def short(prompts, completions, **fields):
    return [0.0]
'''


@pytest.fixture
def rl_folder(tmp_path, monkeypatch, tiny_base):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rl_rewards.py").write_text(REWARDS, encoding="utf-8")
    words = ["abcd", "bcda", "cdab", "dabc", "efgh", "fghe", "ghef", "hefg"]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": w + ":", "word": w} for w in words])
    import sys

    sys.modules.pop("rl_rewards", None)  # each test's folder holds its own copy
    return tmp_path
