"""NeMo Launcher stage bodies lmforge translates: a `peft` file shaped as NeMo's conf/peft/llama/squad.yaml
(model.restore_from_path, model.peft.*, model.data.train_ds.*, ...) dry-runs and trains a tiny model locally as
`lmforge finetune`, and its keys without an lmforge meaning are refused, each naming the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.launch import load_launch_config
from lmforge.launch.stages import build_stages
from tests.launch.test_launch_nemo import write_tree

# NeMo's peft/llama/squad.yaml layout (the keys the users' files carry), with the two values lmforge cannot honour
# as NeMo writes them changed: truncation_field (NeMo: context) and column_init_method (NeMo: xavier) removed, and
# restore_from_path naming a converted model folder
NEMO_PEFT_SQUAD = """\
name: megatron_llama_peft_tuning-${peft.model.peft.peft_scheme}
run:
  name: ${.task_name}_${.model_train_name}
  time_limit: "04:00:00"
  dependency: "singleton"
  convert_name: convert_nemo
  model_train_name: llama2_7b
  convert_dir: ${base_results_dir}/${peft.run.model_train_name}/${peft.run.convert_name}
  task_name: "squad"
  results_dir: ${base_results_dir}/${.model_train_name}/peft_${.task_name}
trainer:
  devices: 8
  accelerator: gpu
  num_nodes: 1
  precision: bf16
  logger: False
  enable_checkpointing: False
  use_distributed_sampler: False
  max_epochs: 9999
  max_steps: 20000
  log_every_n_steps: 10
  val_check_interval: 200
  gradient_clip_val: 1.0
exp_manager:
  explicit_log_dir: ${peft.run.results_dir}/results
  exp_dir: null
  name: ${peft.name}
  create_wandb_logger: False
  resume_if_exists: True
  resume_ignore_no_checkpoint: True
  create_checkpoint_callback: True
  checkpoint_callback_params:
    monitor: validation_${peft.model.data.validation_ds.metric.name}
    save_top_k: 1
    mode: min
    save_nemo_on_train_end: True
    filename: '${peft.name}--{${peft.exp_manager.checkpoint_callback_params.monitor}:.3f}-{step}-{consumed_samples}'
    model_parallel_size: ${peft.model.tensor_model_parallel_size}
    always_save_nemo: False
    save_best_model: True
model:
  seed: 1234
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  global_batch_size: 128
  micro_batch_size: 4
  restore_from_path: ${peft.run.convert_dir}/llama2_7b  # NeMo's is a .nemo file: lmforge fine-tunes a converted folder
  resume_from_checkpoint: null
  save_nemo_on_validation_end: False
  sync_batch_comm: False
  megatron_amp_O2: True
  sequence_parallel: False
  activations_checkpoint_granularity: null
  activations_checkpoint_method: null
  activations_checkpoint_num_layers: null
  activations_checkpoint_layers_per_pipeline: null
  answer_only_loss: True
  gradient_as_bucket_view: False
  hidden_dropout: 0.0
  attention_dropout: 0.0
  ffn_dropout: 0.0
  peft:
    peft_scheme: "lora"
    restore_from_path: null
    adapter_tuning:
      type: 'parallel_adapter'
      adapter_dim: 32
      adapter_dropout: 0.0
      norm_position: 'pre'
    lora_tuning:
      adapter_dim: 32
      adapter_dropout: 0.0
      row_init_method: 'zero'
      layer_selection: null
      weight_tying: False
      position_embedding_strategy: null
    p_tuning:
      virtual_tokens: 10
      bottleneck_dim: 1024
      embedding_dim: 1024
      init_std: 0.023
    ia3_tuning:
      layer_selection: null
  data:
    train_ds:
      file_names:
      - ${data_dir}/squad_data/v1.1/train-v1.1_gpt.json
      global_batch_size: ${peft.model.global_batch_size}
      micro_batch_size: ${peft.model.micro_batch_size}
      shuffle: True
      num_workers: 0
      memmap_workers: 2
      pin_memory: True
      max_seq_length: 4096
      min_seq_length: 1
      drop_last: True
      concat_sampling_probabilities:
      - 1.0
      context_key: 'input'
      label_key: 'output'
      add_eos: True
      add_sep: False
      add_bos: True
      separate_prompt_and_response_with_newline: False
      truncation_field: "answer"
      index_mapping_dir: null
      prompt_template: "{input} {output}"
    validation_ds:
      file_names:
      - ${data_dir}/squad_data/v1.1/dev-v1.1_gpt.json
      names:
      - ${peft.run.task_name}
      global_batch_size: ${peft.model.global_batch_size}
      micro_batch_size: ${peft.model.micro_batch_size}
      shuffle: False
      num_workers: 0
      memmap_workers: ${peft.model.data.train_ds.memmap_workers}
      pin_memory: True
      max_seq_length: ${peft.model.data.train_ds.max_seq_length}
      min_seq_length: ${peft.model.data.train_ds.min_seq_length}
      drop_last: False
      context_key: 'input'
      label_key: 'output'
      add_eos: ${peft.model.data.train_ds.add_eos}
      add_sep: ${peft.model.data.train_ds.add_sep}
      add_bos: ${peft.model.data.train_ds.add_bos}
      write_predictions_to_file: False
      output_file_path_prefix: null
      truncation_field: "answer"
      index_mapping_dir: null
      prompt_template: ${peft.model.data.train_ds.prompt_template}
      tokens_to_generate: 32
      metric:
        name: "loss"
        average: null
        num_classes: null
  optim:
    name: fused_adam
    lr: 1e-4
    weight_decay: 0.01
    betas:
    - 0.9
    - 0.98
    sched:
      name: CosineAnnealing
      warmup_steps: 50
      min_lr: 0.0
      constant_steps: 0
      monitor: val_loss
      reduce_on_plateau: false
"""
BASE = ["numa_mapping.enable=False", "peft=llama/nemo_squad", "stages=[peft]"]


@pytest.fixture
def tree(tmp_path, tiny_corpus, monkeypatch):
    config = write_tree(tmp_path, tiny_corpus["tokenizer"])
    (config.parent / "peft" / "llama" / "nemo_squad.yaml").write_text(NEMO_PEFT_SQUAD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # launcher_scripts_path: ~/NeMo/launcher_scripts
    src = str(Path(__file__).resolve().parents[2] / "src")  # the stages run in tmp_path: import this checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p))
    return config


def test_nemo_peft_body_becomes_lmforge_finetune(tree, tmp_path):
    cfg = load_launch_config(tree, [*BASE, "container_runtime=pyxis"])
    (stage,) = build_stages(cfg, check_commands=False)
    base, data = cfg.base_results_dir, cfg.data_dir
    written = yaml.safe_load(stage.config_text)
    assert written == {
        "method": "lora", "model": f"{base}/llama2_7b/convert_nemo/llama2_7b",
        "data": f"{data}/squad_data/v1.1/train-v1.1_gpt.json", "val_data": f"{data}/squad_data/v1.1/dev-v1.1_gpt.json",
        "out": f"{base}/llama2_7b/peft_squad/results", "resume": True, "monitor": "val_loss", "save_top_k": 1,
        "seed": 1234, "micro_batch_size": 4, "global_batch_size": 128, "tensor_model_parallel_size": 1,
        "sequence_parallel": False, "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None, "activations_checkpoint_num_layers": None, "seq_length": 4096,
        "trainer": {"devices": 8, "accelerator": "gpu", "num_nodes": 1, "precision": "bf16-mixed", "max_steps": 20000,
                    "log_every_n_steps": 10, "val_check_interval": 200, "gradient_clip_val": 1.0},
        "peft": {"lora": {"r": 32, "lora_dropout": 0.0, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj"]}},
        "sft": {"input_key": "input", "output_key": "output", "add_eos": True, "add_bos": True,
                "truncation": "truncate", "prompt_template": "{input} ", "train_on_prompt": False},
        "generation": {"max_new_tokens": 32},
        "optim": {"name": "fused_adam", "lr": 1e-4, "weight_decay": 0.01, "betas": [0.9, 0.98], "warmup_steps": 50,
                  "min_lr": 0.0}}
    assert (stage.nodes, stage.ntasks_per_node, stage.gpus_per_node) == (1, 8, 8)
    assert any("trainer.max_epochs=9999: lmforge fine-tuning stops at trainer.max_steps" in n for n in cfg._notes)


@pytest.mark.parametrize("override,message", [
    ("peft.model.peft.lora_tuning.column_init_method=xavier",
     "peft.model.peft.lora_tuning.column_init_method='xavier': lmforge initialises LoRA's A matrix as Hugging Face"),
    ("peft.model.data.train_ds.truncation_field=context",
     "peft.model.data.train_ds.truncation_field='context': lmforge cuts a too-long sample at its end"),
    ("peft.model.peft.lora_tuning.layer_selection=[1,2]", "peft.model.peft.lora_tuning.layer_selection=[1, 2]"),
    ("peft.exp_manager.create_early_stopping_callback=True",
     "peft.exp_manager.create_early_stopping_callback=True: lmforge supports False here"),
    ("peft.model.data.train_ds.file_names=[a.jsonl,b.jsonl]",
     "peft.model.data.train_ds.file_names lists 2 files: lmforge fine-tunes on one JSONL file"),
    ("peft.model.peft.peft_scheme=selective", "peft.model.peft.peft_scheme='selective': use one of lora"),
    ("+peft.model.mcore_gpt=True", "peft.model.mcore_gpt: NeMo's peft key has no lmforge meaning"),
    ("peft.model.data.train_ds.prompt_template='Q: {output} A: {input}'",
     "ends with the answer's placeholder {output}"),
    # the adapter scheme reads adapter_tuning: NeMo's parallel adapter is not lmforge's (sequential) one
    ("peft.model.peft.peft_scheme=adapter", "peft.model.peft.adapter_tuning.type='parallel_adapter': lmforge supports"),
])
def test_nemo_peft_keys_without_meaning_are_refused(tree, override, message):
    with pytest.raises(ConfigError) as e:
        build_stages(load_launch_config(tree, [*BASE, "container=null", override]), check_commands=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_nemo_peft_restore_from_a_nemo_archive_is_refused_at_launch():
    from lmforge.launch.nemo_peft import translate

    body = {"model": {"restore_from_path": "/models/llama2_7b.nemo", "data": {"train_ds": {"file_names": ["t.jsonl"]}}}}
    with pytest.raises(ConfigError, match=r"peft.model.restore_from_path=/models/llama2_7b.nemo: lmforge fine-tunes an "
                                          r"lmforge checkpoint or an HF folder, not a .nemo archive.*lmforge convert"):
        translate("peft", body, [])
    body["model"]["restore_from_path"] = "/models/llama2_7b"
    assert translate("peft", body, []) == {"method": "lora", "model": "/models/llama2_7b", "data": "t.jsonl",
                                           "peft": {"lora": {"lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]}}}


def test_nemo_peft_body_trains_locally(tree, tmp_path, tiny_corpus, capsys):
    from lmforge.data.tokenizers import load_tokenizer
    from tests.finetune.conftest import save_tiny_model, task_records, write_jsonl

    results = tmp_path / "home" / "NeMo" / "launcher_scripts" / "results" / "llama2_7b"
    save_tiny_model(results / "convert_nemo" / "llama2_7b", load_tokenizer(tiny_corpus["tokenizer"]),
                    init_method_std=0.25)
    squad = tmp_path / "home" / "NeMo" / "launcher_scripts" / "data" / "squad_data" / "v1.1"
    squad.mkdir(parents=True)
    write_jsonl(squad / "train-v1.1_gpt.json", task_records(16, seed=1))
    write_jsonl(squad / "dev-v1.1_gpt.json", task_records(4, seed=2))
    shrink = ["cluster_type=local", "container=null",
              "peft.trainer.devices=1", "peft.trainer.accelerator=cpu", "peft.trainer.precision=32",
              "peft.trainer.max_steps=2", "peft.trainer.val_check_interval=2", "peft.trainer.log_every_n_steps=1",
              "peft.model.global_batch_size=4", "peft.model.micro_batch_size=2", "peft.model.optim.name=adamw",
              "peft.model.optim.sched.warmup_steps=0", "peft.model.data.train_ds.max_seq_length=32",
              "peft.model.peft.lora_tuning.adapter_dim=4", "peft.model.data.validation_ds.tokens_to_generate=2"]
    assert main(["launch", str(tree), *BASE, *shrink]) == 0, capsys.readouterr()
    out = results / "peft_squad" / "results"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 4  # NeMo's alpha: the rank (scale 1)
    assert sorted(adapter["target_modules"]) == ["k_proj", "q_proj", "v_proj"]  # NeMo's attention_qkv
    summary = json.loads((out / "summary.json").read_text())
    assert [s for s, _ in summary["losses"]] == [1, 2]


def _gpt2_files(folder: Path) -> None:
    """GPT-2 BPE files trained here, named as NeMo's download step saves them (vocab.json, merges.txt)."""
    from tests.conftest import stdlib_texts
    from tests.data.test_tokenizer_formats import write_gpt2_files

    vocab, merges = write_gpt2_files(folder, stdlib_texts())
    vocab.rename(folder / "vocab.json")
    merges.rename(folder / "merges.txt")


def test_nemo_pile_preparation_becomes_local_preprocessing(tree, tmp_path, capsys):
    """download_gpt3_pile.yaml: downloading is refused (what to do instead is said); with the extracted files and
    the GPT-2 files in place it preprocesses data_dir/NN.jsonl into my-gpt3_NN_text_document, one array task per
    file number (node_array_size of them at once), with the bytes `lmforge preprocess` writes."""
    from lmforge.data.preprocess import preprocess
    from tests.conftest import stdlib_texts

    stages = ["numa_mapping.enable=False", "container=null", "stages=[data_preparation]"]
    with pytest.raises(ConfigError, match=r"data_preparation.download_the_pile=True: lmforge does not download The "
                                          r"Pile \(compute nodes are offline\).*lmforge preprocess --input"):
        build_stages(load_launch_config(tree, stages))
    local = [*stages, "+data_preparation.download_the_pile=False"]
    with pytest.raises(ConfigError, match=r"data_preparation.rm_extracted=True: lmforge does not delete its input"):
        build_stages(load_launch_config(tree, local))
    local.append("data_preparation.rm_extracted=False")
    data = tmp_path / "home" / "NeMo" / "launcher_scripts" / "data"
    with pytest.raises(ConfigError, match=rf"{data}/bpe/vocab.json does not exist and lmforge does not download it"):
        build_stages(load_launch_config(tree, local))
    _gpt2_files(data / "bpe")
    for bad, message in (("+data_preparation.tokenizer_type=GPT2BPETokenizerX", "lmforge translates the GPT-2 BPE"),
                         ("data_preparation.file_numbers=3-1", r"file_numbers='3-1': give file numbers"),
                         ("+data_preparation.inputs=[a.jsonl]", "data_preparation.inputs: a NeMo data preparation")):
        with pytest.raises(ConfigError, match=message):
            build_stages(load_launch_config(tree, [*local, bad]))

    cfg = load_launch_config(tree, [*local, "cluster_type=bcm"])
    (stage,) = build_stages(cfg)
    body = yaml.safe_load(stage.config_text)
    assert body["inputs"] == [f"{data}/{n:02d}.jsonl" for n in range(30)] and body["output_prefix"] == "my-gpt3_"
    assert body["tokenizer"] == {"path": f"{data}/bpe", "train": False} and body["preprocess"]["append_eod"]
    from lmforge.launch.slurm import script

    assert "#SBATCH --array=0-29%30" in script(stage, cfg)

    # locally, file numbers 0-1: two array tasks
    docs = [t for t in stdlib_texts() if t.strip()]
    for n, part in enumerate((docs[:20], docs[20:40])):
        (data / f"{n:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    assert main(["launch", str(tree), *local, "cluster_type=local", "data_preparation.file_numbers=0-1"]) == 0
    assert "NeMo's pile preparation becomes preprocessing of the local files" in capsys.readouterr().out
    for n in range(2):
        preprocess([str(data / f"{n:02d}.jsonl")], str(tmp_path / f"ref{n}"), str(data / "bpe"), append_eod=True,
                   log=lambda *a: None)
        for ext in ("bin", "idx"):
            made = (data / f"my-gpt3_{n:02d}_text_document.{ext}").read_bytes()
            assert made == (tmp_path / f"ref{n}_text_document.{ext}").read_bytes()


def _precision_bodies(value, actor_model=None):
    """A minimal NeMo peft body and the NeMo PPO body, each with trainer precision ``value``."""
    import copy

    from tests.align.test_alignment_pipeline import NEMO_PPO

    peft = {"trainer": {"precision": value},
            "model": {"restore_from_path": "base", "data": {"train_ds": {"file_names": ["t.jsonl"]}}}}
    ppo = copy.deepcopy(NEMO_PPO)
    ppo["actor"]["trainer"]["precision"] = value
    if actor_model is not None:
        ppo["actor"]["model"]["precision"] = actor_model
    return peft, ppo


@pytest.mark.parametrize("value, want", [(16, "16-mixed"), ("16-mixed", "16-mixed"), ("bf16", "bf16-mixed"),
                                         ("bf16-mixed", "bf16-mixed"), (32, "32"), ("32-true", "32"),
                                         (None, "32")])
def test_nemo_peft_and_ppo_read_precision_as_nemo_does(value, want):
    """Both NeMo body translations read trainer.precision through one function, with NeMo's meaning (null is
    Lightning's default, 32-true); a model precision repeating the trainer's is accepted."""
    from lmforge.launch import nemo_peft, nemo_ppo

    peft, ppo = _precision_bodies(value, actor_model=value)
    assert nemo_peft.translate("peft", peft, [])["trainer"]["precision"] == want
    assert nemo_ppo.translate("rlhf_ppo", ppo, [])["trainer"]["precision"] == want


@pytest.mark.parametrize("value", ["bf16-true", 64, "fp16", "transformer-engine"])
def test_nemo_precision_lmforge_cannot_run_is_refused_alike(value):
    from lmforge.launch import nemo_peft, nemo_ppo

    peft, ppo = _precision_bodies(value)
    for stage, key, translate, body in (("peft", "trainer.precision", nemo_peft.translate, peft),
                                        ("rlhf_ppo", "actor.trainer.precision", nemo_ppo.translate, ppo)):
        with pytest.raises(ConfigError) as e:
            translate(stage, body, [])
        assert str(e.value).startswith(f"{stage}.{key}={value!r}: "), str(e.value)
        assert "set 16, 16-mixed, bf16, bf16-mixed, 32 or 32-true" in str(e.value) and "\n" not in str(e.value)


def test_nemo_ppo_precisions_that_disagree_are_refused():
    """lmforge runs NeMo's actor and critic at one precision: a model or critic precision meaning another than
    actor.trainer.precision is refused, naming it (it was ignored)."""
    from lmforge.launch import nemo_ppo

    _, ppo = _precision_bodies("bf16", actor_model=32)
    with pytest.raises(ConfigError, match=r"^rlhf_ppo.actor.model.precision=32: lmforge runs the actor and the "
                                          r"critic at one precision, actor.trainer.precision='bf16'"):
        nemo_ppo.translate("rlhf_ppo", ppo, [])
    _, ppo = _precision_bodies("bf16")
    ppo["critic"]["trainer"]["precision"] = 16
    with pytest.raises(ConfigError, match=r"^rlhf_ppo.critic.trainer.precision=16: lmforge runs"):
        nemo_ppo.translate("rlhf_ppo", ppo, [])
