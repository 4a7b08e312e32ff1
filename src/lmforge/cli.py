"""The ``lmforge`` command. Thin: parse arguments, call a stage function, print errors.

A :class:`lmforge.errors.UserError` is printed as one line (``error: ...``) with exit code 2;
``--debug`` shows the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge import __version__
from lmforge.data.files import MAX_DOCUMENT_CHARS
from lmforge.errors import UserError
from lmforge.quickstart import DEFAULT_TIME_BUDGET
from lmforge.stop_markers import EXIT_STOPPED_TO_RESUME, stopped_to_resume



def _add_quickstart(sub):
    p = sub.add_parser("quickstart", help="train a small code model on this Python's standard library")
    p.add_argument("--out", default="quickstart_out", help="results folder (default: ./quickstart_out)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps (default: as many as fit the time budget on this machine)")
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET, metavar="SECONDS",
                   help=f"the whole quickstart ends within about this long (default {DEFAULT_TIME_BUDGET:.0f}): "
                        "training steps are sized to it from the measured speed, and training stops there after "
                        "saving; 0: no budget")
    p.add_argument("--max-bytes", type=int, default=None, help="cap on corpus bytes (default: sized to the machine)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--size", choices=["auto", "tiny", "small", "gpu"], default="auto",
                   help="model size; auto picks 'small' on a CPU and 'gpu' when a GPU is present")
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(a):
    from lmforge.quickstart import run

    if a.time_budget < 0:
        raise UserError(f"--time-budget {a.time_budget:g} must be a number of seconds, or 0 for no budget")
    summary = run(out=a.out, max_steps=a.max_steps, max_bytes=a.max_bytes, device=a.device, size=a.size,
                  time_budget=a.time_budget)
    return 0 if summary else 1


def _add_pretrain(sub):
    for name in ("pretrain", "train"):
        p = sub.add_parser(name, help="pretrain a GPT/Llama model from a recipe or YAML file" if name == "pretrain"
                           else "alias of pretrain")
        p.add_argument("config", help="a recipe name (see `lmforge recipes`) or a YAML file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.devices=4 model.micro_batch_size=2")
        p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(a):
    from lmforge.config import load_config
    from lmforge.train.pretrain import run

    cfg = load_config(a.config, a.overrides)
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    # Stopped after saving by SIGUSR1/SIGTERM (walltime, preemption) or trainer.max_time: a launcher requeues on
    # this code.
    return EXIT_STOPPED_TO_RESUME if stopped_to_resume(summary) else 0


def _add_config(sub):
    p = sub.add_parser("config", help="print the resolved config of a recipe or YAML file, with overrides applied "
                                      "(--finetune: of fine-tuning)",
                       description="lmforge config RECIPE|FILE.yaml [overrides] [--estimate]  |  "
                                   "lmforge config --finetune [FILE.yaml] [overrides]")
    p.add_argument("config", nargs="?", default=None,
                   help="a recipe name (see `lmforge recipes`) or a YAML file; with --finetune an optional YAML file")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--finetune", action="store_true",
                   help="print the resolved fine-tuning config (every key of `lmforge finetune`, see "
                        "docs/finetuning.md) instead of a pretraining one")
    p.add_argument("--estimate", action="store_true",
                   help="print the per-GPU memory (weights, gradients, optimizer state, activations) instead, "
                        "and the micro batch that fills 60-80%% of the card")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory of one GPU for --estimate, e.g. 80GB, 40GiB, 81559MB (default: 80GB; GB = 2^30 bytes)")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=_cmd_recipes)


def _cmd_config(a):
    from lmforge.config import load_config, to_yaml

    if a.finetune:
        return _print_finetune_config(a)
    if a.config is None:
        raise UserError("lmforge config needs a recipe name (see `lmforge recipes`) or a YAML file; "
                        "for fine-tuning settings add --finetune")
    if a.gpu_memory is not None and not a.estimate:
        raise UserError("--gpu-memory sizes the card for --estimate; add --estimate, or drop --gpu-memory")
    if not a.estimate:
        print(to_yaml(load_config(a.config, a.overrides)), end="")
        return 0
    from lmforge.config.estimate import estimate_memory, parse_memory_size

    card = parse_memory_size(a.gpu_memory if a.gpu_memory is not None else "80GB", flag="--gpu-memory")
    cfg = load_config(a.config, a.overrides)
    print(estimate_memory(cfg, vocab_size=_local_vocab_size(cfg), gpu_memory_bytes=card, name=a.config).render(),
          end="")
    return 0


def _print_finetune_config(a) -> int:
    """``lmforge config --finetune [FILE.yaml] [overrides]``: the fine-tuning config as ``lmforge finetune`` would
    resolve it (model and data may be left unset here)."""
    from lmforge.config import to_yaml
    from lmforge.finetune import load_finetune_config

    if a.estimate or a.gpu_memory is not None:
        raise UserError("--estimate sizes pretraining configs; drop it with --finetune")
    source, overrides = a.config, list(a.overrides)
    if source is not None and "=" in source:  # no YAML file given: the first word is an override (as in finetune)
        source, overrides = None, [source] + overrides
    cfg = load_finetune_config(source, overrides, need_paths=False)
    print(to_yaml(cfg), end="")
    return 0


def _local_vocab_size(cfg):
    """The vocabulary of the config's tokenizer when it is a local file or folder; None otherwise (nothing is
    downloaded)."""
    from lmforge.config import tokenizer_path

    tc = cfg.model.tokenizer
    files = [f for f in (tokenizer_path(cfg), getattr(tc, "vocab_file", None), getattr(tc, "merge_file", None)) if f]
    if not files or not all(Path(f).exists() for f in files):
        return None
    from lmforge.data.tokenizers import tokenizer_from_config

    tok = tokenizer_from_config(tc)
    return None if tok is None else tok.vocab_size


def _cmd_recipes(a):
    from lmforge.config import list_recipes

    for name in list_recipes():
        print(name)
    return 0


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = tsub.add_parser("train", help="train a tokenizer: byte-level BPE, Unigram, SentencePiece, character or k-mer")
    t.add_argument("--type", default="bpe", choices=["bpe", "unigram", "sentencepiece", "char", "kmer"],
                   help="bpe: byte-level BPE (GPT-2 style, the default); unigram: the tokenizers library's Unigram; "
                        "sentencepiece: a SentencePiece .model (NeMo / Llama 2 style); char / kmer: characters or "
                        "k-mers of DNA / protein sequences")
    t.add_argument("--input", nargs="+", default=None,
                   help="JSONL (.gz/.zst), Parquet, FASTA or text files, folders or globs")
    t.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (bpe, unigram, sentencepiece)")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json, or tokenizer.model + "
                                                "lmforge_tokenizer.json)")
    t.add_argument("--json-keys", nargs="+", default=["text"])
    t.add_argument("--min-frequency", type=int, default=None, help="minimum pair count of a merge (bpe; default 2)")
    t.add_argument("--model-type", choices=["unigram", "bpe"], default=None,
                   help="the SentencePiece model's algorithm (--type sentencepiece; default unigram)")
    t.add_argument("--alphabet", default=None,
                   help="char / kmer: dna, rna, protein or the characters themselves (default: those of --input)")
    t.add_argument("--k", type=int, default=None, help="kmer: characters per token (default 3; char: 1)")
    t.add_argument("--stride", type=int, default=None, help="kmer: characters between windows (default k)")
    t.add_argument("--overwrite", action="store_true", help="replace the tokenizer files of an existing --out folder")
    t.add_argument("--max-document-chars", type=int, default=MAX_DOCUMENT_CHARS,
                   help=f"refuse a text longer than this (default {MAX_DOCUMENT_CHARS:,}); bounds memory")
    t.set_defaults(func=_cmd_tokenizer_train)


def _cmd_tokenizer_train(a):
    from lmforge.data import tokenizers as T

    def refuse(flag, value, kinds):
        if value is not None and a.type not in kinds:
            raise UserError(f"{flag} applies to --type {' / '.join(kinds)}, not --type {a.type}; drop it")

    common = dict(json_keys=tuple(a.json_keys), overwrite=a.overwrite, max_document_chars=a.max_document_chars)
    refuse("--min-frequency", a.min_frequency, ["bpe"])
    refuse("--model-type", a.model_type, ["sentencepiece"])
    refuse("--k", a.k, ["kmer"])
    refuse("--stride", a.stride, ["kmer"])
    refuse("--alphabet", a.alphabet, ["char", "kmer"])
    refuse("--vocab-size", a.vocab_size, ["bpe", "unigram", "sentencepiece"])
    if a.type in ("char", "kmer"):
        tok = T.train_kmer(a.input, a.out, k=1 if a.type == "char" else (a.k or 3), stride=a.stride,
                           alphabet=a.alphabet, **common)
    else:
        if not a.input:
            raise UserError(f"--type {a.type} needs --input files to train on")
        if a.vocab_size is None:
            raise UserError(f"--type {a.type} needs --vocab-size, e.g. --vocab-size 32000")
        if a.type == "bpe":
            tok = T.train_bpe(a.input, a.vocab_size, a.out, min_frequency=2 if a.min_frequency is None
                              else a.min_frequency, **common)
        elif a.type == "unigram":
            tok = T.train_unigram(a.input, a.vocab_size, a.out, **common)
        else:
            tok = T.train_sentencepiece(a.input, a.vocab_size, a.out, model_type=a.model_type or "unigram", **common)
    print(f"wrote {a.out} (vocabulary {tok.vocab_size}, end-of-document id {tok.eod_id})")
    return 0


#: Flags of Megatron's and NeMo's preprocessing scripts that lmforge refuses, each with its reason.
PREPROCESS_REFUSED = {
    "--split-sentences": "lmforge does not split documents into sentences (Megatron does it with NLTK's punkt "
                         "model, a download); drop it: each document is then one sequence, as Megatron writes "
                         "GPT pretraining data without it",
    "--keep-newlines": "it only applies with --split-sentences, which lmforge does not do; drop it",
    "--lang": "it only applies with --split-sentences, which lmforge does not do; drop it",
    "--partitions": "lmforge reads the inputs in one pass and writes one dataset; drop it (--workers sets the "
                    "tokenizing processes)",
    "--keep-sequential-samples": "it only applies with --partitions, which lmforge does not use; drop it",
    "--apply-ftfy": "lmforge tokenizes the text as it is (no ftfy repair); drop it, or repair the text beforehand",
    "--retrieval-db": "retrieval (RETRO) datasets are not written by lmforge; drop it",
    "--need-pad-id": "it only serves retrieval (RETRO) datasets, which lmforge does not write; drop it",
    "--vocab-size": "Megatron's NullTokenizer is not supported; give a real tokenizer",
}
#: Of those, the ones that take a value.
_REFUSED_WITH_VALUE = ("--lang", "--partitions", "--vocab-size")


def _add_preprocess(sub):
    p = sub.add_parser("preprocess", help="JSONL / Parquet / FASTA -> Megatron indexed dataset (.bin/.idx)",
                       description="Tokenize documents into {output_prefix}_{key}_document.bin/.idx. Takes "
                                   "Megatron's and NeMo's flags (--tokenizer-library, --tokenizer-type, "
                                   "--vocab-file, --merge-file, --tokenizer-model, --dataset-impl mmap) or "
                                   "lmforge's --tokenizer PATH.")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, folders or globs: JSON lines (.jsonl/.json or any name; .gz/.zst), .parquet, "
                        "FASTA (.fasta/.fa/...: one document per record)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder, tokenizer.json, or .model file")
    p.add_argument("--tokenizer-library", default=None, help="megatron, huggingface, sentencepiece or tiktoken")
    p.add_argument("--tokenizer-type", default=None,
                   help="GPT2BPETokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer, "
                        "HuggingFaceTokenizer, TikTokenizer (with --tokenizer-library huggingface: a local folder)")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model, tiktoken file or tokenizer folder")
    p.add_argument("--vocab-file", "--vocab", dest="vocab_file", default=None, help="GPT-2 vocab.json")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    p.add_argument("--tiktoken-pattern", default=None,
                   help="tiktoken pre-tokenizer: gpt2, cl100k (default), llama3, or a regex")
    p.add_argument("--dataset-impl", default="mmap", help="mmap, Megatron's indexed format (the only one written)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--preproc-folder", action="store_true", help="NeMo's: --input is a folder (checked)")
    p.add_argument("--files-filter", default=None,
                   help="with a folder --input: only the files whose path in it matches this glob, e.g. '**/*.json*'")
    p.add_argument("--log-interval", type=int, default=None, help="log progress every this many documents")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (counted and reported) instead of stopping at the first")
    p.add_argument("--dtype", default=None, help="token dtype (default: uint16 below 65,500 tokens, else int32)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX_KEY_document.bin/.idx outputs")
    p.add_argument("--max-document-chars", type=int, default=MAX_DOCUMENT_CHARS,
                   help=f"a line whose text is longer is a bad line (default {MAX_DOCUMENT_CHARS:,}); bounds memory")
    for flag in PREPROCESS_REFUSED:
        if flag in _REFUSED_WITH_VALUE:
            p.add_argument(flag, dest="refused_" + flag[2:].replace("-", "_"), default=None, help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest="refused_" + flag[2:].replace("-", "_"), action="store_true",
                           default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_preprocess)


def _preprocess_tokenizer(a):
    """The tokenizer preprocess's flags name: lmforge's --tokenizer, or Megatron's / NeMo's flags."""
    from lmforge.data.tokenizers import load_tokenizer, open_tokenizer

    megatron = {"--tokenizer-library": a.tokenizer_library, "--tokenizer-type": a.tokenizer_type,
                "--tokenizer-model": a.tokenizer_model, "--vocab-file": a.vocab_file, "--merge-file": a.merge_file,
                "--tiktoken-pattern": a.tiktoken_pattern}
    given = [flag for flag, value in megatron.items() if value is not None]
    if a.tokenizer is not None:
        if given:
            raise UserError(f"--tokenizer and {', '.join(given)} both name a tokenizer; give --tokenizer alone, "
                            f"or Megatron's flags alone")
        return load_tokenizer(a.tokenizer)
    tok = open_tokenizer(library=a.tokenizer_library, type=a.tokenizer_type, model=a.tokenizer_model,
                         vocab_file=a.vocab_file, merge_file=a.merge_file, tiktoken_pattern=a.tiktoken_pattern)
    if tok is None:
        raise UserError("preprocess needs a tokenizer: --tokenizer FOLDER, or --tokenizer-type GPT2BPETokenizer "
                        "--vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt, or --tokenizer-library "
                        "sentencepiece --tokenizer-model tokenizer.model")
    return tok


def _cmd_preprocess(a):
    from lmforge.data.preprocess import preprocess

    for flag in PREPROCESS_REFUSED:
        if getattr(a, "refused_" + flag[2:].replace("-", "_")) is not None:
            raise UserError(f"{flag} is not supported by lmforge preprocess: {PREPROCESS_REFUSED[flag]}")
    if a.dataset_impl != "mmap":
        raise UserError(f"--dataset-impl {a.dataset_impl}: lmforge writes Megatron's mmap format only (the one "
                        f"Megatron-LM and NeMo read); use --dataset-impl mmap or drop the flag")
    if a.preproc_folder:
        not_folders = [i for i in a.input if not Path(i).is_dir()]
        if not_folders:
            raise UserError(f"--preproc-folder: --input {not_folders[0]} is not a folder; give the folder, or drop "
                            f"--preproc-folder for files")
    if a.files_filter is not None and not any(Path(i).is_dir() for i in a.input):
        raise UserError(f"--files-filter {a.files_filter} selects files in a folder --input, and none is given; "
                        f"drop it, or give a folder")
    tokenizer = _preprocess_tokenizer(a)
    summary = preprocess(a.input, a.output_prefix, tokenizer, json_keys=tuple(a.json_keys), append_eod=a.append_eod,
                         workers=a.workers, on_bad_line="skip" if a.skip_bad_lines else "stop", dtype=a.dtype,
                         overwrite=a.overwrite, max_document_chars=a.max_document_chars,
                         files_filter=a.files_filter, log_interval=a.log_interval)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# Stages that live in their own package register their commands here: each module has
# ``add_commands(subparsers)``. A package not written yet is simply absent.
COMMAND_MODULES = (
    "lmforge.convert.cli",
    "lmforge.finetune.cli",
    "lmforge.align.cli",
    "lmforge.eval.cli",
    "lmforge.serve.cli",
    "lmforge.launch.cli",
)


def _add_stage_commands(sub) -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that stage's package does not exist yet
            raise
        module.add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Pretrain, fine-tune, evaluate and serve language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quickstart(sub)
    _add_pretrain(sub)
    _add_config(sub)
    _add_tokenizer(sub)
    _add_preprocess(sub)
    _add_stage_commands(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; dotted overrides may stand anywhere, also after a flag that follows other overrides
    (``finetune --out o trainer.devices=2 --method full fsdp=true``), which argparse alone refuses."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]  # argv order: these came after the others
        return args
    return parser.parse_args(argv)  # argparse's own message for anything else


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LMFORGE_DEBUG") == "1"
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        if debug:
            raise
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
