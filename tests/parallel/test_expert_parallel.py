"""Expert parallelism (model.expert_model_parallel_size) on gloo ranks: a tiny Mixtral's experts spread over 2
ranks (and over 2 of 4 data-parallel ranks) train like the plain model; pretraining with EP 2 gives the loss curve
and gradient norms of one process, its checkpoint resumes on one process and the reverse, converts to the same
HF folder; layouts it cannot run are refused with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import MOE, convert_to_hf, run_cases
from tests.train.test_fsdp import (_in_process, _pretrain, _pretrain_args, _pretrain_here, _refused,
                                     _same_curve)
from tests.train.test_pretrain import _env, _losses

WORKER = Path(__file__).with_name("ep_worker.py")


LAYOUT = {1: ["trainer.devices=1"], 2: ["trainer.devices=2", "model.expert_model_parallel_size=2"]}
KILL = {"LMFORGE_TEST_KILL_AT_STEP": "6"}  # killed after step 6: the newest checkpoint is step 5
VARIANTS = {2: ["plain", "checkpointing"], 4: ["plain"]}  # the worker's runs on 2 and 4 ranks (and "meta" on each)
EP_FSDP = {  # EP 2 x FSDP on 4 ranks: name -> layout
    "ep_fsdp_full": ["model.fsdp=true"],  # experts sharded over the 2 ranks holding the same experts
    "ep_fsdp_grad": ["model.fsdp=true", "model.fsdp_sharding_strategy=grad"],
}


def _ep_fsdp_args(layout: list[str]) -> list[str]:
    return ["trainer.devices=4", "model.micro_batch_size=2", *layout, "model.expert_model_parallel_size=2", *MOE]


@pytest.fixture(scope="module")
def ep_launches(tiny_corpus, tmp_path_factory) -> dict:
    """Every multi-process run of this file in three torchrun launches (tests/run_cases.py; a kill ends a launch),
    each starting with the worker's checks (tests/parallel/ep_worker.py, ``VARIANTS``):

    - ``"killed"``: the one-process run killed after step 6 (its CompletedProcess; a process of its own, before);
    - 2 ranks: ``"ep2"`` from step 0, ``"one_then_ep2"`` (the killed one-process run resumed on EP 2) and
      ``"ep2_killed"`` (EP 2 killed after step 6);
    - 4 ranks, one launch each: ``EP_FSDP``, killed after step 6.

    ``name -> (CaseRun, results folder)``, and ``nproc -> every rank's worker results``."""
    root = tmp_path_factory.mktemp("ep")
    killed = _pretrain(tiny_corpus, root / "one_then_ep2", 1, *LAYOUT[1], *MOE, env=_env(**KILL), check=False)
    ep2 = [*LAYOUT[2], *MOE]
    launches = {  # launch name: (ranks, [(case name, arguments, environment)])
        "launch2": (2, [("ep2", ep2, {}), ("one_then_ep2", ep2, {}), ("ep2_killed", ep2, KILL)]),
        "launch4_full": (4, [("ep_fsdp_full", _ep_fsdp_args(EP_FSDP["ep_fsdp_full"]), KILL)]),
        "launch4_grad": (4, [("ep_fsdp_grad", _ep_fsdp_args(EP_FSDP["ep_fsdp_grad"]), KILL)]),
    }
    result = {"killed": killed}
    for launch, (nproc, cases) in launches.items():
        checks = launch in ("launch2", "launch4_full")  # the worker's checks on 2 and on 4 ranks, once each
        out = root / f"{launch}.json"
        runs = run_cases([{"name": name, "args": _pretrain_args(tiny_corpus, root / name, *args), "env": env}
                          for name, args, env in cases], nproc, root / launch, script=WORKER,
                         script_args=(str(out) if checks else "-", ",".join(VARIANTS[nproc] + ["meta"])))
        if checks:
            result[nproc] = json.loads(out.read_text())
        result.update({name: (runs[name], root / name) for name, _, _ in cases})
    return result


def _killed_at_step_6(run, out: Path) -> None:
    assert run.ran and not run.codes  # killed: no rank returned
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000005", run.output[-2000:]


@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_trains_like_the_plain_model(ep_launches, nproc):
    variants = VARIANTS[nproc]
    results = ep_launches[nproc]
    for rank_results in results:  # built on meta, split, allocated: its share only, the whole model's values
        r = rank_results["meta"]
        assert r["names"] == rank_results["plain"]["names"] and not r["on_meta"]
        assert r["max_diff"] == 0.0 and r["rope_diff"] == 0.0
    for variant in variants:
        held = []
        for rank_results in results:
            r = rank_results[variant]
            for a, b in zip(r["ref_loss"], r["loss"]):
                assert b == pytest.approx(a, rel=1e-5)
            for a, b in zip(r["ref_norm"], r["norm"]):
                assert b == pytest.approx(a, rel=1e-5)
            assert max(r["grad_diff"]) < 1e-6
            assert r["weight_diff"] < 1e-4  # 4 AdamW steps of lr 1e-2 from the same gradients
            held.append(set(r["names"]))
        # an expert-parallel group (ranks 0, 1) holds each expert once, under the plain model's names
        all_names = set(results[0][variant]["all_names"])
        assert held[0] | held[1] == all_names
        experts = {n for n in all_names if ".experts." in n}
        assert held[0] & held[1] == all_names - experts
        assert held[0] & experts == {n for n in experts if n.split(".experts.")[1][0] in "01"}
        if nproc == 4:  # ranks 2, 3 hold what ranks 0, 1 hold
            assert held[2] == held[0] and held[3] == held[1]


@pytest.fixture(scope="module")
def one_process_mbs2(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "one_mbs2"
    return _pretrain_here(tiny_corpus, out, "trainer.devices=1", "model.micro_batch_size=2", *MOE)


def test_pretraining_ep2_matches_one_process_resumes_and_converts(tmp_path, plain_moe_run, ep_launches):
    run, out = ep_launches["ep2"]  # trainer.devices=2 model.expert_model_parallel_size=2 + MOE
    assert "expert parallel 2" in run.ok()
    _same_curve(_losses(plain_moe_run), _losses(out))
    _same_curve(_losses(plain_moe_run, "grad_norm"), _losses(out, "grad_norm"))
    _same_curve(_losses(plain_moe_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    step = out / "checkpoints" / "step_0000010"
    assert json.loads((step / "config.json").read_text())["sharded"]["world_size"] == 2
    # the HF folder of the EP checkpoint holds the one-process run's tensors (same names, same values)
    ours = convert_to_hf(step, tmp_path / "hf_ep")
    theirs = convert_to_hf(plain_moe_run / "checkpoints" / "step_0000010", tmp_path / "hf_one")
    assert sorted(ours) == sorted(theirs) and any("experts.3" in k for k in ours)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_between_ep2_and_one_process(tiny_corpus, capsys, plain_moe_run, ep_launches, first, then):
    if first == 2:  # killed on 2 EP ranks (the last case of the file's 2-rank launch), resumed in this process
        killed, out = ep_launches["ep2_killed"]
        _killed_at_step_6(killed, out)
        output = _in_process(capsys, tiny_corpus, out, *LAYOUT[then], *MOE)
    else:  # killed in a process of its own, resumed on 2 EP ranks in the file's 2-rank launch
        p, (run, out) = ep_launches["killed"], ep_launches["one_then_ep2"]
        assert p.returncode != 0
        output = run.ok()
    assert "resuming from" in output
    if first == 1:  # the killed run's latest checkpoint was step 5
        assert "step_0000005 at step 5" in output
    _same_curve(_losses(plain_moe_run), _losses(out))
    _same_curve(_losses(plain_moe_run, "grad_norm"), _losses(out, "grad_norm"))


@pytest.mark.parametrize("nproc,overrides,message", [
    (1, ["model.num_moe_experts=3"], "model.expert_model_parallel_size=2 does not divide model.num_moe_experts=3"),
    (1, ["model.num_moe_experts=null"], "this model has none: set model.num_moe_experts"),
    (1, ["model.expert_model_parallel_size=4"], "model.expert_model_parallel_size=4 must divide the data-parallel size 2"),
    (1, ["model.compile=true"], "model.compile=true with model.expert_model_parallel_size=2 is not supported yet"),
    (1, ["trainer.devices=4", "model.micro_batch_size=2", "model.fsdp=true", "model.fsdp_sharding_strategy=hybrid",
         "trainer.num_nodes=2", "trainer.devices=2"],
     "model.expert_model_parallel_size=2 with model.fsdp_sharding_strategy=hybrid is not supported yet"),
    (1, ["trainer.devices=4", "model.tensor_model_parallel_size=2", "model.micro_batch_size=2"],
     "mixture-of-experts models (Mixtral) are not supported under tensor parallelism"),
])
def test_bad_expert_parallel_layouts_are_refused(tiny_corpus, tmp_path, capsys, nproc, overrides, message):
    args = ["trainer.devices=2", "model.expert_model_parallel_size=2", *MOE, *overrides]
    assert nproc == 1  # refused before any process group: checked in this process
    code, err = _refused(capsys, tiny_corpus, tmp_path / "bad", *args)
    assert code == 2 and message in err, err[-1500:]
    assert not [line for line in err.splitlines() if line.strip().startswith("File") and "/lmforge/" in line]
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_check_supported_names_each_combination():
    from lmforge.errors import ConfigError
    from lmforge.parallel.dims import ParallelDims

    ParallelDims(4, ep=2).check_supported()
    ParallelDims(2, ep=2).check_supported()
    ParallelDims(4, ep=2, fsdp="full").check_supported()
    ParallelDims(4, ep=2, fsdp="grad").check_supported()
    for dims, message in ((ParallelDims(4, ep=2, tp=2), "model.tensor_model_parallel_size=2"),
                          (ParallelDims(4, ep=2, pp=2), "model.pipeline_model_parallel_size=2"),
                          (ParallelDims(4, ep=2, fsdp="hybrid", devices_per_node=2),
                           "model.fsdp_sharding_strategy=hybrid")):
        with pytest.raises(ConfigError, match=f"expert_model_parallel_size=2 with {message}"):
            dims.check_supported()


@pytest.mark.parametrize("change,message", [
    (dict(precision="16-mixed"), "trainer.precision=16-mixed"),
    (dict(compile=True), "model.compile=true"),
    (dict(peft_method="lora"), "PEFT"),
])
def test_the_assembly_refuses_what_expert_parallelism_does_not_run(tmp_path, change, message):
    from lmforge.errors import ConfigError
    from lmforge.parallel.dims import ParallelDims
    from lmforge.parallel.runtime import Runtime
    from lmforge.train.assembly import OptimSpec, TrainJob, _check_job
    from lmforge.train.loop import LoopSettings

    loop = LoopSettings(max_steps=1, micro_batch_size=1, global_batch_size=2, accumulate=1,
                        precision=change.pop("precision", "32"))
    job = TrainJob(out=tmp_path, dims=ParallelDims(2, ep=2), loop=loop, optim=OptimSpec(), **change)
    with pytest.raises(ConfigError, match=f"expert_model_parallel_size=2 with {message} is not supported yet"):
        _check_job(job, Runtime())


@pytest.mark.parametrize("name", list(EP_FSDP))
def test_expert_parallel_beside_fsdp_matches_one_process(tiny_corpus, capsys, one_process_mbs2, ep_launches, name):
    """EP 2 x FSDP on 4 ranks: experts sharded over the ranks holding the same experts, the rest over all
    data-parallel ranks (torchtitan's layout). The run, killed after step 6 and resumed on one process, gives the
    one-process curve and grad norms (steps 1-5 from the EP x FSDP ranks, 6-10 from one process), and its val loss
    at step 5. (The router's load-balancing loss pools a micro batch: the reference reads the same micro batches.)"""
    run, out = ep_launches[name]
    assert "expert parallel 2" in run.output and "FSDP" in run.output
    _killed_at_step_6(run, out)
    sharded = (_losses(out), _losses(out, "grad_norm"), _losses(out, "val_loss"))
    output = _in_process(capsys, tiny_corpus, out, "trainer.devices=1", "model.micro_batch_size=2", *MOE)
    assert "resuming from" in output  # resumed on one process (in this one)
    _same_curve(_losses(one_process_mbs2), _losses(out))
    _same_curve(_losses(one_process_mbs2, "grad_norm"), _losses(out, "grad_norm"))
    for key, values in zip(("loss", "grad_norm", "val_loss"), sharded):  # the EP x FSDP ranks' own records
        reference = _losses(one_process_mbs2, key)
        for step, value in values.items():
            assert value == pytest.approx(reference[step], rel=1e-5, abs=5e-6), (key, step)
    assert sorted(sharded[2]) == [0, 5] and sorted(sharded[0]) == [1, 2, 3, 4, 5, 6]
