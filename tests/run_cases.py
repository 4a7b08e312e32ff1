"""Several ``lmforge`` commands in one torchrun launch, one after the other on the same ranks (run by
``tests.conftest.run_cases``): the parallel tests' runs pay for one interpreter start, ``import torch`` and
rendezvous per rank once instead of once per run.

    python -m torch.distributed.run --nproc-per-node=N tests/run_cases.py CASES.json

CASES.json: ``{"cases": [{"name": ..., "args": [...], "env": {...}, "cwd": ...}, ...], "folder": ...}``. Each case
is ``lmforge.cli.main(args)`` with ``env`` set for its duration (e.g. LMFORGE_TEST_KILL_AT_STEP, which kills the
ranks: such a case comes last) and, with ``cwd``, run in that folder (relative paths of a command shown in the docs;
a reward function imported from the working folder). The default process group is started once, here, and outlives
the cases (``lmforge``'s ``init_runtime`` finds it started and uses it; ``destroy_process_group`` is a no-op here):
torch names the groups a run creates (device meshes, gloo side groups) by a counter that restarts at 0 after a
destroy, and DTensor caches sharding plans by mesh shape, holding the mesh (and its group names) of the run that
made them, so a run after a destroy would meet the first run's store keys or groups that no longer exist. Each case
still builds its own meshes and groups. Each rank writes its output (file descriptors 1 and 2, so torch's and C++'s
lines too) to ``FOLDER/NAME.rank{R}.log`` and, when the command returns, its exit code to
``FOLDER/NAME.rank{R}.rc``. A command that raises or returns non-zero ends the launch (the ranks may no longer be at
the same point): the cases after it do not run, and the parent reports them as not run.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from lmforge.cli import main


def _run_case(case: dict, folder: Path, rank: int) -> int:
    log = open(folder / f"{case['name']}.rank{rank}.log", "w")
    saved = [os.dup(1), os.dup(2)]
    old_env = {k: os.environ.get(k) for k in case.get("env", {})}
    old_cwd = os.getcwd()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.environ.update(case.get("env", {}))
    try:
        os.chdir(case.get("cwd") or old_cwd)
        return main(list(case["args"]))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))  # as lmforge's init_runtime on a CPU
    rank = dist.get_rank()
    dist.destroy_process_group = lambda group=None: None  # the groups outlive each case (see the module doc)
    for case in spec["cases"]:
        code = _run_case(case, folder, rank)
        (folder / f"{case['name']}.rank{rank}.rc").write_text(str(code))
        if code != 0:
            return code
    return 0


def write_gathered(out: str, results: dict) -> None:
    """A check worker's results (tests/parallel/*_worker.py): every rank's ``results`` gathered, written by rank 0
    to ``out`` as a JSON list by rank. The worker has started the default process group."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


def run_in_group(spec_path: str | None) -> int:
    """A check worker's end: with ``spec_path`` (CASES.json), its ``lmforge`` commands in the process group the
    worker started (one launch for the checks and the runs), else the group is destroyed. Returns the exit code."""
    if spec_path is None:
        dist.destroy_process_group()
        return 0
    dist.init_process_group = lambda *args, **kwargs: None  # run()'s group: the one the worker started
    return run(spec_path)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
