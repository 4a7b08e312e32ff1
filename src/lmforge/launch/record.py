"""The launch record: which stages a launch ran, with their job ids, and ``lmforge launch status``.

``<base_results_dir>/launch.json`` lists the stages of the latest launch into that folder::

    {"cluster_type": "slurm", "config": "conf/config.yaml", "stages": [
        {"stage": "training", "name": "tiny_llama", "results_dir": "...", "job_id": "12",
         "array_count": null, "state": "submitted", "script": ".../training.sbatch"}, ...]}

A stage's state is COMPLETED when its completion marker(s) exist (written by the job itself on
success), else what Slurm says about its job (squeue, then scontrol), else the recorded state.
"""

from __future__ import annotations

import json
import shutil
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


def stage_states(base_results_dir: str | Path) -> list[dict]:
    """Each recorded stage with its current ``state``."""
    record = read_record(base_results_dir)
    rows = []
    for entry in record["stages"]:
        done = [m.is_file() for m in markers(entry)]
        if all(done):
            state = "COMPLETED"
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
    return rows
