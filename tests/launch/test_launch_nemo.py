"""A NeMo Launcher conf/ tree as the users write it (../shared/notes/nemo_user_commands.md, section 3): their
config.yaml verbatim (defaults list with _self_, cluster: bcm, per-stage entries, `override hydra/...`, a hydra:
section, launcher_scripts_path interpolations, container, numa_mapping), cluster/bcm.yaml with `mem: 50`, and
NeMo-shaped stage files (training: gpt3/126m, conversion, peft, evaluation with run blocks of naming variables,
divide_ceil/multiply sizes, dependency singleton), dry-run through `lmforge launch conf/config.yaml --dry-run`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.launch import load_launch_config
from lmforge.launch.stages import build_stages

CONFIG_YAML = """\
defaults:
  - _self_
  - cluster: bcm
  - data_curation: common_crawl/curate_common_crawl
  - data_preparation: gpt3/download_gpt3_pile
  - training: gpt3/126m
  - conversion: gpt3/convert_gpt3
  - conversion_hf2nemo: hf_llama2/convert_llama2_nemo
  - fw_inference: null
  - fine_tuning: null
  - peft: null            # e.g. llama/squad
  - prompt_learning: null
  - adapter_learning: null
  - ia3_learning: null
  - evaluation: gpt3/evaluate_all
  - export: gpt3/export_gpt3
  - rlhf_rm: gpt3/2b_rm
  - rlhf_ppo: gpt3/2b_ppo
  - steerlm_reg: ac_sft/gpt_sft
  - override hydra/job_logging: stdout

hydra:
  run:
    dir: .
  output_subdir: null

stages:
  - data_preparation
  - training
  - conversion
  - evaluation
  - export

cluster_type: bcm            # bcm = Slurm
launcher_scripts_path: ~/NeMo/launcher_scripts
data_dir: ${launcher_scripts_path}/data
base_results_dir: ${launcher_scripts_path}/results
container_mounts: [null]
container: nvcr.io/nvidia/nemo:24.03.framework
wandb_api_key_file: null
numa_mapping: {enable: True, mode: unique_contiguous, scope: node, cores: all_logical, balanced: True, min_cores: 1, max_cores: 8}
"""

BCM_YAML = """\
partition: null
account: null
exclusive: True
gpus_per_task: null
gpus_per_node: 4
mem: 50
job_name_prefix: 'nemo-megatron-'
srun_args:
  - "--no-container-mount-home"
"""

TRAINING_126M = """\
run:
  name: gpt3_126m
  results_dir: ${base_results_dir}/${.name}
  time_limit: "1-00:00:00"
  dependency: "singleton"
trainer:
  num_nodes: 8
  devices: 4
  accelerator: gpu
  precision: bf16
  max_steps: 600000
  log_every_n_steps: 10
  val_check_interval: 2000
  limit_val_batches: 50
  limit_test_batches: 50
  accumulate_grad_batches: 1
  gradient_clip_val: 1.0
exp_manager:
  explicit_log_dir: ${training.run.results_dir}/results
  name: megatron_gpt
  create_wandb_logger: False
  resume_if_exists: True
  resume_ignore_no_checkpoint: True
  create_checkpoint_callback: True
  checkpoint_callback_params:
    monitor: val_loss
    save_top_k: 10
    mode: min
    always_save_nemo: False
    model_parallel_size: ${multiply:${training.model.tensor_model_parallel_size}, ${training.model.pipeline_model_parallel_size}}
model:
  micro_batch_size: 4
  global_batch_size: 256
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  encoder_seq_length: 2048
  max_position_embeddings: 2048
  num_layers: 12
  hidden_size: 768
  ffn_hidden_size: ${multiply:4, ${.hidden_size}}
  num_attention_heads: 12
  init_method_std: 0.023
  hidden_dropout: 0.1
  attention_dropout: 0.1
  make_vocab_size_divisible_by: 128
  tokenizer:
    library: megatron
    type: GPT2BPETokenizer
    model: null
  optim:
    name: fused_adam
    lr: 6e-4
    weight_decay: 0.1
    betas: [0.9, 0.95]
    sched:
      name: CosineAnnealing
      warmup_steps: 636
      constant_steps: 100000
      min_lr: 6e-5
  data:
    data_impl: mmap
    splits_string: "99990,8,2"
    seq_length: 2048
    num_workers: 2
    data_prefix:
      - 1.0
      - ${data_dir}/my-gpt3_00_text_document
"""

CONVERT_GPT3 = """\
run:
  name: convert_${conversion.run.model_train_name}
  nodes: ${divide_ceil:${conversion.model.model_parallel_size}, 8}
  time_limit: "2:00:00"
  dependency: "singleton"
  ntasks_per_node: ${divide_ceil:${conversion.model.model_parallel_size}, ${.nodes}}
  convert_name: convert_nemo
  model_train_name: gpt3_126m
  train_dir: ${base_results_dir}/${.model_train_name}
  results_dir: ${.train_dir}/${.convert_name}
  nemo_file_name: megatron_gpt.nemo
model:
  model_type: gpt
  checkpoint_folder: ${conversion.run.train_dir}/results/checkpoints
  checkpoint_name: latest
  hparams_file: ${conversion.run.train_dir}/results/hparams.yaml
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  model_parallel_size: ${multiply:${.tensor_model_parallel_size}, ${.pipeline_model_parallel_size}}
"""

EVALUATE_ALL = """\
run:
  name: ${.eval_name}_${.model_train_name}
  time_limit: "100:00:00"
  dependency: "singleton"
  nodes: ${divide_ceil:${evaluation.model.model_parallel_size}, 4}
  ntasks_per_node: ${divide_ceil:${evaluation.model.model_parallel_size}, ${.nodes}}
  eval_name: eval_all
  model_train_name: gpt3_126m
  train_dir: ${base_results_dir}/${.model_train_name}
  tasks: all_tasks   # lambada, boolq, race, piqa, hellaswag, winogrande, wikitext2, wikitext103 OR all_tasks
  results_dir: ${base_results_dir}/${.model_train_name}/${.eval_name}
model:
  model_type: nemo-gpt3
  checkpoint_folder: ${evaluation.run.train_dir}/results/checkpoints
  hparams_file: ${evaluation.run.train_dir}/results/hparams.yaml
  tensor_model_parallel_size: 4
  pipeline_model_parallel_size: 1
  model_parallel_size: ${multiply:${.tensor_model_parallel_size}, ${.pipeline_model_parallel_size}}
  pipeline_model_parallel_split_rank: ${divide_floor:${.pipeline_model_parallel_size}, 2}
  precision: bf16
  eval_batch_size: 4
"""

# lmforge finetune's keys (NeMo's peft body is not translated), under a NeMo run block
PEFT_SQUAD = """\
run:
  name: ${.task_name}_${.model_train_name}
  time_limit: "04:00:00"
  dependency: "singleton"
  model_train_name: gpt3_126m
  convert_dir: ${base_results_dir}/${.model_train_name}/convert_nemo
  task_name: "squad"
  results_dir: ${base_results_dir}/${.model_train_name}/peft_${.task_name}
trainer:
  devices: 2
  num_nodes: 1
  precision: bf16
  max_steps: 50
model: ${peft.run.convert_dir}/megatron_gpt.nemo
data: ${data_dir}/squad/train.jsonl
val_data: ${data_dir}/squad/val.jsonl
peft:
  lora:
    r: 32
"""

EXPORT_GPT3 = """\
run:
  name: export_${.model_train_name}
  time_limit: "2:00:00"
  dependency: "singleton"
  model_train_name: gpt3_126m
  results_dir: ${base_results_dir}/${.model_train_name}/export
args:
  - ${base_results_dir}/gpt3_126m/results
  - ${export.run.results_dir}/gpt3_126m.gguf
options:
  format: gguf
"""

# stage files the defaults list names but this launch does not run: loaded, never checked
UNUSED = {
    "data_curation/common_crawl/curate_common_crawl": "run:\n  name: curate\n  results_dir: ${base_results_dir}/curate\n",
    "data_preparation/gpt3/download_gpt3_pile": (
        "run:\n  name: download_gpt3_pile\n  results_dir: ${base_results_dir}/${.name}\n  time_limit: \"4:00:00\"\n"
        "  dependency: \"singleton\"\n  node_array_size: 30\n  array: ${..file_numbers}\n"
        "file_numbers: \"0-29\"\ntokenizer_type: GPT2BPETokenizer\nvocab_save_dir: ${data_dir}/bpe\n"
        "merges_save_dir: ${data_dir}/bpe\nrm_downloaded: True\nrm_extracted: True\n"),
    "conversion_hf2nemo/hf_llama2/convert_llama2_nemo": (
        "run:\n  name: convert_llama2_nemo\n  results_dir: ${base_results_dir}/${.name}\n  time_limit: \"1:00:00\"\n"
        "args: [/models/Llama-2-7b-hf, \"${conversion_hf2nemo.run.results_dir}/llama2_7b.nemo\"]\n"),
    "rlhf_rm/gpt3/2b_rm": "run:\n  name: rlhf_rm_2b\n  time_limit: \"4:00:00\"\n",
    "rlhf_ppo/gpt3/2b_ppo": "run:\n  name: rlhf_ppo_2b\n  time_limit: \"4:00:00\"\n",
    "steerlm_reg/ac_sft/gpt_sft": "run:\n  name: steerlm\n",
}

# the users' override list shrinking gpt3/126m to a tiny model, and the stages this test runs
TINY = ["training.model.num_layers=2", "training.model.hidden_size=32", "training.model.num_attention_heads=4",
        "training.model.encoder_seq_length=32", "training.model.max_position_embeddings=64",
        "training.model.data.seq_length=32", "training.model.micro_batch_size=2",
        "training.model.global_batch_size=64", "training.model.make_vocab_size_divisible_by=8"]
STAGES = "stages=[training,conversion,peft,evaluation,export]"


def write_tree(root: Path, tokenizer: Path) -> Path:
    conf = root / "conf"
    files = {"config": CONFIG_YAML, "cluster/bcm": BCM_YAML,
             "training/gpt3/126m": TRAINING_126M.replace("model: null", f"model: {tokenizer}"),
             "conversion/gpt3/convert_gpt3": CONVERT_GPT3, "evaluation/gpt3/evaluate_all": EVALUATE_ALL,
             "peft/llama/squad": PEFT_SQUAD, "export/gpt3/export_gpt3": EXPORT_GPT3, **UNUSED}
    for name, text in files.items():
        path = conf / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return conf / "config.yaml"


def _sbatch(path: Path) -> list[str]:
    return re.findall(r"^#SBATCH (.*)$", path.read_text(), re.M)


def test_users_conf_tree_dry_runs(tmp_path, tiny_corpus, monkeypatch, capsys):
    config = write_tree(tmp_path, tiny_corpus["tokenizer"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # launcher_scripts_path: ~/NeMo/launcher_scripts
    monkeypatch.setenv("PATH", str(tmp_path / "no-sbatch-here"))  # a dry run needs no Slurm
    base = tmp_path / "home" / "NeMo" / "launcher_scripts" / "results"

    # the users' file as it is: numa_mapping.enable True is refused, saying how to turn it off
    assert main(["launch", "conf/config.yaml", "--dry-run", *TINY, STAGES, "peft=llama/squad"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: numa_mapping.enable=True") and "numa_mapping.enable=False" in err and "\n" not in err
    # then the container without a runtime: it would run on the host Python
    args = ["launch", "conf/config.yaml", "--dry-run", *TINY, STAGES, "peft=llama/squad", "numa_mapping.enable=False"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: container=nvcr.io/nvidia/nemo:24.03.framework is set but container_runtime=none")
    assert "container_runtime=apptainer" in err and "container_runtime=pyxis" in err and "container=null" in err
    # the users' PPO stage is lmforge align --method ppo: its file (a run block only) names no model or data
    assert main(["launch", "conf/config.yaml", "--dry-run", "numa_mapping.enable=False", "stages=[training,rlhf_ppo]",
                 "container_runtime=pyxis"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rlhf_ppo: the alignment config has problems") and "model is not set" in err
    assert "method=ppo needs a reward" in err
    # rlhf_rm is lmforge align --method rm: its file (a run block only) names no model or data
    assert main(["launch", "conf/config.yaml", "--dry-run", "numa_mapping.enable=False", "stages=[training,rlhf_rm]",
                 "container_runtime=pyxis"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rlhf_rm: the alignment config has problems") and "model is not set" in err
    assert not base.exists()

    assert main([*args, "container_runtime=pyxis"]) == 0
    out = capsys.readouterr().out
    for note in ["`override hydra/job_logging: stdout` is Hydra's own", "the `hydra:` section configures Hydra",
                 "cluster.mem=50 is read as 50 GB (NeMo's unit): #SBATCH --mem=50G",
                 "evaluation.model.hparams_file is not needed", "conversion.model.hparams_file is not needed"]:
        assert note in out, note
    assert ("evaluation: model.tensor_model_parallel_size=4 splits the model over 4 GPUs as in NeMo: one `lmforge "
            "evaluate --tensor-parallel-size 4` process starts the 4 ranks") in out
    assert out.count("[launch] note: ") == 8, out  # and model_type of conversion and evaluation

    train = base / "gpt3_126m" / "training.sbatch"
    sb = _sbatch(train)
    for line in ["--job-name=nemo-megatron-gpt3_126m", "--time=1-00:00:00", "--nodes=8", "--ntasks-per-node=4",
                 "--gpus-per-node=4", "--mem=50G", "--exclusive"]:
        assert line in sb, (line, sb)
    text = train.read_text()
    assert "--no-container-mount-home" in text and "--container-image=nvcr.io/nvidia/nemo:24.03.framework" in text
    import yaml

    written = yaml.safe_load((base / "gpt3_126m" / "training_config.yaml").read_text())
    assert written["model"]["num_layers"] == 2 and written["model"]["ffn_hidden_size"] == 128  # multiply:4,32
    assert written["exp_manager"]["explicit_log_dir"] == f"{base}/gpt3_126m/results"
    assert written["model"]["data"]["data_prefix"][1] == f"{base.parent}/data/my-gpt3_00_text_document"

    # conversion: NeMo's checkpoint -> .nemo is `lmforge export CHECKPOINTS OUT.nemo --format nemo`
    conv = (base / "gpt3_126m" / "convert_nemo" / "conversion.sbatch").read_text()
    assert f"-m lmforge export {base}/gpt3_126m/results/checkpoints " \
           f"{base}/gpt3_126m/convert_nemo/megatron_gpt.nemo --format nemo" in conv
    assert "#SBATCH --job-name=nemo-megatron-convert_gpt3_126m" in conv and "#SBATCH --time=02:00:00" in conv
    assert "#SBATCH --nodes=1" in conv and "#SBATCH --ntasks-per-node=1" in conv

    # peft -> fine_tuning with LoRA, 2 processes, its config beside the script
    peft_dir = base / "gpt3_126m" / "peft_squad"
    peft = yaml.safe_load((peft_dir / "peft_config.yaml").read_text())
    assert peft["method"] == "lora" and peft["model"] == f"{base}/gpt3_126m/convert_nemo/megatron_gpt.nemo"
    assert peft["peft"]["lora"]["r"] == 32 and peft["out"] == str(peft_dir)
    ptext = (peft_dir / "peft.sbatch").read_text()
    assert f"-m lmforge finetune {peft_dir}/peft_config.yaml" in ptext and "--nproc-per-node=2" in ptext
    assert "#SBATCH --job-name=nemo-megatron-squad_gpt3_126m" in ptext

    # evaluation: TP 4 (1 node by divide_ceil) is the model split over 4 GPUs: one process that starts the 4
    # ranks (`evaluate --tensor-parallel-size 4`), not 4 torchrun processes; all_tasks -> lmforge's eight,
    # bf16 -> --dtype
    ev = base / "gpt3_126m" / "eval_all" / "evaluation.sbatch"
    sb = _sbatch(ev)
    assert "--nodes=1" in sb and "--ntasks-per-node=1" in sb and "--time=4-04:00:00" in sb and "--gpus-per-node=4" in sb
    etext = ev.read_text()
    assert (f"-m lmforge evaluate {base}/gpt3_126m/results/checkpoints --dtype bfloat16 --batch-size 4 "
            f"--output {base}/gpt3_126m/eval_all/results.json --tensor-parallel-size 4 "
            f"--tasks lambada,boolq,race,piqa,hellaswag,winogrande,wikitext2,wikitext103") in etext
    assert "torch.distributed.run" not in etext

    # export: the new command behind the launcher's export stage
    ex = (base / "gpt3_126m" / "export" / "export.sbatch").read_text()
    assert f"-m lmforge export {base}/gpt3_126m/results {base}/gpt3_126m/export/gpt3_126m.gguf --format gguf" in ex
    assert not (base / "launch.json").exists()


def test_nemo_keys_act_or_are_refused(tmp_path, tiny_corpus, monkeypatch):
    config = write_tree(tmp_path, tiny_corpus["tokenizer"])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ok = [*TINY, STAGES, "peft=llama/squad", "numa_mapping.enable=False", "container_runtime=pyxis"]
    cfg = load_launch_config(config, ok)
    assert cfg.cluster_type == "slurm" and cfg.cluster.mem == "50G"
    # dependency: "singleton" in every stage file: sbatch --dependency=afterok:<previous>,singleton
    assert [s.dependency for s in build_stages(cfg, check_commands=False)] == ["singleton"] * 5
    assert cfg.base_results_dir == str(tmp_path / "home" / "NeMo" / "launcher_scripts" / "results")
    assert cfg.data_dir == str(tmp_path / "home" / "NeMo" / "launcher_scripts" / "data")
    # a memory size with its unit passes through; 0 (the whole node) stays 0
    assert load_launch_config(config, [*ok, "cluster.mem=64G"]).cluster.mem == "64G"
    assert load_launch_config(config, [*ok, "cluster.mem=0"]).cluster.mem == 0
    with pytest.raises(ConfigError, match=r"cluster.mem='50 GB' is not a Slurm memory size"):
        load_launch_config(config, [*ok, "cluster.mem=50 GB"])
    # wandb_api_key_file: the key is exported to the stages (read on the node, not written into the script)
    key = tmp_path / "wandb.key"
    key.write_text("abc123\n")
    cfg = load_launch_config(config, [*ok, f"wandb_api_key_file={key}"])
    from lmforge.launch.slurm import script

    stages = build_stages(cfg, check_commands=False)
    text = script(stages[0], cfg)
    assert f'export WANDB_API_KEY="$(cat {key})"' in text and "abc123" not in text
    with pytest.raises(ConfigError, match=r"wandb_api_key_file=.*missing.key: cannot read it"):
        load_launch_config(config, [*ok, f"wandb_api_key_file={tmp_path}/missing.key"])
    # a run-block key nothing uses, a NeMo model key without translation, a PEFT stage asked for full fine-tuning
    with pytest.raises(ConfigError, match=r"evaluation.run.eval_nmae is not a run setting"):
        build_stages(load_launch_config(config, [*ok, "evaluation.run.eval_nmae=x"]), check_commands=False)
    with pytest.raises(ConfigError, match=r"evaluation.model.micro_batch_size: lmforge translates NeMo's evaluation"):
        build_stages(load_launch_config(config, [*ok, "evaluation.model.micro_batch_size=2"]), check_commands=False)
    # NeMo's evaluation sizes: TP 1 stays one process per GPU (data parallel), TP 2 of PP 2 is refused (no
    # pipeline split), TP 8 spans two 4-GPU nodes (divide_ceil) and is refused (the ranks start on one node)
    (ev,) = [s for s in build_stages(load_launch_config(config, [*ok, "evaluation.model.tensor_model_parallel_size=1"]),
                                     check_commands=False) if s.kind == "evaluation"]
    assert "--tensor-parallel-size" not in ev.module_args and (ev.nodes, ev.ntasks_per_node) == (1, 1)
    with pytest.raises(ConfigError, match=r"^evaluation.model.pipeline_model_parallel_size=2: lmforge evaluate splits "
                                          r"a model by tensor parallelism only; set pipeline_model_parallel_size: 1 "
                                          r"and tensor_model_parallel_size: 4"):
        build_stages(load_launch_config(config, [*ok, "evaluation.model.tensor_model_parallel_size=2",
                                                 "evaluation.model.pipeline_model_parallel_size=2"]), check_commands=False)
    with pytest.raises(ConfigError, match=r"^evaluation: tensor parallel size 8 asks for 2 nodes, but lmforge's tensor "
                                          r"parallelism runs on one node"):
        build_stages(load_launch_config(config, [*ok, "evaluation.model.tensor_model_parallel_size=8"]),
                     check_commands=False)
    with pytest.raises(ConfigError, match=r"peft.method='full': a peft stage trains lora \| ptuning"):
        build_stages(load_launch_config(config, [*ok, "peft.method=full"]), check_commands=False)
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_nod is not a cluster setting"):
        load_launch_config(config, [*ok, "cluster.gpus_per_nod=4"])
    with pytest.raises(ConfigError, match=r"`contaner` is neither a launcher setting nor a stage"):
        load_launch_config(config, [*ok, "contaner=x"])
    # gpus_per_task acts
    cfg = load_launch_config(config, [*ok, "cluster.gpus_per_task=1"])
    assert "#SBATCH --gpus-per-task=1" in script(build_stages(cfg, check_commands=False)[0], cfg)


def test_nemo_stage_names(tmp_path, tiny_corpus, monkeypatch):
    """prompt_learning is fine-tuning with p-tuning; conversion_hf2nemo is `lmforge export ... --format nemo`;
    a data-preparation array with node_array_size runs at most that many tasks at once."""
    config = write_tree(tmp_path, tiny_corpus["tokenizer"])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "conf" / "prompt_learning" / "gpt3").mkdir(parents=True)
    (tmp_path / "conf" / "prompt_learning" / "gpt3" / "squad.yaml").write_text(
        "run:\n  name: ptuning\ntrainer: {devices: 1, max_steps: 5}\nmodel: /models/base\ndata: /data/train.jsonl\n")
    cfg = load_launch_config(config, ["numa_mapping.enable=False", "container=null", "prompt_learning=gpt3/squad",
                                      "stages=[prompt_learning,conversion_hf2nemo]"])
    ptuning, hf2nemo = build_stages(cfg)
    assert ptuning.kind == "prompt_learning" and "method: ptuning" in ptuning.config_text
    assert hf2nemo.module_args[:3] == ["-m", "lmforge", "export"]
    assert hf2nemo.module_args[3:] == ["/models/Llama-2-7b-hf", f"{cfg.base_results_dir}/convert_llama2_nemo/llama2_7b.nemo",
                                       "--format", "nemo"]
    from lmforge.launch.config import run_block

    run = run_block(cfg, "data_preparation")
    assert run["node_array_size"] == 30 and run["array"] == "0-29"


def test_node_array_size_limits_array_tasks(tmp_path, launch_helpers, tiny_corpus):
    from lmforge.launch.slurm import script

    shards = [str(tmp_path / f"shard{i}.jsonl") for i in range(3)]
    body = {"run": {"array": True, "node_array_size": 2, "dependency": "singleton"}, "corpus": None, "inputs": shards,
            "tokenizer": {"path": str(tiny_corpus["tokenizer"]), "train": False}}
    path = launch_helpers.write_conf(tmp_path, {"stages": ["data_preparation"], "base_results_dir": str(tmp_path / "r"),
                                                "cluster_type": "bcm"}, {"data_preparation": body})
    cfg = load_launch_config(path)
    assert "#SBATCH --array=0-2%2" in script(build_stages(cfg)[0], cfg)
    with pytest.raises(ConfigError, match="node_array_size=2 limits the tasks of a job array running at once, but data_preparation.run.array is not set"):
        build_stages(load_launch_config(path, ["data_preparation.run.array=null"]))


def test_docs_nemo_command_runs_verbatim(tmp_path, tiny_corpus, monkeypatch, capsys):
    """docs/launcher.md's NeMo command, verbatim, on the users' tree (gpt3/126m at its own size: a dry run)."""
    import shlex

    text = (Path(__file__).resolve().parents[2] / "docs" / "launcher.md").read_text(encoding="utf-8")
    block = text[text.index("## NeMo Launcher configs"):].split("```bash\n", 1)[1].split("```", 1)[0]
    (command,) = [line for line in block.splitlines() if line.strip()]
    write_tree(tmp_path, tiny_corpus["tokenizer"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-sbatch-here"))
    assert main(shlex.split(command)[1:]) == 0
    base = tmp_path / "home" / "NeMo" / "launcher_scripts" / "results" / "gpt3_126m"
    for script in ["training.sbatch", "convert_nemo/conversion.sbatch", "peft_squad/peft.sbatch",
                   "eval_all/evaluation.sbatch", "export/export.sbatch"]:
        assert (base / script).is_file(), script
    assert "num_layers: 12" in (base / "training_config.yaml").read_text()


def test_wandb_key_file_reaches_a_local_stage(tmp_path, launch_helpers):
    """wandb_api_key_file acts on this machine too: the stage's environment holds WANDB_API_KEY from the file."""
    from lmforge.launch import local

    key = tmp_path / "wandb.key"
    key.write_text("secret42\n")
    path = launch_helpers.write_conf(tmp_path, {"stages": ["export"], "base_results_dir": str(tmp_path / "r")},
                                     {"export": {"args": ["unused"]}})
    cfg = load_launch_config(path, [f"wandb_api_key_file={key}"])
    (stage,) = build_stages(cfg)
    seen = tmp_path / "seen.txt"
    stage.module_args = ["-c", "import os, sys; open(sys.argv[1], 'w').write(os.environ.get('WANDB_API_KEY', 'unset'))",
                         str(seen)]
    code, _ = local.run([stage], cfg, log=lambda line: None)
    assert code == 0 and seen.read_text() == "secret42"
