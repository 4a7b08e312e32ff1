"""Containers: wrap a stage's command for apptainer/singularity, or give srun pyxis's options.

* ``apptainer`` / ``singularity``: ``apptainer exec [--nv] [--bind a,b] IMAGE.sif CMD...`` (``--nv``
  when the stage has GPUs); works on this machine and inside Slurm jobs.
* ``pyxis`` (Slurm only): ``srun --container-image=IMAGE --container-mounts=a,b ...``; the image is an
  enroot ``.sqsh`` file or a registry name (``nvcr.io#nvidia/pytorch:24.05-py3``).
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


def srun_container_args(cfg: DictConfig) -> list[str]:
    """pyxis's srun options (empty for other runtimes)."""
    if cfg.container_runtime != "pyxis":
        return []
    out = [f"--container-image={cfg.container}"]
    if mounts(cfg):
        out.append(f"--container-mounts={','.join(mounts(cfg))}")
    out.append(f"--container-workdir={Path.cwd()}")
    return out


def join(argv: Sequence[str]) -> str:
    """A shell command line for ``argv``; arguments holding ``${VAR}`` (the launcher's own) stay expandable."""
    return " ".join(str(a) if "${" in str(a) else shlex.quote(str(a)) for a in argv)
