"""lmforge's preference and reward losses equal TRL's, values and gradients, on the same tiny model and batch.

The model is a transformers Llama (random weights) and its lmforge conversion. TRL's own loss code runs on the
Hugging Face model's outputs: DPOTrainer / KTOTrainer ``_compute_loss`` with a stand-in trainer (``self``) and a
model wrapper giving per-token log-probabilities as TRL's fused head does; CPO's ``cpo_loss`` (SimPO), ORPO's
``odds_ratio_loss`` and their ``get_batch_logps``; RewardTrainer's ``compute_loss`` on the sequence-classification
model. lmforge's objective runs on the converted model; losses and every parameter's gradient agree to 1e-5.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import transformers

from lmforge.align.config import AlignSection
from lmforge.align.objective import PreferenceLoss, RewardLoss, sequence_logps

V, B, PROMPT, LONGEST = 24, 3, 4, 11


class Accel:
    """What TRL's loss code asks of an accelerate.Accelerator on one process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(m):
        return m


def trainer_self(**fields):
    base = dict(accelerator=Accel(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, precompute_ref_logps=True)
    ns = types.SimpleNamespace(**{**base, **fields})
    return ns


class FusedHead(torch.nn.Module):
    """A transformers causal LM answering as TRL's fused LM head does: per-token log-probs of the labels (0 where
    a label is -100), entropy, mean logits and top-1 hits."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        logits = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        target = labels[:, 1:]
        keep = target != -100
        lp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        zeros = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _hf_config(seed=0):
    return transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    pad_token_id=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy HF, policy lmforge, reference HF, reference lmforge): two random models, each in both forms."""
    from lmforge.convert.hf import load_hf_model

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        hf = transformers.LlamaForCausalLM(_hf_config()).float()
        folder = tmp_path_factory.mktemp(f"hf{seed}")
        hf.save_pretrained(folder)
        ours, _ = load_hf_model(folder, torch.device("cpu"), torch.float32)
        out += [hf.train(), ours.train()]
    return out


def _pairs(seed=0):
    """B pairs: a shared prompt, chosen and rejected completions of different lengths, right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(B, 2, LONGEST, dtype=torch.long)
    mask = torch.zeros(B, 2, LONGEST, dtype=torch.long)
    lengths = torch.zeros(B, 2, dtype=torch.long)
    for b in range(B):
        prompt = torch.randint(1, V, (PROMPT,), generator=g)
        for s in range(2):
            n = int(torch.randint(2, LONGEST - PROMPT + 1, (1,), generator=g))
            tokens[b, s, :PROMPT] = prompt
            tokens[b, s, PROMPT:PROMPT + n] = torch.randint(1, V, (n,), generator=g)
            mask[b, s, PROMPT:PROMPT + n] = 1
            lengths[b, s] = PROMPT + n
    return tokens, mask, lengths


def _ref_table(ref_ours, tokens, mask):
    with torch.no_grad():
        c = sequence_logps(ref_ours, tokens[:, 0], mask[:, 0])[0]
        r = sequence_logps(ref_ours, tokens[:, 1], mask[:, 1])[0]
    return torch.stack([c, r], 1)


def _grads(model, prefix=""):
    return {prefix + n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(hf, ours, loss_trl, loss_ours):
    for m in (hf, ours):
        m.zero_grad(set_to_none=True)
    loss_trl.backward()
    loss_ours.backward()
    torch.testing.assert_close(loss_ours.detach(), loss_trl.detach().float(), atol=1e-5, rtol=1e-5)
    g_hf = {n.removeprefix("model."): g for n, g in _grads(hf).items()}
    g_ours = _grads(ours)
    assert sorted(g_hf) == sorted(g_ours) and len(g_ours) > 10
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_hf[name], atol=1e-5, rtol=1e-4, msg=name)


def _ours(method, ours, table, tokens, mask, lengths, **settings):
    obj = PreferenceLoss(ours, method, AlignSection(**settings), reference="precomputed", ref_table=table)
    if method in ("rpo", "orpo"):
        obj.set_totals(list(obj.count({"tokens": tokens, "mask": mask})))
    loss_sum, n = obj(tokens=tokens, mask=mask, index=torch.arange(B), lengths=lengths)
    return loss_sum / n


def _trl_pair_inputs(tokens, mask, lengths, table):
    rows = torch.cat([tokens[:, 0], tokens[:, 1]])
    m = torch.cat([mask[:, 0], mask[:, 1]])
    attention = (torch.arange(LONGEST)[None] < torch.cat([lengths[:, 0], lengths[:, 1]])[:, None]).long()
    return {"input_ids": rows, "attention_mask": attention, "completion_mask": m,
            "ref_chosen_logps": table[:, 0], "ref_rejected_logps": table[:, 1]}


@pytest.mark.parametrize("loss_type,method,beta", [("sigmoid", "dpo", 0.1), ("ipo", "ipo", 0.3)])
def test_dpo_and_ipo_equal_trl(models, loss_type, method, beta):
    from trl import DPOTrainer

    hf, ours, _, ref_ours = models
    tokens, mask, lengths = _pairs()
    table = _ref_table(ref_ours, tokens, mask)
    me = trainer_self(model=hf, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
                      loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False)
    loss_trl = DPOTrainer._compute_loss(me, FusedHead(hf), _trl_pair_inputs(tokens, mask, lengths, table), False)
    _compare(hf, ours, loss_trl, _ours(method, ours, table, tokens, mask, lengths, beta=beta))
    assert me._metrics["train"]["rewards/accuracies"]  # TRL's own bookkeeping ran on these inputs


def test_rpo_equals_trl_sigmoid_plus_sft(models):
    """RPO = TRL's loss_type [sigmoid, sft] weighted [1, rpo_alpha]."""
    from trl import DPOTrainer

    hf, ours, _, ref_ours = models
    tokens, mask, lengths = _pairs()
    table = _ref_table(ref_ours, tokens, mask)
    me = trainer_self(model=hf, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid", "sft"],
                      loss_weights=[1.0, 0.7], beta=0.1, label_smoothing=0.0, use_weighting=False)
    loss_trl = DPOTrainer._compute_loss(me, FusedHead(hf), _trl_pair_inputs(tokens, mask, lengths, table), False)
    _compare(hf, ours, loss_trl, _ours("rpo", ours, table, tokens, mask, lengths, beta=0.1, rpo_alpha=0.7))


def test_dpo_label_smoothing_equals_trl(models):
    """cDPO's smoothed loss, pair by pair, equals TRL's aot loss on one pair (sorting a single value is the
    identity, which leaves exactly the label-smoothed sigmoid loss)."""
    from trl import DPOTrainer

    hf, ours, _, ref_ours = models
    tokens, mask, lengths = _pairs()
    table = _ref_table(ref_ours, tokens, mask)
    for b in range(B):
        one = slice(b, b + 1)
        inputs = _trl_pair_inputs(tokens, mask, lengths, table)
        inputs = {k: torch.cat([v[b:b + 1], v[B + b:B + b + 1]]) if v.shape[0] == 2 * B else v[one]
                  for k, v in inputs.items()}
        me = trainer_self(model=hf, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["aot"],
                          loss_weights=[1.0], beta=0.2, label_smoothing=0.2, use_weighting=False)
        loss_trl = DPOTrainer._compute_loss(me, FusedHead(hf), inputs, False)
        obj = PreferenceLoss(ours, "dpo", AlignSection(beta=0.2, label_smoothing=0.2), "precomputed",
                             table[one].contiguous())
        loss_ours, _ = obj(tokens=tokens[one], mask=mask[one], index=torch.zeros(1, dtype=torch.long))
        _compare(hf, ours, loss_trl, loss_ours)


def test_kto_equals_trl(models):
    from trl import KTOTrainer

    hf, ours, _, ref_ours = models
    tokens, mask, lengths = _pairs(seed=3)
    rows, rmask = tokens[:, 0], mask[:, 0]  # B completions
    kl_rows, kl_mask = tokens[:, 1], mask[:, 1]  # their mismatched KL sides
    label = torch.tensor([1, 0, 1])
    with torch.no_grad():
        table = torch.stack([sequence_logps(ref_ours, rows, rmask)[0], sequence_logps(ref_ours, kl_rows, kl_mask)[0]], 1)
    attention = lambda L: (torch.arange(LONGEST)[None] < L[:, None]).long()  # noqa: E731
    inputs = {"input_ids": rows, "attention_mask": attention(lengths[:, 0]), "completion_mask": rmask,
              "KL_input_ids": kl_rows, "KL_attention_mask": attention(lengths[:, 1]), "KL_completion_mask": kl_mask,
              "label": label.bool(), "ref_logps": table[:, 0], "ref_KL_logps": table[:, 1]}
    me = trainer_self(model=hf, calculate_KL=True, loss_type="kto", beta=0.3, desirable_weight=1.0,
                      undesirable_weight=1.5)
    me._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, me)
    out = KTOTrainer._compute_loss(me, FusedHead(hf), inputs, False)
    loss_trl = out[0] if isinstance(out, tuple) else out
    obj = PreferenceLoss(ours, "kto", AlignSection(beta=0.3, undesirable_weight=1.5), "precomputed", table)
    loss_sum, n = obj(tokens=rows, mask=rmask, index=torch.arange(B), label=label, kl_tokens=kl_rows,
                      kl_mask=kl_mask)
    assert me._metrics["train"]["kl"][-1] >= 0
    _compare(hf, ours, loss_trl, loss_sum / n)


def _trl_logits_and_labels(hf, tokens, mask, lengths):
    rows = torch.cat([tokens[:, 0], tokens[:, 1]])
    m = torch.cat([mask[:, 0], mask[:, 1]])
    L = torch.cat([lengths[:, 0], lengths[:, 1]])
    attention = (torch.arange(LONGEST)[None] < L[:, None]).long()
    logits = hf(input_ids=rows, attention_mask=attention).logits
    return logits, rows.masked_fill(m == 0, -100)


def test_simpo_equals_trl_cpo(models):
    from trl.experimental.cpo import CPOTrainer

    hf, ours, _, _ = models
    tokens, mask, lengths = _pairs(seed=4)
    logits, labels = _trl_logits_and_labels(hf, tokens, mask, lengths)
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    me = trainer_self(loss_type="simpo", alpha=0.0, beta=2.0, simpo_gamma=0.6, label_smoothing=0.1)
    losses, _, _ = CPOTrainer.cpo_loss(me, avg[:B], avg[B:])
    _compare(hf, ours, losses.mean(), _ours("simpo", ours, None, tokens, mask, lengths, beta=2.0, simpo_gamma=0.6,
                                            label_smoothing=0.1))


def test_orpo_equals_trl(models):
    """ORPO = TRL's odds-ratio term + the chosen completions' mean NLL (TRL's trainer also counts the prompt's
    tokens in that NLL; lmforge masks prompts, as for every method)."""
    from trl.experimental.orpo import ORPOTrainer

    hf, ours, _, _ = models
    tokens, mask, lengths = _pairs(seed=5)
    logits, labels = _trl_logits_and_labels(hf, tokens, mask, lengths)
    avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    me = trainer_self(beta=0.25)
    losses, *_ = ORPOTrainer.odds_ratio_loss(me, avg[:B], avg[B:])
    nll = F.cross_entropy(logits[:B, :-1].reshape(-1, V), labels[:B, 1:].reshape(-1), ignore_index=-100)
    _compare(hf, ours, nll - losses.mean(), _ours("orpo", ours, None, tokens, mask, lengths, beta=0.25))


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_equals_trl_reward_trainer(models, with_margin):
    from trl import RewardTrainer

    hf_lm, ours, _, _ = models
    torch.manual_seed(7)
    cfg = _hf_config()
    cfg.num_labels = 1
    hf = transformers.LlamaForSequenceClassification(cfg).float().train()
    hf.model.load_state_dict(hf_lm.model.state_dict())
    ours.score = torch.nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        ours.score.weight.copy_(hf.score.weight)
    try:
        tokens, mask, lengths = _pairs(seed=6)
        rows = torch.cat([tokens[:, 0], tokens[:, 1]])
        L = torch.cat([lengths[:, 0], lengths[:, 1]])
        inputs = {"input_ids": rows, "attention_mask": (torch.arange(LONGEST)[None] < L[:, None]).long()}
        margin = torch.tensor([0.5, -0.2, 1.0]) if with_margin else None
        if with_margin:
            inputs["margin"] = margin
        me = trainer_self(model=hf, args=types.SimpleNamespace(center_rewards_coefficient=0.01))
        loss_trl = RewardTrainer.compute_loss(me, hf, dict(inputs))
        obj = RewardLoss(ours, center_rewards_coefficient=0.01)
        loss_sum, n = obj(tokens=tokens, mask=mask, index=torch.arange(B), lengths=lengths, margin=margin)
        for m in (hf, ours):
            m.zero_grad(set_to_none=True)
        loss_trl.backward()
        (loss_sum / n).backward()
        torch.testing.assert_close((loss_sum / n).detach(), loss_trl.detach(), atol=1e-5, rtol=1e-5)
        g_hf = {n.removeprefix("model."): g for n, g in _grads(hf).items()}
        g_ours = {k: v for k, v in _grads(ours).items() if k != "lm_head.weight"}
        assert sorted(g_hf) == sorted(g_ours)
        for name in g_ours:
            torch.testing.assert_close(g_ours[name], g_hf[name], atol=1e-5, rtol=1e-4, msg=name)
    finally:
        del ours.score
