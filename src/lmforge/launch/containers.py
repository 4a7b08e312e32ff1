"""Containers: wrap a stage's command for apptainer/singularity, or give srun pyxis's options.

* ``apptainer`` / ``singularity``: ``apptainer exec [--nv] [--bind a,b] IMAGE.sif CMD...`` (``--nv``
  when the stage has GPUs); works on this machine and inside Slurm jobs.
* ``pyxis`` (Slurm only): ``srun --container-image=IMAGE --container-mounts=a,b ...``; the image is an
  enroot ``.sqsh`` file or a registry name (``nvcr.io#nvidia/pytorch:24.05-py3``). The working folder, the
  results folders and ``data_dir`` are mounted at their own paths before the users' ``container_mounts``.
* ``none``: the command runs with this machine's Python (the launcher's own interpreter).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from lmforge.errors import ConfigError


def _looks_like_file(image: str) -> bool:
    return image.startswith(("/", "./", "../", "~")) or image.endswith((".sif", ".sqsh", ".simg", ".img"))


def check_container(cfg: DictConfig) -> None:
    """A container runtime needs an image, and an image that is a file must exist (checked before submitting).

    Raises:
        ConfigError: an image without a runtime (it would silently run on the host), no image given, a missing
            image file, or pyxis outside Slurm.
    """
    runtime = cfg.container_runtime
    if runtime == "none":
        if cfg.get("container"):
            raise ConfigError(f"container={cfg.container} is set but container_runtime=none: the stages would run on "
                              f"this machine's Python, not in that image; set container_runtime=apptainer (a .sif "
                              f"file) or container_runtime=pyxis (Slurm), or remove container (container=null)")
        return
    image = cfg.container
    if not image:
        raise ConfigError(f"container_runtime={runtime} needs `container`: the image to run the stages in")
    image = str(image)
    if runtime == "pyxis" and cfg.cluster_type != "slurm":
        raise ConfigError("container_runtime=pyxis runs containers through srun and needs cluster_type=slurm; "
                          "use apptainer to run containers on this machine")
    if (runtime != "pyxis" or _looks_like_file(image)) and not Path(image).expanduser().is_file():
        raise ConfigError(f"container image {image} does not exist; build or pull it first "
                          f"(e.g. `apptainer pull lmforge.sif docker://...`) or fix `container`")


def python_executable(cfg: DictConfig) -> str:
    """The interpreter a stage runs: ``python`` from the config, else this one (``python3`` inside a container)."""
    if cfg.get("python"):
        return str(cfg.python)
    return "python3" if cfg.container_runtime != "none" else sys.executable


def mounts(cfg: DictConfig) -> list[str]:
    return [str(m) for m in cfg.container_mounts]


def wrap(argv: Sequence[str], cfg: DictConfig, gpus: int) -> list[str]:
    """``argv`` run inside the apptainer/singularity container (unchanged for none and pyxis)."""
    runtime = cfg.container_runtime
    if runtime not in ("apptainer", "singularity"):
        return list(argv)
    out = [runtime, "exec"]
    if gpus > 0:
        out.append("--nv")
    if mounts(cfg):
        out += ["--bind", ",".join(mounts(cfg))]
    return out + [str(cfg.container), *argv]


def _folders_to_mount(cfg: DictConfig, results_dirs: Sequence[Path]) -> list[Path]:
    """The folders a stage reads and writes at their own paths: the working folder (the job's ``cd`` and
    ``--container-workdir``), the stages' results folders, ``base_results_dir`` (the launcher creates these
    before it submits) and ``data_dir``."""
    folders = [Path.cwd(), *results_dirs]
    for key in ("base_results_dir", "data_dir"):
        if cfg.get(key):
            folders.append(Path(str(cfg[key])).expanduser())
    resolved = dict.fromkeys(f.resolve() for f in folders)
    return sorted(resolved, key=lambda f: len(f.parts))  # a folder before those inside it


def _data_dir(cfg: DictConfig) -> Path | None:
    return Path(str(cfg.data_dir)).expanduser().resolve() if cfg.get("data_dir") else None


def _same_path_sources(entries: Sequence[str]) -> list[Path]:
    """Sources of ``container_mounts`` entries mounted at their own path (``/a`` or ``/a:/a[:flags]``)."""
    out = []
    for entry in entries:
        parts = entry.split(":")
        if len(parts) == 1 or parts[0] == parts[1]:
            out.append(Path(parts[0]).expanduser().resolve())
    return out


def _srun_sets_mounts(cfg: DictConfig) -> bool:
    return any(str(a).startswith("--container-mounts") for a in (cfg.cluster.get("srun_args") or []))


def pyxis_mounts(cfg: DictConfig, results_dirs: Sequence[Path] = ()) -> tuple[list[str], list[str]]:
    """pyxis's ``--container-mounts`` entries and the warnings for folders that cannot be mounted.

    A pyxis container sees none of the host's folders unless mounted (NeMo's cluster files add
    ``--no-container-mount-home`` too), so the working folder, the results folders and ``data_dir`` are mounted
    at their own paths (a folder inside another mounted one once), then the users' ``container_mounts``.
    A ``data_dir`` missing at launch cannot be mounted (pyxis fails the job on a missing source);
    ``srun_args`` holding its own ``--container-mounts`` replaces these: each is a warning naming the folders.
    """
    user = mounts(cfg)
    folders = _folders_to_mount(cfg, results_dirs)
    if _srun_sets_mounts(cfg):
        listed = ", ".join(str(f) for f in folders)
        return [], [f"cluster.srun_args sets --container-mounts itself, so lmforge adds no mounts; the container "
                    f"must see {listed} (add them there, or move the mounts to container_mounts)"]
    covered = _same_path_sources(user)
    entries, warnings = [], []
    for folder in folders:
        if any(folder == c or c in folder.parents for c in covered):
            continue
        if folder == _data_dir(cfg) and not folder.is_dir():
            warnings.append(f"{folder} does not exist yet, so the pyxis container cannot mount it and what a stage "
                            f"writes there stays inside the container: create it before launching, or add a folder "
                            f"above it to container_mounts")
            continue
        entries.append(f"{folder}:{folder}")
        covered.append(folder)
    return entries + user, warnings


def srun_container_args(cfg: DictConfig, results_dirs: Sequence[Path] = ()) -> list[str]:
    """pyxis's srun options (empty for other runtimes): the image, the mounts (:func:`pyxis_mounts`), the workdir."""
    if cfg.container_runtime != "pyxis":
        return []
    out = [f"--container-image={cfg.container}"]
    entries, _ = pyxis_mounts(cfg, results_dirs)
    if entries:
        out.append(f"--container-mounts={','.join(entries)}")
    out.append(f"--container-workdir={Path.cwd()}")
    return out


def join(argv: Sequence[str]) -> str:
    """A shell command line for ``argv``; arguments holding ``${VAR}`` (the launcher's own) stay expandable."""
    return " ".join(str(a) if "${" in str(a) else shlex.quote(str(a)) for a in argv)
