"""The README's FSDP commands, verbatim: 2-process FSDP pretraining with activation checkpointing, resumed on
one process, then the sharded checkpoint converted to an HF folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Models larger than one GPU"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = text[text.index(SECTION):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_fsdp_commands_run_verbatim(tiny_corpus, tmp_path):
    commands = readme_commands()
    assert len(commands) == 3 and commands[0].startswith("torchrun --nproc-per-node 2")
    (tmp_path / "data").mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_corpus["prefix"] + ext, tmp_path / "data" / f"corpus_text_document{ext}")
    shutil.copytree(tiny_corpus["tokenizer"], tmp_path / "tok")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    outputs = []
    for command in commands:
        p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        outputs.append(p.stdout + p.stderr)
    assert "FSDP full" in outputs[0]
    assert "resuming from" in outputs[1] and "step_0000020" in outputs[1]
    hf = load_file(str(tmp_path / "tiny_hf" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in hf and all(torch.isfinite(t).all() for t in hf.values())
