"""Issue 15: every bad input to the data commands gets one `error:` line, exit code 2, no traceback, no new file.

Each case of the table writes its inputs into a fresh folder, runs the command line in-process (``main``), and
checks the exit code, that stderr is exactly one line starting ``error:`` and holding the expected words, and
that the folder holds exactly what it held before (nothing half-written, no hidden temporaries).

Permission cases: as an ordinary user ``chmod`` makes the file unreadable (the folder unwritable) and the OS
refuses; root ignores file modes, so under root the test raises the same PermissionError the OS gives an
ordinary user, at the same call.
"""

from __future__ import annotations

import builtins
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.tokenizers import train_bpe

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(200)))
    train_bpe([corpus], 300, root / "tok")
    return root / "tok"


def good_jsonl(folder: Path, name: str = "in.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps({"text": f"x = {i}\n"}) + "\n" for i in range(20)))
    return path


def deny_read(monkeypatch, path: Path) -> None:
    """Make ``path`` unreadable: chmod, and under root the PermissionError the OS gives an ordinary user."""
    path.chmod(0)
    if ROOT:
        real_open = builtins.open

        def guarded(file, *a, **k):
            if isinstance(file, (str, os.PathLike)) and Path(file) == path:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", guarded)


def deny_write(monkeypatch, folder: Path) -> None:
    """Make ``folder`` unwritable: chmod, and under root the answer the OS gives an ordinary user."""
    folder.chmod(0o555)
    if ROOT:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == folder and mode & os.W_OK
                            else real_access(p, mode, *a, **k))


# -- the cases: (id, setup(folder, tok, monkeypatch) -> argv, words the one error line must hold) -------------

def pre(inputs, prefix, tok, *extra) -> list[str]:
    return ["preprocess", "--input", *map(str, inputs), "--output-prefix", str(prefix), "--tokenizer", str(tok),
            *extra]


def tok_train(inputs, out, *extra) -> list[str]:
    return ["tokenizer", "train", "--input", *map(str, inputs), "--vocab-size", "280", "--out", str(out), *extra]


def truncated_gz(d: Path) -> Path:
    data = gzip.compress("".join(json.dumps({"text": f"line {i} " * 20}) + "\n" for i in range(2000)).encode())
    (d / "in.jsonl.gz").write_bytes(data[: len(data) // 2])
    return d / "in.jsonl.gz"


def nested(d: Path) -> Path:
    (d / "deep.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": ' + "[" * 100_000 + "\n")
    return d / "deep.jsonl"


def existing_outputs(d, tok, mp):
    inp = good_jsonl(d)
    assert main(pre([inp], d / "out", tok)) == 0
    return pre([inp], d / "out", tok)


def a_file_as_folder(d, tok, mp):
    (d / "afile").write_text("x")
    return pre([good_jsonl(d)], d / "afile" / "sub" / "out", tok)


def unreadable_input(d, tok, mp):
    inp = good_jsonl(d)
    deny_read(mp, inp)
    return pre([inp], d / "out", tok)


def unwritable_output(d, tok, mp):
    (d / "ro").mkdir()
    inp = good_jsonl(d)
    deny_write(mp, d / "ro")
    return pre([inp], d / "ro" / "new" / "out", tok)


def long_document(d, tok, mp):
    inp = d / "long.jsonl"
    inp.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "y" * 5000}) + "\n")
    return pre([inp], d / "out", tok, "--max-document-chars", "1000")


def overlong_line(d, tok, mp):  # longer than any document within the limit can be: refused before it is read whole
    inp = d / "huge.jsonl"
    inp.write_text(json.dumps({"text": "z" * 3_000_000}) + "\n")
    return pre([inp], d / "out", tok, "--max-document-chars", "10")


def existing_tokenizer(d, tok, mp):
    inp = good_jsonl(d)
    assert main(tok_train([inp], d / "tok")) == 0
    return tok_train([inp], d / "tok")


def out_is_a_file(d, tok, mp):
    (d / "tokfile").write_text("x")
    return tok_train([good_jsonl(d)], d / "tokfile")


def tok_unreadable_input(d, tok, mp):
    inp = good_jsonl(d)
    deny_read(mp, inp)
    return tok_train([inp], d / "tok")


def tok_unwritable_out(d, tok, mp):
    (d / "ro").mkdir()
    inp = good_jsonl(d)
    deny_write(mp, d / "ro")
    return tok_train([inp], d / "ro" / "tok")


def tok_out_under_a_file(d, tok, mp):
    (d / "afile").write_text("x")
    return tok_train([good_jsonl(d)], d / "afile" / "tok")


CASES = [
    ("preprocess: outputs exist", existing_outputs, ["out_text_document.bin exists", "--overwrite"]),
    ("preprocess: truncated .gz", lambda d, t, mp: pre([truncated_gz(d)], d / "out", t),
     ["in.jsonl.gz: truncated or corrupt gzip file", "gzip -t"]),
    ("preprocess: deeply nested JSON", lambda d, t, mp: pre([nested(d)], d / "out", t),
     ["deep.jsonl:2: JSON nested too deeply"]),
    ("preprocess: unreadable input", unreadable_input, ["cannot read input file", "in.jsonl: permission denied"]),
    ("preprocess: unwritable output folder", unwritable_output, ["cannot write in", "ro (permission denied)"]),
    ("preprocess: output under a file", a_file_as_folder, ["afile is a file, not a folder"]),
    ("preprocess: missing input", lambda d, t, mp: pre([d / "nope.jsonl"], d / "out", t), ["nope.jsonl not found"]),
    ("preprocess: input folder holds no file", lambda d, t, mp: (d / "empty").mkdir() or pre([d / "empty"], d / "out", t),
     ["input file folder", "empty holds no file"]),
    ("preprocess: input glob matches nothing", lambda d, t, mp: pre([d / "*.jsonl"], d / "out", t),
     ["*.jsonl matches no file"]),
    ("preprocess: --split-sentences", lambda d, t, mp: pre([good_jsonl(d)], d / "out", t, "--split-sentences"),
     ["--split-sentences is not supported", "NLTK"]),
    ("preprocess: --dataset-impl lazy", lambda d, t, mp: pre([good_jsonl(d)], d / "out", t, "--dataset-impl", "lazy"),
     ["--dataset-impl lazy", "mmap"]),
    ("preprocess: unknown tokenizer type",
     lambda d, t, mp: ["preprocess", "--input", str(good_jsonl(d)), "--output-prefix", str(d / "out"),
                       "--tokenizer-type", "BertWordPieceCase", "--vocab-file", str(d / "v.txt")],
     ["--tokenizer-type=BertWordPieceCase: not a tokenizer type lmforge reads", "GPT2BPETokenizer"]),
    ("preprocess: no tokenizer", lambda d, t, mp: ["preprocess", "--input", str(good_jsonl(d)), "--output-prefix",
                                                   str(d / "out")], ["preprocess needs a tokenizer"]),
    ("preprocess: document too long", long_document,
     ["long.jsonl:2: document of 5,000 characters is over --max-document-chars=1,000"]),
    ("preprocess: line too long to read", overlong_line, ["huge.jsonl:1: line of 3,000,013 bytes", "--max-document-chars"]),
    ("preprocess: --max-document-chars 0",
     lambda d, t, mp: pre([good_jsonl(d)], d / "out", t, "--max-document-chars", "0"),
     ["--max-document-chars=0 must be a positive number"]),
    ("tokenizer train: tokenizer exists", existing_tokenizer, ["already holds a tokenizer", "--overwrite"]),
    ("tokenizer train: --out is a file", out_is_a_file, ["tokfile is a file"]),
    ("tokenizer train: truncated .gz", lambda d, t, mp: tok_train([truncated_gz(d)], d / "tok"),
     ["truncated or corrupt gzip file"]),
    ("tokenizer train: deeply nested JSON", lambda d, t, mp: tok_train([nested(d)], d / "tok"),
     ["deep.jsonl:2: JSON nested too deeply"]),
    ("tokenizer train: unreadable input", tok_unreadable_input, ["permission denied"]),
    ("tokenizer train: unwritable --out", tok_unwritable_out, ["cannot write in", "permission denied"]),
    ("tokenizer train: --out under a file", tok_out_under_a_file, ["afile is a file, not a folder"]),
    ("tokenizer train: text too long", lambda d, t, mp: tok_train([good_jsonl(d)], d / "tok", "--max-document-chars", "3"),
     ["in.jsonl:1: a text of 6 characters is over --max-document-chars=3"]),
    ("evaluate: --limit -1", lambda d, t, mp: ["evaluate", str(d / "model"), "--tasks", "piqa", "--limit", "-1"],
     ["--limit takes a positive number", "got -1"]),
]


def tree(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` (hidden ones too) with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("setup,words", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(tok, tmp_path, monkeypatch, capsys, setup, words):
    argv = setup(tmp_path, tok, monkeypatch)
    before = tree(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        for p in (tmp_path / "ro",):
            if p.exists():
                p.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert tree(tmp_path) == before


def test_a_real_process_prints_one_line(tok, tmp_path):
    """The same through ``python -m lmforge``: a truncated .gz, then outputs that exist."""
    argv = pre([truncated_gz(tmp_path)], tmp_path / "out", tok)
    p = subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert "truncated or corrupt gzip" in p.stderr and not list(tmp_path.glob("out*"))
