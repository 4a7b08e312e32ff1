"""Aggregations and standard errors, computed as lm-evaluation-harness computes them.

* ``mean`` with the standard error of the mean (sample standard deviation / sqrt(n)).
* ``perplexity`` = exp(-mean loglikelihood), its standard error from a bootstrap: ``iters`` resamples
  (with replacement) in chunks of at most 1000, chunk ``i`` drawn by Python's ``random.Random(i)``.
  The draws are reproduced exactly with numpy's Mersenne Twister set to that generator's state, so
  the figure matches the harness's to the last digits at a fraction of the time.
* ``weighted_perplexity`` and ``bits_per_byte`` over (loglikelihood, count) pairs; no standard error.
* ``exact_match`` and token ``f1`` for generation tasks.
"""

from __future__ import annotations

import collections
import math
import random
import re
import string
from typing import Sequence

import numpy as np

__all__ = ["mean", "mean_stderr", "sample_stddev", "perplexity", "perplexity_stderr", "weighted_perplexity",
           "bits_per_byte", "exact_match", "token_f1"]


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean."""
    return sum(xs) / len(xs)


def sample_stddev(xs: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (n - 1); NaN for fewer than two values."""
    if len(xs) < 2:
        return float("nan")
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def mean_stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean."""
    return sample_stddev(xs) / math.sqrt(len(xs))


def perplexity(lls: Sequence[float]) -> float:
    """exp(-mean loglikelihood) over documents (lambada's perplexity)."""
    return math.exp(-mean(lls))


def _python_random_as_numpy(seed: int) -> np.random.RandomState:
    """A numpy generator whose ``random_sample`` yields exactly what ``random.Random(seed).random()`` yields."""
    state = random.Random(seed).getstate()[1]  # 624 words of Mersenne Twister state, then the position
    rs = np.random.RandomState()
    rs.set_state(("MT19937", np.array(state[:624], dtype=np.uint32), state[624], 0, 0.0))
    return rs


def perplexity_stderr(lls: Sequence[float], iters: int = 100000) -> float:
    """Bootstrap standard error of :func:`perplexity` (see the module doc); NaN when ``iters`` < 1."""
    if iters < 1 or not lls:
        return float("nan")
    xs = np.asarray(lls, dtype=np.float64)
    n = len(xs)
    chunk = min(1000, iters)
    values: list[float] = []
    for i in range(iters // chunk):
        u = _python_random_as_numpy(i).random_sample(chunk * n)
        idx = np.floor(u * float(n)).astype(np.int64).reshape(chunk, n)
        values.extend(np.exp(-xs[idx].mean(axis=1)).tolist())
    return sample_stddev(values)


def weighted_perplexity(pairs: Sequence[tuple[float, float]]) -> float:
    """exp(-sum loglikelihood / sum count): word or byte perplexity."""
    return math.exp(-sum(p[0] for p in pairs) / sum(p[1] for p in pairs))


def bits_per_byte(pairs: Sequence[tuple[float, float]]) -> float:
    """-sum loglikelihood / sum bytes / ln 2."""
    return -sum(p[0] for p in pairs) / sum(p[1] for p in pairs) / math.log(2)


def _normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, squeeze whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals any reference character for character, else 0.0.

    lm-evaluation-harness's ``exact_match`` at its defaults (no ``ignore_case``, ``ignore_punctuation`` or
    ``regexes_to_ignore``, the ``none`` filter): neither side is stripped, so a leading space the model writes
    after "Answer:" counts, as in the harness (put it in the prompt or the target).
    """
    return float(any(prediction == r for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best SQuAD-style token F1 of the prediction against the references."""
    best = 0.0
    pred = _normalize_answer(prediction).split()
    for ref in references:
        gold = _normalize_answer(ref).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if not pred and not gold:
            best = max(best, 1.0)
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
