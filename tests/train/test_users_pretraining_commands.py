"""The users' three pretraining commands (../shared/notes/nemo_user_commands.md, section 2), run verbatim (the
2-node one in test_users_pretraining_two_nodes.py: a file of its own, so that pytest-xdist runs it beside these).

NeMo's 1-GPU command line is embedded below character for character, the 4-GPU and 2-node variants as the notes
give them (their keys replace the base list's, "rest as above"). Each list goes to `lmforge pretrain` unchanged,
run from a folder holding the relative files it names (gpt2-vocab.json, gpt2-merges.txt trained here,
hfbpe_gpt_training_data_text_document written by the users' own preprocess command), with only APPENDED
overrides that shrink it to a tiny CPU model and a few steps. 1 GPU: one process; 4 GPUs: torchrun, 4 gloo ranks,
TP 4; 2 nodes: two torchrun launchers (c10d rendezvous on 127.0.0.1), 8 ranks, TP 8. Every key of the lists acts
with NeMo's meaning, checked in what the runs write (fp16 with loss scaling, derived accumulation, the schedule's
constant tail, top-k checkpoints by val_loss, init std / dropout / epsilon in the checkpoint's model config).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from tests.conftest import free_port, stdlib_texts
from tests.data.test_preprocess_megatron_flags import USERS_COMMAND as PREPROCESS_COMMAND
from tests.data.test_tokenizer_formats import write_gpt2_files
from tests.train.test_pretrain import _env, _losses

# nemo_user_commands.md, section 2: the 1-GPU command, verbatim (the line after the #SBATCH line)
ONE_GPU = r"""singularity exec --nv nemo_24.03.sif python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_pretraining.py \
  --config-path=conf/ --config-name=megatron_gpt_config \
  trainer.devices=1 trainer.num_nodes=1 trainer.max_epochs=null trainer.max_steps=300000 \
  trainer.val_check_interval=300 trainer.log_every_n_steps=50 trainer.limit_val_batches=50 \
  trainer.limit_test_batches=50 trainer.accumulate_grad_batches=1 trainer.precision=16 \
  model.micro_batch_size=6 model.global_batch_size=192 \
  model.tensor_model_parallel_size=1 model.pipeline_model_parallel_size=1 \
  model.max_position_embeddings=1024 model.encoder_seq_length=1024 model.hidden_size=768 \
  model.ffn_hidden_size=3072 model.num_layers=12 model.num_attention_heads=12 model.init_method_std=0.021 \
  model.hidden_dropout=0.1 model.layernorm_epsilon=1e-5 \
  model.tokenizer.vocab_file=gpt2-vocab.json model.tokenizer.merge_file=gpt2-merges.txt \
  model.data.data_prefix=[1.0,hfbpe_gpt_training_data_text_document] model.data.num_workers=1 \
  model.data.seq_length=1024 model.data.splits_string=\'980,10,10\' \
  model.optim.name=fused_adam model.optim.lr=6e-4 model.optim.betas=[0.9,0.95] model.optim.weight_decay=0.1 \
  model.optim.sched.name=CosineAnnealing model.optim.sched.warmup_steps=750 \
  model.optim.sched.constant_steps=80000 model.optim.sched.min_lr=6e-5 \
  exp_manager.resume_if_exists=True exp_manager.resume_ignore_no_checkpoint=True \
  exp_manager.create_checkpoint_callback=True exp_manager.checkpoint_callback_params.monitor=val_loss \
  exp_manager.checkpoint_callback_params.save_top_k=3 exp_manager.checkpoint_callback_params.mode=min \
  exp_manager.checkpoint_callback_params.always_save_nemo=False
"""
# the same section's variants: "with `...`, rest as above"
FOUR_GPUS = "trainer.devices=4 model.tensor_model_parallel_size=4 model.data.num_workers=2"
TWO_NODES = """trainer.devices=4 trainer.num_nodes=2 model.micro_batch_size=32 model.global_batch_size=192
  model.tensor_model_parallel_size=8 model.num_attention_heads=16"""
RECIPE = "gpt3/126m"  # NeMo's megatron_gpt_config.yaml: GPT-3 126m (learned positions, LayerNorm, GELU, biases)
# appended to each list: a tiny CPU model, a few steps, one batch per validation and test, every step validated
# (hidden 48: 12 and 16 heads divide it; fp16 matmuls are slow on a CPU, so the shape is kept this small)
APPENDED = ["trainer.accelerator=cpu", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", "model.num_layers=2", "model.hidden_size=48",
            "model.ffn_hidden_size=96", "model.encoder_seq_length=16", "model.max_position_embeddings=16",
            "model.data.seq_length=16", "model.optim.sched.warmup_steps=1", "model.optim.sched.constant_steps=1"]
SRC = Path(__file__).resolve().parents[2] / "src"  # the runs start in other folders: import this checkout's lmforge
DATA_FILES = ("gpt2-vocab.json", "gpt2-merges.txt", "hfbpe_gpt_training_data_text_document.bin",
              "hfbpe_gpt_training_data_text_document.idx")


def users_overrides(variant: str = "") -> list[str]:
    """The overrides after ``--config-name`` as the shell passes them, the variant's keys replacing the base's."""
    words = shlex.split(ONE_GPU.replace("\\\n", ""))  # the shell drops each backslash-newline
    overrides = words[words.index("--config-name=megatron_gpt_config") + 1:]
    keys = [o.split("=", 1)[0] for o in overrides]
    changes = dict(word.split("=", 1) for word in variant.split())
    assert set(changes) <= set(keys), set(changes) - set(keys)
    return [f"{key}={changes[key]}" if key in changes else o for key, o in zip(keys, overrides)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """GPT-2 vocab/merges trained here and the users' preprocess command's indexed dataset (one worker here)."""
    root = tmp_path_factory.mktemp("users_data")
    texts = stdlib_texts()
    with open(root / "train_data.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    write_gpt2_files(root, texts)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(shlex.split(PREPROCESS_COMMAND.replace("--workers=32", "--workers=1"))[1:]) == 0
    finally:
        os.chdir(cwd)
    return root


def _workdir(data: Path, tmp_path: Path) -> Path:
    """A folder holding the files the users' relative paths name (as their job's working folder would)."""
    for name in DATA_FILES:
        (tmp_path / name).symlink_to(data / name)
    return tmp_path


def _run_env() -> dict:
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def _pretrain(work: Path, args: list[str], nproc: int = 1) -> str:
    """`lmforge pretrain RECIPE ARGS` from ``work`` (torchrun with ``nproc`` gloo ranks); returns its output."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                      f"--master-port={free_port()}", "--master-addr=127.0.0.1"]
    cmd = [sys.executable, *launcher, "-m", "lmforge", "pretrain", RECIPE, *args]
    p = subprocess.run(cmd, env=_run_env(), cwd=work, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def _check_common(out: Path, log: str, steps: int, accumulate: int) -> None:
    """What every list asks for: NeMo's accumulation, fp16 with a loss scaler, no key silently ignored."""
    assert "trainer.accumulate_grad_batches=1 is NeMo's fixed value" in log  # ignored as NeMo ignores it: a note
    assert "lmforge ignores" not in log  # every other key acts
    assert "precision 16-mixed" in log
    assert f"accumulate_grad_batches: {accumulate}" in (out / "config.yaml").read_text()
    assert _losses(out, "consumed_samples") == {s: 192 * s for s in range(1, steps + 1)}
    last = out / "checkpoints" / f"step_{steps:07d}"
    assert json.loads((last / "training_state" / "state.json").read_text())["grad_scaler"]  # loss scaling acted
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["test_loss"])  # limit_test_batches: the test split is scored at the end


def test_users_one_gpu_command(data, tmp_path):
    work = _workdir(data, tmp_path)
    log = _pretrain(work, [*users_overrides(), *APPENDED, "trainer.max_steps=4"])
    out = work / "results" / "megatron_gpt"  # exp_manager's defaults: exp_dir results, name megatron_gpt
    assert "on 1 process(es): data parallel 1" in log
    _check_common(out, log, steps=4, accumulate=32)  # 192 / (6 x 1)
    # optim.sched.constant_steps=1: the last step holds min_lr, the one before is still decaying
    lr = _losses(out, "lr")
    assert lr[4] == pytest.approx(6e-5) and lr[3] > 6e-5 * 1.5
    # checkpoint_callback_params: monitor val_loss, mode min, save_top_k 3 (plus the newest, for resuming)
    ckpts = json.loads((out / "checkpoints" / "checkpoints.json").read_text())
    assert (ckpts["monitor"], ckpts["mode"]) == ("val_loss", "min")
    val = {s: v for s, v in _losses(out, "val_loss").items() if s > 0}
    expected = set(sorted(val, key=val.get)[:3]) | {4}
    kept = {int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")}
    assert kept == expected and len(kept) == 3
    assert not list(out.rglob("*.nemo"))  # always_save_nemo=False
    model = json.loads((out / "checkpoints" / "step_0000004" / "config.json").read_text())["model"]
    assert (model["init_method_std"], model["hidden_dropout"], model["layernorm_epsilon"]) == (0.021, 0.1, 1e-5)
    assert model["vocab_size"] == 640  # the 600 tokens of gpt2-vocab.json, padded to a multiple of 128


def test_users_four_gpu_command(data, tmp_path):
    """torchrun --nproc-per-node=4 with TP 4, global 192, micro 6: data parallel 1, 32 micro batches a step (fp16
    over DTensor and plain gradients, fused AdamW over both: this command failed at its first step before)."""
    work = _workdir(data, tmp_path)
    log = _pretrain(work, [*users_overrides(FOUR_GPUS), *APPENDED, "trainer.max_steps=1",
                                "model.optim.sched.constant_steps=0"], nproc=4)
    assert "on 4 process(es): data parallel 1, tensor parallel 4" in log
    _check_common(work / "results" / "megatron_gpt", log, steps=1, accumulate=32)
