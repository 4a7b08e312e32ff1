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


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("head_trains", [False, True])
def test_token_logps_equal_the_plain_log_softmax(cap, head_trains):
    """The chunked head's values and gradients: a frozen head (PEFT) keeps the input gradient from the forward
    pass, a trained one recomputes each chunk in the backward pass; both equal autograd through the whole logits.
    The entropy online RL logs comes from the same chunks' logits (entropy=True), detached, the gradients as they
    are without it."""
    from lmforge.align.objective import token_logps
    from lmforge.models.transformer import softcap

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(23, 16, generator=g)
    weight = torch.randn(41, 16, generator=g) * 0.5
    ids = torch.randint(0, 41, (23,), generator=g)
    scale = torch.randn(23, generator=g)
    results, entropies = [], []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(head_trains)
        if chunked:
            out, ent = token_logps(h, w, ids, cap, chunk=5, entropy=True)
            assert not ent.requires_grad
        else:
            logits = h @ w.t()
            logits = softcap(logits, cap) if cap is not None else logits
            lp = logits.log_softmax(-1)
            out, ent = lp.gather(1, ids[:, None])[:, 0], -(lp.exp() * lp).sum(-1).detach()
        (out * scale).sum().backward()
        results.append((out.detach(), h.grad, w.grad))
        entropies.append(ent)
    (o0, h0, w0), (o1, h1, w1) = results
    torch.testing.assert_close(entropies[1], entropies[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o1, o0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
    if head_trains:
        torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
    else:
        assert w1 is None


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("entropy", [False, True])
def test_logp_chunk_compiled_form_equals_the_eager_one(cap, entropy):
    """The chunk's ``onehot(id) - softmax`` has two forms of the same values: under compile one elementwise expression
    (a column-index one-hot, fused by inductor with the logsumexp), eagerly in place with a scatter. Traced by
    aot_eager (the compiled branch, no C++ compiler needed) they agree exactly, entropy included."""
    from lmforge.align.objective import _logp_entropy_chunk

    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(9, 50, generator=g) * 4).to(torch.bfloat16)
    ids = torch.randint(0, 50, (9,), generator=g)
    eager = _logp_entropy_chunk(logits.clone(), ids, cap, True, entropy)
    compiled = torch.compile(_logp_entropy_chunk, backend="aot_eager", fullgraph=True)(logits.clone(), ids, cap, True,
                                                                                     entropy)
    assert eager[1].dtype == compiled[1].dtype == torch.bfloat16
    for a, b in zip(eager, compiled):
        assert (a is None and b is None) or torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7)
    assert eager[1].float().max() > 0.3  # the +1 at each id is there (the softmax part alone stays below it)
