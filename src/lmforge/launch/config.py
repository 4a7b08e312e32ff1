"""The launcher's config: NeMo-Megatron-Launcher-shaped ``conf/config.yaml`` composed with omegaconf.

A launch config folder looks like NeMo's::

    conf/
      config.yaml                 defaults list, stages list, cluster_type, folders, container, cluster block
      data_preparation/stdlib.yaml
      training/tiny_llama.yaml    a ``run:`` block plus the stage's own config (pretrain keys)
      cluster/slurm.yaml          optional: the cluster block as its own group

``defaults`` is a list whose entries are ``_self_`` (the body of config.yaml) or ``GROUP: NAME``
(``conf/GROUP/NAME.yaml`` placed under the key ``GROUP``), merged in list order. Command-line
overrides are ``a.b.c=value`` (any key, e.g. ``training.trainer.num_nodes=2``) or ``GROUP=NAME``
(choose another file of a group). Interpolations such as ``${base_results_dir}`` resolve against
the composed whole.

NeMo Launcher configs load as their users write them: ``- override hydra/job_logging: stdout`` entries
of the defaults list and a ``hydra:`` section are Hydra's own (logging, output folders) and are ignored
with a note; ``launcher_scripts_path`` (``~`` expanded) feeds ``data_dir`` and ``base_results_dir``
through interpolations; ``cluster_type: bcm`` means Slurm; ``cluster.mem: 50`` means 50 GB (NeMo's
unit), written ``--mem=50G`` with a note; ``wandb_api_key_file`` exports ``WANDB_API_KEY`` to every
stage; ``numa_mapping.enable: true`` is refused (lmforge does not pin processes to NUMA nodes).
The notes collected while loading are in ``cfg._notes``; ``lmforge launch`` prints them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmforge.config.loader import _register_resolvers, parse_override
from lmforge.errors import ConfigError

#: Values of ``cluster_type``: ``bcm`` (NeMo's name for a Slurm cluster) means slurm.
CLUSTER_TYPES = {"local": "local", "slurm": "slurm", "bcm": "slurm"}
CONTAINER_RUNTIMES = ("none", "apptainer", "singularity", "pyxis")

#: Defaults for the top level of config.yaml (anything the user leaves out).
TOP_DEFAULTS: dict[str, Any] = {
    "stages": [],
    "cluster_type": "local",
    "base_results_dir": "results",
    "data_dir": "data",
    "python": None,  # the interpreter a stage runs (default: this one; in a container: python3)
    "container_runtime": "none",  # none | apptainer | singularity | pyxis
    "container": None,  # image: a .sif file (apptainer/singularity) or an image name/.sqsh (pyxis)
    "container_mounts": [],  # host[:container] paths
    "env_vars": {},
    "launcher_scripts_path": None,  # NeMo's: a folder other settings interpolate (${launcher_scripts_path}/data)
    "wandb_api_key_file": None,  # a file holding the W&B key: exported as WANDB_API_KEY to every stage
    "numa_mapping": {"enable": False},  # NeMo's NUMA pinning: only enable: false is accepted
    "cluster": {
        "partition": None,
        "account": None,
        "job_name_prefix": "lmforge:",
        "gpus_per_node": None,  # --gpus-per-node=N; null: --gres=gpu:N when gres is "gpu" (see below)
        "gres": None,  # null | "gpu" (write --gres=gpu:N instead of --gpus-per-node) | a literal gres string
        "cpus_per_task": None,
        "mem": None,  # e.g. 0 (all of the node), "64G"; a bare number is GB (NeMo's unit): 50 -> --mem=50G
        "gpus_per_task": None,  # --gpus-per-task=N (NeMo's bcm.yaml holds it, usually null)
        "exclusive": False,
        "qos": None,
        "signal_seconds": 120,  # --signal=B:USR1@<seconds>: save and requeue this long before the time limit
        "requeue": True,
        "srun_args": [],  # extra srun arguments for the stage's step, e.g. ["--mpi=pmix"]
        "sbatch_args": [],  # extra #SBATCH lines, e.g. ["--constraint=h100"]
        "rdzv_port": None,  # torchrun's c10d port on the head node (null: from the job id; the preflight uses +1)
    },
}

#: Defaults of every stage's ``run:`` block.
RUN_DEFAULTS: dict[str, Any] = {
    "name": None,  # default: the stage name
    "results_dir": None,  # default: ${base_results_dir}/<run.name>
    "time_limit": "01:00:00",
    "nodes": None,  # default 1 (training: trainer.num_nodes)
    "ntasks_per_node": None,  # processes per node (default: gpus_per_node, or 1)
    "gpus_per_node": None,  # default 0 (training: trainer.devices when the accelerator is not cpu)
    "dependency": None,  # null: afterok on the stage before | "singleton" | any sbatch dependency string
    "array": None,  # data preparation: true (one task per input shard) or "0-7%2"
    "node_array_size": None,  # data preparation: at most this many array tasks at once (NeMo's; --array=SPEC%N)
}

#: NeMo stage files also hold naming variables in ``run:`` (``model_train_name``, ``train_dir``, ...) that
#: other values interpolate; such a key is accepted when an interpolation uses it, and refused otherwise.
#: ``evaluation.run.tasks`` is NeMo's task list: it becomes ``lmforge evaluate --tasks``.
#: ``conversion.run.nemo_file_name`` names the .nemo file a NeMo-shaped conversion stage writes.
RUN_STAGE_KEYS = {"evaluation": ("tasks",), "conversion": ("nemo_file_name",),
                  "data_preparation": ("bcp_preproc_npernode",)}  # NGC Base Command only: a note on Slurm

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_limit(value: Any, where: str = "time_limit") -> int:
    """Seconds in a Slurm time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    Raises:
        ConfigError: the value is not one of those forms (or is zero).
    """
    text = str(value).strip()
    m = _TIME_RE.match(text)
    if isinstance(value, bool) or value is None or not m:
        raise ConfigError(f"{where}={value!r} is not a Slurm time limit; use HH:MM:SS, D-HH:MM:SS or minutes "
                          f"(e.g. 04:00:00 or 1-12:00:00)")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        seconds = int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 1:  # minutes
        seconds = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        seconds = parts[0] * 60 + parts[1]
    else:  # HH:MM:SS
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if seconds <= 0 or (len(parts) == 3 and days is None and (parts[1] >= 60 or parts[2] >= 60)):
        raise ConfigError(f"{where}={value!r} is not a usable time limit; use HH:MM:SS (e.g. 04:00:00)")
    return seconds


def format_time_limit(seconds: int) -> str:
    """``D-HH:MM:SS`` (or ``HH:MM:SS`` under a day), the form sbatch and people read best."""
    days, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"


def _read(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OmegaConfBaseException, Exception) as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not readable YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return cfg


def _group_options(conf_dir: Path, group: str) -> list[str]:
    folder = conf_dir / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")) if folder.is_dir() else []


def _is_hydra(group: str) -> bool:
    """A defaults entry of Hydra itself (``override hydra/job_logging``, ``hydra/launcher``)."""
    words = group.split()
    return bool(words) and (words[-1] == "hydra" or words[-1].startswith("hydra/"))


def _defaults_entries(body: DictConfig, path: Path, notes: Optional[list] = None) -> list[tuple[str, Optional[str]]]:
    """``[("_self_", None), ("training", "tiny_llama"), ...]`` from config.yaml's ``defaults`` list.

    Hydra's own entries (``- override hydra/job_logging: stdout``) are skipped with a note in ``notes``.
    """
    raw = OmegaConf.to_container(body.get("defaults", ListConfig(["_self_"])), resolve=False)
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: `defaults` must be a list such as [_self_, {{training: tiny_llama}}]")
    entries: list[tuple[str, Optional[str]]] = []
    for item in raw:
        if item == "_self_":
            entries.append(("_self_", None))
        elif isinstance(item, dict) and len(item) == 1:
            (group, name), = item.items()
            group = str(group).strip()
            if _is_hydra(group):
                if notes is not None:
                    notes.append(f"defaults entry `{group}: {name}` is Hydra's own (its logging and output "
                                 f"folders); lmforge launch does not use Hydra and ignores it")
                continue
            if group.startswith("override "):
                group = group[len("override "):].strip()
            entries.append((group.lstrip("+"), None if name is None else str(name)))
        else:
            raise ConfigError(f"{path}: defaults entry {item!r} is neither _self_ nor `GROUP: NAME`")
    if ("_self_", None) not in entries:
        entries.insert(0, ("_self_", None))
    return entries


def load_launch_config(config_path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``config.yaml``, its chosen stage files and ``overrides`` into one resolved config.

    Args:
        config_path: the launcher's ``config.yaml`` (stage files live in folders beside it).
        overrides: ``a.b.c=value`` or ``GROUP=NAME`` strings.

    Returns:
        The composed, resolved config; ``cluster_type`` is normalised to ``local`` or ``slurm``.

    Raises:
        ConfigError: a missing file, a malformed override, a group file that does not exist (the
            existing ones are listed), an unresolvable interpolation, or a bad top-level value.
    """
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.yaml"
    conf_dir = path.parent
    body = _read(path)
    notes: list[str] = []
    entries = _defaults_entries(body, path, notes)
    if "hydra" in body:
        notes.append(f"{path}: the `hydra:` section configures Hydra (run folders, logging); lmforge launch does "
                     f"not use Hydra and ignores it")
    groups = [g for g, _ in entries if g != "_self_"]

    choices: dict[str, Optional[str]] = {g: n for g, n in entries if g != "_self_"}
    dotted: list[tuple[str, Any]] = []
    for text in overrides:
        key, value = parse_override(text)
        if "." not in key and (key in groups or (conf_dir / key).is_dir()) and (value is None or isinstance(value, str)):
            if key not in groups:  # a group not in the defaults list: append it
                entries.append((key, None))
                groups.append(key)
            choices[key] = value
        else:
            dotted.append((key, value))

    body_plain = OmegaConf.masked_copy(body, [k for k in body.keys() if k not in ("defaults", "hydra")])
    merged = OmegaConf.create(TOP_DEFAULTS)
    for group, _ in entries:
        if group == "_self_":
            merged = OmegaConf.merge(merged, body_plain)
            continue
        name = choices.get(group)
        if name is None:
            continue
        file = conf_dir / group / f"{name}.yaml"
        if not file.is_file():
            options = _group_options(conf_dir, group)
            raise ConfigError(f"{group}={name}: no file {file}; "
                              + (f"choose one of {', '.join(options)}" if options else f"{conf_dir / group} has no .yaml files"))
        merged = OmegaConf.merge(merged, OmegaConf.create({group: _read(file)}))
    for key, value in dotted:
        try:
            OmegaConf.update(merged, key, value, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {key}={value!r}: {str(e).splitlines()[0]}") from None
    for key in ("launcher_scripts_path", "base_results_dir", "data_dir"):  # NeMo's ~/NeMo/launcher_scripts
        value = merged._get_node(key)._value() if key in merged else None
        if isinstance(value, str) and value.startswith("~"):
            merged[key] = str(Path(value).expanduser())
    merged["_referenced"] = sorted(_interpolated_names(merged))
    merged["_notes"] = notes
    merged["_conf_dir"] = str(conf_dir.resolve())
    _register_resolvers()  # NeMo's multiply, divide_ceil, divide_floor (stage files compute nodes with them)
    merged["_choices"] = {g: n for g, n in choices.items()}
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    _check_top(merged, path, groups)
    return merged


def _interpolated_names(cfg: DictConfig) -> set[str]:
    """Every key name that appears inside a ``${...}`` of the unresolved config (``${.model_train_name}`` ->
    ``model_train_name``), so a NeMo naming variable in a ``run:`` block counts as used."""
    text = OmegaConf.to_yaml(cfg, resolve=False)
    names = set()
    for inner in re.findall(r"\$\{([^{}]*)", text):
        names.update(re.findall(r"[A-Za-z_]\w*", inner.split(":", 1)[-1] if ":" in inner else inner))
    return names


#: Top-level keys that are neither settings nor stage sections: filled in by the loader.
_INTERNAL = ("_conf_dir", "_choices", "_referenced", "_notes")


def _check_top(cfg: DictConfig, path: Path, groups: Sequence[str] = ()) -> None:
    from lmforge.launch.stages import NEMO_STAGES, STAGE_KINDS

    known = set(TOP_DEFAULTS) | set(_INTERNAL) | set(STAGE_KINDS) | set(NEMO_STAGES) | set(groups)
    unknown = sorted(k for k in cfg.keys() if k not in known)
    if unknown:
        raise ConfigError(f"{path}: `{unknown[0]}` is neither a launcher setting nor a stage; settings: "
                          f"{', '.join(k for k in TOP_DEFAULTS if k != 'cluster')}, cluster; stages: "
                          f"{', '.join(STAGE_KINDS)}")
    cluster_unknown = sorted(set(cfg.cluster.keys()) - set(TOP_DEFAULTS["cluster"]))
    if cluster_unknown:
        raise ConfigError(f"cluster.{cluster_unknown[0]} is not a cluster setting; known: "
                          f"{', '.join(TOP_DEFAULTS['cluster'])}")
    mem = cfg.cluster.mem
    if isinstance(mem, bool) or (mem is not None and not isinstance(mem, (int, str))):
        raise ConfigError(f"cluster.mem={mem!r}: give GB as a number (50) or Slurm's form (64G, 500M, 0)")
    if isinstance(mem, int) and mem > 0:
        cfg.cluster.mem = f"{mem}G"
        cfg["_notes"].append(f"cluster.mem={mem} is read as {mem} GB (NeMo's unit): #SBATCH --mem={mem}G; "
                          f"write {mem}G or {mem * 1024}M to say it yourself")
    elif isinstance(mem, str) and not re.fullmatch(r"\d+[KMGT]?", mem.strip()):
        raise ConfigError(f"cluster.mem={mem!r} is not a Slurm memory size; use e.g. 50 (GB), 64G or 0 (the whole node)")
    numa = cfg.numa_mapping
    if numa is not None and not isinstance(numa, DictConfig):
        raise ConfigError("numa_mapping must be a mapping such as {enable: false}")
    if numa is not None and numa.get("enable", False):
        raise ConfigError("numa_mapping.enable=True: lmforge launch does not pin stage processes to NUMA nodes "
                          "(NeMo's numa_mapping); turn it off with numa_mapping.enable=False (on the command line or "
                          "in config.yaml) and pin with numactl in the stage's python setting if you need it")
    key_file = cfg.wandb_api_key_file
    if key_file is not None:
        key_path = Path(str(key_file)).expanduser()
        try:
            key = key_path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"wandb_api_key_file={key_file}: cannot read it ({e.strerror}); give the file holding "
                              f"your W&B API key, or set wandb_api_key_file=null") from None
        if not key or len(key.split()) != 1:
            raise ConfigError(f"wandb_api_key_file={key_file}: the file should hold one W&B API key and nothing else")
        cfg.wandb_api_key_file = str(key_path.resolve())
    ctype = str(cfg.cluster_type).lower()
    if ctype not in CLUSTER_TYPES:
        raise ConfigError(f"cluster_type={cfg.cluster_type!r} is not supported; use local or slurm (bcm means slurm)")
    cfg.cluster_type = CLUSTER_TYPES[ctype]
    runtime = str(cfg.container_runtime).lower()
    if runtime not in CONTAINER_RUNTIMES:
        raise ConfigError(f"container_runtime={cfg.container_runtime!r} is not supported; use one of "
                          f"{', '.join(CONTAINER_RUNTIMES)}")
    cfg.container_runtime = runtime
    stages = cfg.stages
    if isinstance(stages, str):
        cfg.stages = [stages]
    elif not isinstance(stages, (ListConfig, list)) or not stages:
        raise ConfigError(f"{path}: `stages` must be a non-empty list, e.g. [data_preparation, training]")
    mounts = cfg.container_mounts
    if mounts is None:
        cfg.container_mounts = []
    elif isinstance(mounts, str):
        cfg.container_mounts = [mounts]
    cfg.container_mounts = [m for m in cfg.container_mounts if m]  # NeMo's configs hold [null]


def run_block(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The stage's ``run:`` block with the launcher's defaults filled in (not yet the stage-specific ones)."""
    section = cfg.get(stage)
    run_node = section.get("run") if isinstance(section, DictConfig) else None
    raw = OmegaConf.to_container(run_node, resolve=True) if OmegaConf.is_config(run_node) else (run_node or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{stage}.run must be a mapping (name, results_dir, time_limit, nodes, ...)")
    from lmforge.launch.stages import stage_kind

    own = RUN_STAGE_KEYS.get(stage_kind(stage), ())
    referenced = set(cfg.get("_referenced") or ())
    unknown = sorted(k for k in set(raw) - set(RUN_DEFAULTS) - set(own) if k not in referenced)
    if unknown:
        raise ConfigError(f"{stage}.run.{unknown[0]} is not a run setting; known: {', '.join((*RUN_DEFAULTS, *own))} "
                          f"(NeMo's naming variables such as model_train_name are accepted where an interpolation "
                          f"uses them)")
    raw = {k: v for k, v in raw.items() if k in RUN_DEFAULTS or k in own}
    run = {**RUN_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    run["name"] = str(run["name"] or stage)
    run["results_dir"] = str(Path(run["results_dir"] or Path(str(cfg.base_results_dir)) / run["name"]).expanduser())
    run["time_seconds"] = parse_time_limit(run["time_limit"], f"{stage}.run.time_limit")
    for key in ("nodes", "ntasks_per_node", "gpus_per_node", "node_array_size"):
        value = run[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if key != "gpus_per_node" else 0)):
            raise ConfigError(f"{stage}.run.{key}={value!r} must be a whole number"
                              f"{' >= 1' if key != 'gpus_per_node' else ' >= 0'}")
    if run["node_array_size"] is not None and run["array"] in (None, False):
        raise ConfigError(f"{stage}.run.node_array_size={run['node_array_size']} limits the tasks of a job array "
                          f"running at once, but {stage}.run.array is not set")
    return run


def stage_body(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The stage's own config (everything but ``run:``) as plain, resolved Python values."""
    section = cfg.get(stage)
    body = OmegaConf.to_container(section, resolve=True) if section is not None else {}
    body.pop("run", None)
    return body
