"""The users' 2-node pretraining command (../shared/notes/nemo_user_commands.md, section 2), run verbatim as
test_users_pretraining_commands.py runs the others (its lists, data and checks): two torchrun launchers (c10d
rendezvous on 127.0.0.1), 8 gloo ranks, TP 8. A file of its own, so that pytest-xdist runs it beside the others."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import free_port
from tests.train.test_users_pretraining_commands import (APPENDED, RECIPE, TWO_NODES, _check_common, _run_env,
                                                        _workdir, data, users_overrides)  # noqa: F401 (data: fixture)


def test_users_two_node_command(data, tmp_path):
    """Two torchrun launchers (--nnodes=2 --nproc-per-node=4, c10d rendezvous) as the users' srun starts them:
    TP 8, 16 heads, micro 32 / global 192 -> data parallel 1, 6 micro batches, exactly 192 samples a step."""
    work = _workdir(data, tmp_path)
    args = ["-m", "lmforge", "pretrain", RECIPE, *users_overrides(TWO_NODES), *APPENDED, "trainer.max_steps=1",
            "model.optim.sched.constant_steps=0"]
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=tp8", *args],
                              env=_run_env(), cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-3000:] for log in logs)
    log = "".join(logs)
    assert "on 8 process(es): data parallel 1, tensor parallel 8" in log
    _check_common(work / "results" / "megatron_gpt", log, steps=1, accumulate=6)  # 192 / 32
