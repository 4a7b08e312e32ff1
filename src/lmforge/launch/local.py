"""The local executor: the stages one after another on this machine, stopping at the first failure.

A stage with several processes (``trainer.devices=2``) starts through
``python -m torch.distributed.run --standalone``, after the all-reduce preflight; a job array runs
its tasks one by one. Each stage's output goes to the terminal and to ``<results_dir>/launch.log``;
on success the completion marker is written, and a later launch skips the stage unless ``--force``.

Signals: each stage runs in its own session, so Ctrl-C in the terminal reaches only the launcher.
SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 to the launcher are passed on to the running stage's processes
(torchrun's workers) as SIGTERM: the training loop saves at the next step boundary on SIGTERM/SIGUSR1,
while SIGINT would end Python with a KeyboardInterrupt and no checkpoint. The launcher waits for the
stage to end, records it as ``stopped`` (a resumable stage: run the launch again to resume) or
``interrupted``, and starts nothing more. On Linux a stage also gets SIGTERM when the launcher itself dies (``kill -9``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from lmforge import stop_markers
from lmforge.errors import ConfigError, UserError
from lmforge.launch import containers
from lmforge.launch.stages import Stage
from lmforge.stop_markers import EXIT_STOPPED_TO_RESUME


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _children(pid: int) -> Optional[list[int]]:
    """The pids whose parent is ``pid`` (from /proc); None where /proc is missing."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    children = []
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                children.append(int(d.name))
    return children


def signal_stage(pid: int, sig: int, torchrun: bool = False) -> None:
    """Send ``sig`` to a stage started as ``pid`` in its own session (process group ``pid``).

    A plain stage: its whole process group. A ``torchrun`` stage: the workers, torchrun's children
    (torchrun starts each in a session of its own, so the group does not reach them), and not
    torchrun's agent itself: on a signal it would shut its workers down on a 30 s deadline and then
    kill them, cutting a long checkpoint save; the workers save and exit, and the agent then ends on
    its own. Before the workers exist (or without /proc) the agent's group gets it.
    """
    if torchrun:
        workers = _children(pid) or []
        for worker in workers:
            try:
                os.kill(worker, sig)
            except ProcessLookupError:
                pass
        if workers:
            return
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class StopForwarder:
    """Launcher-side handler of SIGTERM/SIGINT/SIGUSR1 while stages run: remembers the first signal and
    passes each one on to the running stage as SIGTERM (the training loop saves and stops on it as on
    SIGUSR1; any other stage ends, and Python helpers such as multiprocessing's resource tracker ignore it)."""

    def __init__(self):
        self.received: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.torchrun = False
        self._old = {}

    def install(self) -> "StopForwarder":
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def forward(self) -> None:
        """Pass the stop request to the running stage (if any)."""
        if self.received is not None and self.proc is not None and self.proc.poll() is None:
            signal_stage(self.proc.pid, signal.SIGTERM, self.torchrun)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        self.forward()


def _die_with_launcher() -> Optional[Callable[[], object]]:
    """Linux: a ``preexec_fn`` after which the kernel sends the stage SIGTERM when the launcher dies, even by
    ``kill -9``, so a training stage saves and stops instead of running on unattended; None elsewhere.

    The C function is looked up here, in the launcher: the child between fork and exec only calls it
    (importing there could wait forever on a lock another thread of the launcher held at the fork).
    """
    if sys.platform != "linux":
        return None
    import ctypes
    import functools

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1
    return functools.partial(prctl, PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _run_logged(argv: list[str], env: dict, log_path, stop: StopForwarder, torchrun: bool = False,
                on_start: Callable[[int], None] | None = None) -> int:
    """Run ``argv`` in its own session, its output going to ``log_path`` (and from there, as it grows, to the
    terminal); a signal the launcher gets meanwhile is passed on through ``stop``. Returns the exit code.

    The stage writes to the log file itself, not to a pipe of the launcher's: if the launcher dies, the
    stage's output neither breaks (a pipe without reader) nor gets lost.
    """
    import codecs
    import time

    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {containers.join(argv)}\n")
        log_file.flush()
        start = log_file.tell()
        proc = subprocess.Popen(argv, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_launcher())
    stop.proc, stop.torchrun = proc, torchrun
    try:
        stop.forward()  # a signal that came while the stage was starting
        if on_start:
            on_start(proc.pid)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split between reads
        with open(log_path, "rb") as follow:
            follow.seek(start)
            while True:
                running = proc.poll() is None
                text = decoder.decode(follow.read(), final=not running)
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                elif not running:
                    return proc.wait()
                else:
                    time.sleep(0.1)
    finally:
        stop.proc = None


def run(stages: list[Stage], cfg: DictConfig, dry_run: bool = False, force: bool = False,
        log: Callable[[str], None] = print, on_update: Callable[[list[dict]], None] | None = None) -> tuple[int, list[dict]]:
    """Run ``stages`` in order here.

    Returns:
        ``(exit code, record entries)``: 0 when every stage completed (or was skipped as completed),
        75 when a stage saved a checkpoint and stopped early, or was stopped by a signal to the launcher
        (run the launch again to resume), 128 + the signal's number when a signal stopped a stage that
        cannot resume (or came between stages).

    Raises:
        StageFailedError: a stage failed; the message names it, its exit code and its log.
    """
    env = {**os.environ, **{str(k): str(v) for k, v in (cfg.get("env_vars") or {}).items() if v is not None}}
    if cfg.get("wandb_api_key_file"):  # checked readable when the config loaded
        env["WANDB_API_KEY"] = Path(str(cfg.wandb_api_key_file)).read_text().strip()
    entries = [{"stage": s.kind, "name": s.name, "results_dir": str(s.results_dir.resolve()), "job_id": None,
                "array_count": s.array_count, "state": "pending"} for s in stages]
    plans = [stage_commands(s, cfg) for s in stages]  # every stage checked before the first runs
    if dry_run:
        for i, (stage, commands, entry) in enumerate(zip(stages, plans, entries)):
            head = f"[launch] stage {i + 1}/{len(stages)} {stage.kind}"
            if _skip_completed(stage, entry, head, force, log):
                continue
            for c in commands:
                log(f"{head}: {containers.join(c)}")
            entry["state"] = "dry-run"
        return 0, entries
    stop = StopForwarder().install()
    try:
        return _run_stages(stages, plans, entries, env, force, log, on_update, stop)
    finally:
        stop.restore()


def _skip_completed(stage, entry: dict, head: str, force: bool, log) -> bool:
    """A stage that completed before is skipped (and recorded so) unless ``--force``."""
    if not stage.is_completed() or force:
        return False
    log(f"{head}: already completed; skipped (--force reruns it)")
    entry["state"] = "completed"
    return True


def _run_stages(stages, plans, entries, env, force, log, on_update, stop: StopForwarder) -> tuple[int, list[dict]]:
    def update(entry, state):
        entry["state"] = state
        if on_update:
            on_update(entries)

    def stopped(i, stage, entry, rc):
        """The stage ended after a signal: record it as stopped (resumable) or interrupted."""
        name = signal.Signals(stop.received).name
        head = f"[launch] stage {i + 1}/{len(stages)} {stage.kind}"
        rest = [s.kind for s in stages[i + 1:]]
        not_run = f"; not run: {', '.join(rest)}" if rest else ""
        if stage.resumable:
            update(entry, "stopped")
            saved = "saved a checkpoint and " if rc == EXIT_STOPPED_TO_RESUME else ""
            log(f"{head}: {name}: the stage {saved}stopped (exit code {rc}){not_run}; "
                f"run the same launch command again to resume")
            return EXIT_STOPPED_TO_RESUME, entries
        update(entry, "interrupted")
        log(f"{head}: {name}: the stage was stopped before it finished (exit code {rc}){not_run}; "
            f"run the same launch command again to rerun it")
        return 128 + int(stop.received), entries

    for i, (stage, commands, entry) in enumerate(zip(stages, plans, entries)):
        head = f"[launch] stage {i + 1}/{len(stages)} {stage.kind}"
        if _skip_completed(stage, entry, head, force, log):
            continue
        if stop.received is not None:
            rest = ", ".join(s.kind for s in stages[i:])
            log(f"[launch] {signal.Signals(stop.received).name}: stopping; not run: {rest}; "
                f"run the same launch command again to go on")
            return 128 + int(stop.received), entries
        for m in stage.completion_markers():
            m.unlink(missing_ok=True)
        stage.write_config()

        def started(pid, entry=entry):
            entry["pid"] = pid  # the stage's process group, for a person who needs to signal it by hand
            update(entry, "running")

        log_path = stage.results_dir / "launch.log"
        markers = stage.stop_markers
        for task, argv in enumerate(commands):
            log(f"{head}: {containers.join(argv)}")
            stop_markers.clear(markers)
            rc = _run_logged(argv, {**env, stop_markers.ENV: str(markers)}, log_path, stop,
                             torchrun=stage.distributed, on_start=started)
            if stage.distributed and rc != 0 and stop_markers.all_stopped(markers, stage.world_size):
                rc = EXIT_STOPPED_TO_RESUME  # every rank exited 75; torchrun made it 1
            stop_markers.clear(markers)
            if rc == EXIT_STOPPED_TO_RESUME and stage.resumable:
                if stop.received is not None:
                    return stopped(i, stage, entry, rc)
                update(entry, "stopped")
                log(f"{head}: saved a checkpoint and stopped early; run the same launch command again to resume")
                return EXIT_STOPPED_TO_RESUME, entries
            if rc != 0 and stop.received is not None:
                return stopped(i, stage, entry, rc)
            if rc != 0:
                update(entry, "failed")
                rest = [s.kind for s in stages[i + 1:]]
                raise StageFailedError(f"stage {stage.kind} failed with exit code {rc} (log: {log_path})"
                                       + (f"; not run: {', '.join(rest)}" if rest else ""))
            if stage.array_count:
                stage.completion_markers()[task].write_text("completed\n")
            if stop.received is not None and task + 1 < len(commands):
                return stopped(i, stage, entry, rc)
        if not stage.array_count:
            stage.completion_markers()[0].write_text("completed\n")
        update(entry, "completed")
    return 0, entries
