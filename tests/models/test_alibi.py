"""ALiBi positions in the shared model: slopes, the bias against a written-out reference, and every path
that builds a mask (KV cache, chunked prefill, the serving engine's slot cache, packed documents, sliding
windows, the eager soft-capping path) equal to a plain full forward.

Variants: a head count that is not a power of two with grouped queries (6 heads, 3 groups), multi-query
attention with a sliding window and Falcon's slope scale (4 heads, 1 group), and soft-capped scores (eager
attention, 8 heads).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.models.generate import generate
from lmforge.models.transformer import Attention, KVCache, alibi_slopes
from lmforge.serve.engine import Engine, SamplingParams
from tests.convert.test_convert_baichuan import get_interleave  # Baichuan's _get_interleave

VARIANTS = {
    "gqa_6_heads": dict(num_attention_heads=6, num_query_groups=3, hidden_size=48),
    "mqa_window_scaled": dict(num_attention_heads=4, num_query_groups=1, hidden_size=40, sliding_window=5,
                              alibi_slope_scale=1 / math.sqrt(10), normalization="rmsnorm", activation="swiglu",
                              bias=False, share_embeddings_and_output_weights=False),
    "softcap_8_heads": dict(num_attention_heads=8, hidden_size=48, attn_logit_softcapping=4.0),
    # HF BLOOM/Falcon's bf16 bias over absolute key positions (12 heads: slopes that bf16 rounds)
    "bf16_bias_12_heads": dict(num_attention_heads=12, hidden_size=48, alibi_bf16_bias=True,
                               alibi_slope_scale=1 / math.sqrt(4)),
}
# Packing restarts positions per document; the bf16 bias is built from absolute key positions (as HF's is),
# so its rounding differs by a document's offset in the pack: only the exact bias packs exactly.
EXACT = sorted(v for v in VARIANTS if not VARIANTS[v].get("alibi_bf16_bias"))


def make_model(variant: str, max_positions: int = 64, std: float = 0.5) -> Transformer:
    """A tiny ALiBi model with a large init std, so next-token distributions are far from uniform."""
    cfg = ModelConfig(**{**dict(vocab_size=61, num_layers=2, ffn_hidden_size=72, max_position_embeddings=max_positions,
                                position_embedding_type="alibi", init_method_std=std), **VARIANTS[variant]})
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model.eval()


def ids_of(n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (batch, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ slopes


def test_slopes_match_hf_and_baichuan():
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -k for k in range(1, 9)]))
    for n in range(1, 65):
        ours = alibi_slopes(n)
        assert ours.shape == (n,)
        # HF (Falcon, BLOOM): slope * position for positions [0, 1], rounded through bf16 as HF does
        hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32)[:, 0, 1]
        assert torch.equal(ours.bfloat16().float(), hf), n
        torch.testing.assert_close(ours, torch.tensor(get_interleave(n)), rtol=1e-6, atol=0), n


def test_meta_build_then_init_weights_fills_slopes():
    cfg = ModelConfig(vocab_size=61, hidden_size=48, num_layers=2, num_attention_heads=6, ffn_hidden_size=72,
                      position_embedding_type="alibi", alibi_slope_scale=0.25)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    for layer in model.layers:
        assert torch.equal(layer.self_attn.alibi_slopes, alibi_slopes(6)) and layer.self_attn.alibi_scale == 0.25
    assert not any("alibi" in k for k in model.state_dict())  # rebuilt from the config, never saved
    assert model.rope_cos is None and model.embed_positions is None
    # other position types build no slopes
    assert Transformer(ModelConfig(vocab_size=61, hidden_size=48, num_layers=1, num_attention_heads=6,
                                   ffn_hidden_size=72)).layers[0].self_attn.alibi_slopes is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_attention_matches_written_out_reference(variant):
    """One layer against softmax(cap(q k^T * scale) + slope * (j - i)) over causal (windowed) keys."""
    cfg = make_model(variant).cfg
    attn = Attention(cfg, layer_idx=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 13, cfg.hidden_size, generator=g)
    with torch.no_grad():
        got = attn(x)
    B, T, nh, nkv, hd = 2, 13, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    q = attn.q_proj(x).view(B, T, nh, hd).transpose(1, 2).double()
    k = attn.k_proj(x).view(B, T, nkv, hd).transpose(1, 2).double().repeat_interleave(nh // nkv, dim=1)
    v = attn.v_proj(x).view(B, T, nkv, hd).transpose(1, 2).double().repeat_interleave(nh // nkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, nh, T, T)
    if cfg.attn_logit_softcapping:
        scores = cfg.attn_logit_softcapping * torch.tanh(scores / cfg.attn_logit_softcapping)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if cfg.alibi_bf16_bias:  # HF's build_alibi_tensor: bf16(bf16(slope) * j), the same for every query
        bias = (alibi_slopes(nh).bfloat16()[:, None, None] * j).bfloat16().double() * cfg.alibi_slope_scale
    else:
        bias = alibi_slopes(nh).double()[:, None, None] * cfg.alibi_slope_scale * (j - i)
    scores = scores + bias
    visible = (j <= i) & ((i - j < cfg.sliding_window) if cfg.sliding_window else True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    want = attn.o_proj((probs @ v).transpose(1, 2).reshape(B, T, nh * hd).float())
    assert (got - want).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------ caches


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_paths_equal_full_forward(variant):
    model = make_model(variant)
    ids = ids_of(20, batch=2)
    with torch.no_grad():
        full = model(ids)  # (2, 20, V)
        # prefill 8 tokens, then one token at a time
        cache = KVCache(model.cfg, batch_size=2, max_seq_len=20)
        out = [model(ids[:, :8], kv_cache=cache, start_pos=0)]
        out += [model(ids[:, t:t + 1], kv_cache=cache, start_pos=t) for t in range(8, 20)]
        assert (torch.cat(out, dim=1) - full).abs().max().item() < 1e-4
        # a chunk of several tokens after earlier ones (its own (T, S) mask from the cache)
        cache = KVCache(model.cfg, batch_size=2, max_seq_len=20)
        first = model(ids[:, :5], kv_cache=cache, start_pos=0)
        chunk = model(ids[:, 5:14], kv_cache=cache, start_pos=5)
        rest = model(ids[:, 14:], kv_cache=cache, start_pos=14)
        assert (torch.cat([first, chunk, rest], dim=1) - full).abs().max().item() < 1e-4


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[3, 17, 42, 5, 9], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [1, 2], [60, 0, 33, 8],
           [5, 5, 5, 5, 5, 5, 5]]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generate_and_serving_engine_equal_full_forwards(variant):
    model = make_model(variant)
    expected = [generate(model, p, 10, greedy=True) for p in PROMPTS]
    assert expected[0] == greedy_without_cache(model, PROMPTS[0], 10)
    assert expected[2] == greedy_without_cache(model, PROMPTS[2], 10)
    # slot cache: each row at its own positions, padding rows, requests joining a running batch (4 slots, 6 prompts)
    engine = Engine(model, None, max_batch_size=4)
    got = engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0))
    assert got == expected


# ------------------------------------------------------------------------------------------ packed training


@pytest.mark.parametrize("variant", EXACT)
def test_packed_documents_equal_each_document_alone(variant):
    model = make_model(variant)
    lengths = (5, 7, 4)
    docs = [ids_of(n, seed=10 + d) for d, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # (1, 16)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    seg = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    with torch.no_grad():
        out = model(packed, positions=pos, segment_ids=seg)
        start = 0
        for doc, n in zip(docs, lengths):
            assert (out[:, start:start + n] - model(doc)).abs().max().item() < 1e-4
            start += n
        # without segment ids the later documents see the earlier ones (the check can fail)
        assert (model(packed)[:, 5:12] - model(docs[1])).abs().max().item() > 1e-3


def test_training_gradients_reach_every_layer():
    model = make_model("gqa_6_heads").train()
    logits = model(ids_of(12, batch=2))
    F.cross_entropy(logits[:, :-1].reshape(-1, 61), ids_of(12, batch=2)[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("field, value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                          ("rotary_percent", 0.5), ("rotary_base", 500000.0)])
def test_alibi_with_rotary_fields_is_one_clear_error(field, value):
    with pytest.raises(ConfigError) as err:
        ModelConfig(position_embedding_type="alibi", **{field: value})
    msg = str(err.value)
    assert f"model.{field}=" in msg and "alibi" in msg and msg.count("\n") == 1


def test_alibi_slope_scale_needs_alibi():
    with pytest.raises(ConfigError, match=r"model.alibi_slope_scale=0.5 needs position_embedding_type=alibi"):
        ModelConfig(position_embedding_type="rope", alibi_slope_scale=0.5)
    with pytest.raises(ConfigError, match=r"model.alibi_slope_scale=0.0 must be > 0"):
        ModelConfig(position_embedding_type="alibi", alibi_slope_scale=0.0)
    with pytest.raises(ConfigError, match="position_embedding_type='alibis' is not one of learned_absolute, rope, alibi"):
        ModelConfig(position_embedding_type="alibis")
    # an odd head size is fine with ALiBi (it rotates nothing)
    assert ModelConfig(position_embedding_type="alibi", hidden_size=42, num_attention_heads=6).head_dim == 7


def test_full_forward_builds_thealibi_mask_once(monkeypatch):
    """Without a cache every layer shares one ALiBi mask (one tensor kept for backward, not one per layer);
    under autocast it is built in the attention's dtype."""
    model = make_model("gqa_6_heads")
    calls = []
    original = Attention.alibi_mask

    def counting(self, *args, **kwargs):
        calls.append(self.layer_idx)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "alibi_mask", counting)
    ids = ids_of(12, batch=2)
    model(ids).sum().backward()
    assert calls == [0] and model.cfg.num_layers > 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids)
    with torch.no_grad():
        assert (low.float() - model(ids)).abs().mean().item() < 0.05  # bf16 rounding only (logits of size ~5)
    # windowed layers still build their own (the window differs per layer)
    calls.clear()
    with torch.no_grad():
        make_model("mqa_window_scaled")(ids)
    assert calls == [0, 1]
