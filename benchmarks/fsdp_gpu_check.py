"""FSDP on a GPU, end to end through the pretraining stage (run by hand; the CPU suite cannot reach these paths).

Builds a small corpus from this Python's standard library, a tokenizer and an indexed dataset, then runs
``lmforge pretrain tiny/llama`` on the GPU with ``model.fsdp=true model.fsdp_cpu_offload=true`` (the one FSDP
layout that wraps on one process), bf16-mixed and ``async_save=true`` (NCCL for training, gloo for the
background writes): 20 steps, then the same run folder resumed to 30 steps, then the sharded checkpoint read
back whole. Prints one JSON line and writes $OUT/fsdp_gpu_check.json when OUT is set.

    PYTHONPATH=src python3 benchmarks/fsdp_gpu_check.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.data.corpus import stdlib_corpus
from lmforge.data.preprocess import preprocess
from lmforge.data.tokenizers import train_bpe
from lmforge.train.checkpoint import load_model
from lmforge.train.pretrain import run


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="lmforge_fsdp_gpu_"))
    stdlib_corpus(root / "corpus.jsonl", max_bytes=4_000_000)
    train_bpe([root / "corpus.jsonl"], 4096, root / "tok")
    preprocess([root / "corpus.jsonl"], root / "data" / "corpus", root / "tok", append_eod=True, log=lambda *a: None)
    common = [f"model.data.data_prefix=[1.0,{root}/data/corpus_text_document]", f"model.tokenizer.model={root}/tok",
              "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "model.fsdp=true",
              "model.fsdp_cpu_offload=true", "exp_manager.checkpoint_callback_params.async_save=true",
              "trainer.val_check_interval=10", f"exp_manager.explicit_log_dir={root}/run",
              "exp_manager.create_tensorboard_logger=false"]
    lines = []
    first = run(load_config("tiny/llama", common + ["trainer.max_steps=20"]), console_log=lines.append)
    second = run(load_config("tiny/llama", common + ["trainer.max_steps=30"]), console_log=lines.append)
    ckpt = Path(second["checkpoint"])
    weights, config = load_model(ckpt)
    rec = dict(case="fsdp_gpu_check", gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
               offload_message=[l for l in lines if "FSDP" in l][:1],
               first_val=(first["val_loss_before"], first["val_loss_after"]), first_checkpoint=first["checkpoint"],
               resumed_from=second["resumed_from"], second_val_after=second["val_loss_after"],
               sharded=bool(config.get("sharded")), model_files=sorted(p.name for p in (ckpt / "model").iterdir())
               if (ckpt / "model").is_dir() else None,
               finite=all(bool(torch.isfinite(t).all()) for t in weights.values()), n_tensors=len(weights))
    print(json.dumps(rec), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fsdp_gpu_check.json").write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
