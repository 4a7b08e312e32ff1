"""``lmforge ARGS`` under torchrun as a run stopped by SIGUSR1 on every rank before its first step, with rank 0
slow to finish: it sleeps ``LMFORGE_TEST_RANK0_DELAY`` seconds before drawing its loss curve (run by
tests/train/test_max_time_and_stop_note.py).

Every rank then exits 75 (stopped to be resumed). A rank that exits before rank 0 has written summary.json
makes torchrun's agent kill rank 0 (it takes a non-zero exit for a failure): the summary would be missing.
"""

from __future__ import annotations

import os
import sys
import time

from lmforge.cli import main
from lmforge.train import loop, pretrain


class _StoppedAtOnce(loop.StopRequested):
    """As if SIGUSR1 had reached this rank before step 1 (each rank of a launcher's stage gets it)."""

    def __init__(self):
        super().__init__()
        self.flag = True


def _slow_loss_curve(*args, real=pretrain.save_loss_curve, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        time.sleep(float(os.environ["LMFORGE_TEST_RANK0_DELAY"]))
    return real(*args, **kwargs)


loop.StopRequested = _StoppedAtOnce
pretrain.save_loss_curve = _slow_loss_curve

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
