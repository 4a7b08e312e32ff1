"""The data preparation stage: corpus -> tokenizer -> indexed datasets, one run or one array task per shard.

Run as ``python -m lmforge.launch.dataprep CONFIG.yaml [--task N]`` (the launcher writes CONFIG.yaml
from the stage's section; ``--task`` defaults to ``$SLURM_ARRAY_TASK_ID``). Config keys::

    data_dir: data                 # where the corpus, tokenizer and datasets go
    corpus: stdlib                 # stdlib: this Python's standard library as data_dir/stdlib.jsonl; null: use inputs
    stdlib_max_bytes: 2000000      # cap on the standard-library corpus (null: all of it)
    stdlib_heldout_bytes: 40000    # also write data_dir/heldout.jsonl: modules after the cap, not trained on
                                   # (about this many bytes), and data_dir/heldout_task.yaml, a perplexity
                                   # task over it for `lmforge evaluate MODEL --tasks data_dir/heldout_task.yaml`
    inputs: []                     # JSONL shards (when corpus is null); one array task each
    tokenizer: {path: data/tokenizer, train: true, vocab_size: 1024, min_frequency: 2}
    preprocess: {json_keys: [text], append_eod: true, workers: 1}

Each shard ``NAME.jsonl`` becomes ``data_dir/<output_prefix>NAME_<key>_document.bin/.idx`` (the prefix a
training stage's ``model.data.data_prefix`` names; ``output_prefix`` is empty unless set).

NeMo Launcher's ``data_preparation/gpt3/download_gpt3_pile.yaml`` body is translated by :func:`from_nemo`: the
extracted files ``data_dir/NN.jsonl`` of ``file_numbers`` are preprocessed locally into
``data_dir/my-gpt3_NN_text_document`` with the GPT-2 BPE files in ``vocab_save_dir``; downloading is refused
(compute nodes are offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from lmforge.errors import ConfigError

KEYS = ("data_dir", "corpus", "stdlib_max_bytes", "stdlib_heldout_bytes", "inputs", "tokenizer", "preprocess",
        "output_prefix")
#: NeMo Launcher's download_gpt3_pile.yaml keys, translated by :func:`from_nemo`.
NEMO_KEYS = ("dataset", "download_the_pile", "the_pile_url", "file_numbers", "preprocess_data", "download_vocab_url",
             "download_merges_url", "vocab_save_dir", "merges_save_dir", "tokenizer_type", "tokenizer_library",
             "rm_downloaded", "rm_extracted")
HELDOUT_FILE = "heldout.jsonl"
HELDOUT_TASK_FILE = "heldout_task.yaml"
HELDOUT_TASK_NAME = "stdlib_heldout"
TOKENIZER_KEYS = ("path", "train", "vocab_size", "min_frequency")
PREPROCESS_KEYS = ("json_keys", "append_eod", "workers")


def check_config(body: dict[str, Any], where: str = "data_preparation") -> int:
    """Check the keys of a data preparation config; returns the number of shards.

    Raises:
        ConfigError: an unknown key, no corpus and no inputs, a tokenizer that is neither trained nor given.
    """
    for key in body:
        if key not in KEYS:
            raise ConfigError(f"{where}.{key} is not a data preparation setting; known: {', '.join(KEYS)}")
    tok = body.get("tokenizer") or {}
    pre = body.get("preprocess") or {}
    for key in tok:
        if key not in TOKENIZER_KEYS:
            raise ConfigError(f"{where}.tokenizer.{key} is unknown; known: {', '.join(TOKENIZER_KEYS)}")
    for key in pre:
        if key not in PREPROCESS_KEYS:
            raise ConfigError(f"{where}.preprocess.{key} is unknown; known: {', '.join(PREPROCESS_KEYS)}")
    corpus = body.get("corpus")
    inputs = body.get("inputs") or []
    if corpus not in (None, "stdlib"):
        raise ConfigError(f"{where}.corpus={corpus!r}: use stdlib, or null and list JSONL files in {where}.inputs")
    if corpus is None and not inputs:
        raise ConfigError(f"{where} has nothing to prepare: set {where}.corpus=stdlib or list JSONL files in {where}.inputs")
    heldout = body.get("stdlib_heldout_bytes")
    if heldout is not None:
        if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0:
            raise ConfigError(f"{where}.stdlib_heldout_bytes={heldout!r}: give a byte count (e.g. 40000), or null for "
                              f"no held-out file")
        if heldout and corpus != "stdlib":
            raise ConfigError(f"{where}.stdlib_heldout_bytes holds out standard-library modules: it needs "
                              f"{where}.corpus=stdlib (set it to null with your own inputs)")
        if heldout and body.get("stdlib_max_bytes") is None:
            raise ConfigError(f"{where}.stdlib_heldout_bytes needs {where}.stdlib_max_bytes: with no cap the whole "
                              f"standard library is trained on and nothing is left to hold out")
    if not tok.get("path"):
        raise ConfigError(f"{where}.tokenizer.path is required (where the tokenizer is written or read)")
    if tok.get("train") and not tok.get("vocab_size"):
        raise ConfigError(f"{where}.tokenizer.train=true needs {where}.tokenizer.vocab_size")
    return 1 if corpus == "stdlib" else len(inputs)


def shard_prefix(data_dir: Path, shard: Path, output_prefix: str = "") -> Path:
    """The output prefix of one shard: ``data_dir/<output_prefix><shard file name without .jsonl>``."""
    name = shard.name[:-len(".jsonl")] if shard.name.endswith(".jsonl") else shard.stem
    return data_dir / f"{output_prefix}{name}"


def parse_file_numbers(spec: Any, where: str) -> list[int]:
    """NeMo's ``file_numbers``: ``"0-29"``, ``"0,3,5-7"`` or one number -> sorted file numbers."""
    numbers: set[int] = set()
    try:
        for part in str(spec).replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            numbers.update(range(first, last + 1))
    except ValueError:
        raise ConfigError(f"{where}.file_numbers={spec!r}: give file numbers such as \"0-29\" or \"0,3,5-7\"") from None
    return sorted(numbers)


def from_nemo(body: dict[str, Any], where: str, config_name: str, workers: int, notes: list[str]) -> dict[str, Any]:
    """lmforge's data preparation config for NeMo's download_gpt3_pile body (``config_name``: the defaults entry,
    e.g. ``gpt3/download_gpt3_pile``, whose model family names the outputs ``my-gpt3_NN`` as NeMo's do).

    What lmforge does: preprocess the extracted files ``data_dir/NN.jsonl`` (one per ``file_numbers`` entry; one
    array task each with ``run.array``) with the GPT-2 BPE files ``vocab_save_dir/vocab.json`` +
    ``merges_save_dir/merges.txt`` and an end-of-document token, as NeMo's preprocessing does.

    Raises:
        ConfigError: downloading (``download_the_pile: True``), missing tokenizer files, settings lmforge does not
            have (a BERT corpus, another tokenizer, ``rm_extracted: True``), or lmforge's own keys mixed in.
    """
    for key in body:
        if key not in NEMO_KEYS and key != "data_dir":
            raise ConfigError(f"{where}.{key}: a NeMo data preparation file (download_gpt3_pile) takes "
                              f"{', '.join(NEMO_KEYS)}; lmforge's own keys ({', '.join(KEYS)}) go in a file of their own")
    if body.get("download_the_pile", True):
        raise ConfigError(f"{where}.download_the_pile=True: lmforge does not download The Pile (compute nodes are "
                          f"offline): download and extract the files on a machine with network access as "
                          f"DATA_DIR/NN.jsonl, then set {where}.download_the_pile=False to preprocess them here, or "
                          f"run `lmforge preprocess --input FILES ...` on local files")
    if not body.get("preprocess_data", True):
        raise ConfigError(f"{where}.preprocess_data=False: with nothing downloaded there is nothing to prepare; "
                          f"remove the data_preparation stage from `stages`")
    if str(body.get("dataset", "pile")) != "pile":
        raise ConfigError(f"{where}.dataset={body['dataset']!r}: lmforge translates NeMo's pile preparation only; "
                          f"list your JSONL files in an lmforge data_preparation file (inputs: [...])")
    if body.get("rm_extracted"):
        raise ConfigError(f"{where}.rm_extracted=True: lmforge does not delete its input files; set "
                          f"{where}.rm_extracted=False (remove them yourself once the datasets are written)")
    library, kind = str(body.get("tokenizer_library", "megatron")), str(body.get("tokenizer_type", "GPT2BPETokenizer"))
    if library != "megatron" or kind != "GPT2BPETokenizer":
        raise ConfigError(f"{where}: tokenizer_library={library}, tokenizer_type={kind}: lmforge translates the GPT-2 "
                          f"BPE preparation (megatron, GPT2BPETokenizer); for other tokenizers run `lmforge "
                          f"preprocess --tokenizer-library ... --tokenizer-type ...` on the local files")
    model_type = "bert" if "bert" in config_name else "gpt3" if "gpt3" in config_name else "t5"
    if model_type != "gpt3":
        raise ConfigError(f"{where} ({config_name}): NeMo prepares {model_type} data differently (sentence splitting "
                          f"or its own vocabulary); lmforge translates the gpt3 preparation only")
    data_dir = Path(str(body["data_dir"]))
    vocab_dir, merges_dir = body.get("vocab_save_dir"), body.get("merges_save_dir")
    if not vocab_dir or str(vocab_dir) != str(merges_dir):
        raise ConfigError(f"{where}.vocab_save_dir={vocab_dir} and merges_save_dir={merges_dir}: lmforge reads the "
                          f"GPT-2 files from one folder; give both the same folder")
    for name in ("vocab.json", "merges.txt"):
        if not (Path(str(vocab_dir)) / name).is_file():
            url = body.get("download_vocab_url" if name == "vocab.json" else "download_merges_url")
            raise ConfigError(f"{where}: {Path(str(vocab_dir)) / name} does not exist and lmforge does not download "
                              f"it{f' ({url})' if url else ''}; copy GPT-2's {name} there first")
    numbers = parse_file_numbers(body.get("file_numbers", "0-29"), where)
    notes.append(f"{where}: NeMo's pile preparation becomes preprocessing of the local files {data_dir}/"
                 f"{numbers[0]:02d}.jsonl ... into {data_dir}/my-gpt3_NN_text_document (nothing is downloaded)")
    return {"data_dir": str(data_dir), "corpus": None,
            "inputs": [str(data_dir / f"{n:02d}.jsonl") for n in numbers], "output_prefix": "my-gpt3_",
            "tokenizer": {"path": str(vocab_dir), "train": False},
            "preprocess": {"json_keys": ["text"], "append_eod": True, "workers": workers}}


def is_nemo_body(body: dict[str, Any]) -> bool:
    """A NeMo download_gpt3_pile body: it has one of NeMo's keys (lmforge's own mixed in are refused)."""
    return any(k in NEMO_KEYS for k in body)


def write_stdlib_heldout(corpus: Path, data_dir: Path, max_bytes: int) -> dict:
    """Standard-library modules that ``corpus`` (the training JSONL) does not hold, as ``data_dir/heldout.jsonl``.

    The modules come after the training cap in the corpus's (sorted) order; one that would take the file past
    ``max_bytes`` is passed over, so a single large module cannot make evaluation slow. Also writes
    ``data_dir/heldout_task.yaml``, a ``kind: perplexity`` user task over that file (its ``data`` is
    relative to the YAML, so the folder can move).

    Returns:
        ``{"data", "task", "documents", "bytes"}``.

    Raises:
        ConfigError: no module is left over (the training cap took the whole standard library).
    """
    from lmforge.data.corpus import iter_stdlib_files, stdlib_root
    from lmforge.io import write_text_atomic

    trained = set()
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            trained.add(json.loads(line)["path"])
    root = stdlib_root()
    lines, written = [], 0
    for path in iter_stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        if rel in trained:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if not text.strip() or written + size > max_bytes:
            continue
        lines.append(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
        written += size
        if max_bytes - written < 500:
            break
    if not lines:
        raise ConfigError(f"no standard-library module of at most {max_bytes:,} bytes is left out of the training "
                          f"corpus {corpus}: lower stdlib_max_bytes or raise stdlib_heldout_bytes")
    data, task = data_dir / HELDOUT_FILE, data_dir / HELDOUT_TASK_FILE
    write_text_atomic(data, "".join(lines))
    write_text_atomic(task, f"# Validation perplexity on standard-library modules the model was not trained on.\n"
                            f"name: {HELDOUT_TASK_NAME}\nkind: perplexity\ndata: {HELDOUT_FILE}\n"
                            f"text: \"{{text}}\"\n")
    return {"data": str(data), "task": str(task), "documents": len(lines), "bytes": written}


def run(body: dict[str, Any], task: Optional[int] = None, log=print) -> dict:
    """Prepare the data described by ``body``; with ``task`` only that shard is preprocessed.

    Returns:
        ``{"shards": [...], "tokenizer": path, "datasets": [prefix, ...]}``.
    """
    from lmforge.data.corpus import stdlib_corpus
    from lmforge.data.preprocess import preprocess
    from lmforge.data.tokenizers import train_bpe

    check_config(body)
    data_dir = Path(body.get("data_dir") or "data")
    data_dir.mkdir(parents=True, exist_ok=True)
    tok = body.get("tokenizer") or {}
    pre = body.get("preprocess") or {}
    if body.get("corpus") == "stdlib":
        shards = [data_dir / "stdlib.jsonl"]
        if task in (None, 0):
            info = stdlib_corpus(shards[0], max_bytes=body.get("stdlib_max_bytes"))
            log(f"corpus: {info['documents']} modules, {info['bytes']:,} bytes -> {shards[0]}")
            if body.get("stdlib_heldout_bytes"):
                held = write_stdlib_heldout(shards[0], data_dir, int(body["stdlib_heldout_bytes"]))
                log(f"held out: {held['documents']} modules, {held['bytes']:,} bytes -> {held['data']} "
                    f"(perplexity task {held['task']})")
    else:
        shards = [Path(p) for p in body["inputs"]]
    for shard in shards:
        if not shard.is_file():
            raise ConfigError(f"data preparation input {shard} does not exist")
    if task is not None and not 0 <= task < len(shards):
        raise ConfigError(f"array task {task} has no shard: there are {len(shards)} inputs")
    tok_path = Path(tok["path"])
    if tok.get("train") and task is None:
        t = train_bpe([str(s) for s in shards], int(tok["vocab_size"]), tok_path,
                      json_keys=tuple(pre.get("json_keys") or ["text"]), min_frequency=int(tok.get("min_frequency", 2)),
                      overwrite=True)  # the stage's own output: a requeued or repeated stage makes it again
        log(f"tokenizer: vocabulary {t.vocab_size} -> {tok_path}")
    mine = shards if task is None else [shards[task]]
    datasets = []
    for shard in mine:
        prefix = shard_prefix(data_dir, shard, str(body.get("output_prefix") or ""))
        preprocess([str(shard)], str(prefix), str(tok_path), json_keys=tuple(pre.get("json_keys") or ["text"]),
                   append_eod=bool(pre.get("append_eod", True)), workers=int(pre.get("workers", 1)),
                   log=lambda *a: None, overwrite=True)
        datasets.append(str(prefix))
        log(f"preprocessed {shard} -> {prefix}_*_document.bin/.idx")
    return {"shards": [str(s) for s in shards], "tokenizer": str(tok_path), "datasets": datasets}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m lmforge.launch.dataprep``."""
    from omegaconf import OmegaConf

    from lmforge.errors import UserError

    p = argparse.ArgumentParser(prog="python -m lmforge.launch.dataprep", description=__doc__.splitlines()[0])
    p.add_argument("config", help="the stage's YAML config (written by lmforge launch)")
    p.add_argument("--task", type=int, default=None, help="array task: preprocess this shard only "
                   "(default: $SLURM_ARRAY_TASK_ID when set)")
    a = p.parse_args(argv)
    task = a.task
    if task is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        task = int(os.environ["SLURM_ARRAY_TASK_ID"])
    try:
        body = OmegaConf.to_container(OmegaConf.load(a.config), resolve=True)
        summary = run(body, task)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
