import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.train.optim import CosineAnnealing, build_optimizer, build_schedule, param_groups


def test_cosine_warmup_decay_constant():
    s = CosineAnnealing(lr=1.0, max_steps=100, warmup_steps=10, constant_steps=20, min_lr=0.1)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    # halfway through the 70 decay steps: the midpoint between lr and min_lr
    assert s.lr_at(45) == pytest.approx(0.55)
    assert s.lr_at(79) > 0.1 and s.lr_at(79) < 0.11
    for step in range(80, 100):
        assert s.lr_at(step) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 80)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_errors_and_constant():
    assert build_schedule("constant", 0.5, 10).lr_at(7) == 0.5
    with pytest.raises(ConfigError, match="CosineAnnealing"):
        build_schedule("WarmupHoldPolicyX", 0.5, 10)


def test_no_weight_decay_on_biases_and_norms():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(m, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for p in groups[0]["params"]) == 16
    assert sum(p.numel() for p in groups[1]["params"]) == 4 + 8


def test_optimizer_names_and_betas():
    m = torch.nn.Linear(4, 4)
    opt = build_optimizer(m, "fused_adam", 1e-3, 0.01, [0.9, 0.95], 1e-8, torch.device("cpu"))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ConfigError, match="model.optim.name"):
        build_optimizer(m, "lamb", 1e-3, 0.01, [0.9, 0.95], 1e-8, torch.device("cpu"))
    with pytest.raises(ConfigError, match="betas"):
        build_optimizer(m, "adamw", 1e-3, 0.01, [0.9], 1e-8, torch.device("cpu"))


def test_loss_objective_equals_cross_entropy_of_the_model_logits_with_softcapping():
    """CausalLMLoss fuses the head into the loss; it must still equal the model's own logits' loss,
    including Gemma 2's final logit soft-capping."""
    import torch.nn.functional as F

    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.objectives import CausalLMLoss

    for cap in (None, 5.0):
        cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                          max_position_embeddings=32, final_logit_softcapping=cap, init_method_std=0.5)
        model = Transformer(cfg)
        model.init_weights(seed=0)
        tokens = torch.randint(0, 50, (2, 9))
        loss_sum, n = CausalLMLoss(model)(tokens)
        logits = model(tokens[:, :-1])
        ref = F.cross_entropy(logits.reshape(-1, 50).float(), tokens[:, 1:].reshape(-1), reduction="sum")
        assert n == 16
        assert torch.allclose(loss_sum, ref, rtol=1e-5)
