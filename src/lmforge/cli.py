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

EXIT_STOPPED_TO_RESUME = 75  # EX_TEMPFAIL: the run saved a checkpoint and stopped early; run it again to resume


def _add_quickstart(sub):
    p = sub.add_parser("quickstart", help="train a small code model on this Python's standard library")
    p.add_argument("--out", default="quickstart_out", help="results folder (default: ./quickstart_out)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: sized to the machine)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap on corpus bytes (default: sized to the machine)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--size", choices=["auto", "tiny", "small", "gpu"], default="auto",
                   help="model size; auto picks 'small' on a CPU and 'gpu' when a GPU is present")
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(a):
    from lmforge.quickstart import run

    summary = run(out=a.out, max_steps=a.max_steps, max_bytes=a.max_bytes, device=a.device, size=a.size)
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
    # Stopped by SIGUSR1/SIGTERM after saving (walltime, preemption): a launcher requeues on this code.
    return EXIT_STOPPED_TO_RESUME if summary.get("stopped_early") else 0


def _add_config(sub):
    p = sub.add_parser("config", help="print the resolved config of a recipe or YAML file, with overrides applied")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
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


def _local_vocab_size(cfg):
    """The vocabulary of the config's tokenizer when it is a local file or folder; None otherwise (nothing is
    downloaded)."""
    from lmforge.config import tokenizer_path

    path = tokenizer_path(cfg)
    if not path or not Path(path).exists():
        return None
    from lmforge.data.tokenizers import load_tokenizer

    return load_tokenizer(path).vocab_size


def _cmd_recipes(a):
    from lmforge.config import list_recipes

    for name in list_recipes():
        print(name)
    return 0


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer with the `tokenizers` library")
    t.add_argument("--input", nargs="+", required=True, help="JSONL or text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    t.add_argument("--json-keys", nargs="+", default=["text"])
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--overwrite", action="store_true", help="replace the tokenizer files of an existing --out folder")
    t.add_argument("--max-document-chars", type=int, default=MAX_DOCUMENT_CHARS,
                   help=f"refuse a text longer than this (default {MAX_DOCUMENT_CHARS:,}); bounds memory")
    t.set_defaults(func=_cmd_tokenizer_train)


def _cmd_tokenizer_train(a):
    from lmforge.data.tokenizers import train_bpe

    tok = train_bpe(a.input, a.vocab_size, a.out, json_keys=tuple(a.json_keys), min_frequency=a.min_frequency,
                    overwrite=a.overwrite, max_document_chars=a.max_document_chars)
    print(f"wrote {a.out} (vocabulary {tok.vocab_size}, end-of-document id {tok.eod_id})")
    return 0


def _add_preprocess(sub):
    p = sub.add_parser("preprocess", help="JSONL -> Megatron indexed dataset (.bin/.idx)")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding one")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (counted and reported) instead of stopping at the first")
    p.add_argument("--dtype", default=None, help="token dtype (default: uint16 below 65,500 tokens, else int32)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX_KEY_document.bin/.idx outputs")
    p.add_argument("--max-document-chars", type=int, default=MAX_DOCUMENT_CHARS,
                   help=f"a line whose text is longer is a bad line (default {MAX_DOCUMENT_CHARS:,}); bounds memory")
    p.set_defaults(func=_cmd_preprocess)


def _cmd_preprocess(a):
    from lmforge.data.preprocess import preprocess

    summary = preprocess(a.input, a.output_prefix, a.tokenizer, json_keys=tuple(a.json_keys), append_eod=a.append_eod,
                         workers=a.workers, on_bad_line="skip" if a.skip_bad_lines else "stop", dtype=a.dtype,
                         overwrite=a.overwrite, max_document_chars=a.max_document_chars)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# Stages that live in their own package register their commands here: each module has
# ``add_commands(subparsers)``. A package not written yet is simply absent.
COMMAND_MODULES = (
    "lmforge.convert.cli",
    "lmforge.finetune.cli",
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
