"""P-tuning: a prompt encoder produces virtual-token embeddings prepended to every input (Liu et al., 2021).

The encoder (an MLP, or a bidirectional LSTM followed by an MLP, as NeMo's) turns ``n`` learned
embeddings into ``n`` virtual tokens of the model's width. :func:`apply_ptuning` swaps
``embed_tokens`` for a :class:`VirtualTokenEmbedding` (same ``weight`` Parameter and name) that maps
ids ``vocab_size .. vocab_size+n-1`` to the virtual tokens, and returns a :class:`PromptTunedModel`
that prepends those ids to every input and drops their outputs: callers see the usual
``hidden_states``/``forward`` of a :class:`~lmforge.models.transformer.Transformer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError


@dataclass
class PTuningConfig:
    """P-tuning settings.

    Attributes:
        num_virtual_tokens: how many virtual tokens are prepended.
        encoder_type: mlp | lstm.
        encoder_hidden_size: width inside the encoder.
        dropout: inside the encoder.
    """

    num_virtual_tokens: int = 10
    encoder_type: str = "mlp"
    encoder_hidden_size: int = 128
    dropout: float = 0.0

    def validate(self) -> None:
        if int(self.num_virtual_tokens) < 1:
            raise ConfigError(f"peft.ptuning.num_virtual_tokens={self.num_virtual_tokens} must be at least 1")
        if self.encoder_type not in ("mlp", "lstm"):
            raise ConfigError(f"peft.ptuning.encoder_type={self.encoder_type!r} is not known; use mlp or lstm")


class PromptEncoder(nn.Module):
    """``n`` learned embeddings -> (MLP | biLSTM + MLP) -> (n, hidden) virtual tokens."""

    def __init__(self, n: int, hidden: int, encoder_hidden: int, kind: str = "mlp", dropout: float = 0.0,
                 device=None, init_std: float = 0.02):
        super().__init__()
        self.n, self.kind = n, kind
        self.embedding = nn.Embedding(n, hidden, device=device)
        nn.init.normal_(self.embedding.weight, std=init_std)
        self.lstm = None
        mlp_in = hidden
        if kind == "lstm":
            self.lstm = nn.LSTM(hidden, encoder_hidden // 2 or 1, num_layers=2, bidirectional=True,
                                batch_first=True, dropout=dropout, device=device)
            mlp_in = 2 * (encoder_hidden // 2 or 1)
        self.mlp = nn.Sequential(nn.Linear(mlp_in, encoder_hidden, device=device), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(encoder_hidden, hidden, device=device))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (n, C)
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # (n, encoder_hidden)
        return self.mlp(x)  # (n, C)


class VirtualTokenEmbedding(nn.Module):
    """``embed_tokens`` whose ids from ``vocab_size`` on are the prompt encoder's virtual tokens."""

    def __init__(self, embed: nn.Embedding, encoder: PromptEncoder):
        super().__init__()
        self.weight = embed.weight
        self.num_embeddings, self.embedding_dim = embed.num_embeddings, embed.embedding_dim
        self.prompt_encoder = encoder
        self.frozen: Optional[torch.Tensor] = None  # the virtual tokens computed once (inference: freeze())

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the virtual tokens once and use them from now on (inference: no encoder run and no
        host-side check per forward, so a decode step can be captured as a CUDA graph)."""
        self.frozen = self.prompt_encoder().detach().to(self.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.num_embeddings
        virtual = ids >= V
        x = F.embedding(ids.clamp(max=V - 1), self.weight)  # (B, T, C)
        if self.frozen is not None:
            prompts = self.frozen
        elif not bool(virtual.any()):
            return x
        else:
            prompts = self.prompt_encoder().to(x.dtype)  # (n, C)
        picked = prompts[(ids - V).clamp(min=0, max=prompts.shape[0] - 1)]  # (B, T, C)
        return torch.where(virtual[..., None], picked, x)


class PromptTunedModel(nn.Module):
    """A Transformer with ``n`` virtual tokens in front of every sequence (see the module doc).

    ``hidden_states``/``forward`` take and return the caller's tokens only. With a KV cache the
    virtual tokens occupy the first ``n`` cache slots: a prefill at ``start_pos=0`` writes them, and
    later positions are shifted by ``n`` (make the cache ``num_virtual_tokens`` longer).
    """

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        self.model = model
        self.num_virtual_tokens = n
        self.cfg = model.cfg

    @property
    def layers(self):
        return self.model.layers

    def output_weight(self) -> torch.Tensor:
        return self.model.output_weight()

    def _prefixed(self, input_ids, positions, segment_ids):
        B, n = input_ids.shape[0], self.num_virtual_tokens
        V = self.model.embed_tokens.num_embeddings
        prefix = torch.arange(V, V + n, device=input_ids.device).expand(B, n)
        ids = torch.cat([prefix, input_ids], dim=1)
        if positions is not None:
            positions = torch.cat([torch.arange(n, device=ids.device).expand(B, n), positions + n], dim=1)
        if segment_ids is not None:
            segment_ids = torch.cat([segment_ids[:, :1].expand(B, n), segment_ids], dim=1)
        return ids, positions, segment_ids

    def hidden_states(self, input_ids: torch.Tensor, kv_cache=None, start_pos: int = 0,
                      positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None):
        n = self.num_virtual_tokens
        if kv_cache is not None and start_pos > 0:
            return self.model.hidden_states(input_ids, kv_cache, start_pos + n,
                                            None if positions is None else positions + n, segment_ids)
        ids, positions, segment_ids = self._prefixed(input_ids, positions, segment_ids)
        return self.model.hidden_states(ids, kv_cache, 0, positions, segment_ids)[:, n:]

    def forward(self, input_ids: torch.Tensor, kv_cache=None, start_pos: int = 0,
                positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None):
        hidden = self.hidden_states(input_ids, kv_cache, start_pos, positions, segment_ids)
        return F.linear(hidden, self.output_weight())


def apply_ptuning(model: nn.Module, cfg: PTuningConfig) -> PromptTunedModel:
    """Install a prompt encoder into ``model.embed_tokens``; return the model that prepends virtual tokens.

    Packed sequences (several documents per row) are not supported: the virtual tokens belong to the
    row's first document only.
    """
    cfg.validate()
    n = int(cfg.num_virtual_tokens)
    C = model.cfg.hidden_size
    device = model.embed_tokens.weight.device
    encoder = PromptEncoder(n, C, int(cfg.encoder_hidden_size), cfg.encoder_type, float(cfg.dropout), device=device)
    model.embed_tokens = VirtualTokenEmbedding(model.embed_tokens, encoder)
    return PromptTunedModel(model, n)
