"""Commands: ``lmforge align`` and ``lmforge reward``."""

from __future__ import annotations

import json

METHODS = ["dpo", "ipo", "rpo", "kto", "orpo", "simpo", "rm", "regression_rm", "grpo", "reinforce", "ppo"]


def add_commands(sub) -> None:
    p = sub.add_parser("align", help="align a model on preference data (dpo, ipo, rpo, kto, orpo, simpo), train "
                                     "a reward model (rm), a SteerLM attribute model (regression_rm) or with online RL "
                                     "(grpo, reinforce, ppo)")
    p.add_argument("config", nargs="?", default=None, help="optional YAML file of alignment settings")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.beta=0.05 trainer.max_steps=500")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--model", help="the model to align (an SFT checkpoint, run or HF folder)")
    p.add_argument("--data", help="training JSONL: prompt/chosen/rejected pairs (kto: prompt/completion/label; "
                                  "regression_rm: prompt/response/attributes)")
    p.add_argument("--val-data", help="validation JSONL of the same kind")
    p.add_argument("--peft", choices=["none", "lora", "ia3", "adapter", "ptuning"],
                   help="train a PEFT method instead of every weight (peft.method)")
    p.add_argument("--out", help="results folder")
    p.add_argument("--reward-fn", help="grpo/reinforce/ppo: the reward function, module:function (align.reward_fn)")
    p.add_argument("--reward-model", help="grpo/reinforce/ppo: a reward model scoring the completions instead (the run "
                                          "folder of `--method rm` or its reward_model/; align.reward_model)")
    p.set_defaults(func=_cmd_align)

    r = sub.add_parser("reward", help="score JSONL records with a reward model (accuracy on preference pairs), or "
                                      "label them with a SteerLM attribute model")
    r.add_argument("model", help="a reward-model run folder (`lmforge align --method rm` or `regression_rm`) or its "
                                 "reward_model/ (Hugging Face) folder")
    r.add_argument("--data", required=True, help="JSONL: prompt/chosen/rejected pairs, prompt/completion or text "
                                                 "(attribute models: prompt/response or messages)")
    r.add_argument("--out", help="write one JSON line of scores per record here (attribute models: each record "
                                 "with its predicted \"attributes\", clipped to the range and rounded)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    r.set_defaults(func=_cmd_reward)


def _cmd_align(a) -> int:
    from lmforge.align import load_align_config, run

    from lmforge.finetune.cli import run_stage_command

    flags = {"model": a.model, "data": a.data, "val_data": a.val_data, "method": a.method, "out": a.out,
             "peft.method": a.peft, "align.reward_fn": a.reward_fn,
             "align.reward_model": a.reward_model}
    return run_stage_command(a, flags, load_align_config, run)


def _cmd_reward(a) -> int:
    from lmforge.align.reward import score_file
    from lmforge.errors import UserError

    if a.batch_size < 1:
        raise UserError(f"--batch-size {a.batch_size} must be at least 1")
    summary = score_file(a.model, a.data, out=a.out, device=a.device, batch_size=a.batch_size)
    print(json.dumps(summary, indent=2))
    return 0
