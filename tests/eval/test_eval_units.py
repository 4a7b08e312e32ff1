"""The scorer, user tasks, data loading, the CLI and error messages of lmforge.eval."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.data.tokenizers import train_bpe
from lmforge.errors import DataError, UserError
from lmforge.eval import Scorer, evaluate_model, rolling_windows, run
from lmforge.eval.data import read_records
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import save_model
from tests.eval.conftest import WORDS, sentence, tiny_checkpoint

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder, model, tok, _ = tiny_checkpoint(tmp_path_factory.mktemp("units"), "ckpt")
    return folder, model, tok


def reference_loglikelihood(model, ids_ctx, ids_cont, max_length):
    """Direct computation: one forward over (context + continuation), truncated to the last max_length + 1."""
    full = (ids_ctx + ids_cont)[-(max_length + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full[:-1]]))[0].float(), dim=-1)
    rows = logp[-len(ids_cont):]
    target = torch.tensor(ids_cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def test_eval_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 171))
    for max_length in (1, 4, 16, 70, 71, 200):
        windows = rolling_windows(tokens, prefix_token=7, max_length=max_length)
        assert [t for _, cont in windows for t in cont] == tokens
        assert windows[0][0] == [7]
        for ctx, cont in windows:
            assert len(ctx) + len(cont) - 1 <= max_length  # the model input fits
            assert len(cont) <= max_length
        for ctx, cont in windows[1:]:
            assert len(ctx) + len(cont) == max_length + 1  # later windows use the full context
            assert tokens.index(cont[0]) == tokens.index(ctx[-1]) + 1
    assert rolling_windows([], 7, 8) == []


def test_eval_scorer_matches_direct_computation_for_any_batch_size(ckpt):
    _, model, tok = ckpt
    rng = random.Random(3)
    pairs = [(sentence(rng, rng.randint(1, 30)), " " + sentence(rng, rng.randint(1, 4))) for _ in range(12)]
    pairs += [(pairs[0][0], " " + w) for w in WORDS[:5]]  # choices sharing a context
    pairs += [("", "alpha beta"), ("trailing space ", "gamma")]
    results = {}
    for bs in (1, 4, 64):
        scorer = Scorer(model, tok, max_length=32, batch_size=bs)
        results[bs] = scorer.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy), ll4, ll64 in zip(pairs, results[1], results[4], results[64]):
        c, x = Scorer(model, tok, 32).encode_pair(ctx, cont)
        ref_ll, ref_greedy = reference_loglikelihood(model, c, x, 32)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
        assert ll4[0] == pytest.approx(ll, abs=1e-4) and ll64[0] == pytest.approx(ll, abs=1e-4)
    assert scorer.truncated > 0  # some pairs exceed 33 tokens


def test_eval_greedy_flag_is_true_for_the_models_own_continuation(ckpt):
    _, model, tok = ckpt
    scorer = Scorer(model, tok, max_length=32)
    ctx = tok.encode("alpha beta gamma")
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    (ll, greedy), (_, other) = scorer.loglikelihood_tokens([(ctx, [nxt]), (ctx, [(nxt + 1) % tok.vocab_size])])
    assert greedy and not other and ll < 0


def test_eval_user_tasks_against_direct_computation(ckpt, tmp_path):
    _, model, tok = ckpt
    rng = random.Random(5)
    rows = [{"q": sentence(rng, 5), "opts": [sentence(rng, 2), sentence(rng, 3), sentence(rng, 1)], "ans": i % 3,
             "doc": sentence(rng, 40), "ref": ["alpha"]} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text("name: my_mc\nkind: multiple_choice\ndata: d.jsonl\ncontext: 'Q: {q}\\nA:'\n"
                                      "choices: opts\nanswer: ans\n")
    (tmp_path / "ppl.yaml").write_text("name: my_ppl\nkind: perplexity\ndata: d.jsonl\ntext: '{doc}'\n")
    (tmp_path / "gen.yaml").write_text("name: my_gen\nkind: generation\ndata: d.jsonl\ncontext: '{q}'\ntarget: ref\n"
                                       "max_new_tokens: 3\n")
    out = evaluate_model(model, tok, [str(tmp_path / f) for f in ("mc.yaml", "ppl.yaml", "gen.yaml")], 32,
                         batch_size=3)["results"]
    scorer = Scorer(model, tok, 32)
    acc, acc_norm = [], []
    for r in rows:
        lls = [reference_loglikelihood(model, *scorer.encode_pair(f"Q: {r['q']}\nA:", " " + o), 32)[0]
               for o in r["opts"]]
        acc.append(float(max(range(3), key=lambda i: lls[i]) == r["ans"]))
        acc_norm.append(float(max(range(3), key=lambda i: lls[i] / len(r["opts"][i])) == r["ans"]))
    assert out["my_mc"]["acc"] == pytest.approx(sum(acc) / 5)
    assert out["my_mc"]["acc_norm"] == pytest.approx(sum(acc_norm) / 5)
    # perplexity: the direct rolling computation, window by window
    total_ll, words, nbytes = 0.0, 0, 0
    for r in rows:
        for c, x in rolling_windows(tok.encode(r["doc"]), scorer.prefix_token_id, 32):
            total_ll += reference_loglikelihood(model, c, x, 32)[0]
        words += len(r["doc"].split())
        nbytes += len(r["doc"].encode())
    assert out["my_ppl"]["word_perplexity"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert out["my_ppl"]["bits_per_byte"] == pytest.approx(-total_ll / nbytes / math.log(2), rel=1e-4)
    assert out["my_ppl"]["bits_per_byte_stderr"] is None
    # generation: greedy continuation equals the model's own argmax loop
    ids = tok.encode(rows[0]["q"])
    for _ in range(3):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = tok.decode(ids[len(tok.encode(rows[0]["q"])):])
    assert scorer.generate_until([rows[0]["q"]], ["\n\n"], 3) == [expected]
    preds = scorer.generate_until([r["q"] for r in rows], ["\n\n"], 3)
    assert out["my_gen"]["exact_match"] == pytest.approx(sum(p == "alpha" for p in preds) / 5)
    assert out["my_gen"]["f1"] >= out["my_gen"]["exact_match"] and "f1_stderr" in out["my_gen"]


def test_eval_task_data_formats_read_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"goal": "g1", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g2", "sol1": "c", "sol2": "d", "label": 1}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert read_records(tmp_path / "p.jsonl") == rows
    assert read_records(tmp_path / "p.parquet") == rows
    assert read_records(tmp_path / "saved", split="validation") == rows


def test_eval_cli_evaluate_compare_and_limit(ckpt, tmp_path, capsys):
    path, _, _ = ckpt
    rows = [{"text": sentence(random.Random(i), 8)} for i in range(6)]
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"
    assert main(["evaluate", str(path), "--tasks", "lambada", "--task-data", f"lambada={data}", "--limit", "4",
                 "--device", "cpu", "--bootstrap-iters", "100", "--output", str(a)]) == 0
    assert main(["evaluate", str(path), "--tasks", "lambada", "--task-data", f"lambada={data}", "--batch-size",
                 "auto", "--device", "cpu", "--bootstrap-iters", "100", "--output", str(b)]) == 0
    doc_a, doc_b = json.loads(a.read_text()), json.loads(b.read_text())
    assert set(doc_a) == {"results", "config", "versions", "model"}
    assert doc_a["config"]["n_samples"] == {"lambada_openai": 4} and doc_b["config"]["n_samples"] == {"lambada_openai": 6}
    assert set(doc_a["results"]["lambada_openai"]) == {"perplexity", "perplexity_stderr", "acc", "acc_stderr"}
    capsys.readouterr()
    assert main(["evaluate", "compare", str(a), str(b)]) == 0
    shown = capsys.readouterr().out
    assert "perplexity" in shown and f"{doc_a['results']['lambada_openai']['perplexity']:.4f}" in shown
    assert f"{doc_b['results']['lambada_openai']['perplexity']:.4f}" in shown


def test_eval_bad_input_gives_one_clear_message(ckpt, tmp_path, capsys):
    path, model, tok = ckpt
    with pytest.raises(UserError, match=r"unknown task 'hellaswg': neither built in nor an lm-evaluation-harness "
                                        r"task \(did you mean hellaswag"):
        evaluate_model(model, tok, ["hellaswg"], 32)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"goal": "g", "sol1": "a", "label": 0}) + "\n")
    with pytest.raises(DataError, match="no field 'sol2'.*piqa expects records like.*sol2"):
        evaluate_model(model, tok, ["piqa"], 32, task_data={"piqa": str(wrong)})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        evaluate_model(model, tok, ["boolq"], 32, task_data={"boolq": str(empty)})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        evaluate_model(model, tok, ["lambada"], 32, task_data={"lambada": str(bad)})
    assert main(["evaluate", str(path), "--tasks", "boolq", "--task-data", "boolq"]) == 2
    assert "TASK=PATH" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    with pytest.raises(UserError, match="not among --tasks"):
        run(str(path), ["boolq"], {"piqa": str(wrong)}, device="cpu")
