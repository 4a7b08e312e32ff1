"""``lmforge launch CONFIG [overrides] [--dry-run] [--force]`` and ``lmforge launch status RESULTS_DIR``."""

from __future__ import annotations


def add_commands(sub) -> None:
    """Register ``launch`` on the lmforge CLI's subparsers."""
    p = sub.add_parser("launch", help="run a pipeline of stages from a launcher config, here or on Slurm",
                       description="lmforge launch CONFIG [a.b.c=value ...] [--dry-run] [--force]  |  "
                                   "lmforge launch status RESULTS_DIR")
    p.add_argument("config", help="the launcher's conf/config.yaml, or `status`")
    p.add_argument("overrides", nargs="*", help="dotted overrides (training.trainer.num_nodes=2, cluster_type=slurm) "
                   "or GROUP=NAME to choose a stage file; after `status`: the base results folder")
    p.add_argument("--dry-run", action="store_true", help="write and print the scripts/commands, run nothing")
    p.add_argument("--force", action="store_true", help="rerun stages already completed")
    p.set_defaults(func=_cmd_launch)


def _cmd_launch(a) -> int:
    from lmforge.errors import UserError
    from lmforge.launch import launch, status

    if a.config == "status":
        if len(a.overrides) != 1:
            raise UserError("usage: lmforge launch status RESULTS_DIR (the base_results_dir of a launch)")
        status(a.overrides[0])
        return 0
    return launch(a.config, a.overrides, dry_run=a.dry_run, force=a.force)
