"""Preference pairs read as one row ``[prompt | chosen | rejected]`` (align.shared_prompt) give the losses and
gradients of the two-row layout for every paired method (fp32, CPU), with prompts and completions of different
lengths and padding; a rejected completion does not see the chosen one; the head reads completion tokens only."""

from __future__ import annotations

import pytest
import torch

from lmforge.align.config import AlignSection
from lmforge.align.data import PairDataset, Side
from lmforge.align.objective import PreferenceLoss, RewardLoss, _target_logps, pair_inputs, sequence_logps
from lmforge.models import ModelConfig, Transformer

V = 61
#: (prompt, chosen, rejected) lengths: a one-token prompt, a one-token completion, the longest row padded
SHAPES = [(5, 3, 7), (1, 4, 2), (9, 6, 6), (3, 1, 5)]


def _model(**over) -> Transformer:
    cfg = dict(vocab_size=V, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
               ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
               bias=False, position_embedding_type="rope", share_embeddings_and_output_weights=True,
               hidden_dropout=0.0, attention_dropout=0.0)
    cfg.update(over)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg))
    model.init_weights(seed=0)
    return model


def _pairs(pad_id: int = 0) -> PairDataset:
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    chosen, rejected = [], []
    for P, Rc, Rr in SHAPES:
        prompt = ids(P)
        chosen.append(Side(prompt + ids(Rc), [0] * P + [1] * Rc))
        rejected.append(Side(prompt + ids(Rr), [0] * P + [1] * Rr))
    return PairDataset(chosen, rejected, [0.5, None, -1.0, 2.0], pad_id)


@pytest.fixture(scope="module")
def batches():
    """(two rows per pair, one row per pair) of the same pairs."""
    ds = _pairs()
    items = [ds[i] for i in range(len(ds))]
    two = ds.collate(items)
    ds.shared_prompt = True
    return two, ds.collate(items)


def test_the_shared_row_layout(batches):
    two, one = batches
    P, Rc, Rr = SHAPES[0]
    assert tuple(one["tokens"].shape) == (4, max(p + c + r for p, c, r in SHAPES))  # 21 < 2 x 15 of two rows
    assert one["positions"][0, :P + Rc + Rr].tolist() == list(range(P + Rc)) + list(range(P, P + Rr))
    assert one["tokens"][0, :P + Rc].tolist() == two["tokens"][0, 0, :P + Rc].tolist()
    assert one["tokens"][0, P + Rc:P + Rc + Rr].tolist() == two["tokens"][0, 1, P:P + Rr].tolist()
    assert one["part"][0].tolist() == [0] * P + [1] * Rc + [2] * Rr + [0] * (21 - P - Rc - Rr)  # padding last
    assert one["ends"].tolist() == [[P + c, P + c + r] for (P, c, r) in SHAPES]
    # the same tokens are read, in the same order, chosen completions first
    assert torch.equal(one["targets"][1:], two["targets"][1:])
    # attention rows: [prompt | chosen] of every pair, then [prompt | rejected], gathered from the inputs (L-1 wide)
    W = one["tokens"].shape[1] - 1
    gather, scatter = one["rows_gather"], one["rows_scatter"]
    assert gather.shape == (8, max(p + max(c, r) for p, c, r in SHAPES))
    assert gather[0, :P + Rc].tolist() == list(range(P + Rc))
    assert gather[4, :P + Rr].tolist() == list(range(P)) + list(range(P + Rc, P + Rc + Rr))
    T2 = gather.shape[1]
    assert scatter[0, :P + Rc + Rr].tolist() == list(range(P + Rc)) + [4 * T2 + P + k for k in range(Rr)]
    assert int(gather.max()) < 4 * W


def _inputs(batch, path):
    """pair_inputs of a shared batch with its attention as gathered rows or as the dense mask."""
    rows = (batch["rows_gather"], batch["rows_scatter"]) if path == "rows" else (None, None)
    return pair_inputs(batch["tokens"], None, batch["targets"], batch["positions"], batch["part"], *rows)


def test_gathered_rows_equal_the_dense_mask(batches):
    _, one = batches
    model = _model()
    out = []
    for path in ("rows", "mask"):
        rows = _inputs(one, path)
        assert ("attn_rows" in rows) == (path == "rows") and ("attn_mask" in rows) == (path == "mask")
        model.zero_grad(set_to_none=True)
        logps, n = _target_logps(model, rows)
        (logps * torch.linspace(-1, 1, 8)).sum().backward()
        out.append((logps.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-5)
    for k in out[0][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], rtol=0, atol=1e-5 * float(out[1][1][k].abs().max()))


def _run(model, method, batch, reference, table=None, **settings):
    model.zero_grad(set_to_none=True)
    obj = PreferenceLoss(model, method, AlignSection(**settings), reference, table)
    if method in ("rpo", "orpo"):
        obj.set_totals(list(obj.count(batch)))
    loss, n = obj(**batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, obj.pop_metrics("train")


def _same(a, b, tol=1e-6):
    """Losses within ``tol``; logged rewards (differences of sums) and gradients within 10 ``tol`` (gradients: of
    their largest entry): in fp32 the two layouts sum attention and head products in other orders (2e-6 apart at
    most here)."""
    (la, ga, ma), (lb, gb, mb) = a, b
    torch.testing.assert_close(lb, la, rtol=tol, atol=tol)
    assert sorted(ga) == sorted(gb) and ga
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=0, atol=10 * tol * float(ga[k].abs().max()), msg=k)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], rel=tol, abs=10 * tol), k  # rewards: beta x (policy - reference)


@pytest.mark.parametrize("method", ["dpo", "ipo", "rpo", "orpo", "simpo"])
def test_every_paired_method_full_weights(batches, method):
    """All weights train (the head too: its gradient is recomputed chunk by chunk); the reference is a table."""
    two, one = batches
    model = _model()
    table = torch.tensor([[-40.0, -55.0], [-30.0, -12.0], [-70.0, -66.0], [-5.0, -33.0]])
    reference = "precomputed" if method in ("dpo", "ipo", "rpo") else None
    settings = dict(beta=0.05, label_smoothing=0.1) if method in ("dpo", "simpo") else dict(beta=0.05)
    _same(_run(model, method, two, reference, table, **settings), _run(model, method, one, reference, table,
                                                                         **settings))


@pytest.mark.parametrize("method", ["dpo", "ipo", "rpo"])
def test_lora_with_the_reference_adapters_off(batches, method):
    """LoRA (a frozen head: its input gradient kept from the forward pass) and the reference forward with the
    adapters off over the same shared rows; the head in chunks of 5 tokens."""
    from lmforge.peft import apply_peft
    from lmforge.peft.lora import LoRAConfig, LoRALinear

    two, one = batches
    model = apply_peft(_model(), "lora", LoRAConfig(r=4, target_modules=["all-linear"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 would make the policy the reference
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    out = []
    for batch in (two, one):
        model.zero_grad(set_to_none=True)
        obj = PreferenceLoss(model, method, AlignSection(beta=0.5), "adapters_off")
        obj.loss_chunk_size = 5
        if method == "rpo":
            obj.set_totals(list(obj.count(batch)))
        loss, _ = obj(**batch)
        loss.backward()
        out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
                    obj.pop_metrics("train")))
    assert all(".lora_" in k for k in out[0][1])
    _same(*out)


def test_reward_model_reads_each_side_last_token(batches):
    two, one = batches
    model = _model()
    model.score = torch.nn.Linear(32, 1, bias=False)
    torch.nn.init.normal_(model.score.weight, generator=torch.Generator().manual_seed(2))
    res = []
    for batch in (two, one):
        model.zero_grad(set_to_none=True)
        obj = RewardLoss(model, center_rewards_coefficient=0.01)
        loss, _ = obj(**batch)
        loss.backward()
        res.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
                    obj.pop_metrics("train")))
    _same(*res)


@pytest.mark.parametrize("path", ["rows", "mask"])
def test_rejected_tokens_do_not_see_the_chosen_completion(path):
    """Another chosen completion for pair 2 (same length) moves its chosen log-probability only."""
    model = _model()
    ds = _pairs()
    ds.shared_prompt = True
    logps = []
    for _ in range(2):
        batch = ds.collate([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            logps.append(_target_logps(model, _inputs(batch, path))[0])
        c = ds.chosen[2]
        ds.chosen[2] = Side([t if m == 0 else t % (V - 1) + 1 for t, m in zip(c.ids, c.mask)], c.mask)
    a, b = logps
    assert not torch.allclose(a[2], b[2])  # the chosen completion of pair 2 changed
    assert torch.equal(a[4 + 2], b[4 + 2])  # its rejected completion's log-probability did not move
    keep = [0, 1, 3, 4, 5, 7]
    assert torch.equal(a[keep], b[keep])  # nor did the other pairs'


def test_the_head_runs_on_completion_tokens_only(batches, monkeypatch):
    """The output head sees the M counted tokens, not every position of the rows."""
    import lmforge.align.objective as objective

    two, one = batches
    seen = []
    real = objective._logp_chunk
    monkeypatch.setattr(objective, "_logp_chunk", lambda logits, *a: seen.append(logits.shape[0]) or real(logits, *a))
    model = _model()
    for batch in (two, one):
        seen.clear()
        with torch.no_grad():
            objective._target_logps(model, pair_inputs(batch["tokens"], batch.get("mask"), batch["targets"],
                                                       batch.get("positions"), batch.get("part"),
                                                       batch.get("rows_gather"), batch.get("rows_scatter")))
        assert sum(seen) == batch["targets"].shape[1] == sum(c + r for p, c, r in SHAPES)  # no prompt token
    # and a mask-only call (KTO, precomputed tables) finds the same tokens
    rows = torch.cat([two["tokens"][:, 0], two["tokens"][:, 1]])
    with torch.no_grad():
        logps, n = sequence_logps(model, rows, torch.cat([two["mask"][:, 0], two["mask"][:, 1]]))
    assert n.tolist() == [c for _, c, _ in SHAPES] + [r for _, _, r in SHAPES]


def test_models_measuring_token_distance_keep_two_rows(tmp_path):
    """ALiBi (or a sliding window): automatic mode keeps two rows; align.shared_prompt=true is one error line."""
    from lmforge.align.config import load_align_config
    from lmforge.align.stage import shared_prompt
    from lmforge.errors import ConfigError

    alibi = _model(position_embedding_type="alibi").cfg
    window = _model(sliding_window=4).cfg
    auto = load_align_config({"method": "dpo"}, need_paths=False)
    assert shared_prompt(auto, _model().cfg) and not shared_prompt(auto, alibi) and not shared_prompt(auto, window)
    on = load_align_config({"method": "dpo", "model": "m", "align": {"shared_prompt": True}}, need_paths=False)
    with pytest.raises(ConfigError, match="align.shared_prompt=true cannot act on m: ALiBi"):
        shared_prompt(on, alibi)
    off = load_align_config({"method": "simpo", "align": {"shared_prompt": False}}, need_paths=False)
    assert not shared_prompt(off, _model().cfg)


@pytest.mark.parametrize("config, message", [
    ({"method": "kto", "align": {"shared_prompt": True}}, "align.shared_prompt applies to the paired methods"),
    ({"method": "regression_rm", "align": {"shared_prompt": False}}, "align.shared_prompt applies to the paired"),
    ({"method": "dpo", "peft": {"method": "ptuning"}, "align": {"shared_prompt": True}}, "with --peft ptuning"),
])
def test_shared_prompt_refused_where_it_cannot_act(config, message):
    from lmforge.align.config import load_align_config
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_align_config(config, need_paths=False)
    auto = load_align_config({**config, "align": {}}, need_paths=False)
    assert not auto.shared_prompt  # KTO, attribute models and p-tuning keep their rows


def test_compile_reaches_the_blocks_and_the_head(tmp_path):
    """compile=true: the assembly compiles each block and the preference head's chunk function (a compiled DPO
    step on the CPU takes ~95 s, so the step itself is left to the GPU benchmark: dpo_throughput.py --compile);
    online methods refuse it."""
    from lmforge.align.config import load_align_config
    from lmforge.align.objective import _logp_chunk
    from lmforge.align.stage import job_from_config
    from lmforge.errors import ConfigError
    from lmforge.finetune.stage import stage_layout
    from lmforge.parallel.runtime import init_runtime, shutdown
    from lmforge.train.assembly import build_training

    cfg = load_align_config({"method": "dpo", "out": str(tmp_path / "out"), "compile": True, "resume": False,
                             "micro_batch_size": 2, "global_batch_size": 2, "trainer": {"accelerator": "cpu"}},
                            need_paths=False)
    rt = init_runtime("cpu")
    try:
        dims, accum = stage_layout(cfg, rt)
        job = job_from_config(cfg, dims, accum, None)
        assert job.compile
        model = _model()
        training = build_training(job, model, rt, console_log=lambda s: None,
                                  objective_fn=lambda m: PreferenceLoss(m, "dpo", cfg.align, None))
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)
        assert training.objective.chunk_fn is not _logp_chunk
    finally:
        shutdown(rt)
    with pytest.raises(ConfigError, match="compile=true with method=grpo"):
        load_align_config({"method": "grpo", "compile": True, "align": {"reward_fn": "m:f"}}, need_paths=False)
