"""New mechanisms keep the cache, positions and packed-sequence contracts: a chunked, cached forward
equals the full forward; a window limits what a token sees; packed documents stay apart."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import KVCache, ModelConfig, Transformer

BASE = dict(vocab_size=61, hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=40,
            max_position_embeddings=64, normalization="rmsnorm", activation="swiglu", bias=False,
            position_embedding_type="rope", share_embeddings_and_output_weights=False)
VARIANTS = {
    "window": dict(sliding_window=4),
    "alternating_window_softcap": dict(sliding_window=3, layer_types=["sliding_attention", "full_attention",
                                                                      "sliding_attention"],
                                       attn_logit_softcapping=2.0, final_logit_softcapping=5.0, sandwich_norm=True,
                                       activation="geglu", norm_offset=1.0, embedding_multiplier=5.0),
    "parallel_partial_rotary": dict(parallel_attn_mlp=True, rotary_percent=0.5, normalization="layernorm",
                                    activation="squared_relu", qkv_bias=True),
    "moe": dict(num_moe_experts=3, moe_router_topk=2),
}


def model_for(name: str) -> Transformer:
    model = Transformer(ModelConfig(**{**BASE, **VARIANTS[name]}))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_chunked_cache_equals_full_forward(name):
    model = model_for(name)
    ids = torch.randint(0, 61, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg, 2, 15)
        parts = [model(ids[:, :6], kv_cache=cache), model(ids[:, 6:11], kv_cache=cache, start_pos=6)]
        parts += [model(ids[:, t:t + 1], kv_cache=cache, start_pos=t) for t in range(11, 15)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_window_limits_sight():
    model = model_for("window")  # every layer: window 4, so 3 layers see at most 9 tokens back
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 61
    with torch.no_grad():
        diff = (model(ids) - model(changed)).abs().amax(-1)[0]
    assert diff[3:12].min() > 0 and diff[12:].max() == 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_documents_stay_apart(name):
    model = model_for(name)
    a = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(4))
    packed = torch.cat([a, b], 1)
    segments = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        got = model(packed, positions=positions, segment_ids=segments)
        torch.testing.assert_close(got[:, :7], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[:, 7:], model(b), atol=1e-5, rtol=1e-5)


def test_bad_mechanism_values_name_the_field():
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig(**{**BASE, "sliding_window": 4, "layer_types": ["sliding_attention"]})
    with pytest.raises(ConfigError, match="moe_router_topk"):
        ModelConfig(**{**BASE, "num_moe_experts": 2, "moe_router_topk": 3})
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig(**{**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
