"""``lmforge ARGS`` with every host read of a tensor counted, per training step (run under torchrun by
tests/train/test_fsdp_finetune.py).

Counted: ``Tensor.item``, ``tolist``, ``cpu``, ``__float__``, ``__int__``, ``__bool__`` called from lmforge's code
(on a GPU each waits for the device; torch's own reads, such as Adam's of its CPU step counters, are torch's
business). A read inside ``Trainer.train_step`` or in the loop's per-step flag check (``Trainer._any_rank``) counts
as "in the step" of the step that runs; any other read (logging, validation, saving) as "around" it. Each rank writes
``{"in_step": {step: n}, "around": {step: n}}`` to ``$LMFORGE_SYNC_COUNTS/rank{R}.json`` when the run ends.

``count_syncs.py --cases CASES.json``: the commands of tests/run_cases.py in one launch instead, those whose ``env``
sets LMFORGE_SYNC_COUNTS counted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lmforge.cli import main
from lmforge.train.loop import Trainer

counts: dict = {"in_step": {}, "around": {}, "sites": {}}  # sites: "file:line" of each read in a step
where = {"step": 0, "inside": 0}


def counting(name):
    real = getattr(torch.Tensor, name)

    def read(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if os.sep + "lmforge" + os.sep in caller:  # lmforge's own reads (torch's optimizers read CPU step counters)
            kind = "in_step" if where["inside"] else "around"
            counts[kind][where["step"]] = counts[kind].get(where["step"], 0) + 1
            if kind == "in_step":
                site = f"{caller}:{sys._getframe(1).f_lineno}"
                counts["sites"][site] = counts["sites"].get(site, 0) + 1
        return real(self, *args, **kwargs)

    return read


for method in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
    setattr(torch.Tensor, method, counting(method))


def inside(real, marks_step: bool):
    def run(self, *args, **kwargs):
        if marks_step:
            where["step"] = args[1] + 1  # train_step(batches, step): the step being trained, 1-based as logged
        where["inside"] += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            where["inside"] -= 1

    return run


Trainer.train_step = inside(Trainer.train_step, True)
Trainer._any_rank = inside(Trainer._any_rank, False)

def write_counts(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counts))


def counted_cases(spec: str) -> int:
    """The commands of tests/run_cases.py (CASES.json ``spec``), counted: a case whose ``env`` sets
    LMFORGE_SYNC_COUNTS gets its own counts (from zero) written there when it returns."""
    sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.run_cases
    from tests import run_cases

    def counted_main(args):
        for kind in counts.values():
            kind.clear()
        where.update(step=0, inside=0)
        code = main(args)
        if os.environ.get("LMFORGE_SYNC_COUNTS"):
            write_counts(Path(os.environ["LMFORGE_SYNC_COUNTS"]))
        return code

    run_cases.main = counted_main
    return run_cases.run(spec)


if __name__ == "__main__":
    if sys.argv[1] == "--cases":  # count_syncs.py --cases CASES.json
        sys.exit(counted_cases(sys.argv[2]))
    code = main(sys.argv[1:])
    write_counts(Path(os.environ["LMFORGE_SYNC_COUNTS"]))
    sys.exit(code)
