"""The local executor: the stages one after another on this machine, stopping at the first failure.

A stage with several processes (``trainer.devices=2``) starts through
``python -m torch.distributed.run --standalone``, after the all-reduce preflight; a job array runs
its tasks one by one. Each stage's output goes to the terminal and to ``<results_dir>/launch.log``;
on success the completion marker is written, and a later launch skips the stage unless ``--force``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Callable

from omegaconf import DictConfig

from lmforge.errors import ConfigError, UserError
from lmforge.launch import containers
from lmforge.launch.stages import Stage

EXIT_STOPPED_TO_RESUME = 75


class StageFailedError(UserError):
    """A stage's command exited with an error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_commands(stage: Stage, cfg: DictConfig) -> list[list[str]]:
    """The command lines a stage runs here, in order (preflight first; one per array task)."""
    if stage.nodes > 1:
        raise ConfigError(f"cluster_type=local runs on this machine, but {stage.kind} asks for {stage.nodes} nodes; "
                          f"use cluster_type=slurm or one node")
    python = containers.python_executable(cfg)
    commands = []
    if stage.distributed:
        torchrun = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stage.ntasks_per_node}"]
        if stage.preflight:
            commands.append(torchrun + ["-m", "lmforge.launch.preflight", "--store-host=127.0.0.1",
                                        f"--store-port={_free_port()}", f"--node-names={socket.gethostname()}", "--wait-seconds=60"])
        commands.append(torchrun + stage.module_args)
    elif stage.array_count:
        commands += [[python, *stage.module_args, "--task", str(i)] for i in range(stage.array_count)]
    else:
        commands.append([python, *stage.module_args])
    return [containers.wrap(c, cfg, stage.gpus_per_node) for c in commands]


def _run_logged(argv: list[str], env: dict, log_path) -> int:
    """Run ``argv``, copying its output to the terminal and to ``log_path``; returns the exit code."""
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {containers.join(argv)}\n")
        log_file.flush()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log_file.write(line)
        return proc.wait()


def run(stages: list[Stage], cfg: DictConfig, dry_run: bool = False, force: bool = False,
        log: Callable[[str], None] = print, on_update: Callable[[list[dict]], None] | None = None) -> tuple[int, list[dict]]:
    """Run ``stages`` in order here.

    Returns:
        ``(exit code, record entries)``: 0 when every stage completed (or was skipped as completed),
        75 when a stage saved a checkpoint and stopped early (run the launch again to resume).

    Raises:
        StageFailedError: a stage failed; the message names it, its exit code and its log.
    """
    env = {**os.environ, **{str(k): str(v) for k, v in (cfg.get("env_vars") or {}).items() if v is not None}}
    entries = [{"stage": s.kind, "name": s.name, "results_dir": str(s.results_dir.resolve()), "job_id": None,
                "array_count": s.array_count, "state": "pending"} for s in stages]
    plans = [stage_commands(s, cfg) for s in stages]  # every stage checked before the first runs
    for i, (stage, commands, entry) in enumerate(zip(stages, plans, entries)):
        head = f"[launch] stage {i + 1}/{len(stages)} {stage.kind}"
        if stage.is_completed() and not force:
            log(f"{head}: already completed; skipped (--force reruns it)")
            entry["state"] = "completed"
            continue
        if dry_run:
            for c in commands:
                log(f"{head}: {containers.join(c)}")
            entry["state"] = "dry-run"
            continue
        for m in stage.completion_markers():
            m.unlink(missing_ok=True)
        stage.write_config()
        entry["state"] = "running"
        if on_update:
            on_update(entries)
        log_path = stage.results_dir / "launch.log"
        for task, argv in enumerate(commands):
            log(f"{head}: {containers.join(argv)}")
            rc = _run_logged(argv, env, log_path)
            if rc == EXIT_STOPPED_TO_RESUME and stage.resumable:
                entry["state"] = "stopped"
                if on_update:
                    on_update(entries)
                log(f"{head}: saved a checkpoint and stopped early; run the same launch command again to resume")
                return EXIT_STOPPED_TO_RESUME, entries
            if rc != 0:
                entry["state"] = "failed"
                if on_update:
                    on_update(entries)
                rest = [s.kind for s in stages[i + 1:]]
                raise StageFailedError(f"stage {stage.kind} failed with exit code {rc} (log: {log_path})"
                                       + (f"; not run: {', '.join(rest)}" if rest else ""))
            if stage.array_count:
                stage.completion_markers()[task].write_text("completed\n")
        if not stage.array_count:
            stage.completion_markers()[0].write_text("completed\n")
        entry["state"] = "completed"
        if on_update:
            on_update(entries)
    return 0, entries
