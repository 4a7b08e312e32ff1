"""Every family: random small HF model -> lmforge -> HF; identical tensors, equal logits, same greedy tokens.

Models come from transformers' config classes with random weights (no downloads). Sizes are odd on
purpose (head size 12, FFN 88, vocabulary 97), attention is grouped where the family allows it, and
sliding windows (5) are shorter than the test sequence (23) so the window matters in both the full
forward and the cached generation.

Falcon-RW (ALiBi): 4 heads (a power of two), 6 heads (not one) and 12 heads (slopes that are not powers of
two, so HF's bf16 bias, ``build_alibi_tensor``, differs from exact slopes: lmforge's Falcon family builds the
same bf16 bias, ``alibi_bf16_bias``), multi-query and not. HF's rope validation still wants an even head size.
"""

import pytest
import torch
import transformers
from safetensors import safe_open

from lmforge.convert.hf import convert
from lmforge.models import ModelConfig, Transformer
from lmforge.models.generate import generate
from lmforge.train.checkpoint import load_model

V, C, FFN, HEADS, KV, WINDOW = 97, 48, 88, 4, 2, 5
NO_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_LIKE = dict(vocab_size=V, hidden_size=C, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=KV, max_position_embeddings=64, **NO_TOKENS)


def _cases():
    T = transformers
    return {
        "llama": lambda: T.LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=False, rope_theta=500000.0),
        "llama_tied": lambda: T.LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=True),
        "llama31_rope_scaling": lambda: T.LlamaConfig(**LLAMA_LIKE, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "mistral_window": lambda: T.MistralConfig(**LLAMA_LIKE, sliding_window=WINDOW, tie_word_embeddings=False),
        "qwen2_window_tied": lambda: T.Qwen2Config(**{**LLAMA_LIKE, "num_hidden_layers": 3}, use_sliding_window=True,
                                                   sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True),
        "gpt2_tied": lambda: T.GPT2Config(vocab_size=V, n_embd=C, n_layer=2, n_head=HEADS, n_inner=FFN, n_positions=64,
                                          activation_function="gelu_new", **NO_TOKENS),
        "gpt2_untied": lambda: T.GPT2Config(vocab_size=V, n_embd=C, n_layer=2, n_head=HEADS, n_positions=64,
                                            activation_function="gelu", tie_word_embeddings=False, **NO_TOKENS),
        "gemma": lambda: T.GemmaConfig(**LLAMA_LIKE, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**{**LLAMA_LIKE, "num_hidden_layers": 3}, head_dim=16, sliding_window=WINDOW,
                                         query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=3.0, attn_implementation="eager"),
        "starcoder2": lambda: T.Starcoder2Config(**LLAMA_LIKE, sliding_window=WINDOW, use_bias=True),
        "nemotron": lambda: T.NemotronConfig(**LLAMA_LIKE, partial_rotary_factor=0.5, head_dim=12),
        "falcon7b_layout": lambda: T.FalconConfig(vocab_size=V, hidden_size=C, num_hidden_layers=2, num_attention_heads=HEADS,
                                                  multi_query=True, parallel_attn=True, bias=False,
                                                  max_position_embeddings=64, **NO_TOKENS),
        "falcon40b_layout": lambda: T.FalconConfig(vocab_size=V, hidden_size=C, num_hidden_layers=2, num_attention_heads=HEADS,
                                                   num_kv_heads=KV, new_decoder_architecture=True, bias=True,
                                                   ffn_hidden_size=FFN, max_position_embeddings=64,
                                                   tie_word_embeddings=False, **NO_TOKENS),
        "falcon_rw_alibi": lambda: T.FalconConfig(vocab_size=V, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                                  alibi=True, multi_query=False, parallel_attn=False, bias=True,
                                                  ffn_hidden_size=FFN, max_position_embeddings=64, **NO_TOKENS),
        "falcon_rw_alibi_mqa_6_heads": lambda: T.FalconConfig(vocab_size=V, hidden_size=60, num_hidden_layers=2,
                                                              num_attention_heads=6, alibi=True, multi_query=True,
                                                              parallel_attn=True, bias=False, tie_word_embeddings=False,
                                                              max_position_embeddings=64, **NO_TOKENS),
        "falcon_rw_alibi_12_heads": lambda: T.FalconConfig(vocab_size=V, hidden_size=96, num_hidden_layers=2,
                                                           num_attention_heads=12, alibi=True, multi_query=False,
                                                           parallel_attn=False, bias=True, max_position_embeddings=64,
                                                           **NO_TOKENS),
        "mixtral": lambda: T.MixtralConfig(**LLAMA_LIKE, num_local_experts=3, num_experts_per_tok=2,
                                           sliding_window=WINDOW),
    }


CASES = _cases()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (norm weights near 1, biases too), so a wrong map or a skipped bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def read_all(folder) -> dict:
    import json
    from pathlib import Path

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(folder / f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def lmforge_model(folder) -> Transformer:
    weights, config = load_model(folder)
    model = Transformer(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(weights, strict=not model.cfg.share_embeddings_and_output_weights)
    return model.eval()


def hf_greedy(hf_model, ids: torch.Tensor, n: int) -> list[int]:
    out = hf_model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_and_parity(case, tmp_path):
    hf_cfg = CASES[case]()
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    randomize_(hf_model)
    hf_model.save_pretrained(tmp_path / "hf")

    convert(tmp_path / "hf", tmp_path / "ours", to="lmforge", progress=False)
    convert(tmp_path / "ours", tmp_path / "back", to="hf", progress=False)

    original, back = read_all(tmp_path / "hf"), read_all(tmp_path / "back")
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key

    ours = lmforge_model(tmp_path / "ours")
    ids = torch.randint(0, V, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4
    prompt = ids[:1, :9]
    assert generate(ours, prompt[0].tolist(), max_new_tokens=12, greedy=True) == hf_greedy(hf_model, prompt, 12)

    # transformers reads the exported folder and computes the same logits.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - expected).abs().max().item() < 1e-5


def test_falcon_rw_alibi_config_both_ways(tmp_path):
    """alibi=true reads as ALiBi with Falcon's slope scale (bias before 1/sqrt(head_dim)) and is written back."""
    import json

    hf_model = transformers.AutoModelForCausalLM.from_config(CASES["falcon_rw_alibi"]())
    hf_model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours", to="lmforge", progress=False)
    convert(tmp_path / "ours", tmp_path / "back", to="hf", progress=False)
    cfg = lmforge_model(tmp_path / "ours").cfg
    assert cfg.position_embedding_type == "alibi" and cfg.alibi_slope_scale == pytest.approx(1 / 10 ** 0.5)
    assert (cfg.num_query_groups, cfg.parallel_attn_mlp) == (4, False)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["alibi"] is True and back["multi_query"] is False and back["parallel_attn"] is False
    assert "rope_theta" not in back and "rope_scaling" not in back
    # a rotary Falcon still writes alibi=false
    hf_model = transformers.AutoModelForCausalLM.from_config(CASES["falcon7b_layout"]())
    hf_model.save_pretrained(tmp_path / "hf7b")
    convert(tmp_path / "hf7b", tmp_path / "ours7b", to="lmforge", progress=False)
    convert(tmp_path / "ours7b", tmp_path / "back7b", to="hf", progress=False)
    assert json.loads((tmp_path / "back7b" / "config.json").read_text())["alibi"] is False
