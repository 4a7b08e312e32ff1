"""A generation task scored by lmforge's own path (a user ``generation`` task) and by lm-evaluation-harness's
``generate_until`` through the ``lmforge`` adapter, on the same records: the same exact_match, record by record.

The targets are crafted around the model's own greedy output so that every way of comparing strings shows:
the output as it is, the output with a space before or after it (the harness compares character for
character: no stripping), another case, and a wrong answer.
"""

import json
import random

import pytest
import torch

from lmforge.eval import Scorer
from lmforge.eval.tasks import load_user_task, score_task
from tests.eval.conftest import harness_generation_task, sentence, tiny_checkpoint

MAX_NEW = 5


def _variants(pred: str) -> list[str]:
    """Targets around the model's output ``pred``: itself, padded with whitespace, another case, a wrong one."""
    return [pred, " " + pred, pred + " ", "\n" + pred, pred.swapcase(), "zzz"]


def test_generation_task_scores_as_the_harness_record_by_record(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate

    from lmforge.eval.harness import LmforgeLM, load_harness_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, model, tok, _ = tiny_checkpoint(tmp_path, "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init, where the model repeats one token
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    rng = random.Random(11)
    prompts = [sentence(rng, n) for n in (1, 3, 6, 2)]
    scorer = Scorer(model, tok, 32, batch_size=4)
    preds = scorer.generate_until(prompts, ["\n\n"], MAX_NEW)
    rows = [{"q": q, "ref": ref} for q, p in zip(prompts, preds) for ref in _variants(p)]
    assert any(r["ref"] != r["ref"].strip() for r in rows) and any(p.swapcase() != p for p in preds)
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # lmforge's own path: a user generation task, each record scored alone and all together
    (tmp_path / "gen.yaml").write_text(f"name: my_gen\nkind: generation\ndata: {data}\ncontext: '{{q}}'\n"
                                       f"target: ref\nmax_new_tokens: {MAX_NEW}\n")
    task = load_user_task(tmp_path / "gen.yaml")
    docs = [task.build(r) for r in rows]
    ours = [score_task(task, [d], scorer, bootstrap_iters=0)["exact_match"] for d in docs]
    ours_mean = score_task(task, docs, scorer, bootstrap_iters=0)["exact_match"]

    # lm_eval's generate_until on the same records, through the adapter
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "parity_gen.yaml").write_text(harness_generation_task("parity_gen", data, MAX_NEW))
    harness = load_harness_tasks(["parity_gen"], str(tmp_path / "tasks"))
    lm = LmforgeLM.from_model(model, tok, 32, 4)
    lm.scorer.start_task(scorer)  # the serving engine already built (as `lmforge evaluate` shares it)
    out = simple_evaluate(model=lm, tasks=harness.tasks,
                          task_manager=harness.manager, bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"]["parity_gen"], key=lambda s: s["doc_id"])
    assert [s["target"] for s in samples] == [r["ref"] for r in rows]
    assert [s["filtered_resps"][0] for s in samples] == [p for p in preds for _ in _variants(p)]  # same texts
    theirs = [float(s["exact_match"]) for s in samples]

    assert ours == theirs
    expected = [float(ref == p) for p in preds for ref in _variants(p)]  # only the output itself matches
    assert ours == expected and 0 < sum(expected) < len(expected)
    assert ours_mean == pytest.approx(out["results"]["parity_gen"]["exact_match,none"])
    assert ours_mean == pytest.approx(sum(expected) / len(expected))
