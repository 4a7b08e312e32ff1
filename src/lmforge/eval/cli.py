"""``lmforge evaluate`` (and ``evaluate compare``) and ``lmforge prefetch``."""

from __future__ import annotations

import json
import os

from lmforge.errors import UserError


def add_commands(sub) -> None:
    """Register ``evaluate`` and ``prefetch`` on the CLI's subparsers."""
    p = sub.add_parser("evaluate", help="score a model on benchmark tasks as lm-evaluation-harness does; "
                                        "`evaluate compare a.json b.json` shows runs side by side")
    p.add_argument("model", nargs="+", metavar="MODEL",
                   help="a checkpoint or results folder; or `compare RESULTS.json ...`")
    p.add_argument("--tasks", default=None,
                   help="comma-separated: lambada,boolq,race,piqa,hellaswag,winogrande,wikitext2,wikitext103 "
                        "(built in), user task .yaml files, or any lm-evaluation-harness task (mmlu, arc_easy, ...)")
    p.add_argument("--include-path", "--include_path", dest="include_path", default=None, metavar="DIR",
                   help="a folder of lm-evaluation-harness task YAML files whose tasks --tasks may name "
                        "(lm_eval's --include_path)")
    p.add_argument("--task-data", action="append", default=[], metavar="TASK=PATH",
                   help="local records for a task (JSONL, Parquet or a datasets save_to_disk folder) with the "
                        "Hugging Face dataset's field names; repeatable")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument("--batch-size", default="16",
                   help="an integer or 'auto' (default 16): requests per forward pass, and the most prompts "
                        "generation tasks decode together on the serving engine")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a fine-tuned adapter folder (LoRA/IA3 merged, bottleneck adapters unmerged) to evaluate "
                        "on top of MODEL")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N GPUs (its attention heads and MLP; one process each, started by this "
                        "command, as `lmforge serve -tp N`); N must divide the attention heads, key/value heads "
                        "and ffn size; not under torchrun, not with --batch-size auto")
    p.add_argument("--output", default=None, help="write results.json here (rank 0 under torchrun)")
    p.add_argument("--cache", default=None, help="the folder `lmforge prefetch` filled (default: $LMFORGE_CACHE)")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for perplexity's stderr (as lm_eval; 0: none)")
    p.set_defaults(func=_cmd_evaluate)

    q = sub.add_parser("prefetch", help="download task datasets and models into a cache for offline compute nodes")
    q.add_argument("--tasks", default="", help="comma-separated task names (built in or lm-evaluation-harness)")
    q.add_argument("--models", default="", help="comma-separated Hugging Face repositories (models, tokenizers)")
    q.add_argument("--include-path", "--include_path", dest="include_path", default=None, metavar="DIR",
                   help="a folder of lm-evaluation-harness task YAML files whose tasks --tasks may name")
    q.add_argument("--cache", default=None, help="cache folder (default: $LMFORGE_CACHE or ~/.cache/lmforge)")
    q.set_defaults(func=_cmd_prefetch)


def _split(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _cmd_evaluate(a) -> int:
    from rich.console import Console

    from lmforge.eval.data import builtin_task_data, check_hub_access, default_cache_dir, parse_task_data, split_tasks

    console = Console()
    if a.model[0] == "compare":
        from lmforge.eval.evaluate import compare

        console.print(compare(a.model[1:]))
        return 0
    if len(a.model) != 1:
        raise UserError(f"evaluate takes one MODEL (or `compare FILE...`), got {a.model}")
    if not a.tasks:
        raise UserError("pass --tasks, e.g. --tasks hellaswag,piqa")
    if a.limit is not None and a.limit < 1:
        raise UserError(f"--limit takes a positive number of examples per task, got {a.limit}; leave it out to "
                        f"use every example")
    batch_size = a.batch_size if a.batch_size == "auto" else _positive_int(a.batch_size)
    tasks, task_data, cache = _split(a.tasks), parse_task_data(a.task_data), a.cache or str(default_cache_dir())
    builtin, other = split_tasks(tasks)  # lmforge's own tasks, and names for lm-evaluation-harness (looked up in run)
    if a.adapter is None or os.path.isdir(a.adapter):  # else run() names the missing adapter first
        # before torch and lm_eval are imported: fails in a second
        check_hub_access(builtin, builtin_task_data(task_data), cache, also=other)
    from lmforge.eval.evaluate import results_table, run

    doc = run(a.model[0], tasks, task_data, a.limit, batch_size, a.device, a.dtype, a.output, a.bootstrap_iters,
              cache, adapter=a.adapter, include_path=a.include_path, tensor_parallel_size=a.tensor_parallel_size)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports
    console.print(results_table(doc))
    if not a.output:
        print(json.dumps(doc["results"], indent=2))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"--batch-size takes a positive integer or 'auto', got {text!r}")
    return value


def _cmd_prefetch(a) -> int:
    from lmforge.eval.data import prefetch

    if not _split(a.tasks) and not _split(a.models):
        raise UserError("prefetch needs --tasks and/or --models")
    written = prefetch(_split(a.tasks), _split(a.models), a.cache, include_path=a.include_path)
    for name, folder in written.items():
        print(f"{name}: {folder}")
    return 0
