"""Context parallelism (every sequence split over the ranks of a group; attention over the group's all-gathered keys
and values) on CPU ranks (gloo): the loss and every gradient of a split model equal the unsharded model's for
Llama (RoPE, grouped-query attention), GPT (learned positions) and soft-capped attention, with and without
activation checkpointing; pretraining with context parallel 2, alone and beside data parallel 2, gives the loss
curve and the gradient norms of one process, and its checkpoint resumes on one process; what is not supported
is refused at config time, one message each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cases
from tests.train.test_fsdp import _in_process, _pretrain_args, _refused, _same_curve
from tests.train.test_pretrain import _losses
from lmforge.models.config import ModelConfig
from lmforge.parallel.context import context_parallel_problems, sequence_positions, shard_sequence

WORKER = Path(__file__).with_name("cp_worker.py")
CASES = ("llama", "gpt", "softcapped", "llama+selective", "llama+full")  # +: activation checkpointing granularity


CP2 = ["trainer.devices=2", "model.context_parallel_size=2"]
KILL = {"LMFORGE_TEST_KILL_AT_STEP": "6"}  # killed after step 6: the newest checkpoint is step 5
# the file's pretraining runs: name -> (ranks, arguments, environment); the 2-rank runs of each launch (a kill ends
# one) in ``cp_runs``
RUNS = {
    "cp": (2, CP2, {}),
    "cp_fsdp": (2, [*CP2, "model.fsdp=true"], KILL),
    "cp_then_plain": (2, CP2, KILL),
    "cp_dp": (4, ["trainer.devices=4", "model.context_parallel_size=2", "model.micro_batch_size=2"], {}),
}


@pytest.fixture(scope="module")
def cp_runs(tiny_corpus, tmp_path_factory) -> dict:
    """``"results"``: every rank's results of the worker's ``CASES`` (tests/parallel/cp_worker.py), and ``name ->
    (CaseRun, results folder)`` of ``RUNS``, in three launches (tests/run_cases.py): the worker's checks, "cp" and
    the killed "cp_fsdp"; the killed "cp_then_plain"; "cp_dp" on 4 ranks."""
    root = tmp_path_factory.mktemp("cp")

    def cases(*names):
        return [{"name": n, "args": _pretrain_args(tiny_corpus, root / n, *RUNS[n][1]), "env": RUNS[n][2]}
                for n in names]

    out = root / "results.json"
    runs = run_cases(cases("cp", "cp_fsdp"), 2, root / "launch1", script=WORKER, script_args=(str(out), ",".join(CASES)))
    runs.update(run_cases(cases("cp_then_plain"), 2, root / "launch2"))
    runs.update(run_cases(cases("cp_dp"), 4, root / "launch4"))
    return {"results": json.loads(out.read_text()), **{n: (runs[n], root / n) for n in RUNS}}


@pytest.fixture(scope="module")
def results(cp_runs) -> list:
    return cp_runs["results"]


def _killed_at_step_6(run, out: Path) -> None:
    assert run.ran and not run.codes  # killed: no rank returned
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000005"


@pytest.mark.parametrize("case", CASES)
def test_split_sequences_give_the_unsharded_loss_and_gradients(results, case):
    for rank_results in results:
        r = rank_results[case]
        assert r["block_len"] == 16  # 32 positions, half on each rank
        assert r["tokens"] == r["ref_tokens"] == 3 * 32  # the parts add up to every token once
        assert r["cp_loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        assert r["grad_rel_diff"] < 1e-4


def test_load_balanced_chunks():
    # 2 ranks, 8 positions: 4 chunks of 2; rank 0 holds the first and the last, rank 1 the two middle ones
    assert sequence_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert sequence_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    held = torch.cat([sequence_positions(24, 3, r) for r in range(3)])
    assert sorted(held.tolist()) == list(range(24))
    rows = torch.arange(16).view(2, 8)
    assert shard_sequence(rows, 2, 1).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    with pytest.raises(ValueError, match="4 equal chunks"):
        sequence_positions(6, 2, 0)


def test_unsupported_models_and_layouts_are_named():
    base = dict(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                max_position_embeddings=64)
    llama = ModelConfig(**base, normalization="rmsnorm", activation="swiglu", position_embedding_type="rope")
    assert context_parallel_problems(llama, 2, 32) == []
    assert context_parallel_problems(llama, 1, 31, tp=2) == []  # off: nothing to check
    for kwargs, text in ((dict(seq_length=30), "not divisible by 4"), (dict(tp=2), "tensor_model_parallel_size=2"),
                         (dict(pp=2), "pipeline_model_parallel_size=2"), (dict(fsdp="hybrid"), "fsdp_sharding_strategy=full or grad"),
                         (dict(compile=True), "model.compile=true")):
        (problem,) = context_parallel_problems(llama, 2, **kwargs)
        assert text in problem
    for extra, text in ((dict(position_embedding_type="alibi"), "ALiBi"), (dict(sliding_window=8), "sliding-window"),
                        (dict(num_moe_experts=4, normalization="rmsnorm", activation="swiglu"), "mixture-of-experts")):
        (problem,) = context_parallel_problems(ModelConfig(**base, **extra), 2, 32)
        assert text in problem


# -- through the pretraining stage -----------------------------------------------------------------
def test_context_parallel_pretraining_matches_one_process_and_resumes_unsharded(tiny_corpus, capsys, plain_run,
                                                                                cp_runs):
    run, out = cp_runs["cp"]
    assert "data parallel 1, tensor parallel 1, pipeline parallel 1, context parallel 2" in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "grad_norm"), _losses(out, "grad_norm"))
    _same_curve(_losses(plain_run, "val_loss"), _losses(out, "val_loss"), steps=[0, 5, 10])
    run, moved = cp_runs["cp_then_plain"]
    _killed_at_step_6(run, moved)
    assert "resuming from" in _in_process(capsys, tiny_corpus, moved, "trainer.devices=1")  # one process: this one
    _same_curve(_losses(plain_run), _losses(moved))


def test_context_parallel_beside_data_parallel_matches_one_process(plain_run, cp_runs):
    run, out = cp_runs["cp_dp"]
    assert "data parallel 2, tensor parallel 1, pipeline parallel 1, context parallel 2" in run.ok()
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "grad_norm"), _losses(out, "grad_norm"))


def test_context_parallel_with_fsdp_shards_over_the_group_and_resumes_unsharded(tiny_corpus, capsys, plain_run,
                                                                                 cp_runs):
    run, out = cp_runs["cp_fsdp"]
    _killed_at_step_6(run, out)
    assert "context parallel 2 (FSDP full" in run.output
    step = out / "checkpoints" / "step_0000005"
    # data parallel 1, yet two shards: FSDP shards over data x context parallel ranks (dp_shard_cp)
    assert len([f for f in (step / "model").iterdir() if f.suffix == ".safetensors"]) == 2
    assert "resuming from" in _in_process(capsys, tiny_corpus, out, "trainer.devices=1")  # one process: this one
    _same_curve(_losses(plain_run), _losses(out))
    _same_curve(_losses(plain_run, "grad_norm"), _losses(out, "grad_norm"))


@pytest.mark.parametrize("overrides,message", [
    (["model.data.seq_length=30", "model.encoder_seq_length=30"], "model.data.seq_length=30 is not divisible by 4"),
    (["trainer.devices=4", "model.tensor_model_parallel_size=2", "model.fsdp=true"],
     "context parallelism combines only with data parallelism (DDP or FSDP) for now; set "
     "model.tensor_model_parallel_size=1"),
    (["trainer.num_nodes=2", "model.fsdp=true", "model.fsdp_sharding_strategy=hybrid"],
     "with model.fsdp_sharding_strategy=hybrid is not supported yet"),
    (["model.position_embedding_type=alibi"], "ALiBi models"),
    (["model.num_moe_experts=4"], "mixture-of-experts models (Mixtral) are not supported under context parallelism"),
    (["model.compile=true"], "model.context_parallel_size=2 with model.compile=true"),
    (["trainer.devices=3"], "3 processes cannot be split into tensor x pipeline x context parallel groups"),
])
def test_bad_context_parallel_configs_are_refused(tiny_corpus, tmp_path, capsys, overrides, message):
    code, err = _refused(capsys, tiny_corpus, tmp_path / "bad", "trainer.devices=2", "model.context_parallel_size=2",
                         *overrides)
    assert code == 2 and message in err, err[-1500:]
    assert "Traceback" not in err
    assert not (tmp_path / "bad" / "checkpoints").exists()
