"""PEFT-format adapters: Hugging Face peft loads lmforge's LoRA/DoRA/IA3 and gives the same logits;
merging gives the same logits as the unmerged adapter; adapters and p-tuning round-trip."""

import json

import pytest
import torch
import transformers

from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.peft import (AdapterConfig, IA3Config, LoRAConfig, PTuningConfig, apply_adapter, apply_peft,
                          merge_adapter, peft_state_dict, save_adapter)

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, MAX_POS = 97, 48, 88, 2, 4, 2, 64


def tiny_llama(tied=False):
    """An HF Llama with random weights and the lmforge Transformer holding the same weights."""
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS,
                      num_query_groups=KV_HEADS, ffn_hidden_size=FFN, max_position_embeddings=MAX_POS,
                      normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
                      rotary_base=10000.0, share_embeddings_and_output_weights=tied, hidden_dropout=0.0,
                      attention_dropout=0.0)
    ours = Transformer(cfg)
    ours.init_weights(0)
    hf_state = hf.state_dict()
    state = {k: hf_state["lm_head.weight" if k == "lm_head.weight" else "model." + k].clone()
             for k in ours.state_dict()}
    ours.load_state_dict(state, strict=True)
    return hf, ours.eval()


def randomize_peft_(model, seed=1):
    """Non-trivial method weights (B is zero and scales are one at init, which would hide a wrong map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                base = 1.0 if ("ia3_l" in name or "magnitude" in name) else 0.0
                p.copy_(base * (p if "magnitude" in name else 1) + 0.3 * torch.randn(p.shape, generator=g))


def ids():
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method,cfg", [
    ("lora", LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("lora", LoRAConfig(r=4, lora_alpha=16, target_modules=["all-linear"], use_dora=True)),
    ("ia3", IA3Config()),
])
def test_peft_loads_lmforge_adapter_with_equal_logits(tmp_path, method, cfg):
    import peft

    hf, ours = tiny_llama()
    apply_peft(ours, method, cfg)
    randomize_peft_(ours)
    x = ids()
    with torch.no_grad():
        ours_logits = ours(x)
        base_logits = hf(x).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    save_adapter(ours, method, cfg, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "ia3": "IA3"}[method]
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        hf_logits = pm(x).logits
    assert (hf_logits - ours_logits).abs().max().item() < 1e-4

    # The same folder applied to a fresh lmforge model, unmerged and merged.
    _, fresh = tiny_llama()
    adapted = apply_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert (adapted(x) - ours_logits).abs().max().item() < 1e-5
        merge_adapter(adapted)
        assert not peft_state_dict(adapted)
        assert set(adapted.state_dict()) == set(tiny_llama()[1].state_dict())
        assert (adapted(x) - ours_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("method,cfg", [
    ("adapter", AdapterConfig(dim=8)),
    ("ptuning", PTuningConfig(num_virtual_tokens=3, encoder_type="lstm", encoder_hidden_size=16)),
    ("ptuning", PTuningConfig(num_virtual_tokens=3, encoder_type="mlp", encoder_hidden_size=16)),
])
def test_lmforge_only_methods_round_trip(tmp_path, method, cfg):
    _, ours = tiny_llama(tied=True)
    model = apply_peft(ours, method, cfg)
    randomize_peft_(model)
    x = ids()
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, method, cfg, tmp_path / "a")
    _, fresh = tiny_llama(tied=True)
    with torch.no_grad():
        plain = fresh(x)
    loaded = apply_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        got = loaded(x)
    assert (plain - expected).abs().max() > 1e-2
    assert (got - expected).abs().max().item() < 1e-5
    with pytest.raises(ConfigError, match="only LoRA"):
        merge_adapter(loaded)


def test_only_method_weights_train_and_base_is_frozen():
    _, ours = tiny_llama()
    apply_peft(ours, "lora", LoRAConfig(r=2, target_modules=["q_proj"]))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(LAYERS) for ab in "AB"}
    assert set(peft_state_dict(ours)) == trainable


def test_unknown_target_lists_existing_names():
    _, ours = tiny_llama()
    with pytest.raises(ConfigError) as e:
        apply_peft(ours, "lora", LoRAConfig(target_modules=["query_key_value"]))
    msg = str(e.value)
    assert "query_key_value" in msg and "q_proj" in msg and "down_proj" in msg


def test_ptuning_kv_cache_decoding_matches_full_forward():
    _, ours = tiny_llama()
    model = apply_peft(ours, "ptuning", PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    randomize_peft_(model)
    from lmforge.models.transformer import KVCache

    x = ids()[:1, :10]
    with torch.no_grad():
        full = model(x)
        cache = KVCache(ours.cfg, 1, 4 + 10)
        first = model(x[:, :6], kv_cache=cache, start_pos=0)
        rest = [model(x[:, i:i + 1], kv_cache=cache, start_pos=i) for i in range(6, 10)]
    got = torch.cat([first] + rest, dim=1)
    assert (got - full).abs().max().item() < 1e-4
