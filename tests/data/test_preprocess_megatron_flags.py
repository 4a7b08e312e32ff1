"""Issue 16.2: `lmforge preprocess` takes Megatron's and NeMo's flags and inputs, and writes Megatron's bytes.

The users' command (../shared/notes/nemo_user_commands.md) runs verbatim on a small corpus with GPT-2 files
trained here; its .bin/.idx are laid out by hand from transformers' GPT2Tokenizer ids + the EOD. Inputs as
folders, globs, .gz / .zst JSON lines, Parquet and FASTA give the same documents as one plain JSONL file.
"""

from __future__ import annotations

import gzip
import json
import shlex
import struct

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data.indexed import IndexedDataset
from lmforge.data.preprocess import preprocess
from lmforge.data.tokenizers import KmerTokenizer, load_gpt2_bpe
from tests.data.test_tokenizer_formats import reference_gpt2, stdlib_texts, write_gpt2_files

USERS_COMMAND = ("lmforge preprocess --input=train_data.jsonl --json-keys=text --tokenizer-library=megatron "
                 "--vocab gpt2-vocab.json --dataset-impl mmap --tokenizer-type GPT2BPETokenizer "
                 "--merge-file gpt2-merges.txt --output-prefix=hfbpe_gpt_training_data --append-eod --workers=32")
QUIET = dict(log=lambda *a: None)


def documents() -> list[str]:
    docs = []
    for text in stdlib_texts():
        docs.extend(p for p in text.split("\n\n\n") if p.strip())
    return docs[:80]


def megatron_bytes(id_lists, eod, dtype="H") -> tuple[bytes, bytes]:
    """Megatron's MMIDIDX layout (one sequence per non-empty document), written by hand."""
    lengths, tokens, docs = [], [], [0]
    for ids in id_lists:
        if ids:
            ids = list(ids) + ([eod] if eod is not None else [])
            lengths.append(len(ids))
            tokens.extend(ids)
        docs.append(len(lengths))
    size = struct.calcsize(dtype)
    pointers = list(np.cumsum([0] + [size * n for n in lengths[:-1]])) if lengths else []
    code = {"H": 8, "i": 4}[dtype]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(lengths), len(docs))
    idx += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(lengths)}q", *pointers)
    idx += struct.pack(f"<{len(docs)}q", *docs)
    return struct.pack(f"<{len(tokens)}{dtype}", *tokens), idx


def read(prefix) -> tuple[bytes, bytes]:
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    docs = documents()
    with open(root / "train_data.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
    vocab, merges = write_gpt2_files(root, stdlib_texts())
    ref = reference_gpt2(vocab, merges, root / "ref")
    return {"root": root, "docs": docs, "vocab": vocab, "merges": merges, "ref": ref}


def test_the_users_command_writes_megatrons_bytes(env, monkeypatch, capsys):
    monkeypatch.chdir(env["root"])
    argv = shlex.split(USERS_COMMAND)
    assert argv[0] == "lmforge"
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    assert summary["workers"] == 32 and summary["append_eod"] and summary["documents"] == len(env["docs"])
    ref = env["ref"]
    expected = megatron_bytes([ref(d)["input_ids"] for d in env["docs"]], ref.convert_tokens_to_ids("<|endoftext|>"))
    assert read(env["root"] / "hfbpe_gpt_training_data_text_document") == expected
    ds = IndexedDataset(env["root"] / "hfbpe_gpt_training_data_text_document")
    assert ds.num_documents == len(env["docs"]) and all(ds[i][-1] == ref.eos_token_id for i in range(len(ds)))


def test_sentencepiece_and_huggingface_libraries(env, tmp_path, capsys):
    import sentencepiece as spm

    corpus = env["root"] / "train_data.jsonl"
    assert main(["tokenizer", "train", "--type", "sentencepiece", "--input", str(corpus), "--vocab-size", "400",
                 "--out", str(tmp_path / "sp")]) == 0
    model = tmp_path / "sp" / "tokenizer.model"
    assert main(["preprocess", "--input", str(corpus), "--json-keys", "text", "--tokenizer-library", "sentencepiece",
                 "--tokenizer-model", str(model), "--output-prefix", str(tmp_path / "sp_data"), "--append-eod",
                 "--workers", "2"]) == 0
    ref = spm.SentencePieceProcessor(model_file=str(model))
    assert read(tmp_path / "sp_data_text_document") == megatron_bytes([ref.encode(d) for d in env["docs"]],
                                                                       ref.eos_id())
    # Megatron-LM's spelling (no library, --tokenizer-type) and NeMo's huggingface library with GPT-2 files
    assert main(["preprocess", "--input", str(corpus), "--tokenizer-type", "GPTSentencePieceTokenizer",
                 "--tokenizer-model", str(model), "--output-prefix", str(tmp_path / "gptsp")]) == 0
    assert read(tmp_path / "gptsp_text_document") == megatron_bytes([ref.encode(d) for d in env["docs"]], None)
    assert main(["preprocess", "--input", str(corpus), "--tokenizer-library", "huggingface", "--tokenizer-type",
                 "gpt2", "--vocab-file", str(env["vocab"]), "--merge-file", str(env["merges"]),
                 "--output-prefix", str(tmp_path / "hf"), "--append-eod"]) == 0
    gpt2 = env["ref"]
    assert read(tmp_path / "hf_text_document") == megatron_bytes([gpt2(d)["input_ids"] for d in env["docs"]],
                                                                  gpt2.eos_token_id)


def test_folders_globs_compressed_parquet_give_the_same_documents(env, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs, tok = env["docs"], load_gpt2_bpe(env["vocab"], env["merges"])
    parts = [docs[:20], docs[20:45], docs[45:60], docs[60:]]
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    with gzip.open(folder / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in parts[0])
    raw = "".join(json.dumps({"text": d}) + "\n" for d in parts[1]).encode()
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": parts[2], "n": list(range(len(parts[2])))}), folder / "c.parquet")
    (folder / "sub" / "wiki_00").write_text("".join(json.dumps({"text": d}) + "\n" for d in parts[3]))  # no suffix
    (folder / ".hidden.jsonl").write_text("not json\n")
    expected = megatron_bytes([tok.encode(d) for d in docs], tok.eod_id)
    summary = preprocess([folder], tmp_path / "f", tok, append_eod=True, workers=2, chunk_lines=7, **QUIET)
    assert summary["documents"] == len(docs) and read(tmp_path / "f_text_document") == expected
    preprocess([folder / "*.*", folder / "sub" / "wiki_*"], tmp_path / "g", tok, append_eod=True, **QUIET)
    assert read(tmp_path / "g_text_document") == expected
    # NeMo's --preproc-folder / --files-filter: only the matching files of the folder
    assert main(["preprocess", "--input", str(folder), "--preproc-folder", "--files-filter", "**/*.json*",
                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(env["vocab"]), "--merge-file",
                 str(env["merges"]), "--output-prefix", str(tmp_path / "h"), "--append-eod"]) == 0
    assert read(tmp_path / "h_text_document") == megatron_bytes([tok.encode(d) for d in parts[0] + parts[1]],
                                                                 tok.eod_id)
    assert main(["preprocess", "--input", str(folder / "c.parquet"), "--preproc-folder", "--tokenizer-type",
                 "GPT2BPETokenizer", "--vocab-file", str(env["vocab"]), "--merge-file", str(env["merges"]),
                 "--output-prefix", str(tmp_path / "i")]) == 2
    assert "--preproc-folder: --input" in capsys.readouterr().err
    # a Parquet row without text names its row; a column that is not there names the columns present
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "bad.parquet")
    with pytest.raises(Exception, match=r"bad.parquet:2: key 'text' holds null"):
        preprocess([tmp_path / "bad.parquet"], tmp_path / "j", tok, **QUIET)
    with pytest.raises(Exception, match=r"c.parquet: no column 'body' \(columns: 'text', 'n'\)"):
        preprocess([folder / "c.parquet"], tmp_path / "k", tok, json_keys=["body"], **QUIET)


def test_fasta_records_are_documents(tmp_path):
    fasta = tmp_path / "genes.fa.gz"
    records = {"seq1 first gene": "ACGTACGTAC" * 3 + "GG", "seq2": "acgtnnACGT", "seq3 empty": ""}
    with gzip.open(fasta, "wt") as f:
        for name, seq in records.items():
            f.write(f">{name}\n")
            for i in range(0, len(seq), 7):  # FASTA wraps sequences over lines
                f.write(seq[i:i + 7] + "\n")
    tok = KmerTokenizer("dna", k=3)
    summary = preprocess([fasta], tmp_path / "dna", tok, append_eod=True, **QUIET)
    assert summary["documents"] == 3
    assert read(tmp_path / "dna_text_document") == megatron_bytes([tok.encode(s) for s in records.values()], 3)
    ds = IndexedDataset(tmp_path / "dna_text_document")
    assert tok.decode(ds[0][:-1].tolist()) == records["seq1 first gene"]
    # the header is there too, under id / description
    preprocess([fasta], tmp_path / "ids", KmerTokenizer("ACDEFGHIKLMNPQRSTVWYqs0123456789 ", k=1, uppercase=False),
               json_keys=["id"], **QUIET)
    assert IndexedDataset(tmp_path / "ids_id_document").num_documents == 3


def test_every_flag_acts_and_unknown_ones_are_named(env, tmp_path, capsys):
    corpus = env["root"] / "train_data.jsonl"
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(env["vocab"]), "--merge-file",
            str(env["merges"])]
    # --log-interval: a progress line every N documents (else one every 30 s: none in a run this short)
    progress = lambda out: [line for line in out.splitlines() if line.startswith("  ") and "documents," in line]  # noqa
    assert main(["preprocess", "--input", str(corpus), *gpt2, "--output-prefix", str(tmp_path / "a"),
                 "--log-interval", "1", "--workers", "2"]) == 0
    assert progress(capsys.readouterr().out)[-1].startswith("  80 documents, ")
    assert main(["preprocess", "--input", str(corpus), *gpt2, "--output-prefix", str(tmp_path / "b")]) == 0
    assert progress(capsys.readouterr().out) == []
    # --tokenizer and Megatron's flags together, flags a GPT-2 tokenizer does not use, unknown flags
    for extra, words in [(["--tokenizer", str(env["root"] / "ref")], "--tokenizer and --tokenizer-type"),
                         (["--tokenizer-model", "m.model"], "--tokenizer-model=m.model: not used by a GPT-2"),
                         (["--keep-newlines"], "--keep-newlines is not supported")]:
        assert main(["preprocess", "--input", str(corpus), *gpt2, "--output-prefix", str(tmp_path / "c"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    with pytest.raises(SystemExit) as e:
        main(["preprocess", "--input", str(corpus), *gpt2, "--output-prefix", str(tmp_path / "c"), "--shuffle-docs"])
    assert e.value.code == 2 and "unrecognized arguments: --shuffle-docs" in capsys.readouterr().err
    assert not list(tmp_path.glob("c_*"))


def test_pretraining_on_the_users_data_with_their_vocab_and_merge_files(env, tmp_path, monkeypatch, capsys):
    """The users' data and model.tokenizer.vocab_file / merge_file (no model.tokenizer.model): GPT-2 BPE is
    loaded from the two files, trains, and the checkpoint carries it as tokenizer.json with the same ids."""
    from lmforge.config import load_config
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.train.pretrain import run
    from tests.conftest import tiny_overrides

    monkeypatch.chdir(env["root"])
    if not (env["root"] / "hfbpe_gpt_training_data_text_document.bin").exists():
        assert main(shlex.split(USERS_COMMAND)[1:]) == 0
    corpus = {"prefix": str(env["root"] / "hfbpe_gpt_training_data_text_document"), "tokenizer": "unused"}
    overrides = tiny_overrides(corpus, tmp_path / "run", **{
        "trainer.max_steps": 2, "trainer.val_check_interval": 2, "model.tokenizer.model": "null",
        "model.tokenizer.library": "megatron", "model.tokenizer.type": "GPT2BPETokenizer",
        "model.tokenizer.vocab_file": "gpt2-vocab.json", "model.tokenizer.merge_file": "gpt2-merges.txt"})
    summary = run(load_config("tiny/llama", overrides))
    assert summary["steps"] == summary["max_steps"] == 2
    saved = sorted((tmp_path / "run").rglob("tokenizer.json"))
    assert saved, "the checkpoint holds no tokenizer"
    again = load_tokenizer(saved[-1].parent)
    assert again.encode(env["docs"][0]) == env["ref"](env["docs"][0])["input_ids"]
    assert again.vocab_size == len(env["ref"])


README = __import__("pathlib").Path(__file__).resolve().parents[2] / "README.md"
README_SECTION = "## Data from NeMo and Megatron"


def test_readme_data_commands_run_verbatim(env, tmp_path):
    """Every command of the README's NeMo/Megatron data section, verbatim, through a shell, on files written
    here: the users' GPT-2 files and JSONL, .zst JSON lines + Parquet, FASTA genomes."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    text = README.read_text(encoding="utf-8")
    block = text[text.index(README_SECTION):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 5 and commands[0] == USERS_COMMAND
    for name in ("train_data.jsonl", "gpt2-vocab.json", "gpt2-merges.txt"):
        (tmp_path / name).write_bytes((env["root"] / name).read_bytes())
    docs = env["docs"]
    (tmp_path / "data").mkdir()
    for i, part in enumerate((docs[:30], docs[30:50])):
        raw = "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
        (tmp_path / "data" / f"part-{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": docs[50:]}), tmp_path / "data" / "more.parquet")
    (tmp_path / "genomes").mkdir()
    genomes = {"chr1": "ACGTTGCA" * 40, "chr2": "GGGCCCAATT" * 25 + "ACG", "plasmid": "ATGC" * 30}
    (tmp_path / "genomes" / "a.fa").write_text("".join(f">{k}\n{v[:60]}\n{v[60:]}\n" for k, v in list(genomes.items())[:2]))
    with gzip.open(tmp_path / "genomes" / "b.fasta.gz", "wt") as f:
        f.write(f">plasmid\n{genomes['plasmid']}\n")
    bindir = os.path.dirname(sys.executable)
    src = str(README.parent / "src")  # this checkout's lmforge, whichever one the `lmforge` script was installed from
    env_vars = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p))
    lmforge = os.path.join(bindir, "lmforge")
    for command in commands:
        assert command.startswith("lmforge ")
        run = command if os.path.exists(lmforge) else f"{sys.executable} -m lmforge {command[len('lmforge '):]}"
        p = subprocess.run(run, shell=True, cwd=tmp_path, env=env_vars, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    ref = env["ref"]
    assert read(tmp_path / "hfbpe_gpt_training_data_text_document") == megatron_bytes(
        [ref(d)["input_ids"] for d in docs], ref.eos_token_id)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp_tok" / "tokenizer.model"))
    assert sp.get_piece_size() == 2000
    assert read(tmp_path / "data" / "sp_text_document") == megatron_bytes([sp.encode(d) for d in docs], sp.eos_id())
    dna = KmerTokenizer("dna", k=6)
    assert read(tmp_path / "data" / "dna_text_document") == megatron_bytes(
        [dna.encode(s) for s in genomes.values()], dna.eod_id)  # 15,634 ids: uint16
