"""Issue 16.1: the tokenizers NeMo / Megatron users bring give the reference libraries' ids.

GPT-2 BPE from vocab.json + merges.txt against transformers' GPT2Tokenizer on the same files; SentencePiece
.model files against the sentencepiece library; tiktoken BPE files against tiktoken (and, written from the
GPT-2 files, against GPT2Tokenizer too); character / k-mer tokenizers by their definition. Every file is
written by the test (tokenizers trained here on this Python's standard library): nothing is downloaded.
"""

from __future__ import annotations

import base64
import inspect
import json
import pickle
import sys

import pytest

from lmforge.cli import main
from lmforge.data.tokenizers import (KmerTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer,
                                     load_gpt2_bpe, load_tokenizer, open_tokenizer, tokenizer_from_config)
from lmforge.errors import ConfigError, DataError

# Texts that stress byte-level BPE: unicode, emoji, runs of spaces, tabs, CRLF, contractions, the EOD text.
EDGE = ["héllo  wörld\n\n\t x 🙂 — 合計", "it's   they're we'll\r\n  \n", "a<|endoftext|>b", "", " ", "12345 6.78e-9",
        "naïve café\u00a0façade", "\x00\x01 tab\tend"]


def stdlib_texts() -> list[str]:
    import argparse, calendar, difflib, json as json_mod, shutil, textwrap  # noqa: E401
    return [inspect.getsource(m) for m in (argparse, calendar, difflib, json_mod, shutil, textwrap)]


def write_gpt2_files(folder, texts, vocab_size=600, with_eod=True):
    """A byte-level BPE trained here, saved as GPT-2's two files (gpt2-vocab.json, gpt2-merges.txt)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"] if with_eod else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.model.save(str(folder), "gpt2")
    return folder / "gpt2-vocab.json", folder / "gpt2-merges.txt"


def reference_gpt2(vocab, merges, folder):
    """transformers' GPT2Tokenizer on the same two files (named as from_pretrained expects them)."""
    from transformers import GPT2Tokenizer

    folder.mkdir()
    (folder / "vocab.json").write_bytes(vocab.read_bytes())
    (folder / "merges.txt").write_bytes(merges.read_bytes())
    return GPT2Tokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    texts = stdlib_texts()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    vocab, merges = write_gpt2_files(root / "gpt2", texts)
    return {"root": root, "texts": texts, "corpus": corpus, "vocab": vocab, "merges": merges,
            "ref": reference_gpt2(vocab, merges, root / "ref")}


def test_gpt2_bpe_gives_gpt2tokenizer_ids(env, tmp_path):
    tok, ref = load_gpt2_bpe(env["vocab"], env["merges"]), env["ref"]
    assert isinstance(tok, Tokenizer)
    for text in env["texts"] + EDGE:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text[:60]
        assert tok.decode(ids) == text
    assert tok.encode_batch(EDGE) == [ref(t)["input_ids"] for t in EDGE]
    vocab = json.loads(env["vocab"].read_text())
    assert tok.eod_id == vocab["<|endoftext|>"] == ref.eos_token_id
    assert tok.vocab_size == len(vocab) == len(ref)
    assert tok.encode("a<|endoftext|>b")[1] == tok.eod_id  # a special token, as in GPT2Tokenizer
    assert len(tok.encode(env["texts"][0])) < len(env["texts"][0].encode()) / 2  # merges were applied
    # saved as tokenizer.json and read back: the same ids; a folder of the two files reads as GPT-2 BPE too
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(env["texts"][2]) == tok.encode(env["texts"][2]) and again.eod_id == tok.eod_id
    assert load_tokenizer(env["root"] / "ref").encode(env["texts"][3]) == ref(env["texts"][3])["input_ids"]


def test_gpt2_vocab_without_endoftext_gets_it_next_as_gpt2tokenizer_does(env, tmp_path):
    vocab, merges = write_gpt2_files(tmp_path / "noeod", env["texts"][:2], vocab_size=400, with_eod=False)
    assert "<|endoftext|>" not in json.loads(vocab.read_text())
    tok, ref = load_gpt2_bpe(vocab, merges), reference_gpt2(vocab, merges, tmp_path / "ref")
    assert tok.eod_id == 400 == ref.convert_tokens_to_ids("<|endoftext|>")
    assert tok.encode(env["texts"][4]) == ref(env["texts"][4])["input_ids"]


def test_gpt2_files_that_do_not_fit_are_named(env, tmp_path):
    bad = tmp_path / "merges.txt"
    bad.write_text("#version: 0.2\nĠ t\nzz qq\n")
    with pytest.raises(DataError, match=r"merges.txt:3: merge 'zz qq' names a token"):
        load_gpt2_bpe(env["vocab"], bad)
    (tmp_path / "v.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="--vocab-file .*v.json: expected a JSON object"):
        load_gpt2_bpe(tmp_path / "v.json", env["merges"])
    with pytest.raises(DataError, match="--merge-file .*nothing.txt not found"):
        load_gpt2_bpe(env["vocab"], tmp_path / "nothing.txt")


def test_sentencepiece_trained_by_the_cli_gives_the_library_ids(env, tmp_path, capsys):
    import sentencepiece as spm

    out = tmp_path / "sp"
    assert main(["tokenizer", "train", "--type", "sentencepiece", "--input", str(env["corpus"]), "--vocab-size", "500",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lmforge_tokenizer.json", "tokenizer.model"]
    tok = load_tokenizer(out)
    ref = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == ref.get_piece_size() == 500
    for text in env["texts"] + EDGE:
        assert tok.encode(text) == ref.encode(text), text[:60]
        assert tok.decode(tok.encode(text)) == text  # byte fallback, no normalization: lossless
    assert tok.eod_id == ref.eos_id() == ref.piece_to_id("</s>") == 2 and tok.bos_id == ref.bos_id() == 1
    assert tok.encode_batch(EDGE[:3]) == [ref.encode(t) for t in EDGE[:3]]
    assert tok.token_to_id("</s>") == 2 and tok.token_to_id("no-such-piece") is None
    assert tok.decode([1, *ref.encode("x = 1"), 2]) == "<s>x = 1</s>"
    assert tok.decode([1, *ref.encode("x = 1"), 2], skip_special_tokens=True) == "x = 1"
    # a .model file named directly, through NeMo's / Megatron's settings, and after pickling (worker processes)
    model = out / "tokenizer.model"
    assert load_tokenizer(model).encode(EDGE[0]) == ref.encode(EDGE[0])
    nemo = open_tokenizer(library="sentencepiece", model=model)
    assert nemo.encode(env["texts"][1]) == ref.encode(env["texts"][1])
    llama2 = open_tokenizer(type="Llama2Tokenizer", model=model)  # Megatron's Llama2Tokenizer adds the BOS
    assert llama2.encode(EDGE[0]) == ref.encode(EDGE[0], add_bos=True)
    assert pickle.loads(pickle.dumps(llama2)).encode(EDGE[1]) == ref.encode(EDGE[1], add_bos=True)
    # the prompt rule (data.prompts) reads it: no BOS for the NeMo convention, the BOS for Llama2Tokenizer's
    from lmforge.data.prompts import encode_prompt

    assert encode_prompt(nemo, "def f():") == ref.encode("def f():")
    assert encode_prompt(llama2, "def f():") == [1, *ref.encode("def f():")]


def test_tokenizer_train_unigram_bpe_types(env, tmp_path, capsys):
    assert main(["tokenizer", "train", "--type", "unigram", "--input", str(env["corpus"]), "--vocab-size", "400",
                 "--out", str(tmp_path / "uni")]) == 0
    uni = load_tokenizer(tmp_path / "uni")
    assert isinstance(uni, Tokenizer) and uni.vocab_size == 400 and uni.eod_id == uni.token_to_id("</s>") == 2
    code = "def main(argv):\n    return parse(argv)\n"
    assert uni.decode(uni.encode(code)) == code and len(uni.encode(code)) < len(code)
    assert main(["tokenizer", "train", "--type", "sentencepiece", "--model-type", "bpe", "--input", str(env["corpus"]),
                 "--vocab-size", "450", "--out", str(tmp_path / "spbpe")]) == 0
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "spbpe" / "tokenizer.model"))
    assert ref.get_piece_size() == 450 and load_tokenizer(tmp_path / "spbpe").encode(code) == ref.encode(code)
    # --overwrite replaces a tokenizer of another kind: the folder reads back as the new one
    assert main(["tokenizer", "train", "--type", "bpe", "--input", str(env["corpus"]), "--vocab-size", "300",
                 "--out", str(tmp_path / "spbpe"), "--overwrite"]) == 0
    assert isinstance(load_tokenizer(tmp_path / "spbpe"), Tokenizer)
    assert not (tmp_path / "spbpe" / "tokenizer.model").exists()


def _read_ranks(path) -> dict:
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in open(path) if line.strip())}


def test_tiktoken_files_give_tiktoken_and_gpt2_ids(env, tmp_path):
    import tiktoken

    from lmforge.data.tokenizers import TIKTOKEN_PATTERNS, _byte_symbols

    # GPT-2's vocabulary as a tiktoken BPE file: token bytes, rank = GPT-2 id (merge order)
    unsym = {s: b for b, s in _byte_symbols().items()}
    vocab = json.loads(env["vocab"].read_text())
    path = tmp_path / "gpt2.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes(unsym[c] for c in t)).decode()} {i}\n"
                            for t, i in sorted(vocab.items(), key=lambda x: x[1]) if t != "<|endoftext|>"))
    tok = open_tokenizer(library="tiktoken", model=path, tiktoken_pattern="gpt2")
    assert isinstance(tok, TiktokenTokenizer)
    ref = tiktoken.Encoding(name="ref", pat_str=TIKTOKEN_PATTERNS["gpt2"], mergeable_ranks=_read_ranks(path),
                            special_tokens={"<|endoftext|>": len(vocab)})
    gpt2 = env["ref"]
    for text in env["texts"] + [t for t in EDGE if "<|endoftext|>" not in t]:
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text) == gpt2(text)["input_ids"], text[:60]
        assert tok.decode(ids) == text
    assert tok.eod_id == len(vocab) and tok.id_to_token(300) == gpt2.convert_ids_to_tokens(300)
    assert tok.token_to_id(gpt2.convert_ids_to_tokens(400)) == 400
    # cl100k's pattern (the default) against tiktoken with it; saved and read back; pickled
    cl = TiktokenTokenizer.from_file(path)
    ref_cl = tiktoken.Encoding(name="cl", pat_str=TIKTOKEN_PATTERNS["cl100k"], mergeable_ranks=_read_ranks(path),
                               special_tokens={})
    assert cl.encode(env["texts"][0]) == ref_cl.encode_ordinary(env["texts"][0])
    cl.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode(env["texts"][5]) == ref_cl.encode_ordinary(env["texts"][5])
    assert pickle.loads(pickle.dumps(cl)).encode(EDGE[0]) == ref_cl.encode_ordinary(EDGE[0])


def test_missing_optional_libraries_are_named(env, tmp_path, monkeypatch):
    (tmp_path / "t.tiktoken").write_text("YQ== 0\n")
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(DataError, match="pip install tiktoken"):
        load_tokenizer(tmp_path / "t.tiktoken")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    (tmp_path / "x.model").write_bytes(b"\x0a\x03abc")
    with pytest.raises(DataError, match="pip install sentencepiece"):
        load_tokenizer(tmp_path / "x.model")


def test_kmer_and_char_tokenizers(tmp_path, capsys):
    # DNA, k=3, stride 3: <pad> <unk> <s> </s> (0-3), A C G T N (4-8), then the 125 3-mers AAA.. (9 + 25a + 5b + c)
    tok = KmerTokenizer("dna", k=3)
    kmer = lambda s: 9 + 25 * "ACGTN".index(s[0]) + 5 * "ACGTN".index(s[1]) + "ACGTN".index(s[2])  # noqa: E731
    assert tok.vocab_size == 4 + 5 + 125 and tok.eod_id == 3 and tok.bos_id == 2
    assert tok.encode("ACGTACGTAC") == [kmer("ACG"), kmer("TAC"), kmer("GTA"), 5]  # the tail "C" as a character
    assert tok.encode("acgtacgtac") == tok.encode("ACGTACGTAC")  # soft-masked (lowercase) bases
    assert tok.decode(tok.encode("ACGTACGTAC")) == "ACGTACGTAC"
    assert tok.encode("ACXGT") == [1, 6, 7]  # a window with a letter outside the alphabet is <unk>
    overlapping = KmerTokenizer("dna", k=3, stride=1)
    assert overlapping.encode("ACGTA") == [kmer("ACG"), kmer("CGT"), kmer("GTA")]
    assert overlapping.decode(overlapping.encode("ACGTAC")) == "ACGTAC"
    # the CLI: a fixed alphabet, or the characters of the input (FASTA records); read back from the folder
    assert main(["tokenizer", "train", "--type", "kmer", "--alphabet", "dna", "--k", "3", "--out",
                 str(tmp_path / "km")]) == 0
    again = load_tokenizer(tmp_path / "km")
    assert again.encode("ACGTACGTAC") == tok.encode("ACGTACGTAC") and again.vocab_size == tok.vocab_size
    fasta = tmp_path / "prot.fasta"
    fasta.write_text(">sp|P1 first\nMKV\nLLA\n>sp|P2 second\nmwk\n")
    assert main(["tokenizer", "train", "--type", "char", "--input", str(fasta), "--out", str(tmp_path / "ch")]) == 0
    char = load_tokenizer(tmp_path / "ch")
    assert [char.id_to_token(i) for i in range(4, char.vocab_size)] == list("AKLMVW")
    assert char.encode("MKVW") == [4 + "AKLMVW".index(c) for c in "MKVW"] and char.decode(char.encode("MKV")) == "MKV"
    with pytest.raises(ConfigError, match="stride"):
        KmerTokenizer("dna", k=2, stride=3)
    assert main(["tokenizer", "train", "--type", "char", "--alphabet", "protein", "--vocab-size", "30", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--vocab-size applies to --type bpe / unigram / sentencepiece" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--type", "kmer", "--alphabet", "dna", "--input", str(fasta), "--out",
                 str(tmp_path / "y")]) == 2
    assert "--input is not read when --alphabet names the characters" in capsys.readouterr().err


def test_open_tokenizer_refusals(env):
    with pytest.raises(ConfigError, match="--tokenizer-library=tabular: unknown tokenizer library"):
        open_tokenizer(library="tabular", type="x")
    with pytest.raises(ConfigError, match="--tokenizer-type=BertWordPieceLowerCase: not a tokenizer type"):
        open_tokenizer(library="megatron", type="BertWordPieceLowerCase", vocab_file=env["vocab"])
    with pytest.raises(ConfigError, match="--merge-file not given"):
        open_tokenizer(library="megatron", type="GPT2BPETokenizer", vocab_file=env["vocab"])
    with pytest.raises(ConfigError, match="--tokenizer-model=m.model: not used by a GPT-2 BPE tokenizer"):
        open_tokenizer(type="GPT2BPETokenizer", vocab_file=env["vocab"], merge_file=env["merges"], model="m.model")
    with pytest.raises(ConfigError, match="--tiktoken-pattern applies to a tiktoken tokenizer only"):
        open_tokenizer(model=env["root"] / "ref", tiktoken_pattern="gpt2")
    assert open_tokenizer() is None and open_tokenizer(library="huggingface") is None


def test_pretraining_config_reads_vocab_and_merge_files(env, tmp_path):
    """model.tokenizer.vocab_file / merge_file (NeMo's keys) load GPT-2 BPE; library / type are read too."""
    from lmforge.config import load_config

    files = [f"model.tokenizer.vocab_file={env['vocab']}", f"model.tokenizer.merge_file={env['merges']}"]
    cfg = load_config("tiny/gpt", files)
    assert cfg.model.tokenizer.vocab_file == str(env["vocab"])  # a schema key now, not an ignored NeMo one
    assert not any("vocab_file" in w for w in cfg._warnings)
    tok = tokenizer_from_config(cfg.model.tokenizer)
    assert tok.encode(env["texts"][0]) == env["ref"](env["texts"][0])["input_ids"]
    nemo = load_config("tiny/gpt", ["model.tokenizer.library=megatron", "model.tokenizer.type=GPT2BPETokenizer", *files])
    assert tokenizer_from_config(nemo.model.tokenizer).eod_id == env["ref"].eos_token_id
    with pytest.raises(ConfigError, match="model.tokenizer.vocab_file=.*gpt2-vocab.json and "
                                          "model.tokenizer.merge_file=.*; model.tokenizer.merge_file not given"):
        tokenizer_from_config(load_config("tiny/gpt", ["model.tokenizer.type=GPT2BPETokenizer", files[0]]).model.tokenizer)
    sp = load_config("tiny/gpt", ["model.tokenizer.library=sentencepiece", "model.tokenizer.model=nowhere.model"])
    with pytest.raises(DataError, match="model.tokenizer.model nowhere.model not found"):
        tokenizer_from_config(sp.model.tokenizer)


def test_config_estimate_reads_the_vocabulary_of_vocab_and_merge_files(env, capsys):
    """`lmforge config --estimate` sizes the embedding from the GPT-2 files (600 ids, padded to 640)."""
    assert main(["config", "tiny/gpt", f"model.tokenizer.vocab_file={env['vocab']}",
                 f"model.tokenizer.merge_file={env['merges']}", "--estimate"]) == 0
    assert "vocabulary 640" in capsys.readouterr().out
