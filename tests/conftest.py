"""Shared fixtures: a small corpus from the standard library, a tokenizer and an indexed dataset.

Nothing is downloaded: the text is the running Python's own standard library.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def stdlib_texts(n_modules: int = 40) -> list[str]:
    import argparse, collections, difflib, email.message, json as json_mod, pathlib, random, shutil, string, textwrap  # noqa
    mods = [argparse, collections, difflib, email.message, json_mod, pathlib, random, shutil, string, textwrap]
    texts = []
    for m in mods:
        src = inspect.getsource(m)
        # split long modules into function-sized documents so there are many documents
        parts = src.split("\n\n\n")
        texts.extend(p for p in parts if p.strip())
    return texts[: n_modules * 10]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """{'jsonl', 'tokenizer', 'prefix'}: a tokenizer (vocab 512) and an indexed dataset over ~400 documents."""
    from lmforge.data.preprocess import preprocess
    from lmforge.data.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("corpus")
    jsonl = root / "corpus.jsonl"
    with open(jsonl, "w") as f:
        for t in stdlib_texts():
            f.write(json.dumps({"text": t}) + "\n")
    tok = train_bpe([jsonl], 512, root / "tokenizer")
    preprocess([jsonl], root / "data" / "corpus", root / "tokenizer", append_eod=True, log=lambda *a: None)
    return {"jsonl": jsonl, "tokenizer": root / "tokenizer", "prefix": str(root / "data" / "corpus_text_document"),
            "vocab_size": tok.vocab_size}


def load_benchmark(name: str):
    """benchmarks/``name``.py as a module (the benchmarks are scripts, not a package): tests run their ``main`` or
    helpers on tiny sizes."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_overrides(corpus: dict, out: Path, **extra) -> list[str]:
    """Overrides that turn the tiny/llama recipe into a seconds-long CPU run on ``corpus``."""
    base = {
        "trainer.accelerator": "cpu", "trainer.precision": "32", "trainer.max_steps": 8,
        "trainer.val_check_interval": 4, "trainer.limit_val_batches": 2, "trainer.limit_test_batches": 1,
        "trainer.log_every_n_steps": 1,
        "model.micro_batch_size": 4, "model.global_batch_size": 8, "model.encoder_seq_length": 32,
        "model.max_position_embeddings": 64, "model.data.seq_length": 32,
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4, "model.num_query_groups": 2,
        "model.ffn_hidden_size": 64, "model.make_vocab_size_divisible_by": 8,
        "model.optim.lr": 3e-3, "model.optim.sched.warmup_steps": 2, "model.optim.sched.constant_steps": 0,
        "model.optim.sched.min_lr": 3e-4,
        "model.data.data_prefix": f"[1.0,{corpus['prefix']}]", "model.data.splits_string": "90,5,5",
        "model.tokenizer.model": str(corpus["tokenizer"]),
        "exp_manager.explicit_log_dir": str(out), "exp_manager.create_tensorboard_logger": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None,
                 check: bool = True):
    """Run ``script args`` on ``nproc`` gloo ranks through torchrun from the repository root (``env``: variables
    added to this process's); with ``check``, AssertionError with the tail of its output when it fails. Returns the
    CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", str(script), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[1])
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def assert_run_plots(folder, tags=("loss", "lr", "val_loss"), tensorboard: bool = True) -> None:
    """``folder`` holds a loss-curve PNG (its signature, a non-empty image) and, with ``tensorboard``, one
    TensorBoard events file (written by rank 0 alone) with scalars of ``tags`` that TensorBoard's own reader
    loads; without it, no events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(folder)
    png = (folder / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    events = list(folder.glob("events.out.tfevents.*"))
    if not tensorboard:
        assert events == []
        return
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert set(tags) <= set(acc.Tags()["scalars"]), acc.Tags()["scalars"]
    assert acc.Scalars("loss") and all(e.step >= 1 for e in acc.Scalars("loss"))


@pytest.fixture(scope="session")
def plain_run(tiny_corpus, tmp_path_factory) -> Path:
    """The one-process reference run of the parallel-layout tests (tests/train/test_fsdp.py's ``_pretrain``:
    10 steps, validation at 0, 5 and 10, checkpoints at 4, 5, 8 and 10): the loss curve, grad norms and checkpoints
    every layout is compared with. Run once for the whole session, in this process (no interpreter to start)."""
    from lmforge.cli import main
    from tests.train.test_fsdp import _pretrain_args

    out = tmp_path_factory.mktemp("plain") / "plain"
    assert main(_pretrain_args(tiny_corpus, out, "trainer.devices=1")) == 0
    return out


@pytest.fixture(scope="session")
def tied_plain_run(tiny_corpus, tmp_path_factory) -> Path:
    """``plain_run`` of the tied-head model (``model.share_embeddings_and_output_weights=true``): the reference of the
    tied pipeline-parallel runs."""
    from lmforge.cli import main
    from tests.train.test_fsdp import _pretrain_args

    out = tmp_path_factory.mktemp("tied_plain") / "plain"
    assert main(_pretrain_args(tiny_corpus, out, "trainer.devices=1", "model.share_embeddings_and_output_weights=true")) == 0
    return out


# a tiny Mixtral: the parallel tests' MoE overrides
MOE = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_aux_loss_coeff=0.02"]


@pytest.fixture(scope="session")
def plain_moe_run(tiny_corpus, tmp_path_factory) -> Path:
    """``plain_run`` of the tiny Mixtral (``MOE``): the one-process reference of the FSDP and expert-parallel tests."""
    from tests.train.test_fsdp import _pretrain_here

    return _pretrain_here(tiny_corpus, tmp_path_factory.mktemp("plain_moe") / "plain", "trainer.devices=1", *MOE)


@pytest.fixture(scope="session")
def killed_run(tiny_corpus, tmp_path_factory):
    """``killed_run(nproc, *args, into=None, at=6) -> (folder, output)``: the parallel tests' tiny run on that layout
    (tests/train/test_fsdp.py's ``_pretrain``: checkpoints at 4, 5, 8 and 10), killed after step ``at`` (6: its
    newest checkpoint is step 5; 9: step 8, so a resumption on a slow layout runs two steps). Several tests resume
    the same killed run on other layouts: it runs once per layout for the session; ``into`` gives a test its own
    copy to resume in (the shared folder is only read)."""
    import shutil

    from tests.train.test_fsdp import _pretrain
    from tests.train.test_pretrain import _env

    runs = {}

    def get(nproc: int, *args: str, into: Path | None = None, at: int = 6) -> tuple[Path, str]:
        key = (nproc, *args, at)
        if key not in runs:
            out = tmp_path_factory.mktemp("killed") / "run"
            p = _pretrain(tiny_corpus, out, nproc, *args, env=_env(LMFORGE_TEST_KILL_AT_STEP=str(at)), check=False)
            assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]  # killed after step `at`
            newest = max(step for step in (4, 5, 8) if step < at)
            assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{newest:07d}"
            runs[key] = out, p.stdout + p.stderr
        out, output = runs[key]
        if into is None:
            return out, output
        shutil.copytree(out, into)
        return into, output

    return get


def convert_to_hf(checkpoint: Path, out: Path) -> dict:
    """``lmforge convert CHECKPOINT OUT --to hf`` (in this process); the HF folder's tensors by name."""
    from safetensors.torch import load_file

    from lmforge.cli import main

    assert main(["convert", str(checkpoint), str(out), "--to", "hf", "--no-progress"]) == 0
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="session")
def plain_hf(plain_run, tmp_path_factory) -> tuple[Path, dict]:
    """The HF folder of ``plain_run``'s step-5 checkpoint and its tensors (converted once for the session)."""
    out = tmp_path_factory.mktemp("plain_hf") / "hf"
    return out, convert_to_hf(plain_run / "checkpoints" / "step_0000005", out)


class CaseRun:
    """One command of a :func:`run_cases` launch: ``codes`` (each rank's exit code; a rank missing: it did not
    return, killed or stopped by an earlier case's failure), ``output`` (every rank's output, rank 0 first) and
    ``launch`` (the tail of torchrun's own output, for the failure messages)."""

    def __init__(self, name: str, nproc: int, codes: dict[int, int], output: str, launch: str, ran: bool):
        self.name, self.nproc, self.codes, self.output, self.launch, self.ran = name, nproc, codes, output, launch, ran

    def ok(self) -> str:
        """The output of a command that returned 0 on every rank; AssertionError saying what happened otherwise."""
        if not self.ran:
            raise AssertionError(f"case {self.name} did not run: an earlier case of its launch ended it\n{self.launch}")
        if sorted(self.codes) != list(range(self.nproc)) or set(self.codes.values()) != {0}:
            raise AssertionError(f"case {self.name} failed (exit codes by rank: {self.codes}):\n"
                                 f"{self.output[-4000:]}\n{self.launch}")
        return self.output


def run_cases(cases: list[dict], nproc: int, folder: Path, timeout: int = 600, script: Path | None = None,
              script_args: tuple = ()) -> dict[str, CaseRun]:
    """Run several ``lmforge`` commands one after the other in ONE torchrun launch of ``nproc`` gloo ranks
    (tests/run_cases.py): ``cases`` are ``{"name", "args"[, "env", "cwd"]}``, an ``env`` with
    LMFORGE_TEST_KILL_AT_STEP only in the last case. Returns each case's :class:`CaseRun` by name; the launch's
    failure is not raised here (a killed last case fails it on purpose): each test asserts on its own case
    (``.ok()``). ``script``: a worker that runs the cases itself (``script *script_args CASES.json``, e.g. after
    checks of its own in the same process group; tests/train/fp8_fsdp_worker.py)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "cases.json"
    spec.write_text(json.dumps({"cases": cases, "folder": str(folder)}))
    p = run_torchrun(script or Path(__file__).with_name("run_cases.py"), *script_args, str(spec), nproc=nproc,
                     timeout=timeout, check=False)
    launch = f"launch exit code {p.returncode}; its output:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    runs = {}
    for case in cases:
        name = case["name"]
        logs = [folder / f"{name}.rank{r}.log" for r in range(nproc)]
        codes = {r: int((folder / f"{name}.rank{r}.rc").read_text()) for r in range(nproc)
                 if (folder / f"{name}.rank{r}.rc").is_file()}
        output = "".join(log.read_text(errors="replace") for log in logs if log.is_file())
        runs[name] = CaseRun(name, nproc, codes, output, launch, ran=any(log.is_file() for log in logs))
    return runs
