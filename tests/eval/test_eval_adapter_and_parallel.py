"""`evaluate --adapter` (LoRA merged, bottleneck unmerged, p-tuning's virtual tokens prepended) and data
parallel evaluation."""

import copy
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.data.tokenizers import train_bpe
from lmforge.eval import Scorer, evaluate_model, run
from lmforge.eval.evaluate import AdapterError
from lmforge.models import ModelConfig, Transformer
from lmforge.peft import (AdapterConfig, LoRAConfig, PTuningConfig, apply_peft, merge_adapter, peft_state_dict,
                          save_adapter)
from lmforge.train.checkpoint import save_model
from tests.eval.conftest import sentence, tiny_checkpoint, write_lambada, write_piqa

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    _, model, tok, cfg = tiny_checkpoint(root, "base")
    # task data: lambada (loglikelihood + greedy), piqa (two multi-token choices)
    rng = random.Random(1)
    write_lambada(root / "lambada.jsonl", rng, 13)
    write_piqa(root / "piqa.jsonl", rng, 11)
    return root, model, tok, cfg


def _randomize_peft_(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _task_args(root):
    return ["--tasks", "lambada,piqa", "--task-data", f"lambada={root / 'lambada.jsonl'}",
            "--task-data", f"piqa={root / 'piqa.jsonl'}", "--device", "cpu", "--bootstrap-iters", "100"]


def test_eval_lora_adapter_scores_as_the_merged_model(setup, tmp_path):
    root, base, tok, cfg = setup
    lora_cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    tuned = apply_peft(copy.deepcopy(base), "lora", lora_cfg)
    _randomize_peft_(tuned, 0)
    save_adapter(tuned, "lora", lora_cfg, tmp_path / "lora", base_name=str(root / "base"))
    merged = merge_adapter(copy.deepcopy(tuned))
    save_model(tmp_path / "merged", merged.state_dict(), cfg.to_dict(), tokenizer=tok)

    outs = {}
    for name, extra in (("adapter", ["--adapter", str(tmp_path / "lora")]), ("merged", []), ("base", [])):
        model_dir = root / "base" if name != "merged" else tmp_path / "merged"
        assert main(["evaluate", str(model_dir), *_task_args(root), *extra,
                     "--output", str(tmp_path / name / "results.json")]) == 0
        outs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert outs["adapter"]["config"]["adapter"] == str(tmp_path / "lora")
    for task in ("lambada_openai", "piqa"):
        for metric, value in outs["merged"]["results"][task].items():
            assert outs["adapter"]["results"][task][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), metric
    assert outs["adapter"]["results"]["lambada_openai"]["perplexity"] != pytest.approx(
        outs["base"]["results"]["lambada_openai"]["perplexity"], rel=1e-3)
    # the lm_eval adapter takes adapter= too and holds the merged weights
    from lm_eval.api.registry import get_model

    from lmforge.eval.harness import LmforgeLM

    assert get_model("lmforge") is LmforgeLM and get_model("hf").__name__ == "HFLM"  # ours does not hide theirs

    lm = LmforgeLM(pretrained=str(root / "base"), device="cpu", adapter=str(tmp_path / "lora"))
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_eval_bottleneck_adapter_runs_unmerged(setup, tmp_path):
    root, base, tok, _ = setup
    acfg = AdapterConfig(dim=8)
    tuned = apply_peft(copy.deepcopy(base), "adapter", acfg)
    _randomize_peft_(tuned, 1)
    save_adapter(tuned, "adapter", acfg, tmp_path / "bottleneck")
    task_data = {"lambada": str(root / "lambada.jsonl"), "piqa": str(root / "piqa.jsonl")}
    doc = run(str(root / "base"), ["lambada", "piqa"], task_data, device="cpu", bootstrap_iters=100,
              progress=False, adapter=str(tmp_path / "bottleneck"))
    direct = evaluate_model(tuned.eval(), tok, ["lambada", "piqa"], 32, task_data, bootstrap_iters=100)
    assert doc["results"] == direct["results"]
    plain = evaluate_model(base, tok, ["lambada", "piqa"], 32, task_data, bootstrap_iters=100)
    assert plain["results"]["lambada_openai"]["perplexity"] != direct["results"]["lambada_openai"]["perplexity"]

    with pytest.raises(AdapterError, match="not a folder"):
        run(str(root / "base"), ["lambada"], device="cpu", adapter=str(tmp_path / "missing"))


def test_eval_ptuning_adapter_prepends_its_virtual_tokens(setup, tmp_path):
    root, base, tok, _ = setup
    pcfg = PTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8)
    tuned = apply_peft(copy.deepcopy(base), "ptuning", pcfg)
    _randomize_peft_(tuned, 2)
    save_adapter(tuned, "ptuning", pcfg, tmp_path / "pt")
    tuned.eval()
    task_data = {"lambada": str(root / "lambada.jsonl"), "piqa": str(root / "piqa.jsonl")}
    doc = run(str(root / "base"), ["lambada", "piqa"], task_data, device="cpu", bootstrap_iters=100,
              progress=False, adapter=str(tmp_path / "pt"))
    context = base.cfg.max_position_embeddings - 2  # the virtual tokens take two positions
    assert doc["config"]["max_length"] == context
    direct = evaluate_model(tuned, tok, ["lambada", "piqa"], context, task_data, bootstrap_iters=100)
    assert doc["results"] == direct["results"]
    plain = evaluate_model(base, tok, ["lambada", "piqa"], 32, task_data, bootstrap_iters=100)
    assert plain["results"]["lambada_openai"]["perplexity"] != direct["results"]["lambada_openai"]["perplexity"]
    # the scorer's loglikelihood of the p-tuned model is the full forward's (virtual tokens first)
    scorer = Scorer(tuned, tok, context, batch_size=4)
    ctx, cont = "the cat sat", " on the mat"
    ll, _ = scorer.loglikelihood([(ctx, cont)])[0]
    ids = scorer.encode(ctx) + scorer._encode_plain(cont)
    n_ctx = len(scorer.encode(ctx))
    with torch.no_grad():
        logp = tuned(torch.tensor([ids]))[0].log_softmax(-1)
    want = sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
    assert ll == pytest.approx(want, abs=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_two_process_data_parallel_equals_one_process(setup, tmp_path):
    root, base, tok, _ = setup
    # a generation task whose targets are the model's own greedy output for some rows, so exact_match is
    # neither 0 nor 1 and depends on every prediction landing on its own document after the gather
    rng = random.Random(7)
    prompts = [sentence(rng, rng.randint(2, 8)) for _ in range(7)]
    preds = Scorer(base, tok, 32).generate_until(prompts, ["\n\n"], 3)
    rows = [{"q": q, "ref": p if i % 2 == 0 else "zzz"} for i, (q, p) in enumerate(zip(prompts, preds))]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = tmp_path / "gen.yaml"
    gen.write_text("name: my_gen\nkind: generation\ndata: gen.jsonl\ncontext: '{q}'\ntarget: ref\nmax_new_tokens: 3\n")
    args = [str(root / "base"), "--tasks", f"lambada,piqa,{gen}", "--task-data", f"lambada={root / 'lambada.jsonl'}",
            "--task-data", f"piqa={root / 'piqa.jsonl'}", "--device", "cpu", "--bootstrap-iters", "100",
            "--batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    docs = {}
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}" / "results.json"
        cmd = [sys.executable, "-m", "lmforge", "evaluate", *args, "--output", str(out)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={_free_port()}", "--master-addr=127.0.0.1", "-m", "lmforge", "evaluate", *args,
                   "--output", str(out)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{cmd}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        docs[nproc] = json.loads(out.read_text())
        if nproc > 1:
            assert p.stdout.count("lambada_openai") >= 1 and p.stdout.count("┏") == 1  # one table, from rank 0
    assert docs[2]["config"]["world_size"] == 2 and docs[1]["config"]["world_size"] == 1
    assert docs[2]["results"] == docs[1]["results"]  # exactly, not approximately
    assert 0 < docs[1]["results"]["my_gen"]["exact_match"] < 1
    for key in ("n_samples", "truncated_requests"):
        assert docs[2]["config"][key] == docs[1]["config"][key]


def test_eval_shared_context_is_computed_once_and_scores_as_full_passes(setup, monkeypatch):
    _, model, tok, _ = setup
    rng = random.Random(11)
    pairs = []
    for n in range(9):  # contexts of a few equal lengths, 2-5 multi-token choices each, one truncated
        ctx = sentence(rng, [3, 3, 6, 6, 6, 9, 9, 2, 25][n])
        pairs += [(ctx, " " + sentence(rng, rng.randint(1, 4))) for _ in range(2 + n % 4)]
    pairs += [("lone context", " alpha beta"), ("", "alpha beta")]
    reference = Scorer(model, tok, 32, batch_size=4, reuse_context=False).loglikelihood(pairs)
    calls = []
    original = Scorer._score_family_batch
    monkeypatch.setattr(Scorer, "_score_family_batch",
                        lambda self, fams, *a: calls.append(len(fams)) or original(self, fams, *a))
    for bs in (1, 3, 64):
        got = Scorer(model, tok, 32, batch_size=bs).loglikelihood(pairs)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, reference):
            assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    assert calls and max(calls) > 1  # families batched together, contexts computed once per family
    assert sum(calls) >= 3 * 8  # the family path ran on (nearly) every shared context, for every batch size
