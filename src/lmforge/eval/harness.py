"""An lm-evaluation-harness model backed by lmforge: ``lm_eval --model lmforge --model_args pretrained=PATH``.

Importing this module registers :class:`LmforgeLM` under the name ``lmforge`` in lm_eval's model
registry. lm_eval (0.4.x) does not import plugins by itself, so run it through this module, which
registers the model and then hands the command line to lm_eval's own CLI::

    python -m lmforge.eval.harness --model lmforge --model_args pretrained=CKPT,batch_size=16 --tasks arc_easy

or, from Python, ``import lmforge.eval.harness`` before ``lm_eval.simple_evaluate(model="lmforge", ...)``.

model_args: ``pretrained`` (an lmforge checkpoint or results folder), ``device`` (default auto),
``dtype`` (auto/float32/bfloat16/float16), ``batch_size`` (int or auto), ``max_length`` (default: the
model's ``max_position_embeddings``), ``adapter`` (a fine-tuned adapter folder: LoRA/IA3 merged,
bottleneck adapters unmerged, as ``lmforge evaluate --adapter``). Token-level scoring is :class:`lmforge.eval.scorer.Scorer`.

``lmforge evaluate --tasks NAME`` runs any task lm_eval knows that is not built into lmforge through this
adapter: :func:`harness_task_names` tells which names lm_eval knows, :func:`load_harness_tasks` builds the
tasks (and reads their datasets) before the model loads, :func:`evaluate_harness` scores them on a model in
memory and returns lmforge's results layout.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lm_eval.models  # noqa: F401  (lm_eval's own models first: registering ours earlier would hide them)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from lmforge.errors import ConfigError, DataError
from lmforge.eval.scorer import Scorer

__all__ = ["LmforgeLM", "main", "harness_task_names", "load_harness_tasks", "evaluate_harness"]


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """lm_eval's ``LM`` interface over an lmforge model (loglikelihood, rolling loglikelihood, generation)."""

    def __init__(self, pretrained: str, device: str = "auto", dtype: str = "auto",
                 batch_size: Union[int, str] = 16, max_length: Optional[int] = None,
                 adapter: Optional[str] = None, **kwargs):
        super().__init__()
        from lmforge.open import load_for_inference

        model, tokenizer = load_for_inference(pretrained, device=device, dtype=dtype, allow_ptuning=True)
        if adapter:
            from lmforge.eval.evaluate import with_adapter

            model = with_adapter(model, adapter)
        self._setup(model, tokenizer, max_length, batch_size)

    def _setup(self, model, tokenizer, max_length: Optional[int], batch_size: Union[int, str],
               tensor_parallel=None) -> None:
        from lmforge.eval.evaluate import context_length

        self.model = model
        self.tokenizer = tokenizer
        batch_size = batch_size if str(batch_size) == "auto" else int(batch_size)
        self._max_length = int(max_length or context_length(model))
        self.scorer = Scorer(model, tokenizer, self._max_length, batch_size=batch_size, tensor_parallel=tensor_parallel)

    @classmethod
    def from_model(cls, model, tokenizer, max_length: Optional[int] = None,
                   batch_size: Union[int, str] = 16, tensor_parallel=None) -> "LmforgeLM":
        """The adapter over a model already in memory (what ``lmforge evaluate`` scores harness tasks with);
        ``tensor_parallel``: a rank's context when ``model`` is its share (:class:`~lmforge.eval.scorer.Scorer`)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(model, tokenizer, max_length, batch_size, tensor_parallel)
        return lm

    @property
    def eot_token_id(self) -> int:
        """End-of-text id (the tokenizer's end-of-document token)."""
        return self.tokenizer.eod_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS, else EOS."""
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        """The model's context length."""
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Token ids; ``add_special_tokens=False`` drops what the tokenizer's post-processor would add."""
        if add_special_tokens is False:
            return self.scorer._encode_plain(string)
        return self.scorer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``[((context, continuation), context_ids, continuation_ids), ...]`` -> ``[(loglikelihood, is_greedy)]``."""
        return self.scorer.loglikelihood_tokens([(list(c), list(x)) for _, c, x in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document loglikelihoods in rolling windows of ``max_length`` tokens."""
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation up to the request's ``until`` strings and ``max_gen_toks``. Requests with the same
        ``until`` and ``max_gen_toks`` (a task's) go to the scorer together, so the serving engine batches them
        and shares their few-shot prefix (:meth:`lmforge.eval.scorer.Scorer.generate_until`)."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, req in enumerate(requests):
            gen_kwargs = dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            groups.setdefault((tuple(until), int(gen_kwargs.get("max_gen_toks", 256))), []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new), members in groups.items():
            texts = self.scorer.generate_until([requests[i].args[0] for i in members], list(until), max_new)
            for i, text in zip(members, texts):
                out[i] = text
        return out


# ---------------------------------------------------------------------- harness tasks in `lmforge evaluate`


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: Optional[str], defaults: bool):
    """lm_eval's task index (its own tasks: ~15k YAML files, seconds to read; built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _manager_for(names: Sequence[str], include_path: Optional[str]):
    """The smallest index that knows ``names``: the --include-path folder alone when it has them all."""
    if include_path:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path} is not a folder; give the folder holding your lm_eval "
                              f"task YAML files")
        include_path = str(Path(include_path).resolve())  # the cache key: the folder, whatever the working dir
        only = _task_manager(include_path, False)
        if set(names) <= set(only.all_tasks):
            return only
    return _task_manager(include_path or None, True)


def close_matches(name: str, known: Sequence[str], n: int = 5) -> list[str]:
    """The ``n`` names of ``known`` closest to ``name`` (difflib's ratio, 0.6 and above)."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.6)


def harness_task_names(names: Sequence[str], include_path: Optional[str] = None,
                       builtin: Sequence[str] = ()) -> list[str]:
    """``names`` checked against the tasks, groups and tags lm_eval knows (its own and ``include_path``'s).

    Raises:
        UnknownTaskError: a name neither lmforge (``builtin``) nor lm_eval knows, with the closest names.
    """
    from lmforge.eval.tasks import UnknownTaskError

    known = set(_manager_for(names, include_path).all_tasks)
    for name in names:
        if name not in known:
            near = close_matches(name, sorted(set(builtin) | known))
            hint = (f"did you mean {', '.join(near)}?" if near else
                    f"none is close; built in: {', '.join(builtin)}; `lm_eval ls tasks` lists the harness's")
            raise UnknownTaskError(f"unknown task {name!r}: neither built in nor an lm-evaluation-harness task "
                                   f"({hint}); a task of your own: a .yaml file, or lm_eval YAML files in a folder "
                                   f"given as --include-path")
    return list(names)


@contextlib.contextmanager
def _datasets_settings(cache: Optional[Path], offline: bool):
    """The datasets library's cache folder and offline switch for the duration (both read at call time)."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    saved = (dc.HF_DATASETS_CACHE, dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE, hc.HF_HUB_OFFLINE)
    try:
        if cache is not None:
            dc.HF_DATASETS_CACHE = cache
        if offline:
            dc.HF_HUB_OFFLINE = dc.HF_DATASETS_OFFLINE = hc.HF_HUB_OFFLINE = True
        yield
    finally:
        dc.HF_DATASETS_CACHE, dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE, hc.HF_HUB_OFFLINE = saved


@dataclass
class HarnessTasks:
    """lm_eval tasks built (datasets read) and the index that built them (lm_eval's evaluation reuses it)."""

    manager: Any
    tasks: list  # lm_eval Task and Group objects, in the order named


def load_harness_tasks(names: Sequence[str], include_path: Optional[str] = None,
                       cache_dir: Optional[str] = None) -> HarnessTasks:
    """lm_eval's Task and Group objects of ``names``, their datasets read (``CACHE/hub`` is the datasets cache).

    Where the Hub cannot be reached (:func:`lmforge.eval.data.hub_unreachable`) the datasets library runs
    offline, so a dataset neither local nor cached fails at once, with the ``lmforge prefetch`` command.
    """
    from lmforge.eval.data import HubUnreachableError, default_cache_dir, hub_unreachable

    manager = _manager_for(names, include_path)
    reason = hub_unreachable()
    cache = Path(cache_dir) if cache_dir is not None else None
    built = []
    with _datasets_settings(None if cache is None else cache / "hub", offline=reason is not None):
        for name in names:
            try:
                loaded = manager.load([name])
            except Exception as e:  # noqa: BLE001 - a dataset the library cannot read: one line, not its traceback
                detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if reason is not None:
                    where = cache or default_cache_dir()
                    inc = f" --include-path {include_path}" if include_path else ""
                    raise HubUnreachableError(
                        f"task {name} (lm-evaluation-harness) could not read its dataset here ({detail}) and the "
                        f"Hugging Face Hub cannot be reached ({reason}): on a machine with a network run `lmforge "
                        f"prefetch --tasks {name}{inc} --cache {where}`, then evaluate with --cache {where}") from None
                raise DataError(f"task {name} (lm-evaluation-harness) could not be loaded ({detail})") from None
            if name in loaded["groups"]:
                built.append(loaded["groups"][name])  # a group: lm_eval aggregates its tasks under its name
            else:
                built.extend(loaded["tasks"].values())  # a task, or a tag's tasks
    return HarnessTasks(manager, built)


def _our_metrics(theirs: dict) -> dict:
    """lm_eval's ``{"acc,none": v, "acc_stderr,none": s, "alias": ...}`` as lmforge's ``{"acc": v, "acc_stderr": s}``
    (a filter other than ``none`` joins the name: ``exact_match_strict-match``; "N/A" becomes None)."""
    out = {}
    for key, value in theirs.items():
        metric, sep, filt = key.partition(",")
        if not sep:
            continue  # alias, sample counts
        stderr = metric.endswith("_stderr")
        base = metric[:-len("_stderr")] if stderr else metric
        name = base if filt == "none" else f"{base}_{filt}"
        out[name + ("_stderr" if stderr else "")] = None if value == "N/A" else value
    return out


def evaluate_harness(model, tokenizer, tasks: HarnessTasks, max_length: int, limit: Optional[int] = None,
                     batch_size: Union[int, str] = 16, bootstrap_iters: int = 100000,
                     engine_from: Optional[Scorer] = None, tensor_parallel=None) -> dict:
    """Score lm_eval tasks (from :func:`load_harness_tasks`) on an in-memory model through :class:`LmforgeLM`.
    ``engine_from``: a scorer of the same model whose serving engine generation reuses (``lmforge evaluate``'s).

    Returns ``{"results": {task: {metric: value, metric_stderr: value}}, "n_samples", "versions"}`` for the tasks
    and their groups. Every process scores every request (no data parallelism on this path); under tensor
    parallelism (``tensor_parallel``: the rank's context) that is what keeps the ranks' forwards paired, and lm_eval
    reports on the process with ``LOCAL_RANK`` 0 only (rank 0).
    """
    from lm_eval import simple_evaluate

    lm = LmforgeLM.from_model(model, tokenizer, max_length, batch_size, tensor_parallel)
    if engine_from is not None:
        lm.scorer.start_task(engine_from)
    out = simple_evaluate(model=lm, tasks=tasks.tasks, task_manager=tasks.manager, limit=limit,
                          bootstrap_iters=bootstrap_iters, log_samples=False)
    if out is None:  # lm_eval reports on the first process of a node only (LOCAL_RANK 0); rank 0 writes
        return {"results": {}, "n_samples": {}, "versions": {}}
    results = {name: _our_metrics(m) for name, m in out["results"].items()}
    n_samples = {name: int(n.get("effective", n.get("original", 0))) for name, n in out.get("n-samples", {}).items()}
    versions = {name: str(v) for name, v in out.get("versions", {}).items()}
    return {"results": results, "n_samples": n_samples, "versions": versions}


def main() -> None:
    """lm_eval's command line, with the ``lmforge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
