"""Transformer: shapes, gradients, causality, heads, GQA, dropout, meta init, counts, KV cache."""

import math

import pytest
import torch

import lmforge.models.transformer as transformer_mod
from lmforge.models import KVCache, ModelConfig, Transformer

STYLES = ("gpt", "llama")


def make_cfg(style: str, **overrides) -> ModelConfig:
    """A tiny GPT-2-style or Llama-style config."""
    if style == "gpt":
        fields = dict(vocab_size=101, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=48, normalization="layernorm", activation="gelu", bias=True,
                      position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)
    else:
        fields = dict(vocab_size=101, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=72, max_position_embeddings=48, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", rotary_base=10000.0,
                      share_embeddings_and_output_weights=False)
    fields.update(overrides)
    return ModelConfig(**fields)


def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def tokens(cfg: ModelConfig, B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("style", STYLES)
def test_forward_shape_and_dtype(style):
    cfg = make_cfg(style)
    model = make_model(cfg)
    logits = model(tokens(cfg, B=3, T=7))
    assert logits.shape == (3, 7, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("style", STYLES)
def test_module_names_follow_hf_llama(style):
    cfg = make_cfg(style)
    names = set(make_model(cfg).state_dict())
    expected = {"embed_tokens.weight", "layers.0.input_layernorm.weight", "layers.0.self_attn.q_proj.weight",
                "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
                "layers.0.self_attn.o_proj.weight", "layers.0.post_attention_layernorm.weight",
                "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "norm.weight"}
    assert expected <= names
    assert ("embed_positions.weight" in names) == (style == "gpt")
    assert ("layers.0.mlp.gate_proj.weight" in names) == (style == "llama")
    assert ("layers.0.self_attn.q_proj.bias" in names) == (style == "gpt")
    assert not any("rope" in n for n in names)  # rotary tables are non-persistent buffers


@pytest.mark.parametrize("style", STYLES)
def test_backward_gives_finite_grads_everywhere(style):
    cfg = make_cfg(style)
    model = make_model(cfg).train()
    x = tokens(cfg)
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("style", STYLES)
def test_causality(style):
    cfg = make_cfg(style)
    model = make_model(cfg)
    x = tokens(cfg, B=1, T=16)
    t = 9
    y = x.clone()
    y[0, t] = (x[0, t] + 1) % cfg.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 0  # every later position sees the change


@pytest.mark.parametrize("style", STYLES)
def test_tied_and_untied_head(style):
    tied = make_model(make_cfg(style, share_embeddings_and_output_weights=True))
    untied = make_model(make_cfg(style, share_embeddings_and_output_weights=False))
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()
    assert untied.lm_head is not None and "lm_head.weight" in untied.state_dict()
    cfg = tied.cfg
    assert untied.num_params() - tied.num_params() == cfg.vocab_size * cfg.hidden_size
    # The tied head is the embedding matrix: logits = final hidden @ embed_tokens.T
    x = tokens(cfg)
    hidden = {}
    tied.norm.register_forward_hook(lambda mod, inp, out: hidden.setdefault("h", out))
    logits = tied(x)
    torch.testing.assert_close(logits, hidden["h"] @ tied.embed_tokens.weight.T)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_query_attention_matches_repeated_heads(groups):
    """GQA with nkv groups equals multi-head attention whose k/v heads are the groups repeated."""
    cfg = make_cfg("llama", num_attention_heads=4, num_query_groups=groups)
    gqa = make_model(cfg)
    hd, rep = cfg.head_dim, 4 // groups
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (groups * hd, cfg.hidden_size)
    mha = Transformer(make_cfg("llama", num_attention_heads=4, num_query_groups=4)).eval()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[key].view(groups, hd, cfg.hidden_size)
            state[key] = w.repeat_interleave(rep, dim=0).reshape(4 * hd, cfg.hidden_size)
    mha.load_state_dict(state)
    x = tokens(cfg)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_gqa_fallback_without_enable_gqa(monkeypatch):
    """The repeat_interleave path (torch < 2.5) gives the same logits as SDPA's enable_gqa."""
    cfg = make_cfg("llama", num_query_groups=2)
    model = make_model(cfg)
    x = tokens(cfg)
    expected = model(x)
    monkeypatch.setattr(transformer_mod, "_SDPA_HAS_GQA", False)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    cache = KVCache(cfg, 2, 12)
    prefill = model(x[:, :5], kv_cache=cache)
    step = model(x[:, 5:7], kv_cache=cache, start_pos=5)
    torch.testing.assert_close(torch.cat([prefill, step], 1), expected[:, :7], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_dropout_only_in_train_mode(style):
    cfg = make_cfg(style, hidden_dropout=0.3, attention_dropout=0.3)
    model = make_model(cfg)
    x = tokens(cfg)
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(x), model(x))
    # Attention dropout alone also acts in training only.
    cfg = make_cfg(style, attention_dropout=0.5)
    model = make_model(cfg).train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("style", STYLES)
def test_meta_device_build_then_init(style):
    cfg = make_cfg(style)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3)
    reference = make_model(cfg, seed=3)
    for (name, a), (_, b) in zip(meta.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    for (name, a), (_, b) in zip(meta.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    x = tokens(cfg)
    torch.testing.assert_close(meta.eval()(x), reference(x), atol=0, rtol=0)


@pytest.mark.parametrize("style", STYLES)
def test_init_weights_seeded_and_reproducible(style):
    cfg = make_cfg(style)
    a, b, c = make_model(cfg, seed=5), make_model(cfg, seed=5), make_model(cfg, seed=6)
    wa, wb, wc = (m.layers[1].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def expected_param_count(cfg: ModelConfig) -> int:
    C, F, V, L, P = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_layers, cfg.max_position_embeddings
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    b = int(cfg.bias)
    norm = C * (2 if cfg.normalization == "layernorm" and cfg.bias else 1)
    attn = C * q_out + 2 * C * kv_out + q_out * C + b * (q_out + 2 * kv_out + C)
    n_up = 2 if cfg.activation == "swiglu" else 1
    mlp = n_up * (C * F + b * F) + F * C + b * C
    block = attn + mlp + 2 * norm
    embed = V * C + (P * C if cfg.position_embedding_type == "learned_absolute" else 0)
    head = 0 if cfg.share_embeddings_and_output_weights else V * C
    return embed + L * block + norm + head


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("tied", [True, False])
def test_param_count(style, tied):
    cfg = make_cfg(style, share_embeddings_and_output_weights=tied)
    model = make_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total == expected_param_count(cfg)
    embed = cfg.vocab_size * cfg.hidden_size
    if style == "gpt":
        embed += cfg.max_position_embeddings * cfg.hidden_size
    assert model.num_params(exclude_embeddings=True) == total - embed


@pytest.mark.parametrize("style", STYLES)
def test_flops_per_token(style):
    cfg = make_cfg(style)
    model = make_model(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and n.endswith("proj.weight"))
    matmul += cfg.vocab_size * cfg.hidden_size
    seq = 40
    assert model.flops_per_token(seq) == 6 * matmul + 12 * cfg.num_layers * cfg.hidden_size * seq


@pytest.mark.parametrize("style", STYLES)
def test_init_std(style):
    cfg = make_cfg(style, hidden_size=64, ffn_hidden_size=256, num_layers=4, init_method_std=0.02)
    model = make_model(cfg)
    block = model.layers[0]
    assert block.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * cfg.num_layers)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert torch.equal(block.input_layernorm.weight, torch.ones(cfg.hidden_size))
    if cfg.bias:
        assert torch.equal(block.self_attn.q_proj.bias, torch.zeros_like(block.self_attn.q_proj.bias))
        assert torch.equal(model.norm.bias, torch.zeros(cfg.hidden_size))


@pytest.mark.parametrize("style", STYLES)
def test_positions_beyond_limit_raise(style):
    cfg = make_cfg(style, max_position_embeddings=16)
    model = make_model(cfg)
    model(tokens(cfg, T=16))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(tokens(cfg, T=17))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(tokens(cfg, T=4), start_pos=13)


def test_learned_positions_follow_start_pos():
    """Without a cache, start_pos shifts the position ids: the same tokens at another offset differ."""
    cfg = make_cfg("gpt")
    model = make_model(cfg)
    x = tokens(cfg, T=4)
    assert not torch.allclose(model(x, start_pos=0), model(x, start_pos=5))
    full = model(tokens(cfg, T=12))
    # A single token at position 0 only sees itself: start_pos=0 on a 1-token input equals the first logit.
    torch.testing.assert_close(model(tokens(cfg, T=12)[:, :1]), full[:, :1])


# ---------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_prefill_then_decode_matches_full_forward(style):
    cfg = make_cfg(style)
    model = make_model(cfg)
    x = tokens(cfg, B=2, T=14)
    full = model(x)
    cache = KVCache(cfg, batch_size=2, max_seq_len=cfg.max_position_embeddings)
    with torch.no_grad():
        parts = [model(x[:, :6], kv_cache=cache, start_pos=0)]
        for t in range(6, 14):
            parts.append(model(x[:, t:t + 1], kv_cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_chunked_prefill_matches_full_forward(style):
    cfg = make_cfg(style)
    model = make_model(cfg)
    x = tokens(cfg, B=2, T=15)
    full = model(x)
    cache = KVCache(cfg, batch_size=2, max_seq_len=20)
    with torch.no_grad():
        first = model(x[:, :5], kv_cache=cache, start_pos=0)
        second = model(x[:, 5:12], kv_cache=cache, start_pos=5)
        decode = [model(x[:, t:t + 1], kv_cache=cache, start_pos=t) for t in range(12, 15)]
    torch.testing.assert_close(torch.cat([first, second, *decode], dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_shapes_and_errors():
    cfg = make_cfg("llama")
    cache = KVCache(cfg, batch_size=2, max_seq_len=8)
    assert len(cache.k) == len(cache.v) == cfg.num_layers
    assert cache.k[0].shape == (2, cfg.num_query_groups, 8, cfg.head_dim)
    model = make_model(cfg)
    with pytest.raises(ValueError, match="holds 8 positions"):
        model(tokens(cfg, B=2, T=9), kv_cache=cache)
    with pytest.raises(ValueError, match="batch size 2"):
        model(tokens(cfg, B=3, T=2), kv_cache=cache)


@pytest.mark.parametrize("style", STYLES)
def test_explicit_positions_match_implicit_ones(style):
    """Per-sequence positions (what a serving engine passes) give the same logits as start_pos offsets."""
    cfg = make_cfg(style)
    model = make_model(cfg).eval()
    x = tokens(cfg, B=2, T=6)
    with torch.no_grad():
        ref = model(x)
        pos = torch.arange(6).expand(2, 6)
        assert torch.allclose(model(x, positions=pos), ref, atol=1e-6)
        # positions with a gap change the logits (they are used; RoPE only sees differences, so a gap)
        gapped = torch.tensor([0, 1, 2, 9, 10, 11]).expand(2, 6)
        assert not torch.allclose(model(x, positions=gapped), ref, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        model(x, positions=torch.arange(5).expand(2, 5))
    with pytest.raises(ValueError, match="per-sequence positions"):
        model(x, kv_cache=KVCache(cfg, 2, 16), positions=pos)


@pytest.mark.parametrize("style", STYLES)
def test_packed_documents_do_not_see_each_other(style):
    """Two documents packed in one row (segment ids, positions restarting) give each document's own logits."""
    cfg = make_cfg(style)
    model = make_model(cfg).eval()
    a, b = tokens(cfg, B=1, T=5, seed=3), tokens(cfg, B=1, T=7, seed=4)
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        out = model(packed, positions=pos, segment_ids=seg)
        assert torch.allclose(out[:, :5], model(a), atol=1e-5)
        assert torch.allclose(out[:, 5:], model(b), atol=1e-5)
        # without segment ids the second document attends to the first
        assert not torch.allclose(model(packed, positions=pos)[:, 5:], model(b), atol=1e-4)


@pytest.mark.parametrize("overrides", [dict(style="llama"), dict(style="gpt"), dict(style="llama", qkv_bias=True),
                                       dict(style="llama", num_moe_experts=3, moe_router_topk=2)])
def test_fuse_projections_keeps_the_function(overrides):
    style = overrides.pop("style")
    cfg = make_cfg(style, **overrides)
    model = make_model(cfg)
    with torch.no_grad():  # non-zero biases, so a bias dropped or misplaced by the fusion shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    x = tokens(cfg, B=2, T=9)
    ref = model(x)
    n_gated = sum(isinstance(m, transformer_mod.GatedMLP) for m in model.modules())
    assert transformer_mod.fuse_projections(model) == cfg.num_layers + n_gated
    names = set(dict(model.named_parameters()))
    assert "layers.0.self_attn.qkv_proj.weight" in names and "layers.0.self_attn.q_proj.weight" not in names
    assert ("layers.0.mlp.gate_up_proj.weight" in names) == (style == "llama" and not cfg.num_moe_experts)
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)
    cache = KVCache(cfg, batch_size=2, max_seq_len=16)
    steps = [model(x[:, :5], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache, start_pos=t) for t in range(5, 9)]
    assert torch.allclose(torch.cat(steps, dim=1), ref, atol=1e-5, rtol=1e-5)
    assert transformer_mod.fuse_projections(model) == 0  # already fused


def test_fuse_projections_leaves_wrapped_projections_apart():
    from lmforge.peft import LoRAConfig, apply_peft

    cfg = make_cfg("llama")
    model = make_model(cfg)
    apply_peft(model, "lora", LoRAConfig(r=2, target_modules=["q_proj"]))
    assert transformer_mod.fuse_projections(model) == cfg.num_layers  # the gated MLPs only
    names = set(dict(model.named_modules()))
    assert "layers.0.self_attn.q_proj" in names and "layers.0.self_attn.qkv_proj" not in names
    assert "layers.0.mlp.gate_up_proj" in names


def test_fuse_projections_frees_each_layers_weights_as_it_goes(monkeypatch):
    """While a later layer is fused, the replaced projections of the layers before it are already freed: holding
    them all to the end took an 8B model's fused matrices twice over (the serving engine's start-up OOM)."""
    import weakref

    cfg = make_cfg("llama", num_layers=3)
    model = make_model(cfg)
    old = [weakref.ref(m.weight) for layer in model.layers
           for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                     layer.mlp.gate_proj, layer.mlp.up_proj)]
    alive_at_each_fusion = []
    concat = transformer_mod._concat_linears

    def watched(parts):
        alive_at_each_fusion.append(sum(ref() is not None for ref in old))
        return concat(parts)

    monkeypatch.setattr(transformer_mod, "_concat_linears", watched)
    assert transformer_mod.fuse_projections(model) == 2 * cfg.num_layers
    # before each fusion only the not-yet-fused projections live: 15, then 12 (q/k/v of layer 0 gone), 10, ...
    assert alive_at_each_fusion == [15, 12, 10, 7, 5, 2], alive_at_each_fusion
    assert all(ref() is None for ref in old)
