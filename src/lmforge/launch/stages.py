"""Stages: what each one runs, on how many nodes and processes, and how it is checked before launch.

A stage of the launch config (``training``, ``data_preparation``, ...) becomes a :class:`Stage`: the
lmforge command it runs (arguments after ``python``), its resources from the ``run:`` block, the
config file the command reads (written into the stage's results folder), and whether it may be
stopped and requeued (training saves a checkpoint on SIGUSR1 and exits with code 75).

Stage kinds:

* ``data_preparation`` - ``python -m lmforge.launch.dataprep``: the standard-library corpus or given
  JSONL shards, tokenizer training, preprocessing to indexed datasets (a job array over shards).
* ``training`` - ``lmforge pretrain <config>`` with the stage's pretrain keys (``trainer``, ``model``, ...).
* ``fine_tuning`` - ``lmforge finetune <config>`` with the keys of that command's config (``model``,
  ``data``, ``val_data``, ``method``, ``out`` (default: the stage's results folder), ``trainer``, ``peft``, ...).
* ``conversion``, ``evaluation``, ``export`` - ``lmforge convert|evaluate|export ARGS... --OPTION VALUE``
  from the stage's ``args:`` list and ``options:`` mapping.

Any stage may set ``command:`` to run another lmforge subcommand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lmforge.errors import ConfigError, UserError
from lmforge.launch.config import run_block, stage_body

#: Stage kind -> (lmforge subcommand, how its config is passed: "config" file or "args").
STAGE_KINDS: dict[str, tuple[str, str]] = {
    "data_preparation": ("lmforge.launch.dataprep", "config"),
    "training": ("pretrain", "config"),
    "fine_tuning": ("finetune", "config"),
    "conversion": ("convert", "args"),
    "evaluation": ("evaluate", "args"),
    "generation": ("generate", "args"),
    "export": ("export", "args"),
}

#: Keys of an "args" stage's body that are the launcher's, not the command's.
ARGS_KEYS = ("command", "args", "options")


class StageUnavailableError(UserError):
    """A stage needs an lmforge command this installation does not have."""


@dataclass
class Stage:
    """One stage, ready for an executor.

    Attributes:
        kind: the stage key in the launch config (``training``).
        name: ``run.name``; the Slurm job name is the cluster's prefix + this.
        results_dir: where the stage writes its config, script, logs and completion marker.
        module_args: the command after ``python`` (``["-m", "lmforge", "pretrain", "<results>/training_config.yaml"]``).
        config_text: YAML written to ``config_file`` before the stage runs (None: no file).
        nodes, ntasks_per_node, gpus_per_node, time_seconds: resources.
        dependency: None (afterok on the stage before), ``"singleton"`` or an sbatch dependency string.
        array_count: tasks of a job array (None: not an array); ``array_spec`` is sbatch's ``--array`` value.
        resumable: the command saves and exits 75 on SIGUSR1; the job then requeues itself.
        preflight: run the all-reduce check across all ranks first.
    """

    kind: str
    name: str
    results_dir: Path
    module_args: list[str]
    config_file: Optional[Path] = None
    config_text: Optional[str] = None
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    time_seconds: int = 3600
    dependency: Optional[str] = None
    array_count: Optional[int] = None
    array_spec: Optional[str] = None
    resumable: bool = False
    preflight: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def distributed(self) -> bool:
        """Several processes: started through torchrun."""
        return self.world_size > 1

    def completion_markers(self) -> list[Path]:
        """The files whose presence means the stage completed (one per array task)."""
        if self.array_count:
            return [self.results_dir / f"COMPLETED.task{i}" for i in range(self.array_count)]
        return [self.results_dir / "COMPLETED"]

    def is_completed(self) -> bool:
        return all(p.is_file() for p in self.completion_markers())

    def write_config(self) -> None:
        """Write the stage's config file (atomically) into its results folder."""
        from lmforge.io import write_text_atomic

        self.results_dir.mkdir(parents=True, exist_ok=True)
        if self.config_file is not None and self.config_text is not None:
            write_text_atomic(self.config_file, self.config_text)


def available_commands() -> set[str]:
    """The subcommands of the ``lmforge`` CLI in this installation."""
    import argparse

    from lmforge.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def build_stages(cfg: DictConfig, check_commands: bool = True) -> list[Stage]:
    """The stages named in ``cfg.stages``, in order, checked before anything runs.

    Raises:
        ConfigError: an unknown stage (the known ones are listed), a stage with no config section,
            a bad ``run:`` block, GPUs not divisible by tensor x pipeline parallel size, ...
        StageUnavailableError: the stage's lmforge command does not exist in this installation.
    """
    names = [str(s) for s in cfg.stages]
    seen = set()
    commands = available_commands() if check_commands else None
    stages = []
    for name in names:
        if name in seen:
            raise ConfigError(f"stage {name!r} is listed twice in `stages`")
        seen.add(name)
        if name not in STAGE_KINDS:
            raise ConfigError(f"unknown stage {name!r} in `stages`; known stages: {', '.join(STAGE_KINDS)}")
        if cfg.get(name) is None:
            raise ConfigError(f"stage {name!r} has no config: add `- {name}: NAME` to the defaults list of "
                              f"config.yaml (a file conf/{name}/NAME.yaml) or a `{name}:` section")
        stages.append(_BUILDERS[name](cfg, name, commands))
    return stages


def _resources(stage: str, run: dict, nodes: Optional[int], gpus: Optional[int], tasks: Optional[int]) -> tuple[int, int, int]:
    """Nodes, processes per node and GPUs per node from the run block, checked against the stage's own numbers."""
    for key, own in (("nodes", nodes), ("gpus_per_node", gpus), ("ntasks_per_node", tasks)):
        if own is not None and run[key] is not None and run[key] != own:
            raise ConfigError(f"{stage}.run.{key}={run[key]} disagrees with the stage's own setting ({own}); "
                              f"set one of them (the trainer's numbers are enough for training)")
    n = run["nodes"] if run["nodes"] is not None else (nodes or 1)
    g = run["gpus_per_node"] if run["gpus_per_node"] is not None else (gpus or 0)
    t = run["ntasks_per_node"] if run["ntasks_per_node"] is not None else (tasks or max(g, 1))
    return n, t, g


def _check_command(stage: str, command: str, commands: Optional[set[str]]) -> None:
    if commands is not None and command not in commands:
        raise StageUnavailableError(
            f"stage {stage!r} needs `lmforge {command}`, which this installation of lmforge does not have yet; "
            f"remove {stage} from `stages` (available commands: {', '.join(sorted(commands))})")


def _yaml(body: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(body))


def _build_data_preparation(cfg: DictConfig, stage: str, commands) -> Stage:
    from lmforge.launch.dataprep import check_config

    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    body.setdefault("data_dir", str(cfg.data_dir))
    shards = check_config(body, where=stage)
    array = run["array"]
    array_count = array_spec = None
    if array not in (None, False):
        if body.get("corpus") == "stdlib" or not body.get("inputs"):
            raise ConfigError(f"{stage}.run.array runs one task per input shard: list the shards in {stage}.inputs "
                              f"(and set {stage}.corpus=null)")
        if (body.get("tokenizer") or {}).get("train", False):
            raise ConfigError(f"{stage}.run.array needs an existing tokenizer (tasks run at the same time): set "
                              f"{stage}.tokenizer.train=false and {stage}.tokenizer.path")
        array_count = shards
        array_spec = f"0-{shards - 1}" if array is True else str(array)
    nodes, tasks, gpus = _resources(stage, run, None, None, None)
    results = Path(run["results_dir"])
    config_file = results / f"{stage}_config.yaml"
    return Stage(kind=stage, name=run["name"], results_dir=results,
                 module_args=["-m", "lmforge.launch.dataprep", str(config_file)], config_file=config_file,
                 config_text=_yaml(body), nodes=nodes, ntasks_per_node=1, gpus_per_node=gpus,
                 time_seconds=run["time_seconds"], dependency=run["dependency"], array_count=array_count,
                 array_spec=array_spec)


def _build_training(cfg: DictConfig, stage: str, commands) -> Stage:
    from lmforge.config import load_config

    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    command = str(body.pop("command", STAGE_KINDS[stage][0]))
    _check_command(stage, command, commands)
    results = Path(run["results_dir"])
    em = body.setdefault("exp_manager", {}) or {}
    body["exp_manager"] = em
    em.setdefault("explicit_log_dir", str(results))
    em.setdefault("resume_if_exists", True)
    trainer = body.get("trainer") or {}
    model = body.get("model") or {}
    devices = int(trainer.get("devices", 1) or 1)
    num_nodes = int(trainer.get("num_nodes", 1) or 1)
    sizes = {k: int(model.get(f"{k}_model_parallel_size" if k != "context" else "context_parallel_size", 1) or 1)
             for k in ("tensor", "pipeline", "context", "expert")}
    split = sizes["tensor"] * sizes["pipeline"] * sizes["context"]
    if (devices * num_nodes) % split:
        raise ConfigError(f"{stage}: {num_nodes} node(s) x {devices} device(s) = {devices * num_nodes} GPUs is not "
                          f"divisible by tensor x pipeline x context parallel size = {sizes['tensor']} x "
                          f"{sizes['pipeline']} x {sizes['context']} = {split}; change {stage}.trainer.devices, "
                          f"{stage}.trainer.num_nodes or the parallel sizes")
    if (devices * num_nodes // split) % sizes["expert"]:
        raise ConfigError(f"{stage}: model.expert_model_parallel_size={sizes['expert']} must divide the "
                          f"data-parallel size {devices * num_nodes // split} (GPUs / (tensor x pipeline x context))")
    on_cpu = str(trainer.get("accelerator", "auto")).lower() == "cpu"
    nodes, tasks, gpus = _resources(stage, run, num_nodes, 0 if on_cpu else devices, devices)
    if command == "pretrain":
        load_config(body, source_name=f"{stage} config")  # every key checked now, not on the cluster
    config_file = results / f"{stage}_config.yaml"
    return Stage(kind=stage, name=run["name"], results_dir=results,
                 module_args=["-m", "lmforge", command, str(config_file)], config_file=config_file,
                 config_text=_yaml(body), nodes=nodes, ntasks_per_node=tasks, gpus_per_node=gpus,
                 time_seconds=run["time_seconds"], dependency=run["dependency"], resumable=True,
                 preflight=nodes * tasks > 1)


def _option_args(stage: str, options: Any) -> list[str]:
    if options is None:
        return []
    if not isinstance(options, dict):
        raise ConfigError(f"{stage}.options must be a mapping of option -> value (e.g. {{to: hf}})")
    out = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _build_args_stage(cfg: DictConfig, stage: str, commands) -> Stage:
    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    unknown = sorted(set(body) - set(ARGS_KEYS))
    if unknown:
        raise ConfigError(f"{stage}.{unknown[0]}: a {stage} stage takes {', '.join(ARGS_KEYS)} "
                          f"(args: positional arguments, options: --option values) besides run")
    command = str(body.get("command") or STAGE_KINDS[stage][0])
    _check_command(stage, command, commands)
    args = body.get("args") or []
    if not isinstance(args, list):
        args = [args]
    nodes, tasks, gpus = _resources(stage, run, None, None, None)
    return Stage(kind=stage, name=run["name"], results_dir=Path(run["results_dir"]),
                 module_args=["-m", "lmforge", *command.split(), *map(str, args), *_option_args(stage, body.get("options"))],
                 nodes=nodes, ntasks_per_node=tasks, gpus_per_node=gpus, time_seconds=run["time_seconds"],
                 dependency=run["dependency"])


def _build_fine_tuning(cfg: DictConfig, stage: str, commands) -> Stage:
    """``lmforge finetune <results>/fine_tuning_config.yaml``: the stage's keys are the command's own
    (``model``, ``data``, ``val_data``, ``method``, ``out``, ``trainer``, ``peft``, ...), checked at launch.

    ``out`` defaults to the stage's results folder (the adapter lands in ``<out>/adapter``); nodes and
    processes come from ``trainer.num_nodes`` and ``trainer.devices`` as for training.
    """
    from lmforge.finetune.config import load_finetune_config

    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    command = str(body.pop("command", STAGE_KINDS[stage][0]))
    _check_command(stage, command, commands)
    results = Path(run["results_dir"])
    body.setdefault("out", str(results))
    trainer = body.get("trainer") or {}
    if not isinstance(trainer, dict):
        raise ConfigError(f"{stage}.trainer must be a mapping (devices, num_nodes, accelerator, max_steps, ...)")
    devices = int(trainer.get("devices", 1) or 1)
    num_nodes = int(trainer.get("num_nodes", 1) or 1)
    on_cpu = str(trainer.get("accelerator", "auto")).lower() == "cpu"
    nodes, tasks, gpus = _resources(stage, run, num_nodes, 0 if on_cpu else devices, devices)
    config_file = results / f"{stage}_config.yaml"
    if command == "finetune":
        if "=" in config_file.name or "=" in str(config_file):
            # `lmforge finetune A=B` reads a first word holding "=" as an override, not as a file
            raise ConfigError(f"{stage}.run.results_dir={results}: `lmforge finetune` would read the config path "
                              f"{config_file} as an override because it contains '='; choose a folder without '='")
        try:
            load_finetune_config(body)  # every key checked now, not on the cluster
        except ConfigError as e:
            raise ConfigError(f"{stage}: {e}") from None
    return Stage(kind=stage, name=run["name"], results_dir=results,
                 module_args=["-m", "lmforge", command, str(config_file)], config_file=config_file,
                 config_text=_yaml(body), nodes=nodes, ntasks_per_node=tasks, gpus_per_node=gpus,
                 time_seconds=run["time_seconds"], dependency=run["dependency"], resumable=True,
                 preflight=nodes * tasks > 1)


_BUILDERS = {
    "data_preparation": _build_data_preparation,
    "training": _build_training,
    "fine_tuning": _build_fine_tuning,
    "conversion": _build_args_stage,
    "evaluation": _build_args_stage,
    "generation": _build_args_stage,
    "export": _build_args_stage,
}
