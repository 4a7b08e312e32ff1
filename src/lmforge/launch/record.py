"""The launch record: which stages a launch ran, with their job ids, and ``lmforge launch status``.

``<base_results_dir>/launch.json`` lists the stages of the latest launch into that folder::

    {"cluster_type": "slurm", "config": "conf/config.yaml", "stages": [
        {"stage": "training", "name": "tiny_llama", "results_dir": "...", "job_id": "12",
         "array_count": null, "state": "submitted", "script": ".../training.sbatch"}, ...]}

A stage's state is COMPLETED when its completion marker(s) exist (written by the job itself on
success), else what Slurm says about its job (squeue, then scontrol), else the recorded state.

A local launch also records its own process (``"launcher": {"host", "pid", "started"}``). A stage
recorded as running whose launcher is gone (killed, machine rebooted; a pid reused by another process
does not count: ``started`` is the kernel's start time of the process) shows as ``LAUNCHER DIED``,
with the reason, instead of a RUNNING that will never end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Optional

from lmforge.errors import UserError
from lmforge.io import write_json_atomic

RECORD = "launch.json"


def record_path(base_results_dir: str | Path) -> Path:
    return Path(base_results_dir) / RECORD


def read_record(base_results_dir: str | Path) -> dict:
    path = record_path(base_results_dir)
    if not path.is_file():
        raise UserError(f"{path} does not exist: {base_results_dir} is not the base_results_dir of a launch")
    return json.loads(path.read_text())


def write_record(base_results_dir: str | Path, record: dict) -> None:
    write_json_atomic(record_path(base_results_dir), record)


def markers(entry: dict) -> list[Path]:
    results = Path(entry["results_dir"])
    if entry.get("array_count"):
        return [results / f"COMPLETED.task{i}" for i in range(int(entry["array_count"]))]
    return [results / "COMPLETED"]


def slurm_state(job_id: str) -> Optional[str]:
    """The job's state from squeue (several lines for an array: the distinct states), else scontrol; None if unknown."""
    if shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
        states = sorted(set(out.stdout.split())) if out.returncode == 0 else []
        if states:
            return ",".join(states)
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "job", str(job_id), "-o"], capture_output=True, text=True)
        states = sorted({w.split("=", 1)[1] for w in out.stdout.split() if w.startswith("JobState=")})
        if states:
            return ",".join(states)
    return None


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started, as the kernel counts it (Linux: boot id and start tick from /proc),
    so a pid reused later by another process is told apart; None where unknown (no /proc, no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime field 22
    return f"{boot}:{fields[19]}"


def launcher_identity() -> dict:
    """This process as a launch record's ``launcher`` entry: host, pid and start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def launcher_gone(launcher: dict) -> Optional[str]:
    """Why the recorded launcher process is no longer running, or None while it runs (or cannot be checked
    from here: another host)."""
    pid, host = int(launcher["pid"]), launcher.get("host")
    if host and host != socket.gethostname():
        return None
    where = f"launcher pid {pid} on {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"{where} is gone (killed, or the machine restarted)"
    except PermissionError:
        pass  # exists, owned by someone else: the start time below tells whether it is ours
    if _is_zombie(pid):
        return f"{where} was killed"
    started = launcher.get("started")
    if started and process_start(pid) not in (None, started):
        return f"{where} is gone (that pid now belongs to another process)"
    return None


def stage_states(base_results_dir: str | Path) -> list[dict]:
    """Each recorded stage with its current ``state`` (and a ``reason`` when its launcher died)."""
    record = read_record(base_results_dir)
    open_states = {e.get("state") for e in record["stages"]} & {"running", "pending"}
    gone = launcher_gone(record["launcher"]) if record.get("launcher") and open_states else None
    rows = []
    for entry in record["stages"]:
        done = [m.is_file() for m in markers(entry)]
        if all(done):
            state = "COMPLETED"
        elif gone and entry.get("state") == "running":
            rows.append({**entry, "state": "LAUNCHER DIED",
                         "reason": f"{gone} while {entry['stage']} ran; run the same launch command again "
                                   f"(a training stage resumes from its last checkpoint)"})
            continue
        elif gone and entry.get("state") == "pending":
            state = "NOT RUN"
        elif entry.get("job_id") and record.get("cluster_type") == "slurm":
            state = slurm_state(entry["job_id"]) or entry.get("state", "unknown").upper()
            if entry.get("array_count") and any(done):
                state += f" ({sum(done)}/{len(done)} tasks completed)"
        else:
            state = entry.get("state", "unknown").upper()
        rows.append({**entry, "state": state})
    return rows


def print_status(base_results_dir: str | Path) -> list[dict]:
    """Print a table of the stages of the launch in ``base_results_dir``; returns the rows."""
    from rich.console import Console
    from rich.table import Table

    rows = stage_states(base_results_dir)
    table = Table(title=f"lmforge launch: {base_results_dir}")
    for col in ("stage", "name", "job id", "state", "results"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["stage"], r["name"], str(r.get("job_id") or "-"), r["state"], r["results_dir"])
    Console(width=200).print(table)
    for r in rows:
        if r.get("reason"):
            print(f"{r['stage']}: {r['reason']}")
    return rows
