"""The completion log-probabilities of the preference methods, with the head in token chunks: the values and
gradients of the whole-logits path (fp32)."""

from __future__ import annotations

import pytest
import torch

from lmforge.align.objective import sequence_logps
from lmforge.models import ModelConfig, Transformer


@pytest.mark.parametrize("cap", [None, 5.0])
def test_chunked_head_gives_the_whole_logits_values_and_gradients(cap):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=True,
                      final_logit_softcapping=cap)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (3, 13), generator=g)
    mask = (torch.rand(3, 13, generator=g) > 0.4).long()
    results = []
    for chunk in (0, 7):  # 7 tokens a chunk: 36 positions make 6 chunks, the last one short
        model.zero_grad()
        logps, n = sequence_logps(model, tokens, mask, chunk=chunk)
        (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((logps.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (whole, n0, g0), (chunked, n1, g1) = results
    assert torch.equal(n0, n1) and torch.equal(n0, mask[:, 1:].sum(-1).float())
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-6, msg=k)


def test_automatic_chunking_is_on_for_large_vocabularies_only():
    from lmforge.train.assembly import resolve_loss_chunk_size

    assert resolve_loss_chunk_size(None, ModelConfig(vocab_size=32000)) == 0
    assert resolve_loss_chunk_size(None, ModelConfig(vocab_size=128256)) == 2048
