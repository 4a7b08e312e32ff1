"""The command line: user mistakes give one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.cli import main
from tests.conftest import tiny_overrides


def _run(args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120)


def _one_error_line(p):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert lines[0].startswith("error: ")
    assert "Traceback" not in p.stderr
    return p.stderr


def test_config_typo_suggests_the_key():
    err = _one_error_line(_run(["config", "tiny/llama", "trainer.max_step=5"]))
    assert "trainer.max_step" in err and "did you mean" in err and "trainer.max_steps" in err


def test_impossible_batch_shows_formula():
    err = _one_error_line(_run(["config", "gpt3/126m", "trainer.devices=8", "model.micro_batch_size=6",
                                "model.global_batch_size=100"]))
    assert "100" in err and "48" in err and "96" in err


def test_missing_data_prefix(tmp_path):
    err = _one_error_line(_run(["pretrain", "tiny/llama", f"exp_manager.explicit_log_dir={tmp_path}"]))
    assert "model.data.data_prefix" in err


def test_generate_on_incomplete_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"format": "lmforge", "model": {}}')
    err = _one_error_line(_run(["generate", str(tmp_path / "ckpt"), "--prompt", "x"]))
    assert str(tmp_path / "ckpt") in err


def test_debug_shows_traceback(tmp_path):
    p = _run(["--debug", "config", "tiny/llama", "trainer.max_step=5"])
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_pretrain_then_generate(tiny_corpus, tmp_path, capsys):
    assert main(["pretrain", "tiny/llama", *tiny_overrides(tiny_corpus, tmp_path, **{"trainer.max_steps": 4})]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ")
    assert main(["generate", str(tmp_path), "--prompt", "import", "--max-new-tokens", "5", "--seed", "1",
                 "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8"]) == 0


def test_recipes_listed(capsys):
    assert main(["recipes"]) == 0
    names = capsys.readouterr().out.split()
    for name in ("gpt3/126m", "gpt3/350m", "gpt3/1.3b", "gpt3/5b", "gpt3/20b", "llama2/7b", "llama2/13b",
                 "llama3/8b", "llama3.2/1b", "tiny/gpt", "tiny/llama"):
        assert name in names


def test_tokenizer_train_and_preprocess_from_the_command_line(tiny_corpus, tmp_path):
    p = _run(["tokenizer", "train", "--input", str(tiny_corpus["jsonl"]), "--vocab-size", "300",
              "--out", str(tmp_path / "tok")])
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "def f(): pass"}\n{"text": oops}\n{"text": "x = 1"}\n')
    args = ["preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "out"), "--tokenizer",
            str(tmp_path / "tok"), "--append-eod"]
    err = _one_error_line(_run(args))
    assert f"{bad}:2" in err
    assert not list(tmp_path.glob("out*"))  # nothing half-written
    p = _run(args + ["--skip-bad-lines", "--workers", "2"])
    assert p.returncode == 0, p.stderr
    assert '"skipped_lines": 1' in p.stdout and '"documents": 2' in p.stdout
    assert (tmp_path / "out_text_document.bin").exists() and (tmp_path / "out_text_document.idx").exists()


def test_config_accepts_the_nemo_override_line(capsys):
    assert main(["config", "gpt3/126m", "trainer.devices=4", "trainer.num_nodes=2", "model.micro_batch_size=6",
                 "model.global_batch_size=192", "model.optim.betas=[0.9,0.95]",
                 "model.data.splits_string='980,10,10'"]) == 0
    out = capsys.readouterr().out
    assert "accumulate_grad_batches: 4" in out  # 192 / (6 x 8)
    assert "splits_string: 980,10,10" in out
    assert "betas: [0.9, 0.95]" in out


def test_overrides_may_follow_a_flag_that_follows_other_overrides(capsys):
    """argparse alone rejects `config R a=1 --estimate b=2`; the overrides after the flag act."""
    assert main(["config", "tiny/llama", "trainer.devices=2", "--estimate", "model.micro_batch_size=2",
                 "trainer.num_nodes=2"]) == 0
    out = capsys.readouterr().out
    assert "4 GPUs (2 nodes x 2), data parallel 4" in out, out
    p = _run(["config", "tiny/llama", "trainer.devices=2", "--estimate", "--bogus"])  # not an override: refused
    assert p.returncode == 2 and "unrecognized arguments: --bogus" in p.stderr
