"""Fixed-length GPT training samples over Megatron indexed datasets: splits, shuffling, blending, cached indices.

Megatron-Core's ``GPTDataset`` / ``BlendedDataset`` semantics, in numpy:

* **Splits.** ``splits_string`` ('980,10,10', '98,1,1', '1,0,0') is normalised to ratios; split
  ``k`` of a dataset holds sequences ``[round(b0 * N), round(b1 * N))`` where ``(b0, b1)`` are the
  cumulative ratio book-ends (Python's ``round``, as Megatron). Without sentence splitting a
  sequence is a (non-empty) document, so splits are disjoint sets of whole documents.
* **Samples.** Per epoch the split's documents are shuffled (``numpy.random.RandomState(seed)``) and
  their tokens concatenated across document boundaries; sample ``j`` of that stream covers tokens
  ``[j * seq_length, j * seq_length + seq_length + 1)``, so consecutive samples share one token and
  the last partial sample is dropped. Enough epochs are stitched together to give ``num_samples``
  (``None``: exactly one epoch). A shuffle index then permutes the samples. As in Megatron, when
  the final epoch contributes fewer than 80% of an epoch's samples it is shuffled apart from the
  others (both its documents and its samples), so the samples of the full epochs come first and
  the partially used epoch does not get mixed into them. The same seed, data and settings give the
  same three arrays as Megatron-Core (``document_index``, ``sample_index``, ``shuffle_index``).
* **Cache.** The three arrays are saved as ``.npy`` files in ``cache_dir`` (default
  ``<data dir>/cache/GPTDataset_indices``) under an MD5 hash of every setting and of the data itself
  (:meth:`IndexedDataset.fingerprint`: sizes and mtimes of the .bin/.idx, a SHA-256 of the .idx), so
  a prefix preprocessed again with new content gets new indices, never a stale entry; only the main
  rank writes (atomically), the others wait on ``barrier`` and load them; a second build reuses them.
* **Token ids.** Given the tokenizer's ``vocab_size``, :func:`build_datasets` refuses a dataset whose
  largest token id does not fit it (data preprocessed with another tokenizer). The largest id is
  read once per dataset content and cached beside the indices (``*-IndexedDataset-stats.json``).
* **Blending.** ``data_prefix = [w1, p1, w2, p2, ...]``: for blended sample ``i`` the dataset whose
  count lags its weight most is chosen, ``argmax_k(w_k * max(i, 1) - count_k)`` (first on ties) as
  Megatron's ``build_blending_indices`` does; each component is built with
  ``ceil(ceil(num_samples * w_k) * 1.005)`` samples (Megatron's 0.5% surplus), or more if the
  blend needs more.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from lmforge.data.indexed import IndexedDataset, data_file_path, exists, index_file_path
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path, write_json_atomic

SPLIT_NAMES = ("train", "valid", "test")
#: Megatron's mid-level dataset surplus for blends.
BLEND_SURPLUS = 0.005
#: Megatron's threshold: a final epoch giving fewer than this share of an epoch's samples is shuffled apart.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
_INDEX_FORMAT = 2  # bump when the cached arrays change meaning (2: keyed on the data's fingerprint)


# -- parsing -----------------------------------------------------------------------------------------

def parse_splits(splits_string) -> list[float]:
    """'980,10,10' -> [0.98, 0.01, 0.01]: up to three non-negative numbers, padded with 0, normalised.

    A list of numbers (``[980, 10, 10]``) is accepted too.
    """
    if isinstance(splits_string, (list, tuple)) or (
            not isinstance(splits_string, str) and hasattr(splits_string, "__iter__")):
        splits_string = ",".join(str(v) for v in splits_string)
    text = str(splits_string).strip()
    parts = [p for p in text.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = None
    if (values is None or not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values)
            or sum(values) <= 0):
        raise ConfigError(f"splits_string={splits_string!r} is not valid: give up to three non-negative numbers "
                          f"for train,validation,test with a positive sum, e.g. '980,10,10' or '1,0,0'")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_bookends(ratios: Sequence[float]) -> list[Optional[tuple[float, float]]]:
    """Cumulative (begin, end) fraction of each split; None for a split with zero share."""
    out, start = [], 0.0
    for r in ratios:
        end = start + r
        out.append((start, end) if end > start else None)
        start = end
    return out


def split_document_ranges(num_documents: int, splits_string) -> list[Optional[tuple[int, int]]]:
    """The ``[begin, end)`` sequence range of each split of a dataset of ``num_documents`` sequences
    (None where a split has zero share), rounded as Megatron does."""
    ranges = []
    for bookend in split_bookends(parse_splits(splits_string)):
        if bookend is None:
            ranges.append(None)
        else:
            ranges.append((int(round(bookend[0] * float(num_documents))), int(round(bookend[1] * float(num_documents)))))
    return ranges


def parse_data_prefix(data_prefix) -> list[tuple[float, str]]:
    """``"prefix"`` or ``[w1, p1, w2, p2, ...]`` (or ``[p]``) -> ``[(normalised weight, prefix), ...]``.

    Weights may be numbers or numeric strings; zero-weight entries are dropped.
    """
    if isinstance(data_prefix, (str, os.PathLike)):
        text = os.fspath(data_prefix).strip()
        if text.startswith("[") and text.endswith("]"):  # "[1.0,data/x]" given as one string
            items = [t.strip().strip("'\"") for t in text[1:-1].split(",") if t.strip()]
        else:
            items = [text]
    else:
        try:
            items = list(data_prefix)
        except TypeError:
            raise ConfigError(f"data_prefix={data_prefix!r} must be a path prefix or a list "
                              f"[weight1, prefix1, weight2, prefix2, ...]") from None
    if not items:
        raise ConfigError("data_prefix is empty: give a dataset prefix such as data/corpus_text_document")
    if len(items) == 1:
        pairs = [(1.0, items[0])]
    else:
        if len(items) % 2:
            raise ConfigError(f"data_prefix has {len(items)} entries, an odd number: it must alternate weights and "
                              f"prefixes, [weight1, prefix1, weight2, prefix2, ...]; got {items!r}")
        pairs = []
        for i in range(0, len(items), 2):
            w, p = items[i], items[i + 1]
            try:
                weight = float(w)
            except (TypeError, ValueError):
                weight = None
            if weight is None or isinstance(w, bool) or not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"data_prefix entry {i} is {w!r}, not a non-negative number: data_prefix alternates "
                                  f"weights and prefixes, [weight1, prefix1, weight2, prefix2, ...]")
            pairs.append((weight, p))
    for _, p in pairs:
        if not isinstance(p, (str, os.PathLike)) or not os.fspath(p):
            raise ConfigError(f"data_prefix holds {p!r} where a dataset prefix (a path) is expected")
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ConfigError(f"data_prefix weights sum to {total}; give at least one positive weight")
    return [(w / total, os.fspath(p)) for w, p in pairs if w > 0]


def _check_prefix(prefix: str) -> None:
    """Friendly errors for a missing dataset before opening it."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix) and exists(prefix[: -len(suffix)]):
            raise ConfigError(f"data_prefix {prefix!r} names a file; give the prefix without {suffix}: "
                              f"{prefix[: -len(suffix)]!r}")
    if not exists(prefix):
        missing = [str(p) for p in (data_file_path(prefix), index_file_path(prefix)) if not p.is_file()]
        raise DataError(f"dataset {prefix!r} not found: {' and '.join(missing)} missing (make it with "
                        f"`lmforge preprocess`, whose outputs are named PREFIX_text_document.bin/.idx)")


def _parse_num_samples(num_samples) -> list[Optional[int]]:
    if num_samples is None:
        return [None, None, None]
    try:
        values = list(num_samples)
    except TypeError:
        raise ConfigError(f"num_samples={num_samples!r} must be (train, valid, test) counts or None") from None
    if len(values) != 3:
        raise ConfigError(f"num_samples={num_samples!r} must have 3 entries (train, valid, test)")
    out = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0:
            out.append(int(v))
        else:
            raise ConfigError(f"num_samples={num_samples!r}: each entry must be a non-negative integer or None")
    return out


# -- index arrays ----------------------------------------------------------------------------------

def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: Optional[int]) -> int:
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """The documents of every epoch in shuffled order (int32); the final epoch shuffled apart if asked."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents), num_epochs).astype(np.int32)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int) -> np.ndarray:
    """``(num_samples + 1, 2)`` int64: for each sample boundary ``k * seq_length`` of the token stream, the
    position in ``document_index`` and the token offset inside that document. Sample ``j`` spans
    boundaries ``j`` and ``j + 1`` inclusive (``seq_length + 1`` tokens)."""
    lengths = np.asarray(sizes)[document_index].astype(np.int64)
    cum = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    num_samples = (int(cum[-1]) - 1) // seq_length
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    block = 1 << 22
    for start in range(0, num_samples + 1, block):
        pos = np.arange(start, min(start + block, num_samples + 1), dtype=np.int64) * seq_length
        doc = np.searchsorted(cum, pos, side="right") - 1
        out[start:start + len(pos), 0] = doc
        out[start:start + len(pos), 1] = pos - cum[doc]
    return out


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``[0, num_samples)`` followed by a separate permutation of ``[num_samples, total_size)``."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_indices(sizes: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: Optional[int],
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(document_index, sample_index, shuffle_index)`` for the given documents, as Megatron-Core builds them."""
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    separate = False
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        from_final = num_samples - sans_final
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate)
    sample_index = build_sample_index(sizes, document_index, seq_length)
    total = sample_index.shape[0] - 1
    shuffle_index = build_shuffle_index(sans_final if separate else total, total, rng)
    return document_index, sample_index, shuffle_index


# -- cache -----------------------------------------------------------------------------------------

def _hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


def _default_cache_dir(prefix: str) -> Path:
    return Path(prefix).resolve().parent / "cache" / "GPTDataset_indices"


def _cached(paths: dict[str, Path]) -> Optional[dict[str, np.ndarray]]:
    if all(p.is_file() for p in paths.values()):
        return {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items() if k != "description"}
    return None


def _save(paths: dict[str, Path], arrays: dict[str, np.ndarray], description: dict) -> None:
    folder = next(iter(paths.values())).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            with atomic_path(paths[name]) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        write_json_atomic(paths["description"], description)  # last: its presence marks a complete entry
    except OSError as e:
        raise DataError(f"cannot write the dataset index cache in {folder} ({e}); pass a writable cache_dir "
                        f"(model.data.index_mapping_dir)") from e


def max_token_id(indexed: IndexedDataset, cache_dir: Optional[str | os.PathLike] = None,
                 is_main: bool = True) -> int:
    """The largest token id of ``indexed``: from ``<cache_dir>/<hash>-IndexedDataset-stats.json`` when that
    file describes the same content (:meth:`IndexedDataset.fingerprint`), else one pass over the .bin, saved
    there by the main rank (a read-only cache folder is no error here: the value is simply not kept)."""
    description = {"class": "IndexedDataset", "format": _INDEX_FORMAT, "prefix": str(Path(indexed.prefix).resolve()),
                   "data": indexed.fingerprint()}
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir(indexed.prefix)
    path = folder / f"{_hash(description)}-IndexedDataset-stats.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("description") == description and isinstance(saved.get("max_token_id"), int):
            return saved["max_token_id"]
    except (OSError, ValueError, AttributeError):
        pass
    largest = indexed.max_token_id()
    if is_main:
        try:
            write_json_atomic(path, {"description": description, "max_token_id": largest})
        except OSError:
            pass  # the index cache reports an unwritable folder with its fix; this value is cheap to redo
    return largest


def check_token_ids(indexed: IndexedDataset, vocab_size: int, tokenizer_name: str = "the tokenizer",
                    cache_dir: Optional[str | os.PathLike] = None, is_main: bool = True) -> None:
    """Refuse a dataset holding a token id the tokenizer (and so the model's embedding) does not have."""
    largest = max_token_id(indexed, cache_dir, is_main)
    if largest >= int(vocab_size):
        raise DataError(f"dataset {indexed.prefix} holds token id {largest} but {tokenizer_name} has a vocabulary "
                        f"of {int(vocab_size)} (ids 0..{int(vocab_size) - 1}): the data was preprocessed with another "
                        f"tokenizer; set model.tokenizer.model to that one, or run `lmforge preprocess` again with "
                        f"this one")


# -- datasets ----------------------------------------------------------------------------------------

def _sample_index(i: int, n: int) -> int:
    """``i`` as a non-negative index into ``n`` samples (negative counts from the end)."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample {i} out of range ({n} samples)")
    return i


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens from the documents ``doc_range`` of one indexed dataset.

    ``ds[i]`` is an ``np.int64`` array of length ``seq_length + 1`` (inputs ``[:-1]``, labels ``[1:]``).

    Attributes:
        samples_per_epoch: samples in one pass over the split's documents.
        num_epochs: passes stitched together to give ``num_samples``.
        document_index, sample_index, shuffle_index: the index arrays (see the module doc).
        from_cache: True when the arrays were loaded from ``cache_dir`` rather than built.
    """

    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], seq_length: int,
                 num_samples: Optional[int], seed: int, split: str = "train",
                 cache_dir: Optional[str | os.PathLike] = None, is_main: bool = True, use_cache: bool = True):
        self.indexed = indexed
        self.prefix = indexed.prefix
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.seq_length = int(seq_length)
        self.num_samples = num_samples
        self.seed = int(seed)
        self.split = split
        sizes = indexed.sequence_lengths
        self.tokens_per_epoch = int(sizes[self.doc_range[0]:self.doc_range[1]].sum(dtype=np.int64))
        self.samples_per_epoch = max(0, (self.tokens_per_epoch - 1) // self.seq_length)
        self.num_epochs = _num_epochs(max(1, self.tokens_per_epoch), self.seq_length, num_samples)
        self.description = {
            "class": "GPTDataset", "format": _INDEX_FORMAT, "prefix": str(Path(self.prefix).resolve()),
            "split": split, "documents": list(self.doc_range), "dataset_sequences": len(indexed),
            "dataset_tokens": indexed.num_tokens, "seq_length": self.seq_length, "num_samples": num_samples,
            "seed": self.seed, "add_extra_token": 1, "data": indexed.fingerprint(),
        }
        self.hash = _hash(self.description)
        folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir(self.prefix)
        base = f"{self.hash}-GPTDataset-{split}"
        self.cache_paths = {name: folder / f"{base}-{name}.npy"
                            for name in ("document_index", "sample_index", "shuffle_index")}
        self.cache_paths["description"] = folder / f"{base}-description.json"

        arrays = _cached(self.cache_paths) if use_cache else None
        self.from_cache = arrays is not None
        if arrays is None:
            documents = np.arange(self.doc_range[0], self.doc_range[1], dtype=np.int32)
            doc_idx, sample_idx, shuffle_idx = build_indices(sizes, documents, self.seq_length, num_samples, self.seed)
            arrays = {"document_index": doc_idx, "sample_index": sample_idx, "shuffle_index": shuffle_idx}
            if use_cache and is_main:
                _save(self.cache_paths, arrays, self.description)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = _sample_index(i, len(self))
        j = int(self.shuffle_index[i])
        d0, o0 = (int(x) for x in self.sample_index[j])
        d1, o1 = (int(x) for x in self.sample_index[j + 1])
        get, docs = self.indexed.get, self.document_index
        if d0 == d1:
            return get(int(docs[d0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [get(int(docs[d0]), o0)]
        parts += [get(int(docs[k])) for k in range(d0 + 1, d1)]
        parts.append(get(int(docs[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __repr__(self) -> str:
        return (f"GPTDataset({self.prefix!r}, split={self.split}, documents={self.doc_range}, "
                f"seq_length={self.seq_length}, samples={len(self)})")


def blending_indices(weights: Sequence[float], size: Optional[int],
                     limits: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: for sample ``i`` pick ``argmax_k(w_k * max(i, 1) - count_k)`` (first on ties).

    Returns ``(dataset_index int16, dataset_sample_index int64)``. With ``limits`` (samples available per
    dataset) it stops before the first pick that would exceed its dataset; ``size=None`` then means "until then".
    """
    w = [float(x) for x in weights]
    k = len(w)
    if size is None:
        if limits is None:
            raise ValueError("size=None needs limits")
        size = int(sum(limits))
    counts = [0] * k
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    n = 0
    for i in range(size):
        x = float(max(i, 1))
        best, best_err = 0, w[0] * x - counts[0]
        for j in range(1, k):
            err = w[j] * x - counts[j]
            if err > best_err:
                best, best_err = j, err
        if limits is not None and counts[best] >= limits[best]:
            break
        dataset_index[i] = best
        sample_index[i] = counts[best]
        counts[best] += 1
        n += 1
    return dataset_index[:n], sample_index[:n]


class BlendedDataset:
    """Samples drawn from several datasets in proportion to ``weights`` (see :func:`blending_indices`).

    Attributes:
        datasets, weights: the components and their normalised weights.
        samples_per_epoch: blended samples before the first component would repeat its epoch.
        from_cache: True when the blending arrays came from the cache.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray, description: Optional[dict] = None):
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        self.description = description or {}
        self.from_cache = False
        self.samples_per_epoch = int(min(d.samples_per_epoch / w for d, w in zip(self.datasets, self.weights)))

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        i = _sample_index(i, len(self))
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def __repr__(self) -> str:
        return f"BlendedDataset({len(self.datasets)} datasets, weights={self.weights}, samples={len(self)})"


def _blend(components: list[tuple[float, IndexedDataset, tuple[int, int]]], split: str, seq_length: int,
           num_samples: Optional[int], seed: int, cache_dir, is_main: bool):
    """Build the blended dataset of one split from ``(weight, indexed, doc_range)`` components."""
    total = sum(w for w, _, _ in components)
    weights = [w / total for w, _, _ in components]
    description = {"class": "BlendedDataset", "format": _INDEX_FORMAT, "split": split, "weights": weights,
                   "num_samples": num_samples, "seq_length": seq_length, "seed": seed,
                   "components": [{"prefix": str(Path(ix.prefix).resolve()), "documents": list(r),
                                   "dataset_sequences": len(ix), "data": ix.fingerprint()}
                                  for _, ix, r in components]}
    digest = _hash(description)
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir(components[0][1].prefix)
    base = f"{digest}-BlendedDataset-{split}"
    paths = {"dataset_index": folder / f"{base}-dataset_index.npy",
             "dataset_sample_index": folder / f"{base}-dataset_sample_index.npy",
             "component_samples": folder / f"{base}-component_samples.npy",
             "description": folder / f"{base}-description.json"}
    arrays = _cached(paths)
    from_cache = arrays is not None
    if arrays is None:
        if num_samples is None:
            # One pass: each component is one epoch; stop before the first one would repeat.
            parts = [GPTDataset(ix, r, seq_length, None, seed, split, cache_dir, is_main) for _, ix, r in components]
            ds_index, ds_sample = blending_indices(weights, None, limits=[len(p) for p in parts])
            component_samples = np.array([-1] * len(parts), dtype=np.int64)
        else:
            ds_index, ds_sample = blending_indices(weights, num_samples)
            used = np.bincount(ds_index, minlength=len(weights)) if len(ds_index) else np.zeros(len(weights), int)
            component_samples = np.array(
                [max(int(math.ceil(math.ceil(num_samples * w) * (1 + BLEND_SURPLUS))), int(u))
                 for w, u in zip(weights, used)], dtype=np.int64)
        arrays = {"dataset_index": ds_index, "dataset_sample_index": ds_sample, "component_samples": component_samples}
        if is_main:
            _save(paths, arrays, description)
    counts = [None if c < 0 else int(c) for c in np.asarray(arrays["component_samples"])]
    parts = [GPTDataset(ix, r, seq_length, c, seed, split, cache_dir, is_main)
             for (_, ix, r), c in zip(components, counts)]
    blended = BlendedDataset(parts, weights, arrays["dataset_index"], arrays["dataset_sample_index"], description)
    blended.from_cache = from_cache
    return blended


def build_datasets(data_prefix, splits_string, seq_length: int, num_samples=None, seed: int = 1234,
                   cache_dir: Optional[str | os.PathLike] = None, barrier: Optional[Callable[[], None]] = None,
                   is_main: bool = True, vocab_size: Optional[int] = None,
                   tokenizer_name: str = "the tokenizer") -> list:
    """Build the train, validation and test datasets.

    Args:
        data_prefix: a dataset prefix (``data/corpus_text_document``), or ``[w1, p1, w2, p2, ...]``
            (weights normalised; a single-item list is allowed).
        splits_string: train,validation,test ratios of each prefix's documents, e.g. ``'980,10,10'``.
        seq_length: tokens per sample input; each sample holds ``seq_length + 1`` tokens.
        num_samples: ``(train, valid, test)`` sample counts; ``None`` (or a ``None`` entry) is one
            epoch. A count of 0 gives no dataset for that split.
        seed: the shuffling seed (0 <= seed < 2**32).
        cache_dir: where the index arrays are cached (default ``<data dir>/cache/GPTDataset_indices``).
        barrier: called once by every rank: the main rank builds and saves the indices first, then
            calls it; the other ranks call it, then load them (building in memory if the cache is
            not visible to them).
        is_main: whether this process writes the cache.
        vocab_size: the tokenizer's vocabulary; when given, a dataset holding an id ``>= vocab_size`` is
            refused (see :func:`check_token_ids`; the largest id is cached per dataset content).
        tokenizer_name: how the error names the tokenizer, e.g. ``"model.tokenizer.model=tok"``.

    Returns:
        ``[train, valid, test]``: each a :class:`GPTDataset`, a :class:`BlendedDataset` for a blend, or
        None for a split with zero share, zero requested samples or zero documents.

    Raises:
        ConfigError: a malformed ``data_prefix``, ``splits_string``, ``seq_length``, ``num_samples`` or seed.
        DataError: a missing dataset, a split too small for one sample of ``seq_length + 1`` tokens, or a
            token id outside ``vocab_size``.
    """
    blend = parse_data_prefix(data_prefix)
    bookends = split_bookends(parse_splits(splits_string))
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
        raise ConfigError(f"seq_length={seq_length!r} must be a positive integer")
    seq_length = int(seq_length)
    counts = _parse_num_samples(num_samples)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ConfigError(f"seed={seed!r} must be an integer in [0, 2**32)")
    seed = int(seed)
    for _, prefix in blend:
        _check_prefix(prefix)
    indexed = [IndexedDataset(prefix) for _, prefix in blend]
    if vocab_size is not None:
        for ix in indexed:
            check_token_ids(ix, vocab_size, tokenizer_name, cache_dir, is_main)

    # Plan every split on every rank first (cheap), so user errors surface before any barrier.
    plans: list[Optional[list]] = []
    for split, bookend, count in zip(SPLIT_NAMES, bookends, counts):
        if bookend is None or count == 0:
            plans.append(None)
            continue
        components = []
        for (weight, prefix), ix in zip(blend, indexed):
            n = len(ix)
            begin, end = int(round(bookend[0] * float(n))), int(round(bookend[1] * float(n)))
            if end <= begin:
                continue
            tokens = int(ix.sequence_lengths[begin:end].sum(dtype=np.int64))
            if tokens == 0 or (count is None and (tokens - 1) // seq_length == 0):
                raise DataError(f"dataset {prefix}: the {split} split ({end - begin} documents, {tokens} tokens) is "
                                f"too small for one sample of seq_length + 1 = {seq_length + 1} tokens; use a "
                                f"smaller seq_length, give the split a larger share of splits_string="
                                f"{splits_string!r}, or add data")
            components.append((weight, ix, (begin, end)))
        plans.append(components or None)

    def build_all() -> list:
        out = []
        for split, components, count in zip(SPLIT_NAMES, plans, counts):
            if components is None:
                out.append(None)
            elif len(components) == 1:
                _, ix, r = components[0]
                out.append(GPTDataset(ix, r, seq_length, count, seed, split, cache_dir, is_main))
            else:
                out.append(_blend(components, split, seq_length, count, seed, cache_dir, is_main))
        return out

    if is_main:
        result = build_all()
        if barrier is not None:
            barrier()
        return result
    if barrier is not None:
        barrier()
    return build_all()


class DocumentMasks:
    """Megatron's document-aware rows (``model.data.eod_mask_loss``, ``reset_position_ids``,
    ``reset_attention_mask``) over a dataset of token rows: each item becomes a dict of (T+1,) int64 arrays
    aligned with ``tokens``, which the training objective reads (see ``CausalLMLoss``).

    * ``eod_mask_loss``: ``loss_mask`` is 0 where the input token is the end-of-document token (the first token
      of the next document is not predicted from the previous one), so the loss is the mean over the others.
    * ``reset_position_ids``: ``positions`` restart at 0 after every end-of-document token.
    * ``reset_attention_mask``: ``segment_ids`` count the end-of-document tokens before each position, so a
      token attends only to its own document (the end-of-document token belongs to the document it ends).
    """

    def __init__(self, dataset, eod_id: int, eod_mask_loss: bool = False, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False):
        self.dataset, self.eod_id = dataset, int(eod_id)
        self.eod_mask_loss, self.reset_position_ids = eod_mask_loss, reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.samples_per_epoch = getattr(dataset, "samples_per_epoch", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        tokens = np.asarray(self.dataset[i], dtype=np.int64)  # (T+1,)
        is_eod = tokens[:-1] == self.eod_id  # inputs
        row = {"tokens": tokens}
        if self.eod_mask_loss:
            row["loss_mask"] = np.concatenate([[0], ~is_eod]).astype(np.int64)  # aligned with tokens: labels 1..T
        if self.reset_attention_mask:
            before = np.concatenate([[0], np.cumsum(is_eod)])  # end-of-document tokens before each position
            row["segment_ids"] = before.astype(np.int64)
        if self.reset_position_ids:
            index = np.arange(len(tokens))
            starts = np.maximum.accumulate(np.concatenate([[0], np.where(is_eod, index[:-1] + 1, 0)]))
            row["positions"] = (index - starts).astype(np.int64)
        return row

    def __repr__(self) -> str:
        return f"DocumentMasks({self.dataset!r})"
