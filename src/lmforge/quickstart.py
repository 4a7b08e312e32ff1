"""``lmforge quickstart``: the whole pretraining path on a corpus every machine has.

1. corpus: every module of the running Python's standard library, one JSON line per module;
2. a byte-level BPE tokenizer trained on it;
3. the Megatron indexed dataset (``lmforge preprocess``);
4. a small Llama-style model pretrained on it (sized up when a GPU is present);
5. validation loss and perplexity before and after, a code completion, a loss-curve PNG and
   ``summary.json`` in the output folder.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.io import write_json_atomic


@dataclass(frozen=True)
class Size:
    """One quickstart size: model shape and how long to train."""

    hidden: int
    layers: int
    heads: int
    groups: int
    ffn: int
    seq: int
    batch: int
    vocab: int
    steps: int
    lr: float
    max_bytes: int | None
    precision: str = "32"


SIZES = {
    # for tests: seconds
    "tiny": Size(hidden=64, layers=2, heads=4, groups=2, ffn=176, seq=64, batch=16, vocab=512, steps=150, lr=5e-3,
                 max_bytes=1_000_000),
    # a 2-core CPU: about 3 minutes
    "small": Size(hidden=192, layers=4, heads=6, groups=2, ffn=512, seq=128, batch=16, vocab=4096, steps=400,
                  lr=2e-3, max_bytes=6_000_000),
    # one GPU
    "gpu": Size(hidden=512, layers=8, heads=8, groups=4, ffn=1408, seq=512, batch=32, vocab=8192, steps=1000,
                lr=1e-3, max_bytes=None, precision="bf16-mixed"),
}

PROMPT = "import os\n\n\ndef "


def pick_size(size: str, device: str) -> str:
    if size != "auto":
        return size
    gpu = device in ("gpu", "cuda") or (device == "auto" and torch.cuda.is_available())
    return "gpu" if gpu else "small"


def run(out: str | Path = "quickstart_out", max_steps: int | None = None, max_bytes: int | None = None,
        device: str = "auto", size: str = "auto", console=None) -> dict:
    """Run the quickstart into ``out``; returns the summary written to ``out/summary.json``."""
    from rich.console import Console
    from rich.table import Table

    from lmforge.config import load_config
    from lmforge.data.corpus import stdlib_corpus
    from lmforge.data.preprocess import preprocess
    from lmforge.data.tokenizers import train_bpe
    from lmforge.models.generate import generate
    from lmforge.open import load_for_inference
    from lmforge.train.metrics import plot_loss_curve
    from lmforge.train.pretrain import run as pretrain

    console = console or Console()
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = pick_size(size, device)
    s = SIZES[name]
    steps = int(max_steps or s.steps)
    cap = max_bytes if max_bytes is not None else s.max_bytes

    console.rule(f"lmforge quickstart ({name} model) -> {out}")
    corpus = out / "corpus.jsonl"
    info = stdlib_corpus(corpus, max_bytes=cap)
    console.print(f"[1/5] corpus: {info['documents']} modules of the standard library ({info['bytes'] / 1e6:.1f} MB) "
                  f"from {info['root']}")
    tokenizer = train_bpe([corpus], s.vocab, out / "tokenizer", overwrite=True)  # a rerun rebuilds its own files
    console.print(f"[2/5] tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens")
    workers = 1 if info["bytes"] < 20_000_000 else max(1, min(8, (os.cpu_count() or 2) // 2))
    prep = preprocess([corpus], out / "data" / "stdlib", out / "tokenizer", append_eod=True, workers=workers,
                      log=lambda *a: None, overwrite=True)
    prefix = str(out / "data" / "stdlib_text_document")
    console.print(f"[3/5] indexed dataset: {prep.get('documents')} documents, {prep.get('tokens')} tokens -> {prefix}")

    overrides = [
        f"trainer.accelerator={device}", f"trainer.precision={s.precision}", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={max(1, steps // 4)}", "trainer.limit_val_batches=4", "trainer.limit_test_batches=0",
        f"trainer.log_every_n_steps={max(1, steps // 30)}", "trainer.gradient_clip_val=1.0",
        f"model.micro_batch_size={s.batch}", f"model.global_batch_size={s.batch}",
        f"model.encoder_seq_length={s.seq}", f"model.max_position_embeddings={s.seq}", f"model.data.seq_length={s.seq}",
        f"model.num_layers={s.layers}", f"model.hidden_size={s.hidden}", f"model.num_attention_heads={s.heads}",
        f"model.num_query_groups={s.groups}", f"model.ffn_hidden_size={s.ffn}",
        "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "model.make_vocab_size_divisible_by=64",
        f"model.optim.lr={s.lr}", f"model.optim.sched.min_lr={s.lr / 10}",
        f"model.optim.sched.warmup_steps={max(1, steps // 10)}", "model.optim.sched.constant_steps=0",
        f"model.data.data_prefix=[1.0,{prefix}]", "model.data.splits_string=95,5,0",
        f"model.tokenizer.model={out / 'tokenizer'}",
        f"exp_manager.explicit_log_dir={out / 'run'}", "exp_manager.resume_if_exists=false",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
    ]
    cfg = load_config("tiny/llama", overrides)
    console.print(f"[4/5] pretraining {s.layers} layers x {s.hidden} hidden, {steps} steps of {s.batch} x {s.seq} tokens")
    result = pretrain(cfg, console_log=console.print)

    model, tok = load_for_inference(result["checkpoint"], device=device if device != "gpu" else "cuda")
    new = generate(model, tok.encode(PROMPT), 64, temperature=0.7, top_p=0.95, seed=0, eod_id=tok.eod_id)
    sample = PROMPT + tok.decode(new)
    plot_loss_curve(out / "run" / "metrics.jsonl", out / "loss_curve.png", title="lmforge quickstart: loss")

    vb, va = result["val_loss_before"], result["val_loss_after"]
    summary = {
        "val_loss_before": vb,
        "val_loss_after": va,
        "val_ppl_before": math.exp(vb) if vb is not None else None,
        "val_ppl_after": math.exp(va) if va is not None else None,
        "tokens_trained": result["tokens_trained"],
        "seconds": round(time.perf_counter() - t0, 1),
        "sample": sample,
        "size": name,
        "steps": result["steps"],
        "checkpoint": result["checkpoint"],
        "loss_curve": str(out / "loss_curve.png"),
    }
    write_json_atomic(out / "summary.json", summary)

    console.print("[5/5] results")
    table = Table(show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("validation loss", f"{vb:.3f}", f"{va:.3f}")
    table.add_row("validation perplexity", f"{summary['val_ppl_before']:.1f}", f"{summary['val_ppl_after']:.1f}")
    console.print(table)
    console.print(f"tokens trained: {summary['tokens_trained']:,}   time: {summary['seconds']} s")
    console.print("completion of a code prompt (temperature 0.7, top-p 0.95, seed 0):")
    console.print(sample, markup=False, highlight=False)
    console.print(f"loss curve: {summary['loss_curve']}   summary: {out / 'summary.json'}   checkpoint: {result['checkpoint']}")
    console.print(f"next: lmforge generate {result['checkpoint']} --prompt 'def main():' --max-new-tokens 64")
    return summary
