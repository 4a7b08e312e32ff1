"""`lmforge generate` (one prompt, and JSONL files with resume) and the `serve` command's parser."""

import inspect
import json

import pytest

from lmforge.cli import build_parser, main
from lmforge.data.tokenizers import train_bpe
from lmforge.models import ModelConfig, Transformer, generate
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
    assert summary == {"total": 5, "skipped": 3, "written": 2, "output": str(out)}
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


def test_serve_command_is_registered():
    a = build_parser().parse_args(["serve", "some/model", "--port", "9001", "--api-key", "k", "--max-batch-size", "4"])
    assert (a.model, a.port, a.api_key, a.max_batch_size, a.host) == ("some/model", 9001, "k", 4, "127.0.0.1")
