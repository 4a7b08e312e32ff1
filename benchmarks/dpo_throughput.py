"""DPO with LoRA on one GPU: lmforge's alignment step against TRL's DPOTrainer, same shape, data and settings
(issue 18's speed target: lmforge >= 1.5x TRL's tokens/s at no more peak memory). Not a test.

Both sides train a Llama-3.2-1B-shaped model (random weights, bf16 base, SDPA attention) with LoRA r=16 / alpha 32 /
no dropout on q,k,v,o,gate,up,down, on the same preference pairs: ``--pairs`` per step (one micro batch), each a
prompt of ``--prompt-len`` tokens and a chosen and a rejected completion of ``--response-len`` tokens (end-of-text
included), sigmoid DPO loss with ``--beta``, the reference = the model with its adapters switched off (no second
copy, no precomputed table on either side), fused AdamW at lr 1e-4, gradient clipping at 1.0, bf16 autocast, no
gradient checkpointing (``--grad-ckpt`` turns it on for both).

* lmforge: the code ``lmforge align --method dpo --peft lora`` runs: the alignment config schema
  (:func:`lmforge.align.config.load_align_config`), the preference data reader (:func:`lmforge.align.stage.
  load_datasets` on a JSONL file), :class:`lmforge.align.objective.PreferenceLoss` assembled by
  :func:`lmforge.train.assembly.build_training` (PEFT, joint projections, optimizer, loop) and the loop's own
  ``Trainer.train_step``. Only the base model is made here (random weights in memory instead of a checkpoint read
  from disk).
* TRL: ``DPOTrainer(model, args=DPOConfig(...), peft_config=LoraConfig(...))`` on a transformers
  ``LlamaForCausalLM`` of the same shape, ``trainer.train()``; step times are read by a callback at each step's end.

The pairs are text of a word-level tokenizer made here (one token per word, ``</s>`` the end of text), so both
tokenizers give the same ids, and every row has the same length (no padding on either side). Each side runs in its
own process (clean peak-memory figures); peak memory is ``torch.cuda.max_memory_allocated`` from just before the
first step (weights included, the model's construction not).

``tokens_per_s`` counts prompt + chosen + rejected tokens per pair (``--pairs x (P + 2R)`` a step), whatever the layout;
``row_tokens_per_s`` counts the tokens the forwards see: ``2 x --pairs x (P + R)`` where the prompt goes in with each
completion (TRL, lmforge with ``--no-shared-prompt``), ``--pairs x (P + 2R)`` where lmforge reads a pair as one row
``[prompt | chosen | rejected]`` (``align.shared_prompt``, its default).

    PYTHONPATH=src python3 benchmarks/dpo_throughput.py                 # 1b shape, lmforge then TRL, ~2 minutes
    PYTHONPATH=src python3 benchmarks/dpo_throughput.py --shape tiny --device cpu --steps 2 --warm 1   # CPU check
    PYTHONPATH=src python3 benchmarks/dpo_throughput.py --impls lmforge --no-shared-prompt --tag two_rows   # before

Prints one JSON line per implementation and a comparison line; appends them to ``$OUT/dpo_throughput.json`` when
OUT is set (several invocations of one device call add to one file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: lmforge ModelConfig values and the matching transformers LlamaConfig values of each shape.
SHAPES = {
    # meta-llama/Llama-3.2-1B (no rope scaling on either side)
    "1b": (dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8,
                ffn_hidden_size=8192, max_position_embeddings=4096, rotary_base=500000.0,
                share_embeddings_and_output_weights=True),
           dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)),
    # a CPU check
    "tiny": (dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, max_position_embeddings=512, rotary_base=10000.0,
                  share_embeddings_and_output_weights=True),
             dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)),
}
_LLAMA = dict(normalization="rmsnorm", activation="swiglu", bias=False, position_embedding_type="rope",
              layernorm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EOS = "</s>"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--impls", default="lmforge,trl", help="which sides run, in this order")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per optimizer step (one micro batch)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=256, help="tokens of each completion, end-of-text included")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warm", type=int, default=3, help="steps before timing")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--compile", action="store_true", help="lmforge: compile=true (each block and the head's chunks)")
    p.add_argument("--no-shared-prompt", action="store_true",
                   help="lmforge reads each pair as two rows (align.shared_prompt=false) instead of one row "
                        "[prompt | chosen | rejected]")
    p.add_argument("--tag", default="", help="a label copied into every record")
    p.add_argument("--child", choices=["lmforge", "trl"], help=argparse.SUPPRESS)  # one side, in its own process
    p.add_argument("--data", help=argparse.SUPPRESS)  # the folder the parent wrote (tokenizer/, pairs.jsonl)
    a = p.parse_args(argv)
    for flag in ("pairs", "prompt_len", "steps", "warm"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if a.response_len < 2:
        p.error("--response-len must be at least 2 (a word and the end-of-text token)")
    if a.prompt_len + a.response_len > SHAPES[a.shape][0]["max_position_embeddings"]:
        p.error(f"--prompt-len + --response-len exceed the {a.shape} shape's context")
    return a


# -- data: a word-level tokenizer and pairs of its words --------------------------------------------------------

def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level ``tokenizer.json`` of ``vocab_size`` ids: ``<unk>`` 0, ``</s>`` 1 (end of text, padding) and the
    words ``w2`` ... one id each, split on whitespace; lmforge and transformers read the same ids from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, EOS: 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", EOS])  # matched before splitting: "w5</s>" is two tokens
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "unk_token": "<unk>",
              "pad_token": EOS, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def write_pairs(path: Path, n: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 0) -> None:
    """``n`` records ``{"prompt", "chosen", "rejected"}`` of random words: a prompt of ``prompt_len`` words and two
    different completions of ``response_len - 1`` words (both sides append the end-of-text token). Completions begin
    with a space, so the prompt + completion text splits into the same words as the two apart."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(2, vocab_size, k))  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            chosen, rejected = words(response_len - 1), words(response_len - 1)
            f.write(json.dumps({"prompt": words(prompt_len), "chosen": " " + chosen, "rejected": " " + rejected})
                    + "\n")


# -- the two sides (each in its own process) ----------------------------------------------------------------------

def _record(a, impl: str, step_times: list, peak: int, loss: float, trainable: int, shared: bool = False,
            **extra) -> dict:
    import torch

    dt = step_times[-1] - step_times[0]
    steps = len(step_times) - 1
    per_pair = a.prompt_len + 2 * a.response_len
    per_pair_rows = per_pair if shared else 2 * (a.prompt_len + a.response_len)
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    return dict(case=f"dpo_lora_{a.shape}", impl=impl, pairs=a.pairs, prompt_len=a.prompt_len,
                response_len=a.response_len, beta=a.beta, grad_ckpt=a.grad_ckpt, steps=steps,
                seconds_per_step=round(dt / steps, 4),
                tokens_per_s=round(a.pairs * per_pair * steps / dt, 1),
                row_tokens_per_s=round(a.pairs * per_pair_rows * steps / dt, 1), shared_prompt=shared,
                peak_mem_gib=round(peak / 2**30, 3) if peak is not None else None, loss=loss,
                trainable_params=trainable, card=card, torch=torch.__version__, **extra)


def run_lmforge(a) -> dict:
    """``lmforge align --method dpo --peft lora``'s assembly on a random-weight model; times ``train_step``."""
    import torch

    from lmforge.align.config import load_align_config
    from lmforge.align.objective import PreferenceLoss
    from lmforge.align.stage import job_from_config, load_datasets
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.finetune.stage import peft_method_config, sequence_length, stage_layout
    from lmforge.models import ModelConfig, Transformer
    from lmforge.parallel.runtime import init_runtime, shutdown
    from lmforge.train.assembly import build_training, seed_everything
    from lmforge.train.loop import MicroBatches

    data, gpu = Path(a.data), a.device == "cuda"
    total = a.warm + a.steps
    cfg = load_align_config({
        "method": "dpo", "data": str(data / "pairs.jsonl"), "out": str(data / "lmforge_out"),
        "seq_length": a.prompt_len + a.response_len, "micro_batch_size": a.pairs, "global_batch_size": a.pairs,
        "base_dtype": "bfloat16" if gpu else "float32", "gradient_checkpointing": a.grad_ckpt, "resume": False,
        "compile": a.compile,
        "align": {"beta": a.beta, "shared_prompt": not a.no_shared_prompt},
        "peft": {"method": "lora", "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                            "target_modules": LORA_TARGETS}},
        "trainer": {"accelerator": "gpu" if gpu else "cpu", "precision": "bf16-mixed" if gpu else "32",
                    "max_steps": total, "gradient_clip_val": 1.0},
        "optim": {"name": "fused_adam", "lr": 1e-4},
    }, need_paths=False)
    rt = init_runtime(cfg.trainer.accelerator)
    try:
        dims, accum = stage_layout(cfg, rt)
        seed_everything(int(cfg.seed), dims.dp_rank)
        mcfg = ModelConfig(**SHAPES[a.shape][0], **_LLAMA)
        with torch.device("meta"):
            model = Transformer(mcfg)
        model = model.to(getattr(torch, cfg.base_dtype)).to_empty(device=rt.device)
        model.init_weights(seed=0)
        model.train()
        tokenizer = load_tokenizer(data / "tokenizer")
        train_ds, _ = load_datasets(cfg, tokenizer, sequence_length(cfg.seq_length, mcfg, 0), mcfg)
        rows = {len(s.ids) for s in train_ds.chosen + train_ds.rejected}
        if rows != {a.prompt_len + a.response_len}:
            raise RuntimeError(f"lmforge read rows of {sorted(rows)} tokens, not {a.prompt_len + a.response_len}")
        reference = cfg.reference  # adapters_off: LoRA's reference is the model with its adapters off
        job = job_from_config(cfg, dims, accum, peft_method_config("lora", cfg.peft))
        training = build_training(job, model, rt, tokenizer=tokenizer, model_config=mcfg.to_dict(),
                                  console_log=lambda s: print(s, file=sys.stderr),
                                  objective_fn=lambda m: PreferenceLoss(m, cfg.method, cfg.align, reference, None))
        trainer = training.trainer
        batches = MicroBatches(train_ds, job.loop, rt, dims)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(total):
            loss, _ = trainer.train_step(batches, step)
            sync()
            if step >= a.warm - 1:
                times.append(time.perf_counter())
        return _record(a, "lmforge", times, torch.cuda.max_memory_allocated() if gpu else None, float(loss),
                       training.num_parameters()[0], shared=train_ds.shared_prompt, reference=reference,
                       precision=job.loop.precision, compile=job.compile)
    finally:
        shutdown(rt)


def run_trl(a) -> dict:
    """TRL's DPOTrainer with a peft LoRA config on a transformers Llama of the same shape."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

    import datasets
    import peft
    import trl
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    data, gpu = Path(a.data), a.device == "cuda"
    total = a.warm + a.steps
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    hf_cfg = LlamaConfig(**SHAPES[a.shape][1], rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                         bos_token_id=None, eos_token_id=1, pad_token_id=1)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(a.device):
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16 if gpu else torch.float32)
    with open(data / "pairs.jsonl", encoding="utf-8") as f:
        train = datasets.Dataset.from_list([json.loads(line) for line in f])  # in memory: no cache files

    times: list = []

    class StepClock(TrainerCallback):
        """The time at the end of each optimizer step, after the device finished it."""

        def on_train_begin(self, args, state, control, **kw):
            if gpu:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            if state.global_step >= a.warm:
                times.append(time.perf_counter())

    args = DPOConfig(output_dir=str(data / "trl_out"), per_device_train_batch_size=a.pairs,
                     gradient_accumulation_steps=1, max_steps=total, learning_rate=1e-4, max_grad_norm=1.0,
                     optim="adamw_torch_fused" if gpu else "adamw_torch", beta=a.beta, loss_type=["sigmoid"],
                     precompute_ref_log_probs=False, max_length=a.prompt_len + a.response_len,
                     gradient_checkpointing=a.grad_ckpt, bf16=gpu, use_cpu=not gpu, logging_steps=total,
                     save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                     dataloader_num_workers=0, seed=1234)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora,
                         callbacks=[StepClock()])
    lengths = {len(r["prompt_ids"]) + len(r[k]) for r in trainer.train_dataset for k in ("chosen_ids", "rejected_ids")}
    if lengths != {a.prompt_len + a.response_len}:
        raise RuntimeError(f"TRL read rows of {sorted(lengths)} tokens, not {a.prompt_len + a.response_len}")
    result = trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return _record(a, "trl", times, torch.cuda.max_memory_allocated() if gpu else None,
                   float(result.training_loss), trainable, reference="adapters_off",
                   precision="bf16-mixed" if gpu else "32",
                   versions=dict(trl=trl.__version__, transformers=transformers.__version__, peft=peft.__version__,
                                 datasets=datasets.__version__))


# -- the parent: data, one process per side, the comparison -------------------------------------------------------

def run_child(a, argv: list, impl: str, data: Path) -> dict:
    """Run one side in a fresh process with the same flags; its last JSON line is its record (else an error
    record with the last line it wrote to standard error)."""
    argv = [sys.executable, os.path.abspath(__file__), *argv, "--child", impl, "--data", str(data)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        rec = json.loads(lines[-1])
    else:
        sys.stderr.write(proc.stderr)
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        rec = dict(case=f"dpo_lora_{a.shape}", impl=impl, error=f"exit {proc.returncode}: {tail}"[:400])
    rec["process_seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def compare(a, recs: dict) -> dict:
    """lmforge against TRL: the tokens/s ratio and peak-memory ratio, and whether the target holds."""
    lm, trl = recs.get("lmforge", {}), recs.get("trl", {})
    row = dict(case=f"dpo_lora_{a.shape}", impl="lmforge/trl", target="tokens/s ratio >= 1.5 at no more memory")
    if "tokens_per_s" in lm and "tokens_per_s" in trl:
        row["tokens_per_s_ratio"] = round(lm["tokens_per_s"] / trl["tokens_per_s"], 3)
        if lm.get("peak_mem_gib") is not None and trl.get("peak_mem_gib"):
            row["peak_mem_ratio"] = round(lm["peak_mem_gib"] / trl["peak_mem_gib"], 3)
            row["target_met"] = row["tokens_per_s_ratio"] >= 1.5 and row["peak_mem_ratio"] <= 1.0
        row["card"] = lm.get("card")
    else:
        row["error"] = "a side has no figures (see its record)"
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child:
        rec = run_lmforge(a) if a.child == "lmforge" else run_trl(a)
        print(json.dumps(rec), flush=True)
        return 0
    path = Path(os.environ["OUT"]) / "dpo_throughput.json" if os.environ.get("OUT") else None
    results = json.loads(path.read_text()) if path and path.exists() else []  # one call's invocations share it
    recs = {}
    with tempfile.TemporaryDirectory(prefix="dpo_bench_") as tmp:
        data = Path(tmp)
        vocab = SHAPES[a.shape][0]["vocab_size"]
        write_tokenizer(data / "tokenizer", vocab)
        write_pairs(data / "pairs.jsonl", a.pairs * (a.warm + a.steps), a.prompt_len, a.response_len, vocab)
        for impl in a.impls.split(","):
            rec = run_child(a, argv, impl, data)
            rec["tag"] = a.tag
            recs[impl] = rec
            print(json.dumps(rec), flush=True)
            results.append(rec)
            if path:
                path.write_text(json.dumps(results, indent=1))
    row = compare(a, recs)
    row["tag"] = a.tag
    print(json.dumps(row), flush=True)
    results.append(row)
    if path:
        path.write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in recs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
