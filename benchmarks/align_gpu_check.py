"""``lmforge align``'s online methods end to end on one GPU, at a realistic shape, through the real CLI (run by
hand; the CPU suite runs the ``tiny`` shape on CPU: tests/align/test_align_gpu_check.py).

Builds, in a scratch folder (``--workdir``, else a temporary one, removed at the end), what docs/alignment.md's
online-RL commands need, all offline:

* ``base/``: a model folder ``lmforge align --model`` takes, with random weights saved in bfloat16 safetensors:
  ``--shape 1b`` is Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192, RoPE base
  500000, the output head tied to the embedding) with the vocabulary of the tokenizer below (``--vocab``, 4096 by
  default: a 1B model's 128k-vocabulary head is not part of this check; the context line says ``vocab``);
  ``--shape tiny``: 2 layers, hidden 64.
* its tokenizer: a byte-level BPE (:func:`lmforge.data.tokenizers.train_bpe`) trained on the running Python's
  standard library source;
* ``prompts.jsonl``: small sums (``{"prompt": "12 + 7 =", "answer": "19"}``);
* ``rewards.py``: ``arith(prompts, completions, answer)``: 1 when the completion starts with the answer, plus the
  fraction of its characters that are digits (so random completions of a random model differ in reward and GRPO's
  group baseline has something to work on).

Then runs ``python -m lmforge align`` as a subprocess once per case (``--cases``, all by default):

* ``grpo_full_ac``: GRPO, ``activations_checkpoint_granularity=full activations_checkpoint_num_layers=2
  align.rollout_compile=true`` (on CPU, where a compiled rollout is refused, ``align.rollout_compile=auto``);
* ``grpo_selective``: GRPO, ``activations_checkpoint_granularity=selective``;
* ``ppo``: PPO with its critic, ``align.ppo_epochs=2 align.num_mini_batches=2``;
* ``grpo_lora``: GRPO, ``--peft lora`` (frozen base in bfloat16 on a GPU);
* ``ppo_full_ac`` (not in the default list): PPO with ``activations_checkpoint_granularity=full``.

On a GPU every case trains in ``trainer.precision=bf16-mixed`` (fp32 master weights), on CPU in ``32``. The first
all-weight case that passes is exported with ``lmforge convert OUT OUT_hf --to hf``. Each case's results folder is
removed after it is read (a 1B run's checkpoint with its optimizer state is about 12 GiB, PPO's critic as much
again), unless ``--keep``.

First a line ``{"context": ...}`` (shape, vocab, parameters, device, torch, the sizes), then one JSON line per
case: ``case``, ``rc`` (124: the case ran past ``--case-timeout``), ``wall_s`` (the whole subprocess: start-up,
model load, rollout compilation, checkpoint writes), ``overrides``, the run's own last logged training metrics
(``metrics``: loss, reward, reward_std, kl, completion_length, clipfrac, approx_kl, entropy, completions_per_s,
peak_memory_gib, from ``OUT/metrics.jsonl``), ``completions_per_s`` and ``completion_tokens_per_s`` (means over
the logged steps after the first, which pays for compilation: completions per second times their mean length),
``peak_memory_gib`` (the most the run allocated on its GPU, as it logs it; null on CPU), ``finite`` (every metric
a finite number), the ``rollouts:`` line the run printed, ``engine_log`` (the rollout engine's lines about its
decode graphs) and ``export`` (ok / failed / null when not tried). Writes ``{"context", "cases"}`` to
``$OUT/align_gpu_check.json`` when ``OUT`` is set (after each case, so a run cut short keeps the finished ones).
Exits non-zero when any case failed (rc, export or a metric that is not finite), after printing the failing case's
last 20 lines of stderr.

The default sizes (``--shape 1b``: 6 steps of 8 prompts x 8 completions of up to 256 tokens, 4 prompts a micro
batch) aim at a minute or two a case on an H100 (model load, compiling the rollout engine and the checkpoint
writes included).

    PYTHONPATH=src python benchmarks/align_gpu_check.py                       # 1B shape on the GPU, four cases
    PYTHONPATH=src python benchmarks/align_gpu_check.py --cases ppo,grpo_lora --steps 4 --case-timeout 280
    PYTHONPATH=src python benchmarks/align_gpu_check.py --shape tiny --device cpu   # CPU, well under a minute
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    "1b": dict(hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=8192,
               rotary_base=500000.0, max_position_embeddings=1024, tied=True),
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 rotary_base=10000.0, max_position_embeddings=128, tied=True),
}
#: per shape: (vocab, steps, generations, completion length, prompts per step, prompts per micro batch)
DEFAULTS = {"1b": (4096, 6, 8, 256, 8, 4), "tiny": (512, 2, 4, 8, 4, 2)}

REWARDS = '''
def arith(prompts, completions, answer, **fields):
    """1 when the completion starts with the answer, plus the share of its characters that are digits."""
    return [float(c.strip().startswith(a)) + sum(ch.isdigit() for ch in c) / max(len(c), 1)
            for c, a in zip(completions, answer)]
'''

#: case -> (method, extra flags and overrides); "{compile}" stands for align.rollout_compile's value
CASES = {
    "grpo_full_ac": ["--method", "grpo", "activations_checkpoint_granularity=full",
                     "activations_checkpoint_num_layers=2", "align.rollout_compile={compile}"],
    "grpo_selective": ["--method", "grpo", "activations_checkpoint_granularity=selective"],
    "ppo": ["--method", "ppo", "align.ppo_epochs=2", "align.num_mini_batches=2"],
    "grpo_lora": ["--method", "grpo", "--peft", "lora", "peft.lora.r=16"],
    "ppo_full_ac": ["--method", "ppo", "activations_checkpoint_granularity=full", "align.ppo_epochs=2",
                    "align.num_mini_batches=2"],
}
DEFAULT_CASES = ("grpo_full_ac", "grpo_selective", "ppo", "grpo_lora")
METRIC_KEYS = ("loss", "reward", "reward_std", "kl", "completion_length", "clipfrac", "approx_kl", "entropy",
               "completions_per_s", "peak_memory_gib")


def stdlib_text(max_chars: int) -> str:
    """Source text of standard-library modules, up to ``max_chars`` characters."""
    import argparse as a, collections, difflib, email.message, json as j, pathlib, random, shutil as s, string  # noqa
    import textwrap, typing, inspect as i, tempfile as t, subprocess as sp  # noqa
    text = "\n\n".join(inspect.getsource(m) for m in (a, collections, difflib, email.message, j, pathlib, random, s,
                                                        string, textwrap, typing, i, t, sp))
    return text[:max_chars]


def build_folder(root: Path, shape: str, vocab: int, seed: int = 0) -> dict:
    """``root/base`` (tokenizer + random bfloat16 weights of ``shape``), ``root/prompts.jsonl`` and
    ``root/rewards.py``; returns what was built (vocab, parameter count, seconds)."""
    import random

    import torch

    from lmforge.data.tokenizers import train_bpe
    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.assembly import saved_state_dict
    from lmforge.train.checkpoint import save_model

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text(stdlib_text(3_000_000 if shape == "1b" else 300_000), encoding="utf-8")
    tokenizer = train_bpe([corpus], vocab, root / "tokenizer", overwrite=True)
    s = SHAPES[shape]
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                      num_attention_heads=s["num_attention_heads"], num_query_groups=s["num_query_groups"],
                      ffn_hidden_size=s["ffn_hidden_size"], max_position_embeddings=s["max_position_embeddings"],
                      rotary_base=s["rotary_base"], normalization="rmsnorm", activation="swiglu", bias=False,
                      position_embedding_type="rope", share_embeddings_and_output_weights=s["tied"],
                      hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    state = {k: v.to(torch.bfloat16) for k, v in saved_state_dict(model).items()}
    del model
    save_model(root / "base", state, cfg.to_dict(), tokenizer=tokenizer)
    rng = random.Random(seed)
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for _ in range(256):
            x, y = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{x} + {y} =", "answer": str(x + y)}) + "\n")
    (root / "rewards.py").write_text(REWARDS, encoding="utf-8")
    return {"vocab": tokenizer.vocab_size, "parameters": n_params, "build_s": round(time.perf_counter() - t0, 1)}


def case_args(case: str, a, cuda: bool) -> list[str]:
    """The ``lmforge align`` arguments of ``case`` (after ``--out``)."""
    flags = [x.replace("{compile}", "true" if cuda else "auto") for x in CASES[case]]
    common = ["--model", "base", "--data", "prompts.jsonl", "--reward-fn", "rewards:arith",
              f"trainer.max_steps={a.steps}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
              f"align.num_generations={a.generations}", f"align.max_completion_length={a.completion_len}",
              f"global_batch_size={a.prompts}", f"micro_batch_size={a.micro_batch}", "optim.lr=1e-5",
              f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
              f"trainer.precision={'bf16-mixed' if cuda else '32'}"]
    if "--peft" in flags and cuda:
        common.append("base_dtype=bfloat16")
    return flags + common + list(a.override)


def read_metrics(out: Path) -> tuple[dict, list[dict]]:
    """The last logged training line of ``out/metrics.jsonl`` (the keys of METRIC_KEYS it has) and every training
    line."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    train = [r for r in lines if "loss" in r]
    last = train[-1] if train else {}
    return {k: last[k] for k in METRIC_KEYS if k in last}, train


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def run_case(root: Path, case: str, a, cuda: bool, env: dict, export: bool) -> tuple[dict, str]:
    """Runs one case; returns its JSON record and its stderr."""
    out = root / f"out_{case}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume of an earlier one
    args = case_args(case, a, cuda)
    cmd = [sys.executable, "-m", "lmforge", "align", "--out", out.name, *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=a.case_timeout)
    except subprocess.TimeoutExpired as e:  # the record says so; the next cases still run
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        p = subprocess.CompletedProcess(cmd, 124, text(e.stdout), text(e.stderr) + f"\ntimed out after {e.timeout}s")
    rec = {"case": case, "rc": p.returncode, "wall_s": round(time.perf_counter() - t0, 1), "overrides": args}
    if p.returncode == 0:
        metrics, train = read_metrics(out)
        later = train[1:] or train  # the first step pays for compiling the rollout engine
        rates = [r.get("completions_per_s") for r in later]
        tok = [r["completions_per_s"] * r["completion_length"] for r in later
               if isinstance(r.get("completions_per_s"), (int, float))
               and isinstance(r.get("completion_length"), (int, float))]
        peaks = [r["peak_memory_gib"] for r in train if isinstance(r.get("peak_memory_gib"), (int, float))]
        rec.update(metrics=metrics, steps_logged=len(train), completions_per_s=_mean(rates),
                   completion_tokens_per_s=_mean(tok), peak_memory_gib=max(peaks) if peaks else None,
                   finite=bool(metrics) and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                for v in metrics.values()),
                   rollouts=next((x for x in p.stdout.splitlines() if x.startswith("rollouts:")), None),
                   engine_log=[x for x in (p.stdout + p.stderr).splitlines()
                               if x.startswith("rollout engine") or "captured" in x][:6])
        rec["export"] = None
        if export:
            q = subprocess.run([sys.executable, "-m", "lmforge", "convert", out.name, out.name + "_hf", "--to", "hf"],
                               cwd=root, env=env, capture_output=True, text=True)
            rec["export"] = "ok" if q.returncode == 0 and (root / (out.name + "_hf") / "config.json").is_file() \
                else "failed"
            if rec["export"] == "failed":
                p = subprocess.CompletedProcess(q.args, q.returncode, q.stdout, q.stderr)
            shutil.rmtree(root / (out.name + "_hf"), ignore_errors=True)
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return rec, p.stderr


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, help="trainer.max_steps (1b: 6, tiny: 2)")
    ap.add_argument("--generations", type=int, help="align.num_generations (1b: 8, tiny: 4)")
    ap.add_argument("--completion-len", type=int, help="align.max_completion_length (1b: 256, tiny: 8)")
    ap.add_argument("--prompts", type=int, help="global_batch_size: prompts per step (1b: 8, tiny: 4)")
    ap.add_argument("--micro-batch", type=int, help="micro_batch_size: prompts per forward (1b: 4, tiny: 2)")
    ap.add_argument("--vocab", type=int, help="the BPE tokenizer's vocabulary (1b: 4096, tiny: 512)")
    ap.add_argument("--workdir", help="build and run here (kept) instead of a temporary folder (removed)")
    ap.add_argument("--keep", action="store_true", help="keep each case's results folder")
    ap.add_argument("--case-timeout", type=float, default=None,
                    help="seconds a case may run before it counts as failed (rc 124); default: no limit")
    ap.add_argument("--no-export", action="store_true", help="skip the lmforge convert --to hf check")
    ap.add_argument("--override", action="append", default=[], help="one more KEY=VALUE for every case")
    a = ap.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; use {', '.join(CASES)}")
    vocab, steps, gens, clen, prompts, mbs = DEFAULTS[a.shape]
    a.vocab, a.steps, a.generations = a.vocab or vocab, a.steps or steps, a.generations or gens
    a.completion_len, a.prompts, a.micro_batch = a.completion_len or clen, a.prompts or prompts, a.micro_batch or mbs

    import torch

    cuda = torch.cuda.is_available() if a.device == "auto" else a.device == "cuda"
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="lmforge_align_gpu_check_"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", "2")
    built = build_folder(root, a.shape, a.vocab)
    context = {"shape": a.shape, **built, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "torch": torch.__version__, "steps": a.steps, "generations": a.generations,
               "completion_len": a.completion_len, "prompts_per_step": a.prompts, "micro_batch": a.micro_batch}
    print(json.dumps({"context": context}), flush=True)
    records, failed, exported = [], [], a.no_export
    try:
        for case in cases:
            export = not exported and "--peft" not in CASES[case]
            rec, stderr = run_case(root, case, a, cuda, env, export)
            exported = exported or rec.get("export") == "ok"
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if rec["rc"] != 0 or rec.get("export") == "failed" or rec.get("finite") is False:
                failed.append(case)
                print(f"--- {case} failed (rc {rec['rc']}, export {rec.get('export')}); last 20 lines of stderr:",
                      file=sys.stderr)
                print("\n".join(stderr.splitlines()[-20:]), file=sys.stderr, flush=True)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "align_gpu_check.json").write_text(
                    json.dumps({"context": context, "cases": records}, indent=1))
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if failed:
        raise SystemExit(f"align_gpu_check: failed: {', '.join(failed)}")
    return records


if __name__ == "__main__":
    main()
