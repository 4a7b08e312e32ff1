"""Baichuan2-7B: an HF-layout folder built here (transformers has no Baichuan class: it is remote code)
converts with ``lmforge convert``, computes the logits of a reference forward written here from the
published modeling_baichuan.py semantics, and converts back. The 13B (ALiBi) variant is refused.

Published layout (baichuan-inc/Baichuan2-7B-Base): ``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.W_pack.weight`` (3*hidden, hidden: rows [q; k; v]), ``self_attn.o_proj``,
``mlp.gate_proj/up_proj/down_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm.weight``
and ``lm_head.weight``, a NormHead: at inference the head's rows are L2-normalised before the matmul.

NormHead export: lmforge stores the head already normalised (import applies the normalisation once), and
exports that normalised head. Baichuan's NormHead normalises again, which changes nothing, so the exported
folder computes the same logits; its ``lm_head.weight`` equals ``normalize(original)``, not the original.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.convert.hf import convert
from lmforge.errors import ConfigError, UserError
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import load_model

V, C, HEADS, FFN, LAYERS, EPS, BASE = 97, 48, 4, 88, 2, 1e-6, 10000.0
HD = C // HEADS


def baichuan2_7b_config(**over) -> dict:
    """Baichuan2-7B-Base's config.json keys, small sizes."""
    cfg = {"_from_model_config": True, "architectures": ["BaichuanForCausalLM"],
           "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
           "tokenizer_class": "BaichuanTokenizer", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
           "hidden_act": "silu", "hidden_size": C, "initializer_range": 0.02, "intermediate_size": FFN,
           "max_position_embeddings": 64, "model_max_length": 64, "model_type": "baichuan",
           "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "rms_norm_eps": EPS,
           "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.29.2",
           "use_cache": True, "vocab_size": V, "z_loss_weight": 0}
    cfg.update(over)
    return cfg


def baichuan_weights(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def mat(*shape):
        return 0.2 * torch.randn(*shape, generator=g)

    def norm():
        return 1.0 + 0.1 * torch.randn(C, generator=g)

    w = {"model.embed_tokens.weight": mat(V, C), "model.norm.weight": norm(),
         # NormHead rows of very different lengths, so a missing normalisation shows in the logits
         "lm_head.weight": mat(V, C) * torch.linspace(0.2, 5.0, V)[:, None]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.W_pack.weight": mat(3 * C, C), p + "self_attn.o_proj.weight": mat(C, C),
                  p + "mlp.gate_proj.weight": mat(FFN, C), p + "mlp.up_proj.weight": mat(FFN, C),
                  p + "mlp.down_proj.weight": mat(C, FFN), p + "input_layernorm.weight": norm(),
                  p + "post_attention_layernorm.weight": norm()})
    return w


def make_folder(folder, config: dict, weights: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


# ------------------------------------------------------------------------- reference forward (float64)


def rms_norm(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def reference_logits(w: dict, ids: torch.Tensor) -> torch.Tensor:
    w = {k: v.double() for k, v in w.items()}
    B, T = ids.shape
    inv_freq = 1.0 / (BASE ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # (T, HD)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["model.embed_tokens.weight"][ids]  # (B, T, C)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + "self_attn.W_pack.weight"].T).split(C, dim=-1)  # W_pack rows: [q; k; v]
        q, k, v = (t.view(B, T, HEADS, HD).transpose(1, 2) for t in (q, k, v))  # (B, H, T, HD)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HD)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v  # (B, H, T, HD)
        x = x + attn.transpose(1, 2).reshape(B, T, C) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = F.normalize(w["lm_head.weight"], dim=-1)  # NormHead at inference
    return x @ head.T


def lmforge_model(folder) -> Transformer:
    weights, config = load_model(folder)
    model = Transformer(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(weights)
    return model.eval()


# ------------------------------------------------------------------------- tests


def test_baichuan2_7b_converts_matches_reference_and_round_trips(tmp_path, capsys):
    weights = baichuan_weights()
    make_folder(tmp_path / "hf", baichuan2_7b_config(), weights)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "lmforge", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "baichuan" and summary["source_format"] == "hf"

    model = lmforge_model(tmp_path / "ours")
    cfg = model.cfg
    assert (cfg.normalization, cfg.activation, cfg.bias, cfg.position_embedding_type) == ("rmsnorm", "swiglu", False, "rope")
    assert (cfg.num_query_groups, cfg.layernorm_epsilon, cfg.rotary_base) == (HEADS, EPS, BASE)
    assert not cfg.share_embeddings_and_output_weights

    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(weights, ids)
    with torch.no_grad():
        got = model(ids).double()
    assert (got - expected).abs().max().item() < 1e-4
    # the normalisation matters: lmforge's model with the raw head gives other logits (the check can fail)
    assert torch.allclose(model.lm_head.weight, F.normalize(weights["lm_head.weight"], dim=-1), atol=1e-6)
    with torch.no_grad():
        model.lm_head.weight.copy_(weights["lm_head.weight"])
        assert (model(ids).double() - expected).abs().max().item() > 1e-2

    # lmforge -> HF Baichuan: every tensor reproduced; the head comes back normalised (see module doc)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf", "--no-progress"]) == 0
    capsys.readouterr()
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(weights)
    for name, tensor in weights.items():
        want = F.normalize(tensor, dim=-1) if name == "lm_head.weight" else tensor
        assert torch.equal(back[name], want), name
    assert not torch.allclose(back["lm_head.weight"], weights["lm_head.weight"])
    # the exported head computes Baichuan's logits: NormHead re-normalising it is a no-op
    assert torch.allclose(F.normalize(back["lm_head.weight"], dim=-1), back["lm_head.weight"], atol=1e-6)
    assert (reference_logits(back, ids) - expected).abs().max().item() < 1e-5
    hf_back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert hf_back["model_type"] == "baichuan" and hf_back["architectures"] == ["BaichuanForCausalLM"]
    assert hf_back["auto_map"]["AutoModelForCausalLM"] == "modeling_baichuan.BaichuanForCausalLM"
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert hf_back[key] == baichuan2_7b_config()[key], key

    # and HF -> lmforge again gives the same model
    convert(tmp_path / "back", tmp_path / "again", to="lmforge", progress=False)
    again = lmforge_model(tmp_path / "again")
    with torch.no_grad():
        assert (again(ids).double() - expected).abs().max().item() < 1e-4


def test_baichuan2_13b_alibi_is_refused(tmp_path, capsys):
    # Baichuan2-13B-Base's config.json: no max_position_embeddings (ALiBi), hidden 5120, 40 heads
    cfg = baichuan2_7b_config(hidden_size=5120, num_attention_heads=40, num_hidden_layers=40, intermediate_size=13696,
                              vocab_size=125696, model_max_length=4096)
    del cfg["max_position_embeddings"]
    folder = tmp_path / "hf13b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        convert(folder, tmp_path / "out", to="lmforge", progress=False)
    assert isinstance(err.value, UserError)
    msg = str(err.value)
    assert "Baichuan2-13B" in msg and "ALiBi" in msg and "not support" in msg and "Baichuan2-7B" in msg
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "lmforge", "--no-progress"]) == 2
    assert "ALiBi" in capsys.readouterr().err
