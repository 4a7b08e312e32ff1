"""Exit code 75 ("stopped to resume") through torchrun, which cannot pass it on.

A training run that saved a checkpoint and stopped early (SIGTERM/SIGUSR1, ``trainer.max_time``) exits 75 on
every rank. Under torchrun that code is lost: torchrun's agent takes any non-zero exit of a worker for a failure
(``ChildFailedError``), stops the other workers, and exits 1 itself. So the launcher names a folder in
``LMFORGE_STOP_MARKERS`` for a multi-process stage; each rank that stops to resume writes ``rank-<RANK>`` there
before the run's last barrier (so a rank the agent kills after its exit has written its marker too), and the
launcher reads torchrun's non-zero exit as 75 when every rank's marker is there.

No torch here: the launcher imports this module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

EXIT_STOPPED_TO_RESUME = 75  # EX_TEMPFAIL: the run saved a checkpoint and stopped early; run it again to resume
ENV = "LMFORGE_STOP_MARKERS"


def stopped_to_resume(summary: dict) -> bool:
    """Whether a training summary says the run saved a checkpoint and stopped before its end (exit code 75)."""
    return bool(summary.get("stopped_early") or summary.get("time_limit_reached"))


def mark(rank: int, folder: Optional[str] = None) -> None:
    """Write this rank's marker into ``folder`` (default: the folder ``LMFORGE_STOP_MARKERS`` names; nothing when
    it names none)."""
    folder = folder if folder is not None else os.environ.get(ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank-{rank}").write_text("stopped to resume\n")


def clear(folder: Path) -> None:
    """Remove the markers of an earlier command (before a stage's command starts)."""
    shutil.rmtree(folder, ignore_errors=True)


def all_stopped(folder: Path, world_size: int) -> bool:
    """True when ranks 0 .. ``world_size`` - 1 have each written their marker into ``folder``."""
    return world_size > 0 and all((Path(folder) / f"rank-{r}").is_file() for r in range(world_size))
