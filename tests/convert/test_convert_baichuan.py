"""Baichuan2-7B (rotary) and Baichuan2-13B (ALiBi): HF-layout folders built here (transformers has no
Baichuan class: it is remote code) convert with ``lmforge convert``, compute the logits of a reference
forward written here from the published modeling_baichuan.py semantics, and convert back.

Published layout (baichuan-inc/Baichuan2-7B-Base, Baichuan2-13B-Base): ``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.W_pack.weight`` (3*hidden, hidden: rows [q; k; v]), ``self_attn.o_proj``,
``mlp.gate_proj/up_proj/down_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm.weight``
and ``lm_head.weight``, a NormHead: its rows are L2-normalised before every use (training too).
The 13B has no ``max_position_embeddings`` (its context is ``model_max_length``) and adds an ALiBi bias
``slope_h * j`` (slopes from ``_get_interleave``) to the scaled scores instead of rotating q and k.

NormHead: lmforge's ``normalize_output_head`` normalises the head in ``Transformer.output_weight`` at every
use, so the head is copied unchanged both ways and a fine-tuned model exports to the same logits. Checkpoints
converted before that field stored the head normalised; normalising again changes nothing.
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.convert.hf import convert
from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.models.generate import generate
from lmforge.models.families import FAMILIES, model_config_to_hf
from lmforge.train.checkpoint import load_model, save_model
from lmforge.train.objectives import CausalLMLoss

V, C, HEADS, FFN, LAYERS, EPS, BASE = 97, 48, 4, 88, 2, 1e-6, 10000.0
HEADS_13B = 6  # not a power of two: Baichuan's interleaved slopes


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


def baichuan2_13b_config(**over) -> dict:
    """Baichuan2-13B-Base's config.json keys (no max_position_embeddings: ALiBi), small sizes, 6 heads."""
    cfg = baichuan2_7b_config(num_attention_heads=HEADS_13B, model_max_length=64, gradient_checkpointing=False)
    del cfg["max_position_embeddings"]
    cfg.update(over)
    return cfg


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


def get_interleave(n: int) -> list[float]:
    """Baichuan-13B's ALiBi slopes (``_get_interleave``)."""
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + get_interleave(2 * closest)[0::2][: n - closest]


def reference_logits(w: dict, ids: torch.Tensor, heads: int = HEADS, alibi: bool = False) -> torch.Tensor:
    """Baichuan2's forward: 7B (rotary, ``alibi=False``) or 13B (``alibi=True``: ``scores / sqrt(hd) + slope * j``)."""
    w = {k: v.double() for k, v in w.items()}
    B, T = ids.shape
    hd = C // heads
    inv_freq = 1.0 / (BASE ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # (T, hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # 13B: the bias of key j is slope * j for every query (a constant per row away from slope * (j - i))
    bias = torch.tensor(get_interleave(heads), dtype=torch.float64)[:, None, None] * torch.arange(T)  # (H, 1, T)
    x = w["model.embed_tokens.weight"][ids]  # (B, T, C)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + "self_attn.W_pack.weight"].T).split(C, dim=-1)  # W_pack rows: [q; k; v]
        q, k, v = (t.view(B, T, heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if not alibi:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if alibi:
            scores = scores + bias  # after the scale
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v  # (B, H, T, hd)
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


VARIANTS = {"7b": (baichuan2_7b_config, HEADS, False), "13b": (baichuan2_13b_config, HEADS_13B, True)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_baichuan2_converts_matches_reference_and_round_trips(tmp_path, capsys, variant):
    make_config, heads, alibi = VARIANTS[variant]
    weights = baichuan_weights()
    make_folder(tmp_path / "hf", make_config(), weights)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "lmforge", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "baichuan" and summary["source_format"] == "hf"

    model = lmforge_model(tmp_path / "ours")
    cfg = model.cfg
    assert (cfg.normalization, cfg.activation, cfg.bias) == ("rmsnorm", "swiglu", False)
    assert cfg.position_embedding_type == ("alibi" if alibi else "rope")
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.layernorm_epsilon) == (heads, heads, EPS)
    assert (cfg.max_position_embeddings, cfg.alibi_slope_scale, cfg.rotary_base) == (64, 1.0, BASE)
    assert cfg.normalize_output_head and not cfg.share_embeddings_and_output_weights
    # the head is stored as Baichuan stores it; output_weight() normalises it at use
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])

    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(weights, ids, heads, alibi)
    with torch.no_grad():
        got = model(ids).double()
    assert (got - expected).abs().max().item() < 1e-4
    # the normalisation matters: without it the logits differ (the check can fail)
    with torch.no_grad():
        raw = F.linear(model.hidden_states(ids), model.lm_head.weight).double()
    assert (raw - expected).abs().max().item() > 1e-2
    # greedy decoding with the KV cache agrees with the reference
    prompt = ids[0, :6].tolist()
    new = generate(model, prompt, max_new_tokens=8, greedy=True)
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(reference_logits(weights, torch.tensor([seq]), heads, alibi)[0, -1].argmax()))
    assert new == seq[6:]

    # lmforge -> HF Baichuan: every tensor reproduced, the head too
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf", "--no-progress"]) == 0
    capsys.readouterr()
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(weights)
    for name, tensor in weights.items():
        assert torch.equal(back[name], tensor), name
    hf_back = json.loads((tmp_path / "back" / "config.json").read_text())
    published = make_config()
    assert hf_back["model_type"] == "baichuan" and hf_back["architectures"] == ["BaichuanForCausalLM"]
    assert hf_back["auto_map"] == published["auto_map"]
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "model_max_length",
                "tie_word_embeddings", "hidden_act"):
        assert hf_back[key] == published[key], key
    if alibi:
        # what Baichuan2-13B's remote code reads: its published keys only (no rotary, GQA or position keys)
        assert set(hf_back) <= set(published) | {"dtype"}, set(hf_back) - set(published)
        assert "max_position_embeddings" not in hf_back

    # and HF -> lmforge again gives the same model
    convert(tmp_path / "back", tmp_path / "again", to="lmforge", progress=False)
    again = lmforge_model(tmp_path / "again")
    assert again.cfg == cfg
    with torch.no_grad():
        assert (again(ids).double() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_normhead_fine_tuned_model_exports_to_the_same_logits(tmp_path, variant):
    """Training changes lm_head; Baichuan normalises whatever head it loads, and so does lmforge."""
    make_config, heads, alibi = VARIANTS[variant]
    weights = baichuan_weights()
    make_folder(tmp_path / "hf", make_config(), weights)
    convert(tmp_path / "hf", tmp_path / "ours", to="lmforge", progress=False)
    model = lmforge_model(tmp_path / "ours").train()
    loss_fn = CausalLMLoss(model)  # the fused loss reads output_weight(): the normalised head
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    tokens = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss_sum, n = loss_fn(tokens)
        (loss_sum / n).backward()
        opt.step()
        losses.append(float(loss_sum.detach()) / n)
    model.eval()
    head = model.lm_head.weight.detach()
    assert losses[-1] < losses[0]
    assert (F.normalize(head, dim=-1) - F.normalize(weights["lm_head.weight"], dim=-1)).abs().max().item() > 1e-2

    save_model(tmp_path / "trained", model.state_dict(), model.cfg.to_dict())
    convert(tmp_path / "trained", tmp_path / "back", to="hf", family="baichuan", progress=False)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert torch.equal(back["lm_head.weight"], head)  # copied unchanged
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).double()
    assert (got - reference_logits(back, ids, heads, alibi)).abs().max().item() < 1e-4


def test_checkpoint_converted_before_the_normhead_field_gives_the_same_logits(tmp_path):
    """Old converted checkpoints stored the head normalised and had no normalize_output_head: same logits,
    whether the head is normalised again or not, and they still export to Baichuan."""
    weights = baichuan_weights()
    make_folder(tmp_path / "hf", baichuan2_7b_config(), weights)
    convert(tmp_path / "hf", tmp_path / "old", to="lmforge", progress=False)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["model"]["normalize_output_head"]
    del config["sha256"]  # nor checksums (the weights are rewritten below, as such a checkpoint held them)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "old" / "model.safetensors"))
    tensors["lm_head.weight"] = F.normalize(tensors["lm_head.weight"], dim=-1)
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})

    old = lmforge_model(tmp_path / "old")
    assert not old.cfg.normalize_output_head
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(weights, ids)
    renormed = Transformer(dataclasses.replace(old.cfg, normalize_output_head=True))
    renormed.load_state_dict(old.state_dict())
    with torch.no_grad():
        assert (old(ids).double() - expected).abs().max().item() < 1e-4
        assert (renormed.eval()(ids) - old(ids)).abs().max().item() < 1e-5  # normalising twice: a no-op

    convert(tmp_path / "old", tmp_path / "back", to="hf", progress=False)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert torch.equal(back["lm_head.weight"], tensors["lm_head.weight"])
    assert (reference_logits(back, ids) - expected).abs().max().item() < 1e-5


def test_configs_baichuan_or_falcon_cannot_hold_are_one_clear_error():
    plain = dict(vocab_size=V, hidden_size=C, num_layers=2, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                 normalization="rmsnorm", activation="swiglu", bias=False, share_embeddings_and_output_weights=False)
    # a head that is not normalised at use would give Baichuan (NormHead) other logits
    with pytest.raises(ConfigError, match=r"model.normalize_output_head=False cannot be represented as an HF "
                                          r"BaichuanForCausalLM"):
        model_config_to_hf(ModelConfig(**plain, position_embedding_type="rope"), FAMILIES["baichuan"])
    # Falcon-RW adds its bias before the 1/sqrt(head_dim) scale: other slope scales cannot be written
    falcon = dict(plain, normalization="layernorm", activation="gelu", parallel_attn_mlp=True,
                  shared_input_norm=True, layernorm_bias=True, num_query_groups=1)
    with pytest.raises(ConfigError, match=r"model.alibi_slope_scale=1.0 cannot be represented as an HF FalconForCausalLM"):
        model_config_to_hf(ModelConfig(**falcon, position_embedding_type="alibi"), FAMILIES["falcon"])
    # ... and HF builds the bias in bf16: an exact-slope model would read back with other logits
    with pytest.raises(ConfigError, match=r"model.alibi_bf16_bias=False cannot be represented as an HF FalconForCausalLM"):
        model_config_to_hf(ModelConfig(**falcon, position_embedding_type="alibi", alibi_slope_scale=1 / math.sqrt(12)),
                           FAMILIES["falcon"])
    ok = model_config_to_hf(ModelConfig(**falcon, position_embedding_type="alibi", alibi_slope_scale=1 / math.sqrt(12),
                                        alibi_bf16_bias=True), FAMILIES["falcon"])
    assert ok["alibi"] is True
