"""`lmforge evaluate --tensor-parallel-size 2` (-tp 2): the model split over two CPU gloo ranks the command starts
itself, against one process; and what it refuses, with one line."""

import copy
import json
import random
import re
import shlex
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.eval import Scorer
from lmforge.peft import PTuningConfig, apply_peft, save_adapter
from lmforge.train.checkpoint import save_model
from tests.eval.conftest import harness_generation_task, sentence, tiny_checkpoint, write_lambada, write_piqa

ROOT = Path(__file__).resolve().parents[2]
N_GEN = 9  # generation rows; every third one's target is not the model's output


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint (4 heads, 2 key/value heads, ffn 64, 32 positions) with weights moved off their init (at
    init it generates one repeated token), and task files in the folder: lambada (loglikelihood and greedy
    checks, some texts truncated), piqa (multi-token choices: the shared-context KV cache) and a generation task
    whose targets are the one-process greedy output for most rows (some prompts too long for the engine alone:
    their last tokens come from full forwards)."""
    root = tmp_path_factory.mktemp("eval_tp")
    _, model, tok, cfg = tiny_checkpoint(root, "base")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    save_model(root / "CKPT", model.state_dict(), cfg.to_dict(), tokenizer=tok)
    rng = random.Random(3)
    write_lambada(root / "lambada.jsonl", rng, 9)
    write_piqa(root / "piqa.jsonl", rng, 7)
    prompts = [sentence(rng, n) for n in (2, 5, 3, 8, 1, 27, 4, 6, 29)]
    preds = Scorer(model.eval(), tok, 32, batch_size=4).generate_until(prompts, ["\n\n"], 6)
    rows = [{"q": q, "ref": p if i % 3 else "zzz"} for i, (q, p) in enumerate(zip(prompts, preds))]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "gen.yaml").write_text("name: my_gen\nkind: generation\ndata: gen.jsonl\ncontext: '{q}'\ntarget: ref\n"
                                   "max_new_tokens: 6\n")
    return root, model, tok


def _doc_command() -> str:
    """docs/evaluation.md, "Tensor parallel": its command."""
    doc = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = doc.split("## Tensor parallel\n", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    return command


def test_evaluate_tp2_equals_one_process(setup, monkeypatch, capsys):
    """The docs' command, verbatim (in a folder holding CKPT and the task files): generation exactly one
    process's, log-likelihood metrics within 1e-5; rank 0's table printed once, results.json written once."""
    root, _, _ = setup
    monkeypatch.chdir(root)
    command = _doc_command()
    assert " -tp 2" in command
    one = command.replace(" -tp 2", "").replace("results.json", "one.json")
    assert main(shlex.split(one)[1:]) == 0
    capsys.readouterr()
    assert main(shlex.split(command)[1:]) == 0
    shown = capsys.readouterr().out
    assert shown.count("┏") == 1 and "my_gen" in shown
    docs = {name: json.loads((root / name).read_text()) for name in ("one.json", "results.json")}
    one, tp = docs["one.json"], docs["results.json"]
    assert tp["config"]["tensor_parallel_size"] == 2 and one["config"]["tensor_parallel_size"] == 1
    assert tp["config"]["n_samples"] == one["config"]["n_samples"] == {"lambada_openai": 9, "piqa": 7, "my_gen": N_GEN}
    assert tp["config"]["truncated_requests"] == one["config"]["truncated_requests"]
    assert one["config"]["truncated_requests"]["lambada_openai"] > 0
    # every generated text is the one-process greedy output (the targets of all rows but every third)
    assert one["results"]["my_gen"]["exact_match"] == pytest.approx((N_GEN - 3) / N_GEN)
    assert tp["results"]["my_gen"] == one["results"]["my_gen"]  # exactly
    assert set(tp["results"]) == set(one["results"]) == {"lambada_openai", "piqa", "my_gen"}
    for task in ("lambada_openai", "piqa"):
        assert set(tp["results"][task]) == set(one["results"][task])
        for metric, value in one["results"][task].items():
            assert tp["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-5), (task, metric)


@pytest.mark.parametrize("extra, message", [
    (["-tp", "3"], "error: --tensor-parallel-size 3 does not divide the model's 4 attention heads; use a size that "
                   "divides its 4 attention heads, 2 key/value heads and ffn_hidden_size 64: 1, 2"),
    (["-tp", "2", "--batch-size", "auto"], "error: --batch-size auto is not supported with --tensor-parallel-size "
                                           "yet; drop it, or evaluate on one GPU"),
    (["-tp", "0"], "error: --tensor-parallel-size must be >= 1, got 0"),
    (["-tp", "2", "--device", "cuda:1"], "error: --device cuda:1 with --tensor-parallel-size 2: rank r runs on cuda:r"),
    (["-tp", "2", "--adapter", "PT"], "error: PT: p-tuning adapters are not supported with --tensor-parallel-size "
                                      "yet (LoRA/DoRA and IA3 are: they are merged before the split); evaluate it on "
                                      "one GPU"),
])
def test_refusals_are_one_line(setup, tmp_path, monkeypatch, capsys, extra, message):
    root, model, _ = setup
    monkeypatch.chdir(tmp_path)
    if "PT" in extra:
        pcfg = PTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8)
        save_adapter(apply_peft(copy.deepcopy(model), "ptuning", pcfg), "ptuning", pcfg, tmp_path / "PT")
    args = ["evaluate", str(root / "CKPT"), "--tasks", "lambada", "--task-data", f"lambada={root / 'lambada.jsonl'}",
            "--device", "cpu", "--output", "out.json", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.json").exists()


def test_with_data_parallel_ranks_it_is_refused(setup, tmp_path, monkeypatch, capsys):
    """-tp under torchrun (data-parallel ranks) is refused before anything loads."""
    root, _, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    assert main(["evaluate", str(root / "CKPT"), "--tasks", "lambada", "--task-data",
                 f"lambada={root / 'lambada.jsonl'}", "--device", "cpu", "-tp", "2",
                 "--output", str(tmp_path / "out.json")]) == 2
    assert capsys.readouterr().err == ("error: --tensor-parallel-size 2 starts its own 2 processes; run the command "
                                       "once, not under torchrun\n")
    assert not (tmp_path / "out.json").exists()


HARNESS_TASKS = """task: tp_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/qa.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def test_lm_eval_tasks_under_tp2_equal_one_process(setup, tmp_path, monkeypatch):
    """lm-evaluation-harness tasks (a multiple-choice and a generate_until one, from --include-path) run on every
    rank through lm_eval; rank 0's numbers equal one process's."""
    root, _, _ = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = random.Random(5)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": sentence(rng, rng.randint(3, 9)), "choices": [
        sentence(rng, rng.randint(1, 4)) for _ in range(3)], "label": i % 3}) + "\n" for i in range(6)))
    (tmp_path / "gen.jsonl").write_text((root / "gen.jsonl").read_text())
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tp_qa.yaml").write_text(HARNESS_TASKS.format(root=tmp_path))
    (tmp_path / "tasks" / "tp_gen.yaml").write_text(harness_generation_task("tp_gen", f"{tmp_path}/gen.jsonl", 6))
    docs = {}
    for name, extra in (("one", []), ("tp", ["-tp", "2"])):
        assert main(["evaluate", str(root / "CKPT"), "--tasks", "tp_qa,tp_gen", "--include-path",
                     str(tmp_path / "tasks"), "--device", "cpu", "--batch-size", "4", "--output",
                     str(tmp_path / f"{name}.json"), *extra]) == 0
        docs[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"]
    assert set(docs["tp"]) == set(docs["one"]) == {"tp_qa", "tp_gen"}
    # its targets: the model's own output for all rows but every third: lmforge's my_gen task's number
    assert docs["one"]["tp_gen"]["exact_match"] == pytest.approx((N_GEN - 3) / N_GEN)
    assert docs["tp"]["tp_gen"] == docs["one"]["tp_gen"]
    for metric, value in docs["one"]["tp_qa"].items():
        assert docs["tp"]["tp_qa"][metric] == pytest.approx(value, rel=1e-5, abs=1e-5), metric
