"""Multi-GPU runs of issue 20, one command each (run by hand on a machine with several GPUs; the test suite runs the
tiny CPU form of ``weak`` and ``8b``).

Every lmforge case runs lmforge's real training assembly under torchrun: the config is built from the same
NeMo-style keys ``lmforge pretrain`` / ``lmforge finetune`` read (``trainer.devices``, ``model.fsdp``,
``model.tensor_model_parallel_size``, ``model.pipeline_model_parallel_size``, ``model.compile``, batch sizes,
``model.activations_checkpoint_granularity``, ...), then ``parallel_dims`` -> ``job_from_config`` ->
``build_training``, and the timed steps are ``Trainer.train_step`` on random tokens (the data pipeline left out, as
in benchmarks/train_throughput.py). ``users`` runs the users' own NeMo command lines through ``lmforge pretrain``
itself (torchrun, the CLI, real preprocessed data) and reads what the runs write.

Runs:
    weak    Llama-3.2-1B shape, seq 2048, bf16-mixed, FSDP (model.fsdp=true): one torchrun launch per process count
            (--nproc, default 1,2,4), the same micro batch per GPU; tokens/s per GPU, peak memory, and the
            weak-scaling efficiency (tokens/s/GPU at N over at 1) against the 90% target. On one process lmforge
            trains FSDP unsharded (nothing to shard; build_training says so): that is the 1-GPU figure.
    8b      Llama-3.1-8B shape on --nproc (default 4) processes, layouts (--layouts):
              fsdp          model.fsdp=true
              fsdp_compile  model.fsdp=true model.compile=true
              tp2_fsdp2     model.tensor_model_parallel_size=2 model.fsdp=true (FSDP over the rest)
              pp2_fsdp2     model.pipeline_model_parallel_size=2 model.fsdp=true (1F1B, --pp-microbatches per step)
              fsdp_compile_fp8     fsdp_compile with trainer.precision=fp8, FSDP gathering bf16 weights (GPU only)
              fsdp_compile_fp8_ag  the same with model.fp8_fsdp_all_gather=true: FSDP gathers float8 weights
            (the float8 two only when named in --layouts)
            tokens/s per GPU and peak memory per layout. --peer torchtitan runs torchtitan's llama3 8B trainer with
            the same layouts, batch, sequence and activation checkpointing in the same call (GPU only; see below),
            and a summary line: lmforge over torchtitan per layout (target >= 1).
    users   the users' NeMo commands (../shared/notes/nemo_user_commands.md, section 2) through `lmforge pretrain`
            (gpt3/126m: NeMo's megatron_gpt_config): ``one_gpu`` (1 process), ``tp4`` (torchrun --nproc-per-node=4,
            TP 4, micro 6, global 192) and ``two_nodes`` (two torchrun node groups of 2 processes each on this host,
            static rendezvous on 127.0.0.1, the 2-node keys with TP 4: TP 8 cannot fit 4 processes); --steps 200
            each (the first steps of the users' 300,000-step schedule); the tp4 loss curve against one_gpu's (max
            and mean absolute difference). Data: GPT-2-format vocab/merges (byte-level BPE, 50,257 tokens) trained
            here on this Python's whole standard library (~25 MB, so 200 steps of 192 x 1024 tokens read it several
            times) and the users' own preprocess command; nothing is downloaded.
    sft7b   full SFT (`lmforge finetune` keys: method=full, fsdp=true) of the Llama-2-7B shape on --nproc (default 4)
            processes; rows of random tokens, the prompt half masked out of the loss; tokens/s (all row tokens) and
            peak memory.

Common switches: --device cuda|cpu (cpu: gloo, fp32), --shape full|tiny (tiny: 2 layers, hidden 64, seq 32, vocab
256: a check of this script, not a measurement), --steps / --warm (timed and untimed steps), --mbs, --seq,
--layers (fewer blocks of the same shape: the 8B layouts that fit one GPU), --ac none|full|selective,
--launch each|merged (one torchrun launch per case, or one per process count running its cases in turn:
fewer interpreter starts; each case is still separate).

torchtitan peer (8b --peer torchtitan): torchtitan 0.2.1 (``python -m torchtitan.train``, options on the command
line, no TOML file needed): --model.name llama3 --model.flavor 8B, --parallelism.{data_parallel_shard_degree,
tensor_parallel_degree, pipeline_parallel_degree, pipeline_parallel_schedule=1F1B,
pipeline_parallel_microbatch_size}, --compile.enable, --activation_checkpoint.mode, --training.{local_batch_size,
seq_len, steps, dataset=c4_test, dataset_path}, --metrics.log_freq 1. Its data and tokenizer: the c4_test
dataset and tests/assets/tokenizer live in torchtitan's repository, not in its wheel, so this script writes its own
in their formats: a folder with data.json (JSON lines {"text": ...} from this Python's standard library) for
``load_dataset(path, split="train")``, and a byte-level BPE tokenizer folder (tokenizer.json,
tokenizer_config.json) from lmforge's trainer; the 8B flavor's vocabulary is 128256 whatever the tokenizer, as
lmforge's here. Its figures are parsed from its metrics line (``tps`` is tokens/s per GPU: torchtitan divides by
the non-data-parallel size; ``memory`` is max reserved GiB) and averaged over the steps after --warm. It needs
torchtitan and datasets, torchdata, tyro, dill, multiprocess, docstring_parser, typeguard, tomli importable (the
device carries them as wheels); the script says which are missing instead of launching. No CPU form.

    python benchmarks/scaling.py weak [--nproc 1,2,4] [--mbs 4] [--compile]
    python benchmarks/scaling.py 8b [--layouts fsdp,fsdp_compile,tp2_fsdp2,pp2_fsdp2] [--peer torchtitan]
    python benchmarks/scaling.py 8b --nproc 1 --layouts fsdp,fsdp_compile --layers 4     # one GPU
    python benchmarks/scaling.py users [--cases one_gpu,tp4,two_nodes] [--steps 200]
    python benchmarks/scaling.py sft7b [--nproc 4]
    python benchmarks/scaling.py weak --device cpu --shape tiny --nproc 1,2               # a check, on CPU

Prints one JSON line per case (and a summary line per run) and writes them to $OUT/scaling_<run>.json when OUT is
set. A case that cannot run here (too few GPUs, a layout lmforge refuses) is a record with ``skipped`` or
``error`` saying why, not a missing line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("weak", "8b", "users", "sft7b")
TARGET_EFFICIENCY = 0.90  # issue 20: 4 GPUs >= 90% of 4x the 1-GPU tokens/s
VOCAB = 128256  # Llama 3's tokenizer (the 8B and 1B shapes); sft7b: Llama 2's 32000
# the tiny shape of --shape tiny (CPU checks): every layout's sizes divide by TP 2 and PP 2
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.make_vocab_size_divisible_by=8"]
TINY_SEQ, TINY_VOCAB = 32, 256
LAYOUTS = {  # name: (lmforge config keys, tensor-parallel size, pipeline-parallel size); FSDP over the rest
    "fsdp": (["model.fsdp=true"], 1, 1),
    "fsdp_compile": (["model.fsdp=true", "model.compile=true"], 1, 1),
    "tp2_fsdp2": (["model.tensor_model_parallel_size=2", "model.fsdp=true"], 2, 1),
    "pp2_fsdp2": (["model.pipeline_model_parallel_size=2", "model.fsdp=true"], 1, 2),
    # float8 projections (tensorwise, GPU only), FSDP gathering the weights in bf16 or in float8
    "fsdp_compile_fp8": (["model.fsdp=true", "model.compile=true", "trainer.precision=fp8",
                          "model.fp8_fsdp_all_gather=false"], 1, 1),
    "fsdp_compile_fp8_ag": (["model.fsdp=true", "model.compile=true", "trainer.precision=fp8",
                             "model.fp8_fsdp_all_gather=true"], 1, 1),
}
DEFAULT_LAYOUTS = ("fsdp", "fsdp_compile", "tp2_fsdp2", "pp2_fsdp2")  # the float8 ones when asked (--layouts)
AC_KEYS = {"none": [], "full": ["model.activations_checkpoint_granularity=full"],
           "selective": ["model.activations_checkpoint_granularity=selective"]}


# ----------------------------------------------------------------------------------------------
# the worker: one torchrun process running its cases in turn
class RandomRows:
    """Random token rows of ``seq + 1`` tokens (what the GPT dataset returns); ``sft``: dict rows whose first half
    (the prompt) is masked out of the loss, as an SFT dataset's rows."""

    def __init__(self, n: int, seq: int, vocab: int, sft: bool = False, seed: int = 0):
        import numpy as np

        self.data = np.random.default_rng(seed).integers(0, vocab, size=(n, seq + 1), dtype=np.int64)
        self.mask = (np.arange(seq + 1) > seq // 2).astype(np.int64) if sft else None

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.mask is None:
            return self.data[i]
        return {"tokens": self.data[i], "loss_mask": self.mask}


def _pretrain_training(case: dict, rt, out: Path):
    """(Training, model config, dims) of a pretraining case: `lmforge pretrain`'s own path from its config keys."""
    from lmforge.config import load_config, model_config_from
    from lmforge.config.loader import parallel_dims
    from lmforge.train.assembly import build_training, seed_everything
    from lmforge.train.pretrain import build_model, job_from_config

    cfg = load_config(case["recipe"], [*case["overrides"], f"exp_manager.explicit_log_dir={out}"])
    dims = parallel_dims(cfg).check_world(rt.world_size, rt.rank)
    dims.check_supported()
    model_cfg = model_config_from(cfg, case["vocab"])
    seed_everything(int(cfg.model.seed), dims.dp_rank)
    model = build_model(model_cfg, rt.device, int(cfg.model.seed), materialize=dims.pp == 1 and dims.ep == 1)
    job = job_from_config(cfg, dims, case["warm"] + case["steps"])
    return build_training(job, model, rt, console_log=_quiet), model_cfg, dims


def _sft_training(case: dict, rt, out: Path):
    """(Training, model config, dims) of a full-SFT case: `lmforge finetune`'s layout and job from its keys; the
    model is the recipe's shape built here (fp32, as a full fine-tune loads its base) instead of read from disk."""
    from lmforge.config import load_config, model_config_from
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.stage import job_from_config, stage_layout
    from lmforge.train.assembly import build_training, seed_everything
    from lmforge.train.pretrain import build_model

    cfg = load_finetune_config(None, [*case["overrides"], f"out={out}"], need_paths=False)
    dims, accumulate = stage_layout(cfg, rt, tp=int(cfg.tensor_model_parallel_size))
    model_cfg = model_config_from(load_config(case["recipe"], case["shape"]), case["vocab"])
    seed_everything(int(cfg.seed), dims.dp_rank)
    model = build_model(model_cfg, rt.device, int(cfg.seed))
    job = job_from_config(cfg, dims, accumulate, None)
    job.loop.max_steps = case["warm"] + case["steps"]
    return build_training(job, model, rt, console_log=_quiet), model_cfg, dims


def _quiet(*_args) -> None:
    """The assembly's console lines are not part of a benchmark's output."""


def run_case(case: dict, rt, folder: Path) -> dict:
    """Build the case's training, run ``warm`` untimed and ``steps`` timed optimizer steps; rank 0's record."""
    import torch
    import torch.distributed as dist

    from lmforge.models.transformer import Transformer
    from lmforge.train.loop import MicroBatches

    cuda = rt.device.type == "cuda"
    build = _sft_training if case["kind"] == "sft" else _pretrain_training
    training, model_cfg, dims = build(case, rt, folder / case["name"])
    s = training.job.loop
    seq, steps, warm = case["seq"], case["steps"], case["warm"]
    rows = RandomRows(s.global_batch_size * (warm + steps), seq, model_cfg.vocab_size, sft=case["kind"] == "sft")
    batches = MicroBatches(rows, s, rt, dims)
    trainer = training.trainer
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for step in range(warm):
        losses.append(trainer.train_step(batches, step)[0])
    if cuda:
        torch.cuda.synchronize()
    rt.barrier()
    t0 = time.perf_counter()
    for step in range(warm, warm + steps):
        losses.append(trainer.train_step(batches, step)[0])
    if cuda:
        torch.cuda.synchronize()
    rt.barrier()
    seconds = time.perf_counter() - t0
    peak = [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30] if cuda else [0, 0]
    peak = torch.tensor(peak, device=rt.device)
    if rt.distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    with torch.device("meta"):
        flops = Transformer(model_cfg).flops_per_token(seq)
    tokens = s.global_batch_size * seq * steps
    tps_gpu = tokens / seconds / rt.world_size
    final = [float(l) for l in losses]
    rec = dict(run=case["run"], case=case["name"], world_size=rt.world_size, recipe=case["recipe"],
               layout=dict(dp=dims.dp, tp=dims.tp, pp=dims.pp, fsdp=dims.fsdp,
                           sharded=training.fsdp), micro_batch=s.micro_batch_size,
               global_batch=s.global_batch_size, accumulate=s.accumulate, seq=seq, layers=model_cfg.num_layers,
               hidden=model_cfg.hidden_size, vocab=model_cfg.vocab_size, precision=s.precision,
               warm=warm, steps=steps, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
               tokens_per_s_per_gpu=round(tps_gpu, 1), model_tflops_per_gpu=round(tps_gpu * flops / 1e12, 2),
               peak_mem_gib=round(float(peak[0]), 2) if cuda else None,
               peak_reserved_gib=round(float(peak[1]), 2) if cuda else None,
               loss_first=final[0], loss_last=final[-1], keys=case["overrides"],
               device=torch.cuda.get_device_name(rt.device) if cuda else "cpu", torch=torch.__version__)
    if case["kind"] == "sft":
        rec.update(shape_keys=case["shape"], tokens_counted="every token of each row (prompt and response)")
    del training, trainer, batches
    gc.collect()
    if cuda:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return rec


def worker(spec_path: str) -> int:
    """torchrun's entry: run the spec's cases one after the other on this process (the process group started once
    and kept, as tests/run_cases.py does); rank 0 appends each record (or the case's error) to the results file."""
    import torch

    from lmforge.parallel.runtime import init_runtime, shutdown

    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    rt = init_runtime(spec["accelerator"])
    torch.backends.cuda.matmul.allow_tf32 = True
    code = 0
    for case in spec["cases"]:
        try:
            rec = run_case(case, rt, folder)
        except Exception as e:  # noqa: BLE001 - a refused or failed case is a record saying why
            rec = dict(run=case["run"], case=case["name"], world_size=rt.world_size, keys=case["overrides"],
                       error=f"{type(e).__name__}: {e}"[:1000])
            code = 1
        if rt.is_main:
            with open(folder / "results.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if code:  # the ranks may no longer be at the same point: end the launch
            break
    shutdown(rt)
    return code


# ----------------------------------------------------------------------------------------------
# the parent: plans cases, launches torchrun, collects records
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(device: str) -> dict:
    """This checkout's lmforge first on the path of every process started here (torchrun's ranks too)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def gpus_present(device: str) -> int:
    if device == "cpu":
        return 1 << 30  # gloo ranks: as many as asked
    import torch

    return torch.cuda.device_count()


def launch(cases: list[dict], nproc: int, a, folder: Path) -> list[dict]:
    """One torchrun launch of ``nproc`` processes running ``cases`` in turn; their records (a case the launch
    never reached, or whose launch died without a record, gets an ``error`` record with the output's tail)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "folder": str(folder),
                                "accelerator": "cpu" if a.device == "cpu" else "gpu"}))
    results = folder / "results.jsonl"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(Path(__file__).resolve()),
           "--worker", str(spec)]
    p = subprocess.run(cmd, env=child_env(a.device), capture_output=True, text=True, cwd=ROOT)
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {r["case"] for r in records}
    tail = (p.stdout[-1500:] + p.stderr[-2500:]).strip()
    for case in cases:
        if case["name"] not in done:
            records.append(dict(run=case["run"], case=case["name"], world_size=nproc, keys=case["overrides"],
                                error=f"the launch ended (exit code {p.returncode}) before this case reported: "
                                      f"{tail[-2000:]}"))
    return records


def run_cases(cases: list[dict], a, folder: Path) -> list[dict]:
    """Launch the cases (``case["nproc"]`` processes each): one launch each, or one per process count
    (--launch merged); cases that need more GPUs than this machine has are skipped, saying so."""
    have = gpus_present(a.device)
    records, runnable = [], []
    for case in cases:
        if case["nproc"] > have:
            records.append(dict(run=case["run"], case=case["name"], world_size=case["nproc"],
                                skipped=f"needs {case['nproc']} GPUs, {have} present"))
        else:
            runnable.append(case)
    groups = [[c] for c in runnable] if a.launch == "each" else \
        [[c for c in runnable if c["nproc"] == n] for n in dict.fromkeys(c["nproc"] for c in runnable)]
    for i, group in enumerate(groups):
        records.extend(launch(group, group[0]["nproc"], a, folder / f"launch{i}"))
    order = [c["name"] for c in cases]
    return sorted(records, key=lambda r: order.index(r["case"]))


def shape_keys(a, seq: int) -> tuple[list[str], int, int]:
    """(config keys, sequence length, vocabulary) of --shape, --seq, --layers, --device."""
    keys, vocab = [], None
    if a.shape == "tiny":
        keys, seq, vocab = [*TINY, "model.max_position_embeddings=64"], TINY_SEQ, TINY_VOCAB
    seq = a.seq or seq
    keys += [f"model.encoder_seq_length={seq}", f"model.data.seq_length={seq}"]
    if a.layers:
        keys.append(f"model.num_layers={a.layers}")
    keys += ["trainer.accelerator=cpu", "trainer.precision=32"] if a.device == "cpu" else \
        ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
    return keys, seq, vocab


def case(run: str, name: str, nproc: int, recipe: str, overrides: list[str], seq: int, vocab: int, a,
         kind: str = "pretrain", **extra) -> dict:
    common = ["exp_manager.resume_if_exists=false", "exp_manager.create_tensorboard_logger=false",
              "trainer.log_every_n_steps=1000000"]
    return dict(run=run, name=name, nproc=nproc, recipe=recipe, kind=kind, seq=seq, vocab=vocab,
                warm=a.warm, steps=a.steps, overrides=[*overrides, *(common if kind == "pretrain" else [])],
                **extra)


def plan_weak(a) -> list[dict]:
    keys, seq, vocab = shape_keys(a, 2048)
    cases = []
    for n in a.nproc:
        layout = ["model.fsdp=true", *(["model.compile=true"] if a.compile else []), *AC_KEYS[a.ac]]
        cases.append(case("weak", f"fsdp_{n}", n, "llama3.2/1b",
                          [*keys, f"trainer.devices={n}", f"model.micro_batch_size={a.mbs}",
                           f"model.global_batch_size={a.mbs * n}", *layout], seq, vocab or VOCAB, a))
    return cases


def plan_8b(a) -> list[dict]:
    keys, seq, vocab = shape_keys(a, 8192)
    (n,) = a.nproc
    cases = []
    for name in a.layouts:
        layout, tp, pp = LAYOUTS[name]
        dp = n // (tp * pp) if n % (tp * pp) == 0 else 0
        accumulate = a.pp_microbatches if pp > 1 else 1
        c = case("8b", name, n, "llama3/8b",
                 [*keys, f"trainer.devices={n}", f"model.micro_batch_size={a.mbs}",
                  f"model.global_batch_size={a.mbs * max(dp, 1) * accumulate}", *layout, *AC_KEYS[a.ac]],
                 seq, vocab or VOCAB, a)
        if not dp:
            c["refused"] = f"{name} needs a multiple of {tp * pp} processes, not {n}"
        cases.append(c)
    return cases


def plan_sft7b(a) -> list[dict]:
    keys, seq, vocab = shape_keys(a, 4096)
    (n,) = a.nproc
    shape = [k for k in keys if k.startswith("model.")]  # the recipe's model keys: the shape
    precision = "32" if a.device == "cpu" else "bf16-mixed"
    ac = {"none": [], "full": ["gradient_checkpointing=true"],
          "selective": ["activations_checkpoint_granularity=selective"]}[a.ac]
    sft = ["method=full", "fsdp=true", f"trainer.devices={n}", f"trainer.precision={precision}",
           f"trainer.accelerator={'cpu' if a.device == 'cpu' else 'gpu'}", f"micro_batch_size={a.mbs}",
           f"global_batch_size={a.mbs * n}", f"seq_length={seq}", "optim.name=fused_adam", "resume=false", *ac]
    return [case("sft7b", f"full_sft_fsdp_{n}", n, "llama2/7b", sft, seq, vocab or 32000, a, kind="sft",
                 shape=shape)]


def efficiency(records: list[dict]) -> dict:
    """The weak-scaling summary: tokens/s/GPU at each N over at 1, against the target."""
    one = next((r["tokens_per_s_per_gpu"] for r in records if r.get("world_size") == 1 and "tokens_per_s" in r),
               None)
    eff = {str(r["world_size"]): round(r["tokens_per_s_per_gpu"] / one, 3)
           for r in records if one and "tokens_per_s" in r}
    return dict(run="weak", summary=True, efficiency=eff, target=TARGET_EFFICIENCY,
                meets_target={n: e >= TARGET_EFFICIENCY for n, e in eff.items() if n != "1"},
                note=None if one else "no 1-process figure: efficiency needs --nproc to include 1")


# ----------------------------------------------------------------------------------------------
# users: the NeMo command lines through `lmforge pretrain`
# nemo_user_commands.md, section 2: the 1-GPU command's overrides as NeMo gives them (after --config-name)
USERS_ONE_GPU = r"""trainer.devices=1 trainer.num_nodes=1 trainer.max_epochs=null trainer.max_steps=300000
  trainer.val_check_interval=300 trainer.log_every_n_steps=50 trainer.limit_val_batches=50
  trainer.limit_test_batches=50 trainer.accumulate_grad_batches=1 trainer.precision=16
  model.micro_batch_size=6 model.global_batch_size=192
  model.tensor_model_parallel_size=1 model.pipeline_model_parallel_size=1
  model.max_position_embeddings=1024 model.encoder_seq_length=1024 model.hidden_size=768
  model.ffn_hidden_size=3072 model.num_layers=12 model.num_attention_heads=12 model.init_method_std=0.021
  model.hidden_dropout=0.1 model.layernorm_epsilon=1e-5
  model.tokenizer.vocab_file=gpt2-vocab.json model.tokenizer.merge_file=gpt2-merges.txt
  model.data.data_prefix=[1.0,hfbpe_gpt_training_data_text_document] model.data.num_workers=1
  model.data.seq_length=1024 model.data.splits_string=\'980,10,10\'
  model.optim.name=fused_adam model.optim.lr=6e-4 model.optim.betas=[0.9,0.95] model.optim.weight_decay=0.1
  model.optim.sched.name=CosineAnnealing model.optim.sched.warmup_steps=750
  model.optim.sched.constant_steps=80000 model.optim.sched.min_lr=6e-5
  exp_manager.resume_if_exists=True exp_manager.resume_ignore_no_checkpoint=True
  exp_manager.create_checkpoint_callback=True exp_manager.checkpoint_callback_params.monitor=val_loss
  exp_manager.checkpoint_callback_params.save_top_k=3 exp_manager.checkpoint_callback_params.mode=min
  exp_manager.checkpoint_callback_params.always_save_nemo=False"""
# "rest as above" variants; the 2-node one on 2 x 2 processes: TP 4 (its TP 8 needs 8 processes)
USERS_VARIANTS = {
    "one_gpu": (1, 1, ""),
    "tp4": (1, 4, "trainer.devices=4 model.tensor_model_parallel_size=4 model.data.num_workers=2"),
    "two_nodes": (2, 2, "trainer.devices=2 trainer.num_nodes=2 model.micro_batch_size=32 model.global_batch_size=192 "
                        "model.tensor_model_parallel_size=4 model.num_attention_heads=16"),
}
USERS_PREPROCESS = ("preprocess --input=train_data.jsonl --json-keys=text --tokenizer-library=megatron "
                    "--vocab gpt2-vocab.json --dataset-impl mmap --tokenizer-type GPT2BPETokenizer "
                    "--merge-file gpt2-merges.txt --output-prefix=hfbpe_gpt_training_data --append-eod --workers=4")
USERS_TINY = ["model.num_layers=2", "model.hidden_size=96", "model.ffn_hidden_size=192", "model.encoder_seq_length=32",
              "model.max_position_embeddings=32", "model.data.seq_length=32", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "model.global_batch_size=96"]


def users_overrides(variant: str) -> list[str]:
    """The 1-GPU overrides with the variant's keys replacing the base's ("rest as above")."""
    words = shlex.split(USERS_ONE_GPU.replace("\n", " "))
    changes = dict(word.split("=", 1) for word in variant.split())
    return [f"{w.split('=', 1)[0]}={changes[w.split('=', 1)[0]]}" if w.split("=", 1)[0] in changes else w
            for w in words]


def users_data(work: Path, vocab_size: int, max_bytes: Optional[int]) -> None:
    """gpt2-vocab.json / gpt2-merges.txt (a byte-level BPE trained here on this Python's standard library: nothing
    downloaded) and the users' own preprocess command's indexed dataset, in ``work``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.cli import main as cli
    from lmforge.data.corpus import stdlib_corpus

    stdlib_corpus(work / "train_data.jsonl", max_bytes=max_bytes, exclude_tests=False)  # all of it: ~25 MB
    texts = [json.loads(line)["text"] for line in (work / "train_data.jsonl").read_text().splitlines()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.model.save(str(work), "gpt2")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with open("preprocess.log", "w") as log, contextlib.redirect_stdout(log):  # stdout: this script's JSON
            code = cli(shlex.split(USERS_PREPROCESS))
        if code != 0:
            raise SystemExit(f"the users' preprocess command failed: {(work / 'preprocess.log').read_text()[-2000:]}")
    finally:
        os.chdir(cwd)


def users_run(name: str, work: Path, a) -> dict:
    """One variant through `lmforge pretrain gpt3/126m` (torchrun for several processes); its record."""
    nodes, per_node, variant = USERS_VARIANTS[name]
    # the first --steps steps of the users' 300,000-step run: its schedule (750 warm-up steps, cosine to 300,000) kept
    extra = [f"trainer.max_steps={a.steps}", "model.optim.sched.max_steps=300000",
             f"exp_manager.explicit_log_dir={work / name}", "trainer.log_every_n_steps=1"]  # a loss every step
    if a.device == "cpu":
        extra.append("trainer.accelerator=cpu")
    if a.shape == "tiny":
        extra += USERS_TINY
        if name == "two_nodes":
            extra.append("model.micro_batch_size=16")  # 96 / (16 x 1): the shrunk global batch
    args = ["-m", "lmforge", "pretrain", "gpt3/126m", *users_overrides(variant), *extra]
    env = child_env(a.device)
    t0 = time.perf_counter()
    if nodes * per_node == 1:
        procs = [subprocess.Popen([sys.executable, *args], env=env, cwd=work, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)]
    else:  # one torchrun per node group, static rendezvous on this host (what --master-addr/--node-rank select)
        port = free_port()
        procs = []
        for node in range(nodes):
            node_env = dict(env)
            if a.device != "cpu":
                node_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * per_node + i) for i in range(per_node))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node-rank={node}",
                 f"--nproc-per-node={per_node}", "--master-addr=127.0.0.1", f"--master-port={port}", *args],
                env=node_env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - t0
    rec = dict(run="users", case=name, world_size=nodes * per_node, nodes=nodes, command_keys=users_overrides(variant),
               appended=extra, seconds=round(seconds, 1))
    if name == "two_nodes":
        rec["note"] = "tensor parallel 4, not the command's 8: the simulated nodes hold 2 x 2 processes"
    if any(p.returncode != 0 for p in procs):
        said = [line for log in logs for line in log.splitlines() if line.startswith("error:")]
        rec["error"] = said[0] if said else "\n".join(log[-2000:] for log in logs)
        return rec
    from lmforge.train.metrics import read_metrics

    metrics = read_metrics(work / name / "metrics.jsonl")
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m and m["step"] > a.warm]
    layout = next((line for log in logs for line in log.splitlines() if " process(es): " in line), None)
    summary = json.loads((work / name / "summary.json").read_text())
    saved = json.loads((Path(summary["checkpoint"]) / "config.json").read_text())["model"]
    rec.update(layout=layout, vocab_padded=saved["vocab_size"], losses=[losses[s] for s in sorted(losses)],
               tokens_per_s=round(sum(rates) / len(rates), 1) if rates else None,
               val_loss=summary.get("val_loss_after"), test_loss=summary.get("test_loss"))
    if rec["tokens_per_s"]:
        rec["tokens_per_s_per_gpu"] = round(rec["tokens_per_s"] / rec["world_size"], 1)
    return rec


def users(a, folder: Path) -> list[dict]:
    work = folder / "users"
    work.mkdir(parents=True, exist_ok=True)
    tiny = a.shape == "tiny"
    users_data(work, 600 if tiny else 50257, 300_000 if tiny else None)
    have = gpus_present(a.device)
    records = []
    for name in a.cases:
        n = USERS_VARIANTS[name][0] * USERS_VARIANTS[name][1]
        if n > have:
            records.append(dict(run="users", case=name, world_size=n, skipped=f"needs {n} GPUs, {have} present"))
        else:
            records.append(users_run(name, work, a))
    base = next((r for r in records if r["case"] == "one_gpu" and "losses" in r), None)
    tp4 = next((r for r in records if r["case"] == "tp4" and "losses" in r), None)
    if base is not None and tp4 is not None:  # the same model and data: the curves should agree to bf16/fp16 noise
        diff = [abs(x - y) for x, y in zip(tp4["losses"], base["losses"])]
        tp4["vs_one_gpu"] = dict(max_abs_loss_diff=round(max(diff), 4),
                                 mean_abs_loss_diff=round(sum(diff) / len(diff), 4),
                                 last_loss=(round(base["losses"][-1], 4), round(tp4["losses"][-1], 4)),
                                 note="the vocabulary is padded to a multiple of 128 x TP (vocab_padded), as NeMo "
                                      "pads: the two models differ in those unused rows")
    return records


# ----------------------------------------------------------------------------------------------
# torchtitan, the peer of the 8b layouts
TITAN_DEPS = ("torchtitan", "datasets", "torchdata", "tyro", "dill", "multiprocess", "docstring_parser", "typeguard",
              "tomli", "pyarrow", "pandas", "xxhash", "einops", "tensorboard", "PIL")  # theirs and datasets' needs
TITAN_LAYOUTS = {
    "fsdp": [],
    "fsdp_compile": ["--compile.enable"],
    "tp2_fsdp2": ["--parallelism.tensor_parallel_degree", "2"],
    "pp2_fsdp2": ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule", "1F1B"],
    # torchtitan 0.2.1's float8 converter (tensorwise), the output head left in bf16 as lmforge's
    "fsdp_compile_fp8": ["--compile.enable", "--model.converters", "quantize.linear.float8",
                         "--quantize.linear.float8.filter_fqns", "output"],
    "fsdp_compile_fp8_ag": ["--compile.enable", "--model.converters", "quantize.linear.float8",
                            "--quantize.linear.float8.filter_fqns", "output",
                            "--quantize.linear.float8.enable_fsdp_float8_all_gather",
                            "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp"],
}
TITAN_LINE = re.compile(r"step:\s*(\d+).*?loss:\s*([-\d.naif]+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)")


def titan_assets(folder: Path) -> tuple[Path, Path]:
    """(dataset folder holding data.json, tokenizer folder) in the formats of torchtitan's c4_test and
    tests/assets/tokenizer, written here (nothing downloaded)."""
    from lmforge.data.corpus import stdlib_corpus
    from lmforge.data.tokenizers import train_bpe

    data, tok = folder / "c4_like", folder / "tokenizer"
    data.mkdir(parents=True, exist_ok=True)
    stdlib_corpus(data / "data.json", max_bytes=8_000_000)
    train_bpe([data / "data.json"], 8192, tok)
    return data, tok


def titan(a, folder: Path) -> list[dict]:
    import importlib.util

    (n,) = a.nproc
    missing = [m for m in TITAN_DEPS if importlib.util.find_spec(m) is None]
    if not missing and a.device != "cpu":  # anything else torchtitan's trainer needs at import
        probe = subprocess.run([sys.executable, "-c", "import torchtitan.train"], env=child_env(a.device),
                               capture_output=True, text=True)
        if probe.returncode != 0:
            missing = [(probe.stderr.strip().splitlines() or ["import torchtitan.train failed"])[-1]]
    if a.device == "cpu" or a.shape == "tiny" or a.layers or missing:
        why = ("torchtitan's peer runs on GPUs only, the full 8B shape (its flavors fix the layer count): no "
               "--device cpu, --shape tiny or --layers" if a.device == "cpu" or a.shape == "tiny" or a.layers
               else f"not importable here: {', '.join(missing)} (carry their wheels)")
        return [dict(run="8b", case=f"torchtitan_{name}", peer="torchtitan", skipped=why) for name in a.layouts]
    data, tok = titan_assets(folder / "titan")
    records = []
    for name in a.layouts:
        pp = name.startswith("pp")
        local = a.mbs * (a.pp_microbatches if pp else 1)
        args = ["--model.name", "llama3", "--model.flavor", "8B", "--model.hf_assets_path", str(tok),
                "--training.dataset", "c4_test", "--training.dataset_path", str(data),
                "--training.local_batch_size", str(local), "--training.seq_len", str(a.seq or 8192),
                "--training.steps", str(a.warm + a.steps), "--lr_scheduler.warmup_steps", "1",
                "--activation_checkpoint.mode", a.ac, "--metrics.log_freq", "1",
                "--metrics.disable_color_printing", "--job.dump_folder", str(folder / "titan" / name),
                *TITAN_LAYOUTS[name]]
        if pp:
            args += ["--parallelism.pipeline_parallel_microbatch_size", str(a.mbs)]
        if n > gpus_present(a.device):
            records.append(dict(run="8b", case=f"torchtitan_{name}", peer="torchtitan",
                                skipped=f"needs {n} GPUs, {gpus_present(a.device)} present"))
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", f"--master-port={free_port()}",
               "--master-addr=127.0.0.1", "-m", "torchtitan.train", *args]
        env = dict(child_env(a.device), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=folder / "titan")
        text = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)
        steps = {int(m[1]): (float(m[3]), float(m[4].replace(",", ""))) for m in TITAN_LINE.finditer(text)}
        timed = [v for s, v in steps.items() if s > a.warm]
        rec = dict(run="8b", case=f"torchtitan_{name}", peer="torchtitan", world_size=n, args=args,
                   micro_batch=a.mbs, local_batch=local, seq=a.seq or 8192)
        if p.returncode != 0 or not timed:
            rec["error"] = f"exit code {p.returncode}: {text[-2500:]}"
        else:
            rec.update(tokens_per_s_per_gpu=round(sum(t for _, t in timed) / len(timed), 1),
                       peak_reserved_gib=max(m for m, _ in timed), steps_parsed=len(timed))
        records.append(rec)
    return records


def versus_titan(records: list[dict]) -> dict:
    """The 8b summary: lmforge's tokens/s/GPU over torchtitan's, layout by layout (target: >= 1)."""
    ours = {r["case"]: r["tokens_per_s_per_gpu"] for r in records if "peer" not in r and "tokens_per_s_per_gpu" in r}
    theirs = {r["case"][len("torchtitan_"):]: r["tokens_per_s_per_gpu"] for r in records
              if r.get("peer") == "torchtitan" and "tokens_per_s_per_gpu" in r}
    ratio = {k: round(ours[k] / theirs[k], 3) for k in ours if k in theirs}
    return dict(run="8b", summary=True, lmforge_over_torchtitan=ratio, target=1.0,
                meets_target={k: v >= 1.0 for k, v in ratio.items()},
                note=None if ratio else "no layout has both figures (see the records' skipped / error)")


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", choices=RUNS)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", choices=["full", "tiny"], default="full")
    p.add_argument("--nproc", default=None, help="process counts (weak: default 1,2,4; 8b, sft7b: one, default 4)")
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                   help="8b: comma-separated, of " + ", ".join(LAYOUTS) + " (default: " + ",".join(DEFAULT_LAYOUTS) + ")")
    p.add_argument("--cases", default=",".join(USERS_VARIANTS), help="users: of " + ", ".join(USERS_VARIANTS))
    p.add_argument("--peer", choices=["none", "torchtitan"], default="none")
    p.add_argument("--mbs", type=int, default=None, help="micro batch (weak: 4, 8b: 1, sft7b: 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (weak: 2048, 8b: 8192, sft7b: 4096)")
    p.add_argument("--layers", type=int, default=None, help="blocks of the shape (default: all)")
    p.add_argument("--pp-microbatches", type=int, default=4, help="8b pipeline layouts: micro batches per step")
    p.add_argument("--ac", choices=list(AC_KEYS), default=None, help="activation checkpointing (weak: none, else full)")
    p.add_argument("--compile", action="store_true", help="weak: model.compile=true too")
    p.add_argument("--steps", type=int, default=None, help="timed steps (users: steps of each run, default 200)")
    p.add_argument("--warm", type=int, default=None, help="untimed steps first (users: steps left out of tokens/s)")
    p.add_argument("--launch", choices=["each", "merged"], default="each")
    a = p.parse_args(argv)
    default_nproc = {"weak": "1,2,4", "users": "4"}.get(a.run, "4")
    a.nproc = [int(n) for n in (a.nproc or default_nproc).split(",")]
    if a.run in ("8b", "sft7b") and len(a.nproc) != 1:
        p.error(f"{a.run} runs on one process count (--nproc N)")
    a.layouts = a.layouts.split(",")
    a.cases = a.cases.split(",")
    for name in a.layouts:
        if name not in LAYOUTS:
            p.error(f"--layouts: {name!r} is not one of {', '.join(LAYOUTS)}")
    for name in a.cases:
        if name not in USERS_VARIANTS:
            p.error(f"--cases: {name!r} is not one of {', '.join(USERS_VARIANTS)}")
    a.mbs = a.mbs or (4 if a.run == "weak" else 1)
    a.ac = a.ac or ("none" if a.run == "weak" else "full")
    a.steps = a.steps or (200 if a.run == "users" else (3 if a.shape == "tiny" else 10))
    a.warm = a.warm if a.warm is not None else (1 if a.shape == "tiny" or a.device == "cpu" else 3)
    if a.peer != "none" and a.run != "8b":
        p.error("--peer torchtitan goes with the 8b run")
    return a


def plan_and_run(a, folder: Path) -> list[dict]:
    """Every record of the run ``a.run``; scratch files (data, run folders, launch specs) go in ``folder``."""
    if a.run == "users":
        return users(a, folder)
    cases = {"weak": plan_weak, "8b": plan_8b, "sft7b": plan_sft7b}[a.run](a)
    refused = [dict(run=c["run"], case=c["name"], world_size=c["nproc"], error=c["refused"])
               for c in cases if "refused" in c]
    records = run_cases([c for c in cases if "refused" not in c], a, folder) + refused
    if a.run == "weak":
        records.append(efficiency(records))
    if a.peer == "torchtitan":
        records += titan(a, folder)
        records.append(versus_titan(records))
    return records


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"lmforge_scaling_{a.run}_") as tmp:
        records = plan_and_run(a, Path(tmp))
    for rec in records:
        print(json.dumps(rec), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"scaling_{a.run}.json").write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    main()
