"""``lmforge export MODEL OUT --format hf|gguf|nemo``: a trained model in the format another tool loads.

MODEL is anything ``lmforge convert`` reads: an lmforge checkpoint or run folder (its newest
checkpoint), an HF model folder, or a NeMo 1.x ``.nemo`` archive.

* ``hf``: the Hugging Face folder ``lmforge convert MODEL OUT --to hf`` writes (config.json, safetensors,
  tokenizer files), which transformers, vLLM and TensorRT-LLM's checkpoint converters load.
* ``gguf``: one ``.gguf`` file for llama.cpp / ollama, written with the ``gguf`` package (``pip install
  'lmforge[gguf]'``): llama.cpp's tensor names and ``llama.*`` metadata for Llama-family models (llama,
  mistral without a sliding window), weights in f32 or f16 (1-D norms stay f32, as llama.cpp's own
  converter keeps them), and the model's byte-level BPE tokenizer (``tokenizer.json``) as
  ``tokenizer.ggml.*``. Queries and keys are permuted from the "rotate half" RoPE layout (HF, lmforge)
  into llama.cpp's interleaved one, as llama.cpp's ``convert_hf_to_gguf.py`` does. Other families and
  tokenizers are refused with a message (export ``hf`` and use llama.cpp's converter). The gguf package's
  writer holds every tensor until the file is written: memory is about the model's size in the output dtype.
* ``nemo``: a NeMo 1.x archive (an uncompressed tar) holding ``model_config.yaml`` (the ``model:``
  section: sizes, activation, normalization, positions, ``mcore_gpt: true``, the tokenizer) and
  ``model_weights.ckpt`` under Megatron-core names (``model.decoder.layers.{i}.self_attention.linear_qkv.
  weight``, ...; tensor and pipeline parallel size 1). NeMo's format is a ``torch.save`` pickle: lmforge
  writes a plain dict of tensors (and ``None`` for Transformer Engine's ``_extra_state`` entries), which
  ``torch.load(weights_only=True)`` reads, so lmforge's own import (``lmforge convert OUT.nemo``) never
  unpickles anything else. A model whose config NeMo's ``model_config.yaml`` cannot express (per-projection
  biases, soft-capping, sliding windows, MoE, ...) is refused, naming the setting.

The output appears whole or not at all; an existing output is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Optional

import torch

from lmforge.errors import CheckpointError, ConfigError, UserError

FORMATS = ("hf", "gguf", "nemo")
GGUF_DTYPES = {"float32": torch.float32, "float16": torch.float16}
GGUF_FAMILIES = ("llama", "mistral")


def export(model: str | os.PathLike, out: str | os.PathLike, fmt: str, dtype: Optional[str] = None,
           family: Optional[str] = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the model at ``model`` to ``out`` in format ``fmt`` (see the module doc).

    Args:
        dtype: ``hf``/``nemo``: cast floating tensors (float32, bfloat16, float16; default: keep);
            ``gguf``: float32 or float16 (default float16, llama.cpp's own default).
        family: ``hf``: the HF family to write (default: recorded or guessed).

    Returns:
        A summary: format, output, family, tensors.

    Raises:
        UserError subclasses: an unknown format, a family or config the format cannot hold, an existing
            output without ``overwrite``; nothing is written then.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "hf":
        from lmforge.convert.hf import convert

        summary = convert(model, out, "hf", family=family, dtype=dtype, overwrite=overwrite, progress=progress)
        return {"format": "hf", "out": str(out), "family": summary["family"], "tensors": summary["tensors"]}
    if family is not None:
        raise ConfigError(f"--family applies to --format hf; --format {fmt} writes its own layout (remove --family)")
    out = Path(out)
    _check_file_output(out, Path(model), overwrite, ".gguf" if fmt == "gguf" else ".nemo")
    if fmt == "gguf":
        return export_gguf(model, out, dtype or "float16")
    return export_nemo(model, out, dtype)


def _check_file_output(out: Path, model: Path, overwrite: bool, suffix: str) -> None:
    if out.suffix != suffix:
        raise ConfigError(f"{out}: a {suffix[1:]} export is one file; name it ...{suffix}")
    if out.resolve() == model.resolve():
        raise ConfigError(f"the output {out} is the model itself; choose another file name")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out} already exists; choose a new file name or pass --overwrite")
        if out.is_symlink() or not out.is_file():
            raise CheckpointError(f"{out} is not a file export wrote; --overwrite replaces only such a file")


def _source(model):
    from lmforge.convert.hf import _checkpoint_of_run, open_source

    return open_source(_checkpoint_of_run(model))


def _tokenizer_bytes(source, name: str) -> Optional[bytes]:
    if name in source.tokenizer_files:
        return source.tokenizer_files[name]
    if source.carry_from is not None and (Path(source.carry_from) / name).is_file():
        return (Path(source.carry_from) / name).read_bytes()
    return None


# ---------------------------------------------------------------------------------------------- gguf

# lmforge tensor name (per layer: "{i}" is the layer) -> gguf.MODEL_TENSOR member name
_GGUF_TENSORS = {
    "embed_tokens.weight": "TOKEN_EMBD",
    "norm.weight": "OUTPUT_NORM",
    "lm_head.weight": "OUTPUT",
    "layers.{i}.input_layernorm.weight": "ATTN_NORM",
    "layers.{i}.self_attn.q_proj.weight": "ATTN_Q",
    "layers.{i}.self_attn.k_proj.weight": "ATTN_K",
    "layers.{i}.self_attn.v_proj.weight": "ATTN_V",
    "layers.{i}.self_attn.o_proj.weight": "ATTN_OUT",
    "layers.{i}.post_attention_layernorm.weight": "FFN_NORM",
    "layers.{i}.mlp.gate_proj.weight": "FFN_GATE",
    "layers.{i}.mlp.up_proj.weight": "FFN_UP",
    "layers.{i}.mlp.down_proj.weight": "FFN_DOWN",
}


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name of an lmforge tensor of a Llama model (``layers.3.self_attn.q_proj.weight`` ->
    ``blk.3.attn_q.weight``), from the ``gguf`` package's own tables."""
    import re

    import gguf

    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    key = f"layers.{{i}}.{m.group(2)}" if m else name
    if key not in _GGUF_TENSORS:
        raise CheckpointError(f"tensor {name!r} has no place in a llama.cpp Llama model")
    base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, _GGUF_TENSORS[key])]
    return (base.format(bid=int(m.group(1))) if m else base) + ".weight"


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a query/key projection from the "rotate half" layout to llama.cpp's interleaved one
    (``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py); ``n_head``: heads of that projection."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`rope_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_refusal(cfg, family: str) -> Optional[str]:
    """Why this model is not a llama.cpp ``llama`` model (None: it is)."""
    if family not in GGUF_FAMILIES:
        return f"the model is of the {family} family"
    wanted = {"normalization": "rmsnorm", "activation": "swiglu", "bias": False, "position_embedding_type": "rope",
              "norm_offset": 0.0, "rotary_percent": 1.0, "qkv_bias": (None, False), "layernorm_bias": (None, False),
              "embedding_multiplier": None, "attention_scale": None, "attn_logit_softcapping": None,
              "final_logit_softcapping": None, "sliding_window": None, "layer_types": None, "sandwich_norm": False,
              "parallel_attn_mlp": False, "shared_input_norm": False, "num_moe_experts": None, "rope_scaling": None,
              "normalize_output_head": False}
    for key, want in wanted.items():
        value = getattr(cfg, key)
        if value not in (want if isinstance(want, tuple) else (want,)):
            return f"its config has {key}={value!r}"
    if cfg.kv_channels not in (None, cfg.hidden_size // cfg.num_attention_heads):
        return f"its config has kv_channels={cfg.kv_channels} (not hidden_size / heads)"
    return None


def _gguf_tokenizer(source, model) -> dict:
    """tokens, token types, merges, special ids of a byte-level BPE ``tokenizer.json`` (GPT-2 style)."""
    import gguf

    data = _tokenizer_bytes(source, "tokenizer.json")
    if data is None:
        raise ConfigError(f"{model}: no tokenizer.json beside the weights; a GGUF file carries the tokenizer "
                          f"(llama.cpp needs it): put the model's tokenizer.json in the folder")
    tok = json.loads(data)
    bpe = tok.get("model") or {}
    pre = tok.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or not any(p.get("type") == "ByteLevel" for p in pres):
        raise ConfigError(f"{model}: the tokenizer is not a byte-level BPE (GPT-2 style: model BPE, pre-tokenizer "
                          f"ByteLevel); GGUF export writes that kind only: export --format hf and use llama.cpp's "
                          f"convert_hf_to_gguf.py")
    vocab: dict[str, int] = dict(bpe.get("vocab") or {})
    special = {}
    for added in tok.get("added_tokens") or []:
        vocab[added["content"]] = int(added["id"])
        if added.get("special"):
            special[int(added["id"])] = added["content"]
    n = source.cfg.vocab_size
    if max(vocab.values(), default=-1) >= n:
        raise ConfigError(f"{model}: the tokenizer has ids up to {max(vocab.values())} but the model only "
                          f"{n} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
    extra = source.hf_extra
    eos = extra.get("eos_token_id")
    if eos is None and special:
        eos = min(special)
    bos = extra.get("bos_token_id", eos)
    return {"tokens": tokens, "types": types, "merges": merges, "bos": bos, "eos": eos}


def export_gguf(model, out: Path, dtype: str = "float16") -> dict:
    """Write a llama.cpp GGUF file of a Llama-family model (see the module doc)."""
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'lmforge[gguf]' (or pip install gguf)") \
            from None
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype {dtype}: a GGUF export writes float32 or float16")
    from lmforge.io import atomic_path

    source = _source(model)
    cfg = source.cfg
    why = _gguf_refusal(cfg, source.family.name)
    if why:
        raise ConfigError(f"{model}: --format gguf writes llama.cpp's llama architecture ({', '.join(GGUF_FAMILIES)} "
                          f"families: RMSNorm, SwiGLU, RoPE, no biases), but {why}; export --format hf and use "
                          f"llama.cpp's convert_hf_to_gguf.py if it supports the model")
    tok = _gguf_tokenizer(source, model)
    cast = GGUF_DTYPES[dtype]
    file_type = gguf.LlamaFileType.ALL_F32 if cast == torch.float32 else gguf.LlamaFileType.MOSTLY_F16
    n_tensors = 0
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(Path(model).name or "lmforge model")
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_layers)
        writer.add_feed_forward_length(cfg.ffn_hidden_size)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_query_groups)
        writer.add_layer_norm_rms_eps(cfg.layernorm_epsilon)
        writer.add_rope_freq_base(cfg.rotary_base)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        if tok["bos"] is not None:
            writer.add_bos_token_id(int(tok["bos"]))
        if tok["eos"] is not None:
            writer.add_eos_token_id(int(tok["eos"]))
        writer.add_add_bos_token(False)
        for name, tensor in source.tensors():
            tensor = tensor.detach().to(torch.float32)
            if name.endswith("self_attn.q_proj.weight"):
                tensor = rope_permute(tensor, cfg.num_attention_heads)
            elif name.endswith("self_attn.k_proj.weight"):
                tensor = rope_permute(tensor, cfg.num_query_groups)
            if tensor.dim() > 1:
                tensor = tensor.to(cast)
            writer.add_tensor(gguf_tensor_name(name), tensor.contiguous().numpy())
            n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"format": "gguf", "out": str(out), "family": source.family.name, "tensors": n_tensors, "dtype": dtype}


# ---------------------------------------------------------------------------------------------- nemo

_NEMO_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "approx-gelu", "swiglu": "fast-swiglu", "geglu": "fast-geglu",
                     "squared_relu": "squared-relu"}
# fields of ModelConfig that model_config.yaml does not carry and that do not change the weights' meaning
_NEMO_IGNORED = ("hidden_dropout", "attention_dropout", "init_method_std")


def nemo_config_yaml(cfg, tokenizer: dict) -> str:
    """NeMo's ``model_config.yaml`` for ``cfg`` (checked: reading it back gives the same model)."""
    import yaml

    from lmforge.convert.nemo import nemo_model_config

    if cfg.activation not in _NEMO_ACTIVATIONS:
        raise ConfigError(f"activation={cfg.activation!r} has no NeMo name; NeMo's are {', '.join(_NEMO_ACTIVATIONS)}")
    if cfg.normalization == "rmsnorm" and cfg.norm_offset == 0.0:
        norm = "rmsnorm"
    elif cfg.normalization == "layernorm" and cfg.norm_offset in (0.0, 1.0):
        norm = "layernorm1p" if cfg.norm_offset == 1.0 else "layernorm"
    else:
        raise ConfigError(f"normalization={cfg.normalization} with norm_offset={cfg.norm_offset} has no NeMo name")
    scaling = cfg.rope_scaling
    if scaling and (scaling.get("rope_type") or scaling.get("type")) != "linear":
        raise ConfigError(f"rope_scaling={scaling} has no NeMo form (NeMo 1.x: linear, seq_len_interpolation_factor)")
    model = {
        "mcore_gpt": True, "precision": "bf16", "micro_batch_size": 1, "global_batch_size": 1,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "make_vocab_size_divisible_by": 1,
        "encoder_seq_length": cfg.max_position_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups,
        "kv_channels": cfg.kv_channels, "init_method_std": cfg.init_method_std,
        "hidden_dropout": cfg.hidden_dropout, "attention_dropout": cfg.attention_dropout,
        "layernorm_epsilon": cfg.layernorm_epsilon, "normalization": norm,
        "activation": _NEMO_ACTIVATIONS[cfg.activation], "bias": cfg.bias,
        "bias_activation_fusion": False, "bias_dropout_add_fusion": False,
        "position_embedding_type": cfg.position_embedding_type, "rotary_base": cfg.rotary_base,
        "rotary_percentage": cfg.rotary_percent,
        "seq_len_interpolation_factor": float(scaling["factor"]) if scaling else None,
        "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights,
        "transformer_engine": True, "tokenizer": tokenizer,
    }
    text = yaml.safe_dump(model, sort_keys=False)
    back = nemo_model_config(text, "model_config.yaml", cfg.vocab_size).to_dict()
    ours = cfg.to_dict()
    differ = sorted(k for k in ours if k not in _NEMO_IGNORED and back.get(k) != ours[k])
    if differ:
        raise ConfigError(f"NeMo's model_config.yaml cannot express {differ[0]}={ours[differ[0]]!r} of this model "
                          f"(it would read back as {back.get(differ[0])!r}); export --format hf instead")
    return text


def _nemo_tokenizer(source) -> tuple[dict, dict[str, bytes]]:
    """The ``tokenizer:`` section of model_config.yaml and the files the archive carries (``nemo:NAME``)."""
    files = {n: _tokenizer_bytes(source, n) for n in ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer.json",
                                                      "tokenizer_config.json")}
    files = {n: b for n, b in files.items() if b is not None}
    if "tokenizer.model" in files:
        section = {"library": "sentencepiece", "type": None, "model": "nemo:tokenizer.model", "vocab_file": None,
                   "merge_file": None}
    elif "vocab.json" in files and "merges.txt" in files:
        section = {"library": "megatron", "type": "GPT2BPETokenizer", "model": None, "vocab_file": "nemo:vocab.json",
                   "merge_file": "nemo:merges.txt"}
    elif "tokenizer.json" in files:
        section = {"library": "huggingface", "type": "nemo:tokenizer.json", "model": None, "vocab_file": None,
                   "merge_file": None}
    else:
        section = {"library": None, "type": None, "model": None, "vocab_file": None, "merge_file": None}
    return section, files


def nemo_weights(name: str, tensors: dict[str, torch.Tensor], cfg) -> dict[str, Optional[torch.Tensor]]:
    """Megatron-core names -> tensors for what lmforge holds (one layer, or the global tensors, at a time).

    ``tensors``: the lmforge tensors of the layer ``name`` (``layers.{i}``) or of the model's globals.
    """
    from lmforge.convert.plan import Step, to_hf_tensors

    out: dict[str, Optional[torch.Tensor]] = {}
    if name == "globals":
        out["model.embedding.word_embeddings.weight"] = tensors["embed_tokens.weight"]
        if "embed_positions.weight" in tensors:
            out["model.embedding.position_embeddings.weight"] = tensors["embed_positions.weight"]
        out["model.decoder.final_layernorm.weight"] = tensors["norm.weight"]
        if "norm.bias" in tensors:
            out["model.decoder.final_layernorm.bias"] = tensors["norm.bias"]
        if "lm_head.weight" in tensors:
            out["model.output_layer.weight"] = tensors["lm_head.weight"]
        return out
    L, N = name, f"model.decoder.{name}"
    for kind in ("weight", "bias"):
        qkv = [f"{L}.self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
        if qkv[0] in tensors:
            (fused,) = to_hf_tensors(Step("grouped_qkv", qkv, []), [tensors[n] for n in qkv], cfg)
            out[f"{N}.self_attention.linear_qkv.{kind}"] = fused
        if f"{L}.self_attn.o_proj.{kind}" in tensors:
            out[f"{N}.self_attention.linear_proj.{kind}"] = tensors[f"{L}.self_attn.o_proj.{kind}"]
        if f"{L}.input_layernorm.{kind}" in tensors:
            out[f"{N}.self_attention.linear_qkv.layer_norm_{kind}"] = tensors[f"{L}.input_layernorm.{kind}"]
        if f"{L}.post_attention_layernorm.{kind}" in tensors:
            out[f"{N}.mlp.linear_fc1.layer_norm_{kind}"] = tensors[f"{L}.post_attention_layernorm.{kind}"]
        if f"{L}.mlp.up_proj.{kind}" in tensors:
            up = tensors[f"{L}.mlp.up_proj.{kind}"]
            gate = tensors.get(f"{L}.mlp.gate_proj.{kind}")
            out[f"{N}.mlp.linear_fc1.{kind}"] = up if gate is None else torch.cat([gate, up], dim=0)
        if f"{L}.mlp.down_proj.{kind}" in tensors:
            out[f"{N}.mlp.linear_fc2.{kind}"] = tensors[f"{L}.mlp.down_proj.{kind}"]
    for module in ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
                   "mlp.linear_fc1", "mlp.linear_fc2"):
        out[f"{N}.{module}._extra_state"] = None  # Transformer Engine's (empty) extra state: NeMo loads strictly
    return out


def export_nemo(model, out: Path, dtype: Optional[str] = None) -> dict:
    """Write a NeMo 1.x ``.nemo`` archive of the model (see the module doc)."""
    import io
    import re

    from lmforge.convert.hf import _DTYPES
    from lmforge.io import atomic_path

    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    cast = _DTYPES.get(dtype)
    source = _source(model)
    cfg = source.cfg
    if cfg.num_moe_experts:
        raise ConfigError(f"{model}: mixture-of-experts models are not exported to .nemo; export --format hf")
    section, tok_files = _nemo_tokenizer(source)
    config_text = nemo_config_yaml(cfg, section)  # refuses before anything is written
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in source.tensors():
        if cast is not None and tensor.is_floating_point():
            tensor = tensor.to(cast)
        m = re.match(r"^(layers\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else "globals", {})[name] = tensor.detach().contiguous().clone()
    state: dict[str, Optional[torch.Tensor]] = {}
    for name, tensors in groups.items():
        state.update(nemo_weights(name, tensors, cfg))
    buffer = io.BytesIO()
    torch.save(state, buffer)  # a dict of plain tensors (and None): torch.load(weights_only=True) reads it
    members = {"model_config.yaml": config_text.encode("utf-8"), "model_weights.ckpt": buffer.getvalue(), **tok_files}
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w:") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(f"./{member}")
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    tensors = sum(1 for v in state.values() if v is not None)
    return {"format": "nemo", "out": str(out), "family": source.family.name, "tensors": tensors,
            "files": sorted(members)}
