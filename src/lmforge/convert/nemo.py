"""Import NeMo 1.x ``.nemo`` archives (GPT-3 style and Llama style decoders).

A ``.nemo`` file is a tar (optionally gzipped; an extracted folder works too) holding
``model_config.yaml`` and the weights in one of these layouts, all merged here into one model:

    model_weights.ckpt                                   one rank
    mp_rank_XX/model_weights.ckpt                        tensor parallel (TP) ranks
    tp_rank_XX_pp_rank_YYY/model_weights.ckpt            TP x pipeline parallel (PP) ranks
    model_weights/.metadata + __*_*.distcp               ``dist_ckpt_format: torch_dist`` (see :mod:`.dcp`)

Tokenizer files referenced as ``nemo:<name>`` in the config are carried out of the archive.

The weights are pickles. ``model_weights.ckpt`` files are read with ``torch.load(weights_only=True)``
(plus ``io.BytesIO``, the type of Transformer Engine's ``_extra_state``, which is dropped); anything else
is refused with a message rather than executed. A torch_dist ``.metadata`` is read through an allowlist
unpickler (:mod:`lmforge.convert.dcp`) and its data items with ``torch.load(weights_only=True)``.

Megatron-core names (``model.`` prefix), TP split dimension in brackets; pre-mcore names in parentheses
(``model.language_model.`` prefix, ``encoder.layers.{i}``), which map onto them one to one:
    embedding.word_embeddings.weight [0]          embedding.position_embeddings.weight
    decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight / _bias   (input_layernorm.*)
    decoder.layers.{i}.self_attention.linear_qkv.weight / bias [0]   (self_attention.query_key_value.*)
        per query group [q heads of the group; k; v]; each TP rank holds whole groups
    decoder.layers.{i}.self_attention.linear_proj.weight [1] / bias   (self_attention.dense.*)
    decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight / _bias       (post_attention_layernorm.*)
    decoder.layers.{i}.mlp.linear_fc1.weight / bias [0]               (mlp.dense_h_to_4h.*)
        gated (swiglu): each TP rank holds [gate_r; up_r]; pre-mcore non-"fast" swiglu keeps the up
        projection apart in mlp.dense_h_to_4h_2.*
    decoder.layers.{i}.mlp.linear_fc2.weight [1] / bias               (mlp.dense_4h_to_h.*)
    decoder.final_layernorm.weight / bias         output_layer.weight [0] (untied heads)
Without Transformer Engine, mcore names the norms ``decoder.layers.{i}.input_layernorm.*`` and
``pre_mlp_layernorm.*``; both spellings are read. Pipeline stages number their layers from 0; the
embedding comes from the first stage, the final norm and head from the last (a tied copy of the word
embeddings on the last stage is ignored). In torch_dist checkpoints the tensors are global (no TP
split; a gated fc1 is [all gate; all up]) and per-layer tensors are stacked under
``decoder.layers.<name>`` along a leading layer dimension.

Refused, with a message: zarr ``model_weights/`` folders, virtual-pipeline archives saved as
``model_weights.ckpt`` files, missing rank files, shapes that do not fit ``model_config.yaml``, and
tensor names outside the two layouts above (MoE, T5/BERT, adapters).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import torch

from lmforge.convert.plan import Source, Step, expected_shapes, to_our_tensors
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.config import ModelConfig
from lmforge.models.families import family_by_name, guess_family

__all__ = ["open_nemo", "nemo_model_config"]

_ACTIVATIONS = {"gelu": "gelu", "fast-gelu": "gelu", "approx-gelu": "gelu_tanh", "swiglu": "swiglu",
                "fast-swiglu": "swiglu", "geglu": "geglu", "fast-geglu": "geglu", "squared-relu": "squared_relu"}
_NORMS = {"layernorm": ("layernorm", 0.0), "rmsnorm": ("rmsnorm", 0.0), "layernorm1p": ("layernorm", 1.0)}
_HOW = ("restore the model in NeMo and save it again, or export it to HF format with NeMo's "
        "scripts/checkpoint_converters/convert_*_nemo_to_hf.py; then run lmforge convert on the result")


class _Archive:
    """Read members of a .nemo tar or an extracted folder by name (``./`` prefixes ignored)."""

    def __init__(self, path: Path):
        self.path = path
        self._tar = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")
                members = self._tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise CheckpointError(f"{path} is not a readable .nemo (tar) archive ({e}); was the copy interrupted?")
            links = [m.name for m in members if m.issym() or m.islnk()]
            if links:
                raise CheckpointError(f"{path} holds links ({', '.join(links[:3])}); a .nemo archive holds plain files "
                                      f"only and links are never followed: re-create the archive without them")
            self._members = {m.name.lstrip("./"): m for m in members if m.isfile()}
            self.names = sorted(self._members)
        else:
            self.names = sorted(self._folder_files(path))

    @staticmethod
    def _folder_files(path: Path) -> list[str]:
        """The files of an extracted archive, relative to it; a link inside is refused, never followed (its target
        could be any file of the machine, copied into the output)."""
        names = []
        for parent, dirs, files in os.walk(path):  # os.walk does not descend into linked folders
            for name in dirs + files:
                full = Path(parent) / name
                if full.is_symlink():
                    raise CheckpointError(f"{full} is a link (to {os.readlink(full)}); an extracted .nemo folder holds "
                                          f"plain files only and links are never followed: replace it with the file")
            names.extend(str((Path(parent) / name).relative_to(path)) for name in files)
        return names

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def open(self, name: str) -> Optional[BinaryIO]:
        """A seekable binary file for member ``name``, or None when it is absent."""
        if self._tar is not None:
            return self._tar.extractfile(self._members[name]) if name in self._members else None
        return open(self.path / name, "rb") if (self.path / name).is_file() else None


# ---------------------------------------------------------------------------------------------- config


def _raw_config(yaml_text: str, source: str) -> dict:
    """The model section of an imported model_config.yaml. Plain interpolations (``${.encoder_seq_length}``)
    are resolved; resolver calls (``${oc.env:HOME}``, ``${oc.decode:...}``) are refused, never run: an
    imported file must not read the environment or files of this machine (nor put them in an error)."""
    from omegaconf import OmegaConf

    calls = sorted(set(re.findall(r"\$\{\s*([A-Za-z_][\w.]*)\s*:", yaml_text)))
    if calls:
        raise ConfigError(f"{source}: model_config.yaml calls the resolver(s) {', '.join(calls)} (${{NAME:...}}); "
                          f"lmforge never runs resolvers of an imported config: replace them with plain values")
    try:
        raw = OmegaConf.to_container(OmegaConf.create(yaml_text), resolve=True)
    except Exception as e:
        raise ConfigError(f"{source}: cannot parse model_config.yaml ({e})") from None
    raw = raw.get("model", raw) if isinstance(raw, dict) else {}
    return raw if isinstance(raw, dict) else {}


def nemo_model_config(yaml_text: str, source: str, vocab_size: int) -> ModelConfig:
    """ModelConfig from NeMo's ``model_config.yaml`` (``vocab_size``: the padded embedding rows)."""
    raw = _raw_config(yaml_text, source)
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


# ---------------------------------------------------------------------------------------------- key names

_GLOBAL_KEYS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight")
_LAYER_KEYS = tuple(f"{m}.{k}" for m, ks in (
    ("self_attention.linear_qkv", ("weight", "bias", "layer_norm_weight", "layer_norm_bias")),
    ("self_attention.linear_proj", ("weight", "bias")),
    ("mlp.linear_fc1", ("weight", "bias", "layer_norm_weight", "layer_norm_bias", "up_weight", "up_bias")),
    ("mlp.linear_fc2", ("weight", "bias"))) for k in ks)
# other spellings -> the canonical (mcore + Transformer Engine) names above; "up_*": pre-mcore dense_h_to_4h_2
_RENAMES = [(re.compile(a), b) for a, b in (
    (r"^language_model\.embedding\.", "embedding."),
    (r"^language_model\.encoder\.final_layernorm\.", "decoder.final_layernorm."),
    (r"^language_model\.output_layer\.", "output_layer."),
    (r"^language_model\.encoder\.layers\.", "decoder.layers."),
    (r"\.self_attention\.query_key_value\.", ".self_attention.linear_qkv."),
    (r"\.self_attention\.dense\.", ".self_attention.linear_proj."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.linear_fc1."),
    (r"\.mlp\.dense_h_to_4h_2\.(weight|bias)$", r".mlp.linear_fc1.up_\1"),
    (r"\.mlp\.dense_4h_to_h\.", ".mlp.linear_fc2."),
    (r"\.(input_layernorm)\.(weight|bias)$", r".self_attention.linear_qkv.layer_norm_\2"),
    (r"\.(post_attention_layernorm|pre_mlp_layernorm)\.(weight|bias)$", r".mlp.linear_fc1.layer_norm_\2"))]
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _canonical(key: str) -> Optional[str]:
    """The canonical name of a stored key ("decoder.layers.{i}.<name>" keeps its stored layer number), "" for
    keys that carry no weights (``_extra_state``, rotary ``inv_freq``), None for names outside the layouts."""
    if key.endswith(("_extra_state", "inv_freq", "word_embeddings_for_head.weight")) or \
            key == "model.word_embeddings.weight":
        return ""  # no weights, or the last pipeline stage's copy of tied word embeddings (pre-mcore)
    if not key.startswith("model."):
        return None
    key = key[len("model."):]
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    m = _LAYER.match(key)
    return key if key in _GLOBAL_KEYS or (m and m.group(2) in _LAYER_KEYS) else None


def _unknown(path, keys: list[str]) -> CheckpointError:
    hint = ("; the archive looks like a virtual-pipeline save (model0., model_1., ...): save it again without "
            "virtual pipeline parallelism" if any(re.match(r"model_?\d", k) for k in keys) else "")
    return CheckpointError(f"{path}: tensors {keys[:3]} are not in a known NeMo GPT key layout (mcore "
                           f"model.decoder.layers.* or pre-mcore model.language_model.encoder.layers.* of a "
                           f"GPT/Llama decoder){hint}")


# ---------------------------------------------------------------------------------------------- weight layouts


class _RankWeights:
    """``model_weights.ckpt`` files of a TP x PP grid: canonical key (global layer numbers) -> TP pieces."""

    def __init__(self, archive: _Archive, files: dict[tuple[int, int], str], num_layers: int):
        path = archive.path
        tp = 1 + max(t for t, _ in files)
        pp = 1 + max(p for _, p in files)
        self.pieces: dict[str, list[torch.Tensor]] = {}
        offset = 0
        for p in range(pp):
            stage = [self._normalized(archive, files[(t, p)]) for t in range(tp)]
            counts = set()
            for t, sd in enumerate(stage):
                layers = {int(_LAYER.match(k).group(1)) for k in sd if _LAYER.match(k)}
                if layers and layers != set(range(max(layers) + 1)):
                    raise CheckpointError(f"{path}: {files[(t, p)]} holds layers {sorted(layers)}; the layers of a "
                                          f"pipeline stage must be numbered 0..n-1")
                counts.add(len(layers))
            if len(counts) != 1:
                raise CheckpointError(f"{path}: the tensor-parallel ranks of pipeline stage {p} hold different "
                                      f"numbers of layers ({sorted(counts)}); the archive is damaged")
            for key in list(stage[0]):
                missing = [files[(t, p)] for t in range(tp) if key not in stage[t]]
                if missing:
                    raise CheckpointError(f"{path}: tensor model.{key} is in {files[(0, p)]} but missing from "
                                          f"{missing[0]}; the archive is damaged")
                m = _LAYER.match(key)
                if m:
                    name = f"decoder.layers.{offset + int(m.group(1))}.{m.group(2)}"
                elif key.startswith("embedding.") and p > 0:
                    continue  # the last stage's copy of tied word embeddings
                else:
                    name = key
                self.pieces[name] = [sd.pop(key) for sd in stage]
            offset += counts.pop()
        if offset != num_layers:
            raise CheckpointError(f"{path}: the weights hold {offset} layers but model_config.yaml says "
                                  f"num_layers={num_layers}")

    @staticmethod
    def _normalized(archive: _Archive, name: str) -> dict[str, torch.Tensor]:
        try:
            with torch.serialization.safe_globals([io.BytesIO]):  # Transformer Engine's _extra_state
                obj = torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{archive.path}: {name} cannot be loaded with torch.load(weights_only=True) ({e}); "
                                  f"lmforge does not unpickle arbitrary objects. Re-save the weights as plain tensors "
                                  f"(a state dict) or convert the model to HF format with NeMo's own script") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{archive.path}: {name} does not hold a state dict")
        out, unknown = {}, []
        for key, value in obj.items():
            canon = _canonical(str(key))
            if canon is None:
                unknown.append(str(key))
            elif canon and isinstance(value, torch.Tensor):
                out[canon] = value
        if unknown:
            raise _unknown(f"{archive.path}/{name}", unknown)
        for key in [k for k in out if k.endswith(".mlp.linear_fc1.up_weight") or k.endswith(".mlp.linear_fc1.up_bias")]:
            fused = key.replace(".up_", ".")  # pre-mcore non-fast swiglu: this rank's [gate_r; up_r]
            if fused not in out:
                raise CheckpointError(f"{archive.path}/{name}: {key} has no matching dense_h_to_4h tensor")
            out[fused] = torch.cat([out[fused], out.pop(key)], dim=0)
        return out

    def take(self, key: str) -> Optional[list[torch.Tensor]]:
        return self.pieces.pop(key, None)

    def left(self) -> list[str]:
        return sorted(self.pieces)


class _DcpWeights:
    """A torch_dist ``model_weights/`` folder: canonical key -> [the global tensor] (TP pieces of one)."""

    def __init__(self, archive: _Archive, num_layers: int):
        from lmforge.convert.dcp import DcpCheckpoint

        folder = "model_weights"
        self.dcp = DcpCheckpoint(lambda n: archive.read(f"{folder}/{n}"), lambda n: archive.open(f"{folder}/{n}"),
                                 f"{archive.path}/{folder}")
        self.where: dict[str, tuple[str, Optional[int]]] = {}
        unknown = []
        for fqn, entry in self.dcp.entries.items():
            m = re.match(r"^model\.decoder\.layers\.(\D.*)$", fqn)  # stacked: (num_layers, ...)
            if m:
                if entry.shape[:1] != (num_layers,):
                    raise CheckpointError(f"{self.dcp.where}: {fqn} stacks {entry.shape[:1]} layers but "
                                          f"model_config.yaml says num_layers={num_layers}")
                names = [(_canonical(f"model.decoder.layers.{i}.{m.group(1)}"), i) for i in range(num_layers)]
            else:
                names = [(_canonical(fqn), None)]
            for canon, index in names:
                if canon is None:
                    unknown.append(fqn)
                    break
                if canon:
                    self.where[canon] = (fqn, index)
        if unknown:
            raise _unknown(self.dcp.where, unknown)

    def take(self, key: str) -> Optional[list[torch.Tensor]]:
        if key not in self.where:
            return None
        fqn, index = self.where.pop(key)
        return [self.dcp.get(fqn, index)]

    def left(self) -> list[str]:
        return sorted(self.where)


def _rank_grid(archive: _Archive, raw: dict) -> dict[tuple[int, int], str]:
    """(tp, pp) -> member name of each ``model_weights.ckpt``; CheckpointError for a missing rank."""
    path = archive.path
    grid = {}
    for name in archive.names:
        if name == "model_weights.ckpt":
            grid[(0, 0)] = name
        elif m := re.fullmatch(r"mp_rank_(\d+)/model_weights\.ckpt", name):
            grid[(int(m.group(1)), 0)] = name
        elif m := re.fullmatch(r"tp_rank_(\d+)_pp_rank_(\d+)/model_weights\.ckpt", name):
            grid[(int(m.group(1)), int(m.group(2)))] = name
    if not grid:
        raise CheckpointError(f"{path}: no model_weights.ckpt, mp_rank_XX/, tp_rank_XX_pp_rank_YYY/ or model_weights/ "
                              f"weights inside; members: {', '.join(archive.names[:5])}")
    tp = max(int(raw.get("tensor_model_parallel_size") or 1), 1 + max(t for t, _ in grid))
    pp = max(int(raw.get("pipeline_model_parallel_size") or 1), 1 + max(p for _, p in grid))
    if int(raw.get("virtual_pipeline_model_parallel_size") or 1) > 1:
        raise ConfigError(f"{path}: virtual_pipeline_model_parallel_size="
                          f"{raw['virtual_pipeline_model_parallel_size']} archives are not supported; {_HOW}")
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in grid:
                want = (f"tp_rank_{t:02d}_pp_rank_{p:03d}" if pp > 1 else f"mp_rank_{t:02d}") + "/model_weights.ckpt"
                raise CheckpointError(f"{path}: the weights of rank {want} are missing (tensor parallel {tp} x "
                                      f"pipeline parallel {pp}); was the archive copied whole?")
    return grid


# ---------------------------------------------------------------------------------------------- the source


def open_nemo(path: str | os.PathLike, family: Optional[str] = None):
    """A conversion :class:`~lmforge.convert.plan.Source` over a NeMo 1.x archive (see the module doc).

    ``model_weights.ckpt`` ranks are all loaded (one copy of the model, in their dtype) and each merged
    lmforge tensor drops its rank pieces as it goes; a torch_dist folder is read one tensor (one layer of a
    stacked tensor) at a time.
    """
    path = Path(path)
    archive = _Archive(path)
    if "model_config.yaml" not in archive.names:
        raise CheckpointError(f"{path}: no model_config.yaml inside; this is not a NeMo 1.x .nemo archive")
    yaml_text = archive.read("model_config.yaml").decode("utf-8")
    raw = _raw_config(yaml_text, f"{path}/model_config.yaml")
    if not raw.get("num_layers"):
        raise ConfigError(f"{path}/model_config.yaml: key 'num_layers' is missing")
    num_layers = int(raw["num_layers"])
    dist = [n for n in archive.names if n.startswith("model_weights/")]
    if "model_weights/.metadata" in dist:
        weights = _DcpWeights(archive, num_layers)
        emb = weights.where.get("embedding.word_embeddings.weight")
        vocab = weights.dcp.entries[emb[0]].shape[0] if emb else None
        total = weights.dcp.total_bytes()
    elif dist:
        raise CheckpointError(f"{path}: the weights are a sharded distributed-checkpoint folder (model_weights/) "
                              f"without a torch_dist .metadata index (e.g. zarr), which lmforge does not read. "
                              f"Convert it with NeMo first: save it with dist_ckpt_format=torch_dist or as a single "
                              f"model_weights.ckpt, or export it to HF format with NeMo's "
                              f"scripts/checkpoint_converters/convert_*_nemo_to_hf.py")
    else:
        weights = _RankWeights(archive, _rank_grid(archive, raw), num_layers)
        emb = weights.pieces.get("embedding.word_embeddings.weight")
        vocab = sum(p.shape[0] for p in emb) if emb else None
        total = sum(t.numel() * t.element_size() for ps in weights.pieces.values() for t in ps)
    if vocab is None:
        raise CheckpointError(f"{path}: no model.embedding.word_embeddings.weight (or pre-mcore "
                              f"model.language_model.embedding.word_embeddings.weight) in the weights")
    cfg = nemo_model_config(yaml_text, f"{path}/model_config.yaml", vocab)
    fam = family_by_name(family) if family else guess_family(cfg)

    def take(key: str, dim: Optional[int]) -> list[torch.Tensor]:
        parts = weights.take(key)
        if parts is None:
            raise CheckpointError(f"{path}: tensor model.{key} is missing; the weights do not match model_config.yaml")
        shapes = [tuple(p.shape[:dim]) + tuple(p.shape[dim + 1:]) if dim is not None else tuple(p.shape)
                  for p in parts]
        if len(set(shapes)) > 1 or (dim is not None and any(p.dim() <= dim for p in parts)):
            raise CheckpointError(f"{path}: tensor model.{key} has shapes {[tuple(p.shape) for p in parts]} on the "
                                  f"tensor-parallel ranks, which do not fit together")
        return parts

    def merged(key: str, dim: Optional[int]) -> torch.Tensor:
        parts = take(key, dim)
        return parts[0] if dim is None else torch.cat(parts, dim=dim)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        shapes = expected_shapes(cfg)
        yield "embed_tokens.weight", merged("embedding.word_embeddings.weight", 0)
        if cfg.position_embedding_type == "learned_absolute":
            yield "embed_positions.weight", merged("embedding.position_embeddings.weight", None)
        for i in range(cfg.num_layers):
            L, N = f"layers.{i}", f"decoder.layers.{i}"
            qkv_names = [f"{L}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            kinds = ["weight"] + (["bias"] if f"{qkv_names[0]}.bias" in shapes else [])
            for kind in kinds:
                fused = merged(f"{N}.self_attention.linear_qkv.{kind}", 0)
                if fused.shape[0] != sum(shapes[f"{n}.{kind}"][0] for n in qkv_names):
                    raise CheckpointError(f"{path}: tensor model.{N}.self_attention.linear_qkv.{kind} has shape "
                                          f"{tuple(fused.shape)}, which does not fit the heads in model_config.yaml")
                step = Step("grouped_qkv", [f"{n}.{kind}" for n in qkv_names], [])
                yield from zip(step.ours, to_our_tensors(step, [fused], cfg, shapes))
            yield f"{L}.self_attn.o_proj.weight", merged(f"{N}.self_attention.linear_proj.weight", 1)
            if f"{L}.self_attn.o_proj.bias" in shapes:
                yield f"{L}.self_attn.o_proj.bias", merged(f"{N}.self_attention.linear_proj.bias", None)
            for ours, theirs in (("input_layernorm", "self_attention.linear_qkv"),
                                 ("post_attention_layernorm", "mlp.linear_fc1")):
                yield f"{L}.{ours}.weight", merged(f"{N}.{theirs}.layer_norm_weight", None)
                if f"{L}.{ours}.bias" in shapes:
                    yield f"{L}.{ours}.bias", merged(f"{N}.{theirs}.layer_norm_bias", None)
            for kind in kinds:
                parts = take(f"{N}.mlp.linear_fc1.{kind}", 0)
                if cfg.gated:  # each piece: [gate_r; up_r]
                    halves = [p.chunk(2, dim=0) for p in parts]
                    yield f"{L}.mlp.gate_proj.{kind}", torch.cat([h[0] for h in halves], dim=0)
                    yield f"{L}.mlp.up_proj.{kind}", torch.cat([h[1] for h in halves], dim=0)
                else:
                    yield f"{L}.mlp.up_proj.{kind}", torch.cat(parts, dim=0)
            yield f"{L}.mlp.down_proj.weight", merged(f"{N}.mlp.linear_fc2.weight", 1)
            if f"{L}.mlp.down_proj.bias" in shapes:
                yield f"{L}.mlp.down_proj.bias", merged(f"{N}.mlp.linear_fc2.bias", None)
        yield "norm.weight", merged("decoder.final_layernorm.weight", None)
        if "norm.bias" in shapes:
            yield "norm.bias", merged("decoder.final_layernorm.bias", None)
        if not cfg.share_embeddings_and_output_weights:
            yield "lm_head.weight", merged("output_layer.weight", 0)
        weights.take("output_layer.weight")  # tied heads: a stored copy is not needed
        left = weights.left()
        if left:
            raise CheckpointError(f"{path}: tensors {['model.' + k for k in left[:3]]} are not used by the model that "
                                  f"model_config.yaml describes (does num_layers, bias or position_embedding_type "
                                  f"match the weights?)")

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
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
