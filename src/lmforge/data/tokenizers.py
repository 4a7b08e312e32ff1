"""One tokenizer interface over Hugging Face tokenizers, and byte-level BPE training.

:class:`Tokenizer` wraps a ``tokenizer.json`` through the ``tokenizers`` library (fast, no
``transformers`` needed). A folder without ``tokenizer.json`` (a SentencePiece-only HF folder,
say) is opened through ``transformers.AutoTokenizer`` when it is installed, behind the same
interface (:class:`HFAutoTokenizer`).

``encode`` is the tokenizer's default call, special tokens of its post-processor included (a BOS
for Llama-style tokenizers), exactly as Megatron's ``tools/preprocess_data.py`` stores ids.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from lmforge.data.files import (MAX_DOCUMENT_CHARS, check_inputs, check_max_document_chars, check_output_location,
                                iter_lines, max_line_bytes)
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path, write_json_atomic, write_text_atomic

#: The end-of-document token of tokenizers trained here.
EOD_TOKEN = "<|endoftext|>"
#: Tokens tried, in order, when a tokenizer's config names no eos_token.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
#: Tokens tried, in order, when a tokenizer's config names no bos_token.
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


def _token_content(value) -> Optional[str]:
    """A special token from tokenizer_config.json: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` (from a ``tokenizer.json``) with its ``tokenizer_config.json`` settings.

    Args:
        backend: the ``tokenizers.Tokenizer``.
        config: the contents of ``tokenizer_config.json`` (eos/bos tokens, chat template...), or None.
        source: where it was loaded from (a folder or a tokenizer.json); worker processes reload it from there.
    """

    def __init__(self, backend, config: Optional[dict] = None, source: Optional[str | os.PathLike] = None):
        self.backend = backend
        self.config = dict(config or {})
        self.source = os.fspath(source) if source is not None else None
        self._eod_id = self._special_id("eos_token", EOD_CANDIDATES)
        self._bos_id = self._special_id("bos_token", BOS_CANDIDATES)

    def _special_id(self, key: str, candidates: Sequence[str]) -> Optional[int]:
        name = _token_content(self.config.get(key))
        if name is not None:
            tid = self.backend.token_to_id(name)
            if tid is not None:
                return tid
        for name in candidates:
            tid = self.backend.token_to_id(name)
            if tid is not None:
                return tid
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def eod_id(self) -> Optional[int]:
        """End-of-document id: the config's eos_token, else the first of ``EOD_CANDIDATES`` present; None if none."""
        return self._eod_id

    @property
    def bos_id(self) -> Optional[int]:
        """Beginning-of-sequence id: the config's bos_token, else the first of ``BOS_CANDIDATES`` present; or None."""
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the special tokens the tokenizer's post-processor adds."""
        return self.backend.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (multi-threaded inside ``tokenizers``)."""
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (special tokens kept unless ``skip_special_tokens``)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token``, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, tid: int) -> Optional[str]:
        """The token string of id ``tid``, or None."""
        return self.backend.id_to_token(int(tid))

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``folder``.

        ``transformers.AutoTokenizer.from_pretrained(folder)`` loads the result. Each file is written atomically.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        if config.get("eos_token") is None and self._eod_id is not None:
            config["eos_token"] = self.backend.id_to_token(self._eod_id)
        special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k) is not None}
        write_text_atomic(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        write_json_atomic(folder / "tokenizer_config.json", config)
        write_json_atomic(folder / "special_tokens_map.json", special)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class HFAutoTokenizer:
    """A ``transformers.AutoTokenizer`` (e.g. a SentencePiece-only folder) behind the :class:`Tokenizer` interface."""

    def __init__(self, hf_tokenizer, source: Optional[str | os.PathLike] = None):
        self.hf = hf_tokenizer
        self.source = os.fspath(source) if source is not None else None
        self._eod_id = hf_tokenizer.eos_token_id
        if self._eod_id is None:
            self._eod_id = self._first_known(EOD_CANDIDATES)
        self._bos_id = hf_tokenizer.bos_token_id
        if self._bos_id is None:
            self._bos_id = self._first_known(BOS_CANDIDATES)

    def _first_known(self, names: Sequence[str]) -> Optional[int]:
        vocab = self.hf.get_vocab()
        for name in names:
            if name in vocab:
                return int(vocab[name])
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.hf)

    @property
    def eod_id(self) -> Optional[int]:
        """End-of-document id (the tokenizer's eos_token, else a known EOD token), or None."""
        return self._eod_id

    @property
    def bos_id(self) -> Optional[int]:
        """Beginning-of-sequence id, or None."""
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids``: the default call, special tokens included."""
        return list(self.hf(text)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts."""
        return [list(ids) for ids in self.hf(list(texts))["input_ids"]]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token``, or None."""
        return self.hf.get_vocab().get(token)

    def id_to_token(self, tid: int) -> Optional[str]:
        """The token string of id ``tid``."""
        return self.hf.convert_ids_to_tokens(int(tid))

    def save(self, folder: str | os.PathLike) -> None:
        """``save_pretrained`` into ``folder``; each file is moved into place atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=folder))
        try:
            self.hf.save_pretrained(tmp)
            for f in sorted(tmp.iterdir()):
                if f.is_file():
                    os.replace(f, folder / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __repr__(self) -> str:
        return f"HFAutoTokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def read_chat_template_file(folder: str | os.PathLike) -> Optional[str]:
    """The chat template stored beside tokenizer_config.json: ``chat_template.jinja`` (transformers 5 writes it
    there) or ``chat_template.json`` (``{"chat_template": ...}``); None when neither holds one."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8") or None
        js = folder / "chat_template.json"
        if js.is_file():
            data = json.loads(js.read_text(encoding="utf-8"))
            template = data.get("chat_template") if isinstance(data, dict) else None
            return template if isinstance(template, str) and template else None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the chat template in {folder}: {e}") from e
    return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFAutoTokenizer:
    """Open a tokenizer.

    Args:
        path: a ``tokenizer.json`` file, or a folder holding one (with its ``tokenizer_config.json``; a chat
            template in ``chat_template.jinja`` / ``chat_template.json`` there joins the config).
            A folder without ``tokenizer.json`` is opened with ``transformers.AutoTokenizer``
            (local files only) when ``transformers`` is installed.

    Raises:
        DataError: the path is missing or holds no readable tokenizer.
    """
    from tokenizers import Tokenizer as _Backend

    p = Path(path)
    if not p.exists():
        raise DataError(f"tokenizer {p} not found: give a tokenizer.json file or a folder holding one "
                        f"(make one with `lmforge tokenizer train`)")
    folder = p if p.is_dir() else p.parent
    tok_json = p / "tokenizer.json" if p.is_dir() else p
    if tok_json.is_file():
        try:
            backend = _Backend.from_file(str(tok_json))
        except Exception as e:  # the tokenizers library raises a plain Exception on bad JSON
            raise DataError(f"cannot read tokenizer {tok_json}: {e}") from e
        config = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {cfg_path}: {e}") from e
            if not isinstance(config, dict):
                raise DataError(f"{cfg_path} must hold a JSON object, not {type(config).__name__}")
        if not config.get("chat_template"):
            template = read_chat_template_file(folder)
            if template:
                config["chat_template"] = template  # saved with the tokenizer: checkpoints carry it
        return Tokenizer(backend, config, source=p)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"{p} holds no tokenizer.json; install transformers (pip install lmforge[hf]) to open "
                        f"other tokenizer folders, or give a tokenizer.json") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise DataError(f"cannot load a tokenizer from {p}: no tokenizer.json and transformers.AutoTokenizer "
                        f"failed ({type(e).__name__}: {e})") from e
    return HFAutoTokenizer(hf, source=p)


# -- training ------------------------------------------------------------------------------------

def _is_json_lines(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith((".jsonl", ".json"))


def iter_training_texts(files: Sequence[str | os.PathLike], json_keys: Sequence[str] = ("text",),
                        block_chars: int = 1 << 16, max_document_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """Stream the texts of ``files``: the ``json_keys`` of each JSON line (.jsonl/.json[.gz]) or
    blocks of whole lines of a plain text file. Raises DataError naming ``file:line`` on a bad line, a
    text (or plain-text line) over ``max_document_chars`` characters, or a truncated .gz."""
    too_long = (f"is over --max-document-chars={max_document_chars:,}: split it into several lines, or raise "
                f"--max-document-chars")
    for f in files:
        path = Path(f)
        lines = iter_lines(path, max_line_bytes(max_document_chars))
        if _is_json_lines(path):
            for lineno, raw in lines:
                if isinstance(raw, str):
                    raise DataError(f"{path}:{lineno}: {raw}: raise --max-document-chars (now "
                                    f"{max_document_chars:,}), or split it into several lines")
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: JSON nested too deeply to read (more than ~1,000 levels "
                                    f"of [ or {{)") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                for key in json_keys:
                    if key not in row:
                        raise DataError(f"{path}:{lineno}: missing key {key!r} (keys present: "
                                        f"{', '.join(map(repr, row)) or 'none'})")
                    value = row[key]
                    if isinstance(value, str):
                        texts = [value]
                    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                        texts = value
                    else:
                        raise DataError(f"{path}:{lineno}: key {key!r} holds {type(value).__name__}, "
                                        f"expected a string")
                    chars = sum(len(t) for t in texts)
                    if chars > max_document_chars:
                        raise DataError(f"{path}:{lineno}: a text of {chars:,} characters {too_long}")
                    yield from texts
        else:
            block: list[str] = []
            size = 0
            for lineno, raw in lines:
                line = raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace")
                if isinstance(raw, str) or len(line) > max_document_chars:
                    raise DataError(f"{path}:{lineno}: a line of more than {max_document_chars:,} characters "
                                    f"{too_long}")
                block.append(line)
                size += len(line)
                if size >= block_chars:
                    yield "".join(block)
                    block, size = [], 0
            if block:
                yield "".join(block)


#: The files :meth:`Tokenizer.save` writes: a folder holding any of them already holds a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_bpe(files: Sequence[str | os.PathLike] | str | os.PathLike, vocab_size: int, out_dir: str | os.PathLike,
              json_keys: Sequence[str] = ("text",), min_frequency: int = 2, overwrite: bool = False,
              max_document_chars: int = MAX_DOCUMENT_CHARS) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the ``tokenizers`` library and save it into ``out_dir``.

    Byte-level pre-tokenizer and decoder (any text encodes, nothing is unknown); ``<|endoftext|>``
    is the one special token and the end-of-document id. Texts stream from the files (see
    :func:`iter_training_texts`); nothing is held in memory but the word counts.

    Args:
        files: .jsonl / .json (JSON lines, optionally .gz) files, read at ``json_keys``; any other
            file is read as plain text.
        vocab_size: the vocabulary size, at least 257 (256 byte symbols + ``<|endoftext|>``).
        out_dir: folder to write (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
            A new folder appears whole or not at all; in an existing folder only those three files
            are written, each atomically, and only with ``overwrite`` when any of them exists.
        json_keys: keys of the JSON lines holding text.
        min_frequency: minimum pair count for a merge.
        overwrite: replace the tokenizer files of an existing folder.
        max_document_chars: refuse a text (a plain-text line) longer than this: bounds memory.

    Returns:
        the saved tokenizer, loaded from ``out_dir``.
    """
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not list(files):
        raise DataError("train_bpe needs at least one input file")
    files = check_inputs(files, "tokenizer training input")
    max_document_chars = check_max_document_chars(max_document_chars)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; give a folder for the tokenizer files")
    held = [name for name in TOKENIZER_FILES if (out_dir / name).exists()]
    if held and not overwrite:
        raise DataError(f"--out {out_dir} already holds a tokenizer ({', '.join(held)}); pass --overwrite to replace "
                        f"it, or choose another --out")
    check_output_location(out_dir / TOKENIZER_FILES[0], "--out", shown=out_dir)
    if isinstance(json_keys, str):
        json_keys = (json_keys,)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + 1
    if int(vocab_size) < minimum:
        raise ConfigError(f"vocab_size={vocab_size} is too small for a byte-level BPE: the minimum is {minimum} "
                          f"({len(alphabet)} byte symbols + {EOD_TOKEN})")

    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=[EOD_TOKEN], initial_alphabet=alphabet, show_progress=False)
    seen = {"chars": 0}

    def texts() -> Iterator[str]:
        for t in iter_training_texts(files, json_keys, max_document_chars=max_document_chars):
            seen["chars"] += len(t)
            yield t

    backend.train_from_iterator(texts(), trainer=trainer)
    if seen["chars"] == 0:
        raise DataError(f"no text to train a tokenizer on in {', '.join(map(str, files))} "
                        f"(JSON keys read: {', '.join(json_keys)})")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "clean_up_tokenization_spaces": False,
    }
    try:
        if out_dir.exists():
            # An existing folder may hold other things: write only the tokenizer files, each atomically.
            Tokenizer(backend, config).save(out_dir)
        else:
            with atomic_path(out_dir) as tmp:
                tmp.mkdir()
                Tokenizer(backend, config).save(tmp)
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        raise DataError(f"cannot write the tokenizer to --out {out_dir} ({e.filename or out_dir}): "
                        f"{e.strerror or e}; free space or choose another location") from e
    return load_tokenizer(out_dir)
