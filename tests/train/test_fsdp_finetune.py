"""FSDP2 fine-tuning on CPU ranks (gloo): full SFT (Llama and Mixtral), LoRA, IA3, adapters and p-tuning on FSDP
full / hybrid / grad give the loss curve, validation loss, trainable parameters and adapter of one process; no
training step reads a tensor to the host (pretraining under FSDP: test_fsdp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cases
from tests.finetune.conftest import base_model_dir, sft_tokenizer, task_files  # noqa: F401 (fixtures)
from tests.train.test_fsdp import STEPS, _same_curve


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, sft_tokenizer):
    from tests.finetune.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("mixtral") / "base", sft_tokenizer, hidden_size=32,
                           ffn_hidden_size=48, num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.02)


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
COUNTED = ("llama", "lora", "full")  # its host reads of tensors counted (tests/train/count_syncs.py)
COUNTER = Path(__file__).with_name("count_syncs.py")


def _finetune_layout(strategy: str) -> tuple[int, list[str]]:
    layout = ["trainer.devices=2", "fsdp=true", f"fsdp_sharding_strategy={strategy}"]
    if strategy == "hybrid":  # 2 "nodes" of 2 ranks on this host
        return 4, layout + ["trainer.num_nodes=2", "micro_batch_size=1"]
    return 2, layout


@pytest.fixture(scope="module")
def finetune_sharded(tmp_path_factory, base_model_dir, mixtral_dir, task_files) -> dict:
    """``(model, method, strategy) -> (CaseRun, out folder)`` of every sharded fine-tuning layout, and ``"syncs"``:
    the folder of ``COUNTED``'s host-read counts: the 2-rank layouts one after the other in ONE torchrun launch
    through tests/train/count_syncs.py (tests/run_cases.py' commands, ``COUNTED`` counted: one interpreter start and
    rendezvous for all), the 4-rank one in another."""
    root = tmp_path_factory.mktemp("ft_sharded")
    by_nproc, outs = {}, {}
    for model, method, strategy in FINETUNE_LAYOUTS:
        nproc, layout = _finetune_layout(strategy)
        name = f"{model}-{method}-{strategy}"
        outs[model, method, strategy] = root / name
        base = base_model_dir if model == "llama" else mixtral_dir
        env = {"LMFORGE_SYNC_COUNTS": str(root / "syncs")} if (model, method, strategy) == COUNTED else {}
        by_nproc.setdefault(nproc, []).append({"name": name, "env": env, "args": [
            "finetune", "--out", str(root / name), *_finetune_common(base, task_files, method), *layout]})
    runs = {}
    for nproc, cases in by_nproc.items():
        counted = any(c["env"] for c in cases)
        runs.update(run_cases(cases, nproc, root / f"launch{nproc}", script=COUNTER if counted else None,
                              script_args=("--cases",) if counted else ()))
    return {"syncs": root / "syncs", **{key: (runs["-".join(key)], out) for key, out in outs.items()}}


@pytest.mark.parametrize("model,method,strategy", FINETUNE_LAYOUTS)
def test_finetuning_fsdp_matches_one_process(finetune_one_process, finetune_sharded, model, method, strategy):
    one = finetune_one_process(model, method)
    nproc, _ = _finetune_layout(strategy)
    counted = (model, method, strategy) == COUNTED
    case, out = finetune_sharded[model, method, strategy]
    case.ok()
    two = json.loads((out / "summary.json").read_text())
    _same_curve(dict(one["losses"]), dict(two["losses"]))
    if counted:  # no step waits for the device: the loss and token counts are read at logging steps only
        for rank in range(nproc):
            syncs = json.loads((finetune_sharded["syncs"] / f"rank{rank}.json").read_text())
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
