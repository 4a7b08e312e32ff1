"""Evaluation tasks: prompts, answer choices, preprocessing and metrics of the lm-evaluation-harness
tasks of the same name, and user tasks from a small YAML file.

A task turns a record (a dict with the Hugging Face dataset's field names) into a :class:`Doc`, and a
list of scored docs into metrics. Four kinds:

* ``multiple_choice``: one loglikelihood request per choice; ``acc`` (argmax of loglikelihood),
  ``acc_norm`` (argmax of loglikelihood / character length of the choice) where the harness has it.
* ``loglikelihood``: one (context, continuation) request; ``perplexity`` (exp(-mean loglikelihood),
  bootstrap stderr) and ``acc`` (the continuation is the greedy decode).
* ``perplexity``: rolling-window loglikelihood of a whole document; ``word_perplexity``,
  ``byte_perplexity``, ``bits_per_byte`` (no stderr, as in the harness).
* ``generation``: greedy generation; ``exact_match`` and ``f1``.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lmforge.errors import ConfigError, DataError, UserError
from lmforge.eval import metrics as M

__all__ = ["Doc", "Task", "TASKS", "ALIASES", "get_task", "known_tasks", "load_user_task", "score_task"]


class UnknownTaskError(UserError):
    """A task name that is neither built in nor a YAML file."""


@dataclass
class Doc:
    """One evaluation example, ready to score.

    ``requests`` holds (context, continuation) pairs for the loglikelihood kinds, the text for
    ``perplexity`` and the prompt for ``generation``.
    """

    requests: list = field(default_factory=list)
    gold: Any = None  # choice index (multiple choice) or list of reference strings (generation)
    choice_texts: list[str] = field(default_factory=list)  # what acc_norm's length is measured on
    words: int = 0  # perplexity: word and byte counts of the original document
    bytes: int = 0


@dataclass
class Task:
    """A task: where its data lives, what a record holds, and how a record becomes a :class:`Doc`.

    Attributes:
        name: the task's name (as in results.json).
        kind: ``multiple_choice``, ``loglikelihood``, ``perplexity`` or ``generation``.
        fields: the record fields the task reads.
        layout: an example record, shown when a data file lacks a field.
        build: record -> :class:`Doc`.
        metrics: metric names reported.
        hub: (dataset path, configuration name or None, split) on the Hugging Face Hub.
        version: the harness task's version (reported under "versions").
        data_file: a user task's own data file.
        until, max_new_tokens: generation settings.
    """

    name: str
    kind: str
    fields: tuple[str, ...]
    layout: str
    build: Callable[[dict], Doc]
    metrics: tuple[str, ...]
    hub: Optional[tuple[str, Optional[str], str]] = None
    version: str = "1.0"
    data_file: Optional[str] = None
    until: tuple[str, ...] = ("\n\n",)
    max_new_tokens: int = 256


# ------------------------------------------------------------------------------------------- built-in tasks


def _mc(context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> Doc:
    """A multiple-choice doc whose choices continue one shared context after ``delimiter``."""
    return Doc(requests=[(context, delimiter + c) for c in choices], gold=int(gold), choice_texts=list(choices))


def _lambada(r: dict) -> Doc:
    words = r["text"].split(" ")
    return Doc(requests=[(" ".join(words[:-1]), " " + words[-1])])


def _boolq(r: dict) -> Doc:
    return _mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], r["label"])


_LETTER = {"A": 0, "B": 1, "C": 2, "D": 3}


def _race(r: dict) -> Doc:
    problems = r["problems"]
    if isinstance(problems, str):
        problems = ast.literal_eval(problems)  # the dataset stores a Python literal; literal_eval runs no code
    *earlier, last = problems
    text = "Article: " + r["article"] + "\n\n"
    for p in earlier:
        answer = p["options"][_LETTER[p["answer"]]]
        if p["question"].endswith("  _  ."):  # a cloze question: fill the blank in place
            text += p["question"][:-5] + answer + "\n"
        else:
            text += "Question: " + p["question"] + "\n" + "Answer: " + answer + "\n"
    text += last["question"]
    return _mc(text, [last["options"][i] for i in range(4)], _LETTER[last["answer"]])


def _piqa(r: dict) -> Doc:
    return _mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's cleanup: WikiHow's " [title]" becomes ". ", other [bracketed] markers go, double spaces halve."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict) -> Doc:
    context = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    return _mc(context, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]))


def _winogrande(r: dict) -> Doc:
    """Partial scoring: each option fills the blank in the context; the text after the blank is scored."""
    blank = r["sentence"].index("_")
    contexts = [r["sentence"][:blank] + option for option in (r["option1"], r["option2"])]
    target = r["sentence"][blank + 1:].strip()
    return Doc(requests=[(c, " " + target) for c in contexts], gold={"1": 0, "2": 1}[str(r["answer"])],
               choice_texts=contexts)


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (" @-@ " -> "-", spaced punctuation, "= = =" headings...)."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for spaced, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                          (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(spaced, plain)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for spaced, plain in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
                          (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(spaced, plain)
    return s


def _count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def _wikitext(r: dict) -> Doc:
    # words and bytes are counted on the original page, before detokenization (as the harness does)
    return Doc(requests=[wikitext_detokenize(r["page"])], words=_count_words(r["page"]),
               bytes=len(r["page"].encode("utf-8")))


_PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")

TASKS: dict[str, Task] = {
    "lambada_openai": Task("lambada_openai", "loglikelihood", ("text",), '{"text": "... the last word"}',
                           _lambada, ("perplexity", "acc"), ("EleutherAI/lambada_openai", "default", "test")),
    "boolq": Task("boolq", "multiple_choice", ("passage", "question", "label"),
                  '{"question": "...", "passage": "...", "idx": 0, "label": 1}', _boolq, ("acc",),
                  ("aps/super_glue", "boolq", "validation"), version="2.0"),
    "race": Task("race", "multiple_choice", ("article", "problems"),
                 '{"article": "...", "problems": "[{\'answer\': \'A\', \'options\': [4 strings], \'question\': \'...\'}]"}',
                 _race, ("acc",), ("EleutherAI/race", "high", "test"), version="3.0"),
    "piqa": Task("piqa", "multiple_choice", ("goal", "sol1", "sol2", "label"),
                 '{"goal": "...", "sol1": "...", "sol2": "...", "label": 0}', _piqa, ("acc", "acc_norm"),
                 ("baber/piqa", None, "validation")),
    "hellaswag": Task("hellaswag", "multiple_choice", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                      '{"activity_label": "...", "ctx_a": "...", "ctx_b": "...", "endings": [4 strings], "label": "2"}',
                      _hellaswag, ("acc", "acc_norm"), ("Rowan/hellaswag", None, "validation")),
    "winogrande": Task("winogrande", "multiple_choice", ("sentence", "option1", "option2", "answer"),
                       '{"sentence": "... _ ...", "option1": "...", "option2": "...", "answer": "1"}', _winogrande,
                       ("acc",), ("allenai/winogrande", "winogrande_xl", "validation")),
    "wikitext2": Task("wikitext2", "perplexity", ("page",), '{"page": "a whole WikiText document"}', _wikitext,
                      _PPL_METRICS, ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"), version="2.0"),
    "wikitext103": Task("wikitext103", "perplexity", ("page",), '{"page": "a whole WikiText document"}', _wikitext,
                        _PPL_METRICS, ("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1", "test"),
                        version="2.0"),
}

ALIASES = {"lambada": "lambada_openai", "wikitext": "wikitext2", "wikitext-2": "wikitext2",
           "wikitext-103": "wikitext103"}


def known_tasks() -> list[str]:
    """Built-in task names and aliases, sorted."""
    return sorted(set(TASKS) | set(ALIASES))


def get_task(name: str) -> Task:
    """The built-in task ``name`` (or alias), or a user task from a ``.yaml`` file."""
    if name.endswith((".yaml", ".yml")):
        return load_user_task(name)
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())} "
                               f"(or a user task's .yaml file)")
    return TASKS[key]


# ------------------------------------------------------------------------------------------------ user tasks

_USER_KINDS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "perplexity": _PPL_METRICS,
    "generation": ("exact_match", "f1"),
}
_USER_KEYS = {"name", "kind", "data", "context", "continuation", "choices", "answer", "target_delimiter", "text",
              "target", "until", "max_new_tokens"}


def _fill(template: str, record: dict, source: str) -> str:
    """``template`` with ``{field}`` replaced by the record's values."""
    try:
        return template.format(**record)
    except KeyError as e:
        raise DataError(f"{source}: the template {template!r} names the field {e.args[0]!r}, which a record lacks "
                        f"(it has {sorted(record)})") from None


def load_user_task(path: str | Path) -> Task:
    """A task from a small YAML file over the user's JSONL.

    Keys: ``name``; ``kind`` (multiple_choice, loglikelihood, perplexity, generation); ``data`` (a JSONL,
    Parquet or saved-dataset path, relative to the YAML file). Per kind, templates use ``{field}``:

    * multiple_choice: ``context`` template, ``choices`` (the field holding a list of strings),
      ``answer`` (the field holding the right choice's index or text), ``target_delimiter`` (default " ").
    * loglikelihood: ``context`` and ``continuation`` templates.
    * perplexity: ``text`` template.
    * generation: ``context`` template, ``target`` (the field holding a string or list of strings),
      ``until`` (stop strings, default ["\\n\\n"]), ``max_new_tokens`` (default 256).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"user task file {path} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with keys name, kind, data, ...")
    unknown = set(spec) - _USER_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_USER_KEYS)}")
    kind = spec.get("kind")
    if kind not in _USER_KINDS:
        raise ConfigError(f"{path}: kind must be one of {sorted(_USER_KINDS)}, got {kind!r}")
    needed = {"multiple_choice": ("context", "choices", "answer"), "loglikelihood": ("context", "continuation"),
              "perplexity": ("text",), "generation": ("context", "target")}[kind]
    missing = [k for k in ("name", "data", *needed) if k not in spec]
    if missing:
        raise ConfigError(f"{path}: a {kind} task needs the keys {missing}")
    src = str(path)
    data = Path(spec["data"])
    data = data if data.is_absolute() else path.parent / data
    delim = spec.get("target_delimiter", " ")

    def build(r: dict) -> Doc:
        if kind == "multiple_choice":
            choices = r[spec["choices"]]
            answer = r[spec["answer"]]
            gold = choices.index(answer) if isinstance(answer, str) else int(answer)
            return _mc(_fill(spec["context"], r, src), choices, gold, delim)
        if kind == "loglikelihood":
            return Doc(requests=[(_fill(spec["context"], r, src), _fill(spec["continuation"], r, src))])
        if kind == "perplexity":
            text = _fill(spec["text"], r, src)
            return Doc(requests=[text], words=_count_words(text), bytes=len(text.encode("utf-8")))
        target = r[spec["target"]]
        return Doc(requests=[_fill(spec["context"], r, src)], gold=[target] if isinstance(target, str) else list(target))

    fields = tuple(f for f in (spec.get("choices"), spec.get("answer"), spec.get("target")) if f)
    fields += tuple(re.findall(r"{(\w+)}", " ".join(str(spec.get(k, "")) for k in ("context", "continuation", "text"))))
    return Task(spec["name"], kind, tuple(dict.fromkeys(fields)), f"fields {list(dict.fromkeys(fields))}", build,
                _USER_KINDS[kind], None, "user", str(data), tuple(spec.get("until", ["\n\n"])),
                int(spec.get("max_new_tokens", 256)))


# --------------------------------------------------------------------------------------------------- scoring


def score_task(task: Task, docs: Sequence[Doc], scorer, bootstrap_iters: int = 100000) -> dict[str, Optional[float]]:
    """Run ``task``'s requests for ``docs`` on ``scorer`` and return ``{metric: value, metric_stderr: value}``.

    A standard error the harness does not compute (word/byte perplexity, bits per byte) is None.
    """
    out: dict[str, Optional[float]] = {}
    if task.kind in ("multiple_choice", "loglikelihood"):
        flat = [req for d in docs for req in d.requests]
        results = iter(scorer.loglikelihood(flat))
        per_doc = [[next(results) for _ in d.requests] for d in docs]
        if task.kind == "loglikelihood":
            lls = [r[0][0] for r in per_doc]
            greedy = [float(r[0][1]) for r in per_doc]
            if "perplexity" in task.metrics:
                out["perplexity"] = M.perplexity(lls)
                out["perplexity_stderr"] = _nan_to_none(M.perplexity_stderr(lls, bootstrap_iters))
            if "acc" in task.metrics:
                out["acc"], out["acc_stderr"] = M.mean(greedy), _nan_to_none(M.mean_stderr(greedy))
            return out
        acc, acc_norm = [], []
        for d, res in zip(docs, per_doc):
            lls = [r[0] for r in res]
            acc.append(float(_argmax(lls) == d.gold))
            acc_norm.append(float(_argmax([ll / len(c) for ll, c in zip(lls, d.choice_texts)]) == d.gold))
        out["acc"], out["acc_stderr"] = M.mean(acc), _nan_to_none(M.mean_stderr(acc))
        if "acc_norm" in task.metrics:
            out["acc_norm"], out["acc_norm_stderr"] = M.mean(acc_norm), _nan_to_none(M.mean_stderr(acc_norm))
        return out
    if task.kind == "perplexity":
        lls = scorer.loglikelihood_rolling([d.requests[0] for d in docs])
        words = [(ll, d.words) for ll, d in zip(lls, docs)]
        nbytes = [(ll, d.bytes) for ll, d in zip(lls, docs)]
        out["word_perplexity"], out["word_perplexity_stderr"] = M.weighted_perplexity(words), None
        out["byte_perplexity"], out["byte_perplexity_stderr"] = M.weighted_perplexity(nbytes), None
        out["bits_per_byte"], out["bits_per_byte_stderr"] = M.bits_per_byte(nbytes), None
        return out
    if task.kind == "generation":
        preds = scorer.generate_until([d.requests[0] for d in docs], task.until, task.max_new_tokens)
        em = [M.exact_match(p, d.gold) for p, d in zip(preds, docs)]
        f1 = [M.token_f1(p, d.gold) for p, d in zip(preds, docs)]
        out["exact_match"], out["exact_match_stderr"] = M.mean(em), _nan_to_none(M.mean_stderr(em))
        out["f1"], out["f1_stderr"] = M.mean(f1), _nan_to_none(M.mean_stderr(f1))
        return out
    raise ValueError(f"unknown task kind {task.kind!r}")


def _argmax(xs: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _nan_to_none(x: float) -> Optional[float]:
    return None if x is None or math.isnan(x) else x
