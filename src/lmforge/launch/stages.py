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
  ``data``, ``val_data``, ``method``, ``out`` (default: the stage's results folder), ``trainer``, ``peft``, ...),
  or NeMo's peft body (``model.restore_from_path``, ``model.peft.*``, ``model.data.train_ds.*``, ...) translated
  by :mod:`lmforge.launch.nemo_peft`.
* ``alignment`` - ``lmforge align <config>`` with the keys of that command's config (``model``, ``data``,
  ``method``, ``out`` (default: the stage's results folder), ``align``, ``peft``, ``trainer``, ...).
* ``conversion``, ``evaluation``, ``export`` - ``lmforge convert|evaluate|export ARGS... --OPTION VALUE``
  from the stage's ``args:`` list and ``options:`` mapping.

Any stage may set ``command:`` to run another lmforge subcommand.

NeMo Launcher's stage names map onto these kinds (:data:`NEMO_STAGES`): ``peft`` is a ``fine_tuning``
stage with a PEFT method (default lora; ``method: full`` is refused), ``prompt_learning`` one with
``ptuning``, ``adapter_learning`` with ``adapter``, ``ia3_learning`` with ``ia3``; ``conversion_hf2nemo`` is
a ``conversion`` stage running ``lmforge export ... --format nemo``; NeMo-Aligner's ``rlhf_rm`` is an
``alignment`` stage with ``method: rm``, ``dpo`` one with a preference method (dpo by default) and ``rlhf_ppo`` one
with ``method: ppo`` (lmforge's keys, or NeMo Launcher's ``actor``/``critic`` body translated by
:mod:`lmforge.launch.nemo_ppo`); ``steerlm_reg`` one with ``method: regression_rm``, SteerLM's attribute model
(lmforge's keys, or NeMo Launcher's ``rw_sft`` body translated by :mod:`lmforge.launch.nemo_steerlm`). NeMo's
stages that lmforge does not have (``data_curation``, ...) are refused by name (:data:`NOT_BUILT`). ``evaluation.run.tasks``
(NeMo's ``all_tasks`` or a comma list) becomes ``--tasks``.
"""

from __future__ import annotations

import importlib
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
    "alignment": ("align", "config"),
    "conversion": ("convert", "args"),
    "evaluation": ("evaluate", "args"),
    "generation": ("generate", "args"),
    "export": ("export", "args"),
}

#: NeMo Launcher stage name -> (lmforge stage kind, the fine-tuning method it means, or None).
NEMO_STAGES: dict[str, tuple[str, Optional[str]]] = {
    "peft": ("fine_tuning", None),  # any PEFT method, lora by default
    "prompt_learning": ("fine_tuning", "ptuning"),
    "adapter_learning": ("fine_tuning", "adapter"),
    "ia3_learning": ("fine_tuning", "ia3"),
    "conversion_hf2nemo": ("conversion", None),
    "rlhf_rm": ("alignment", "rm"),  # NeMo-Aligner's reward model
    "dpo": ("alignment", None),  # NeMo-Aligner's DPO stage: dpo by default, or its variants
    "rlhf_ppo": ("alignment", "ppo"),  # NeMo-Aligner's PPO (actor + critic): lmforge align --method ppo
    "steerlm_reg": ("alignment", "regression_rm"),  # SteerLM's attribute model (NeMo's rw_sft/training_rm)
}
PREFERENCE_METHODS = ("dpo", "ipo", "rpo", "kto", "orpo", "simpo")
PEFT_METHODS = ("lora", "ptuning", "adapter", "ia3")

#: NeMo Launcher stages lmforge does not have: stage name -> why.
NOT_BUILT: dict[str, str] = {
    "data_curation": "NeMo Curator's data curation is not part of lmforge (prepare JSONL and use data_preparation)",
    "fw_inference": "NeMo's framework inference stage is not part of lmforge (use a generation stage)",
}

#: NeMo's evaluation task names in ``run.tasks: all_tasks`` (lmforge evaluate's built-in tasks).
NEMO_ALL_TASKS = "lambada,boolq,race,piqa,hellaswag,winogrande,wikitext2,wikitext103"


def stage_kind(name: str) -> str:
    """The lmforge kind of a stage name (``peft`` -> ``fine_tuning``; lmforge's own names map to themselves)."""
    return NEMO_STAGES[name][0] if name in NEMO_STAGES else name


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

    @property
    def stop_markers(self) -> Path:
        """Where the ranks of a torchrun stage that stop to resume leave their markers (:mod:`lmforge.stop_markers`):
        torchrun exits 1 when they exit 75, and the executors read that as 75 when every rank's marker is there."""
        return self.results_dir.resolve() / ".stopped_to_resume"

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
        if name in NOT_BUILT:
            raise ConfigError(f"stage {name!r} is not available: {NOT_BUILT[name]}; remove {name} from `stages`")
        if name not in STAGE_KINDS and name not in NEMO_STAGES:
            raise ConfigError(f"unknown stage {name!r} in `stages`; known stages: {', '.join(STAGE_KINDS)} "
                              f"(NeMo's names: {', '.join(NEMO_STAGES)})")
        if cfg.get(name) is None:
            raise ConfigError(f"stage {name!r} has no config: add `- {name}: NAME` to the defaults list of "
                              f"config.yaml (a file conf/{name}/NAME.yaml) or a `{name}:` section")
        stages.append(_BUILDERS[stage_kind(name)](cfg, name, commands))
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
    from lmforge.launch import dataprep

    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    body.setdefault("data_dir", str(cfg.data_dir))
    array = run["array"]
    if dataprep.is_nemo_body(body):  # NeMo's download_gpt3_pile: local preprocessing of NN.jsonl, one task each
        workers = int(cfg.get("cluster", {}).get("cpus_per_task") or 1)
        body = dataprep.from_nemo(body, stage, str((cfg.get("_choices") or {}).get(stage) or ""), workers,
                                  cfg["_notes"])
        if array not in (None, False):
            array = True  # NeMo's array ids are the file numbers; lmforge's tasks index the input list
        raw_run = (cfg.get(stage) or {}).get("run") or {}
        if raw_run.get("bcp_preproc_npernode") is not None:
            cfg["_notes"].append(f"{stage}.run.bcp_preproc_npernode applies to NGC Base Command clusters only; on "
                                 f"Slurm each array task preprocesses one file, as NeMo does there")
    shards = dataprep.check_config(body, where=stage)
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
        if run["node_array_size"] is not None:  # NeMo's: at most this many array tasks at once
            if "%" in array_spec:
                raise ConfigError(f"{stage}.run.array={array_spec!r} already limits the tasks at once; remove "
                                  f"{stage}.run.node_array_size or the %N")
            array_spec = f"{array_spec}%{run['node_array_size']}"
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
    command = str(body.pop("command", STAGE_KINDS[stage_kind(stage)][0]))
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


#: NeMo's stage bodies that are translated: ``model.*`` key -> what it becomes. "arg": the model (positional);
#: "option:NAME": ``--NAME``; "dtype": ``--dtype``; "note": accepted, with a note why lmforge needs nothing;
#: "variable": sizes the job through interpolations (``run.nodes``).
NEMO_BODIES: dict[str, dict[str, str]] = {
    "evaluation": {"checkpoint_folder": "arg", "eval_batch_size": "option:batch_size", "precision": "dtype",
                   "model_type": "note", "hparams_file": "note", "tensor_model_parallel_size": "variable",
                   "pipeline_model_parallel_size": "variable", "model_parallel_size": "variable",
                   "pipeline_model_parallel_split_rank": "variable"},
    "conversion": {"checkpoint_folder": "arg", "checkpoint_name": "latest", "model_type": "note",
                   "hparams_file": "note", "vocab_file": "note", "merge_file": "note", "tokenizer_model": "note",
                   "tensor_model_parallel_size": "variable", "pipeline_model_parallel_size": "variable",
                   "model_parallel_size": "variable"},
}
_NEMO_DTYPES = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "16": "float16", "16-mixed": "float16",
                "fp16": "float16", "32": "float32", "fp32": "float32", "32-true": "float32"}
_NOTES = {"model_type": "lmforge reads the architecture from the checkpoint's own config",
          "hparams_file": "an lmforge checkpoint carries its config (config.json)",
          "vocab_file": "the checkpoint's own tokenizer files go into the archive",
          "merge_file": "the checkpoint's own tokenizer files go into the archive",
          "tokenizer_model": "the checkpoint's own tokenizer files go into the archive"}


def _nemo_model_body(cfg: DictConfig, stage: str, run: dict, body: dict) -> None:
    """Rewrite a NeMo Launcher evaluation/conversion body (``model.checkpoint_folder``, ...) into ``args`` and
    ``options`` in place: evaluation -> ``lmforge evaluate CHECKPOINT_FOLDER --tasks ... --batch-size ...``;
    conversion (NeMo's checkpoint -> .nemo) -> ``lmforge export CHECKPOINT_FOLDER RESULTS/NEMO_FILE_NAME --format
    nemo``. Conversion's sizes (tensor/pipeline parallel) only size the job; evaluation's
    ``tensor_model_parallel_size`` N > 1 is NeMo's split of the model over N GPUs: ``--tensor-parallel-size N``
    (one process that starts the N ranks: :func:`_tensor_parallel_job`), and a pipeline split is refused. A key
    with no translation is refused."""
    kind = stage_kind(stage)
    table = NEMO_BODIES[kind]
    model = body.pop("model")
    if body.get("args"):
        raise ConfigError(f"{stage}.model.checkpoint_folder and {stage}.args both name the model; keep one")
    options = dict(body.get("options") or {})
    notes = cfg["_notes"]
    for key, value in model.items():
        how = table.get(key)
        if how is None:
            raise ConfigError(f"{stage}.model.{key}: lmforge translates NeMo's {kind} keys "
                              f"{', '.join(table)}; remove {key} or write the stage as args/options (docs/launcher.md)")
        if how == "option:batch_size" and value is not None:
            options.setdefault("batch_size", value)
        elif how == "dtype" and value is not None:
            if str(value) not in _NEMO_DTYPES:
                raise ConfigError(f"{stage}.model.precision={value!r}: use one of {', '.join(_NEMO_DTYPES)}")
            options.setdefault("dtype", _NEMO_DTYPES[str(value)])
        elif how == "latest" and value not in (None, "latest"):
            raise ConfigError(f"{stage}.model.checkpoint_name={value!r}: lmforge converts the newest complete "
                              f"checkpoint of checkpoint_folder (checkpoint_name: latest); point checkpoint_folder "
                              f"at the step_* folder you want instead")
        elif how == "note" and value is not None:
            notes.append(f"{stage}.model.{key} is not needed: {_NOTES[key]}")
    if kind == "evaluation":
        tp = int(model.get("tensor_model_parallel_size") or 1)
        pp = int(model.get("pipeline_model_parallel_size") or 1)
        if pp > 1:
            raise ConfigError(f"{stage}.model.pipeline_model_parallel_size={pp}: lmforge evaluate splits a model by "
                              f"tensor parallelism only; set pipeline_model_parallel_size: 1 and "
                              f"tensor_model_parallel_size: {tp * pp} (the same {tp * pp} GPUs of one node)")
        body["args"] = [str(model["checkpoint_folder"])]
        options.setdefault("output", str(Path(run["results_dir"]) / "results.json"))
        if tp > 1:
            if int(options.get("tensor_parallel_size") or tp) != tp:
                raise ConfigError(f"{stage}.model.tensor_model_parallel_size={tp} and {stage}.options."
                                  f"tensor_parallel_size={options['tensor_parallel_size']} disagree; keep one")
            options["tensor_parallel_size"] = tp
            notes.append(f"{stage}: model.tensor_model_parallel_size={tp} splits the model over {tp} GPUs as in "
                         f"NeMo: one `lmforge evaluate --tensor-parallel-size {tp}` process starts the {tp} ranks "
                         f"(run.ntasks_per_node 1, {tp} GPUs)")
    else:
        name = str(run.get("nemo_file_name") or "megatron_gpt.nemo")
        body["command"] = body.get("command") or "export"
        body["args"] = [str(model["checkpoint_folder"]), str(Path(run["results_dir"]) / name)]
        options.setdefault("format", "nemo")
    body["options"] = options


def _drop_variables(cfg: DictConfig, stage: str, body: dict, section: str) -> None:
    """Remove ``body[section]`` when it only holds variables other values interpolate (NeMo's stage files size
    their jobs from ``model.tensor_model_parallel_size`` etc.: ``nodes: ${divide_ceil:${evaluation.model.
    model_parallel_size}, 4}``); a key nothing uses is refused, naming it."""
    if not isinstance(body.get(section), dict):
        return
    referenced = set(cfg.get("_referenced") or ())
    unused = [k for k in body[section] if k not in referenced]
    if unused:
        raise ConfigError(f"{stage}.{section}.{unused[0]}: a {stage} stage runs `lmforge "
                          f"{STAGE_KINDS[stage_kind(stage)][0]}` from its args and options; {section}.* keys are "
                          f"accepted only as variables that an interpolation uses (such as run.nodes from "
                          f"{section}.tensor_model_parallel_size); give the model and settings in args/options "
                          f"(docs/launcher.md)")
    del body[section]


def _build_args_stage(cfg: DictConfig, stage: str, commands) -> Stage:
    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    nemo_body = isinstance(body.get("model"), dict) and "checkpoint_folder" in body["model"] \
        and stage_kind(stage) in NEMO_BODIES
    if nemo_body:
        _nemo_model_body(cfg, stage, run, body)
    _drop_variables(cfg, stage, body, "model")
    unknown = sorted(set(body) - set(ARGS_KEYS))
    if unknown:
        raise ConfigError(f"{stage}.{unknown[0]}: a {stage} stage takes {', '.join(ARGS_KEYS)} "
                          f"(args: positional arguments, options: --option values) besides run")
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"{stage}.options must be a mapping of option -> value (e.g. {{to: hf}})")
    options = dict(options or {})
    default = STAGE_KINDS[stage_kind(stage)][0]
    if stage == "conversion_hf2nemo":  # NeMo's HF -> .nemo conversion
        default = "export"
        options.setdefault("format", "nemo")
    command = str(body.get("command") or default)
    _check_command(stage, command, commands)
    if run.get("tasks") is not None:  # NeMo's evaluation.run.tasks
        if "tasks" in options:
            raise ConfigError(f"{stage}.run.tasks and {stage}.options.tasks both give the tasks; keep one")
        tasks = str(run["tasks"])
        options["tasks"] = NEMO_ALL_TASKS if tasks == "all_tasks" else tasks
    args = body.get("args") or []
    if not isinstance(args, list):
        args = [args]
    nodes, tasks, gpus = _resources(stage, run, None, None, None)
    try:
        tp = int(options.get("tensor_parallel_size") or 1)
    except (TypeError, ValueError):
        raise ConfigError(f"{stage}.options.tensor_parallel_size={options['tensor_parallel_size']!r}: give a whole "
                          f"number of GPUs") from None
    if tp > 1:
        nodes, tasks, gpus = _tensor_parallel_job(stage, run, tp, nodes, nemo_body)
    elif nemo_body and stage_kind(stage) == "evaluation" and run["gpus_per_node"] is None:
        gpus = tasks  # NeMo's evaluation runs one process per GPU
    return Stage(kind=stage, name=run["name"], results_dir=Path(run["results_dir"]),
                 module_args=["-m", "lmforge", *command.split(), *map(str, args), *_option_args(stage, options)],
                 nodes=nodes, ntasks_per_node=tasks, gpus_per_node=gpus, time_seconds=run["time_seconds"],
                 dependency=run["dependency"])


def _tensor_parallel_job(stage: str, run: dict, tp: int, nodes: int, nemo_body: bool) -> tuple[int, int, int]:
    """Nodes, processes per node and GPUs per node of a command given ``--tensor-parallel-size tp`` (evaluate,
    generate, serve): one process on one node, which starts the ``tp`` ranks itself, and ``tp`` GPUs. NeMo's run
    block counts the ranks as its tasks (``ntasks_per_node: ${divide_ceil:...model_parallel_size...}``): that count
    becomes the one process; a run block of lmforge's own asking for more processes is refused."""
    if nodes > 1:
        raise ConfigError(f"{stage}: tensor parallel size {tp} asks for {nodes} nodes, but lmforge's tensor "
                          f"parallelism runs on one node (the command starts its ranks there); use a size of at most "
                          f"the GPUs of one node")
    if not nemo_body and run["ntasks_per_node"] not in (None, 1):
        raise ConfigError(f"{stage}.run.ntasks_per_node={run['ntasks_per_node']}: with tensor_parallel_size {tp} the "
                          f"command starts its own {tp} processes; set run.ntasks_per_node: 1")
    gpus = run["gpus_per_node"] if run["gpus_per_node"] is not None else tp
    if gpus < tp:
        raise ConfigError(f"{stage}.run.gpus_per_node={gpus} is fewer than the tensor parallel size {tp} (one GPU a "
                          f"rank); give it {tp} GPUs")
    return 1, 1, gpus


def _build_fine_tuning(cfg: DictConfig, stage: str, commands) -> Stage:
    """``lmforge finetune <results>/fine_tuning_config.yaml``: the stage's keys are the command's own
    (``model``, ``data``, ``val_data``, ``method``, ``out``, ``trainer``, ``peft``, ...), checked at launch.

    ``out`` defaults to the stage's results folder (the adapter lands in ``<out>/adapter``); nodes and
    processes come from ``trainer.num_nodes`` and ``trainer.devices`` as for training.
    """
    from lmforge.finetune.config import load_finetune_config

    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    from lmforge.launch.nemo_peft import is_nemo_body, translate

    if is_nemo_body(body):  # NeMo's peft file (model.restore_from_path, model.peft.*, model.data.train_ds.*)
        body = translate(stage, body, cfg["_notes"])
    if stage in NEMO_STAGES:  # NeMo's peft / prompt_learning / ...: a PEFT method
        meant = NEMO_STAGES[stage][1]
        method = body.setdefault("method", meant or "lora")
        if (meant and method != meant) or (not meant and method not in PEFT_METHODS):
            want = meant or " | ".join(PEFT_METHODS)
            raise ConfigError(f"{stage}.method={method!r}: a {stage} stage trains {want}; use the fine_tuning "
                              f"stage for method={method}")
    return _config_stage(stage, run, body, commands, "finetune", load_finetune_config)


#: The alignment stages: the methods each trains (the first is its default), the module that translates NeMo
#: Launcher's body for it (None: lmforge's keys only), and the two halves of its refusal of another method.
ALIGN_STAGES = {
    "rlhf_rm": (("rm",), None, "an rlhf_rm stage trains a reward model (method rm)",
                "a dpo stage for method={method}"),
    "dpo": (PREFERENCE_METHODS, None, "a dpo stage trains one of " + ", ".join(PREFERENCE_METHODS),
            "an rlhf_rm stage for a reward model"),
    "rlhf_ppo": (("ppo",), "nemo_ppo", "an rlhf_ppo stage trains with PPO (method ppo)",
                 "an alignment stage for method={method}"),
    "steerlm_reg": (("regression_rm",), "nemo_steerlm",
                    "a steerlm_reg stage trains SteerLM's attribute model (method regression_rm)",
                    "an alignment stage for method={method}, a fine_tuning stage with sft.attributes for the "
                    "attribute-conditioned SFT"),
}


def _build_alignment(cfg: DictConfig, stage: str, commands) -> Stage:
    """``lmforge align <results>/<stage>_config.yaml``: the stage's keys are the command's own (``model``, ``data``,
    ``val_data``, ``method``, ``out``, ``align``, ``peft``, ``trainer``, ...), checked at launch. NeMo-Aligner's
    ``rlhf_rm`` trains a reward model (``method: rm``); ``dpo`` a preference method (``dpo`` unless it says);
    ``rlhf_ppo`` runs PPO (``method: ppo``), its body lmforge's keys or NeMo Launcher's actor/critic sections;
    ``steerlm_reg`` trains SteerLM's attribute model (``method: regression_rm``), its body lmforge's keys or NeMo
    Launcher's ``rw_sft`` body."""
    from lmforge.align.config import load_align_config

    run = run_block(cfg, stage)
    body = stage_body(cfg, stage)
    if stage in ALIGN_STAGES:  # NeMo's stage names; lmforge's own `alignment` stage takes any method
        methods, translator, trains, instead = ALIGN_STAGES[stage]
        if translator is not None:
            nemo = importlib.import_module(f"lmforge.launch.{translator}")
            if nemo.is_nemo_body(body):  # NeMo Launcher's own body for this stage
                body = nemo.translate(stage, body, cfg["_notes"])
        method = body.setdefault("method", methods[0])
        if method not in methods:
            raise ConfigError(f"{stage}.method={method!r}: {trains}; use {instead.format(method=method)}")
    return _config_stage(stage, run, body, commands, "align", load_align_config)


def _config_stage(stage: str, run: dict, body: dict, commands, default_command: str, load) -> Stage:
    """A stage whose command reads one YAML config of its own keys (finetune, align): ``out`` defaults to the
    results folder, the processes come from ``trainer``, and every key is checked (``load``) at launch."""
    command = str(body.pop("command", default_command))
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
    if command == default_command:
        if "=" in config_file.name or "=" in str(config_file):
            # `lmforge finetune A=B` reads a first word holding "=" as an override, not as a file
            raise ConfigError(f"{stage}.run.results_dir={results}: `lmforge {command}` would read the config path "
                              f"{config_file} as an override because it contains '='; choose a folder without '='")
        try:
            load(body)  # every key checked now, not on the cluster
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
    "alignment": _build_alignment,
    "conversion": _build_args_stage,
    "evaluation": _build_args_stage,
    "generation": _build_args_stage,
    "export": _build_args_stage,
}
