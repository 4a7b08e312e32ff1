"""A .nemo archive built here from the documented Megatron-core layout (tensor parallel 1 and 2) imports
and computes the same logits as the model it was made from."""

import io
import re
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


def nemo_config(model: Transformer, tp: int = 1, pp: int = 1, **extra) -> bytes:
    """model_config.yaml of ``model`` (NeMo's field names)."""
    cfg = model.cfg
    nemo_cfg = dict(mcore_gpt=True, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                    ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
                    num_query_groups=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
                    encoder_seq_length=cfg.max_position_embeddings, normalization=cfg.normalization,
                    layernorm_epsilon=cfg.layernorm_epsilon, activation=NEMO_ACT[cfg.activation], bias=cfg.bias,
                    position_embedding_type=cfg.position_embedding_type, rotary_base=cfg.rotary_base,
                    share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    tokenizer=dict(library="sentencepiece", model="nemo:abc123_tokenizer.model"))
    nemo_cfg.update(extra)
    return yaml.safe_dump(nemo_cfg).encode()


def pickled(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_members(path, members: dict, as_folder: bool = False) -> None:
    """A .nemo tar (``./`` names, as NeMo writes them) or an extracted folder holding ``members``."""
    if as_folder:
        for name, data in members.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        return
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_nemo(path, model: Transformer, tp: int) -> None:
    members = {"model_config.yaml": nemo_config(model, tp), "abc123_tokenizer.model": b"spm-bytes"}
    for r, state in enumerate(megatron_state(model, tp)):
        members["model_weights.ckpt" if tp == 1 else f"mp_rank_{r:02d}/model_weights.ckpt"] = pickled(state)
    write_members(path, members)


def imported_logits(folder, ids) -> torch.Tensor:
    weights, config = load_model(folder)
    imported = Transformer(ModelConfig.from_dict(config["model"]))
    imported.load_state_dict(weights, strict=not imported.cfg.share_embeddings_and_output_weights)
    with torch.no_grad():
        return imported.eval()(ids)


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


# ---------------------------------------------------------------------------------------------- other layouts

LEGACY = [("model.embedding.", "model.language_model.embedding."),
          ("model.decoder.final_layernorm.", "model.language_model.encoder.final_layernorm."),
          ("model.output_layer.", "model.language_model.output_layer."),
          ("model.decoder.layers.", "model.language_model.encoder.layers."),
          (".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
          (".self_attention.linear_qkv.", ".self_attention.query_key_value."),
          (".self_attention.linear_proj.", ".self_attention.dense."),
          (".mlp.linear_fc1.layer_norm_", ".post_attention_layernorm."),
          (".mlp.linear_fc1.", ".mlp.dense_h_to_4h."),
          (".mlp.linear_fc2.", ".mlp.dense_4h_to_h.")]


def legacy_state(ranks: list[dict], fast_glu: bool = True) -> list[dict]:
    """Pre-mcore (language_model.encoder) names of mcore rank states; ``fast_glu=False``: NeMo's non-fast
    swiglu keeps [gate_r] in dense_h_to_4h and [up_r] in dense_h_to_4h_2."""
    out = []
    for state in ranks:
        new = {}
        for key, value in state.items():
            for a, b in LEGACY:
                key = key.replace(a, b)
            if not fast_glu and ".dense_h_to_4h." in key:
                gate, up = value.chunk(2, dim=0)
                new[key], new[key.replace(".dense_h_to_4h.", ".dense_h_to_4h_2.")] = gate.clone(), up.clone()
            else:
                new[key] = value
        out.append(new)
    return out


def pipeline_split(ranks: list[dict], pp: int, num_layers: int, tied: bool) -> dict[tuple[int, int], dict]:
    """(tp, pp) -> state: each stage holds a block of layers numbered from 0, the embedding on the first, the final
    norm and head on the last (and, tied, a copy of the word embeddings there, under NeMo's names)."""
    per = num_layers // pp
    grid = {}
    for t, state in enumerate(ranks):
        for p in range(pp):
            stage = {}
            for key, value in state.items():
                m = re.search(r"\.layers\.(\d+)\.", key)
                if m:
                    i = int(m.group(1))
                    if p * per <= i < (p + 1) * per:
                        stage[key.replace(f".layers.{i}.", f".layers.{i - p * per}.")] = value
                elif ".embedding." in key and p == 0 or ".embedding." not in key and p == pp - 1:
                    stage[key] = value
            if tied and p == pp - 1:
                legacy = any("language_model" in k for k in state)
                emb = [v for k, v in state.items() if k.endswith("word_embeddings.weight")][0]
                stage["model.word_embeddings.weight" if legacy else "model.embedding.word_embeddings.weight"] = emb
            grid[(t, p)] = stage
    return grid


def grid_members(model: Transformer, grid: dict, tp: int, pp: int) -> dict:
    members = {"model_config.yaml": nemo_config(model, tp, pp)}
    for (t, p), state in grid.items():
        name = f"tp_rank_{t:02d}_pp_rank_{p:03d}" if pp > 1 else f"mp_rank_{t:02d}"
        members[f"{name}/model_weights.ckpt" if tp * pp > 1 else "model_weights.ckpt"] = pickled(state)
    return members


FOUR_LAYERS = {style: {**kw, "num_layers": 4} for style, kw in STYLES.items()}


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("tp", [1, 2])
def test_pre_mcore_names_import(style, tp, tmp_path):
    model = random_model(ModelConfig(**STYLES[style]))
    ranks = legacy_state(megatron_state(model, tp))
    write_members(tmp_path / "m.nemo", grid_members(model, {(t, 0): s for t, s in enumerate(ranks)}, tp, 1))
    convert(tmp_path / "m.nemo", tmp_path / "ours", to="lmforge", progress=False)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(imported_logits(tmp_path / "ours", ids), model(ids))


def test_pre_mcore_non_fast_swiglu(tmp_path):
    model = random_model(ModelConfig(**STYLES["llama"]))
    ranks = legacy_state(megatron_state(model, 2), fast_glu=False)
    assert any(".dense_h_to_4h_2." in k for k in ranks[0])
    members = grid_members(model, {(t, 0): s for t, s in enumerate(ranks)}, 2, 1)
    members["model_config.yaml"] = nemo_config(model, 2, activation="swiglu")
    write_members(tmp_path / "m.nemo", members)
    convert(tmp_path / "m.nemo", tmp_path / "ours", to="lmforge", progress=False)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(imported_logits(tmp_path / "ours", ids), model(ids))


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("names", ["mcore", "legacy"])
def test_pipeline_parallel_tp2_pp2(style, names, tmp_path):
    model = random_model(ModelConfig(**FOUR_LAYERS[style]))
    ranks = megatron_state(model, 2)
    if names == "legacy":
        ranks = legacy_state(ranks)
    grid = pipeline_split(ranks, 2, 4, model.cfg.share_embeddings_and_output_weights)
    assert not any("layers.2." in k for state in grid.values() for k in state)  # layers numbered per stage
    write_members(tmp_path / "m", grid_members(model, grid, 2, 2), as_folder=True)
    convert(tmp_path / "m", tmp_path / "ours", to="lmforge", progress=False)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(imported_logits(tmp_path / "ours", ids), model(ids))
    convert(tmp_path / "m", tmp_path / "hf", to="hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def _pp_members(tmp_path):
    model = random_model(ModelConfig(**FOUR_LAYERS["llama"]))
    return model, grid_members(model, pipeline_split(megatron_state(model, 2), 2, 4, False), 2, 2)


def test_missing_rank_is_named(tmp_path):
    model, members = _pp_members(tmp_path)
    del members["tp_rank_01_pp_rank_001/model_weights.ckpt"]
    write_members(tmp_path / "m.nemo", members)
    with pytest.raises(CheckpointError, match=r"tp_rank_01_pp_rank_001/model_weights\.ckpt are missing"):
        convert(tmp_path / "m.nemo", tmp_path / "out", to="lmforge", progress=False)
    # a TP archive with one mp_rank folder fewer than its config says
    write_nemo(tmp_path / "tp.nemo", model, 2)
    with tarfile.open(tmp_path / "tp.nemo") as tar:
        kept = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if "mp_rank_01" not in m.name}
    write_members(tmp_path / "tp1.nemo", kept)
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_weights\.ckpt are missing"):
        convert(tmp_path / "tp1.nemo", tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()


def test_inconsistent_shapes_and_unknown_keys(tmp_path):
    model = random_model(ModelConfig(**STYLES["llama"]))
    ranks = megatron_state(model, 2)
    key = "model.decoder.layers.1.self_attention.linear_proj.weight"
    ranks[1][key] = ranks[1][key][:-1]  # one rank's piece is cut short
    write_members(tmp_path / "a.nemo", grid_members(model, {(t, 0): s for t, s in enumerate(ranks)}, 2, 1))
    with pytest.raises(CheckpointError, match=r"linear_proj\.weight has shapes \[\(48, 24\), \(47, 24\)\]"):
        convert(tmp_path / "a.nemo", tmp_path / "out", to="lmforge", progress=False)
    # all ranks agree, but the merged tensor does not fit model_config.yaml
    ranks = megatron_state(model, 1)
    ranks[0]["model.decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(48, 90)
    write_members(tmp_path / "b.nemo", grid_members(model, {(0, 0): ranks[0]}, 1, 1))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight' merged to shape \(48, 90\) but model_config\.yaml"):
        convert(tmp_path / "b.nemo", tmp_path / "out", to="lmforge", progress=False)
    # names from another model kind
    ranks = megatron_state(model, 1)
    ranks[0]["model.decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"] = torch.zeros(2, 2)
    write_members(tmp_path / "c.nemo", grid_members(model, {(0, 0): ranks[0]}, 1, 1))
    with pytest.raises(CheckpointError, match=r"not in a known NeMo GPT key layout"):
        convert(tmp_path / "c.nemo", tmp_path / "out", to="lmforge", progress=False)
    # a layer more than the config says
    ranks = megatron_state(model, 1)
    ranks[0].update({k.replace("layers.1.", "layers.2."): v for k, v in ranks[0].items() if "layers.1." in k})
    write_members(tmp_path / "d.nemo", grid_members(model, {(0, 0): ranks[0]}, 1, 1))
    with pytest.raises(CheckpointError, match=r"hold 3 layers but model_config\.yaml says num_layers=2"):
        convert(tmp_path / "d.nemo", tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()
