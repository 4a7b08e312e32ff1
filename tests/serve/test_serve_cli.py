"""`lmforge generate` (one prompt, and JSONL files with resume) and the `serve` command's parser."""

import inspect
import json

import pytest

from lmforge.cli import build_parser, main
from lmforge.data.tokenizers import train_bpe
from lmforge.models import ModelConfig, Transformer
from lmforge.models.generate import generate
from lmforge.open import load_for_inference
from lmforge.train.checkpoint import save_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import json as json_mod

    root = tmp_path_factory.mktemp("gen")
    (root / "corpus.txt").write_text(inspect.getsource(json_mod.decoder) + inspect.getsource(json_mod.encoder))
    tok = train_bpe([root / "corpus.txt"], 280, root / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=96, init_method_std=0.4)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    return save_model(root / "ckpt", model.state_dict(), cfg.to_dict(), tokenizer=tok)


def greedy_text(folder, prompt, n):
    model, tok = load_for_inference(folder, device="cpu", dtype="float32")
    return tok.decode(generate(model, tok.encode(prompt), n, greedy=True, eod_id=tok.eod_id), skip_special_tokens=True)


def test_generate_one_prompt(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "6", "--greedy"]) == 0
    assert capsys.readouterr().out == "def " + greedy_text(ckpt, "def ", 6) + "\n"
    args = ["generate", str(ckpt), "--prompt", "import", "--max-new-tokens", "8", "--seed", "1", "--top-k", "20",
            "--top-p", "0.9", "--temperature", "0.8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded: reproducible


def test_generate_file_resumes(ckpt, tmp_path, capsys):
    prompts = ["def f(", "class A", "import", "x = ", "return"]
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out" / "completions.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts[:3])))
    args = ["generate", str(ckpt), "--input", str(inp), "--output", str(out), "--max-new-tokens", "7", "--greedy",
            "--max-batch-size", "2"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 3
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == ["p0", "p1", "p2"]
    # more prompts arrive, and the last write was cut short by a crash
    with open(inp, "a") as f:
        for i, p in enumerate(prompts[3:], start=3):
            f.write(json.dumps({"id": f"p{i}", "prompt": p, "max_tokens": 3}) + "\n")
    with open(out, "a") as f:
        f.write('{"id": "p9", "compl')
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"total": 5, "skipped": 3, "written": 2, "failed": 0, "output": str(out)}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_id = {x["id"]: x for x in lines}
    assert len(lines) == 5 and sorted(by_id) == [f"p{i}" for i in range(5)]
    for i, p in enumerate(prompts):
        n = 7 if i < 3 else 3
        assert by_id[f"p{i}"]["completion"] == greedy_text(ckpt, p, n), p
        assert by_id[f"p{i}"]["prompt"] == p
    # everything answered: nothing to do
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 0


def test_generate_file_errors(ckpt, tmp_path, capsys):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert main(["generate", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"{inp}:2" in err and len(err.splitlines()) == 1
    inp.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["generate", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert main(["generate", str(ckpt), "--input", str(inp)]) == 2
    assert "--output" in capsys.readouterr().err


def test_cache_flags_act_and_bad_values_are_one_error_line(ckpt, capsys):
    """Small blocks, a tiny cache and a 3-token step budget (the prompt is prefilled in chunks) give the greedy
    text; a cache too small for one sequence, or a bad value, is one error line."""
    prompt = "def parse(self, text):"
    args = ["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", "6", "--greedy", "--block-size", "4",
            "--num-kv-blocks", "24", "--max-num-batched-tokens", "3", "--no-prefix-caching"]
    assert main(args) == 0
    assert capsys.readouterr().out == prompt + greedy_text(ckpt, prompt, 6) + "\n"
    for flags, expected in ((["--num-kv-blocks", "23"], "needs 24"), (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
                            (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
                            (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens")):
        assert main(args[:7] + ["--block-size", "4"] + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and expected in err and "Traceback" not in err, err


def test_serving_doc_scheduling_commands_run_verbatim(ckpt, tmp_path, monkeypatch, capsys):
    """docs/serving.md, "Memory, batching and scheduling": the generate command runs verbatim (CKPT and
    prompts.jsonl in the working folder); the serve command parses into the engine settings it names."""
    import re
    import shlex
    from pathlib import Path

    from lmforge.serve.cli import cache_kwargs

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text(encoding="utf-8")
    section = doc.split("## Memory, batching and scheduling", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    generate_cmd, serve_cmd = block.strip().splitlines()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "CKPT").symlink_to(ckpt)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": 0, "prompt": "def f("}) + "\n")
    assert main(shlex.split(generate_cmd)[1:]) == 0
    capsys.readouterr()
    (line,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert line["id"] == 0 and line["completion"] == greedy_text(ckpt, "def f(", 64)
    a = build_parser().parse_args(shlex.split(serve_cmd)[1:])
    assert a.compile and cache_kwargs(a) == dict(max_num_batched_tokens=8192, block_size=16, gpu_memory_utilization=0.85,
                                               num_kv_blocks=None, kv_cache_memory=None, enable_prefix_caching=False,
                                               admission_batch=16)


def test_serve_command_is_registered():
    a = build_parser().parse_args(["serve", "some/model", "--port", "9001", "--api-key", "k", "--max-batch-size", "4"])
    assert (a.model, a.port, a.api_key, a.max_batch_size, a.host) == ("some/model", 9001, "k", 4, "127.0.0.1")


def test_generate_file_keeps_id_types_and_refuses_a_bad_line_up_front(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": 1, "prompt": "def f("}, {"id": "1", "prompt": "class A"}, {"prompt": "import"},
            {"id": 7, "prompt": "x = ", "temperature": 1e-38}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["generate", str(ckpt), "--input", str(inp), "--output", str(out), "--max-new-tokens", "3"]
    assert main(args) == 0
    got = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(got, key=json.dumps) == sorted([1, "1", 3, 7], key=json.dumps)  # 3: the line number, an int
    assert main(args) == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 0
    for bad, names in [({"prompt": "x", "temperature": "hot"}, "'temperature' must be a number"),
                       ({"prompt": "x", "seed": 2 ** 70}, "seed must be an integer between"),
                       ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
                       ({"prompt": "x", "max_tokens": 2.5}, "'max_tokens' must be an integer"),
                       ({"id": [1], "prompt": "x"}, "'id' must be a string or an integer")]:
        target = tmp_path / "new.jsonl"
        inp.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(bad) + "\n")
        assert main(["generate", str(ckpt), "--input", str(inp), "--output", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and f"{inp}:2" in err and names in err and len(err.splitlines()) == 1, err
        assert not target.exists()  # refused before anything was generated or written


def test_generate_file_writes_an_error_line_for_a_failing_line_and_goes_on(ckpt, tmp_path):
    from lmforge.serve.cli import generate_file
    from lmforge.serve.engine import SamplingParams, engine_from_checkpoint

    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=4)
    poison = engine.tokenizer.encode("POISON")
    prefill = engine.runner.prefill

    def bad_prefill(chunks):
        if any(s.prompt_ids == poison for s, _, _ in chunks):
            raise RuntimeError("simulated failure")
        return prefill(chunks)

    engine.runner.prefill = bad_prefill
    inp, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["def", "POISON", "x ="])))
    params = lambda i, rec: SamplingParams(max_tokens=4, temperature=0)  # noqa: E731
    summary = generate_file(engine, inp, out, params)
    assert (summary["written"], summary["failed"]) == (3, 1)
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows[1]["finish_reason"] == "error" and "simulated failure" in rows[1]["error"]
    assert rows[0]["completion_tokens"] >= 1 and rows[2]["completion_tokens"] >= 1
    engine.runner.prefill = prefill  # fixed: a rerun answers the failed line only
    summary = generate_file(engine, inp, out, params)
    assert (summary["skipped"], summary["written"], summary["failed"]) == (2, 1, 0)
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["id"] == 1 and last["finish_reason"] in ("length", "stop")


def test_admission_batch_flag_reaches_the_engine_and_a_bad_value_is_refused(ckpt, capsys):
    """`--admission-batch N` is the engine's ``admission_batch`` for serve and generate; below 1 is one error line."""
    from lmforge.errors import UserError
    from lmforge.serve.cli import cache_kwargs

    for cmd in (["serve", "CKPT"], ["generate", "CKPT", "--prompt", "x"]):
        a = build_parser().parse_args(cmd + ["--admission-batch", "8"])
        assert cache_kwargs(a)["admission_batch"] == 8
        assert cache_kwargs(build_parser().parse_args(cmd))["admission_batch"] == 1
    with pytest.raises(UserError, match="--admission-batch must be >= 1, got 0"):
        cache_kwargs(build_parser().parse_args(["serve", "CKPT", "--admission-batch", "0"]))
    assert main(["generate", str(ckpt), "--prompt", "def f(", "--max-new-tokens", "2", "--admission-batch", "0"]) == 2
    assert "--admission-batch must be >= 1" in capsys.readouterr().err
