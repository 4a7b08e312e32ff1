"""Online RL on two GPUs, end to end (run by hand; the CPU suite reaches neither NCCL, DDP on CUDA nor the compiled
rollout engine on the FSDP copy).

Writes a 4-layer character-level model with random weights, eight prompts and a reward function into a scratch
folder, then runs ``lmforge align`` for GRPO and PPO (3 steps, fp32) on one GPU and on two ranks through torchrun,
data parallel (DDP) and FSDP (with gradient checkpointing), all with the default ``align.rollout_compile=auto``
(the compiled decode step on CUDA). Compares each two-rank run with the one-GPU run: the step losses and the final
weights. On a GPU the ranks' engines decode batches of other sizes than the one process's, so a sampled token may
flip and the runs part from there: expect equal losses at step 1 and near ones after, not bit-equal weights.

    PYTHONPATH=src python3 benchmarks/rl_multi_gpu_check.py            # needs 2 GPUs
    PYTHONPATH=src python3 benchmarks/rl_multi_gpu_check.py --cpu      # the same runs on CPU (gloo): exact parity

Prints one JSON line per case and writes them to $OUT/rl_multi_gpu_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz: "
REWARDS = "def distinct(prompts, completions, **fields):\n    return [len(set(c)) / 8 for c in completions]\n"
WORDS = ["abcd", "bcda", "cdab", "dabc", "efgh", "fghe", "ghef", "hefg"]
METHODS = {"grpo": ["--method", "grpo", "align.beta=0.05"],
           "ppo": ["--method", "ppo", "align.num_generations=2", "align.beta=0.05"]}
LAYOUTS = {"one_gpu": (1, []), "ddp2": (2, ["trainer.devices=2", "micro_batch_size=2"]),
           "fsdp2": (2, ["trainer.devices=2", "micro_batch_size=2", "fsdp=true", "fsdp_sharded_checkpoint=false",
                         "gradient_checkpointing=true"])}


def write_folder(root: Path) -> None:
    """The base model (``root/base``), ``prompts.jsonl`` and ``rewards.py``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.assembly import saved_state_dict
    from lmforge.train.checkpoint import save_model

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    (root / "tok").mkdir(parents=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tokenizer = load_tokenizer(root / "tok")
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, num_layers=4, num_attention_heads=8,
                      num_query_groups=4, ffn_hidden_size=512, max_position_embeddings=64, normalization="rmsnorm",
                      activation="swiglu", bias=False, position_embedding_type="rope",
                      share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_model(root / "base", saved_state_dict(model), cfg.to_dict(), tokenizer=tokenizer)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w + ":"}) + "\n" for w in WORDS))
    (root / "rewards.py").write_text(REWARDS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, out: str, nproc: int, args: list[str]) -> float:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                      f"--master-port={free_port()}", "--master-addr=127.0.0.1"]
    cmd = [sys.executable, *launcher, "-m", "lmforge", "align", "--out", out, *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    (root / out / "console.log").write_text(p.stdout + p.stderr)
    return time.perf_counter() - t0


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(sorted((folder / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo (a check of this script)")
    a = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmforge_rl_multi_"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                os.environ.get("PYTHONPATH", "")])
    write_folder(root)
    common = ["--model", "base", "--data", "prompts.jsonl", "--reward-fn", "rewards:distinct",
              "align.max_completion_length=8", "global_batch_size=8", "trainer.max_steps=3",
              "trainer.log_every_n_steps=1", "optim.lr=0.001", f"trainer.accelerator={'cpu' if a.cpu else 'gpu'}"]
    records = []
    for method, margs in METHODS.items():
        base = None
        for layout, (nproc, largs) in LAYOUTS.items():
            out = f"{method}_{layout}"
            seconds = run(root, out, nproc, common + margs + (largs or ["micro_batch_size=4"]))
            summary = json.loads((root / out / "summary.json").read_text())
            console = (root / out / "console.log").read_text()
            rec = dict(case="rl_multi_gpu_check", method=method, layout=layout, seconds=round(seconds, 1),
                       losses=[l for _, l in summary["losses"]],
                       rollouts=[l for l in console.splitlines() if l.startswith("rollouts:")][:2],
                       gpu=None if a.cpu else torch.cuda.get_device_name(0), torch=torch.__version__)
            if base is None:
                base = (rec["losses"], weights(root / out))
            else:
                mine = weights(root / out)
                rec["step1_loss_diff"] = abs(rec["losses"][0] - base[0][0])
                rec["max_weight_diff"] = max(float((mine[k] - base[1][k]).abs().max()) for k in base[1])
            print(json.dumps(rec), flush=True)
            records.append(rec)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "rl_multi_gpu_check.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
