"""The evaluate stage: a model and task names in, results.json out.

``run(...)`` is what ``lmforge evaluate`` calls; :func:`evaluate_model` is the same on a model already
in memory (any causal LM returning logits, with its tokenizer).

Under torchrun (``WORLD_SIZE > 1``) :func:`run` evaluates data parallel: every rank loads the model,
scores its share of the batches (:class:`~lmforge.eval.scorer.Scorer`), the results are gathered and
rank 0 writes results.json; the numbers equal those of one process.

With ``tensor_parallel_size`` N > 1 :func:`run` starts N processes itself
(:func:`lmforge.serve.tensor_parallel.launch`, as ``lmforge serve -tp N``), each holding its share of the
model (:func:`~lmforge.serve.tensor_parallel.load_sharded`); every rank runs every request (the scorer's
tensor-parallel mode), rank 0 hands the results document back and :func:`run` writes it. The two cannot be
combined (``-tp`` under torchrun is refused).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from lmforge import __version__
from lmforge.errors import DataError, UserError
from lmforge.eval.data import check_hub_access, load_task_records, parse_task_data, resolve_tasks
from lmforge.eval.scorer import Scorer
from lmforge.eval.tasks import score_task

__all__ = ["run", "evaluate_model", "parse_task_data", "compare", "results_table", "with_adapter"]


class AdapterError(UserError):
    """An adapter folder that evaluation cannot use."""


def with_adapter(model, adapter_dir):
    """``model`` with the fine-tuned adapter in ``adapter_dir`` applied (:func:`lmforge.peft.adapter_for_inference`;
    a p-tuning adapter gives a :class:`~lmforge.peft.PromptTunedModel`, scored with full forwards)."""
    from lmforge.peft import adapter_for_inference

    return adapter_for_inference(model, adapter_dir, use="evaluation", allow_ptuning=True)


def context_length(model) -> int:
    """Tokens a request may use: the model's positions, less a p-tuned model's virtual tokens."""
    return int(model.cfg.max_position_embeddings) - int(getattr(model, "num_virtual_tokens", 0))


def evaluate_model(model, tokenizer, tasks: Sequence[str], max_length: int,
                   task_data: Optional[Mapping[str, str]] = None, limit: Optional[int] = None,
                   batch_size: Union[int, str] = 16, bootstrap_iters: int = 100000,
                   cache_dir: Optional[str] = None, progress: bool = False, rank: int = 0,
                   world_size: int = 1, include_path: Optional[str] = None, harness_tasks: Optional[list] = None,
                   tensor_parallel=None) -> dict:
    """Score ``tasks`` on an in-memory model; returns ``{"results": ..., "n_samples": ..., "truncated": ...}``.

    Built-in and user .yaml tasks run on lmforge's scorer; any other name lm-evaluation-harness knows
    (``include_path``: a folder of lm_eval task YAML files) runs through lm_eval with the ``lmforge`` model
    (:mod:`lmforge.eval.harness`), its results merged into the same document. ``harness_tasks``: those tasks
    already built by :func:`~lmforge.eval.harness.load_harness_tasks`.

    ``rank``/``world_size``: data parallel (torch.distributed initialized); every rank returns the results.
    ``tensor_parallel``: the :class:`~lmforge.serve.tensor_parallel.RankContext` of a rank whose ``model`` is its
    share of a tensor-parallel model (every rank runs this with the same arguments; see :class:`Scorer`).
    """
    resolved, task_data, harness = resolve_tasks(tasks, task_data, include_path)  # unknown names fail first
    results, n_samples, truncated, versions = {}, {}, {}, {}
    # one scorer, so one serving engine for the generation tasks of the whole run (each task starts afresh)
    scorer = Scorer(model, tokenizer, max_length, batch_size=batch_size, progress=progress and rank == 0,
                    rank=rank, world_size=world_size, tensor_parallel=tensor_parallel)
    for task in resolved:
        records = load_task_records(task, task_data.get(task.name), limit, cache_dir)
        docs = []
        for n, r in enumerate(records, 1):
            try:
                docs.append(task.build(r))
            except (KeyError, IndexError, ValueError, TypeError, SyntaxError) as e:
                raise DataError(f"task {task.name}: record {n} does not fit the expected layout {task.layout} "
                                f"({type(e).__name__}: {e})") from None
        scorer.start_task()
        results[task.name] = score_task(task, docs, scorer, bootstrap_iters)
        n_samples[task.name] = len(docs)
        truncated[task.name] = scorer.truncated
        versions[task.name] = task.version
    if harness:
        from lmforge.eval.harness import evaluate_harness, load_harness_tasks

        built = harness_tasks if harness_tasks is not None else load_harness_tasks(harness, include_path, cache_dir)
        theirs = evaluate_harness(model, tokenizer, built, max_length, limit, batch_size, bootstrap_iters,
                                  engine_from=scorer, tensor_parallel=tensor_parallel)
        results.update(theirs["results"])
        n_samples.update(theirs["n_samples"])
        versions.update(theirs["versions"])
    return {"results": results, "n_samples": n_samples, "truncated": truncated, "versions": versions}


def run(model: str, tasks: Sequence[str], task_data: Optional[Mapping[str, str]] = None, limit: Optional[int] = None,
        batch_size: Union[int, str] = 16, device: str = "auto", dtype: str = "auto",
        output: Optional[str] = None, bootstrap_iters: int = 100000, cache_dir: Optional[str] = None,
        progress: bool = True, adapter: Optional[str] = None, include_path: Optional[str] = None,
        tensor_parallel_size: int = 1) -> dict:
    """Evaluate the model at ``model`` (a checkpoint folder or a run's results folder) on ``tasks``.

    ``adapter``: a fine-tuned adapter folder applied on top (see :func:`with_adapter`). ``include_path``: a
    folder of lm_eval task YAML files (tasks named in ``tasks``). Under torchrun the built-in tasks are
    evaluated data parallel and only rank 0 writes ``output``. ``tensor_parallel_size`` N > 1: the model is
    split over N processes this call starts (see the module's docstring); the results equal one process's.

    Returns the results document ``{"results": {task: {metric: value, metric_stderr: value}}, "config",
    "versions", "model"}``, also written to ``output`` (atomically) when given.
    """
    from lmforge.open import load_for_inference
    from lmforge.parallel.runtime import init_runtime, shutdown

    # an unknown task, a missing adapter, or data on an unreachable Hub fail before the model loads
    builtin, by_name, harness = resolve_tasks(tasks, task_data, include_path)
    if adapter is not None and not Path(adapter).is_dir():
        raise AdapterError(f"--adapter {adapter} is not a folder; give the folder holding adapter_config.json")
    check_hub_access(builtin, by_name, cache_dir, also=harness)
    if tensor_parallel_size != 1:
        return _run_tensor_parallel(tensor_parallel_size, device, output, dict(
            model=str(model), tasks=list(tasks), task_data=dict(task_data or {}), limit=limit, batch_size=batch_size,
            dtype=dtype, bootstrap_iters=bootstrap_iters, cache_dir=cache_dir, progress=progress,
            adapter=None if adapter is None else str(adapter), include_path=include_path))
    built = None
    if harness:  # lm_eval's tasks read their datasets when built: before the model loads, offline-safe
        from lmforge.eval.harness import load_harness_tasks

        built = load_harness_tasks(harness, include_path, cache_dir)
    runtime = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if str(device) not in ("auto", "cpu", "cuda", "gpu"):
            raise UserError(f"--device {device} cannot be used under torchrun; use auto, cuda or cpu "
                            f"(each rank takes the GPU of its LOCAL_RANK)")
        runtime = init_runtime(str(device))
        device = runtime.device
    try:
        lm, tokenizer = load_for_inference(model, device=device, dtype=dtype, allow_ptuning=True)
        if adapter is not None:
            lm = with_adapter(lm, adapter)
        max_length = context_length(lm)
        rank, world = (runtime.rank, runtime.world_size) if runtime else (0, 1)
        out = evaluate_model(lm, tokenizer, tasks, max_length, task_data, limit, batch_size, bootstrap_iters,
                             cache_dir, progress, rank=rank, world_size=world, include_path=include_path,
                             harness_tasks=built)
    finally:
        if runtime is not None:
            shutdown(runtime)
    doc = _document(out, lm, max_length, dict(
        model=str(model), tasks=list(tasks), task_data=dict(task_data or {}), limit=limit, batch_size=batch_size,
        bootstrap_iters=bootstrap_iters, adapter=None if adapter is None else str(adapter),
        include_path=include_path), world_size=world, tensor_parallel_size=1)
    if output and rank == 0:
        from lmforge.io import write_json_atomic

        write_json_atomic(output, doc)
    return doc


def _document(out: dict, lm, max_length: int, spec: dict, world_size: int, tensor_parallel_size: int) -> dict:
    """The results document of :func:`run` (``out``: :func:`evaluate_model`'s; ``lm``: the model, or rank 0's
    share of it)."""
    return {
        "results": out["results"],
        "config": {"model": spec["model"], "adapter": spec["adapter"], "tasks": spec["tasks"],
                   "task_data": spec["task_data"], "include_path": spec["include_path"], "limit": spec["limit"],
                   "batch_size": spec["batch_size"], "device": str(next(lm.parameters()).device),
                   "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""), "max_length": max_length,
                   "bootstrap_iters": spec["bootstrap_iters"], "world_size": world_size,
                   "tensor_parallel_size": tensor_parallel_size, "n_samples": out["n_samples"],
                   "truncated_requests": out["truncated"],
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "versions": {**out["versions"], "lmforge": __version__},
        "model": spec["model"],
    }


def _run_tensor_parallel(tp: int, device: str, output: Optional[str], spec: dict) -> dict:
    """:func:`run` with the model split over ``tp`` processes: checked here first (one ``error:`` line: flags,
    GPUs, adapters and model kinds the split does not support), then :func:`_evaluate_rank` on each; rank 0's
    document comes back through a file in a temporary folder and is written to ``output`` here."""
    from lmforge.serve.tensor_parallel import check_adapters, check_flags, check_model, launch, model_config

    check_flags(tp, str(device), {"--batch-size auto": spec["batch_size"] == "auto"}, command="evaluate")
    check_adapters(spec["model"], spec["adapter"], command="evaluate")
    check_model(model_config(spec["model"]), tp, command="evaluate")
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-tp-") as folder:
        result = Path(folder) / "results.json"
        launch(tp, str(device), _evaluate_rank, spec, str(result))
        doc = json.loads(result.read_text(encoding="utf-8"))
    if output:
        from lmforge.io import write_json_atomic

        write_json_atomic(output, doc)
    return doc


def _evaluate_rank(ctx, spec: dict, result: str) -> None:
    """One rank of ``evaluate --tensor-parallel-size``: its share of the model, every task (the same requests as
    every other rank); rank 0 writes the results document to ``result``."""
    from lmforge.io import write_json_atomic
    from lmforge.serve.tensor_parallel import load_sharded

    lm, tokenizer = load_sharded(ctx, spec["model"], spec["dtype"], spec["adapter"], command="evaluate")
    max_length = context_length(lm)
    _, _, harness = resolve_tasks(spec["tasks"], spec["task_data"], spec["include_path"])
    built = None
    if harness:  # every rank builds lm_eval's tasks itself (they are not sent between processes)
        from lmforge.eval.harness import load_harness_tasks

        built = load_harness_tasks(harness, spec["include_path"], spec["cache_dir"])
    out = evaluate_model(lm, tokenizer, spec["tasks"], max_length, spec["task_data"], spec["limit"],
                         spec["batch_size"], spec["bootstrap_iters"], spec["cache_dir"],
                         spec["progress"] and ctx.rank == 0, include_path=spec["include_path"], harness_tasks=built,
                         tensor_parallel=ctx)
    if ctx.rank == 0:
        write_json_atomic(result, _document(out, lm, max_length, spec, world_size=1, tensor_parallel_size=ctx.tp))


def _fmt(value) -> str:
    return "N/A" if value is None else f"{value:.4f}"


def results_table(doc: dict, title: Optional[str] = None):
    """A rich Table of one results document: task, metric, value, stderr."""
    from rich.table import Table

    table = Table(title=title or doc.get("model"))
    for col in ("task", "metric", "value", "± stderr"):
        table.add_column(col, justify="right" if col in ("value", "± stderr") else "left")
    for task, metrics in doc["results"].items():
        for name, value in metrics.items():
            if not name.endswith("_stderr"):
                table.add_row(task, name, _fmt(value), _fmt(metrics.get(f"{name}_stderr")))
    return table


def compare(paths: Sequence[str]):
    """A rich Table of several results.json files side by side (one column per file)."""
    from rich.table import Table

    if len(paths) < 1:
        raise UserError("evaluate compare needs at least one results.json")
    docs = []
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{p} does not exist") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{p} is not JSON ({e.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
            raise DataError(f"{p} has no \"results\" mapping; give results.json files written by lmforge evaluate "
                            f"or lm_eval")
        docs.append(doc)
    table = Table(title="comparison")
    table.add_column("task")
    table.add_column("metric")
    for p in paths:
        table.add_column(os.path.basename(os.path.dirname(os.path.abspath(p))) + "/" + os.path.basename(p),
                         justify="right")
    rows: dict[tuple[str, str], None] = {}
    for doc in docs:
        for task, metrics in doc["results"].items():
            for name in metrics:
                if not name.endswith("_stderr") and "stderr" not in name and isinstance(metrics[name], (int, float)):
                    rows[(task, name.split(",")[0])] = None
    for task, name in rows:
        cells = []
        for doc in docs:
            m = doc["results"].get(task, {})
            value = m.get(name, m.get(f"{name},none"))
            err = m.get(f"{name}_stderr", m.get(f"{name}_stderr,none"))
            cells.append("" if value is None else
                         _fmt(value) + ("" if not isinstance(err, (int, float)) else f" ± {err:.4f}"))
        table.add_row(task, name, *cells)
    return table
