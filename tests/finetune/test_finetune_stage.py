"""The fine-tuning stage: every method learns the synthetic task, resume reproduces the losses,
the CLI trains, exports a PEFT adapter, merges it and previews data."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.finetune import load_finetune_config, run
from tests.conftest import assert_run_plots


def config(base, train, val, out, method, steps=20, **extra):
    overrides = [f"model={base}", f"data={train}", f"val_data={val}", f"out={out}", f"method={method}",
                 "seq_length=32", "micro_batch_size=4", "global_batch_size=8", f"trainer.max_steps={steps}",
                 "trainer.accelerator=cpu", "trainer.val_check_interval=0", "trainer.limit_val_batches=2",
                 "trainer.log_every_n_steps=1", "generation.num_samples=2", "generation.max_new_tokens=3"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_finetune_config(None, overrides)


LR = {"full": 3e-3, "lora": 2e-2, "ia3": 1e-1, "adapter": 2e-2, "ptuning": 1e-2}


@pytest.mark.parametrize("method", ["full", "lora", "ia3", "adapter", "ptuning"])
def test_each_method_learns_the_task(tmp_path, base_model_dir, task_files, method):
    extra = {"optim.lr": LR[method]}
    if method == "lora":
        extra["peft.lora.target_modules"] = "[all-linear]"
    if method == "ptuning":
        extra["peft.ptuning.num_virtual_tokens"] = 4
    steps = 30 if method == "ptuning" else 20
    summary = run(config(base_model_dir, *task_files, tmp_path / method, method, steps=steps, **extra),
                  console_log=lambda *a: None)
    losses = [l for _, l in summary["losses"]]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.5, (method, losses)  # nats: the answers become clearly more likely
    assert summary["steps"] == steps and summary["best_checkpoint"]
    assert {"val_loss", "val_ppl", "exact_match", "f1"} <= set(summary["best_metrics"])  # val_ppl: a token NLL
    if method == "full":
        assert summary["adapter"] is None
    else:
        assert summary["adapter"] and (tmp_path / method / "adapter" / "adapter_model.safetensors").is_file()
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / method / "adapter" / "adapter_model.safetensors"))
        assert 0 < sum(t.numel() for t in saved.values()) == summary["trainable_parameters"]
    assert summary["loss_curve"] == str(tmp_path / method / "loss_curve.png")
    assert_run_plots(tmp_path / method, tags=("loss", "lr", "val_loss", "exact_match"))  # TensorBoard + PNG


def test_resume_reproduces_losses(tmp_path, base_model_dir, task_files):
    common = {"optim.lr": 1e-2, "optim.min_lr": 1e-2, "peft.lora.lora_dropout": 0.1, "sft.pack": "true"}
    full = run(config(base_model_dir, *task_files, tmp_path / "a", "lora", steps=4, **common), console_log=lambda *a: None)
    run(config(base_model_dir, *task_files, tmp_path / "b", "lora", steps=2, **common), console_log=lambda *a: None)
    resumed = run(config(base_model_dir, *task_files, tmp_path / "b", "lora", steps=4, **common),
                  console_log=lambda *a: None)
    assert resumed["resumed_from"] and resumed["resumed_from"].endswith("step_0000002")
    expected = dict((s, l) for s, l in full["losses"])
    for step, loss in resumed["losses"]:
        assert step > 2 and loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    assert len(resumed["losses"]) == 2


def test_cli_finetune_merge_and_preview(tmp_path, base_model_dir, task_files, capsys):
    from lmforge.open import load_for_inference
    from lmforge.peft import apply_adapter

    train, val = task_files
    out = tmp_path / "run"
    rc = main(["finetune", "--model", base_model_dir, "--data", train, "--val-data", val, "--method", "lora",
               "--out", str(out), "seq_length=32", "micro_batch_size=4", "global_batch_size=4", "trainer.max_steps=3",
               "trainer.accelerator=cpu", "peft.lora.use_dora=true", "optim.lr=0.05", "trainer.limit_val_batches=1",
               "generation.num_samples=2"])
    assert rc == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert main(["peft", "merge", "--model", base_model_dir, "--adapter", str(out / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_for_inference(tmp_path / "merged", device="cpu", dtype="float32")
    base, _ = load_for_inference(base_model_dir, device="cpu", dtype="float32")
    adapted = apply_adapter(base, out / "adapter")
    x = torch.randint(0, merged.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, _ = load_for_inference(base_model_dir, device="cpu", dtype="float32")
        assert (plain(x) - adapted(x)).abs().max() > 1e-4
        assert (merged(x) - adapted(x)).abs().max().item() < 1e-4

    # generate with the adapter unmerged on the base equals generate with the merged model
    capsys.readouterr()
    prompt = ["--prompt", "Which food is red? Answer:", "--max-new-tokens", "4", "--greedy", "--device", "cpu",
              "--dtype", "float32"]
    assert main(["generate", base_model_dir, "--adapter", str(out / "adapter"), *prompt]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "merged"), *prompt]) == 0
    assert with_adapter == capsys.readouterr().out and with_adapter.startswith("Which food is red? Answer:")

    capsys.readouterr()
    assert main(["data", "preview", train, "--tokenizer", base_model_dir, "--count", "1", "--seq-length", "32"]) == 0
    shown = capsys.readouterr().out
    assert "Which food is" in shown and "trained" in shown

    assert main(["finetune", "--model", base_model_dir, "--data", train, "--method", "lora", "--out",
                 str(tmp_path / "x"), "peft.lora.target_modules=[qkv]", "trainer.accelerator=cpu"]) == 2
    assert "'qkv' matches no Linear" in capsys.readouterr().err
    assert main(["finetune", "--model", base_model_dir, "--data", train, "peft.lora.rank=4"]) == 2
    assert "peft.lora.r" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["activations_checkpoint_method=block"], "has no effect without activations_checkpoint_granularity"),
    (["fsdp=true", "fsdp_sharded_checkpoint=true"], "saves only its adapter weights"),
    (["fsdp_sharding_strategy=grad"], "applies to FSDP runs"),
    # checked when the config loads, not once the model is open (before, these failed after the run had started)
    (["gradient_checkpointing=false", "activations_checkpoint_granularity=full"],
     "gradient_checkpointing=false turns activation checkpointing off, but activations_checkpoint_granularity=full"),
    (["activations_checkpoint_granularity=selective", "activations_checkpoint_num_layers=2"],
     "activations_checkpoint_num_layers=2 must be null with activations_checkpoint_granularity=selective"),
    (["activations_checkpoint_granularity=full", "activations_checkpoint_num_layers=0"],
     "activations_checkpoint_num_layers=0 must be a positive integer"),
])
def test_finetune_keys_that_would_not_act_are_refused(overrides, message):
    from lmforge.errors import ConfigError
    from lmforge.finetune.config import load_finetune_config

    with pytest.raises(ConfigError, match=message):
        load_finetune_config(None, ["model=m", "data=d.jsonl", *overrides])


def test_block_checkpointing_beyond_the_models_layers_names_finetunings_key(tmp_path, capsys, base_model_dir,
                                                                           task_files):
    """activations_checkpoint_num_layers above the model's layer count with method block is found once the model is
    open: the one error line names the key as fine-tuning spells it (no pretraining `model.` prefix) and what works."""
    train, _ = task_files
    assert main(["finetune", "--model", base_model_dir, "--data", train, "--out", str(tmp_path / "x"),
                 "trainer.accelerator=cpu", "activations_checkpoint_granularity=full",
                 "activations_checkpoint_method=block", "activations_checkpoint_num_layers=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: activations_checkpoint_num_layers=3 exceeds the 2 layers of the model with "
                          "activations_checkpoint_method=block; use at most activations_checkpoint_num_layers=2"), err
    assert "model.activations_checkpoint" not in err and "Traceback" not in err


def test_compile_key_compiles_the_blocks_and_the_loss(tmp_path):
    """compile=true acts: the job compiles each block (with its adapters) and the loss head, as lora_throughput.py
    --compile measured (a compiled step on the CPU is slow, so the step itself is left to that GPU benchmark);
    under tensor parallelism it is refused when the config loads, and a non-boolean value is named."""
    from lmforge.errors import ConfigError
    from lmforge.finetune.stage import job_from_config, stage_layout
    from lmforge.models import ModelConfig, Transformer
    from lmforge.parallel.runtime import init_runtime, shutdown
    from lmforge.train.assembly import build_training

    cfg = load_finetune_config(None, ["model=m", "data=d.jsonl", "method=full", "compile=true", "resume=false",
                                      f"out={tmp_path / 'out'}", "trainer.accelerator=cpu"])
    assert cfg.compile is True
    rt = init_runtime("cpu")
    try:
        dims, accum = stage_layout(cfg, rt)
        job = job_from_config(cfg, dims, accum, None)
        assert job.compile
        model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                                        ffn_hidden_size=64, max_position_embeddings=32))
        training = build_training(job, model, rt, console_log=lambda s: None)
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)
        from lmforge.train.objectives import token_cross_entropy

        assert not training.objective.loss_chunk_size and training.objective.loss_fn is not token_cross_entropy
    finally:
        shutdown(rt)
    plain = load_finetune_config(None, ["model=m", "data=d.jsonl"])
    assert plain.compile is False
    with pytest.raises(ConfigError, match="compile=true with tensor_model_parallel_size=2 is not supported yet"):
        load_finetune_config(None, ["model=m", "data=d.jsonl", "method=full", "compile=true",
                                    "tensor_model_parallel_size=2", "trainer.devices=2"])
    with pytest.raises(ConfigError, match="override 'compile=maybe': compile: Value 'maybe' is not a valid bool"):
        load_finetune_config(None, ["model=m", "data=d.jsonl", "compile=maybe"])
