"""FSDP2 on CPU ranks (gloo): the loss curve of one unsharded process for pretraining (fine-tuning:
test_fsdp_finetune.py); sharded checkpoints resume on other layouts (4 FSDP ranks -> 2 -> 1 unsharded process)
and convert to the HF folder of the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import MOE, convert_to_hf, run_cases, tiny_overrides
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
FUSED_CLIP = ["model.optim.name=fused_adam", "trainer.gradient_clip_val=0.5"]  # clipping inside the fused step
TWO_RANK_RUNS = {
    "full": ([*FSDP2, "model.fsdp_sharding_strategy=full"], {}),
    "grad": ([*FSDP2, "model.fsdp_sharding_strategy=grad"], {}),
    "mixtral": ([*FSDP2, *MOE], {}),
    "gathered": ([*FSDP2, "model.fsdp_sharded_checkpoint=false"],  # full weights on rank 0, optimizer sharded
                 {"trainer.max_steps": 4, "trainer.val_check_interval": 4}),
    "dropout": ([*FSDP2, "model.hidden_dropout=0.1"], {}),  # uninterrupted, for the exact-resume test
    "async": ([*FSDP2, "exp_manager.checkpoint_callback_params.async_save=true"], {}),  # likewise
    "grow": (FSDP2, {}),  # resumes the one-process run killed after step 6 (copied in first)
    "fused_clip": ([*FSDP2, *FUSED_CLIP], {"trainer.max_steps": 4, "trainer.val_check_interval": 4}),
    # micro batch 2 x 2 ranks of a global batch of 8: two micro batches a step, reduce-scattered after each
    "accumulate": ([*FSDP2, "model.micro_batch_size=2"], {}),
}
HYBRID = ["trainer.devices=2", "trainer.num_nodes=2", "model.micro_batch_size=2", "model.fsdp=true",
          "model.fsdp_sharding_strategy=hybrid"]
FSDP4 = ["trainer.devices=4", "model.micro_batch_size=2", "model.fsdp=true"]
DROPOUT = [*FSDP2, "model.hidden_dropout=0.1"]
ASYNC2 = ["trainer.devices=2", "exp_manager.checkpoint_callback_params.async_save=true", "model.fsdp=true"]


@pytest.fixture(scope="module")
def two_rank_runs(tiny_corpus, tmp_path_factory, killed_run) -> dict:
    """Every multi-process run of this file (but the one-process run killed for "grow", ``killed_run``), in four
    torchrun launches (tests/run_cases.py); a kill ends a launch, so a killed run is its launch's last case and its
    resumption opens the next launch:

    1. 4 ranks: "hybrid" (FSDP hybrid, 2 "nodes" of 2), "moving_4" (FSDP 4 killed after step 6, in moving/);
    2. 2 ranks: ``TWO_RANK_RUNS``, "dropout_killed" (killed after step 7);
    3. 2 ranks: "dropout_resumed" (in dropout_killed/), "async_killed" (async saves, killed after step 6);
    4. 2 ranks: "async_resumed" (in async_killed/), "moving_2" (moving/ resumed on 2 FSDP ranks, killed after 9).

    ``name -> (CaseRun, results folder)``, and ``"latest"``: each killed run's newest checkpoint when it died."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    killed_run(1, "trainer.devices=1", into=root / "grow")
    result, latest = {}, {}

    def case(name, folder, *args, kill=None, **overrides):
        result[name] = root / folder
        env = {"LMFORGE_TEST_KILL_AT_STEP": str(kill)} if kill else {}
        return {"name": name, "args": _pretrain_args(tiny_corpus, root / folder, *args, **overrides), "env": env}

    def launch(nproc, *cases):
        runs = run_cases(list(cases), nproc, root / f"launch_{cases[0]['name']}")
        result.update({c["name"]: (runs[c["name"]], result[c["name"]]) for c in cases})
        killed = result[cases[-1]["name"]][1] / "checkpoints" / "latest"
        latest[cases[-1]["name"]] = killed.read_text().strip() if killed.is_file() else None

    launch(4, case("hybrid", "hybrid", *HYBRID), case("moving_4", "moving", *FSDP4, kill=6))
    launch(2, *[case(name, name, *extra, **overrides) for name, (extra, overrides) in TWO_RANK_RUNS.items()],
           case("dropout_killed", "dropout_killed", *DROPOUT, kill=7))
    launch(2, case("dropout_resumed", "dropout_killed", *DROPOUT),
           case("async_killed", "async_killed", *ASYNC2, kill=6))
    launch(2, case("async_resumed", "async_killed", *ASYNC2), case("moving_2", "moving", *FSDP2, kill=9))
    return {**result, "latest": latest}


def _killed(run) -> None:
    assert run.ran and not run.codes, run.launch  # killed: no rank returned


@pytest.mark.parametrize("layout", [("full", 2), ("grad", 2), ("hybrid", 4)])
def test_pretraining_fsdp_matches_one_process(plain_run, two_rank_runs, layout):
    strategy, nproc = layout
    run, out = two_rank_runs[strategy]  # "hybrid": 2 "nodes" of 2 ranks, micro batch 2
    output = run.ok()
    assert f"FSDP {strategy}" in output
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    # Sharded checkpoint: per-rank safetensors in model/, name-keyed optimizer shards, nothing pickled.
    step = out / "checkpoints" / "step_0000010"
    shards = sorted(p.name for p in (step / "model").iterdir() if p.suffix == ".safetensors")
    assert len(shards) == nproc
    assert (step / "training_state" / "optimizer").is_dir()
    assert json.loads((step / "config.json").read_text())["sharded"]["world_size"] == nproc


def test_fsdp_with_gradient_accumulation_matches_one_process(plain_run, two_rank_runs):
    """Two micro batches a step on 2 FSDP ranks: the gradients are reduce-scattered after each micro batch (no rank
    keeps whole unsharded gradients between them) and add up to one process's step on micro batches of 4."""
    run, out = two_rank_runs["accumulate"]
    output = run.ok()
    assert "FSDP full" in output
    _same_curve(_losses(plain_run), _losses(out))


def test_fsdp_reduce_scatters_every_micro_batch(tmp_path):
    """The loop's gradient sync for a micro batch before the last: an FSDP2 module still reduce-scatters into its
    sharded gradients (``p.grad`` a DTensor after the backward). With FSDP's sync switched off (the loop before) they
    stayed None, each rank holding the whole unsharded gradients inside FSDP until the last micro batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lmforge.train.loop import Trainer

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        fully_shard(model)
        trainer = Trainer.__new__(Trainer)  # _gradient_sync reads only the model
        trainer.model = model
        with trainer._gradient_sync(last=False):
            model(torch.randn(2, 4)).sum().backward()
        assert all(type(p.grad).__name__ == "DTensor" for p in model.parameters()), [p.grad for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def test_pretraining_mixtral_fsdp_matches_one_process(plain_moe_run, two_rank_runs):
    run, out = two_rank_runs["mixtral"]  # trainer.devices=2 model.fsdp=true + MOE
    run.ok()
    _same_curve(_losses(plain_moe_run), _losses(out))


def test_fsdp_clipping_inside_the_fused_adamw_step_matches_clipping_in_place(tiny_corpus, tmp_path, two_rank_runs):
    """FSDP2 with fused AdamW clips inside the optimizer's step (``optimizer.grad_scale`` beside DTensor shards,
    :func:`lmforge.train.optim.clips_in_step`); the curve and the norms equal one process clipping in place before
    a multi-tensor AdamW step, with the clip acting at every step."""
    from lmforge.train.optim import build_optimizer, clips_in_step

    assert clips_in_step(build_optimizer(torch.nn.Linear(2, 2), "fused_adam", 1e-3, 0.0, [0.9, 0.95], 1e-8,
                                         torch.device("cpu")))
    run, out = two_rank_runs["fused_clip"]
    run.ok()
    ref = _pretrain_here(tiny_corpus, tmp_path / "ref", "trainer.devices=1", "trainer.gradient_clip_val=0.5",
                         **{"trainer.max_steps": 4, "trainer.val_check_interval": 4})
    steps = range(1, 5)
    _same_curve(_losses(ref), _losses(out), steps=steps)
    _same_curve(_losses(ref, "grad_norm"), _losses(out, "grad_norm"), steps=steps)
    assert min(_losses(out, "grad_norm").values()) > 0.5  # the clip acted at every step


def test_resume_on_other_layouts_continues_the_curve(tiny_corpus, capsys, plain_run, two_rank_runs):
    # 4 FSDP ranks killed after step 6 (latest: step 5), then 2 ranks, then one process
    latest = two_rank_runs["latest"]
    run, out = two_rank_runs["moving_4"]
    _killed(run)
    assert latest["moving_4"] == "step_0000005"
    run, _ = two_rank_runs["moving_2"]  # resumed on 2 FSDP ranks, killed after step 9
    _killed(run)
    assert latest["moving_2"] == "step_0000008" and "resuming from" in run.output
    output = _in_process(capsys, tiny_corpus, out, "trainer.devices=1")  # no FSDP: reads the 2-rank shards
    assert "resuming from" in output
    _same_curve(_losses(plain_run), _losses(out))


def test_sharded_checkpoint_converts_to_the_hf_folder_of_its_weights(tmp_path, plain_hf, two_rank_runs):
    run, out = two_rank_runs["full"]  # its step-5 checkpoint, written by 2 FSDP ranks mid-run
    run.ok()
    hf_sharded, (hf_plain, b) = tmp_path / "hf_sharded", plain_hf
    a = convert_to_hf(out / "checkpoints" / "step_0000005", hf_sharded)
    assert a.keys() == b.keys()
    for k in a:  # the same training on other layouts: equal up to float summation order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert json.loads((hf_sharded / "config.json").read_text()) == json.loads((hf_plain / "config.json").read_text())


def test_unsharded_checkpoint_resumes_under_fsdp_and_fsdp_resume_is_exact(plain_run, two_rank_runs):
    # 1 unsharded process -> 2 FSDP ranks: the optimizer state by parameter index is sliced onto the shards.
    run, out = two_rank_runs["grow"]  # the one-process run killed after step 6, resumed on 2 FSDP ranks
    assert "resuming from" in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
    # The same FSDP layout killed (after step 7) and resumed: bit-exact against an uninterrupted FSDP run.
    run, whole = two_rank_runs["dropout"]
    run.ok()
    _killed(two_rank_runs["dropout_killed"][0])
    run, killed = two_rank_runs["dropout_resumed"]
    assert "resuming from" in run.ok()
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
    if nproc == 1:  # the uninterrupted run and the resume in this process, the killed run in its own
        whole, killed = tmp_path / "whole", tmp_path / "killed"
        _in_process(capsys, tiny_corpus, whole, *args)
        p = _pretrain(tiny_corpus, killed, nproc, *args, env=_env(LMFORGE_TEST_KILL_AT_STEP="6"), check=False)
        assert p.returncode != 0
        latest = (killed / "checkpoints" / "latest").read_text().strip()
    else:  # ASYNC2 in the file's launches: killed after step 6, resumed in the next launch
        run, whole = two_rank_runs["async"]
        run.ok()
        _killed(two_rank_runs["async_killed"][0])
        latest = two_rank_runs["latest"]["async_killed"]
    assert (whole / "checkpoints" / "latest").read_text().strip() == "step_0000010"  # published at the end
    assert not list((whole / "checkpoints").glob(".step_*"))
    # step 5 was still being written in the background when the run died: step 4 is the newest whole one
    assert latest == "step_0000004"
    if nproc == 1:
        _in_process(capsys, tiny_corpus, killed, *args)
    else:
        run, killed = two_rank_runs["async_resumed"]
        assert "resuming from" in run.ok()
    assert _losses(whole) == _losses(killed)
    from lmforge.train.checkpoint import load_model

    a, _ = load_model(whole / "checkpoints" / "step_0000010")
    b, _ = load_model(killed / "checkpoints" / "step_0000010")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
