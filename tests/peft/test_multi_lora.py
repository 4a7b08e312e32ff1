"""Per-row LoRA adapters (MultiLoRA): every batch row gives the logits of its own merged adapter (or the
base), through full forwards, the KV cache and greedy generation; HF PEFT folders load; non-LoRA adapters,
bad targets and bad names are refused with one clear message; the row buffer never keeps stale rows."""

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import ModelConfig, Transformer
from lmforge.models.generate import generate
from lmforge.models.transformer import KVCache
from lmforge.peft import (AdapterConfig, IA3Config, LoRAConfig, MultiLoRA, MultiLoRALinear, PTuningConfig,
                          adapter_for_inference, apply_adapter, apply_peft, save_adapter)

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, MAX_POS = 61, 32, 64, 2, 4, 2, 40
PROMPT = [3, 17, 42, 5, 9]

#: name -> LoRA config: different ranks, targets and alphas
LORAS = {
    "qv": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": LoRAConfig(r=8, lora_alpha=4, target_modules=["all-linear"]),
    "mlp": LoRAConfig(r=2, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


def make_base(layers: int = LAYERS, ffn: int = FFN) -> Transformer:
    """A tiny Llama-shaped lmforge model (RoPE, GQA, SwiGLU) with far-from-uniform next-token distributions."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=layers, num_attention_heads=HEADS,
                      num_query_groups=KV_HEADS, ffn_hidden_size=ffn, max_position_embeddings=MAX_POS,
                      normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
                      share_embeddings_and_output_weights=False, init_method_std=0.3)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model.eval()


def randomize_lora_(model, seed: int) -> None:
    """Random A and non-zero B, so every adapter really changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def write_adapter(folder, method, cfg, seed=1, **base_kw):
    model = apply_peft(make_base(**base_kw), method, cfg)
    randomize_lora_(model, seed)
    save_adapter(model, method, cfg, folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: write_adapter(root / name, "lora", cfg, seed=i + 1) for i, (name, cfg) in enumerate(LORAS.items())}


@pytest.fixture(scope="module")
def references(folders):
    """slot -> the model that row should match: 0 the plain base, i the base with adapter i merged."""
    refs = [make_base()]
    refs += [adapter_for_inference(make_base(), folders[n]) for n in LORAS]
    return refs


@pytest.fixture(scope="module")
def unmerged(folders):
    """slot -> the base with adapter i applied unmerged (LoRALinear: the same arithmetic as MultiLoRALinear)."""
    return [make_base()] + [apply_adapter(make_base(), folders[n]).eval() for n in LORAS]


#: merging reassociates fp32 sums: merged and unmerged logits (|logit| < 7 here) differ by up to ~1.2e-5,
#: both lying within ~8e-6 of a float64 reference. Rows are held to 1e-5 against the unmerged model.
MERGED_TOL = 5e-5


def tokens(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def multi(folders, max_rows=8):
    model = make_base()
    return model, MultiLoRA(model, folders, max_rows=max_rows)


def test_each_row_matches_its_own_adapter(folders, references, unmerged):
    model, lora = multi(folders)
    assert lora.names == list(LORAS)
    assert [lora.index(n) for n in [None, "qv", "all", "mlp"]] == [0, 1, 2, 3]
    # the wrapped model keeps the base's parameter names and state dict; the stacks are not saved
    assert set(model.state_dict()) == set(make_base().state_dict())
    assert isinstance(model.layers[0].self_attn.q_proj, MultiLoRALinear)
    assert model.layers[1].mlp.down_proj.lora_A.shape == (4, 8, FFN)  # N+1 slots, r_max = 8
    assert model.layers[1].self_attn.q_proj.weight is not None
    rows = [0, 1, 2, 3, 1]
    x = tokens(len(rows), 12)
    lora.set_rows(rows)
    with torch.no_grad():
        got = model(x)  # (5, T, V)
        for b, slot in enumerate(rows):
            assert (got[b:b + 1] - unmerged[slot](x[b:b + 1])).abs().max().item() < 1e-5, (b, slot)
            assert (got[b:b + 1] - references[slot](x[b:b + 1])).abs().max().item() < MERGED_TOL, (b, slot)
        base = references[0](x)
        for slot in (1, 2, 3):  # every adapter matters
            assert (references[slot](x) - base).abs().max().item() > 1e-2


def test_kv_cache_and_greedy_generation_match_merged(folders, references):
    model, lora = multi(folders)
    for slot in range(len(LORAS) + 1):
        lora.set_rows([slot])
        want = generate(references[slot], PROMPT, 12, greedy=True)
        assert generate(model, PROMPT, 12, greedy=True) == want, slot
    # a mixed batch: prefill 6 tokens into the cache, then one token at a time, equals one full forward
    rows = [2, 0, 3, 1]
    x = tokens(len(rows), 10, seed=5)
    lora.set_rows(rows)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, len(rows), 10)
        steps = [model(x[:, :6], kv_cache=cache, start_pos=0)]
        steps += [model(x[:, i:i + 1], kv_cache=cache, start_pos=i) for i in range(6, 10)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_set_rows_pads_with_base_and_leaves_no_stale_rows(folders, unmerged):
    model, lora = multi(folders, max_rows=6)
    x = tokens(3, 8, seed=7)
    lora.set_rows([1, 2, 3, 3, 2, 1])
    lora.set_rows([2])
    assert lora.ids.tolist() == [2, 0, 0, 0, 0, 0]
    with torch.no_grad():
        first = model(x)
        for b, slot in enumerate([2, 0, 0]):
            assert (first[b:b + 1] - unmerged[slot](x[b:b + 1])).abs().max().item() < 1e-5
        lora.set_rows(torch.tensor([3, 1, 0]))
        second = model(x)
        for b, slot in enumerate([3, 1, 0]):
            assert (second[b:b + 1] - unmerged[slot](x[b:b + 1])).abs().max().item() < 1e-5
    assert (first[:2] - second[:2]).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="max_rows=6"):
        lora.set_rows([0] * 7)
    with pytest.raises(ValueError, match="0..3"):
        lora.set_rows([4])


def test_unknown_name_lists_loaded_adapters(folders):
    _, lora = multi(folders)
    with pytest.raises(ConfigError) as e:
        lora.index("sql")
    assert "'sql'" in str(e.value) and "qv, all, mlp" in str(e.value)


def test_linear_two_dim_input_and_fullgraph_trace(folders):
    """(N, in) reads as N rows; a compiled forward has no graph break and reads the row buffer every call."""
    model, lora = multi(folders, max_rows=4)
    layer = model.layers[0].mlp.up_proj
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(0))
    lora.set_rows([0, 2, 3, 2])
    with torch.no_grad():
        assert torch.allclose(layer(x), layer(x[:, None])[:, 0])
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        a = compiled(x[:, None])
        assert torch.allclose(a, layer(x[:, None]))
        lora.set_rows([3, 2, 0, 0])
        b = compiled(x[:, None])
        assert torch.allclose(b, layer(x[:, None])) and not torch.allclose(a, b)


@pytest.mark.parametrize("method,cfg,words", [
    ("lora", LoRAConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
    ("ia3", IA3Config(), "IA3"),
    ("adapter", AdapterConfig(dim=8), "bottleneck adapter"),
    ("ptuning", PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16), "p-tuning"),
])
def test_non_lora_adapters_are_refused(tmp_path, folders, method, cfg, words):
    bad = write_adapter(tmp_path / "bad", method, cfg)
    model = make_base()
    keys = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ConfigError) as e:
        MultiLoRA(model, {"qv": folders["qv"], "odd": bad}, max_rows=2)
    msg = str(e.value)
    assert words in msg and str(bad) in msg and "--adapter" in msg and "'odd'" in msg and "\n" not in msg
    assert {n: type(m) for n, m in model.named_modules()} == keys  # nothing wrapped on failure


def test_bad_targets_are_refused(tmp_path):
    deeper = write_adapter(tmp_path / "deeper", "lora", LoRAConfig(r=2, target_modules=["o_proj"]), layers=3)
    with pytest.raises(ConfigError, match=r"'layers\.2\.self_attn\.o_proj'.*another model"):
        MultiLoRA(make_base(), {"deeper": deeper}, max_rows=2)
    wider = write_adapter(tmp_path / "wider", "lora", LoRAConfig(r=2, target_modules=["up_proj"]), ffn=48)
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.up_proj has in/out features \(32, 48\).*\(32, 64\)"):
        MultiLoRA(make_base(), {"wider": wider}, max_rows=2)
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        MultiLoRA(make_base(), {"gone": tmp_path / "missing"}, max_rows=2)


def test_bad_names_are_refused(folders):
    with pytest.raises(ConfigError, match=r"\['qv'\] given more than once"):
        MultiLoRA(make_base(), [("qv", folders["qv"]), ("qv", folders["all"])], max_rows=2)
    with pytest.raises(ConfigError, match="empty name"):
        MultiLoRA(make_base(), {"": folders["qv"]}, max_rows=2)
    with pytest.raises(ConfigError, match="max_rows=0"):
        MultiLoRA(make_base(), folders, max_rows=0)


def test_hugging_face_peft_adapter(tmp_path):
    """A folder written by peft's save_pretrained serves per row like PeftModel with and without the adapter."""
    import peft

    from tests.peft.test_peft_hf_format import tiny_llama

    hf, ours = tiny_llama()  # an HF Llama with random weights and the lmforge model holding the same weights
    g = torch.Generator().manual_seed(0)

    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"],
                                                 layers_to_transform=[1]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "hf_lora"))
    pm.eval()

    lora = MultiLoRA(ours, {"hf": tmp_path / "hf_lora"}, max_rows=2)
    assert lora.modules == ["layers.1.self_attn.k_proj", "layers.1.self_attn.o_proj", "layers.1.mlp.up_proj"]
    x = tokens(2, 11)
    lora.set_rows([1, 0])
    with torch.no_grad():
        got = ours(x)
        adapted = pm(x).logits
        with pm.disable_adapter():
            plain = pm(x).logits
    assert (adapted - plain).abs().max().item() > 1e-2
    assert (got[0] - adapted[0]).abs().max().item() < 1e-4
    assert (got[1] - plain[1]).abs().max().item() < 1e-4
