"""``lmforge convert SRC DST --to hf|lmforge`` and ``lmforge export MODEL OUT --format hf|gguf|nemo``."""

from __future__ import annotations

import json

from lmforge.models.families import FAMILIES


def _size(text: str) -> int:
    """``5GB``, ``500MB``, ``1024`` -> bytes."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def add_commands(sub) -> None:
    """Register ``convert`` on the lmforge CLI's subparsers."""
    p = sub.add_parser("convert", help="convert a model: HF folder <-> lmforge checkpoint, or import a .nemo file",
                       description="Convert SRC (an HF model folder, an lmforge checkpoint or a NeMo 1.x .nemo "
                                   "archive; detected) into DST. Tensors stream one at a time.")
    p.add_argument("src", help="HF model folder, lmforge checkpoint folder or .nemo file")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--to", choices=["hf", "lmforge"], required=True, help="output format")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="HF family to write (default: the source's own, else guessed from its config)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep their dtype)")
    p.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help="shard size, e.g. 5GB (default)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST when it exists (only a folder convert wrote; never the source or a folder "
                        "holding it)")
    p.add_argument("--no-verify", action="store_true",
                   help="read an lmforge source without checking its weight files' sha256 and finite values")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)
    add_export_command(sub)


def _cmd_convert(a) -> int:
    from lmforge.convert.hf import convert

    summary = convert(a.src, a.dst, a.to, family=a.family, dtype=a.dtype, max_shard_bytes=a.max_shard_size,
                      overwrite=a.overwrite, progress=not a.no_progress, verify=False if a.no_verify else None)
    print(json.dumps(summary, indent=2))
    return 0


def add_export_command(sub) -> None:
    """Register ``export`` on the lmforge CLI's subparsers."""
    p = sub.add_parser("export", help="export a model as an HF folder, a llama.cpp GGUF file or a NeMo .nemo archive",
                       description="lmforge export MODEL OUT --format hf|gguf|nemo. MODEL: an lmforge checkpoint or "
                                   "run folder, an HF folder or a .nemo archive. hf: the folder `convert --to hf` "
                                   "writes; gguf: one OUT.gguf file (Llama-family models; needs the gguf package); "
                                   "nemo: one OUT.nemo archive (NeMo 1.x, Megatron-core names).")
    p.add_argument("model", help="lmforge checkpoint or run folder, HF model folder or .nemo file")
    p.add_argument("out", help="output: a folder (hf), OUT.gguf or OUT.nemo")
    p.add_argument("--format", choices=["hf", "gguf", "nemo"], required=True, help="output format")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep; gguf: float16, or float32)")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None, help="--format hf: the HF family to write")
    p.add_argument("--overwrite", action="store_true", help="replace an output export wrote before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (hf)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(a) -> int:
    from lmforge.convert.export import export

    summary = export(a.model, a.out, a.format, dtype=a.dtype, family=a.family, overwrite=a.overwrite,
                     progress=not a.no_progress)
    print(json.dumps(summary, indent=2))
    return 0
