"""A .nemo archive built here from the documented Megatron-core layout (tensor parallel 1 and 2) imports
and computes the same logits as the model it was made from."""

import io
import tarfile

import pytest
import torch
import transformers
import yaml

from lmforge.convert.hf import convert
from lmforge.errors import CheckpointError
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import load_model

STYLES = {
    "gpt": dict(vocab_size=96, hidden_size=48, num_layers=2, num_attention_heads=4, ffn_hidden_size=88,
                max_position_embeddings=64, normalization="layernorm", activation="gelu", bias=True,
                position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True),
    "llama": dict(vocab_size=96, hidden_size=48, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=88, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
                  bias=False, position_embedding_type="rope", rotary_base=500000.0,
                  share_embeddings_and_output_weights=False),
}
NEMO_ACT = {"gelu": "gelu", "swiglu": "fast-swiglu"}


def random_model(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def megatron_state(model: Transformer, tp: int) -> list[dict]:
    """The model's weights under mcore names, split over ``tp`` ranks as Megatron does."""
    cfg, sd = model.cfg, model.state_dict()
    g, hd = cfg.num_query_groups, cfg.head_dim
    ranks = [{} for _ in range(tp)]

    def put(name, tensor, dim):
        pieces = [tensor] * tp if dim is None else torch.chunk(tensor, tp, dim=dim)
        for r, piece in zip(ranks, pieces):
            r[name] = piece.clone()

    put("model.embedding.word_embeddings.weight", sd["embed_tokens.weight"], 0)
    if cfg.position_embedding_type == "learned_absolute":
        put("model.embedding.position_embeddings.weight", sd["embed_positions.weight"], None)
    for i in range(cfg.num_layers):
        L, N = f"layers.{i}", f"model.decoder.layers.{i}"
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = (sd[f"{L}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj"))
            rest = q.shape[1:]
            fused = torch.cat([q.reshape(g, -1, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)], 1)
            put(f"{N}.self_attention.linear_qkv.{kind}", fused.reshape(-1, *rest), 0)  # groups stay whole per rank
            if cfg.gated:
                gate = torch.chunk(sd[f"{L}.mlp.gate_proj.{kind}"], tp, 0)
                up = torch.chunk(sd[f"{L}.mlp.up_proj.{kind}"], tp, 0)
                for r in range(tp):
                    ranks[r][f"{N}.mlp.linear_fc1.{kind}"] = torch.cat([gate[r], up[r]], 0)
            else:
                put(f"{N}.mlp.linear_fc1.{kind}", sd[f"{L}.mlp.up_proj.{kind}"], 0)
        put(f"{N}.self_attention.linear_proj.weight", sd[f"{L}.self_attn.o_proj.weight"], 1)
        put(f"{N}.mlp.linear_fc2.weight", sd[f"{L}.mlp.down_proj.weight"], 1)
        if cfg.bias:
            put(f"{N}.self_attention.linear_proj.bias", sd[f"{L}.self_attn.o_proj.bias"], None)
            put(f"{N}.mlp.linear_fc2.bias", sd[f"{L}.mlp.down_proj.bias"], None)
        for ours, theirs in (("input_layernorm", "self_attention.linear_qkv"), ("post_attention_layernorm", "mlp.linear_fc1")):
            put(f"{N}.{theirs}.layer_norm_weight", sd[f"{L}.{ours}.weight"], None)
            if cfg.bias:
                put(f"{N}.{theirs}.layer_norm_bias", sd[f"{L}.{ours}.bias"], None)
    put("model.decoder.final_layernorm.weight", sd["norm.weight"], None)
    if cfg.bias:
        put("model.decoder.final_layernorm.bias", sd["norm.bias"], None)
    if not cfg.share_embeddings_and_output_weights:
        put("model.output_layer.weight", sd["lm_head.weight"], 0)
    return ranks


def write_nemo(path, model: Transformer, tp: int) -> None:
    cfg = model.cfg
    nemo_cfg = dict(mcore_gpt=True, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                    ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
                    num_query_groups=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
                    encoder_seq_length=cfg.max_position_embeddings, normalization=cfg.normalization,
                    layernorm_epsilon=cfg.layernorm_epsilon, activation=NEMO_ACT[cfg.activation], bias=cfg.bias,
                    position_embedding_type=cfg.position_embedding_type, rotary_base=cfg.rotary_base,
                    share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                    tokenizer=dict(library="sentencepiece", model="nemo:abc123_tokenizer.model"))
    members = {"model_config.yaml": yaml.safe_dump(nemo_cfg).encode(), "abc123_tokenizer.model": b"spm-bytes"}
    for r, state in enumerate(megatron_state(model, tp)):
        buf = io.BytesIO()
        torch.save(state, buf)
        members["model_weights.ckpt" if tp == 1 else f"mp_rank_{r:02d}/model_weights.ckpt"] = buf.getvalue()
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("tp", [1, 2])
def test_nemo_import_matches(style, tp, tmp_path):
    model = random_model(ModelConfig(**STYLES[style]))
    write_nemo(tmp_path / "m.nemo", model, tp)
    summary = convert(tmp_path / "m.nemo", tmp_path / "ours", to="lmforge", progress=False)
    assert summary["source_format"] == "nemo"
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"spm-bytes"
    weights, config = load_model(tmp_path / "ours")
    imported = Transformer(ModelConfig.from_dict(config["model"]))
    imported.load_state_dict(weights, strict=not imported.cfg.share_embeddings_and_output_weights)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(imported.eval()(ids), model(ids))
    # and straight on to an HF folder transformers can read
    convert(tmp_path / "m.nemo", tmp_path / "hf", to="hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == ("gpt2" if style == "gpt" else "llama")
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_nemo_bad_inputs(tmp_path):
    (tmp_path / "bad.nemo").write_bytes(b"not a tar")
    with pytest.raises(CheckpointError, match="not a readable .nemo"):
        convert(tmp_path / "bad.nemo", tmp_path / "out", to="lmforge", progress=False)
    # a pickle holding an arbitrary object is refused, not executed
    with tarfile.open(tmp_path / "obj.nemo", "w:") as tar:
        for name, data in (("model_config.yaml", b"num_layers: 1\n"), ("model_weights.ckpt", _pickled_object())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert(tmp_path / "obj.nemo", tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()


class _Payload:
    pass


def _pickled_object() -> bytes:
    buf = io.BytesIO()
    torch.save({"x": _Payload()}, buf)
    return buf.getvalue()
