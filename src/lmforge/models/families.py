"""Model families as data: Hugging Face config <-> :class:`ModelConfig` fields, and HF tensor names.

A :class:`Family` is a row: which HF ``model_type``/architecture it reads and writes, how the HF
``config.json`` maps onto ModelConfig fields (two small functions over dicts), and a table of
:class:`Rule` s relating lmforge tensor names to HF tensor names. Templates use ``{i}`` for a layer
and ``{j}`` for an expert. A rule whose lmforge names a model does not have (a bias of a model
without biases, an untied head) is simply skipped, so one table serves every variant of a family.

Rule kinds (what the converter does; see :mod:`lmforge.convert.hf`):
    copy         one tensor each side, same values.
    transpose    HF stores the transpose (GPT-2's Conv1D).
    cat          HF concatenates several lmforge tensors along dim 0 (Baichuan's W_pack, GPT-2 biases).
    cat_t        like cat, then transposed (GPT-2's c_attn weight).
    grouped_qkv  HF interleaves q, k, v per key/value group: ``[q heads of group g, k_g, v_g]`` for each
                 g (Falcon, and Megatron/NeMo's fused ``linear_qkv``).

Baichuan2's NormHead (the head's rows L2-normalised at every use) is the config field
``normalize_output_head``, not a conversion step: the head is copied unchanged both ways.

ALiBi families: Falcon-RW (``alibi: true``; HF adds the bias before the 1/sqrt(head_dim) softmax scale, so
lmforge's slopes are scaled by it: ``alibi_slope_scale``; its bias is built in bf16 as HF does: ``alibi_bf16_bias``)
and Baichuan2-13B (a config without
``max_position_embeddings``; its context is ``model_max_length``; the bias is added after the scale).

Source config.json addresses: the HF Hub pages of meta-llama/Llama-2-7b-hf, meta-llama/Llama-3.1-8B,
mistralai/Mistral-7B-v0.1, mistralai/Mixtral-8x7B-v0.1, google/gemma-7b, google/gemma-2-9b,
tiiuae/falcon-7b, tiiuae/falcon-40b, tiiuae/falcon-rw-1b, bigcode/starcoder2-7b, baichuan-inc/Baichuan2-7B-Base,
baichuan-inc/Baichuan2-13B-Base,
Qwen/Qwen2-7B, nvidia/Minitron-8B-Base (Nemotron), openai-community/gpt2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from lmforge.errors import ConfigError
from lmforge.models.config import ModelConfig

__all__ = ["Rule", "Family", "FAMILIES", "family_for_hf_config", "family_by_name", "guess_family",
           "hf_to_model_config", "model_config_to_hf"]


@dataclass(frozen=True)
class Rule:
    """lmforge tensor names <-> HF tensor names (templates) and how values relate (see module doc)."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str = "copy"


def _copy(ours: str, hf: str) -> list[Rule]:
    """Weight and bias rules for a module (the bias one applies only where the model has a bias)."""
    return [Rule((f"{ours}.weight",), (f"{hf}.weight",)), Rule((f"{ours}.bias",), (f"{hf}.bias",))]


@dataclass(frozen=True)
class Family:
    """One family: HF names, config translation and the tensor-name table.

    Attributes:
        name: lmforge's name for it (``--family``).
        model_type: HF ``config.json`` ``model_type``.
        architecture: HF ``architectures[0]`` written on export.
        from_hf: HF config dict -> ModelConfig keyword arguments (raises ConfigError for what lmforge
            cannot represent, naming the key).
        to_hf: ModelConfig -> HF config dict (architecture keys only).
        rules: ModelConfig -> list of :class:`Rule` (most families ignore the config).
        ignore: HF tensor name suffixes that carry nothing (buffers of old checkpoints).
    """

    name: str
    model_type: str
    architecture: str
    from_hf: Callable[[dict], dict]
    to_hf: Callable[[ModelConfig], dict]
    rules: Callable[[ModelConfig], list[Rule]]
    ignore: tuple[str, ...] = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------- helpers


def _need(hf: dict, key: str, source: str = "config.json"):
    if hf.get(key) is None:
        raise ConfigError(f"{source}: key {key!r} is missing; the HF config is incomplete")
    return hf[key]


def _rope_from_hf(hf: dict) -> dict:
    """RoPE base, scaling and partial factor from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = None
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(params.get("factor", legacy.get("factor")))}
    elif kind == "llama3":
        src = params if "low_freq_factor" in params else legacy
        scaling = {"rope_type": "llama3", "factor": float(src["factor"]),
                   "low_freq_factor": float(src["low_freq_factor"]), "high_freq_factor": float(src["high_freq_factor"]),
                   "original_max_position_embeddings": int(src["original_max_position_embeddings"])}
    elif kind != "default":
        raise ConfigError(f"config.json: rope scaling type {kind!r} (rope_parameters / rope_scaling) is not supported; "
                          f"lmforge supports default, linear and llama3")
    return {"rotary_base": float(theta), "rope_scaling": scaling, "rotary_percent": float(partial)}


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """Both spellings: ``rope_parameters`` (transformers >= 5) and ``rope_theta``/``rope_scaling`` (older readers)."""
    params: dict[str, Any] = {"rope_theta": cfg.rotary_base, "rope_type": "default"}
    out: dict[str, Any] = {"rope_theta": cfg.rotary_base}
    if cfg.rope_scaling is not None:
        params.update(cfg.rope_scaling)
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.rotary_percent != 1.0:
        params["partial_rotary_factor"] = cfg.rotary_percent
        out["partial_rotary_factor"] = cfg.rotary_percent
    out["rope_parameters"] = params
    return out


def _windows_from_hf(hf: dict, num_layers: int, default_all: bool) -> dict:
    """``sliding_window`` and ``layer_types`` (None when every layer, or none, slides)."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    if types is None:
        if not default_all:
            return {"sliding_window": None, "layer_types": None}
        types = ["sliding_attention"] * num_layers
    types = list(types)
    if "sliding_attention" not in types:
        return {"sliding_window": None, "layer_types": None}
    return {"sliding_window": int(window), "layer_types": None if set(types) == {"sliding_attention"} else types}


def _layer_types(cfg: ModelConfig) -> list[str]:
    return [("sliding_attention" if cfg.window_for_layer(i) else "full_attention") for i in range(cfg.num_layers)]


def _decoder_from_hf(hf: dict, eps_key: str = "rms_norm_eps") -> dict:
    """Fields every Llama-like HF config spells the same way."""
    heads = int(_need(hf, "num_attention_heads"))
    out = dict(vocab_size=int(_need(hf, "vocab_size")), hidden_size=int(_need(hf, "hidden_size")),
               num_layers=int(_need(hf, "num_hidden_layers")), num_attention_heads=heads,
               num_query_groups=int(hf.get("num_key_value_heads") or heads),
               ffn_hidden_size=int(_need(hf, "intermediate_size")),
               max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
               kv_channels=hf.get("head_dim") or None, layernorm_epsilon=float(hf.get(eps_key) or 1e-5),
               position_embedding_type="rope", share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
               init_method_std=float(hf.get("initializer_range") or 0.02), attention_dropout=float(hf.get("attention_dropout") or 0.0))
    out.update(_rope_from_hf(hf))
    return out


def _decoder_to_hf(cfg: ModelConfig, eps_key: str = "rms_norm_eps") -> dict:
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
               intermediate_size=cfg.ffn_hidden_size, max_position_embeddings=cfg.max_position_embeddings,
               head_dim=cfg.head_dim, tie_word_embeddings=cfg.share_embeddings_and_output_weights,
               initializer_range=cfg.init_method_std, attention_dropout=cfg.attention_dropout)
    out[eps_key] = cfg.layernorm_epsilon
    out.update(_rope_to_hf(cfg))
    return out


def _llama_rules(cfg: ModelConfig, mlp_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    rules = _copy("embed_tokens", "model.embed_tokens") + _copy("norm", "model.norm") + _copy("lm_head", "lm_head")
    L = "layers.{i}"
    H = "model.layers.{i}"
    for name in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj"):
        rules += _copy(f"{L}.{name}", f"{H}.{name}")
    for ours, theirs in zip(("gate_proj", "up_proj", "down_proj"), mlp_names):
        rules += _copy(f"{L}.mlp.{ours}", f"{H}.mlp.{theirs}")
    return rules


# ---------------------------------------------------------------------------------------------- families


def _llama_from(hf):
    out = _decoder_from_hf(hf)
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise ConfigError("config.json: attention_bias and mlp_bias differ; lmforge's model.bias covers both")
    out.update(normalization="rmsnorm", activation="swiglu", bias=bias)
    return out


def _llama_to(cfg):
    return {**_decoder_to_hf(cfg), "hidden_act": "silu", "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def _mistral_from(hf):
    out = _llama_from({**hf, "attention_bias": False, "mlp_bias": False})
    out.update(_windows_from_hf(hf, out["num_layers"], default_all=True))
    return out


def _mistral_to(cfg):
    return {**_decoder_to_hf(cfg), "hidden_act": "silu", "sliding_window": cfg.sliding_window}


def _mixtral_from(hf):
    out = _mistral_from(hf)
    out.update(num_moe_experts=int(_need(hf, "num_local_experts")), moe_router_topk=int(hf.get("num_experts_per_tok", 2)),
               moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)))  # 0.001: MixtralConfig's default
    return out


def _mixtral_to(cfg):
    return {**_mistral_to(cfg), "num_local_experts": cfg.num_moe_experts, "num_experts_per_tok": cfg.moe_router_topk,
            "router_aux_loss_coef": cfg.moe_aux_loss_coeff}


def _mixtral_rules(cfg):
    rules = [r for r in _llama_rules(cfg) if ".mlp." not in r.ours[0]]
    rules.append(Rule(("layers.{i}.mlp.router.weight",), ("model.layers.{i}.block_sparse_moe.gate.weight",)))
    for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        rules.append(Rule((f"layers.{{i}}.mlp.experts.{{j}}.{ours}.weight",),
                          (f"model.layers.{{i}}.block_sparse_moe.experts.{{j}}.{theirs}.weight",)))
    return rules


def _qwen2_from(hf):
    out = _llama_from({**hf, "attention_bias": False, "mlp_bias": False})
    out["qkv_bias"] = True
    if hf.get("use_sliding_window"):
        types = hf.get("layer_types") or ["sliding_attention" if i >= int(hf.get("max_window_layers", 0)) else
                                          "full_attention" for i in range(out["num_layers"])]
        out.update(_windows_from_hf({**hf, "layer_types": types}, out["num_layers"], default_all=False))
    return out


def _qwen2_to(cfg):
    out = {**_decoder_to_hf(cfg), "hidden_act": "silu", "use_sliding_window": cfg.sliding_window is not None,
           "sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg)}
    if cfg.sliding_window is not None:
        types = _layer_types(cfg)
        # Qwen2's own config derives layer_types from max_window_layers: full below it, sliding from it on.
        out["max_window_layers"] = types.index("sliding_attention")
    else:
        out["max_window_layers"] = cfg.num_layers
    return out


_GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")  # Gemma runs all of these as tanh GELU


def _gemma_from(hf):
    out = _decoder_from_hf(hf)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH_NAMES:
        raise ConfigError(f"config.json: hidden_activation={act!r} is not supported for Gemma; use gelu_pytorch_tanh")
    out.update(normalization="rmsnorm", norm_offset=1.0, activation="geglu", bias=bool(hf.get("attention_bias", False)),
               embedding_multiplier=math.sqrt(out["hidden_size"]),
               share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)))
    return out


def _gemma_to(cfg):
    return {**_decoder_to_hf(cfg), "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
            "attention_bias": cfg.bias}


def _gemma2_from(hf):
    out = _gemma_from(hf)
    out.update(_windows_from_hf(hf, out["num_layers"], default_all=False) if hf.get("layer_types") else
               _windows_from_hf({**hf, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                       for i in range(out["num_layers"])]}, out["num_layers"], False))
    scalar = hf.get("query_pre_attn_scalar")
    head_dim = out["kv_channels"] or out["hidden_size"] // out["num_attention_heads"]
    out.update(sandwich_norm=True, attention_scale=None if scalar in (None, head_dim) else float(scalar) ** -0.5,
               attn_logit_softcapping=hf.get("attn_logit_softcapping"), final_logit_softcapping=hf.get("final_logit_softcapping"))
    return out


def _gemma2_to(cfg):
    scalar = cfg.head_dim if cfg.attention_scale is None else cfg.attention_scale ** -2
    if abs(scalar - round(scalar)) < 1e-6:
        scalar = int(round(scalar))  # HF's config class wants an integer
    return {**_gemma_to(cfg), "sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg),
            "query_pre_attn_scalar": scalar, "attn_logit_softcapping": cfg.attn_logit_softcapping,
            "final_logit_softcapping": cfg.final_logit_softcapping}


def _gemma2_rules(cfg):
    rules = [r for r in _llama_rules(cfg) if "post_attention_layernorm" not in r.ours[0]]
    rules += _copy("layers.{i}.attn_output_norm", "model.layers.{i}.post_attention_layernorm")
    rules += _copy("layers.{i}.post_attention_layernorm", "model.layers.{i}.pre_feedforward_layernorm")
    rules += _copy("layers.{i}.mlp_output_norm", "model.layers.{i}.post_feedforward_layernorm")
    return rules


def _starcoder2_from(hf):
    out = _decoder_from_hf(hf, eps_key="norm_epsilon")
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    acts = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
    if act not in acts:
        raise ConfigError(f"config.json: hidden_act={act!r} is not supported for StarCoder2; use one of {', '.join(acts)}")
    out.update(normalization="layernorm", activation=acts[act], bias=bool(hf.get("use_bias", True)),
               layernorm_bias=True, share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)))
    out.update(_windows_from_hf(hf, out["num_layers"], default_all=True))
    return out


def _starcoder2_to(cfg):
    return {**_decoder_to_hf(cfg, eps_key="norm_epsilon"), "use_bias": cfg.bias, "sliding_window": cfg.sliding_window,
            "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}.get(cfg.activation, cfg.activation),
            "residual_dropout": cfg.hidden_dropout, "embedding_dropout": 0.0}


def _nemotron_from(hf):
    out = _decoder_from_hf(hf, eps_key="norm_eps")
    if hf.get("hidden_act", "relu2") != "relu2":
        raise ConfigError(f"config.json: hidden_act={hf.get('hidden_act')!r} is not supported for Nemotron; use relu2")
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise ConfigError("config.json: attention_bias and mlp_bias differ; lmforge's model.bias covers both")
    out.update(normalization="layernorm", norm_offset=1.0, layernorm_bias=True, activation="squared_relu", bias=bias)
    return out


def _nemotron_to(cfg):
    return {**_decoder_to_hf(cfg, eps_key="norm_eps"), "hidden_act": "relu2", "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias}


def _nemotron_rules(cfg):
    return [r for r in _llama_rules(cfg) if "gate_proj" not in r.ours[0]]


def _falcon_from(hf):
    heads = int(_need(hf, "num_attention_heads"))
    hidden = int(_need(hf, "hidden_size"))
    new_arch = bool(hf.get("new_decoder_architecture", False))
    if new_arch:
        groups = int(hf.get("num_kv_heads") or heads)
        parallel = True
        shared = int(hf.get("num_ln_in_parallel_attn") or 2) == 1
    else:
        groups = 1 if hf.get("multi_query", True) else heads
        parallel = bool(hf.get("parallel_attn", True))
        shared = parallel
    act = hf.get("activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"config.json: activation={act!r} is not supported for Falcon; use gelu")
    out = dict(vocab_size=int(_need(hf, "vocab_size")), hidden_size=hidden, num_layers=int(_need(hf, "num_hidden_layers")),
               num_attention_heads=heads, num_query_groups=groups,
               ffn_hidden_size=int(hf.get("ffn_hidden_size") or 4 * hidden),
               max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
               layernorm_epsilon=float(hf.get("layer_norm_epsilon") or 1e-5), normalization="layernorm",
               layernorm_bias=True, activation="gelu", bias=bool(hf.get("bias", False)),
               parallel_attn_mlp=parallel, shared_input_norm=shared,
               share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)),
               init_method_std=float(hf.get("initializer_range") or 0.02))
    if hf.get("alibi"):
        # Falcon-RW: (q k^T + alibi) / sqrt(head_dim), i.e. slopes times 1/sqrt(head_dim); HF ignores rope keys then.
        # HF builds the bias in bf16 (build_alibi_tensor): alibi_bf16_bias reproduces it exactly.
        out.update(position_embedding_type="alibi", alibi_slope_scale=1.0 / math.sqrt(hidden // heads),
                   alibi_bf16_bias=True)
    else:
        out["position_embedding_type"] = "rope"
        out.update(_rope_from_hf(hf))
    return out


def _falcon_to(cfg):
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=heads, ffn_hidden_size=cfg.ffn_hidden_size, max_position_embeddings=cfg.max_position_embeddings,
               layer_norm_epsilon=cfg.layernorm_epsilon, bias=cfg.bias, activation="gelu",
               alibi=cfg.position_embedding_type == "alibi",
               tie_word_embeddings=cfg.share_embeddings_and_output_weights, initializer_range=cfg.init_method_std)
    if not out["alibi"]:
        out.update(_rope_to_hf(cfg))
    old_layout = (not cfg.parallel_attn_mlp or cfg.shared_input_norm) and groups in (1, heads)
    if old_layout:
        out.update(new_decoder_architecture=False, multi_query=groups == 1, parallel_attn=cfg.parallel_attn_mlp,
                   num_kv_heads=groups)
    else:
        out.update(new_decoder_architecture=True, multi_query=True, parallel_attn=True, num_kv_heads=groups,
                   num_ln_in_parallel_attn=1 if cfg.shared_input_norm else 2)
    return out


def _falcon_rules(cfg):
    T, L = "transformer", "layers.{i}"
    H = "transformer.h.{i}"
    rules = _copy("embed_tokens", f"{T}.word_embeddings") + _copy("norm", f"{T}.ln_f") + _copy("lm_head", "lm_head")
    two_norms = cfg.parallel_attn_mlp and not cfg.shared_input_norm
    rules += _copy(f"{L}.input_layernorm", f"{H}.ln_attn" if two_norms else f"{H}.input_layernorm")
    rules += _copy(f"{L}.post_attention_layernorm", f"{H}.ln_mlp" if two_norms else f"{H}.post_attention_layernorm")
    for kind in ("weight", "bias"):
        rules.append(Rule(tuple(f"{L}.self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")),
                          (f"{H}.self_attention.query_key_value.{kind}",), "grouped_qkv"))
    rules += _copy(f"{L}.self_attn.o_proj", f"{H}.self_attention.dense")
    rules += _copy(f"{L}.mlp.up_proj", f"{H}.mlp.dense_h_to_4h") + _copy(f"{L}.mlp.down_proj", f"{H}.mlp.dense_4h_to_h")
    return rules


def _gpt2_from(hf):
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("config.json: scale_attn_by_inverse_layer_idx=true is not supported for GPT-2")
    if hf.get("scale_attn_weights") is False:
        raise ConfigError("config.json: scale_attn_weights=false is not supported for GPT-2")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
    act = hf.get("activation_function", "gelu_new")
    if act not in acts:
        raise ConfigError(f"config.json: activation_function={act!r} is not supported for GPT-2; use one of {', '.join(acts)}")
    hidden = int(_need(hf, "n_embd"))
    return dict(vocab_size=int(_need(hf, "vocab_size")), hidden_size=hidden, num_layers=int(_need(hf, "n_layer")),
                num_attention_heads=int(_need(hf, "n_head")), ffn_hidden_size=int(hf.get("n_inner") or 4 * hidden),
                max_position_embeddings=int(hf.get("n_positions") or 1024),
                layernorm_epsilon=float(hf.get("layer_norm_epsilon") or 1e-5), normalization="layernorm",
                activation=acts[act], bias=True, position_embedding_type="learned_absolute",
                share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)),
                init_method_std=float(hf.get("initializer_range") or 0.02))


def _gpt2_to(cfg):
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
                n_inner=cfg.ffn_hidden_size, n_positions=cfg.max_position_embeddings, n_ctx=cfg.max_position_embeddings,
                layer_norm_epsilon=cfg.layernorm_epsilon,
                activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(cfg.activation, cfg.activation),
                tie_word_embeddings=cfg.share_embeddings_and_output_weights, initializer_range=cfg.init_method_std,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                attn_pdrop=cfg.attention_dropout, resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout)


def _gpt2_rules(cfg):
    T, L, H = "transformer", "layers.{i}", "transformer.h.{i}"
    rules = _copy("embed_tokens", f"{T}.wte") + _copy("embed_positions", f"{T}.wpe") + _copy("norm", f"{T}.ln_f")
    rules += _copy("lm_head", "lm_head")
    rules += _copy(f"{L}.input_layernorm", f"{H}.ln_1") + _copy(f"{L}.post_attention_layernorm", f"{H}.ln_2")
    qkv = tuple(f"{L}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))
    rules.append(Rule(tuple(f"{n}.weight" for n in qkv), (f"{H}.attn.c_attn.weight",), "cat_t"))
    rules.append(Rule(tuple(f"{n}.bias" for n in qkv), (f"{H}.attn.c_attn.bias",), "cat"))
    for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
        rules.append(Rule((f"{L}.{ours}.weight",), (f"{H}.{theirs}.weight",), "transpose"))
        rules.append(Rule((f"{L}.{ours}.bias",), (f"{H}.{theirs}.bias",)))
    return rules


_BAICHUAN_AUTO_MAP = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                      "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}


def _baichuan_from(hf):
    # Baichuan2-7B: rotary, max_position_embeddings. Baichuan2-13B: ALiBi (bias after the softmax scale), no
    # max_position_embeddings, context model_max_length. Both: NormHead.
    alibi = hf.get("max_position_embeddings") is None
    out = _decoder_from_hf({**hf, "max_position_embeddings": hf.get("max_position_embeddings")
                            or hf.get("model_max_length") or 4096})
    if alibi:
        out.update(position_embedding_type="alibi", rotary_base=10000.0, rope_scaling=None, rotary_percent=1.0)
    out.update(normalization="rmsnorm", activation="swiglu", bias=False, normalize_output_head=True)
    return out


def _baichuan_to(cfg):
    if cfg.position_embedding_type == "alibi":
        # The keys of Baichuan2-13B-Base's config.json (its BaichuanConfig has no rotary or GQA keys)
        return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads, hidden_act="silu",
                    model_max_length=cfg.max_position_embeddings, rms_norm_eps=cfg.layernorm_epsilon,
                    tie_word_embeddings=cfg.share_embeddings_and_output_weights, initializer_range=cfg.init_method_std,
                    auto_map=dict(_BAICHUAN_AUTO_MAP))
    out = _decoder_to_hf(cfg)
    out.update(hidden_act="silu", model_max_length=cfg.max_position_embeddings, auto_map=dict(_BAICHUAN_AUTO_MAP))
    return out


def _baichuan_rules(cfg):
    rules = [r for r in _llama_rules(cfg) if not any(p in r.ours[0] for p in ("q_proj", "k_proj", "v_proj"))]
    rules.append(Rule(tuple(f"layers.{{i}}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")),
                      ("model.layers.{i}.self_attn.W_pack.weight",), "cat"))
    return rules


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "llama", "LlamaForCausalLM", _llama_from, _llama_to, _llama_rules),
    Family("mistral", "mistral", "MistralForCausalLM", _mistral_from, _mistral_to, _llama_rules),
    Family("mixtral", "mixtral", "MixtralForCausalLM", _mixtral_from, _mixtral_to, _mixtral_rules),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", _qwen2_from, _qwen2_to, _llama_rules),
    Family("gemma", "gemma", "GemmaForCausalLM", _gemma_from, _gemma_to, _llama_rules),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", _gemma2_from, _gemma2_to, _gemma2_rules),
    Family("starcoder2", "starcoder2", "Starcoder2ForCausalLM", _starcoder2_from, _starcoder2_to,
           lambda cfg: _llama_rules(cfg, ("gate_proj", "c_fc", "c_proj"))),
    Family("nemotron", "nemotron", "NemotronForCausalLM", _nemotron_from, _nemotron_to, _nemotron_rules),
    Family("falcon", "falcon", "FalconForCausalLM", _falcon_from, _falcon_to, _falcon_rules),
    Family("gpt2", "gpt2", "GPT2LMHeadModel", _gpt2_from, _gpt2_to, _gpt2_rules,
           ignore=("attn.bias", "attn.masked_bias")),
    Family("baichuan", "baichuan", "BaichuanForCausalLM", _baichuan_from, _baichuan_to, _baichuan_rules),
)}


def family_by_name(name: str) -> Family:
    """The family called ``name``; ConfigError listing the known ones otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_hf_config(hf: dict, source: str = "config.json") -> Family:
    """The family of an HF ``config.json`` (by ``model_type``, else by ``architectures``)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if model_type == fam.model_type or fam.architecture in archs:
            return fam
    supported = ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())
    raise ConfigError(f"{source}: model_type={model_type!r} (architectures {archs}) is not supported; "
                      f"supported: {supported}")


def hf_to_model_config(hf: dict, source: str = "config.json") -> tuple[Family, ModelConfig]:
    """Family and ModelConfig of an HF config dict. ConfigError names what cannot be represented."""
    fam = family_for_hf_config(hf, source)
    try:
        values = fam.from_hf(hf)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.json", source, 1)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: cannot read the {fam.name} config ({type(e).__name__}: {e})") from None
    return fam, ModelConfig(**values)


def model_config_to_hf(cfg: ModelConfig, fam: Family) -> dict:
    """HF config dict (architecture keys, ``model_type``, ``architectures``) for ``cfg`` as family ``fam``.

    Raises:
        ConfigError: ``cfg`` uses a field value the family's HF config cannot hold (the message names it).
    """
    hf = {"architectures": [fam.architecture], "model_type": fam.model_type, **fam.to_hf(cfg)}
    back = ModelConfig(**fam.from_hf(hf))
    ignored = {"init_method_std", "hidden_dropout", "attention_dropout",  # training settings, not architecture
               "moe_aux_loss_coeff"}
    for f in dataclasses.fields(ModelConfig):
        if f.name in ignored:
            continue
        ours, theirs = getattr(cfg, f.name), getattr(back, f.name)
        if ours != theirs and not (isinstance(ours, float) and isinstance(theirs, float) and math.isclose(ours, theirs)):
            raise ConfigError(f"model.{f.name}={ours!r} cannot be represented as an HF {fam.architecture} "
                              f"(it would read back as {theirs!r}); pick another family with --family")
    return hf


def guess_family(cfg: ModelConfig) -> Family:
    """The HF family a plain lmforge config most naturally exports to (checkpoints made by pretraining)."""
    if cfg.position_embedding_type == "learned_absolute":
        return FAMILIES["gpt2"]
    if cfg.position_embedding_type == "alibi":
        return FAMILIES["falcon"] if cfg.normalization == "layernorm" else FAMILIES["baichuan"]
    if cfg.normalize_output_head:
        return FAMILIES["baichuan"]
    if cfg.num_moe_experts is not None:
        return FAMILIES["mixtral"]
    if cfg.parallel_attn_mlp:
        return FAMILIES["falcon"]
    if cfg.sandwich_norm:
        return FAMILIES["gemma2"]
    if cfg.norm_offset:
        return FAMILIES["gemma"] if cfg.normalization == "rmsnorm" else FAMILIES["nemotron"]
    if cfg.normalization == "layernorm":
        return FAMILIES["starcoder2"]
    if cfg.qkv_bias and not cfg.bias:
        return FAMILIES["qwen2"]
    if cfg.sliding_window is not None:
        return FAMILIES["mistral"]
    return FAMILIES["llama"]
