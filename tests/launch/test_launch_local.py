"""The local executor end to end: data preparation from the stdlib corpus -> tiny training, status, skip, failure."""

from __future__ import annotations

import json

from lmforge.cli import main


def _pipeline(tmp_path, h, tiny, **prep):
    data = tmp_path / "r" / "data"
    train = h.training_body(tiny)
    train["model"]["tokenizer"]["model"] = "${data_dir}/tokenizer"
    train["model"]["data"]["data_prefix"] = [1.0, "${data_dir}/stdlib_text_document"]
    train["model"]["make_vocab_size_divisible_by"] = 64
    body = {"run": {"time_limit": "00:10:00"}, "corpus": "stdlib", "stdlib_max_bytes": 150_000,
            "tokenizer": {"path": "${data_dir}/tokenizer", "train": True, "vocab_size": 300},
            "preprocess": {"json_keys": ["text"], "append_eod": True, "workers": 1}, **prep}
    return h.write_conf(tmp_path, {"stages": ["data_preparation", "training"], "cluster_type": "local",
                                   "base_results_dir": str(tmp_path / "r"), "data_dir": str(data)},
                        {"data_preparation": body, "training": train})


def test_local_pipeline_end_to_end(tmp_path, launch_helpers, tiny_corpus, capsys, monkeypatch):
    """data preparation -> training -> fine_tuning -> generation in one local launch: `lmforge finetune FILE`
    LoRA-tunes the model the pipeline just trained (its results folder) on a JSONL of input/output records and
    writes the adapter; `lmforge generate` then completes a prompts file with the fine-tuning run (base + adapter).
    Then `launch status`, a second launch that skips every completed stage, and --force, which reruns training
    (resuming at its last checkpoint) without touching the prepared data.

    (One launch for both what was two tests, the plain pipeline and the one with the LoRA stage: the data
    preparation and training ran twice.)"""
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    records = [{"input": f"def f{i}(x):", "output": f" return x + {i}"} for i in range(12)]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = _pipeline(tmp_path, launch_helpers, tiny_corpus)
    conf = OmegaConf.load(path)
    conf.stages = ["data_preparation", "training", "fine_tuning", "generation"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(x):"}) + "\n" for i in range(3)))
    conf.generation = {"run": {"name": "gen", "results_dir": "${base_results_dir}/${.name}", "time_limit": "00:10:00"},
                       "args": ["${fine_tuning.run.results_dir}"],
                       "options": {"input": str(prompts), "output": "${generation.run.results_dir}/completions.jsonl",
                                   "greedy": True, "max_new_tokens": 4, "device": "cpu", "dtype": "float32"}}
    conf.fine_tuning = {"run": {"name": "lora", "results_dir": "${base_results_dir}/${.name}", "time_limit": "00:10:00"},
                        "model": "${training.run.results_dir}", "data": str(sft), "val_data": str(sft),
                        "method": "lora", "seq_length": 24, "micro_batch_size": 4, "global_batch_size": 4,
                        "peft": {"lora": {"r": 4}},
                        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "val_check_interval": 3,
                                    "limit_val_batches": 1, "log_every_n_steps": 1},
                        "generation": {"num_samples": 0}}
    OmegaConf.save(conf, path)
    assert main(["launch", str(path), "cluster_type=local", "training.trainer.max_steps=6"]) == 0
    r = tmp_path / "r"
    assert (r / "data" / "stdlib_text_document.bin").stat().st_size > 0
    assert (r / "data" / "tokenizer" / "tokenizer.json").is_file()
    summary = json.loads((r / "tiny" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["checkpoint"]
    assert (r / "data_preparation" / "COMPLETED").is_file() and (r / "tiny" / "COMPLETED").is_file()
    assert "step 6/6" in (r / "tiny" / "launch.log").read_text()
    # the fine-tuning stage
    lora = r / "lora"
    assert (lora / "COMPLETED").is_file()
    written = OmegaConf.load(lora / "fine_tuning_config.yaml")
    assert written.out == str(lora) and written.model == str(r / "tiny") and "run" not in written
    summary = json.loads((lora / "summary.json").read_text())
    assert summary["adapter"] == str(lora / "adapter") and not summary["stopped_early"]
    assert json.loads((lora / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (lora / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    # the generation stage: the same completions as the base model with the adapter
    lines = [json.loads(x) for x in (r / "gen" / "completions.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["p0", "p1", "p2"] and all(x["completion_tokens"] >= 1 for x in lines)
    from lmforge.serve.engine import SamplingParams, engine_from_checkpoint

    engine = engine_from_checkpoint(r / "tiny", device="cpu", dtype="float32", adapter=lora / "adapter")
    for x in lines:
        ids = engine.generate([engine.tokenizer.encode(x["prompt"])], SamplingParams(max_tokens=4, temperature=0.0))[0]
        assert x["completion"] == engine.tokenizer.decode(ids, skip_special_tokens=True)
    capsys.readouterr()

    assert main(["launch", "status", str(r)]) == 0
    out = capsys.readouterr().out
    assert out.count("COMPLETED") == 4
    record = json.loads((r / "launch.json").read_text())
    assert [s["state"] for s in record["stages"]] == ["completed"] * 4

    # a second launch skips every stage; --force reruns them (training resumes at its last checkpoint)
    assert main(["launch", str(path), "training.trainer.max_steps=6"]) == 0
    assert capsys.readouterr().out.count("already completed; skipped") == 4
    mtime = (r / "data" / "stdlib_text_document.bin").stat().st_mtime_ns
    assert main(["launch", str(path), "stages=[training]", "training.trainer.max_steps=8", "--force"]) == 0
    assert json.loads((r / "tiny" / "summary.json").read_text())["resumed_from"].endswith("step_0000006")
    assert (r / "data" / "stdlib_text_document.bin").stat().st_mtime_ns == mtime


def test_local_stops_at_first_failure(tmp_path, launch_helpers, tiny_corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _pipeline(tmp_path, launch_helpers, tiny_corpus, corpus=None, inputs=[str(tmp_path / "missing.jsonl")])
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: stage data_preparation failed with exit code 2" in err and "not run: training" in err
    assert not (tmp_path / "r" / "tiny").exists()
    record = json.loads((tmp_path / "r" / "launch.json").read_text())
    assert [s["state"] for s in record["stages"]] == ["failed", "pending"]
    assert "missing.jsonl does not exist" in (tmp_path / "r" / "data_preparation" / "launch.log").read_text()


def test_the_shipped_example_pipeline_runs_locally(tmp_path, monkeypatch):
    """examples/pipeline/conf/config.yaml end to end on this CPU: corpus -> tokenizer -> indexed data ->
    tiny training -> Hugging Face folder that transformers loads -> perplexity on held-out modules."""
    import math

    import transformers
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "pipeline" / "conf" / "config.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(example), "cluster_type=local", f"base_results_dir={tmp_path / 'r'}",
                 "training.trainer.max_steps=10", "data_preparation.stdlib_max_bytes=400000",
                 "data_preparation.stdlib_heldout_bytes=12000"]) == 0
    r = tmp_path / "r"
    hf = transformers.AutoModelForCausalLM.from_pretrained(r / "convert_hf" / "hf")
    assert hf.config.model_type == "llama"
    for stage in ("data_preparation", "tiny_llama", "convert_hf", "eval_perplexity"):
        assert (r / stage / "COMPLETED").is_file(), stage
    # the held-out modules are real text and none of them was trained on
    trained = {json.loads(line)["path"] for line in (r / "data" / "stdlib.jsonl").open()}
    held = [json.loads(line) for line in (r / "data" / "heldout.jsonl").open()]
    assert held and all(d["text"].strip() for d in held)
    assert not trained & {d["path"] for d in held}
    assert sum(len(d["text"].encode()) for d in held) <= 12000
    results = json.loads((r / "eval_perplexity" / "results.json").read_text())
    scores = results["results"]["stdlib_heldout"]
    for metric in ("word_perplexity", "byte_perplexity"):
        assert math.isfinite(scores[metric]) and scores[metric] > 1.0, (metric, scores)
    assert results["model"] == str(r / "convert_hf" / "hf")


def test_fine_tuning_settings_are_checked_at_launch(tmp_path, launch_helpers, tiny_corpus, capsys, monkeypatch):
    """A key `lmforge finetune` does not know fails the launch before anything runs, naming the key."""
    monkeypatch.chdir(tmp_path)
    path = launch_helpers.write_conf(tmp_path, {"stages": ["fine_tuning"], "base_results_dir": str(tmp_path / "r")},
                                     {"fine_tuning": {"model": "m", "data": "d.jsonl", "methd": "lora"}})
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fine_tuning: ") and "methd" in err and "method" in err
    assert not (tmp_path / "r").exists()


def test_a_torchrun_stage_stopped_by_its_time_limit_exits_75(tmp_path, launch_helpers, tiny_corpus, capsys,
                                                              monkeypatch):
    """Two processes through torchrun stop at trainer.max_time after saving: each exits 75, torchrun exits 1
    (it takes a worker's non-zero exit for a failure); the launch still reads 75 (every rank left its stop
    marker), records `stopped` and says how to resume, and no marker is left behind."""
    monkeypatch.chdir(tmp_path)
    train = launch_helpers.training_body(tiny_corpus, devices=2, max_steps=100_000, max_time="00:00:00:01",
                                         val_check_interval=1_000_000, limit_test_batches=0)
    train["model"]["global_batch_size"] = 8
    conf = launch_helpers.write_conf(tmp_path, {"stages": ["training"], "cluster_type": "local",
                                                "base_results_dir": str(tmp_path / "r")}, {"training": train})
    r = tmp_path / "r"
    assert main(["launch", str(conf)]) == 75
    out = capsys.readouterr().out
    assert "saved a checkpoint and stopped early; run the same launch command again to resume" in out
    summary = json.loads((r / "tiny" / "summary.json").read_text())
    assert summary["time_limit_reached"] and summary["world_size"] == 2 and summary["steps"] < 100_000
    assert summary["checkpoint"].endswith(f"step_{summary['steps']:07d}")
    assert "ChildFailedError" in (r / "tiny" / "launch.log").read_text()  # torchrun's own exit was a failure
    assert json.loads((r / "launch.json").read_text())["stages"][0]["state"] == "stopped"
    assert not (r / "tiny" / ".stopped_to_resume").exists() and not (r / "tiny" / "COMPLETED").exists()
