"""Online RL's per-token log-probabilities and entropy (the logged metric) with the head in token chunks: the
values and gradients of the whole-logits computation, and no other (tokens x vocabulary) tensor built for the
entropy."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.align.rl import token_logps
from lmforge.models import ModelConfig, Transformer

V = 97


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=True,
                      final_logit_softcapping=5.0, init_method_std=0.1)
    net = Transformer(cfg)
    net.init_weights(seed=0)
    return net


class _LargestOutputs(TorchDispatchMode):
    """Records every op's output sizes (elements) while active."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
        return out


def _whole(net, rows):
    """The computation token_logps made before: whole fp32 logits, their log-softmax, the entropy from them."""
    logits = torch.nn.functional.linear(net.hidden_states(rows[:, :-1]), net.output_weight()).float()
    logits = 5.0 * torch.tanh(logits / 5.0)
    lp = logits.log_softmax(-1)
    picked = torch.gather(lp, 2, rows[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked, -(lp.exp() * lp).detach().sum(-1)


@pytest.mark.parametrize("chunk", [0, 7])
def test_chunked_entropy_and_logps_equal_the_whole_computation(model, chunk):
    rows = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([[1.0], [-2.0], [0.5]])
    model.zero_grad()
    want_lp, want_ent = _whole(model, rows)
    (want_lp * weights).sum().backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    lp, ent = token_logps(model, rows, entropy=True, chunk=chunk)
    assert not ent.requires_grad and lp.requires_grad
    (lp * weights).sum().backward()
    torch.testing.assert_close(lp.detach(), want_lp.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[k], rtol=1e-4, atol=1e-6, msg=k)  # summation order


def test_no_whole_vocabulary_tensor_is_built_with_chunks(model):
    """36 positions in chunks of 7: no op (forward or the recomputing backward) outputs more than a chunk's
    logits; the whole computation's logits are 36 x V."""
    rows = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(2))
    with _LargestOutputs() as seen:
        lp, ent = token_logps(model, rows, entropy=True, chunk=7)
        lp.sum().backward()
    assert max(seen.sizes) <= max(7 * V, model.output_weight().numel())
    with _LargestOutputs() as whole:
        _whole(model, rows)
    assert max(whole.sizes) >= 36 * V  # the check sees a whole logits tensor where one is built
