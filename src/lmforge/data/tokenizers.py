"""One tokenizer interface over every tokenizer format lmforge's users bring, and tokenizer training.

* :class:`Tokenizer` wraps a ``tokenizers.Tokenizer``: a ``tokenizer.json`` (fast, no ``transformers``
  needed), or GPT-2's ``vocab.json`` + ``merges.txt`` (:func:`load_gpt2_bpe`: byte-level BPE, the ids of
  transformers' ``GPT2Tokenizer``, ``<|endoftext|>`` the end of document as in Megatron).
* :class:`HFAutoTokenizer`: a folder without ``tokenizer.json`` opened with ``transformers.AutoTokenizer``.
* :class:`SentencePieceTokenizer`: a SentencePiece ``.model`` (Llama 2, mT5, most NeMo tokenizers).
* :class:`TiktokenTokenizer`: a tiktoken BPE file (base64 token + rank per line; needs ``tiktoken``).
* :class:`KmerTokenizer`: characters or k-mers of DNA / RNA / protein sequences (an explicit alphabet).

Every one has ``encode``, ``encode_batch``, ``decode``, ``token_to_id``, ``id_to_token``, ``vocab_size``,
``eod_id``, ``bos_id`` and ``save(folder)``; :func:`load_tokenizer` reads any saved folder back.
``encode`` is the tokenizer's default call, exactly as Megatron's ``tools/preprocess_data.py`` stores ids
(the post-processor's special tokens of a ``tokenizer.json``; none for the others, unless asked).
:func:`open_tokenizer` resolves Megatron's and NeMo's ways of naming a tokenizer (library, type, vocab and
merge files, model file) for ``lmforge preprocess`` and ``model.tokenizer.*``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from lmforge.data.files import (MAX_DOCUMENT_CHARS, check_max_document_chars, check_output_location, expand_inputs,
                                input_format, iter_records, max_line_bytes)
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


# -- GPT-2 BPE from vocab.json + merges.txt ------------------------------------------------------------

def _need_file(path, flag: str, what: str) -> Path:
    """``path`` as an existing readable file, or a DataError naming ``flag``."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{flag} {p} is a folder; give the {what} file itself")
    if not p.is_file():
        raise DataError(f"{flag} {p} not found: give the {what} file")
    return p


def load_gpt2_bpe(vocab_file: str | os.PathLike, merge_file: str | os.PathLike,
                  vocab_flag: str = "--vocab-file", merge_flag: str = "--merge-file") -> Tokenizer:
    """GPT-2's byte-level BPE from its ``vocab.json`` and ``merges.txt`` (Megatron's ``GPT2BPETokenizer``).

    Built with the ``tokenizers`` library (BPE model, ByteLevel pre-tokenizer and decoder, no prefix space),
    it gives the ids of transformers' ``GPT2Tokenizer`` on the same files; ``<|endoftext|>`` is a special
    token (the vocabulary's own id, or the next id when the vocabulary lacks it, as ``GPT2Tokenizer`` adds it)
    and the end-of-document id, as in Megatron. No BOS is added by ``encode``.

    Raises:
        DataError: a missing or malformed file, named with its flag (and line).
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers, processors

    vocab_path = _need_file(vocab_file, vocab_flag, "GPT-2 vocab.json")
    merge_path = _need_file(merge_file, merge_flag, "GPT-2 merges.txt")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{vocab_flag} {vocab_path}: not a GPT-2 vocab.json ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in vocab.items()):
        raise DataError(f"{vocab_flag} {vocab_path}: expected a JSON object of token -> id (GPT-2's vocab.json)")
    merges = []
    try:
        lines = merge_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{merge_flag} {merge_path}: cannot read ({e})") from None
    for lineno, line in enumerate(lines, start=1):
        if (lineno == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{merge_path}:{lineno}: expected two tokens separated by one space (GPT-2's "
                            f"merges.txt), got {line[:80]!r}")
        if parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
            raise DataError(f"{merge_path}:{lineno}: merge {line!r} names a token that {vocab_path} lacks: "
                            f"the vocab and merges files do not belong together")
        merges.append((parts[0], parts[1]))
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN,
              "unk_token": EOD_TOKEN, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    return Tokenizer(backend, config, source=vocab_path)


# -- tokenizers lmforge implements or wraps itself: saved as a folder with lmforge_tokenizer.json -----

#: The file naming the kind of tokenizer a folder holds when it is not a ``tokenizer.json`` one.
SPEC_FILE = "lmforge_tokenizer.json"


def _char_offsets(text: str) -> list[int]:
    """Character index of each UTF-8 byte offset of ``text`` (one entry more than its bytes)."""
    out = []
    for i, ch in enumerate(text):
        out.extend([i] * len(ch.encode("utf-8")))
    out.append(len(text))
    return out


class _SpecTokenizer:
    """What the tokenizers below share: a config dict (chat template, add_bos_token), ``encode_batch``, and
    ``save`` as a folder of ``lmforge_tokenizer.json`` (kind, settings, config) + the model file, if any."""

    kind = ""
    source: Optional[str] = None
    config: dict

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts."""
        return [self.encode(t) for t in texts]

    def _spec(self) -> dict:  # the settings that rebuild this tokenizer, beside its model file
        raise NotImplementedError

    def _model_file(self) -> Optional[tuple[str, bytes]]:  # (name, bytes) of the model file, or None
        return None

    def save(self, folder: str | os.PathLike) -> None:
        """Write the model file (if any) and ``lmforge_tokenizer.json`` into ``folder``, each atomically;
        :func:`load_tokenizer` reads the folder back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"type": self.kind, **self._spec(), "config": dict(self.config)}
        model = self._model_file()
        if model is not None:
            name, data = model
            with atomic_path(folder / name) as tmp:
                Path(tmp).write_bytes(data)
            spec["file"] = name
        write_json_atomic(folder / SPEC_FILE, spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class SentencePieceTokenizer(_SpecTokenizer):
    """A SentencePiece ``.model`` through the ``sentencepiece`` library, as NeMo's and Megatron's
    SentencePiece tokenizers use it: ``encode`` is ``encode_as_ids`` (no BOS unless ``add_bos``, which
    Megatron's ``Llama2Tokenizer`` sets), the end of document is the model's ``</s>`` (``eos_id``).

    Args:
        proto: the serialized model (the bytes of the ``.model`` file).
        add_bos: put the model's BOS before every encoded text.
        source: where it was read from.
    """

    kind = "sentencepiece"

    def __init__(self, proto: bytes, add_bos: bool = False, source=None, config: Optional[dict] = None):
        spm = _import_sentencepiece()
        self.proto = bytes(proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        self.add_bos = bool(add_bos)
        self.source = os.fspath(source) if source is not None else None
        self.config = dict(config or {})
        self.config.setdefault("add_bos_token", self.add_bos)

    @classmethod
    def from_file(cls, path: str | os.PathLike, add_bos: bool = False, flag: str = "--tokenizer-model"):
        """Read a ``.model`` file; a DataError naming ``flag`` when it is not a SentencePiece model."""
        p = _need_file(path, flag, "SentencePiece .model")
        data = p.read_bytes()
        try:
            return cls(data, add_bos=add_bos, source=p)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{flag} {p}: not a SentencePiece model ({str(e).strip()})") from None

    def __getstate__(self):
        return {"proto": self.proto, "add_bos": self.add_bos, "source": self.source, "config": self.config}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["add_bos"], state["source"], state["config"])

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return int(self.sp.get_piece_size())

    @property
    def eod_id(self) -> Optional[int]:
        """The model's ``eos_id`` (``</s>``), or None when it has none."""
        i = int(self.sp.eos_id())
        return i if i >= 0 else None

    @property
    def bos_id(self) -> Optional[int]:
        """The model's ``bos_id`` (``<s>``), or None."""
        i = int(self.sp.bos_id())
        return i if i >= 0 else None

    def encode(self, text: str) -> list[int]:
        """``encode_as_ids(text)``, after the BOS when ``add_bos``."""
        return list(self.sp.encode(text, add_bos=self.add_bos))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts (one call into the library)."""
        return [list(ids) for ids in self.sp.encode(list(texts), add_bos=self.add_bos)]

    def encode_plain(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids without BOS, with the character span of each piece."""
        where = _char_offsets(text)
        pieces = self.sp.encode(text, return_type="proto").pieces
        return [int(p.id) for p in pieces], [(where[p.begin], where[p.end]) for p in pieces]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; control pieces (``<s>``, ``</s>``) written out unless ``skip_special_tokens``."""
        out, run = [], []
        for i in (int(i) for i in ids):
            if 0 <= i < self.vocab_size and self.sp.is_control(i):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of piece ``token``, or None when the model lacks it."""
        i = int(self.sp.piece_to_id(token))
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, tid: int) -> Optional[str]:
        """The piece of id ``tid``, or None out of range."""
        return self.sp.id_to_piece(int(tid)) if 0 <= int(tid) < self.vocab_size else None

    def _spec(self) -> dict:
        return {"add_bos": self.add_bos}

    def _model_file(self):
        return "tokenizer.model", self.proto


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise DataError("SentencePiece models need the sentencepiece package: pip install sentencepiece") from None
    return sentencepiece


#: Pre-tokenizer patterns of tiktoken BPE files, by name (the regex itself may be given instead).
TIKTOKEN_PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
              r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def _byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the ByteLevel alphabet): token strings of byte-level BPEs."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def read_tiktoken_ranks(path: str | os.PathLike, flag: str = "--tokenizer-model") -> dict[bytes, int]:
    """The ``{token bytes: rank}`` of a tiktoken BPE file (``base64-token rank`` per line)."""
    import base64
    import binascii

    p = _need_file(path, flag, "tiktoken BPE")
    ranks: dict[bytes, int] = {}
    try:
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        if p.suffix == ".json":
            raise DataError(f"{flag} {p}: Megatron-LM's / NeMo's JSON tiktoken vocabulary is not supported; give "
                            f"a tiktoken BPE file (base64 token and rank per line)") from None
        raise DataError(f"{flag} {p}: not a tiktoken BPE file ({e})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error):
            hint = (" (Megatron-LM's / NeMo's JSON tiktoken vocabulary is not supported)"
                    if line.lstrip().startswith(("[", "{")) else "")
            raise DataError(f"{p}:{lineno}: expected a base64 token and its rank (a tiktoken BPE file){hint}") from None
    if not ranks:
        raise DataError(f"{flag} {p}: empty tiktoken BPE file")
    return ranks


class TiktokenTokenizer(_SpecTokenizer):
    """A tiktoken BPE file through the ``tiktoken`` library (an optional dependency).

    ``encode`` is ``encode_ordinary``: special-token text in a document is plain text, as Megatron's
    ``TikTokenizer`` treats it. ``<|endoftext|>`` (the end of document) is added after the highest rank unless
    ``special_tokens`` place it. Token strings are the bytes in GPT-2's byte-level alphabet.

    Args:
        ranks: ``{token bytes: rank}`` (:func:`read_tiktoken_ranks`).
        pattern: a name of :data:`TIKTOKEN_PATTERNS` or a regex (default ``cl100k``).
        special_tokens: ``{token: id}``; default ``{"<|endoftext|>": max rank + 1}``.
    """

    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], pattern: str = "cl100k", special_tokens: Optional[dict] = None,
                 source=None, config: Optional[dict] = None, name: str = "lmforge"):
        try:
            import tiktoken
        except ImportError:
            raise DataError("tiktoken BPE files need the tiktoken package: pip install tiktoken "
                            "(or pip install lmforge[data])") from None
        self.ranks = dict(ranks)
        self.pattern = pattern
        regex = TIKTOKEN_PATTERNS.get(pattern, pattern)
        if special_tokens is None:
            special_tokens = {EOD_TOKEN: max(self.ranks.values()) + 1}
        self.special_tokens = {str(k): int(v) for k, v in special_tokens.items()}
        try:
            self.enc = tiktoken.Encoding(name=name, pat_str=regex, mergeable_ranks=self.ranks,
                                         special_tokens=self.special_tokens)
        except ValueError as e:
            raise DataError(f"cannot build a tiktoken encoding from {source or 'these ranks'}: {e}") from None
        self.source = os.fspath(source) if source is not None else None
        self.config = dict(config or {})
        self._by_id = {v: k for k, v in self.ranks.items()}
        self._symbols = _byte_symbols()
        self._unsymbols = {s: b for b, s in self._symbols.items()}

    @classmethod
    def from_file(cls, path, pattern: str = "cl100k", flag: str = "--tokenizer-model"):
        """Read a tiktoken BPE file."""
        return cls(read_tiktoken_ranks(path, flag), pattern=pattern, source=path)

    def __getstate__(self):
        return {"ranks": self.ranks, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "source": self.source, "config": self.config}

    def __setstate__(self, s):
        self.__init__(s["ranks"], s["pattern"], s["special_tokens"], s["source"], s["config"])

    @property
    def vocab_size(self) -> int:
        """Highest id + 1."""
        return int(self.enc.n_vocab)

    @property
    def eod_id(self) -> Optional[int]:
        """The id of ``<|endoftext|>`` (or another known end-of-document token), or None."""
        return next((self.special_tokens[t] for t in EOD_CANDIDATES if t in self.special_tokens), None)

    @property
    def bos_id(self) -> Optional[int]:
        """The id of a known BOS special token, or None."""
        return next((self.special_tokens[t] for t in BOS_CANDIDATES if t in self.special_tokens), None)

    def encode(self, text: str) -> list[int]:
        """``encode_ordinary(text)``."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts (tiktoken's threads)."""
        return self.enc.encode_ordinary_batch(list(texts))

    def encode_plain(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids with the character span of each token."""
        ids = self.encode(text)
        where = _char_offsets(text)
        spans, at = [], 0
        for i in ids:
            n = len(self.enc.decode_single_token_bytes(i))
            spans.append((where[at], where[min(at + n, len(where) - 1)]))
            at += n
        return ids, spans

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (invalid UTF-8 replaced)."""
        special = set(self.special_tokens.values())
        keep = [int(i) for i in ids if not (skip_special_tokens and int(i) in special)]
        return self.enc.decode(keep, errors="replace")

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token`` (a special token, or bytes written in the byte-level alphabet), or None."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.ranks.get(bytes(self._unsymbols[c] for c in token))
        except KeyError:
            return None

    def id_to_token(self, tid: int) -> Optional[str]:
        """The token of id ``tid`` in the byte-level alphabet (special tokens as written), or None."""
        tid = int(tid)
        for k, v in self.special_tokens.items():
            if v == tid:
                return k
        b = self._by_id.get(tid)
        return None if b is None else "".join(self._symbols[x] for x in b)

    def _spec(self) -> dict:
        return {"pattern": self.pattern, "special_tokens": self.special_tokens}

    def _model_file(self):
        import base64

        lines = [f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(self.ranks.items(), key=lambda x: x[1])]
        return "tokenizer.tiktoken", "".join(lines).encode("ascii")


#: Alphabets by name for :class:`KmerTokenizer` (``N`` / ``X``: any base / residue).
ALPHABETS = {"dna": "ACGTN", "rna": "ACGUN", "protein": "ACDEFGHIKLMNPQRSTVWYXBZUO"}
#: Special tokens of :class:`KmerTokenizer`, first in its vocabulary: padding, unknown, BOS, end of document.
KMER_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
#: The largest vocabulary a k-mer tokenizer may have (alphabet size ** k).
MAX_KMER_VOCAB = 1 << 22


class KmerTokenizer(_SpecTokenizer):
    """Characters (``k=1``) or k-mers of biological sequences, over an explicit alphabet.

    Vocabulary, in this order: the special tokens ``<pad> <unk> <s> </s>`` (``</s>`` ends a document,
    ``<s>`` is the BOS), the single characters of the alphabet when ``k > 1``, then every k-mer of the
    alphabet in lexicographic order. A text is read in windows of ``k`` characters every ``stride``
    characters (``stride = k``: non-overlapping, ``stride = 1``: every position); the characters after the
    last whole window become single-character tokens. A window holding a character outside the alphabet
    is ``<unk>``. With ``uppercase`` (default) text is upper-cased first (soft-masked FASTA is lowercase).
    ``encode`` adds no special token.
    """

    kind = "kmer"

    def __init__(self, alphabet: str, k: int = 1, stride: Optional[int] = None, uppercase: bool = True,
                 source=None, config: Optional[dict] = None):
        import itertools

        alphabet = ALPHABETS.get(str(alphabet).lower(), alphabet) if isinstance(alphabet, str) else alphabet
        if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
            raise ConfigError(f"alphabet={alphabet!r}: give the characters once each (e.g. ACGT), or one of "
                              f"{', '.join(ALPHABETS)}")
        k = int(k)
        stride = k if stride is None else int(stride)
        if k < 1 or not 1 <= stride <= k:
            raise ConfigError(f"k={k}, stride={stride}: need k >= 1 and 1 <= stride <= k (stride = k: "
                              f"non-overlapping k-mers)")
        if len(alphabet) ** k > MAX_KMER_VOCAB:
            raise ConfigError(f"an alphabet of {len(alphabet)} characters and k={k} give {len(alphabet) ** k:,} "
                              f"k-mers, over the limit of {MAX_KMER_VOCAB:,}: use a smaller k")
        self.alphabet, self.k, self.stride, self.uppercase = alphabet, k, stride, bool(uppercase)
        tokens = list(KMER_SPECIAL_TOKENS)
        if k > 1:
            tokens += list(alphabet)
        tokens += ["".join(t) for t in itertools.product(alphabet, repeat=k)]
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.unk = self.vocab["<unk>"]
        self.source = os.fspath(source) if source is not None else None
        self.config = dict(config or {})

    @property
    def vocab_size(self) -> int:
        """Special tokens + single characters (k > 1) + alphabet size ** k."""
        return len(self.tokens)

    @property
    def eod_id(self) -> int:
        """The id of ``</s>``."""
        return self.vocab["</s>"]

    @property
    def bos_id(self) -> int:
        """The id of ``<s>``."""
        return self.vocab["<s>"]

    def encode_plain(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids with the character span of each window (see the class doc)."""
        if self.uppercase:
            text = text.upper()
        ids, spans, at = [], [], 0
        while at + self.k <= len(text):
            ids.append(self.vocab.get(text[at:at + self.k], self.unk))
            spans.append((at, at + self.k))
            at += self.stride
        start = spans[-1][1] if spans else 0
        for i in range(start, len(text)):
            ids.append(self.vocab.get(text[i], self.unk) if self.k > 1 or text[i] in self.vocab else self.unk)
            spans.append((i, i + 1))
        return ids, spans

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``'s windows (see the class doc)."""
        return self.encode_plain(text)[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The sequence again: a k-mer after a k-mer adds its last ``stride`` characters."""
        out, after_kmer = [], False
        n_special = len(KMER_SPECIAL_TOKENS)
        for i in (int(i) for i in ids):
            token = self.tokens[i] if 0 <= i < len(self.tokens) else "<unk>"
            if i < n_special or not 0 <= i < len(self.tokens):
                if not skip_special_tokens:
                    out.append(token)
                after_kmer = False
            elif len(token) == self.k and self.k > 1:
                out.append(token[self.k - self.stride:] if after_kmer else token)
                after_kmer = True
            else:
                out.append(token)
                after_kmer = self.k == 1
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token``, or None."""
        return self.vocab.get(token)

    def id_to_token(self, tid: int) -> Optional[str]:
        """The token of id ``tid``, or None."""
        return self.tokens[int(tid)] if 0 <= int(tid) < len(self.tokens) else None

    def _spec(self) -> dict:
        return {"alphabet": self.alphabet, "k": self.k, "stride": self.stride, "uppercase": self.uppercase}


def _load_spec_folder(folder: Path):
    """The tokenizer a folder's ``lmforge_tokenizer.json`` describes."""
    path = folder / SPEC_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    kind = spec.get("type") if isinstance(spec, dict) else None
    config = spec.get("config") or {}
    model = folder / str(spec.get("file", "")) if spec.get("file") else None
    try:
        if kind == "sentencepiece":
            return SentencePieceTokenizer(_need_file(model, str(path), "model").read_bytes(),
                                          add_bos=bool(spec.get("add_bos")), source=folder, config=config)
        if kind == "tiktoken":
            return TiktokenTokenizer(read_tiktoken_ranks(model, str(path)), pattern=spec.get("pattern", "cl100k"),
                                     special_tokens=spec.get("special_tokens"), source=folder, config=config)
        if kind == "kmer":
            return KmerTokenizer(spec["alphabet"], spec["k"], spec.get("stride"), spec.get("uppercase", True),
                                 source=folder, config=config)
    except (KeyError, TypeError, ConfigError) as e:
        raise DataError(f"{path}: bad tokenizer settings ({e})") from None
    raise DataError(f"{path}: unknown tokenizer type {kind!r} (known: sentencepiece, tiktoken, kmer)")


def _sniff_model_file(path: Path, add_bos: bool = False, flag: str = "tokenizer"):
    """A ``.model`` / ``.tiktoken`` file: tiktoken when its first line is ``base64 rank``, else SentencePiece."""
    import re

    with open(path, "rb") as fh:
        head = fh.readline(4096)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", head):
        return TiktokenTokenizer.from_file(path, flag=flag)
    return SentencePieceTokenizer.from_file(path, add_bos=add_bos, flag=flag)


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


def load_tokenizer(path: str | os.PathLike):
    """Open a tokenizer.

    Args:
        path: a ``tokenizer.json`` file, or a folder holding one (with its ``tokenizer_config.json``; a chat
            template in ``chat_template.jinja`` / ``chat_template.json`` there joins the config); a folder
            that :meth:`save` of the tokenizers here wrote (``lmforge_tokenizer.json``); a SentencePiece
            ``.model`` or tiktoken ``.model`` / ``.tiktoken`` file; a folder holding only GPT-2's
            ``vocab.json`` + ``merges.txt`` or only a ``tokenizer.model``. Any other folder without
            ``tokenizer.json`` is opened with ``transformers.AutoTokenizer`` (local files only) when
            ``transformers`` is installed.

    Raises:
        DataError: the path is missing or holds no readable tokenizer.
    """
    from tokenizers import Tokenizer as _Backend

    p = Path(path)
    if not p.exists():
        raise DataError(f"tokenizer {p} not found: give a tokenizer.json file or a folder holding one "
                        f"(make one with `lmforge tokenizer train`)")
    if p.is_dir() and (p / SPEC_FILE).is_file():
        return _load_spec_folder(p)
    if p.is_file() and p.suffix in (".model", ".tiktoken"):
        return _sniff_model_file(p)
    if p.is_dir() and not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return load_gpt2_bpe(p / "vocab.json", p / "merges.txt", "tokenizer", "tokenizer")
        if (p / "tokenizer.model").is_file():
            return _sniff_model_file(p / "tokenizer.model")
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


# -- Megatron's and NeMo's ways of naming a tokenizer -------------------------------------------------

#: ``--tokenizer-library`` / ``model.tokenizer.library`` values (``hf`` is read as ``huggingface``).
LIBRARIES = ("megatron", "huggingface", "sentencepiece", "tiktoken")
#: ``--tokenizer-type`` / ``model.tokenizer.type`` names of Megatron and NeMo that lmforge reads, by kind.
GPT2_TYPES = ("GPT2BPETokenizer",)
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
HF_TYPES = ("HuggingFaceTokenizer", "AutoTokenizer")
TIKTOKEN_TYPES = ("TikTokenizer",)
KNOWN_TYPES = GPT2_TYPES + SENTENCEPIECE_TYPES + HF_TYPES + TIKTOKEN_TYPES
#: How the settings are named on preprocess's command line (the default) and in a pretraining config.
CLI_NAMES = {"library": "--tokenizer-library", "type": "--tokenizer-type", "model": "--tokenizer-model",
             "vocab_file": "--vocab-file", "merge_file": "--merge-file", "tiktoken_pattern": "--tiktoken-pattern"}
CONFIG_NAMES = {"library": "model.tokenizer.library", "type": "model.tokenizer.type",
                "model": "model.tokenizer.model", "vocab_file": "model.tokenizer.vocab_file",
                "merge_file": "model.tokenizer.merge_file", "tiktoken_pattern": "model.tokenizer.tiktoken_pattern"}


def open_tokenizer(library: Optional[str] = None, type: Optional[str] = None, model=None, vocab_file=None,
                   merge_file=None, tiktoken_pattern: Optional[str] = None, names: Optional[dict] = None):
    """The tokenizer that Megatron's / NeMo's settings name; None when none of them is set.

    * ``GPT2BPETokenizer`` (``megatron`` library), or a vocab file + merge file with the ``huggingface``
      library or none: GPT-2 BPE (:func:`load_gpt2_bpe`).
    * ``sentencepiece`` library, or ``SentencePieceTokenizer`` / ``GPTSentencePieceTokenizer`` /
      ``Llama2Tokenizer`` (BOS added, as Megatron's does): the ``.model`` file given as ``model``.
    * ``tiktoken`` library or ``TikTokenizer``: the tiktoken BPE file given as ``model`` (or ``vocab_file``),
      pre-tokenized with ``tiktoken_pattern`` (a name of :data:`TIKTOKEN_PATTERNS` or a regex; cl100k).
    * ``huggingface`` library or ``HuggingFaceTokenizer``: ``model``, else ``type``, a local folder or
      ``tokenizer.json`` (nothing is downloaded).
    * ``model`` alone: anything :func:`load_tokenizer` reads. With GPT2BPETokenizer and no vocab and merge
      files, ``model`` is read that way too (lmforge's own configs name their tokenizer there).

    ``names`` maps each setting to the flag or key that messages name (:data:`CLI_NAMES` by default).
    A setting given that the chosen tokenizer does not use is refused, so that every one given acts.

    Raises:
        ConfigError: an unknown library or type, a missing or superfluous setting.
        DataError: a file that is missing or not what its setting says.
    """
    n = {**CLI_NAMES, **(names or {})}
    lib = str(library).strip().lower() if library not in (None, "") else None
    lib = "huggingface" if lib == "hf" else lib
    if lib is not None and lib not in LIBRARIES:
        raise ConfigError(f"{n['library']}={library}: unknown tokenizer library; use one of {', '.join(LIBRARIES)}")
    typ = str(type) if type not in (None, "") else None
    given = {k: v for k, v in (("model", model), ("vocab_file", vocab_file), ("merge_file", merge_file),
                               ("tiktoken_pattern", tiktoken_pattern)) if v not in (None, "")}

    def refuse_unused(kind: str, used: Sequence[str]) -> None:
        extra = [k for k in given if k not in used]
        if extra:
            shown = ", ".join(f"{n[k]}={given[k]}" for k in extra)
            raise ConfigError(f"{shown}: not used by a {kind} tokenizer; drop {'it' if len(extra) == 1 else 'them'}")

    if not given and typ is None:
        return None
    if lib == "sentencepiece" or typ in SENTENCEPIECE_TYPES:
        refuse_unused("SentencePiece", ["model"])
        if "model" not in given:
            raise ConfigError(f"a SentencePiece tokenizer needs {n['model']}=PATH the .model file")
        path = Path(model)
        if path.is_dir() and not (path / SPEC_FILE).is_file():
            path = path / "tokenizer.model"
        if path.is_dir():
            return load_tokenizer(path)
        return SentencePieceTokenizer.from_file(path, add_bos=typ == "Llama2Tokenizer", flag=n["model"])
    if lib == "tiktoken" or typ in TIKTOKEN_TYPES:
        refuse_unused("tiktoken", ["model", "vocab_file", "tiktoken_pattern"])
        if "model" in given and "vocab_file" in given:
            raise ConfigError(f"{n['model']} and {n['vocab_file']} both name the tiktoken file; give one")
        file, flag = (model, n["model"]) if "model" in given else (vocab_file, n["vocab_file"])
        if file in (None, ""):
            raise ConfigError(f"a tiktoken tokenizer needs {n['model']}=PATH the tiktoken BPE file")
        return TiktokenTokenizer.from_file(file, pattern=tiktoken_pattern or "cl100k", flag=flag)
    if "tiktoken_pattern" in given:
        raise ConfigError(f"{n['tiktoken_pattern']} applies to a tiktoken tokenizer only "
                          f"({n['library']}=tiktoken); drop it")
    gpt2 = typ in GPT2_TYPES or (typ is None and lib in (None, "huggingface", "megatron")
                                 and ("vocab_file" in given or "merge_file" in given))
    if lib == "huggingface" and ("vocab_file" in given or "merge_file" in given):
        gpt2 = True  # NeMo: AutoTokenizer('gpt2', vocab_file, merges_file) is GPT-2's BPE on those files
    if gpt2:
        if "vocab_file" in given or "merge_file" in given or "model" not in given:
            refuse_unused("GPT-2 BPE", ["vocab_file", "merge_file"])
            missing = [n[k] for k in ("vocab_file", "merge_file") if k not in given]
            if missing:
                raise ConfigError(f"GPT2BPETokenizer needs {n['vocab_file']}=gpt2-vocab.json and "
                                  f"{n['merge_file']}=gpt2-merges.txt; {' and '.join(missing)} not given")
            return load_gpt2_bpe(vocab_file, merge_file, n["vocab_file"], n["merge_file"])
        return load_tokenizer(model)
    if lib == "huggingface" or typ in HF_TYPES:
        refuse_unused("Hugging Face", ["model"])
        path = model if "model" in given else (typ if typ not in HF_TYPES else None)
        if path is None:
            raise ConfigError(f"a Hugging Face tokenizer needs {n['model']}=FOLDER (or {n['type']}=FOLDER), "
                              f"a local tokenizer folder or tokenizer.json")
        if not Path(path).exists():
            raise DataError(f"tokenizer {path} not found: give a local tokenizer folder or tokenizer.json "
                            f"({n['model']}); lmforge does not download tokenizers")
        return load_tokenizer(path)
    if typ is not None:
        raise ConfigError(f"{n['type']}={typ}: not a tokenizer type lmforge reads; use one of "
                          f"{', '.join(KNOWN_TYPES)} (or {n['model']}=PATH for a tokenizer folder)")
    if lib == "megatron":
        raise ConfigError(f"{n['library']}=megatron needs {n['type']}, e.g. GPT2BPETokenizer with "
                          f"{n['vocab_file']} and {n['merge_file']}")
    if "model" in given:
        return load_tokenizer(model)
    return None


def tokenizer_from_config(tok) -> Optional[object]:
    """The tokenizer a pretraining config's ``model.tokenizer`` section names (see :func:`open_tokenizer`):
    ``model``, ``library``, ``type``, ``vocab_file``, ``merge_file``; None when it names none."""
    return open_tokenizer(library=getattr(tok, "library", None), type=getattr(tok, "type", None),
                          model=getattr(tok, "model", None), vocab_file=getattr(tok, "vocab_file", None),
                          merge_file=getattr(tok, "merge_file", None), names=CONFIG_NAMES)


# -- training ------------------------------------------------------------------------------------

def iter_training_texts(files: Sequence[str | os.PathLike], json_keys: Sequence[str] = ("text",),
                        block_chars: int = 1 << 16, max_document_chars: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """Stream the texts of ``files``: the ``json_keys`` of each JSON line (.jsonl/.json, .gz/.zst), Parquet
    row or FASTA record (see :func:`lmforge.data.files.iter_records`), or blocks of whole lines of a plain
    text file. Raises DataError naming ``file:line`` on a bad line, a text (or plain-text line) over
    ``max_document_chars`` characters, or a truncated .gz."""
    too_long = (f"is over --max-document-chars={max_document_chars:,}: split it into several lines, or raise "
                f"--max-document-chars")
    for f in files:
        path = Path(f)
        structured = input_format(path) != "text"
        lines = iter_records(path, max_line_bytes(max_document_chars), columns=json_keys,
                             default="text")
        if structured:
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
#: Every file a saved tokenizer folder may hold (any of them present: the folder holds a tokenizer).
SAVED_FILES = TOKENIZER_FILES + (SPEC_FILE, "tokenizer.model", "tokenizer.tiktoken")
#: ``lmforge tokenizer train --type`` values.
TRAIN_TYPES = ("bpe", "unigram", "sentencepiece", "char", "kmer")


def _prepare_training(files, out_dir, overwrite: bool, max_document_chars: int, json_keys):
    """Checked inputs, output folder and keys of a training run; nothing written yet."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not list(files):
        raise DataError("tokenizer training needs at least one input file (--input)")
    files = expand_inputs(files, "tokenizer training input")
    max_document_chars = check_max_document_chars(max_document_chars)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; give a folder for the tokenizer files")
    held = [name for name in SAVED_FILES if (out_dir / name).exists()]
    if held and not overwrite:
        raise DataError(f"--out {out_dir} already holds a tokenizer ({', '.join(held)}); pass --overwrite to replace "
                        f"it, or choose another --out")
    check_output_location(out_dir / TOKENIZER_FILES[0], "--out", shown=out_dir)
    if isinstance(json_keys, str):
        json_keys = (json_keys,)
    return files, out_dir, max_document_chars, tuple(json_keys)


def _counted_texts(files, json_keys, max_document_chars, seen: dict) -> Iterator[str]:
    for t in iter_training_texts(files, json_keys, max_document_chars=max_document_chars):
        seen["chars"] += len(t)
        yield t


def _no_text(files, json_keys) -> DataError:
    return DataError(f"no text to train a tokenizer on in {', '.join(map(str, files))} "
                     f"(JSON keys read: {', '.join(json_keys)})")


def _files_saved_by(tokenizer) -> set[str]:
    if isinstance(tokenizer, _SpecTokenizer):
        model = tokenizer._model_file()
        return {SPEC_FILE} | ({model[0]} if model else set())
    return set(TOKENIZER_FILES)


def _save_trained(tokenizer, out_dir: Path) -> None:
    """Save into ``out_dir``: a new folder appears whole or not at all; in an existing one only the
    tokenizer's own files are written, each atomically, and those another kind of tokenizer saved there
    before (replaced with --overwrite) are removed, so that the folder reads back as the new one."""
    try:
        if out_dir.exists():
            tokenizer.save(out_dir)
            for name in set(SAVED_FILES) - _files_saved_by(tokenizer):
                if (out_dir / name).exists():
                    (out_dir / name).unlink()
        else:
            with atomic_path(out_dir) as tmp:
                tmp.mkdir()
                tokenizer.save(tmp)
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        raise DataError(f"cannot write the tokenizer to --out {out_dir} ({e.filename or out_dir}): "
                        f"{e.strerror or e}; free space or choose another location") from e


def train_bpe(files: Sequence[str | os.PathLike] | str | os.PathLike, vocab_size: int, out_dir: str | os.PathLike,
              json_keys: Sequence[str] = ("text",), min_frequency: int = 2, overwrite: bool = False,
              max_document_chars: int = MAX_DOCUMENT_CHARS) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the ``tokenizers`` library and save it into ``out_dir``.

    Byte-level pre-tokenizer and decoder (any text encodes, nothing is unknown); ``<|endoftext|>``
    is the one special token and the end-of-document id. Texts stream from the files (see
    :func:`iter_training_texts`); nothing is held in memory but the word counts.

    Args:
        files: .jsonl / .json (JSON lines, optionally .gz / .zst), Parquet or FASTA files, folders or globs,
            read at ``json_keys``; any other file is read as plain text.
        vocab_size: the vocabulary size, at least 257 (256 byte symbols + ``<|endoftext|>``).
        out_dir: folder to write (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
            A new folder appears whole or not at all; in an existing folder only those three files
            are written, each atomically, and only with ``overwrite`` when a tokenizer is there.
        json_keys: keys of the JSON lines holding text.
        min_frequency: minimum pair count for a merge.
        overwrite: replace the tokenizer files of an existing folder.
        max_document_chars: refuse a text (a plain-text line) longer than this: bounds memory.

    Returns:
        the saved tokenizer, loaded from ``out_dir``.
    """
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    files, out_dir, max_document_chars, json_keys = _prepare_training(files, out_dir, overwrite,
                                                                      max_document_chars, json_keys)
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
    backend.train_from_iterator(_counted_texts(files, json_keys, max_document_chars, seen), trainer=trainer)
    if seen["chars"] == 0:
        raise _no_text(files, json_keys)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "clean_up_tokenization_spaces": False,
    }
    _save_trained(Tokenizer(backend, config), out_dir)
    return load_tokenizer(out_dir)


def train_unigram(files, vocab_size: int, out_dir, json_keys: Sequence[str] = ("text",), overwrite: bool = False,
                  max_document_chars: int = MAX_DOCUMENT_CHARS) -> Tokenizer:
    """Train a Unigram language-model tokenizer with the ``tokenizers`` library (SentencePiece's algorithm,
    Metaspace ``▁`` for spaces) and save it as ``tokenizer.json``. Special tokens ``<unk> <s> </s>`` (ids 0-2;
    ``</s>`` ends a document); a character never seen in training encodes as ``<unk>``.
    Arguments as :func:`train_bpe`."""
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    files, out_dir, max_document_chars, json_keys = _prepare_training(files, out_dir, overwrite,
                                                                      max_document_chars, json_keys)
    if int(vocab_size) < 4:
        raise ConfigError(f"vocab_size={vocab_size} is too small for a Unigram tokenizer: 3 special tokens + pieces")
    backend = _Backend(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=int(vocab_size), special_tokens=["<unk>", "<s>", "</s>"],
                                      unk_token="<unk>", show_progress=False)
    seen = {"chars": 0}
    backend.train_from_iterator(_counted_texts(files, json_keys, max_document_chars, seen), trainer=trainer)
    if seen["chars"] == 0:
        raise _no_text(files, json_keys)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "bos_token": "<s>",
              "unk_token": "<unk>", "add_bos_token": False, "clean_up_tokenization_spaces": False}
    _save_trained(Tokenizer(backend, config), out_dir)
    return load_tokenizer(out_dir)


def train_sentencepiece(files, vocab_size: int, out_dir, json_keys: Sequence[str] = ("text",),
                        overwrite: bool = False, max_document_chars: int = MAX_DOCUMENT_CHARS,
                        model_type: str = "unigram") -> SentencePieceTokenizer:
    """Train a SentencePiece model with the ``sentencepiece`` library and save it (``tokenizer.model`` +
    ``lmforge_tokenizer.json``; the ``.model`` is the file NeMo and Megatron read).

    Llama's settings: byte fallback (any text encodes), no normalization, whitespace kept; ``<unk> <s> </s>``
    are ids 0-2 and ``</s>`` ends a document. Each line of the texts is one training sentence (lines over
    SentencePiece's 4,192 bytes are left out of training). Other arguments as :func:`train_bpe`.
    """
    import io

    spm = _import_sentencepiece()
    if model_type not in ("unigram", "bpe"):
        raise ConfigError(f"model_type={model_type!r}: use unigram or bpe")
    files, out_dir, max_document_chars, json_keys = _prepare_training(files, out_dir, overwrite,
                                                                      max_document_chars, json_keys)
    seen = {"chars": 0}

    def sentences() -> Iterator[str]:
        for text in _counted_texts(files, json_keys, max_document_chars, seen):
            for line in text.split("\n"):
                if line.strip():
                    yield line

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=int(vocab_size), model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=max(1, min(8, os.cpu_count() or 1)), minloglevel=2)
    except RuntimeError as e:
        if seen["chars"] == 0:
            raise _no_text(files, json_keys) from None
        raise DataError(f"SentencePiece training failed with --vocab-size {vocab_size}: {str(e).strip()}") from None
    if seen["chars"] == 0:
        raise _no_text(files, json_keys)
    tok = SentencePieceTokenizer(model.getvalue(), config={"eos_token": "</s>", "bos_token": "<s>"})
    _save_trained(tok, out_dir)
    return load_tokenizer(out_dir)


def train_kmer(files, out_dir, k: int = 1, stride: Optional[int] = None, alphabet: Optional[str] = None,
               json_keys: Sequence[str] = ("text",), overwrite: bool = False, uppercase: bool = True,
               max_document_chars: int = MAX_DOCUMENT_CHARS) -> KmerTokenizer:
    """Make a character (``k=1``) or k-mer tokenizer (:class:`KmerTokenizer`) and save it.

    The alphabet is ``alphabet`` (``dna``, ``rna``, ``protein`` or the characters themselves) when given, else
    every character of the texts (upper-cased with ``uppercase``; whitespace left out), in sorted order.
    """
    if alphabet is None:
        if not files:
            raise ConfigError("a character / k-mer tokenizer needs --alphabet (dna, rna, protein or the characters) "
                              "or --input files to take the characters from")
        files, out_dir, max_document_chars, json_keys = _prepare_training(files, out_dir, overwrite,
                                                                          max_document_chars, json_keys)
        chars: set[str] = set()
        for text in iter_training_texts(files, json_keys, max_document_chars=max_document_chars):
            chars.update(text.upper() if uppercase else text)
        chars = {c for c in chars if not c.isspace()}
        if not chars:
            raise _no_text(files, json_keys)
        alphabet = "".join(sorted(chars))
    else:
        if files:
            raise ConfigError("--input is not read when --alphabet names the characters; drop one of them")
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise DataError(f"--out {out_dir} is a file; give a folder for the tokenizer files")
        held = [name for name in SAVED_FILES if (out_dir / name).exists()]
        if held and not overwrite:
            raise DataError(f"--out {out_dir} already holds a tokenizer ({', '.join(held)}); pass --overwrite "
                            f"to replace it, or choose another --out")
        check_output_location(out_dir / SPEC_FILE, "--out", shown=out_dir)
    tok = KmerTokenizer(alphabet, k=k, stride=stride, uppercase=uppercase)
    _save_trained(tok, Path(out_dir))
    return load_tokenizer(out_dir)
