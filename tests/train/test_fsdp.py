"""FSDP2 on CPU ranks (gloo): the loss curve of one unsharded process, for pretraining, full SFT (Llama and
Mixtral) and LoRA; sharded checkpoints resume on other layouts (4 FSDP ranks -> 2 -> 1 unsharded process)
and convert to the HF folder of the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import MOE, convert_to_hf, run_cases, tiny_overrides
from tests.finetune.conftest import base_model_dir, sft_tokenizer, task_files  # noqa: F401 (fixtures)
from tests.finetune.test_finetune_parallel import _free_port
from tests.train.test_pretrain import _cli, _env, _losses

STEPS = 10


def _pretrain_args(corpus, out, *extra, **overrides) -> list[str]:
    """``lmforge pretrain`` arguments of the parallel tests' tiny run: 10 steps, validation at 0, 5 and 10,
    checkpoints at 4, 5, 8 and 10."""
    common = {"trainer.max_steps": STEPS, "trainer.val_check_interval": 5, "trainer.limit_test_batches": 0,
              "exp_manager.checkpoint_callback_params.every_n_train_steps": 4,
              "exp_manager.checkpoint_callback_params.save_top_k": -1}
    common.update(overrides)
    return ["pretrain", "tiny/llama", *tiny_overrides(corpus, out, **common), *extra]


def _pretrain(corpus, out, nproc, *extra, env=None, check=True, **overrides):
    return _cli(_pretrain_args(corpus, out, *extra, **overrides), env or _env(), nproc=nproc, check=check)


def _pretrain_here(corpus, out, *extra, **overrides) -> Path:
    """The same run as ``_pretrain(corpus, out, 1, ...)`` in this process (``lmforge.cli.main``): a one-process
    reference curve without an interpreter to start."""
    from lmforge.cli import main

    assert main(_pretrain_args(corpus, out, *extra, **overrides)) == 0
    return out


def _refused(capsys, corpus, out, *extra, **overrides) -> tuple[int, str]:
    """``lmforge pretrain`` in this process (``lmforge.cli.main``), for the tests of what it refuses before training:
    its exit code and everything it printed. An exception other than the one-line errors reaches pytest with its
    traceback, so such a test still fails where the command would print one."""
    from lmforge.cli import main

    capsys.readouterr()
    code = main(_pretrain_args(corpus, out, *extra, **overrides))
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def _same_curve(a: dict, b: dict, steps=range(1, STEPS + 1)):
    assert sorted(a) == sorted(b) == list(steps)
    for step in a:
        # rel 1e-5 in fp32; abs 5e-6 for fine-tuning losses near 0.2, where summation-order noise of another
        # layout is a few 1e-6 absolute (e.g. step 7: 0.2586563 vs 0.2586531 with FSDP hybrid on 4 ranks)
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=5e-6), (step, a[step], b[step])


def _in_process(capsys, corpus, out, *extra, **overrides) -> str:
    """``_pretrain(corpus, out, 1, ...)`` in this process (no interpreter to start), on one thread as the launched
    runs (OMP_NUM_THREADS=1: the exact-resume tests compare them bit for bit): what it printed; it must succeed."""
    from lmforge.cli import main

    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_pretrain_args(corpus, out, *extra, **overrides)) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    return printed.out + printed.err


# The 2-rank pretraining runs of this file that no kill ends, by name: (extra arguments, overrides). They run one
# after the other in ONE torchrun launch (``two_rank_runs``), each in its own process group.
FSDP2 = ["trainer.devices=2", "model.fsdp=true"]
TWO_RANK_RUNS = {
    "full": ([*FSDP2, "model.fsdp_sharding_strategy=full"], {}),
    "grad": ([*FSDP2, "model.fsdp_sharding_strategy=grad"], {}),
    "mixtral": ([*FSDP2, *MOE], {}),
    "gathered": ([*FSDP2, "model.fsdp_sharded_checkpoint=false"],  # full weights on rank 0, optimizer sharded
                 {"trainer.max_steps": 4, "trainer.val_check_interval": 4}),
    "dropout": ([*FSDP2, "model.hidden_dropout=0.1"], {}),  # uninterrupted, for the exact-resume test
    "async": ([*FSDP2, "exp_manager.checkpoint_callback_params.async_save=true"], {}),  # likewise
    "grow": (FSDP2, {}),  # resumes the one-process run killed after step 6 (copied in first)
}


@pytest.fixture(scope="module")
def two_rank_runs(tiny_corpus, tmp_path_factory, killed_run) -> dict:
    """``name -> (CaseRun, results folder)`` of ``TWO_RANK_RUNS``, run in one launch (tests/run_cases.py)."""
    root = tmp_path_factory.mktemp("fsdp_two_rank")
    killed_run(1, "trainer.devices=1", into=root / "grow")
    cases = [{"name": name, "args": _pretrain_args(tiny_corpus, root / name, *extra, **overrides)}
             for name, (extra, overrides) in TWO_RANK_RUNS.items()]
    runs = run_cases(cases, 2, root / "launch")
    return {name: (runs[name], root / name) for name in TWO_RANK_RUNS}


@pytest.mark.parametrize("layout", [
    ("full", 2, ["trainer.devices=2"]),
    ("grad", 2, ["trainer.devices=2"]),
    ("hybrid", 4, ["trainer.devices=2", "trainer.num_nodes=2", "model.micro_batch_size=2"]),
])
def test_pretraining_fsdp_matches_one_process(tiny_corpus, tmp_path, plain_run, two_rank_runs, layout):
    strategy, nproc, devices = layout
    if nproc == 2:  # run in the file's 2-rank launch
        run, out = two_rank_runs[strategy]
        output = run.ok()
    else:
        out = tmp_path / strategy
        p = _pretrain(tiny_corpus, out, nproc, *devices, "model.fsdp=true", f"model.fsdp_sharding_strategy={strategy}")
        output = p.stdout + p.stderr
    assert f"FSDP {strategy}" in output
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    # Sharded checkpoint: per-rank safetensors in model/, name-keyed optimizer shards, nothing pickled.
    step = out / "checkpoints" / "step_0000010"
    shards = sorted(p.name for p in (step / "model").iterdir() if p.suffix == ".safetensors")
    assert len(shards) == nproc
    assert (step / "training_state" / "optimizer").is_dir()
    assert json.loads((step / "config.json").read_text())["sharded"]["world_size"] == nproc


def test_pretraining_mixtral_fsdp_matches_one_process(plain_moe_run, two_rank_runs):
    run, out = two_rank_runs["mixtral"]  # trainer.devices=2 model.fsdp=true + MOE
    run.ok()
    _same_curve(_losses(plain_moe_run), _losses(out))


def test_resume_on_other_layouts_continues_the_curve(tiny_corpus, tmp_path, capsys, plain_run, killed_run):
    fsdp = ["model.fsdp=true"]
    # 4 FSDP ranks killed after step 6 (latest: step 5), then 2 ranks, then one process
    out, _ = killed_run(4, "trainer.devices=4", "model.micro_batch_size=2", *fsdp, into=tmp_path / "moving")
    p = _pretrain(tiny_corpus, out, 2, "trainer.devices=2", *fsdp, env=_env(LMFORGE_TEST_KILL_AT_STEP="9"),
                  check=False)
    assert p.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    assert "resuming from" in p.stdout + p.stderr
    output = _in_process(capsys, tiny_corpus, out, "trainer.devices=1")  # no FSDP: reads the 2-rank shards
    assert "resuming from" in output
    _same_curve(_losses(plain_run), _losses(out))


def test_sharded_checkpoint_converts_to_the_hf_folder_of_its_weights(tiny_corpus, tmp_path, plain_hf, killed_run):
    out, _ = killed_run(2, "trainer.devices=2", "model.fsdp=true")  # stopped after the step-5 checkpoint
    hf_sharded, (hf_plain, b) = tmp_path / "hf_sharded", plain_hf
    a = convert_to_hf(out / "checkpoints" / "step_0000005", hf_sharded)
    assert a.keys() == b.keys()
    for k in a:  # the same training on other layouts: equal up to float summation order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert json.loads((hf_sharded / "config.json").read_text()) == json.loads((hf_plain / "config.json").read_text())


# -- fine-tuning ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, sft_tokenizer):
    from tests.finetune.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("mixtral") / "base", sft_tokenizer, hidden_size=32,
                           ffn_hidden_size=48, num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.02)


def _finetune(args, nproc, sync_counts=None):
    """``lmforge finetune ARGS`` on ``nproc`` processes; with ``sync_counts`` (a folder) through
    tests/train/count_syncs.py, which writes each rank's host reads of tensors per step there."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = ["-m", "lmforge"]
    if sync_counts is not None:
        run = [str(Path(__file__).with_name("count_syncs.py"))]
        env["LMFORGE_SYNC_COUNTS"] = str(sync_counts)
    cmd = [sys.executable, *run, "finetune", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", "--master-addr=127.0.0.1", *run, "finetune", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


def _finetune_common(base, task_files, method) -> list[str]:
    train, val = task_files
    return ["--model", base, "--data", train, "--val-data", val, "--method", method, "seq_length=32",
            "micro_batch_size=2", "global_batch_size=8", f"trainer.max_steps={STEPS}", "trainer.accelerator=cpu",
            "trainer.limit_val_batches=1", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1",
            "generation.num_samples=2", "generation.max_new_tokens=2", "optim.lr=0.01",
            f"sft.pack={str(method != 'ptuning').lower()}"]


@pytest.fixture(scope="module")
def finetune_one_process(tmp_path_factory, base_model_dir, mixtral_dir, task_files):
    """``(model, method) -> summary.json`` of the one-process fine-tuning run every sharded layout of that model and
    method is compared with: run once per pair (in this process), shared by the strategies."""
    done = {}

    def summary(model: str, method: str) -> dict:
        if (model, method) not in done:
            from lmforge.cli import main

            base = base_model_dir if model == "llama" else mixtral_dir
            out = tmp_path_factory.mktemp(f"ft_one_{model}_{method}")
            assert main(["finetune", "--out", str(out), *_finetune_common(base, task_files, method),
                         "trainer.devices=1"]) == 0
            done[model, method] = json.loads((out / "summary.json").read_text())
        return done[model, method]

    return summary


FINETUNE_LAYOUTS = [
    ("llama", "full", "full"), ("mixtral", "full", "full"), ("llama", "lora", "full"), ("llama", "ia3", "full"),
    ("llama", "adapter", "full"), ("llama", "ptuning", "full"), ("mixtral", "lora", "full"), ("llama", "full", "hybrid"),
    ("llama", "lora", "grad")]
COUNTED = ("llama", "lora", "full")  # run through tests/train/count_syncs.py, in a launch of its own


def _finetune_layout(strategy: str) -> tuple[int, list[str]]:
    layout = ["trainer.devices=2", "fsdp=true", f"fsdp_sharding_strategy={strategy}"]
    if strategy == "hybrid":  # 2 "nodes" of 2 ranks on this host
        return 4, layout + ["trainer.num_nodes=2", "micro_batch_size=1"]
    return 2, layout


@pytest.fixture(scope="module")
def finetune_sharded(tmp_path_factory, base_model_dir, mixtral_dir, task_files) -> dict:
    """``(model, method, strategy) -> (CaseRun, out folder)`` of every sharded fine-tuning layout but ``COUNTED``:
    the 2-rank layouts one after the other in ONE torchrun launch (tests/run_cases.py: one interpreter start and
    rendezvous for all), the 4-rank one in another."""
    root = tmp_path_factory.mktemp("ft_sharded")
    by_nproc, outs = {}, {}
    for model, method, strategy in FINETUNE_LAYOUTS:
        if (model, method, strategy) == COUNTED:
            continue
        nproc, layout = _finetune_layout(strategy)
        name = f"{model}-{method}-{strategy}"
        outs[model, method, strategy] = root / name
        base = base_model_dir if model == "llama" else mixtral_dir
        by_nproc.setdefault(nproc, []).append({"name": name, "args": [
            "finetune", "--out", str(root / name), *_finetune_common(base, task_files, method), *layout]})
    runs = {}
    for nproc, cases in by_nproc.items():
        runs.update(run_cases(cases, nproc, root / f"launch{nproc}"))
    return {key: (runs["-".join(key)], out) for key, out in outs.items()}


@pytest.mark.parametrize("model,method,strategy", FINETUNE_LAYOUTS)
def test_finetuning_fsdp_matches_one_process(tmp_path, base_model_dir, mixtral_dir, task_files, finetune_one_process,
                                             finetune_sharded, model, method, strategy):
    one = finetune_one_process(model, method)
    nproc, layout = _finetune_layout(strategy)
    counted = (model, method, strategy) == COUNTED
    if counted:
        base = base_model_dir if model == "llama" else mixtral_dir
        out = tmp_path / "two"
        _finetune(["--out", str(out)] + _finetune_common(base, task_files, method) + layout, nproc,
                  sync_counts=tmp_path / "syncs")
    else:
        case, out = finetune_sharded[model, method, strategy]
        case.ok()
    two = json.loads((out / "summary.json").read_text())
    _same_curve(dict(one["losses"]), dict(two["losses"]))
    if counted:  # no step waits for the device: the loss and token counts are read at logging steps only
        for rank in range(nproc):
            syncs = json.loads((tmp_path / "syncs" / f"rank{rank}.json").read_text())
            assert sorted(int(k) for k in syncs["around"]) == list(range(0, STEPS + 1))  # the counter counts
            assert syncs["in_step"] == {}, syncs["sites"]  # was 2 a step: the global token count, the stop flag
        # the counts read later still add up: the same tokens and samples in the last checkpoint as one process
        states = [json.loads((Path(run["adapter"]).parent / "checkpoints" / f"step_{STEPS:07d}" / "training_state" /
                              "state.json").read_text())["state"] for run in (one, two)]
        assert [(s["tokens_trained"], s["consumed_samples"]) for s in states] == \
            [(states[0]["tokens_trained"], 8 * STEPS)] * 2 and states[0]["tokens_trained"] > 0
    assert two["best_metrics"]["val_loss"] == pytest.approx(one["best_metrics"]["val_loss"], rel=1e-5)
    assert two["trainable_parameters"] == one["trainable_parameters"]
    if method != "full":  # the adapter written from the sharded run equals the one-process adapter
        from safetensors.torch import load_file

        a = load_file(str(Path(one["adapter"]) / "adapter_model.safetensors"))
        b = load_file(str(Path(two["adapter"]) / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            # Adam divides by sqrt(v): where a gradient is near zero, float summation-order noise between the
            # layouts becomes a visible step (seen: 2 of 2048 adapter values 1.6e-5 apart after 10 steps at lr 0.01)
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5)


def test_unsharded_checkpoint_resumes_under_fsdp_and_fsdp_resume_is_exact(tiny_corpus, tmp_path, plain_run,
                                                                         two_rank_runs):
    # 1 unsharded process -> 2 FSDP ranks: the optimizer state by parameter index is sliced onto the shards.
    run, out = two_rank_runs["grow"]  # the one-process run killed after step 6, resumed on 2 FSDP ranks
    assert "resuming from" in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
    # The same FSDP layout killed and resumed: bit-exact against an uninterrupted FSDP run.
    run, whole = two_rank_runs["dropout"]
    run.ok()
    killed = tmp_path / "killed"
    fsdp = ["trainer.devices=2", "model.fsdp=true", "model.hidden_dropout=0.1"]
    p = _pretrain(tiny_corpus, killed, 2, *fsdp, env=_env(LMFORGE_TEST_KILL_AT_STEP="7"), check=False)
    assert p.returncode != 0
    _pretrain(tiny_corpus, killed, 2, *fsdp)
    assert _losses(whole) == _losses(killed)


def test_one_process_fsdp_trains_unsharded_and_gathered_checkpoints(tiny_corpus, tmp_path, capsys, plain_run,
                                                                    two_rank_runs):
    out = tmp_path / "one"
    output = _in_process(capsys, tiny_corpus, out, "trainer.devices=1", "model.optim.name=distributed_fused_adam")
    assert "nothing to shard" in output
    _same_curve(_losses(plain_run), _losses(out))  # fused AdamW here (distributed_fused_adam's base)
    # fsdp_sharded_checkpoint=false (NeMo's meaning): full weights on rank 0, the optimizer still sharded
    run, out = two_rank_runs["gathered"]  # 2 FSDP ranks, 4 steps
    run.ok()
    step = out / "checkpoints" / "step_0000004"
    assert (step / "model.safetensors").is_file() and not (step / "model").exists()
    assert (step / "training_state" / "optimizer").is_dir()


@pytest.mark.parametrize("overrides,message", [
    (["trainer.devices=2", "model.fsdp=true", "model.fsdp_sharding_strategy=zero3"],
     "model.fsdp_sharding_strategy='zero3' is not one of: full, grad, hybrid"),
    (["trainer.devices=2", "model.fsdp=true", "model.fsdp_sharding_strategy=hybrid"],
     "hybrid replicates across nodes but trainer.num_nodes=1"),
    (["trainer.devices=2", "model.fsdp_cpu_offload=true"], "model.fsdp_cpu_offload=true offloads FSDP shards"),
    (["trainer.devices=1", "model.fsdp=true", "model.fsdp_cpu_offload=true"], "this run is on the CPU already"),
    (["trainer.devices=2", "model.fsdp=true", "model.fsdp_grad_reduce_dtype=fp8"], "model.fsdp_grad_reduce_dtype"),
    (["trainer.devices=3", "model.tensor_model_parallel_size=2"], "is not divisible by"),
    (["trainer.devices=2", "model.fsdp=true", "model.activations_checkpoint_granularity=full",
      "model.activations_checkpoint_num_layers=2"], "each block gathers its own parameters"),
])
def test_bad_layouts_are_refused_with_one_message(tiny_corpus, tmp_path, capsys, overrides, message):
    code, err = _refused(capsys, tiny_corpus, tmp_path / "bad", *overrides)
    assert code != 0 and message in err, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "bad").exists()


def test_checkpoint_of_another_model_is_refused(tiny_corpus, tmp_path, capsys, plain_run):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(plain_run, out)
    code, err = _refused(capsys, tiny_corpus, out, "trainer.devices=1", "model.hidden_size=48")
    assert code != 0 and "holds a model of another shape" in err and "Traceback" not in err


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["model.fsdp=true"])])
def test_async_save_resumes_exactly(tiny_corpus, tmp_path, capsys, two_rank_runs, nproc, extra):
    args = [f"trainer.devices={nproc}", "exp_manager.checkpoint_callback_params.async_save=true", *extra]
    killed = tmp_path / "killed"
    if nproc == 1:  # the uninterrupted run and the resume in this process, the killed run in its own
        whole = tmp_path / "whole"
        _in_process(capsys, tiny_corpus, whole, *args)
    else:
        run, whole = two_rank_runs["async"]
        run.ok()
    assert (whole / "checkpoints" / "latest").read_text().strip() == "step_0000010"  # published at the end
    assert not list((whole / "checkpoints").glob(".step_*"))
    p = _pretrain(tiny_corpus, killed, nproc, *args, env=_env(LMFORGE_TEST_KILL_AT_STEP="6"), check=False)
    assert p.returncode != 0
    # step 5 was still being written in the background when the run died: step 4 is the newest whole one
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    if nproc == 1:
        _in_process(capsys, tiny_corpus, killed, *args)
    else:
        _pretrain(tiny_corpus, killed, nproc, *args)
    assert _losses(whole) == _losses(killed)
    from lmforge.train.checkpoint import load_model

    a, _ = load_model(whole / "checkpoints" / "step_0000010")
    b, _ = load_model(killed / "checkpoints" / "step_0000010")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
