"""The launcher: a NeMo-launcher-shaped ``conf/config.yaml`` run as stages, on this machine or on Slurm.

``launch(config, overrides, dry_run, force)`` is what ``lmforge launch`` calls; ``status(dir)`` is
``lmforge launch status``. See docs/launcher.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from lmforge.launch.config import load_launch_config
from lmforge.launch.stages import Stage, build_stages

__all__ = ["launch", "status", "load_launch_config", "build_stages", "Stage"]


def launch(config: str | Path, overrides: Sequence[str] = (), dry_run: bool = False, force: bool = False,
           log: Callable[[str], None] = print) -> int:
    """Compose the config, check every stage, then run them here or submit them to Slurm.

    Returns:
        The exit code: 0 (all run / submitted), 75 (a local stage stopped early to be resumed, also on
        SIGTERM/SIGINT/SIGUSR1 to this process), 128 + signal (a signal stopped a stage that cannot resume).

    Raises:
        UserError: any problem found before anything runs, or a local stage that failed.
    """
    from lmforge.launch import containers, local, slurm
    from lmforge.launch.record import launcher_identity, write_record

    cfg = load_launch_config(config, overrides)
    stages = build_stages(cfg, check_commands=cfg.container_runtime == "none")
    for note in cfg.get("_notes") or ():
        log(f"[launch] note: {note}")
    containers.check_container(cfg)
    base = Path(str(cfg.base_results_dir))
    record = {"config": str(Path(config).resolve()), "overrides": list(overrides), "cluster_type": cfg.cluster_type,
              "stages": []}

    def save(entries):
        if not dry_run:
            write_record(base, {**record, "stages": entries})

    if cfg.cluster_type == "slurm":
        entries = slurm.submit(stages, cfg, dry_run=dry_run, force=force, log=log)
        save(entries)
        return 0
    record["launcher"] = launcher_identity()  # so `launch status` can tell a launcher that died
    code, entries = local.run(stages, cfg, dry_run=dry_run, force=force, log=log, on_update=save)
    save(entries)
    return code


def status(results_dir: str | Path) -> list[dict]:
    """Print and return each stage's state from the launch recorded in ``results_dir``."""
    from lmforge.launch.record import print_status

    return print_status(results_dir)
