"""FP8 loss check on one GPU (run by hand; never by the test suite): the same training in bf16 and in float8
(torchao, tensorwise and rowwise scaling), on real tokens, then the losses side by side.

Data: the Python standard library's own ``.py`` files (``sysconfig``'s stdlib folder, sorted, up to
``--max-text-mb``, default 12: about 3M tokens, more than 300 steps read), so it runs on a machine without
network. Tokenizer: a byte-level BPE trained on that text by lmforge's ``train_bpe`` (the ``tokenizers`` library;
``--vocab`` ids, ``<|endoftext|>`` between files), built in a temporary folder. The token stream is cut into
``seq + 1`` windows, shuffled once with a fixed seed: every run reads the same windows in the same order.

Model: the Llama-3.2-1B block shape (hidden 2048, 16 layers, 32 heads, 8 KV groups, ffn 8192; ``--shape 1b``) with
the tokenizer's vocabulary (tied head), or a tiny one for a CPU smoke run (``--shape tiny``). Same initial weights
in every run (``init_weights(seed=0)``), fp32 master weights, bf16 autocast, fused AdamW (CPU: plain AdamW, fp32),
cosine schedule with warm-up, gradient clipping 1.0, lmforge's real step (``Trainer.train_step``). The float8 runs
convert the block projections (``lmforge.train.fp8.apply_fp8``, what ``model.fp8=true`` does) before anything else.

Printed per run: the final loss, the mean of the last 20 losses, tokens/s (steps after the first 10); then for each
float8 run the relative difference of its last-20 mean from bf16's. All records are appended to
``$OUT/fp8_loss.json`` (a list; several invocations of one device call share the file).

    python benchmarks/fp8_loss.py                         # 300 steps: bf16, fp8 tensorwise, fp8 rowwise
    python benchmarks/fp8_loss.py --steps 100 --recipes rowwise
    python benchmarks/fp8_loss.py --shape tiny --steps 5 --no-fp8 --max-text-mb 0.3 --vocab 512   # CPU smoke run

Eager by default (torch.compile is ``--compile``): float8 without compile runs unfused scaling kernels, so its
tokens/s here is not float8's speed (benchmarks/train_throughput.py --fp8 measures that); the losses are the point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer, set_joint_projections
from lmforge.parallel.runtime import Runtime
from lmforge.parallel.transforms import apply_compile
from lmforge.train.loop import LoopSettings, MicroBatches, Trainer
from lmforge.train.objectives import CausalLMLoss
from lmforge.train.optim import build_optimizer, build_schedule

BLOCKS_1B = dict(hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=8192)
TINY = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)
COMMON = dict(normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
              rotary_base=500000.0, share_embeddings_and_output_weights=True, layernorm_epsilon=1e-5,
              hidden_dropout=0.0, attention_dropout=0.0)


def stdlib_texts(max_mb: float) -> list[str]:
    """The standard library's .py files (sorted paths), whole files, until ``max_mb`` MB of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_mb * 1e6:
            break
    if not texts:
        raise SystemExit(f"no .py files under {root}")
    return texts


def token_windows(texts: list[str], vocab: int, seq: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """(windows (N, seq + 1) int64 in a fixed shuffled order, vocabulary size) of ``texts`` under a byte-level BPE of
    ``vocab`` ids trained on them."""
    from lmforge.data.tokenizers import train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stdlib.txt"  # one line per training document (train_bpe reads plain text by lines)
        corpus.write_text("\n".join(t for text in texts for t in text.splitlines() if t.strip()), encoding="utf-8")
        tok = train_bpe([corpus], vocab, Path(tmp) / "tok")
    ids: list[int] = []
    for doc in tok.encode_batch(texts):
        ids.extend(doc)
        ids.append(tok.eod_id)
    stream = np.asarray(ids, dtype=np.int64)
    n = (len(stream) - 1) // seq
    windows = np.stack([stream[i * seq: i * seq + seq + 1] for i in range(n)])
    np.random.default_rng(seed).shuffle(windows)
    return windows, tok.vocab_size


class Windows:
    def __init__(self, data: np.ndarray):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def train(recipe, windows: np.ndarray, vocab: int, shape: str, steps: int, mbs: int, seq: int, lr: float,
          compile_blocks: bool, device: torch.device) -> dict:
    """``steps`` optimizer steps; ``recipe`` None (bf16) or a float8 recipe. Returns the record."""
    blocks = BLOCKS_1B if shape == "1b" else TINY
    cfg = ModelConfig(vocab_size=-(-vocab // 128) * 128, max_position_embeddings=max(seq, 64), **blocks, **COMMON)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.init_weights(seed=0)
    if recipe is not None:
        from lmforge.train.fp8 import apply_fp8, fp8_problem

        problem = fp8_problem(device)
        if problem:
            raise SystemExit(problem)
        apply_fp8(model, recipe)
    set_joint_projections(model)
    objective = CausalLMLoss(model)
    if compile_blocks:
        apply_compile(model)
        objective.compile_loss()
    cuda = device.type == "cuda"
    opt = build_optimizer(model, "fused_adam" if cuda else "adamw", lr, 0.01, [0.9, 0.95], 1e-8, device)
    settings = LoopSettings(max_steps=steps, micro_batch_size=mbs, global_batch_size=mbs, accumulate=1,
                            gradient_clip_val=1.0, precision="bf16-mixed" if cuda else "32")
    rt = Runtime(device=device)
    schedule = build_schedule("CosineAnnealing", lr, steps, warmup_steps=max(1, steps // 10), min_lr=lr / 10)
    trainer = Trainer(objective, model, opt, schedule, rt, settings)
    batches = MicroBatches(Windows(windows), settings, rt)
    if len(windows) < steps * mbs:
        print(f"note: {len(windows)} windows for {steps * mbs} rows: the data repeats (raise --max-text-mb)",
              flush=True)
    losses, timed_from = [], min(10, steps - 1)
    t0 = time.perf_counter()
    for step in range(steps):
        if step == timed_from:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss, _ = trainer.train_step(batches, step)
        losses.append(loss)  # on the device; read once at the end
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    values = torch.stack(losses).tolist()
    last = values[-20:]
    name = ("bf16" if cuda else "fp32") if recipe is None else f"fp8-{recipe}"
    rec = dict(case="fp8_loss", precision=name, shape=shape,
               vocab=cfg.vocab_size, steps=steps, mbs=mbs, seq=seq, lr=lr, compile=compile_blocks,
               final_loss=values[-1], mean_last20=sum(last) / len(last), first_loss=values[0],
               finite=all(math.isfinite(v) for v in values),
               tokens_per_s=round(mbs * seq * (steps - timed_from) / max(seconds, 1e-9)),
               losses_every_10=values[::10],
               card=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__)
    if cuda:
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    model = opt = objective = trainer = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--shape", choices=["1b", "tiny"], default="1b")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary trained on the text")
    ap.add_argument("--max-text-mb", type=float, default=12.0, help="standard-library text read (MB)")
    ap.add_argument("--recipes", nargs="+", default=["tensorwise", "rowwise"], choices=["tensorwise", "rowwise"])
    ap.add_argument("--no-fp8", action="store_true", help="the bf16 run only (a CPU smoke run)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block and the loss")
    ap.add_argument("--tag", default="", help="a label copied into every record")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not a.no_fp8:  # refused before any work (the bf16 run would come first)
        from lmforge.train.fp8 import fp8_problem

        problem = fp8_problem(device)
        if problem:
            raise SystemExit(f"{problem} (or pass --no-fp8 for the bf16 run alone)")
    t = time.perf_counter()
    windows, vocab = token_windows(stdlib_texts(a.max_text_mb), a.vocab, a.seq)
    print(json.dumps(dict(data="python stdlib .py", tokenizer=f"byte-level BPE ({vocab} ids, trained here)",
                          windows=len(windows), tokens=int(windows.shape[0] * a.seq),
                          prep_s=round(time.perf_counter() - t, 1))), flush=True)
    out = Path(os.environ.get("OUT", "."))
    path = out / "fp8_loss.json"
    results = json.loads(path.read_text()) if path.exists() else []
    runs = [None] + ([] if a.no_fp8 else list(a.recipes))
    done = {}
    for recipe in runs:
        rec = train(recipe, windows, vocab, a.shape, a.steps, a.mbs, a.seq, a.lr, a.compile, device)
        if recipe is not None and None in done:
            ref = done[None]["mean_last20"]
            rec["rel_diff_mean_last20_vs_bf16"] = (rec["mean_last20"] - ref) / ref
            rec["rel_diff_final_vs_bf16"] = (rec["final_loss"] - done[None]["final_loss"]) / done[None]["final_loss"]
            rec["speed_vs_bf16"] = rec["tokens_per_s"] / done[None]["tokens_per_s"]
        rec["tag"] = a.tag
        done[recipe] = rec
        print(json.dumps({k: v for k, v in rec.items() if k != "losses_every_10"}), flush=True)
        results.append(rec)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
