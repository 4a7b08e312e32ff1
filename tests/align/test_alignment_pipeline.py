"""The shipped example pipeline examples/pipeline/conf/alignment.yaml (SFT -> reward model -> PPO and DPO ->
evaluation, NeMo-Aligner's stage names) as a dry run, every stage checked at launch; its SFT -> reward model -> PPO
stages run for real on the tiny model; NeMo Launcher's rlhf_ppo body (actor and critic sections) translated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipeline" / "conf" / "alignment.yaml"


def test_example_alignment_pipeline_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    r = tmp_path / "r"
    assert main(["launch", str(EXAMPLE), "cluster_type=local", "--dry-run", f"base_results_dir={r}"]) == 0
    out = capsys.readouterr().out
    for line in ("lmforge finetune", "lmforge align " + str(r / "reward_model" / "rlhf_rm_config.yaml"),
                 "lmforge align " + str(r / "ppo" / "rlhf_ppo_config.yaml"),
                 "lmforge align " + str(r / "dpo" / "dpo_config.yaml"), "lmforge convert " + str(r / "dpo"),
                 "lmforge evaluate " + str(r / "convert_dpo_hf" / "hf")):
        assert line in out, line
    assert not (r / "dpo" / "COMPLETED").exists()

    # every stage's keys are checked at launch, before anything runs
    assert main(["launch", str(EXAMPLE), "cluster_type=local", "--dry-run", f"base_results_dir={r}",
                 "rlhf_rm.align.margin_ky=score"]) == 2
    assert "rlhf_rm: " in capsys.readouterr().err


def test_sft_reward_model_and_ppo_stages_run_locally(tmp_path, monkeypatch, tiny_base):
    """The example's fine_tuning -> rlhf_rm -> rlhf_ppo stages on the tiny model (its character tokenizer covers the
    example's data), a few steps each: PPO scores with the reward model and its critic starts from it."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    r = tmp_path / "r"
    assert main(["launch", str(EXAMPLE), "cluster_type=local", f"base_results_dir={r}",
                 "stages=[fine_tuning,rlhf_rm,rlhf_ppo]", f"fine_tuning.model={tiny_base}",
                 "fine_tuning.trainer.max_steps=2", "rlhf_rm.trainer.max_steps=2",
                 "rlhf_rm.trainer.val_check_interval=2",
                 "rlhf_ppo.trainer.max_steps=1", "rlhf_ppo.global_batch_size=4", "rlhf_ppo.micro_batch_size=4",
                 "rlhf_ppo.gradient_checkpointing=true"]) == 0  # what NeMo's full activation checkpointing becomes
    assert yaml.safe_load((r / "ppo" / "rlhf_ppo_config.yaml").read_text())["gradient_checkpointing"] is True
    summary = json.loads((r / "ppo" / "summary.json").read_text())
    assert summary["method"] == "ppo" and summary["steps"] == 1 and summary["critic"] == str(r / "ppo" / "critic")
    rows = [json.loads(x) for x in (r / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["value_loss"] > 0 and "reward" in rows[0]
    rm_head = load_file(str(r / "reward_model" / "reward_model" / "model.safetensors"))["score.weight"]
    critic_head = load_file(str(r / "ppo" / "critic" / "model.safetensors"))["score.weight"]
    assert rm_head.abs().max() > 0.05  # a drawn head, far from the zero head a critic from the policy starts with
    assert (critic_head - rm_head).abs().max() < 0.01  # two small AdamW steps from the reward model's
    assert (r / "ppo" / "COMPLETED").is_file()


NEMO_PPO = {  # NeMo Launcher's conf/rlhf_ppo/gpt3/2b_ppo.yaml, its keys lmforge translates or accepts
    "actor": {
        "trainer": {"num_nodes": 1, "devices": 1, "accelerator": "cpu", "precision": "bf16", "logger": False,
                    "max_epochs": "${.ppo.max_epochs}", "max_steps": "${.ppo.max_steps}",
                    "ppo": {"max_steps": 20, "gradient_clip_val": 1.0, "initial_policy_kl_penalty": 0.01,
                            "use_absolute_kl": True, "discount_factor": 1.0, "gae_lambda": 0.95,
                            "normalize_advantages": True, "max_epochs": 1, "rollout_batch_seq_length": None}},
        "remote_critic_rm": {"combine_rm_and_critic_server": True, "critic": {"ip": "localhost", "port": 5556}},
        "exp_manager": {"name": "megatron_gpt_ppo_actor", "resume_if_exists": True,
                        "checkpoint_callback_params": {"save_top_k": 1, "always_save_nemo": False}},
        "pretrained_checkpoint": {"restore_from_path": "sft"},
        "model": {"ppo": {"rollout_micro_batch_size": 8, "num_rollout_samples": 64, "forward_micro_batch_size": 8,
                          "offload_adam_states": True, "entropy_bonus": 0.0, "ratio_eps": 0.1,
                          "sampling_params": {"use_greedy": False, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
                          "length_params": {"max_length": 24, "min_length": 1}},
                  "mcore_gpt": True, "micro_batch_size": 1, "global_batch_size": 16,
                  "activations_checkpoint_granularity": "selective", "activations_checkpoint_method": "uniform",
                  "tensor_model_parallel_size": 1, "encoder_seq_length": 64, "seed": 7,
                  "optim": {"name": "distributed_fused_adam", "lr": 9.0e-7, "weight_decay": 0.1, "betas": [0.9, 0.98],
                            "sched": {"name": "CosineAnnealing", "warmup_steps": 10, "min_lr": 9.0e-8}},
                  "data": {"data_impl": "jsonl", "data_prefix": {"train": "prompts.jsonl"}}}},
    "critic": {
        "trainer": {"devices": 1, "ppo": {"port": 5556, "combine_rm_and_critic_server": True, "max_steps": 20,
                                          "gradient_clip_val": 1.0}},
        "pretrained_checkpoint": {"restore_from_path": "rm"},
        "model": {"loss_clip_val": 0.3, "output_sequence": True, "global_batch_size": 16,
                  "optim": {"name": "distributed_fused_adam", "lr": 9.0e-6, "weight_decay": 0.1,
                            "betas": [0.9, 0.98], "sched": {"name": "CosineAnnealing", "warmup_steps": 10,
                                                            "min_lr": 9.0e-7}}}},
}


def test_nemo_launcher_ppo_body_becomes_lmforge_keys():
    import copy

    from lmforge.align.config import load_align_config
    from lmforge.launch.nemo_ppo import translate

    notes: list = []
    out = translate("rlhf_ppo", copy.deepcopy(NEMO_PPO), notes)
    cfg = load_align_config(out)
    a = cfg.align
    assert (cfg.method, cfg.model, cfg.data, cfg.seed, cfg.seq_length) == ("ppo", "sft", "prompts.jsonl", 7, 64)
    assert (cfg.global_batch_size, cfg.micro_batch_size, a.num_mini_batches, a.num_generations) == (64, 8, 4, 1)
    assert (a.beta, a.absolute_kl, a.gamma, a.lam, a.normalize_advantages, a.cliprange) == (0.01, True, 1.0, 0.95,
                                                                                            True, 0.1)
    assert (a.temperature, a.max_completion_length, a.reward_model, a.cliprange_value, a.critic_lr) == (
        0.7, 24, "rm", 0.3, 9.0e-6)
    assert (cfg.trainer.max_steps, cfg.trainer.precision, cfg.optim.name, cfg.optim.lr, cfg.optim.min_lr) == (
        20, "bf16-mixed", "fused_adam", 9.0e-7, 9.0e-8)
    # NeMo's selective (with the method Megatron-core ignores beside it): the attention core of every block recomputed
    assert (out["activations_checkpoint_granularity"], out["activations_checkpoint_method"]) == ("selective",
                                                                                                "uniform")
    assert cfg.activations_checkpoint == dict(granularity="selective", method=None, num_layers=None)
    assert notes and "one lmforge process" in notes[0]


@pytest.mark.parametrize("path, value, says", [
    ("actor.model.ppo.entropy_bonus", 0.01, "rlhf_ppo.actor.model.ppo.entropy_bonus=0.01: lmforge supports 0 or 0.0"),
    ("actor.trainer.ppo.val_check_interval", 10, "rlhf_ppo.actor.trainer.ppo.val_check_interval=10: lmforge's PPO "
                                                 "has no validation pass"),
    ("actor.trainer.ppo.max_steps", -1, "rlhf_ppo.actor.trainer.ppo.max_steps=-1: lmforge runs a given number"),
    ("actor.model.global_batch_size", 24, "rlhf_ppo.actor.model.global_batch_size=24 must divide "
                                          "actor.model.ppo.num_rollout_samples=64"),
    ("critic.model.optim.weight_decay", 0.0, "rlhf_ppo.critic.model.optim.weight_decay=0.0: lmforge's critic takes "
                                             "the actor's model.optim.weight_decay (0.1)"),
    ("actor.model.ppo.sampling_params.end_strings", ["<extra_id_1>"],
     "rlhf_ppo.actor.model.ppo.sampling_params.end_strings=['<extra_id_1>']: lmforge ends a completion at the "
     "tokenizer's EOS"),
    ("actor.model.ppo.dpo_beta", 0.1, "rlhf_ppo.actor.model.ppo.dpo_beta: NeMo's PPO key has no lmforge meaning"),
])
def test_nemo_ppo_keys_lmforge_cannot_honour_are_named(path, value, says):
    import copy

    from lmforge.errors import ConfigError
    from lmforge.launch.nemo_ppo import translate

    body = copy.deepcopy(NEMO_PPO)
    node = body
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    with pytest.raises(ConfigError) as e:
        translate("rlhf_ppo", body, [])
    assert str(e.value).startswith(says), str(e.value)


@pytest.mark.parametrize("actor, runs", [
    ({}, None),
    ({"granularity": "full"}, dict(granularity="full", method="uniform", num_layers=1)),
    ({"granularity": "full", "method": "uniform", "num_layers": 2}, dict(granularity="full", method="uniform",
                                                                          num_layers=2)),
    ({"granularity": "full", "method": "block", "num_layers": 1}, dict(granularity="full", method="block",
                                                                        num_layers=1)),
    ({"granularity": "selective", "method": "block"}, dict(granularity="selective", method=None, num_layers=None)),
])
@pytest.mark.parametrize("critic_says_the_same", [False, True])
def test_nemo_ppo_activation_checkpointing_keys_keep_nemos_meaning(actor, runs, critic_says_the_same):
    """The actor's ``model.activations_checkpoint_*`` become ``lmforge align``'s keys of the same names (the critic
    follows the policy; its own keys, where given, say the same): what runs is NeMo's setting."""
    import copy

    from lmforge.align.config import load_align_config
    from lmforge.launch.nemo_ppo import translate

    body = copy.deepcopy(NEMO_PPO)
    for section in ("actor", "critic") if critic_says_the_same else ("actor",):
        model = body[section]["model"]
        for k in ("granularity", "method", "num_layers"):
            model.pop(f"activations_checkpoint_{k}", None)
        model.update({f"activations_checkpoint_{k}": v for k, v in actor.items()})
    cfg = load_align_config(translate("rlhf_ppo", body, []))
    assert cfg.activations_checkpoint == runs and cfg.critic_activations_checkpoint == runs
    assert cfg.gradient_checkpointing is None


@pytest.mark.parametrize("actor, critic, says", [
    ({"granularity": "selective", "method": "uniform", "num_layers": 2}, {},
     "rlhf_ppo.actor.model.activations_checkpoint_num_layers=2 must be null with "
     "rlhf_ppo.actor.model.activations_checkpoint_granularity=selective"),
    ({"granularity": "lora", "method": None}, {},
     "rlhf_ppo.actor.model.activations_checkpoint_granularity='lora': NeMo's values are full and selective"),
    ({"granularity": None, "method": "uniform"}, {},
     "rlhf_ppo.actor.model.activations_checkpoint_method=uniform has no effect without "
     "rlhf_ppo.actor.model.activations_checkpoint_granularity; set it to full"),
    ({}, {"granularity": "full"},
     "rlhf_ppo.critic.model.activations_checkpoint_granularity='full': lmforge's critic takes the actor's "
     "model.activations_checkpoint_granularity ('selective')"),
])
def test_nemo_ppo_activation_checkpointing_lmforge_cannot_do_is_named(actor, critic, says):
    import copy

    from lmforge.errors import ConfigError
    from lmforge.launch.nemo_ppo import translate

    body = copy.deepcopy(NEMO_PPO)
    body["actor"]["model"].update({f"activations_checkpoint_{k}": v for k, v in actor.items()})
    body["critic"]["model"].update({f"activations_checkpoint_{k}": v for k, v in critic.items()})
    with pytest.raises(ConfigError) as e:
        translate("rlhf_ppo", body, [])
    assert str(e.value).startswith(says), str(e.value)


def test_a_nemo_ppo_body_launches(tmp_path, capsys):
    """The stage translates a NeMo body at launch (dry run; the body is NeMo Launcher's 2b_ppo.yaml with its
    selective activation checkpointing): the command reads lmforge's keys."""
    conf = tmp_path / "conf"
    (conf / "rlhf_ppo").mkdir(parents=True)
    body = {"run": {"name": "ppo", "results_dir": "${base_results_dir}/ppo", "time_limit": "00:10:00"}, **NEMO_PPO}
    (conf / "rlhf_ppo" / "nemo.yaml").write_text(yaml.safe_dump(body))
    top = {"defaults": ["_self_", {"rlhf_ppo": "nemo"}], "stages": ["rlhf_ppo"], "cluster_type": "local",
           "base_results_dir": str(tmp_path / "r")}
    (conf / "config.yaml").write_text(yaml.safe_dump(top, sort_keys=False))
    assert main(["launch", str(conf / "config.yaml"), "--dry-run"]) == 0
    assert "lmforge align " + str(tmp_path / "r" / "ppo" / "rlhf_ppo_config.yaml") in capsys.readouterr().out
    assert main(["launch", str(conf / "config.yaml"), "--dry-run", "rlhf_ppo.actor.model.ppo.top_p=0.9"]) == 2
    assert "rlhf_ppo.actor.model.ppo.top_p: NeMo's PPO key has no lmforge meaning" in capsys.readouterr().err
    assert main(["launch", str(conf / "config.yaml"), "--dry-run",
                 "rlhf_ppo.actor.model.activations_checkpoint_num_layers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: rlhf_ppo.actor.model.activations_checkpoint_num_layers=1 must be null with "), err


@pytest.mark.parametrize("example, stage, method, says", [
    (EXAMPLE, "dpo", "rm", "dpo.method='rm': a dpo stage trains one of dpo, ipo, rpo, kto, orpo, simpo; use an rlhf_rm"),
    (EXAMPLE, "rlhf_rm", "dpo", "rlhf_rm.method='dpo': an rlhf_rm stage trains a reward model (method rm); use a dpo "
                                "stage for method=dpo"),
    (EXAMPLE, "rlhf_ppo", "grpo", "rlhf_ppo.method='grpo': an rlhf_ppo stage trains with PPO (method ppo); use an "
                                  "alignment stage for method=grpo"),
    (EXAMPLE.with_name("steerlm.yaml"), "steerlm_reg", "rm", "steerlm_reg.method='rm': a steerlm_reg stage trains "
                                                             "SteerLM's attribute model"),
])
def test_an_alignment_stage_refuses_a_method_it_does_not_train(tmp_path, capsys, example, stage, method, says):
    assert main(["launch", str(example), "cluster_type=local", "--dry-run", f"base_results_dir={tmp_path}",
                 f"{stage}.method={method}"]) == 2
    assert says in capsys.readouterr().err
