"""The Slurm executor: one readable sbatch script per stage, submitted as a chain of dependent jobs.

Each script (``<results_dir>/<stage>.sbatch``) holds the ``#SBATCH`` lines (job name, partition,
account, time, nodes, tasks, GPUs, memory, output files, ``--signal=B:USR1@<seconds>``,
``--requeue``), finds the head node with ``scontrol show hostnames``, runs the all-reduce preflight
for multi-GPU training, starts the stage through ``srun`` (one ``torchrun`` per node with c10d
rendezvous on the head node when there are several processes) and then:

* exit 0: writes the completion marker ``COMPLETED`` (``COMPLETED.task<N>`` for an array task);
* exit 75, or any failure after SIGUSR1 for a resumable stage: ``scontrol requeue $SLURM_JOB_ID``;
  the requeued job resumes from the checkpoint the stage saved on the signal;
* anything else: the job fails, and Slurm cancels the stages that depend on it (afterok).

The batch shell gets SIGUSR1 (``B:``), remembers it and forwards it to srun, which forwards it to the
tasks; ``torchrun`` itself ignores it (``trap "" USR1`` before ``exec``) so only the training
processes act on it.
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from lmforge import stop_markers
from lmforge.errors import ConfigError, UserError
from lmforge.launch import containers
from lmforge.launch.config import format_time_limit
from lmforge.launch.stages import Stage

PREFLIGHT_TIMEOUT = 60


class SubmitError(UserError):
    """sbatch refused a script or is not available."""


def _sbatch_lines(stage: Stage, cfg: DictConfig) -> list[str]:
    c = cfg.cluster
    lines = [f"--job-name={c.job_name_prefix or ''}{stage.name}"]
    for key in ("partition", "account", "qos"):
        if c.get(key):
            lines.append(f"--{key}={c[key]}")
    lines += [f"--time={format_time_limit(stage.time_seconds)}", f"--nodes={stage.nodes}",
              f"--ntasks-per-node={stage.ntasks_per_node}"]
    if stage.gpus_per_node:
        lines.append(f"--gres={c.gres}:{stage.gpus_per_node}" if c.get("gres") else f"--gpus-per-node={stage.gpus_per_node}")
    if c.get("gpus_per_task"):
        lines.append(f"--gpus-per-task={c.gpus_per_task}")
    if c.get("cpus_per_task"):
        lines.append(f"--cpus-per-task={c.cpus_per_task}")
    if c.get("mem") is not None:
        lines.append(f"--mem={c.mem}")
    if c.get("exclusive"):
        lines.append("--exclusive")
    if stage.array_spec:
        lines.append(f"--array={stage.array_spec}")
    pattern = "%A_%a" if stage.array_spec else "%j"
    lines += [f"--output={stage.results_dir.resolve()}/slurm-{pattern}.out",
              f"--error={stage.results_dir.resolve()}/slurm-{pattern}.err", "--open-mode=append"]
    if c.get("signal_seconds"):
        lines.append(f"--signal=B:USR1@{int(c.signal_seconds)}")
    if stage.resumable and c.get("requeue", True):
        lines.append("--requeue")
    lines += [str(x) for x in (c.get("sbatch_args") or [])]
    return lines


def _node_command(stage: Stage, cfg: DictConfig, args: list[str]) -> list[str]:
    """What one srun task runs on each node: python, or torchrun with c10d rendezvous on the head node."""
    python = containers.python_executable(cfg)
    if stage.distributed:
        argv = [python, "-m", "torch.distributed.run", "--nnodes=${SLURM_JOB_NUM_NODES}",
                f"--nproc-per-node={stage.ntasks_per_node}", "--rdzv-backend=c10d",
                "--rdzv-endpoint=${HEAD_NODE}:${RDZV_PORT}", "--rdzv-id=${SLURM_JOB_ID}", *args]
    else:
        argv = [python, *args]
    return containers.wrap(argv, cfg, stage.gpus_per_node)


def _srun(stage: Stage, cfg: DictConfig, tasks_per_node: int, cpus_per_task: int) -> list[str]:
    return ["srun", f"--nodes={stage.nodes}", f"--ntasks={stage.nodes * tasks_per_node}", f"--ntasks-per-node={tasks_per_node}",
            f"--cpus-per-task={cpus_per_task}", *[str(x) for x in (cfg.cluster.get("srun_args") or [])],
            *containers.srun_container_args(cfg, [stage.results_dir])]


def script(stage: Stage, cfg: DictConfig) -> str:
    """The sbatch script of ``stage``, as text."""
    c = cfg.cluster
    cpus = int(c.get("cpus_per_task") or 1)
    results = stage.results_dir.resolve()
    marker = f'{results}/COMPLETED.task${{SLURM_ARRAY_TASK_ID}}' if stage.array_spec else f"{results}/COMPLETED"
    lines = ["#!/bin/bash",
             f"# lmforge launch: stage {stage.kind} ({stage.name}), written "
             f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             "# Submit by hand with `sbatch <this file>`; `lmforge launch` submits it with the stage dependencies."]
    lines += [f"#SBATCH {x}" for x in _sbatch_lines(stage, cfg)]
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    for key, value in (cfg.get("env_vars") or {}).items():
        if value is not None:
            lines.append(f"export {key}={shlex.quote(str(value))}")
    if cfg.get("wandb_api_key_file"):  # read on the node when the job starts: the key is not written here
        lines.append(f'export WANDB_API_KEY="$(cat {shlex.quote(str(cfg.wandb_api_key_file))})"')
    lines += [
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)',
        # torchrun's rendezvous port (+1: the preflight's); from the job id unless set, so jobs sharing a node differ
        f"RDZV_PORT={int(c.rdzv_port) if c.get('rdzv_port') else '$((20000 + (SLURM_JOB_ID % 20000) * 2))'}",
        "PREFLIGHT_PORT=$((RDZV_PORT + 1))",
        "export HEAD_NODE HOSTS RDZV_PORT PREFLIGHT_PORT",
        f'echo "lmforge: stage {stage.kind}, job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (head node $HEAD_NODE), '
        f'restart ${{SLURM_RESTART_COUNT:-0}}"',
        "",
        "# SIGUSR1 (the time limit is near, or preemption): forward it to the stage, which saves and stops.",
        "signals=0",
        "step_pid=",
        "on_usr1() {",
        "  signals=$((signals + 1))",
        '  echo "lmforge: SIGUSR1: asking the stage to save a checkpoint and stop"',
        '  if [ -n "$step_pid" ]; then kill -USR1 "$step_pid" 2>/dev/null; fi',
        "}",
        "trap on_usr1 USR1",
        "",
        "# Run a step in the background so the trap runs at once; returns the step's exit code.",
        "run_step() {",
        '  "$@" &',
        "  step_pid=$!",
        "  local before rc",
        "  while :; do",
        "    before=$signals",
        '    wait "$step_pid"; rc=$?',
        '    [ "$signals" = "$before" ] && break  # not interrupted by the trap: rc is the exit code',
        "  done",
        "  step_pid=",
        "  return $rc",
        "}",
        "",
    ]
    if stage.preflight:
        pre = containers.wrap([containers.python_executable(cfg), "-m", "lmforge.launch.preflight",
                               "--store-host=${HEAD_NODE}", "--store-port=${PREFLIGHT_PORT}", "--node-names=${HOSTS}",
                               f"--wait-seconds={PREFLIGHT_TIMEOUT}"], cfg, stage.gpus_per_node)
        lines += ["# Preflight: an all-reduce across every rank; names the node that does not answer.",
                  containers.join(["run_step", *_srun(stage, cfg, stage.ntasks_per_node, cpus), *pre])
                  + ' || { echo "lmforge: preflight failed" >&2; exit 1; }', ""]
    node_cmd = 'trap "" USR1; exec ' + containers.join(_node_command(stage, cfg, stage.module_args))
    markers = shlex.quote(str(stage.stop_markers))
    if stage.distributed:
        lines += ["# Each rank that saves and stops to resume (exit 75) leaves a marker here first: torchrun exits 1.",
                  f"export {stop_markers.ENV}={markers}", f"rm -rf {markers}"]
    lines += ["# The stage: one task per node (torchrun starts the processes of a node).",
              containers.join(["run_step", *_srun(stage, cfg, 1, cpus * stage.ntasks_per_node), "bash", "-c"])
              + " " + shlex.quote(node_cmd),
              "rc=$?"]
    if stage.distributed:
        n = stage.world_size
        lines += ['if [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ]; then  # every rank stopped to resume: 75, not torchrun\'s 1',
                  "  stopped=0",
                  f'  for r in $(seq 0 {n - 1}); do [ -f {markers}/rank-$r ] && stopped=$((stopped + 1)); done',
                  f'  if [ "$stopped" -eq {n} ]; then rc=75; fi',
                  "fi",
                  f"rm -rf {markers}"]
    lines += ["",
              'if [ "$rc" -eq 0 ]; then',
              f'  date -u +%Y-%m-%dT%H:%M:%SZ > "{marker}.tmp" && mv "{marker}.tmp" "{marker}"',
              '  echo "lmforge: stage completed"',
              "  exit 0",
              "fi"]
    if stage.resumable and c.get("requeue", True):
        lines += ['if [ "$rc" -eq 75 ] || [ "$signals" -gt 0 ]; then',
                  '  echo "lmforge: stopped after saving a checkpoint (exit $rc): requeueing job $SLURM_JOB_ID to resume"',
                  '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
                  "fi"]
    lines += ['echo "lmforge: stage failed with exit code $rc" >&2', 'exit "$rc"', ""]
    return "\n".join(lines)


def script_path(stage: Stage) -> Path:
    return stage.results_dir / f"{stage.kind}.sbatch"


def write_scripts(stages: list[Stage], cfg: DictConfig) -> list[Path]:
    """Write each stage's config file and sbatch script into its results folder."""
    from lmforge.io import write_text_atomic

    paths = []
    for stage in stages:
        stage.write_config()
        path = script_path(stage)
        write_text_atomic(path, script(stage, cfg))
        path.chmod(0o755)
        paths.append(path)
    return paths


def _check_resources(stages: list[Stage], cfg: DictConfig) -> None:
    per_node = cfg.cluster.get("gpus_per_node")
    for stage in stages:
        if per_node is not None and stage.gpus_per_node > int(per_node):
            raise ConfigError(f"{stage.kind} asks for {stage.gpus_per_node} GPUs per node but cluster.gpus_per_node="
                              f"{per_node}; use more nodes (trainer.num_nodes) and fewer devices per node")


def _sbatch(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", *args], capture_output=True, text=True)


def submit(stages: list[Stage], cfg: DictConfig, dry_run: bool = False, force: bool = False,
           log: Callable[[str], None] = print) -> list[dict]:
    """Write the scripts and (unless ``dry_run``) submit them, each after the one before (afterok).

    Stages already completed are skipped unless ``force``. Every script is first checked with
    ``sbatch --test-only``, so a partition, account or GPU request Slurm refuses stops the launch
    before any job is submitted.

    Returns:
        One record entry per stage: stage, name, results_dir, script, job_id (None: skipped or dry run), state.

    Raises:
        SubmitError: sbatch not on PATH, or Slurm refusing a script.
    """
    _check_resources(stages, cfg)
    if not dry_run and shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: run `lmforge launch` on a Slurm login node, use cluster_type=local, "
                          "or add --dry-run to only write the scripts")
    todo = []
    entries = []
    for stage in stages:
        entry = {"stage": stage.kind, "name": stage.name, "results_dir": str(stage.results_dir.resolve()),
                 "script": str(script_path(stage).resolve()), "array_count": stage.array_count, "job_id": None}
        if stage.is_completed() and not force:
            log(f"[launch] {stage.kind}: already completed ({stage.completion_markers()[0]}); skipped (--force reruns it)")
            entry["state"] = "completed"
        else:
            if force:
                for m in stage.completion_markers():
                    m.unlink(missing_ok=True)
            todo.append((stage, entry))
            entry["state"] = "dry-run" if dry_run else "submitted"
        entries.append(entry)
    if cfg.container_runtime == "pyxis":  # pyxis mounts only folders that exist
        Path(str(cfg.base_results_dir)).expanduser().mkdir(parents=True, exist_ok=True)
    paths = write_scripts([s for s, _ in todo], cfg)
    if cfg.container_runtime == "pyxis":
        for warning in containers.pyxis_mounts(cfg, [s.results_dir for s, _ in todo])[1]:
            log(f"[launch] warning: {warning}")
    if dry_run:
        for (stage, _), path in zip(todo, paths):
            log(f"[launch] {stage.kind}: {path} (not submitted: --dry-run)")
            log(path.read_text())
        return entries
    for (stage, _), path in zip(todo, paths):
        out = _sbatch(["--test-only", str(path)])
        if out.returncode != 0:
            raise SubmitError(f"Slurm refuses the {stage.kind} job ({path}): {_first_line(out.stderr)}; nothing was submitted")
    previous: Optional[str] = None
    for (stage, entry), path in zip(todo, paths):
        deps = [f"afterok:{previous}"] if previous else []
        if stage.dependency == "singleton":
            deps.append("singleton")
        elif stage.dependency:
            deps.append(str(stage.dependency))
        args = ["--parsable"] + ([f"--dependency={','.join(deps)}"] if deps else []) + [str(path)]
        out = _sbatch(args)
        if out.returncode != 0:
            raise SubmitError(f"sbatch {' '.join(args)} failed: {_first_line(out.stderr)}")
        job_id = out.stdout.strip().split(";")[0]
        entry["job_id"] = job_id
        previous = job_id
        log(f"[launch] {stage.kind}: submitted job {job_id}{' after ' + ','.join(deps) if deps else ''} ({path})")
    return entries


def _first_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else "no message"
