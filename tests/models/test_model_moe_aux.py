"""Mixtral's router load-balancing loss: equal to HF's load_balancing_loss_func over the same router
logits, off (nothing computed) by default, and its gradient reaches the routers."""

import torch

from lmforge.models import ModelConfig, Transformer
from lmforge.models.families import hf_to_model_config
from lmforge.models.transformer import MoE
from lmforge.train.objectives import CausalLMLoss


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=48, max_position_embeddings=32, normalization="rmsnorm", activation="swiglu",
                bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=False,
                num_moe_experts=4, moe_router_topk=2)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():  # make routing uneven so the loss is not at its balanced minimum
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.mul_(100.0)
    return model


def capture_router_logits(model: Transformer) -> list[torch.Tensor]:
    logits = []
    for m in model.modules():
        if isinstance(m, MoE):
            m.router.register_forward_hook(lambda mod, inp, out: logits.append(out.detach().float()))
    return logits


def direct_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Written out from the definition: tokens of all layers pooled; f_e = top-k slots for e per token,
    P_e = mean router probability of e; loss = E * sum_e f_e * P_e."""
    logits = torch.cat(router_logits, dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    f = torch.stack([(chosen == e).sum() for e in range(num_experts)]).float() / logits.shape[0]
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def test_aux_loss_matches_reference_and_hf():
    cfg = moe_cfg(moe_aux_loss_coeff=0.02)
    model = build(cfg).train()
    logits = capture_router_logits(model)
    tokens = torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    model(tokens)
    assert len(logits) == cfg.num_layers
    aux = model.moe_aux_loss()
    ours = float(aux.detach())
    ref = float(direct_loss(logits, 4, 2))
    assert abs(ours - ref) < 1e-6, (ours, ref)
    # the balanced value is top_k (=2); this routing is uneven, so the loss is clearly above it
    assert ours > 2.01
    # per-layer losses are each layer's own E * sum f P
    for m, lg in zip([m for m in model.modules() if isinstance(m, MoE)], logits):
        assert abs(float(m.aux_loss.detach()) - float(direct_loss([lg], 4, 2))) < 1e-6

    try:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    except ImportError:  # reference above still checked
        return
    hf = float(load_balancing_loss_func(tuple(logits), 4, 2))
    assert abs(ours - hf) < 1e-5, (ours, hf)


def test_objective_adds_coeff_times_aux_per_token():
    cfg = moe_cfg(moe_aux_loss_coeff=0.5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    model = build(cfg).train()
    loss_sum, n = CausalLMLoss(model)(tokens)
    aux = model.moe_aux_loss()
    model_off = build(moe_cfg(moe_aux_loss_coeff=0.0)).train()  # same seed: same weights
    plain_sum, n_off = CausalLMLoss(model_off)(tokens)
    assert n == n_off == 2 * 8
    assert torch.allclose(loss_sum, plain_sum + 0.5 * aux * n, atol=1e-4)
    assert float((loss_sum - plain_sum).detach()) > 0.5 * 2.0 * n * 0.99  # aux is about top_k: a real addition
    # with a loss mask the term scales with the counted tokens
    mask = torch.zeros_like(tokens)
    mask[:, 5:] = 1
    masked, n_masked = CausalLMLoss(model)(tokens, loss_mask=mask)
    plain_masked, _ = CausalLMLoss(model_off)(tokens, loss_mask=mask)
    assert n_masked == 2 * 4
    assert torch.allclose(masked, plain_masked + 0.5 * model.moe_aux_loss() * n_masked, atol=1e-4)


def test_off_by_default_and_in_eval():
    cfg = moe_cfg()
    assert cfg.moe_aux_loss_coeff == 0.0
    model = build(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    loss_sum, _ = CausalLMLoss(model)(tokens)
    assert model.moe_aux_loss() is None
    assert all(m.aux_stats is None and m.aux_loss is None for m in model.modules() if isinstance(m, MoE))
    # on in the config, but eval mode: nothing computed and the objective adds nothing
    model_on = build(moe_cfg(moe_aux_loss_coeff=0.02))
    model_on.eval()
    with torch.no_grad():
        eval_sum, _ = CausalLMLoss(model_on)(tokens)
        ref_sum, _ = CausalLMLoss(build(cfg).eval())(tokens)
    assert model_on.moe_aux_loss() is None
    assert torch.allclose(eval_sum, ref_sum)
    # the forward's return value is unchanged either way
    assert model_on(tokens).shape == (2, 7, cfg.vocab_size)


def test_gradient_reaches_router():
    cfg = moe_cfg(moe_aux_loss_coeff=0.02)
    model = build(cfg).train()
    model(torch.randint(0, cfg.vocab_size, (2, 10)))
    model.moe_aux_loss().backward()
    routers = [m.router.weight for m in model.modules() if isinstance(m, MoE)]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)
    assert model.embed_tokens.weight.grad is not None  # through the hidden states into the router inputs
    last = model.layers[-1].mlp  # the last layer's experts come after every router: no gradient from this loss
    assert all(p.grad is None for p in last.experts.parameters())


def test_mixtral_family_reads_router_aux_loss_coef():
    hf = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=64, hidden_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
              num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
    _, cfg = hf_to_model_config(hf)
    assert cfg.moe_aux_loss_coeff == 0.02
    _, cfg = hf_to_model_config({k: v for k, v in hf.items() if k != "router_aux_loss_coef"})
    assert cfg.moe_aux_loss_coeff == 0.001
