"""Parity with Hugging Face transformers: same weights -> same logits and greedy continuation.

Tiny random models are built from transformers' config classes (no download). Their weights are
copied into an lmforge Transformer through a name map written here.

GELU choice: lmforge's GELU MLP uses exact (erf) GELU, as Megatron/NeMo GPT models do. The HF GPT-2
model is configured with ``activation_function="gelu"`` (exact) to match; original GPT-2 checkpoints
use ``gelu_new`` (the tanh approximation), which lmforge does not model.
"""

import pytest
import torch

from lmforge.models import ModelConfig, Transformer
from lmforge.models.generate import generate

import transformers  # noqa: E402  (the [test] extra installs it)

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, MAX_POS = 97, 48, 88, 2, 4, 2, 64


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (norm weights and biases included) random values, so a wrong map shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def load_mapped(model: Transformer, hf_state: dict, key_map: dict) -> None:
    """Copy ``hf_state[hf_key]`` (optionally transformed) into ``model`` for every lmforge key."""
    ours = model.state_dict()
    assert set(key_map) == set(ours), set(key_map) ^ set(ours)
    for our_key, (hf_key, fn) in key_map.items():
        tensor = fn(hf_state[hf_key]) if fn else hf_state[hf_key]
        assert tensor.shape == ours[our_key].shape, our_key
        ours[our_key] = tensor.clone()
    model.load_state_dict(ours, strict=True)


def hf_greedy(hf_model, ids: torch.Tensor, n: int) -> list[int]:
    out = hf_model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def check_parity(ours: Transformer, hf_model) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 23), generator=g)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4
    prompt = ids[:1, :9]
    assert generate(ours, prompt[0].tolist(), max_new_tokens=10, greedy=True) == hf_greedy(hf_model, prompt, 10)


# ---------------------------------------------------------------------------------------------- Llama


def llama_key_map(num_layers: int, tied: bool) -> dict:
    m = {"embed_tokens.weight": ("model.embed_tokens.weight", None), "norm.weight": ("model.norm.weight", None)}
    for i in range(num_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            m[f"layers.{i}.{name}.weight"] = (f"model.layers.{i}.{name}.weight", None)
    if not tied:
        m["lm_head.weight"] = ("lm_head.weight", None)
    return m


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parity(tied):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    randomize_(hf_model)

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS,
                      num_query_groups=KV_HEADS, ffn_hidden_size=FFN, max_position_embeddings=MAX_POS,
                      normalization="rmsnorm", layernorm_epsilon=1e-5, activation="swiglu", bias=False,
                      position_embedding_type="rope", rotary_base=500000.0,
                      share_embeddings_and_output_weights=tied)
    ours = Transformer(cfg).eval()
    load_mapped(ours, hf_model.state_dict(), llama_key_map(LAYERS, tied))
    check_parity(ours, hf_model)


# ---------------------------------------------------------------------------------------------- GPT-2


def gpt2_key_map(num_layers: int, hidden: int, tied: bool) -> dict:
    """transformers' GPT-2 uses Conv1D (weight is (in, out)): transpose; split the fused c_attn into q, k, v."""
    t = lambda w: w.t()  # noqa: E731
    part = lambda j: (lambda w: w[..., j * hidden:(j + 1) * hidden].t() if w.dim() == 2  # noqa: E731
                      else w[j * hidden:(j + 1) * hidden])
    m = {"embed_tokens.weight": ("transformer.wte.weight", None),
         "embed_positions.weight": ("transformer.wpe.weight", None),
         "norm.weight": ("transformer.ln_f.weight", None), "norm.bias": ("transformer.ln_f.bias", None)}
    for i in range(num_layers):
        h, o = f"transformer.h.{i}", f"layers.{i}"
        for kind in ("weight", "bias"):
            m[f"{o}.input_layernorm.{kind}"] = (f"{h}.ln_1.{kind}", None)
            m[f"{o}.post_attention_layernorm.{kind}"] = (f"{h}.ln_2.{kind}", None)
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                m[f"{o}.self_attn.{proj}.{kind}"] = (f"{h}.attn.c_attn.{kind}", part(j))
            m[f"{o}.self_attn.o_proj.{kind}"] = (f"{h}.attn.c_proj.{kind}", t if kind == "weight" else None)
            m[f"{o}.mlp.up_proj.{kind}"] = (f"{h}.mlp.c_fc.{kind}", t if kind == "weight" else None)
            m[f"{o}.mlp.down_proj.{kind}"] = (f"{h}.mlp.c_proj.{kind}", t if kind == "weight" else None)
    if not tied:
        m["lm_head.weight"] = ("lm_head.weight", None)
    return m


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_parity(tied):
    hf_cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
        activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    randomize_(hf_model)

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS,
                      ffn_hidden_size=FFN, max_position_embeddings=MAX_POS, normalization="layernorm",
                      layernorm_epsilon=1e-5, activation="gelu", bias=True,
                      position_embedding_type="learned_absolute", share_embeddings_and_output_weights=tied)
    ours = Transformer(cfg).eval()
    load_mapped(ours, hf_model.state_dict(), gpt2_key_map(LAYERS, HIDDEN, tied))
    check_parity(ours, hf_model)
