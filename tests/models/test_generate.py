"""generate() and sample_next(): greedy equals repeated full forwards, seeded sampling, EOD, limits."""

import pytest
import torch

from lmforge.models import ModelConfig, Transformer, sample_next
from lmforge.models.generate import generate

STYLES = ("gpt", "llama")


def make_model(style: str, max_positions: int = 40, std: float = 0.5) -> Transformer:
    """A tiny model with a large init std so its next-token distributions are far from uniform."""
    if style == "gpt":
        cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                          max_position_embeddings=max_positions, init_method_std=std)
    else:
        cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=64, max_position_embeddings=max_positions, normalization="rmsnorm",
                          activation="swiglu", bias=False, position_embedding_type="rope",
                          share_embeddings_and_output_weights=False, init_method_std=std)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model.eval()


PROMPT = [3, 17, 42, 5, 9]


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("style", STYLES)
def test_greedy_matches_repeated_full_forwards(style):
    model = make_model(style)
    out = generate(model, PROMPT, max_new_tokens=12, greedy=True)
    assert out == greedy_without_cache(model, PROMPT, 12)
    # temperature 0 is greedy too, and a tensor prompt works like a list
    assert generate(model, torch.tensor(PROMPT), max_new_tokens=12, temperature=0.0) == out


@pytest.mark.parametrize("style", STYLES)
def test_seeded_sampling_is_reproducible(style):
    model = make_model(style, std=0.02)  # near-uniform distributions: draws depend on the seed
    a = generate(model, PROMPT, max_new_tokens=16, temperature=1.0, seed=123)
    b = generate(model, PROMPT, max_new_tokens=16, temperature=1.0, seed=123)
    c = generate(model, PROMPT, max_new_tokens=16, temperature=1.0, seed=124)
    assert a == b and len(a) == 16
    assert a != c
    d = generate(model, PROMPT, max_new_tokens=16, top_k=5, top_p=0.9, temperature=0.8, seed=7)
    assert d == generate(model, PROMPT, max_new_tokens=16, top_k=5, top_p=0.9, temperature=0.8, seed=7)


@pytest.mark.parametrize("style", STYLES)
def test_stops_at_eod(style):
    model = make_model(style)
    free = generate(model, PROMPT, max_new_tokens=10, greedy=True)
    eod = free[3]
    first = free.index(eod)
    assert generate(model, PROMPT, max_new_tokens=10, greedy=True, eod_id=eod) == free[:first]
    assert generate(model, PROMPT, max_new_tokens=10, greedy=True, eod_id=eod, stop_at_eod=False) == free


def test_respects_max_position_embeddings():
    model = make_model("llama", max_positions=16)
    out = generate(model, list(range(13)), max_new_tokens=10, greedy=True)
    assert len(out) == 3  # prompt + new tokens never exceed the context
    assert out == greedy_without_cache(model, list(range(13)), 3)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        generate(model, list(range(16)), max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], max_new_tokens=1)
    assert generate(model, PROMPT, max_new_tokens=0) == []


def test_generate_restores_training_mode():
    model = make_model("gpt").train()
    generate(model, PROMPT, max_new_tokens=2, greedy=True)
    assert model.training


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(4, 1)  # (B=4, V=5)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0.0).tolist() == [1, 1, 1, 1]
    assert sample_next(logits, top_k=1, generator=g).tolist() == [1, 1, 1, 1]
    assert sample_next(logits, top_p=1e-6, generator=g).tolist() == [1, 1, 1, 1]
    assert sample_next(logits[0], temperature=0.0).shape == ()
    draws = torch.cat([sample_next(logits, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.tolist()) == {1, 3}
    # softmax([3, 2, 1, 0, -1]) = [.64, .24, .09, .03, .01]: top_p=0.8 keeps {1, 3}, top_p=0.9 adds 2
    draws = torch.cat([sample_next(logits, top_p=0.8, generator=g) for _ in range(200)])
    assert set(draws.tolist()) == {1, 3}
    draws = torch.cat([sample_next(logits, top_p=0.9, generator=g) for _ in range(300)])
    assert set(draws.tolist()) == {1, 2, 3}
    # a tiny temperature concentrates on the argmax
    assert sample_next(logits, temperature=1e-4, generator=g).tolist() == [1, 1, 1, 1]


def test_sample_next_seeded_and_validated():
    logits = torch.randn(3, 50)
    a = sample_next(logits, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_next(logits, **bad)


def test_sample_next_tiny_temperatures_cannot_overflow():
    """Dividing by a temperature of 1e-38 overflows float32 (inf, then NaN in softmax): below MIN_TEMPERATURE
    the pick is greedy, and a finite temperature never yields a non-finite distribution."""
    logits = torch.randn(4, 50) * 30
    for t in (1e-38, 1e-20, 0.0):
        assert sample_next(logits, temperature=t, generator=torch.Generator().manual_seed(0)).tolist() == \
            logits.argmax(-1).tolist()
    big = torch.full((2, 50), -3e38)
    big[:, 7] = 3e38
    ids = sample_next(big, temperature=2e-5, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert ids.tolist() == [7, 7]  # +-inf after the division would make softmax NaN; clamped, it picks 7
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            sample_next(logits, temperature=bad)
