"""The decoder-only transformer behind every lmforge model family.

One file, read top to bottom: norms -> rotary embedding -> ALiBi slopes -> attention -> MLPs -> Block ->
KV cache -> Transformer. GPT-2/GPT-3 style (learned absolute positions, LayerNorm with bias, GELU MLP, biases)
and Llama style (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases) differ only by
:class:`~lmforge.models.config.ModelConfig` fields. Each mechanism is a small module picked once
when the model is built (:func:`build_norm`, :data:`MLP_CLASSES`); no block branches per family.

Module names follow Hugging Face's Llama names (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``norm``, ``lm_head``) so that converting a checkpoint is a table of names.

The model is plain PyTorch: data parallelism, compile, activation checkpointing and LoRA are applied
from outside. Build it on the meta device, then ``to_empty(device=...)`` and ``init_weights()``.

Shape letters in comments: B batch, T new tokens, S keys attended (cache + new), C hidden size,
nh query heads, nkv key/value heads (query groups), hd head size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.config import ModelConfig
from lmforge.models.meta import meta_device

__all__ = ["Transformer", "AttentionRows", "Block", "ParallelBlock", "Attention", "KVCache", "RMSNorm", "LayerNorm",
           "MLP", "GatedMLP", "MoE", "GeluMLP", "SwiGLUMLP", "build_norm", "build_mlp", "ACTIVATION_FNS", "MLP_CLASSES", "apply_rotary",
           "rotate_half", "rope_cos_sin", "rope_inv_freq", "softcap", "alibi_slopes", "fuse_projections",
           "joint_linear", "joint_projection", "separate_projections", "set_joint_projections"]


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


# scaled_dot_product_attention(enable_gqa=...) arrived in torch 2.5; before it we repeat k/v heads.
_SDPA_HAS_GQA = _torch_at_least(2, 5)
_HAS_RMS_NORM = hasattr(F, "rms_norm")


# ----------------------------------------------------------------------------------------------
# Normalization


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * weight``.

    The statistics are computed in fp32 and the result is cast back to the input dtype before the
    weight multiplies it (the Llama reference order), so bf16 training stays stable.
    """

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset  # scale by (offset + weight): Gemma stores weight - 1 (offset 1)
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        if _HAS_RMS_NORM:  # one fused kernel (torch >= 2.4)
            return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose scale is ``offset + weight`` (Nemotron's LayerNorm1P stores weight - 1)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, offset: float = 0.0):
        super().__init__(dim, eps=eps, bias=bias)
        self.offset = offset
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "offset", 0.0):
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + self.offset, self.bias, self.eps)


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The norm layer named by ``cfg.normalization``: LayerNorm (bias per ``cfg.layernorm_bias``, else
    ``cfg.bias``) or RMSNorm; both scale by ``cfg.norm_offset + weight``."""
    if cfg.normalization == "layernorm":
        bias = cfg.bias if cfg.layernorm_bias is None else cfg.layernorm_bias
        if cfg.norm_offset:
            return LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, bias=bias, offset=cfg.norm_offset)
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, bias=bias)
    if cfg.normalization == "rmsnorm":
        return RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, offset=cfg.norm_offset)
    raise ValueError(f"unknown normalization {cfg.normalization!r}")


# ----------------------------------------------------------------------------------------------
# Rotary position embedding (Hugging Face Llama's "rotate half" convention)


def rope_inv_freq(dim: int, base: float, scaling: Optional[dict] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Rotary frequencies ``base ** (-2i / dim)`` for ``i < dim / 2`` (fp32), optionally rescaled.

    Args:
        dim: rotated channels per head.
        base: ``rotary_base`` (``rope_theta``).
        scaling: None, ``{"rope_type": "linear", "factor": f}`` (positions divided by f) or
            ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (Llama 3.1: long wavelengths divided by factor,
            short ones kept, a smooth blend between).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(head_dim: int, max_positions: int, base: float,
                 device: Optional[torch.device] = None, scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute the rotary tables in fp32.

    Frequencies from :func:`rope_inv_freq`; the angle table is repeated along the last dimension
    (not interleaved), matching :func:`rotate_half`. ``head_dim`` is the number of rotated channels
    (``cfg.rotary_dim``, less than the head size with partial rotary).

    Returns:
        ``(cos, sin)``, each ``(max_positions, head_dim)`` fp32.
    """
    inv_freq = rope_inv_freq(head_dim, base, scaling, device)
    positions = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    angles = torch.outer(positions, inv_freq)  # (P, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, hd)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, n, hd) by the angles of its positions; ``cos``/``sin`` are (T, rd), or
    (B, T, rd) when each sequence has its own positions. With ``rd < hd`` (partial rotary) only the
    first ``rd`` channels of each head turn; the rest pass through."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, rd)
    cos = cos[:, :, None, :].to(x.dtype)  # (B|1, T, 1, rd)
    sin = sin[:, :, None, :].to(x.dtype)
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# ALiBi (attention with linear biases): no position parameters, a per-head linear penalty on distance


def alibi_slopes(num_heads: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The standard ALiBi slopes of ``num_heads`` heads, (nh,) fp32.

    For n heads, n a power of two: the geometric sequence ``r, r^2, ..., r^n`` with ``r = 2^(-8/n)``.
    Otherwise, with ``m`` the largest power of two below n: the m slopes of m heads, then every other
    slope of 2m heads (``r'^1, r'^3, ...`` with ``r' = 2^(-8/(2m))``), n - m of them. This is the rule of
    HF's ``build_alibi_tensor`` (BLOOM, Falcon) and of Baichuan's ``_get_interleave`` (they agree).
    """

    def geometric(n: int) -> list[float]:
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``: squash logits smoothly into (-cap, cap) (Gemma 2)."""
    return torch.tanh(x / cap) * cap


# ----------------------------------------------------------------------------------------------
# Attention


class AttentionRows(NamedTuple):
    """A training layout whose attention runs over other rows than the rest of the model (``hidden_states``'
    ``attn_rows``): row ``r`` of the attention's layout holds the tokens ``gather[r]`` (B2, T2; flat indices into the
    model's B x T tokens), attended causally in that order (SDPA's ``is_causal``: flash); token ``i`` of the model's
    layout takes the output at ``scatter`` (B, T; flat indices into B2 x T2). A token may stand in several rows
    (a prompt before each of two completions) and give its output from one; a row's tail past its last token may
    repeat any index (nothing real sees it), and a token in no row (padding) may take any output."""

    gather: torch.Tensor
    scatter: torch.Tensor


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention through ``F.scaled_dot_product_attention``.

    ``num_query_groups`` key/value heads serve ``num_attention_heads`` query heads; query head ``h``
    reads key/value head ``h // (nh // nkv)``. Options read from the config once, here:
    ``qkv_bias``, this layer's sliding window (``cfg.window_for_layer``), ``attention_scale``,
    ``attn_logit_softcapping`` (which needs the scores, so it runs the attention as plain matmuls) and
    ALiBi (``position_embedding_type="alibi"``).

    ALiBi: query i and key j of head h get ``slope_h * (j - i)`` added to their scaled score
    (``slope_h``: :func:`alibi_slopes` (the non-persistent buffer ``alibi_slopes``) times
    ``cfg.alibi_slope_scale``; with ``cfg.alibi_bf16_bias`` the bias is HF BLOOM/Falcon's,
    ``bf16(bf16(slope_h) * j)`` times the scale, which differs from the exact one by bf16 rounding). The bias and the visibility mask become one float ``attn_mask`` (-inf where not
    visible). i and j are positions: token indices without a cache (packed documents restart their
    positions, index distances within a document stay right), cache positions with one.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_query_groups
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.use_rope = cfg.position_embedding_type == "rope"
        self.window = cfg.window_for_layer(layer_idx)  # None: full causal attention
        self.scale = cfg.attention_scale  # None: SDPA's default 1/sqrt(hd)
        self.logit_cap = cfg.attn_logit_softcapping
        C, hd = cfg.hidden_size, cfg.head_dim
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.q_proj = nn.Linear(C, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, C, bias=cfg.bias)
        self.qkv_proj: Optional[nn.Linear] = None  # q, k, v as one matmul (inference: fuse_projections)
        self.joint_qkv = False  # training: q, k, v as one matmul over their own weights (set_joint_projections)
        if cfg.position_embedding_type == "alibi":
            # Non-persistent: rebuilt from the config, never saved. Recomputed by Transformer.init_weights.
            slopes = alibi_slopes(self.n_heads, device=self.q_proj.weight.device)
            self.register_buffer("alibi_slopes", slopes, persistent=False)  # (nh,), before alibi_scale
        else:
            self.alibi_slopes = None
        self.alibi_scale = cfg.alibi_slope_scale
        self.alibi_bf16 = cfg.alibi_bf16_bias

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                kv_cache: Optional["KVCache"] = None, start_pos: int = 0,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend causally.

        Args:
            x: (B, T, C) hidden states of the new tokens, at positions ``start_pos .. start_pos+T-1``.
            rope: ``(cos, sin)`` rows for those positions, each (T, rd); None without RoPE.
            kv_cache: when given, the new keys/values are written at ``[start_pos, start_pos+T)`` and
                the tokens attend over the cached ``[0, start_pos+T)``.
            start_pos: position of the first new token.
            positions: optional (B, T) positions of each new token when sequences of one batch are at
                different positions (a serving engine's cache); the cache then decides what is visible.
            attn_mask: optional bool (B, 1, T, T) mask replacing the causal one without a cache (packed
                sequences: causal within each document, nothing across documents).

        With a sliding window, the window is ANDed into whichever mask applies. In the cache path the
        cache's keys are taken to be indexed by position (key ``s`` of the returned keys is position
        ``s``), which holds for :class:`KVCache` and for slot-per-sequence caches.

        Returns:
            (B, T, C).
        """
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        elif self.joint_qkv:
            q, k, v = joint_projection(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, rope, kv_cache, start_pos, positions, attn_mask))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, kv_cache: Optional["KVCache"] = None,
               start_pos: int = 0, positions: Optional[torch.Tensor] = None,
               attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention between the projections: queries (B, T, nh*hd) and keys/values (B, T, nkv*hd) in,
        the heads' outputs (B, T, nh*hd) out, before ``o_proj``. Arguments as :meth:`forward`.

        Serving hook: a cache with an ``attention(attn, q, k, v, rope, positions)`` method may compute the whole
        step itself (rotary, cache write, attention; e.g. :class:`lmforge.serve.cache.PagedKVCache` with its
        Triton kernel); it returns (B, T, nh*hd), or None to let this code run."""
        hook = getattr(kv_cache, "attention", None) if kv_cache is not None else None
        if hook is not None:
            out = hook(self, q, k, v, rope, positions)
            if out is not None:
                return out
        B, T, _ = q.shape
        q = q.view(B, T, -1, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, -1, self.head_dim)  # (B, T, nkv, hd)
        if self.use_rope:
            cos, sin = rope
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if isinstance(attn_mask, AttentionRows):  # (Transformer.hidden_states' attn_rows)
            return self._attend_rows(q, k, v, attn_mask)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)

        mask = attn_mask
        if kv_cache is not None:
            # The cache stores the new keys/values and says which keys each new token may see:
            # None means plain causal (or everything, for a single new token).
            k, v, mask = kv_cache.update(self.layer_idx, start_pos, k, v, positions)  # (B, nkv, S, hd)
        if self.window is not None:
            mask = self._and_window(mask, T, k.shape[2], start_pos, positions if kv_cache is not None else None,
                                    cached=kv_cache is not None, device=q.device)
        if self.alibi_slopes is not None and (mask is None or mask.dtype == torch.bool):
            # bool (or None: causal) mask -> float mask with the ALiBi bias (unless the model passed it built)
            mask = self.alibi_mask(mask, T, k.shape[2], start_pos, positions if kv_cache is not None else None,
                                    cached=kv_cache is not None, device=q.device).to(q.dtype)
        is_causal = mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        if mask is not None and kv_cache is None and q.is_cuda and k.shape[1] != q.shape[1]:
            # Training with a mask on a GPU (packed documents, shared-prompt preference rows, windows): SDPA's flash
            # kernel takes no mask and its memory-efficient one no enable_gqa (torch 2.11), so grouped heads would
            # fall back to the math kernel, which keeps (B, nh, T, T) scores per layer; repeated heads keep the
            # memory-efficient kernel.
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        if self.logit_cap is not None:
            y = self._eager(q, k, v, mask, is_causal, dropout)
        else:
            y = self._sdpa(q, k, v, mask, is_causal, dropout)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd)

    def _attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: AttentionRows) -> torch.Tensor:
        """Causal attention over the rows of ``rows`` (see :class:`AttentionRows`): q (B, T, nh, hd), k and v
        (B, T, nkv, hd), rotated, in; (B, T, nh*hd) out."""
        B, T = q.shape[:2]
        B2, T2 = rows.gather.shape
        index = rows.gather.reshape(-1)

        def regroup(t: torch.Tensor) -> torch.Tensor:  # (B, T, n, hd) -> (B2, n, T2, hd)
            return t.reshape(B * T, *t.shape[2:]).index_select(0, index).view(B2, T2, *t.shape[2:]).transpose(1, 2)

        q, k, v = regroup(q), regroup(k), regroup(v)
        dropout = self.dropout if self.training else 0.0
        attend = self._eager if self.logit_cap is not None else self._sdpa
        y = attend(q, k, v, None, T2 > 1, dropout)  # (B2, nh, T2, hd)
        y = y.transpose(1, 2).reshape(B2 * T2, -1)
        return y.index_select(0, rows.scatter.reshape(-1)).view(B, T, -1)  # (B, T, nh*hd)

    def _sdpa(self, q, k, v, mask, is_causal, dropout) -> torch.Tensor:
        """``F.scaled_dot_product_attention`` with grouped-query heads."""
        extra = {}
        if k.shape[1] != q.shape[1]:
            if _SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:
                k, v = self._repeat_kv(k), self._repeat_kv(v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                              scale=self.scale, **extra)

    def fuse_qkv(self) -> bool:
        """Replace ``q_proj``, ``k_proj``, ``v_proj`` by one ``qkv_proj`` (inference only: one matrix read per
        token instead of three, and the weights keep their values). Wrapped projections (LoRA) stay apart.
        Returns True if fused."""
        parts = [getattr(self, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if self.qkv_proj is not None or any(type(p) is not nn.Linear for p in parts):
            return False
        self.qkv_sizes = [p.out_features for p in parts]
        self.qkv_proj = _concat_linears(parts)
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nkv, S, hd) -> (B, nh, S, hd)

    @staticmethod
    def _query_key_pos(T: int, S: int, start_pos: int, positions: Optional[torch.Tensor], cached: bool,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the new tokens, (T, 1) or (B, 1, T, 1), and of the keys, (S,): key s is position s."""
        if cached:
            query_pos = positions if positions is not None else torch.arange(start_pos, start_pos + T, device=device)
        else:  # no cache: token indices (packed documents restart positions, index distances stay right)
            query_pos = torch.arange(T, device=device)
        query_pos = query_pos.reshape(-1, 1, T, 1) if query_pos.dim() == 2 else query_pos[:, None]  # (B|T.., T, 1)
        return query_pos, torch.arange(S, device=device)

    def _and_window(self, mask: Optional[torch.Tensor], T: int, S: int, start_pos: int,
                    positions: Optional[torch.Tensor], cached: bool, device: torch.device) -> torch.Tensor:
        """``mask`` (None: causal) restricted to keys less than ``self.window`` positions back."""
        query_pos, key_pos = self._query_key_pos(T, S, start_pos, positions, cached, device)
        window = key_pos > query_pos - self.window  # (T, S) or (B, 1, T, S)
        if mask is None:
            return window & (key_pos <= query_pos)
        return mask & window

    def alibi_mask(self, mask: Optional[torch.Tensor], T: int, S: int, start_pos: int,
                   positions: Optional[torch.Tensor], cached: bool, device: torch.device) -> torch.Tensor:
        """The float attention mask: ``slope_h * (key_pos - query_pos)`` where ``mask`` (None: causal) lets a
        query see a key, -inf elsewhere. Returns (1, nh, T, S) or (B, nh, T, S), fp32."""
        query_pos, key_pos = self._query_key_pos(T, S, start_pos, positions, cached, device)
        if mask is None:  # plain causal; with a cache and one new token, every key is visible
            mask = key_pos <= query_pos  # (T, S) or (B, 1, T, S)
        if mask.dim() == 2:
            mask = mask[None, None]  # (1, 1, T, S)
        if self.alibi_bf16:  # HF BLOOM/Falcon: bf16(bf16(slope) * key position), the same for every query
            bias = (self.alibi_slopes.bfloat16().view(1, -1, 1, 1) * key_pos.view(1, 1, 1, -1)).bfloat16().float()
        else:
            distance = (key_pos - query_pos).float()  # (T, S) or (B, 1, T, S), <= 0 where visible
            bias = self.alibi_slopes.float().view(1, -1, 1, 1) * (distance[None, None] if distance.dim() == 2 else distance)
        bias = bias * self.alibi_scale  # (1|B, nh, T|1, S)
        return bias.masked_fill(~mask, float("-inf"))  # (1|B, nh, T, S)

    def _eager(self, q, k, v, mask, is_causal, dropout) -> torch.Tensor:
        """Attention as matmuls, with soft-capped scores (SDPA cannot cap them). ``mask``: bool (True:
        visible) or float (added to the capped scores: the ALiBi bias, -inf where not visible)."""
        if k.shape[1] != q.shape[1]:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
        scores = softcap((q @ k.transpose(-2, -1)) * scale, self.logit_cap)  # (B, nh, T, S)
        if is_causal:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), p=dropout)
        return probs @ v  # (B, nh, T, hd)


# ----------------------------------------------------------------------------------------------
# MLPs: plain, gated, mixture of experts


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


# activation name -> the function applied to up_proj (plain MLP) or gate_proj (gated MLP)
ACTIVATION_FNS = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "squared_relu": _squared_relu,
                  "swiglu": F.silu, "geglu": _gelu_tanh}


class MLP(nn.Module):
    """``down_proj(act(up_proj(x)))``: exact GELU (GPT-3/Megatron), tanh GELU (GPT-2, StarCoder2) or
    squared ReLU (Nemotron)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATION_FNS[cfg.activation]
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))  # (B, T, C) -> (B, T, ffn) -> (B, T, C)


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU (Llama, act = silu) or GeGLU (Gemma, tanh GELU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATION_FNS[cfg.activation]
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.bias)
        self.gate_up_proj: Optional[nn.Linear] = None  # gate and up as one matmul (inference: fuse_projections)
        self.joint_gate_up = False  # training: gate and up as one matmul over their own weights (set_joint_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        if self.joint_gate_up:
            gate, up = joint_projection(x, (self.gate_proj, self.up_proj))
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def fuse_gate_up(self) -> bool:
        """Replace ``gate_proj`` and ``up_proj`` by one ``gate_up_proj`` (inference only; see
        :meth:`Attention.fuse_qkv`). Returns True if fused."""
        parts = [getattr(self, n, None) for n in ("gate_proj", "up_proj")]
        if self.gate_up_proj is not None or any(type(p) is not nn.Linear for p in parts):
            return False
        self.gate_up_proj = _concat_linears(parts)
        del self.gate_proj, self.up_proj
        return True


@torch.no_grad()
def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One frozen ``nn.Linear`` whose output is the outputs of ``parts`` side by side."""
    weight = torch.cat([p.weight for p in parts])  # (sum out, in)
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    with meta_device():  # shapes only: both tensors are replaced below
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuse every attention's q/k/v and every gated MLP's gate/up projections into one matmul each, in place.

    For inference (the serving engine's compiled decode step): at batch 1 a decode step reads every weight
    once, and one larger matrix-vector product runs nearer the memory bandwidth than two or three small
    ones. The fused model computes the same function, but its state-dict names change (``qkv_proj``,
    ``gate_up_proj``), so fuse only a model that will not be saved or trained. Projections wrapped by
    an adapter (per-request LoRA) are left apart. Returns the number of fusions.
    """
    fused = 0
    # Only the owners are listed: a list of every module would keep each replaced projection (and its weight)
    # alive until the loop ends, so fusing a model would briefly take the memory of all its fused matrices twice
    # (9 GB more for an 8B model). Listed this way, each layer's old weights are freed as soon as it is fused.
    owners = [m for m in model.modules() if isinstance(m, (Attention, GatedMLP))]
    for module in owners:
        if isinstance(module, Attention):
            fused += module.fuse_qkv()
        elif isinstance(module, GatedMLP):
            fused += module.fuse_gate_up()
    return fused


# ----------------------------------------------------------------------------------------------
# Joint projections in training: sibling linears (q/k/v, gate/up) of one input as one matmul, weights kept apart


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's when it is on, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _JointLinear(torch.autograd.Function):
    """``x @ cat(W_1..W_n).T + cat(b_1..b_n)``: one matmul forward, one for the input's gradient and one for all
    weights' gradients backward, while each weight stays its own Parameter (names, checkpoints, FSDP, PEFT as
    before). The concatenated weight is kept for backward only when it is a cast copy anyway (autocast over fp32
    master weights, which keeps the compute-dtype copies too); weights already in the compute dtype (a bf16
    frozen base, FSDP's bf16 parameters) are concatenated again in backward instead of held twice."""

    @staticmethod
    def forward(ctx, x, dtype, n, *params):
        weights, biases = params[:n], params[n:]
        with torch.autocast(x.device.type, enabled=False):
            w = torch.cat([p.to(dtype) for p in weights])  # (sum out, in)
            b = None if biases[0] is None else torch.cat([p.to(dtype) for p in biases])
            xc = x.to(dtype)
            y = F.linear(xc, w, b)  # (..., sum out)
        ctx.n, ctx.dtype, ctx.x_dtype = n, dtype, x.dtype
        ctx.sizes = [p.shape[0] for p in weights]
        ctx.param_dtypes = [p.dtype for p in weights]
        ctx.has_bias = biases[0] is not None
        ctx.cast = any(p.dtype != dtype for p in weights)
        saved_x = xc if any(ctx.needs_input_grad[3:3 + n]) else None
        saved_w = (w,) if ctx.cast else tuple(weights)
        ctx.save_for_backward(saved_x, *saved_w)
        return y

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors
        xc, ws = saved[0], saved[1:]
        n = ctx.n
        grads = [None] * (3 + 2 * n)
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(ctx.dtype)
            if ctx.needs_input_grad[0]:
                w = ws[0] if ctx.cast else torch.cat([p.to(ctx.dtype) for p in ws])
                grads[0] = (gy @ w).to(ctx.x_dtype)  # (..., in)
            gy2 = gy.reshape(-1, gy.shape[-1])  # (N, sum out)
            if any(ctx.needs_input_grad[3:3 + n]):
                gw = gy2.t() @ xc.reshape(-1, xc.shape[-1])  # (sum out, in)
                for i, (g, dt) in enumerate(zip(gw.split(ctx.sizes), ctx.param_dtypes)):
                    if ctx.needs_input_grad[3 + i]:
                        grads[3 + i] = g.to(dt)
            if ctx.has_bias and any(ctx.needs_input_grad[3 + n:]):
                gb = gy2.sum(0)
                for i, (g, dt) in enumerate(zip(gb.split(ctx.sizes), ctx.param_dtypes)):
                    if ctx.needs_input_grad[3 + n + i]:
                        grads[3 + n + i] = g.to(dt)
        return tuple(grads)


def joint_linear(x: torch.Tensor, weights: list, biases: list) -> torch.Tensor:
    """``F.linear`` of ``x`` with the weights (and biases: a list of tensors, or of Nones) side by side, in one
    matmul (:class:`_JointLinear`); returns (..., sum of the weights' rows) in the compute dtype."""
    return _JointLinear.apply(x, _compute_dtype(x), len(weights), *weights, *biases)


def joint_projection(x: torch.Tensor, parts: tuple) -> list[torch.Tensor]:
    """The outputs of sibling linears ``parts`` (same input ``x``) as one matmul: plain ``nn.Linear`` through
    :func:`joint_linear`; wrapped ones (LoRA) through their class's ``joint_forward(x, parts)``."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts[1:]):  # wrapped after joining (a module swapped since): apart
        return [p(x) for p in parts]
    if kind is nn.Linear:
        y = joint_linear(x, [p.weight for p in parts], [p.bias for p in parts])
        return list(y.split([p.out_features for p in parts], dim=-1))
    joint = getattr(kind, "joint_forward", None)
    return joint(x, parts) if joint is not None else [p(x) for p in parts]


def _joinable(parts: list) -> bool:
    """Siblings that can run as one matmul: all plain ``nn.Linear`` (plain tensors, no DTensor: tensor parallelism
    shards each apart), or all of one class whose ``can_join(parts)`` says so (LoRA, float8 projections)."""
    if any(p is None for p in parts) or len({type(p) for p in parts}) != 1:
        return False
    if type(parts[0]) is nn.Linear:
        return not any(type(t).__name__ == "DTensor" for p in parts for t in (p.weight, p.bias) if t is not None) \
            and len({p.bias is None for p in parts}) == 1 and len({p.in_features for p in parts}) == 1
    can_join = getattr(type(parts[0]), "can_join", None)
    return bool(can_join and can_join(parts))


def set_joint_projections(model: nn.Module, on: bool = True) -> int:
    """Training: compute every attention's q/k/v and every gated MLP's gate/up as one matmul each (``on``), or
    apart again. The weights stay separate Parameters under their own names (unlike :func:`fuse_projections`,
    which is for inference), so checkpoints, FSDP and PEFT see the model as before. Float8 projections join into
    one float8 matmul (:class:`lmforge.train.fp8_linear.Float8Projection`). Siblings that cannot join
    (tensor-parallel DTensors, float8 all-gather weights, a DoRA or dropout LoRA) stay apart. Apply after PEFT and any module
    swap. Returns the number of joined groups."""
    joined = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.joint_qkv = on and _joinable([getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj")])
            joined += module.joint_qkv
        elif isinstance(module, GatedMLP):
            module.joint_gate_up = on and _joinable([getattr(module, n, None) for n in ("gate_proj", "up_proj")])
            joined += module.joint_gate_up
    return joined


@contextlib.contextmanager
def separate_projections(model: nn.Module):
    """Within: every joint projection of ``model`` (:func:`set_joint_projections`) runs apart again, each linear
    its own matmul over its own weight; on leaving, each module's setting is put back as it was.

    For inference forwards on a model that trains with joint projections (online RL's rollout engine on the live
    policy): joining concatenates the weights at every forward, which a training step amortises over all its
    tokens but a decode step of a few rows per sequence pays in full (a copy of the q/k/v and gate/up weights,
    most of the model's, before each step's matmuls). Apart, the matmuls read the weights where they are; the
    values are the same. The flags are read when a forward runs, also when ``torch.compile`` traces it or a CUDA
    graph is captured: capture within, and the graphs replay the separate matmuls whatever the flags are later."""
    saved = []
    for module in model.modules():
        if isinstance(module, Attention) and module.joint_qkv:
            saved.append((module, "joint_qkv"))
        elif isinstance(module, GatedMLP) and module.joint_gate_up:
            saved.append((module, "joint_gate_up"))
    for module, flag in saved:
        setattr(module, flag, False)
    try:
        yield len(saved)
    finally:
        for module, flag in saved:
            setattr(module, flag, True)


GeluMLP = MLP  # the names of the first model version
SwiGLUMLP = GatedMLP


class MoE(nn.Module):
    """Mixture of experts (Mixtral): a linear ``router`` scores ``num_moe_experts`` gated MLPs, each
    token goes to its ``moe_router_topk`` best, weighted by their softmax probabilities renormalized
    over the chosen ones.

    Load balancing (HF Mixtral's ``load_balancing_loss_func``): with ``moe_aux_loss_coeff > 0`` and the
    module in training mode, each forward keeps ``aux_stats = (counts, prob_sums, n_tokens)``: per expert,
    how many top-k slots chose it (no gradient) and the sum of its router probabilities (gradient reaches
    the router), and ``aux_loss``, this layer's own loss ``E * sum_e f_e * P_e`` (f: slots per token,
    P: mean probability). :meth:`Transformer.moe_aux_loss` pools the statistics over layers as HF does.
    Otherwise nothing is computed and both are None.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.moe_router_topk
        self.num_experts = cfg.num_moe_experts
        self.aux_coeff = float(cfg.moe_aux_loss_coeff)
        self.router = nn.Linear(cfg.hidden_size, cfg.num_moe_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(cfg) for _ in range(cfg.num_moe_experts))
        self.aux_stats: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None
        self.aux_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C) tokens
        weights, chosen = self.route(x)
        return self.run_experts(x, weights, chosen).reshape(shape)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice for tokens ``x`` (N, C): ``(weights, chosen)``, both (N, k), the weights
        renormalized over the chosen experts (in ``x``'s dtype). Keeps the load-balancing statistics."""
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.training and self.aux_coeff > 0:
            counts = F.one_hot(chosen.reshape(-1), self.num_experts).sum(dim=0).float()  # (E,) top-k slots
            prob_sums = probs.sum(dim=0)  # (E,)
            n = probs.shape[0]
            self.aux_stats = (counts, prob_sums, n)
            self.aux_loss = self.num_experts * torch.sum((counts / n) * (prob_sums / n))
        else:
            self.aux_stats = self.aux_loss = None
        return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), chosen

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Each token (N, C) through its chosen experts, their outputs summed with the router weights.
        Expert parallelism (:mod:`lmforge.parallel.expert`) replaces this method of the instance."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # tokens routed to expert e
            # In training every expert joins the graph, even with no tokens (a zero gradient): sharded data
            # parallelism reduces each expert's gradient on every rank, whichever tokens a rank routed.
            if token.numel() or (self.training and torch.is_grad_enabled()):
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out


def build_mlp(cfg: ModelConfig) -> nn.Module:
    """The feed-forward layer: :class:`MoE` when ``num_moe_experts`` is set, else a gated or plain MLP."""
    if cfg.num_moe_experts is not None:
        return MoE(cfg)
    return GatedMLP(cfg) if cfg.gated else MLP(cfg)


MLP_CLASSES: dict[str, type[nn.Module]] = {a: (GatedMLP if a in ("swiglu", "geglu") else MLP) for a in ACTIVATION_FNS}


# ----------------------------------------------------------------------------------------------
# Blocks


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    With ``cfg.sandwich_norm`` (Gemma 2) the attention and MLP outputs are normed again before they are
    added (``attn_output_norm``, ``mlp_output_norm``); otherwise those are identities.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = build_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.attn_output_norm = build_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.post_attention_layernorm = build_norm(cfg)
        self.mlp = build_mlp(cfg)
        self.mlp_output_norm = build_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                kv_cache: Optional["KVCache"] = None, start_pos: int = 0,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, kv_cache, start_pos, positions, attn_mask)
        x = x + self.dropout(self.attn_output_norm(h))  # (B, T, C)
        x = x + self.dropout(self.mlp_output_norm(self.mlp(self.post_attention_layernorm(x))))
        return x


class ParallelBlock(nn.Module):
    """Attention and MLP side by side (Falcon): ``x + attn(norm1(x)) + mlp(norm2(x))``.

    With ``cfg.shared_input_norm`` one norm (``input_layernorm``) feeds both and
    ``post_attention_layernorm`` is absent (Falcon-7B); else the MLP reads ``post_attention_layernorm(x)``
    (Falcon-40B/180B's ``ln_mlp``).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = build_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = None if cfg.shared_input_norm else build_norm(cfg)
        self.mlp = build_mlp(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                kv_cache: Optional["KVCache"] = None, start_pos: int = 0,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = self.input_layernorm(x)
        m = a if self.post_attention_layernorm is None else self.post_attention_layernorm(x)
        h = self.self_attn(a, rope, kv_cache, start_pos, positions, attn_mask) + self.mlp(m)
        return x + self.dropout(h)


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    ``k[i]`` and ``v[i]`` are (B, nkv, max_seq_len, hd) buffers of layer ``i``. A forward call with
    ``start_pos`` writes its T new keys/values at ``[start_pos, start_pos+T)`` and attends over
    ``[0, start_pos+T)``. The caller tracks how far the cache is filled (it passes ``start_pos``).

    Args:
        cfg: the model's config (layers, query groups, head size).
        batch_size: sequences decoded together.
        max_seq_len: positions to hold; at most ``cfg.max_position_embeddings`` is useful.
        device, dtype: of the buffers; use the model's compute dtype.
        kv_heads: key/value heads stored per layer (default ``cfg.num_query_groups``; a tensor-parallel rank's
            model computes its own share, :mod:`lmforge.serve.tensor_parallel`).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 kv_heads: Optional[int] = None):
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_seq_len >= 1, got {batch_size}, {max_seq_len}")
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        nkv = cfg.num_query_groups if kv_heads is None else kv_heads
        shape = (batch_size, nkv, max_seq_len, cfg.head_dim)  # (B, nkv, L, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]

    def update(self, layer_idx: int, start_pos: int, k: torch.Tensor, v: torch.Tensor,
               positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Store ``k``, ``v`` (B, nkv, T, hd) at ``[start_pos, start_pos+T)`` of layer ``layer_idx``.

        This is the cache protocol the attention layer relies on; a serving engine's cache (one slot per
        sequence, each at its own position) implements the same method.

        Returns:
            The layer's keys and values over ``[0, start_pos+T)``, each (B, nkv, start_pos+T, hd), and the
            visibility mask: None for plain causal attention (or a single new token, which sees every
            key), else a bool (T, S) mask, True where a new token may attend.
        """
        if positions is not None:
            raise ValueError("KVCache keeps every sequence at the same position; per-sequence positions need a "
                             "cache with one slot per sequence")
        B, _, T, _ = k.shape
        end = start_pos + T
        if B != self.batch_size:
            raise ValueError(f"KVCache was made for batch size {self.batch_size}, got a batch of {B}")
        if start_pos < 0 or end > self.max_seq_len:
            raise ValueError(f"KVCache holds {self.max_seq_len} positions; cannot write [{start_pos}, {end})")
        self.k[layer_idx][:, :, start_pos:end] = k
        self.v[layer_idx][:, :, start_pos:end] = v
        mask = None
        if start_pos > 0 and T > 1:
            # A chunk after earlier tokens: new token i sees every cached key and new keys <= i.
            # (is_causal would align the triangle to the top-left corner, which is wrong here.)
            key_pos = torch.arange(end, device=k.device)
            query_pos = torch.arange(start_pos, end, device=k.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end], mask


# ----------------------------------------------------------------------------------------------
# Transformer


class Transformer(nn.Module):
    """Decoder-only language model: embedding -> ``layers`` (Blocks) -> final ``norm`` -> ``lm_head``.

    Args:
        cfg: the architecture. ``position_embedding_type="learned_absolute"`` adds an
            ``embed_positions`` table; ``"rope"`` rotates queries and keys instead; ``"alibi"`` has no
            position parameters (each attention layer biases its scores by distance). With
            ``share_embeddings_and_output_weights`` there is no ``lm_head`` module: the head is
            ``embed_tokens.weight``.

    Parameters are created by the usual ``nn`` constructors; call :meth:`init_weights` for the
    Megatron-style initialization (always, after building on the meta device).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        else:
            self.embed_positions = None
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        block = ParallelBlock if cfg.parallel_attn_mlp else Block
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.num_layers))
        self.norm = build_norm(cfg)
        if cfg.share_embeddings_and_output_weights:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.position_embedding_type == "rope":
            # Non-persistent: rebuilt from the config, never saved. Recomputed by init_weights after to_empty.
            device = self.embed_tokens.weight.device
            if device.type == "meta":  # shapes only (torch's meta division runs Python references: slow to load)
                shape = (cfg.max_position_embeddings, cfg.rotary_dim)
                cos, sin = torch.empty(shape, device=device), torch.empty(shape, device=device)
            else:
                cos, sin = rope_cos_sin(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rotary_base,
                                        device=device, scaling=cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)  # (P, rd)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    # -- forward ---------------------------------------------------------------------------------

    def moe_aux_loss(self) -> Optional[torch.Tensor]:
        """The router load-balancing loss of the last training forward (unscaled), or None.

        As HF Mixtral's ``load_balancing_loss_func`` without an attention mask: the router statistics
        of every MoE layer are pooled (tokens of all layers together), then ``E * sum_e f_e * P_e`` with
        ``f_e`` the top-k slots choosing expert e per token and ``P_e`` its mean router probability.
        None when the model has no MoE layer, ``moe_aux_loss_coeff`` is 0 or the last forward was in
        eval mode. Multiply by ``cfg.moe_aux_loss_coeff`` for the training term.
        """
        stats = [m.aux_stats for m in self.modules() if isinstance(m, MoE) and m.aux_stats is not None]
        if not stats:
            return None
        counts = sum(s[0] for s in stats)
        prob_sums = sum(s[1] for s in stats)
        n = sum(s[2] for s in stats)
        return self.cfg.num_moe_experts * torch.sum((counts / n) * (prob_sums / n))

    def forward(self, input_ids: torch.Tensor, kv_cache: Optional[KVCache] = None, start_pos: int = 0,
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, attn_rows: Optional[AttentionRows] = None) -> torch.Tensor:
        """Logits for every position: ``hidden_states`` through the output head.

        Args:
            input_ids: (B, T) token ids at positions ``start_pos .. start_pos+T-1``.
            kv_cache: optional :class:`KVCache`; the new keys/values are written into it and the tokens
                attend over everything cached before ``start_pos`` as well.
            start_pos: position of the first token (0 for training and for a first prefill).
            positions: optional (B, T) position of every token, for batches whose sequences stand at
                different positions (continuous batching, packed sequences); each must be below
                ``max_position_embeddings``, which the caller guarantees (it is not read back here).
            segment_ids: optional (B, T) document index of every token for packed training sequences:
                a token attends only to earlier tokens of its own document (pass positions restarting at
                each document too).
            attn_mask: optional (B, T, T) bool, True where token ``i`` may attend to token ``j``, ANDed with the
                causal rule (and with ``segment_ids``): layouts where a token must not see some earlier tokens,
                e.g. preference pairs sharing their prompt in one row (the rejected completion does not see the
                chosen one; :mod:`lmforge.align.objective`). Training only (no KV cache). Without it (and without
                ``segment_ids``) attention runs with SDPA's ``is_causal`` as before. Distance-based attention
                (ALiBi, sliding windows) measures token-index distances, so such a caller passes neither.
            attn_rows: optional :class:`AttentionRows`: attention (alone) runs causally over other rows, gathered
                from these tokens and scattered back: a layout whose attention pattern is several causal rows (a
                shared prompt with two completions) keeps SDPA's flash kernel instead of a dense mask. Training
                only; not with ``segment_ids``/``attn_mask``, ALiBi or sliding windows.

        Returns:
            (B, T, V) logits in the compute dtype (the loss is computed by the caller).

        Raises:
            ValueError: ``start_pos + T`` exceeds ``max_position_embeddings`` (without ``positions``).
        """
        hidden = self.hidden_states(input_ids, kv_cache, start_pos, positions, segment_ids, attn_mask, attn_rows)
        logits = F.linear(hidden, self.output_weight())  # (B, T, V)
        if self.cfg.final_logit_softcapping is not None:
            logits = softcap(logits, self.cfg.final_logit_softcapping)
        return logits

    def embed(self, input_ids: torch.Tensor, start_pos: int = 0, positions: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """The blocks' inputs: token (and learned position) embeddings (B, T, C), and the rotary tables of the
        tokens' positions (``(cos, sin)``, (T, rd) or (B, T, rd) with ``positions``; None without RoPE)."""
        end = start_pos + input_ids.shape[1]
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if self.cfg.embedding_multiplier is not None:  # Gemma: sqrt(C), rounded to the compute dtype as HF does
            x = x * torch.tensor(self.cfg.embedding_multiplier, dtype=x.dtype, device=x.device)
        if self.embed_positions is not None:
            pos = positions if positions is not None else torch.arange(start_pos, end, device=input_ids.device)
            x = x + self.embed_positions(pos)  # (B, T, C) + (T, C) or (B, T, C)
        x = self.dropout(x)
        rope = None
        if self.rope_cos is not None:
            if positions is not None:
                rope = (self.rope_cos[positions], self.rope_sin[positions])  # (B, T, hd) each
            else:
                rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])  # (T, hd) each
        return x, rope

    def hidden_states(self, input_ids: torch.Tensor, kv_cache: Optional[KVCache] = None, start_pos: int = 0,
                      positions: Optional[torch.Tensor] = None,
                      segment_ids: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None,
                      attn_rows: Optional[AttentionRows] = None) -> torch.Tensor:
        """The final normed hidden states (B, T, C), before the output head (a loss may fuse the head). Arguments
        as :meth:`forward`."""
        B, T = input_ids.shape
        end = start_pos + T
        if positions is not None:
            # The caller (a serving engine) keeps positions below max_position_embeddings; reading them
            # back here would cost a device sync and break a captured decode step into pieces.
            if positions.shape != input_ids.shape:
                raise ValueError(f"positions {tuple(positions.shape)} must have the shape of input_ids {(B, T)}")
        elif start_pos < 0 or end > self.cfg.max_position_embeddings:
            raise ValueError(f"positions [{start_pos}, {end}) do not fit the model's max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}; shorten the input (or start_pos)")
        x, rope = self.embed(input_ids, start_pos, positions)
        visible = attn_mask
        attn_mask = None
        if segment_ids is not None or visible is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids and attn_mask (training layouts) cannot be combined with a KV cache")
            if visible is not None and visible.shape != (B, T, T):
                raise ValueError(f"attn_mask {tuple(visible.shape)} must be (B, T, T) = {(B, T, T)}")
            allowed = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # causal
            if segment_ids is not None:
                allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (B, T, T)
            if visible is not None:
                allowed = allowed & visible.bool()
            attn_mask = allowed.expand(B, T, T)[:, None]  # (B, 1, T, T)
        if attn_rows is not None:
            if kv_cache is not None or attn_mask is not None:
                raise ValueError("attn_rows cannot be combined with a KV cache, segment_ids or attn_mask")
            if self.cfg.position_embedding_type == "alibi" or self.cfg.sliding_window is not None:
                raise ValueError("attn_rows: ALiBi and sliding windows measure token-index distances, which the "
                                 "gathered rows do not keep")
            attn_mask = attn_rows  # handed to every attention layer in the mask's place
        elif self.cfg.position_embedding_type == "alibi" and kv_cache is None and self.cfg.sliding_window is None:
            # Every layer has the same ALiBi mask here: build it once (one tensor kept for backward, not one
            # (B|1, nh, T, T) tensor per layer), in the dtype the attention runs in.
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            attn = self.layers[0].self_attn
            attn_mask = attn.alibi_mask(attn_mask, T, T, 0, None, cached=False, device=x.device).to(dtype)
        for layer in self.layers:
            x = layer(x, rope, kv_cache, start_pos, positions, attn_mask)
        return self.norm(x)

    def output_weight(self) -> torch.Tensor:
        """The (V, C) output head: ``embed_tokens.weight`` when tied, else ``lm_head.weight``.

        With ``cfg.normalize_output_head`` (Baichuan2's NormHead) its rows are L2-normalised here, at every
        use, so training, a fused loss, generation and evaluation all see the normalised head while the
        stored weight stays free (as Baichuan trains it; a head stored normalised gives the same logits).
        """
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.cfg.normalize_output_head:
            return F.normalize(weight, dim=-1)  # (V, C), unit rows
        return weight

    # -- initialization ------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initialize every parameter and buffer in place.

        Linear and embedding weights ~ N(0, init_method_std); the output projections of each block
        (``o_proj``, ``down_proj``) ~ N(0, init_method_std / sqrt(2 * num_layers)) (Megatron's scaled
        init); biases 0; norm weights 1. The RoPE tables and ALiBi slopes are recomputed, so this also
        completes a model built on the meta device and moved with ``to_empty``.

        Args:
            seed: when given, each weight draws from its own generator seeded with ``seed`` and the weight's
                name (the global RNG is left alone), so the same seed gives the same weights, and a part of
                the model (a pipeline stage) initialised alone gets the values it has in the whole model.
                Tensors still on the meta device (other stages') are skipped.
        """
        std = self.cfg.init_method_std
        out_std = std / math.sqrt(2.0 * self.cfg.num_layers)

        def normal_(name: str, t: torch.Tensor, s: float) -> None:
            if t.is_meta:
                return
            gen = None
            if seed is not None:
                gen = torch.Generator(device=t.device).manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode()))
                                                                   % 2**63)
            nn.init.normal_(t, mean=0.0, std=s, generator=gen)

        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith("o_proj") or name.endswith("down_proj")
                normal_(f"{name}.weight", module.weight, out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                normal_(f"{name}.weight", module.weight, std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.constant_(module.weight, 1.0 - getattr(module, "offset", 0.0))
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Attention) and module.alibi_slopes is not None:
                slopes = alibi_slopes(module.n_heads, device=module.alibi_slopes.device)
                module.alibi_slopes.copy_(slopes)
        if self.rope_cos is not None and not self.rope_cos.is_meta:
            cos, sin = rope_cos_sin(self.cfg.rotary_dim, self.cfg.max_position_embeddings, self.cfg.rotary_base,
                                    device=self.rope_cos.device, scaling=self.cfg.rope_scaling)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    # -- accounting --------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied head counted once).

        Args:
            exclude_embeddings: leave out the input tables ``embed_tokens`` and ``embed_positions``
                (an untied ``lm_head`` stays counted).
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.embed_positions is not None:
                n -= self.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM's convention.

        ``6 * N + 12 * num_layers * (nh * hd) * seq_len`` where N counts the weights of every matrix
        multiply (the block projections and the output head, tied or not; no embeddings lookups,
        biases or norms) and ``nh * hd`` is the attention width (= hidden_size unless kv_channels
        is set otherwise).
        """
        cfg = self.cfg
        matmul = sum(m.weight.numel() for m in self.layers.modules() if isinstance(m, nn.Linear))
        matmul += cfg.vocab_size * cfg.hidden_size  # output head
        attn_width = cfg.num_attention_heads * cfg.head_dim
        return 6 * matmul + 12 * cfg.num_layers * attn_width * seq_len
