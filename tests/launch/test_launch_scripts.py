"""sbatch scripts written by --dry-run: a 2-node x 4-GPU apptainer training job, gres, pyxis, arrays."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.launch import load_launch_config
from lmforge.launch.slurm import script
from lmforge.launch.stages import build_stages


def _training_conf(tmp_path, h, corpus, **top):
    body = h.training_body(corpus, devices=4, num_nodes=2, accelerator="gpu")
    body["run"]["time_limit"] = "1-02:00:00"
    body["model"]["global_batch_size"] = 96  # 4 per rank x 8 ranks x 3 accumulation
    return h.write_conf(tmp_path, {"stages": ["training"], "base_results_dir": str(tmp_path / "r"),
                                   "cluster_type": "slurm", **top}, {"training": body})


def test_two_node_four_gpu_apptainer_dry_run(tmp_path, launch_helpers, tiny_corpus, capsys, monkeypatch):
    image = tmp_path / "lmforge.sif"
    image.write_bytes(b"not really an image")
    path = _training_conf(tmp_path, launch_helpers, tiny_corpus, container_runtime="apptainer", container=str(image),
                          container_mounts=["/scratch:/scratch", "/data"],
                          cluster={"partition": "gpu", "account": "genetics", "exclusive": True, "mem": 0,
                                   "cpus_per_task": 8, "srun_args": ["--mpi=none"]})
    monkeypatch.setenv("PATH", str(tmp_path / "no-sbatch-here"))  # a dry run needs no Slurm
    assert main(["launch", str(path), "--dry-run"]) == 0
    text = (tmp_path / "r" / "tiny" / "training.sbatch").read_text()
    assert text in capsys.readouterr().out
    sbatch = re.findall(r"^#SBATCH (.*)$", text, re.M)
    for line in ["--job-name=lmforge:tiny", "--partition=gpu", "--account=genetics", "--time=1-02:00:00",
                 "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=0",
                 "--exclusive", f"--output={tmp_path}/r/tiny/slurm-%j.out", f"--error={tmp_path}/r/tiny/slurm-%j.err",
                 "--signal=B:USR1@120", "--requeue"]:
        assert line in sbatch, (line, sbatch)
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    # preflight: one srun task per GPU, inside the container, before the stage
    pre = next(l for l in text.splitlines() if "lmforge.launch.preflight" in l)
    assert "srun --nodes=2 --ntasks=8 --ntasks-per-node=4 --cpus-per-task=8 --mpi=none" in pre
    assert f"apptainer exec --nv --bind /scratch:/scratch,/data {image}" in pre
    assert "--store-host=${HEAD_NODE} --store-port=${PREFLIGHT_PORT} --node-names=${HOSTS}" in pre and "exit 1" in pre
    assert "RDZV_PORT=$((20000 + (SLURM_JOB_ID % 20000) * 2))" in text and "PREFLIGHT_PORT=$((RDZV_PORT + 1))" in text
    main_line = next(l for l in text.splitlines() if "torch.distributed.run" in l)
    assert text.index(pre) < text.index(main_line)
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=32 --mpi=none bash -c" in main_line
    assert f"apptainer exec --nv --bind /scratch:/scratch,/data {image} python3 -m torch.distributed.run" in main_line
    for arg in ["--nnodes=${SLURM_JOB_NUM_NODES}", "--nproc-per-node=4", "--rdzv-backend=c10d",
                "--rdzv-endpoint=${HEAD_NODE}:${RDZV_PORT}", "--rdzv-id=${SLURM_JOB_ID}",
                f"-m lmforge pretrain {tmp_path}/r/tiny/training_config.yaml"]:
        assert arg in main_line, arg
    assert 'trap "" USR1; exec ' in main_line
    assert 'if [ "$rc" -eq 75 ] || [ "$signals" -gt 0 ]; then' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert f'mv "{tmp_path}/r/tiny/COMPLETED.tmp" "{tmp_path}/r/tiny/COMPLETED"' in text
    # the config the job reads is written beside the script, with the results folder filled in
    import yaml

    written = yaml.safe_load((tmp_path / "r" / "tiny" / "training_config.yaml").read_text())
    assert written["trainer"]["num_nodes"] == 2 and written["exp_manager"]["explicit_log_dir"] == f"{tmp_path}/r/tiny"
    assert not (tmp_path / "r" / "launch.json").exists()  # nothing recorded: nothing was submitted


def test_gres_pyxis_and_overrides(tmp_path, launch_helpers, tiny_corpus):
    path = _training_conf(tmp_path, launch_helpers, tiny_corpus, container_runtime="pyxis",
                          container="nvcr.io#nvidia/pytorch:24.05-py3", container_mounts=["/scratch"],
                          cluster={"gres": "gpu:v100", "job_name_prefix": "gen-"})
    cfg = load_launch_config(path, ["training.trainer.num_nodes=3", "cluster.signal_seconds=300",
                                    "cluster.rdzv_port=31000"])
    stage = build_stages(cfg, check_commands=False)[0]
    text = script(stage, cfg)
    assert "#SBATCH --gres=gpu:v100:4" in text and "--gpus-per-node" not in text
    assert "#SBATCH --nodes=3" in text and "#SBATCH --job-name=gen-tiny" in text
    assert "#SBATCH --signal=B:USR1@300" in text and "RDZV_PORT=31000" in text
    results = tmp_path / "r"
    assert (f"'--container-image=nvcr.io#nvidia/pytorch:24.05-py3' --container-mounts={Path.cwd()}:{Path.cwd()},"
            f"{results}:{results},/scratch --container-workdir={Path.cwd()}") in text
    assert "apptainer" not in text


def test_pyxis_mounts_the_working_and_results_folders(tmp_path, launch_helpers, tiny_corpus, capsys, monkeypatch):
    """NeMo's `container_mounts: [null]` and `--no-container-mount-home`: the job still sees the folder it runs in,
    the results and data_dir (at their own paths, a folder inside a mounted one not again); a folder that cannot be
    mounted, or srun_args mounting by themselves, is a warning naming the folder."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", str(tmp_path / "no-sbatch-here"))  # a dry run needs no Slurm
    path = _training_conf(tmp_path, launch_helpers, tiny_corpus, container_runtime="pyxis",
                          container="nvcr.io/nvidia/nemo:24.03.framework", container_mounts=[None],
                          base_results_dir=str(elsewhere / "results"), data_dir=str(work / "data"),
                          cluster={"srun_args": ["--no-container-mount-home"]})
    assert main(["launch", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    results = elsewhere / "results"
    text = (results / "tiny" / "training.sbatch").read_text()
    mounts = re.findall(r"--container-mounts=(\S+)", text)
    # the preflight's srun and the stage's: the working folder (data_dir is inside it), the results (tiny inside)
    assert mounts == [f"{work}:{work},{results}:{results}"] * 2, text
    assert f"--container-workdir={work}" in text and "None" not in text and "[launch] warning" not in out

    # the users' own mounts come after these; a data_dir that does not exist yet outside them cannot be mounted
    assert main(["launch", str(path), "--dry-run", "container_mounts=[/scratch,/data:/data]",
                 f"data_dir={elsewhere / 'data'}"]) == 0
    out = capsys.readouterr().out
    text = (results / "tiny" / "training.sbatch").read_text()
    assert re.findall(r"--container-mounts=(\S+)", text)[0] == f"{work}:{work},{results}:{results},/scratch,/data:/data"
    assert f"[launch] warning: {elsewhere / 'data'} does not exist yet, so the pyxis container cannot mount it" in out
    (elsewhere / "data").mkdir()
    assert main(["launch", str(path), "--dry-run", f"data_dir={elsewhere / 'data'}"]) == 0
    assert "[launch] warning" not in capsys.readouterr().out
    assert f",{elsewhere / 'data'}:{elsewhere / 'data'} " in (results / "tiny" / "training.sbatch").read_text()

    # srun_args with their own --container-mounts: lmforge adds none and says what the container must see
    assert main(["launch", str(path), "--dry-run", "cluster.srun_args=[--container-mounts=/lustre]"]) == 0
    out = capsys.readouterr().out
    text = (results / "tiny" / "training.sbatch").read_text()
    assert re.findall(r"--container-mounts=(\S+)", text) == ["/lustre"] * 2
    assert (f"[launch] warning: cluster.srun_args sets --container-mounts itself, so lmforge adds no mounts; the "
            f"container must see {work}, {results}, {work}/data, {results}/tiny") in out


def test_data_preparation_array(tmp_path, launch_helpers, tiny_corpus):
    shards = [str(tmp_path / f"shard{i}.jsonl") for i in range(3)]
    path = launch_helpers.write_conf(
        tmp_path, {"stages": ["data_preparation"], "base_results_dir": str(tmp_path / "r"), "cluster_type": "slurm"},
        {"data_preparation": {"run": {"array": True, "dependency": "singleton"}, "corpus": None, "inputs": shards,
                              "tokenizer": {"path": str(tiny_corpus["tokenizer"]), "train": False}}})
    cfg = load_launch_config(path)
    stage = build_stages(cfg)[0]
    text = script(stage, cfg)
    assert "#SBATCH --array=0-2" in text and "slurm-%A_%a.out" in text
    assert "COMPLETED.task${SLURM_ARRAY_TASK_ID}" in text
    assert "--requeue" not in text  # only resumable stages requeue
    assert [m.name for m in stage.completion_markers()] == ["COMPLETED.task0", "COMPLETED.task1", "COMPLETED.task2"]


def test_array_with_tokenizer_training_is_refused(tmp_path, launch_helpers):
    import pytest

    from lmforge.errors import ConfigError

    path = launch_helpers.write_conf(
        tmp_path, {"stages": ["data_preparation"], "base_results_dir": str(tmp_path / "r")},
        {"data_preparation": {"run": {"array": True}, "corpus": None, "inputs": ["a.jsonl", "b.jsonl"],
                              "tokenizer": {"path": "tok", "train": True, "vocab_size": 256}}})
    with pytest.raises(ConfigError, match="needs an existing tokenizer"):
        build_stages(load_launch_config(path))


def test_nemo_divide_ceil_sizes_the_job_from_the_parallel_layout(tmp_path, launch_helpers, tiny_corpus):
    """A NeMo Launcher stage file computes its nodes from the model-parallel size (``divide_ceil``, ``multiply``):
    TP 2 x PP 2 on 2-GPU nodes is 2 nodes of 2 tasks, started by one torchrun per node with a c10d rendezvous."""
    body = launch_helpers.training_body(tiny_corpus, devices=2, accelerator="gpu")
    body["model"].update(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, global_batch_size=96,
                         share_embeddings_and_output_weights=False)
    body["run"]["nodes"] = ("${divide_ceil:${multiply:${training.model.tensor_model_parallel_size}, "
                            "${training.model.pipeline_model_parallel_size}}, ${training.trainer.devices}}")
    body["trainer"]["num_nodes"] = "${training.run.nodes}"
    path = launch_helpers.write_conf(tmp_path, {"stages": ["training"], "base_results_dir": str(tmp_path / "r"),
                                                "cluster_type": "slurm"}, {"training": body})
    cfg = load_launch_config(path)
    stage = build_stages(cfg, check_commands=False)[0]
    assert (stage.nodes, stage.ntasks_per_node, stage.gpus_per_node) == (2, 2, 2)
    text = script(stage, cfg)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=2" in text
    main_line = next(line for line in text.splitlines() if "torch.distributed.run" in line)
    for arg in ["--nnodes=${SLURM_JOB_NUM_NODES}", "--nproc-per-node=2", "--rdzv-backend=c10d",
                "--rdzv-endpoint=${HEAD_NODE}:${RDZV_PORT}"]:
        assert arg in main_line, arg
    from lmforge.config.loader import _divide_ceil, _divide_floor

    assert (_divide_ceil(8, 4), _divide_ceil(9, 4), _divide_floor(9, 4), _divide_floor(1, 2)) == (2, 3, 2, 0)


FAKE_SRUN = """#!/bin/bash
# srun's stand-in: the preflight passes; the stage, as torchrun whose workers exited 75, leaves the stop markers of
# the ranks in $FAKE_STOPPED and exits 1
case "$*" in *lmforge.launch.preflight*) exit 0 ;; esac
mkdir -p "$LMFORGE_STOP_MARKERS"
for r in $FAKE_STOPPED; do touch "$LMFORGE_STOP_MARKERS/rank-$r"; done
exit 1
"""

FAKE_SCONTROL = """#!/bin/bash
case "$1" in show) echo node1 ;; requeue) echo "$2" >> "$REQUEUED" ;; esac
"""


@pytest.mark.parametrize("stopped, requeued", [("0 1 2 3", True), ("0 1 3", False)])
def test_a_torchrun_job_requeues_when_every_rank_stopped_to_resume(tmp_path, launch_helpers, tiny_corpus, monkeypatch,
                                                                  stopped, requeued):
    """torchrun exits 1 when its workers exit 75 (saved a checkpoint and stopped to resume, e.g. at trainer.max_time,
    where no SIGUSR1 came): the batch script reads that as 75 and requeues the job when all 2 x 2 ranks left their
    stop markers, and reports the failure when one did not. The script runs under bash with stand-ins for srun
    and scontrol."""
    body = launch_helpers.training_body(tiny_corpus, devices=2, num_nodes=2, accelerator="gpu")
    body["model"]["global_batch_size"] = 16
    conf = launch_helpers.write_conf(tmp_path, {"stages": ["training"], "base_results_dir": str(tmp_path / "r"),
                                                "cluster_type": "slurm"}, {"training": body})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-sbatch-here"))  # a dry run needs no Slurm
    assert main(["launch", str(conf), "--dry-run"]) == 0
    monkeypatch.undo()
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_STOPPED": stopped,
           "REQUEUED": str(tmp_path / "requeued"), "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_JOB_NUM_NODES": "2"}
    p = subprocess.run(["bash", str(tmp_path / "r" / "tiny" / "training.sbatch")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    markers = tmp_path / "r" / "tiny" / ".stopped_to_resume"
    assert not markers.exists()  # never left for the next run to misread
    if requeued:
        assert p.returncode == 0, p.stdout + p.stderr
        assert "stopped after saving a checkpoint (exit 75): requeueing job 123" in p.stdout
        assert (tmp_path / "requeued").read_text() == "123\n"
    else:
        assert p.returncode == 1 and "lmforge: stage failed with exit code 1" in p.stderr, p.stdout + p.stderr
        assert not (tmp_path / "requeued").exists()
