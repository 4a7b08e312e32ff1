"""Every built-in recipe loads, validates and has its published size."""

import pytest

from lmforge.config import list_recipes, load_config, model_config_from, recipe_path, validate
from lmforge.models.config import ModelConfig

# Tokenizer vocabulary of each family (padded by make_vocab_size_divisible_by in model_config_from).
VOCAB = {"gpt3": 50257, "llama2": 32000, "llama3": 128256, "llama3.2": 128256, "tiny": 512}

# Published parameter counts.
PUBLISHED = {
    "gpt3/126m": 1.25e8,
    "gpt3/350m": 3.5e8,
    "gpt3/1.3b": 1.3e9,
    "gpt3/5b": 5.0e9,
    "gpt3/20b": 2.0e10,
    "llama2/7b": 6.74e9,
    "llama2/13b": 1.302e10,
    "llama3/8b": 8.03e9,
    "llama3.2/1b": 1.24e9,
}


def count_params(mc: ModelConfig) -> int:
    """Embeddings + layers + final norm + head, from the config alone."""
    h, f, d = mc.hidden_size, mc.ffn_hidden_size, mc.kv_channels
    heads, groups = mc.num_attention_heads, mc.num_query_groups
    swiglu = mc.activation == "swiglu"
    norm = 2 * h if mc.normalization == "layernorm" else h  # layernorm: weight and bias
    attention = h * heads * d + 2 * h * groups * d + heads * d * h
    mlp = (3 if swiglu else 2) * h * f
    biases = (heads * d + 2 * groups * d + h + (2 * f if swiglu else f) + h) if mc.bias else 0
    layer = attention + mlp + biases + 2 * norm
    total = mc.vocab_size * h + mc.num_layers * layer + norm
    if mc.position_embedding_type == "learned_absolute":
        total += mc.max_position_embeddings * h
    if not mc.share_embeddings_and_output_weights:
        total += mc.vocab_size * h
    return total


def test_the_recipe_list():
    assert set(PUBLISHED) | {"tiny/gpt", "tiny/llama"} == set(list_recipes())
    assert list_recipes()[:5] == ["gpt3/126m", "gpt3/350m", "gpt3/1.3b", "gpt3/5b", "gpt3/20b"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_has_its_published_size(name):
    cfg = load_config(name)
    validate(cfg)
    mc = model_config_from(cfg, VOCAB[name.split("/")[0]])
    n = count_params(mc)
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.10, f"{name}: {n / 1e9:.3f}B"


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_file_cites_its_source_and_names_no_data(name):
    text = recipe_path(name).read_text()
    assert text.startswith("#")
    cfg = load_config(name)
    assert cfg.model.data.data_prefix is None
    assert cfg.trainer.accumulate_grad_batches >= 1


@pytest.mark.parametrize("name, family", [("gpt3/126m", "gpt"), ("llama2/7b", "llama"), ("llama3/8b", "llama"),
                                          ("llama3.2/1b", "llama")])
def test_family_traits(name, family):
    m = load_config(name).model
    if family == "gpt":
        assert (m.position_embedding_type, m.normalization, m.activation, m.bias) == (
            "learned_absolute", "layernorm", "gelu", True)
        assert m.share_embeddings_and_output_weights and m.encoder_seq_length == 2048
    else:
        assert (m.position_embedding_type, m.normalization, m.activation, m.bias) == (
            "rope", "rmsnorm", "swiglu", False)
        assert m.layernorm_epsilon == 1e-5


def test_llama_specifics():
    l2 = load_config("llama2/7b").model
    assert l2.encoder_seq_length == 4096 and l2.rotary_base == 10000 and not l2.share_embeddings_and_output_weights
    l3 = load_config("llama3/8b").model
    assert (l3.num_query_groups, l3.rotary_base, l3.ffn_hidden_size, l3.encoder_seq_length) == (8, 500000, 14336, 8192)
    l32 = load_config("llama3.2/1b").model
    assert (l32.hidden_size, l32.num_layers, l32.num_attention_heads, l32.num_query_groups, l32.ffn_hidden_size) == (
        2048, 16, 32, 8, 8192)
    assert l32.share_embeddings_and_output_weights and l32.max_position_embeddings == 8192


@pytest.mark.parametrize("name", ["tiny/gpt", "tiny/llama"])
def test_tiny_recipes_fit_a_cpu(name):
    cfg = load_config(name)
    t, m = cfg.trainer, cfg.model
    assert t.precision == "32" and t.accelerator == "auto" and t.devices == 1 and t.num_nodes == 1
    assert 50 <= t.max_steps <= 200 and m.micro_batch_size == 8 and m.global_batch_size == 8
    assert 128 <= m.hidden_size <= 256 and 2 <= m.num_layers <= 4 and 128 <= m.encoder_seq_length <= 256
    assert count_params(model_config_from(cfg, 512)) < 2_000_000
