"""`Scorer.generate_until` on the serving engine: the texts of the one-prompt-at-a-time loop it replaced (kept
here as the reference), the prefix cache serving a shared few-shot prefix, the path each model kind takes, a
generation task's score, and lm_eval's generation requests batched per task."""

import copy
import json
import random
from types import SimpleNamespace

import pytest
import torch

from lmforge.eval import Scorer, evaluate_model
from lmforge.models import Transformer
from lmforge.peft import AdapterConfig, PTuningConfig, apply_peft, peft_state_dict
from tests.eval.conftest import sentence, tiny_checkpoint

L = 96  # the model's context: prompts of 1-22 words are 4-90 tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, _, tok, cfg = tiny_checkpoint(tmp_path_factory.mktemp("gen_engine"), "ckpt")
    cfg = copy.deepcopy(cfg)
    cfg.max_position_embeddings = L
    model = Transformer(cfg)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights this far from init generate varied tokens (at init: one repeated token)
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), tok


def old_generate_until(model, tok, prompts, until, max_new_tokens, max_length):
    """The loop `Scorer.generate_until` ran before the engine: one prompt at a time, a full forward over the last
    ``max_length`` tokens per new token, stopped at EOS or once the decoded output holds a stop string, cut
    before the first stop string. Returns (texts, why each ended: "eos", "stop" or "length", the token ids)."""
    scorer = Scorer(model, tok, max_length)
    texts, ends, tokens = [], [], []
    for prompt in prompts:
        ids, new, text, end = scorer.encode(prompt), [], "", "length"
        for _ in range(max_new_tokens):
            window = (ids + new)[-max_length:]
            with torch.no_grad():
                out = model(torch.tensor([window]))
            nxt = int(getattr(out, "logits", out)[0, -1].argmax())
            if nxt == tok.eod_id:
                end = "eos"
                break
            new.append(nxt)
            text = tok.decode(new)
            if any(s and s in text for s in until):
                end = "stop"
                break
        for s in until:
            if s and s in text:
                text = text[:text.index(s)]
        texts.append(text)
        ends.append(end)
        tokens.append(new)
    return texts, ends, tokens


def _prompts(seed, n, words=(1, 22)):
    rng = random.Random(seed)
    return [sentence(rng, rng.randint(*words)) for _ in range(n)]


def test_engine_gives_the_old_loops_texts_with_stop_strings_eos_and_long_prompts(setup, monkeypatch):
    model, tok = setup
    scorer = Scorer(model, tok, L)
    longer = _prompts(7, 40, (20, 40))
    # short prompts, one that outgrows the context while generating, one longer than the context
    prompts = _prompts(1, 5) + [next(p for p in longer if L - 10 < len(scorer.encode(p)) < L - 2),
                                next(p for p in longer if len(scorer.encode(p)) > L)]
    assert min(len(scorer.encode(p)) for p in prompts) < 16
    plain, _, tokens = old_generate_until(model, tok, prompts, [], 10, L)
    # stop strings the outputs hold (cut at different places), EOS: a token some output has after others
    until = ["\n\n", plain[0][3:6], plain[3][5:7]]
    eos_tok = copy.copy(tok)
    eos_tok._eod_id = next(t[k] for t in tokens for k in range(1, len(t)) if t[k] not in t[:k])
    loops = []
    original = Scorer._greedy_loop
    monkeypatch.setattr(Scorer, "_greedy_loop", lambda self, *a: loops.append(len(a[1])) or original(self, *a))
    for t in (tok, eos_tok):
        want, ends, _ = old_generate_until(model, t, prompts, until, 10, L)
        for batch_size in (1, 3):
            got = Scorer(model, t, L, batch_size=batch_size).generate_until(prompts, until, 10)
            assert got == want, (batch_size, t is eos_tok)
        assert "stop" in ends and "length" in ends
        assert ("eos" in ends) == (t is eos_tok)
    # the loop ran only the prompt longer than the context (from its first token) and the one that outgrew it
    # (after the engine's tokens), in each of the 4 calls
    assert loops.count(0) == 4 and any(n > 0 for n in loops) and len(loops) <= 8


def test_a_stop_string_that_is_a_special_token_stops_the_engine_at_that_token(setup):
    """The engine matches stop strings on text without special tokens; an ``until`` string that is one special
    token (``<|im_end|>``) must still stop it there, not only be cut from the text afterwards."""
    from tokenizers import AddedToken

    model, tok = setup
    prompts = _prompts(8, 6, (1, 8))
    _, _, tokens = old_generate_until(model, tok, prompts, [], 10, L)
    t = next(t[k] for t in tokens for k in range(1, len(t)) if tok.decode([t[k]]) == tok.id_to_token(t[k]).strip()
             and t[k] not in t[:k])
    special = copy.deepcopy(tok)
    special.backend.add_special_tokens([AddedToken(tok.id_to_token(t), special=True)])  # the same id, now special
    until = [special.decode([t])]
    assert special.decode([t], skip_special_tokens=True) == "" and until[0]
    want, ends, old_tokens = old_generate_until(model, special, prompts, until, 10, L)
    scorer = Scorer(model, special, L, batch_size=3)
    assert scorer.generate_until(prompts, until, 10) == want and "stop" in ends
    # every prompt ended where the old loop did: the engine made its tokens (+ the EOS that ended one) and no more
    assert scorer._engine.metrics.generation_tokens == sum(map(len, old_tokens)) + ends.count("eos")


def test_a_shared_few_shot_prefix_is_computed_once(setup):
    model, tok = setup
    rng = random.Random(2)
    shots = "".join(f"Q: {sentence(rng, 3)}\nA: {sentence(rng, 2)}\n\n" for _ in range(2))
    prompts = [f"{shots}Q: {sentence(rng, rng.randint(1, 3))}\nA:" for _ in range(5)] + _prompts(3, 2, (1, 4))
    scorer = Scorer(model, tok, L, batch_size=4)
    shared_blocks = len(scorer.encode(shots)) // 16
    assert shared_blocks >= 2
    got = scorer.generate_until(prompts, ["\n"], 6)
    assert got == old_generate_until(model, tok, prompts, ["\n"], 6, L)[0]
    stats = scorer._engine.stats()
    assert stats["prefix_cache_hits"] >= 4 * shared_blocks  # every prompt after the first found the shots' blocks
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0  # nothing left behind
    # the same engine serves the next call, its cache still holding the shots
    again = scorer.generate_until(prompts[:2], ["\n"], 6)
    assert again == got[:2] and scorer._engine.stats()["prefix_cache_hits"] >= stats["prefix_cache_hits"] + 2


def _randomize_peft_(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


class LogitsOnly(torch.nn.Module):
    """A model the scorer knows only by its logits (as a transformers model): no engine for it."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, ids):
        return SimpleNamespace(logits=self.inner(ids))


def test_each_model_kind_takes_its_path_and_gives_the_old_texts(setup):
    model, tok = setup
    bottleneck = apply_peft(copy.deepcopy(model), "adapter", AdapterConfig(dim=8))
    _randomize_peft_(bottleneck, 1)
    ptuned = apply_peft(copy.deepcopy(model), "ptuning", PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8))
    _randomize_peft_(ptuned, 2)
    prompts = _prompts(4, 3, (1, 8))
    texts = {}
    for name, m, on_engine in (("base", model, True), ("bottleneck", bottleneck.eval(), True),
                               ("ptuned", ptuned.eval(), True), ("logits only", LogitsOnly(model), False)):
        context = L - int(getattr(m, "num_virtual_tokens", 0))
        scorer = Scorer(m, tok, context, batch_size=2)
        assert (scorer.engine_model() is m) == on_engine, name
        texts[name] = scorer.generate_until(prompts, ["\n\n"], 6)
        if name != "logits only":  # (its texts must be the base model's: checked below)
            assert texts[name] == old_generate_until(m, tok, prompts, ["\n\n"], 6, context)[0], name
        assert (scorer._engine is not None) == on_engine, name
    assert texts["logits only"] == texts["base"]
    assert texts["bottleneck"] != texts["base"] and texts["ptuned"] != texts["base"]  # the adapters act


def test_a_generation_task_scores_as_with_the_old_loop(setup, tmp_path, monkeypatch):
    model, tok = setup
    prompts = _prompts(5, 8, (2, 10))
    preds, _, _ = old_generate_until(model, tok, prompts, ["\n\n"], 5, L)
    rows = [{"q": q, "ref": p if i % 2 == 0 else "zzz"} for i, (q, p) in enumerate(zip(prompts, preds))]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "gen.yaml"
    task.write_text("name: my_gen\nkind: generation\ndata: gen.jsonl\ncontext: '{q}'\ntarget: ref\nmax_new_tokens: 5\n")
    built = []
    original = Scorer._engine_for
    monkeypatch.setattr(Scorer, "_engine_for", lambda self, n: built.append(original(self, n)) or built[-1])
    engine = evaluate_model(model, tok, [str(task)], L, batch_size=4)["results"]["my_gen"]
    assert len({id(e) for e in built}) == 1 and built[0].max_batch_size == 4  # --batch-size: the engine's batch
    monkeypatch.setattr(Scorer, "engine_model", lambda self: None)  # the one-prompt-at-a-time loop
    loop = evaluate_model(model, tok, [str(task)], L, batch_size=4)["results"]["my_gen"]
    assert engine == loop and 0 < engine["exact_match"] < 1


def test_lm_eval_generation_requests_go_to_the_scorer_per_task(setup, monkeypatch):
    from lmforge.eval.harness import LmforgeLM

    model, tok = setup
    lm = LmforgeLM.from_model(model, tok, L, batch_size=4)
    prompts = _prompts(6, 6, (2, 8))
    kinds = [{"until": ["\n\n"], "max_gen_toks": 4}, {"until": "gamma", "max_gen_toks": 6}]
    requests = [SimpleNamespace(args=(p, kinds[i % 2])) for i, p in enumerate(prompts)]
    calls = []
    original = Scorer.generate_until
    monkeypatch.setattr(Scorer, "generate_until",
                        lambda self, ps, u, n: calls.append(len(ps)) or original(self, ps, u, n))
    got = lm.generate_until(requests)
    assert calls == [3, 3]  # one call per (until, max_gen_toks), not one per request
    for i, p in enumerate(prompts):
        until = kinds[i % 2]["until"]
        want = old_generate_until(model, tok, [p], [until] if isinstance(until, str) else until,
                                  kinds[i % 2]["max_gen_toks"], L)[0][0]
        assert got[i] == want


def test_one_engine_serves_every_generation_task_of_a_run(setup, tmp_path, monkeypatch):
    """`lmforge evaluate` builds the serving engine once and reuses it across tasks (its prefix cache emptied
    between them): the results equal those of one run per task."""
    from lmforge.serve.engine import Engine

    model, tok = setup
    rng = random.Random(9)
    shots = "".join(f"Q: {sentence(rng, 3)}\nA: {sentence(rng, 2)}\n\n" for _ in range(2))
    names = []
    for k in range(3):
        rows = [{"q": f"{shots}Q: {p}\nA:", "ref": "zzz"} for p in _prompts(20 + k, 3, (1, 4))]
        (tmp_path / f"gen{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = tmp_path / f"gen{k}.yaml"
        task.write_text(f"name: gen{k}\nkind: generation\ndata: gen{k}.jsonl\ncontext: '{{q}}'\ntarget: ref\n"
                        f"max_new_tokens: 4\nuntil: ['\\n']\n")
        names.append(str(task))
    built = []
    original = Engine.__init__
    monkeypatch.setattr(Engine, "__init__", lambda self, *a, **k: built.append(self) or original(self, *a, **k))
    texts = []
    original_generate = Scorer.generate_until
    monkeypatch.setattr(Scorer, "generate_until",
                        lambda self, *a: texts.append(original_generate(self, *a)) or texts[-1])
    together = evaluate_model(model, tok, names, L, batch_size=4)
    assert len(built) == 1 and len(texts) == 3
    hits = built[0].stats()["prefix_cache_hits"]
    assert hits > 0  # the shots are shared within each task
    alone, alone_texts = {}, []
    for name in names:
        built.clear()
        out = evaluate_model(model, tok, [name], L, batch_size=4)
        alone.update(out["results"])
        alone_texts.append(texts[-1])
        assert len(built) == 1
        hits -= built[0].stats()["prefix_cache_hits"]
    assert together["results"] == alone and texts[:3] == alone_texts
    assert hits == 0  # the shared shots were not served across tasks: each task started with an empty cache
    # the lm_eval tasks of the run take the engine over (evaluate_harness(engine_from=...)): no second one
    built.clear()
    ours, harness = Scorer(model, tok, L, batch_size=4), Scorer(model, tok, L, batch_size=4)
    prompts = _prompts(30, 3, (1, 4))
    first = ours.generate_until(prompts, ["\n"], 4)
    harness.start_task(engine_from=ours)
    assert harness.generate_until(prompts, ["\n"], 4) == first and len(built) == 1 and ours._engine is None
