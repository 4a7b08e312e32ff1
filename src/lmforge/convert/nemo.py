"""Import NeMo 1.x ``.nemo`` archives (Megatron-core GPT models: GPT-3 style and Llama style).

A ``.nemo`` file is a tar (optionally gzipped; an extracted folder works too) holding
``model_config.yaml`` and the weights: ``model_weights.ckpt`` for one tensor-parallel rank, or
``mp_rank_XX/model_weights.ckpt`` (``tp_rank_XX_pp_rank_000/...``) for several, which are merged here.
Tokenizer files referenced as ``nemo:<name>`` in the config are carried out of the archive.

The weights are pickles. They are read with ``torch.load(weights_only=True)`` only: plain tensors load,
anything else (arbitrary objects) is refused with a message rather than executed.

Megatron-core names (``model.`` prefix), tensor-parallel split dimension in brackets:
    embedding.word_embeddings.weight [0]            embedding.position_embeddings.weight
    decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight / layer_norm_bias   (input norm)
    decoder.layers.{i}.self_attention.linear_qkv.weight / bias [0]   q, k, v per query group
    decoder.layers.{i}.self_attention.linear_proj.weight [1] / bias
    decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight / layer_norm_bias             (pre-MLP norm)
    decoder.layers.{i}.mlp.linear_fc1.weight / bias [0]   gated: each rank holds [gate_r; up_r]
    decoder.layers.{i}.mlp.linear_fc2.weight [1] / bias
    decoder.final_layernorm.weight / bias           output_layer.weight [0] (untied heads)
Refused with a message saying how to convert: the distributed ``model_weights/`` layout (torch_dist:
its ``model_weights/.metadata`` index is a pickle, never loaded here; zarr). Not yet: pipeline-parallel
archives and the pre-mcore ``language_model.encoder`` names.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.config import ModelConfig
from lmforge.models.families import family_by_name, guess_family

__all__ = ["open_nemo", "nemo_model_config"]

_ACTIVATIONS = {"gelu": "gelu", "fast-gelu": "gelu", "approx-gelu": "gelu_tanh", "swiglu": "swiglu",
                "fast-swiglu": "swiglu", "geglu": "geglu", "fast-geglu": "geglu", "squared-relu": "squared_relu"}
_NORMS = {"layernorm": ("layernorm", 0.0), "rmsnorm": ("rmsnorm", 0.0), "layernorm1p": ("layernorm", 1.0)}


class _Archive:
    """Read members of a .nemo tar or an extracted folder by name (``./`` prefixes ignored)."""

    def __init__(self, path: Path):
        self.path = path
        self._tar = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")
                self._members = {m.name.lstrip("./"): m for m in self._tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as e:
                raise CheckpointError(f"{path} is not a readable .nemo (tar) archive ({e}); was the copy interrupted?")
            self.names = sorted(self._members)
        else:
            self.names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self._tar is not None:
            return self._tar.extractfile(self._members[name]).read()
        return (self.path / name).read_bytes()


def nemo_model_config(yaml_text: str, source: str, vocab_size: int) -> ModelConfig:
    """ModelConfig from NeMo's ``model_config.yaml`` (``vocab_size``: the padded embedding rows)."""
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.create(yaml_text), resolve=True)
    except Exception as e:
        raise ConfigError(f"{source}: cannot parse model_config.yaml ({e})") from None
    raw = raw.get("model", raw) if isinstance(raw, dict) else {}
    if int(raw.get("pipeline_model_parallel_size", 1) or 1) != 1:
        raise ConfigError(f"{source}: pipeline_model_parallel_size={raw['pipeline_model_parallel_size']} archives are "
                          f"not supported yet; export with pipeline parallel size 1")
    act = str(raw.get("activation", "gelu"))
    norm = str(raw.get("normalization", "layernorm"))
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: activation={act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    if norm not in _NORMS:
        raise ConfigError(f"{source}: normalization={norm!r} is not supported; supported: {', '.join(_NORMS)}")
    pos = str(raw.get("position_embedding_type", "learned_absolute"))
    if pos not in ("learned_absolute", "rope"):
        raise ConfigError(f"{source}: position_embedding_type={pos!r} is not supported; use learned_absolute or rope")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if raw.get(key) is None:
            raise ConfigError(f"{source}: key {key!r} is missing from model_config.yaml")
    normalization, offset = _NORMS[norm]
    scaling = raw.get("seq_len_interpolation_factor")
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=int(raw["hidden_size"]), num_layers=int(raw["num_layers"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        num_query_groups=raw.get("num_query_groups") or None, ffn_hidden_size=int(raw["ffn_hidden_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings") or raw.get("encoder_seq_length") or 2048),
        kv_channels=raw.get("kv_channels") or None, normalization=normalization, norm_offset=offset,
        layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)), activation=_ACTIVATIONS[act],
        bias=bool(raw.get("bias", True)), position_embedding_type=pos,
        rotary_base=float(raw.get("rotary_base", 10000.0)), rotary_percent=float(raw.get("rotary_percentage", 1.0)),
        rope_scaling=None if not scaling else {"rope_type": "linear", "factor": float(scaling)},
        share_embeddings_and_output_weights=bool(raw.get("share_embeddings_and_output_weights", True)),
        init_method_std=float(raw.get("init_method_std", 0.02)))


def _load_rank(archive: _Archive, name: str) -> dict:
    try:
        obj = torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{archive.path}: {name} cannot be loaded with torch.load(weights_only=True) ({e}); "
                              f"lmforge does not unpickle arbitrary objects. Re-save the weights as plain tensors "
                              f"(a state dict) or convert the model to HF format with NeMo's own script") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{archive.path}: {name} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _rank_files(archive: _Archive) -> list[str]:
    single = [n for n in archive.names if n == "model_weights.ckpt"]
    if single:
        return single
    ranked = sorted(n for n in archive.names if re.fullmatch(r"(mp_rank_\d+|tp_rank_\d+_pp_rank_000)/model_weights\.ckpt", n))
    if ranked:
        return ranked
    sharded = [n for n in archive.names if n.startswith("model_weights/")]
    if sharded:
        how = ("Convert it with NeMo first: restore the model in NeMo and save it as a .nemo with a single "
               "model_weights.ckpt (non-distributed checkpoint), or export it to HF format with NeMo's "
               "scripts/checkpoint_converters/convert_*_nemo_to_hf.py; then run lmforge convert on the result")
        if "model_weights/.metadata" in sharded:
            raise CheckpointError(f"{archive.path}: the weights are a sharded torch.distributed.checkpoint (torch_dist) "
                                  f"folder; its index model_weights/.metadata is a Python pickle, which lmforge does not "
                                  f"load (unpickling can run arbitrary code). {how}")
        raise CheckpointError(f"{archive.path}: the weights are a sharded distributed-checkpoint folder (model_weights/, "
                              f"e.g. zarr), which lmforge does not read. {how}")
    raise CheckpointError(f"{archive.path}: no model_weights.ckpt or mp_rank_XX/model_weights.ckpt inside; "
                          f"members: {', '.join(archive.names[:5])}")


def open_nemo(path: str | os.PathLike, family: Optional[str] = None):
    """A conversion :class:`~lmforge.convert.hf.Source` over a NeMo 1.x archive (see the module doc).

    Tensor-parallel ranks are all loaded (one copy of the model, in their dtype), then each merged
    lmforge tensor is produced and its rank pieces are dropped as it goes.
    """
    from lmforge.convert.hf import Source

    path = Path(path)
    archive = _Archive(path)
    if "model_config.yaml" not in archive.names:
        raise CheckpointError(f"{path}: no model_config.yaml inside; this is not a NeMo 1.x .nemo archive")
    yaml_text = archive.read("model_config.yaml").decode("utf-8")
    ranks = [_load_rank(archive, name) for name in _rank_files(archive)]
    emb = "model.embedding.word_embeddings.weight"
    if emb not in ranks[0]:
        legacy = any(".language_model." in k for k in ranks[0])
        raise CheckpointError(f"{path}: no {emb}" + ("; this archive uses the pre-mcore language_model.* names, which "
                                                       "are not supported yet" if legacy else ""))
    vocab = sum(r[emb].shape[0] for r in ranks)
    cfg = nemo_model_config(yaml_text, f"{path}/model_config.yaml", vocab)
    fam = family_by_name(family) if family else guess_family(cfg)
    total = sum(t.numel() * t.element_size() for r in ranks for t in r.values())

    def take(key: str, dim: Optional[int]) -> list[torch.Tensor]:
        parts = []
        for i, r in enumerate(ranks):
            if key not in r:
                raise CheckpointError(f"{path}: tensor {key!r} is missing from rank {i}; the archive does not match "
                                      f"its model_config.yaml")
            parts.append(r.pop(key))
        return parts

    def merged(key: str, dim: Optional[int]) -> torch.Tensor:
        parts = take(key, dim)
        return parts[0] if dim is None else torch.cat(parts, dim=dim)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        from lmforge.convert.hf import Step, expected_shapes, to_our_tensors

        shapes = expected_shapes(cfg)
        m = "model."
        yield "embed_tokens.weight", merged(m + "embedding.word_embeddings.weight", 0)
        if cfg.position_embedding_type == "learned_absolute":
            yield "embed_positions.weight", merged(m + "embedding.position_embeddings.weight", None)
        for i in range(cfg.num_layers):
            L, N = f"layers.{i}", f"{m}decoder.layers.{i}"
            qkv_names = [f"{L}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            kinds = ["weight"] + (["bias"] if f"{qkv_names[0]}.bias" in shapes else [])
            for kind in kinds:
                fused = merged(f"{N}.self_attention.linear_qkv.{kind}", 0)
                step = Step("grouped_qkv", [f"{n}.{kind}" for n in qkv_names], [])
                yield from zip(step.ours, to_our_tensors(step, [fused], cfg, shapes))
            yield f"{L}.self_attn.o_proj.weight", merged(f"{N}.self_attention.linear_proj.weight", 1)
            if f"{L}.self_attn.o_proj.bias" in shapes:
                yield f"{L}.self_attn.o_proj.bias", merged(f"{N}.self_attention.linear_proj.bias", None)
            for ours, theirs in (("input_layernorm", "self_attention.linear_qkv"), ("post_attention_layernorm", "mlp.linear_fc1")):
                yield f"{L}.{ours}.weight", merged(f"{N}.{theirs}.layer_norm_weight", None)
                if f"{L}.{ours}.bias" in shapes:
                    yield f"{L}.{ours}.bias", merged(f"{N}.{theirs}.layer_norm_bias", None)
            for kind in kinds:
                parts = take(f"{N}.mlp.linear_fc1.{kind}", 0)
                if cfg.gated:  # each rank: [gate_r; up_r]
                    halves = [p.chunk(2, dim=0) for p in parts]
                    yield f"{L}.mlp.gate_proj.{kind}", torch.cat([h[0] for h in halves], dim=0)
                    yield f"{L}.mlp.up_proj.{kind}", torch.cat([h[1] for h in halves], dim=0)
                else:
                    yield f"{L}.mlp.up_proj.{kind}", torch.cat(parts, dim=0)
            yield f"{L}.mlp.down_proj.weight", merged(f"{N}.mlp.linear_fc2.weight", 1)
            if f"{L}.mlp.down_proj.bias" in shapes:
                yield f"{L}.mlp.down_proj.bias", merged(f"{N}.mlp.linear_fc2.bias", None)
        yield "norm.weight", merged(m + "decoder.final_layernorm.weight", None)
        if "norm.bias" in shapes:
            yield "norm.bias", merged(m + "decoder.final_layernorm.bias", None)
        if not cfg.share_embeddings_and_output_weights:
            yield "lm_head.weight", merged(m + "output_layer.weight", 0)

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        from lmforge.convert.hf import expected_shapes

        shapes = expected_shapes(cfg)
        for name, tensor in tensors():
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise CheckpointError(f"{path}: tensor {name!r} merged to shape {tuple(tensor.shape)} but "
                                      f"model_config.yaml implies {tuple(shapes[name])}")
            yield name, tensor

    tokenizer_files = {}
    for name in archive.names:  # NeMo stores tokenizer artifacts as <hash>_tokenizer.model, <hash>_vocab.json, ...
        for wanted in ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            if name == wanted or name.endswith("_" + wanted):
                tokenizer_files[wanted] = archive.read(name)
    return Source(cfg, fam, checked, total, {}, None, tokenizer_files)
