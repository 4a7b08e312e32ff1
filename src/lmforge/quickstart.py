"""``lmforge quickstart``: the whole pretraining path on a corpus every machine has.

1. corpus: every module of the running Python's standard library, one JSON line per module;
2. a byte-level BPE tokenizer trained on it;
3. the Megatron indexed dataset (``lmforge preprocess``);
4. a small Llama-style model pretrained on it (sized up when a GPU is present), for as many steps as fit the
   time budget (:data:`DEFAULT_TIME_BUDGET`, measured on this machine; a deadline stops training after saving);
5. validation loss and perplexity before and after, a code completion, a loss-curve PNG and
   ``summary.json`` in the output folder.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

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

# The whole quickstart ends within 5 minutes on a slow or busy machine: the training steps are sized to what is
# left of this budget after the data steps (from the measured speed of the first steps), and a deadline
# (trainer.max_time) stops training after saving if the machine slows down further.
DEFAULT_TIME_BUDGET = 270.0
MIN_STEPS = 30  # fewer steps do not show perplexity falling
RESERVE_S = 20.0  # for what follows training: the final validation, loading the checkpoint, a sample, the plot
VALIDATION_SHARE = 0.2  # validation passes and checkpoint saves, as a share of the training time


def plan_steps(size_steps: int, seconds_left: float, seconds_per_step: float) -> int:
    """Training steps that fit ``seconds_left`` at ``seconds_per_step`` (validation and saving included),
    between :data:`MIN_STEPS` and the size's own step count."""
    fit = int(seconds_left * (1 - VALIDATION_SHARE) / max(seconds_per_step, 1e-6))
    return max(MIN_STEPS, min(size_steps, fit))


def measure_step_seconds(cfg, vocab_size: int, device: str, precision: str, budget_s: float = 1.0) -> float:
    """Seconds per optimizer step of the quickstart's model on this machine now: one warm-up step, then steps
    on random tokens until ``budget_s`` has passed (at least two)."""
    import torch

    from lmforge.config import model_config_from
    from lmforge.parallel.runtime import pick_device, training_precision
    from lmforge.train.loop import PRECISIONS
    from lmforge.train.pretrain import build_model

    dev = pick_device(device)
    model = build_model(model_config_from(cfg, vocab_size), dev, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = PRECISIONS[training_precision(precision, dev)[0]]
    gen = torch.Generator().manual_seed(0)
    m = cfg.model
    tokens = torch.randint(0, vocab_size, (int(m.micro_batch_size), int(m.data.seq_length) + 1), generator=gen)
    tokens = tokens.to(dev)

    def step():
        with torch.autocast(device_type=dev.type, dtype=amp, enabled=amp is not None):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocations, kernel selection
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < budget_s:
        step()
        n += 1
    return (time.perf_counter() - start) / n


def pick_size(size: str, device: str) -> str:
    if size != "auto":
        return size
    import torch

    gpu = device in ("gpu", "cuda") or (device == "auto" and torch.cuda.is_available())
    return "gpu" if gpu else "small"


def run(out: str | Path = "quickstart_out", max_steps: int | None = None, max_bytes: int | None = None,
        device: str = "auto", size: str = "auto", console=None, time_budget: float | None = DEFAULT_TIME_BUDGET) -> dict:
    """Run the quickstart into ``out``; returns the summary written to ``out/summary.json``.

    ``time_budget`` (seconds, whole quickstart): the training steps are sized to what the data steps left of it
    and training stops at that deadline after saving; ``max_steps`` fixes the step count instead (the deadline
    still holds). ``None`` or 0: no budget, the size's own step count.
    """
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

    def overrides_for(steps: int) -> list[str]:
        return _overrides(s, steps, device, prefix, out)

    steps, plan = int(max_steps or s.steps), "fixed" if max_steps else "the size's own"
    cfg = load_config("tiny/llama", overrides_for(steps))
    deadline_s = None
    if time_budget:
        left = time_budget - (time.perf_counter() - t0) - RESERVE_S
        if not max_steps:
            per_step = measure_step_seconds(cfg, tokenizer.vocab_size, device, s.precision)
            steps = plan_steps(s.steps, left, per_step)
            plan = f"sized to the {time_budget:.0f} s budget at {per_step:.2f} s/step"
        deadline_s = max(left, 10.0)
        cfg = load_config("tiny/llama", overrides_for(steps) + [f"trainer.max_time={_hms(deadline_s)}"])
    console.print(f"[4/5] pretraining {s.layers} layers x {s.hidden} hidden, {steps} steps of {s.batch} x {s.seq} "
                  f"tokens ({plan}" + (f"; training stops there, after saving, if it runs past {deadline_s:.0f} s" if deadline_s else "") + ")")
    # a stop at the deadline is this run's normal end: no "run the same command again to resume" line
    result = pretrain(cfg, console_log=lambda *a: None if str(a[0]).startswith("stopped at step") else console.print(*a))
    if result.get("time_limit_reached"):
        console.print(f"      training reached the time budget at step {result['steps']} of {steps} (saved there)")

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
        "planned_steps": steps,
        "time_budget": time_budget or None,
        "time_limit_reached": bool(result.get("time_limit_reached")),
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


def _overrides(s: Size, steps: int, device: str, prefix: str, out: Path) -> list[str]:
    """The tiny/llama recipe turned into the quickstart's run of ``steps`` steps."""
    return [
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


def _hms(seconds: float) -> str:
    """Seconds as Lightning's ``DD:HH:MM:SS`` (trainer.max_time)."""
    s = max(1, int(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
