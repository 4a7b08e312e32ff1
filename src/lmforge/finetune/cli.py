"""Commands: ``lmforge finetune``, ``lmforge peft merge``, ``lmforge data preview``."""

from __future__ import annotations

import json
import os


def add_commands(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on JSONL data (full, lora, ptuning, adapter, ia3)")
    p.add_argument("config", nargs="?", default=None, help="optional YAML file of fine-tuning settings")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. peft.lora.r=16 trainer.max_steps=500")
    p.add_argument("--model", help="base model folder")
    p.add_argument("--data", help="training JSONL (input/output or chat messages records)")
    p.add_argument("--val-data", help="validation JSONL")
    p.add_argument("--method", choices=["full", "lora", "ptuning", "adapter", "ia3"])
    p.add_argument("--out", help="results folder")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("peft", help="PEFT adapter tools")
    psub = p.add_subparsers(dest="peft_cmd", required=True)
    m = psub.add_parser("merge", help="fold a LoRA/DoRA or IA3 adapter into the base weights")
    m.add_argument("--model", required=True, help="base model: an lmforge checkpoint (or run) or a Hugging Face "
                                                  "model folder")
    m.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="folder for the merged model")
    m.set_defaults(func=_cmd_merge)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    v = dsub.add_parser("preview", help="show fine-tuning samples with the trained tokens highlighted")
    v.add_argument("file", help="JSONL file")
    v.add_argument("--tokenizer", required=True, help="tokenizer folder or model folder")
    v.add_argument("--count", type=int, default=2)
    v.add_argument("--seq-length", type=int, default=2048)
    v.add_argument("overrides", nargs="*", help="sft.* settings, e.g. sft.prompt_template='Q: {input}\\nA: '")
    v.set_defaults(func=_cmd_preview)


def run_stage_command(a, flags: dict, load_config, run) -> int:
    """Run a training stage command (``lmforge finetune``, ``lmforge align``): the optional YAML file
    (``a.config``; a first word holding ``=`` is an override instead), then ``a.overrides``, then the flags
    given (``flags``: dotted key -> value, None when not given) as overrides; ``load_config(source, overrides)``
    builds the config and ``run(cfg)`` the stage. Rank 0 prints the summary (less the loss list). Exit code 75
    when the run stopped early (resumable), else 0."""
    source, overrides = a.config, list(a.overrides)
    if source is not None and "=" in source:  # no YAML file given: the first word is an override
        source, overrides = None, [source] + overrides
    overrides += [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    from lmforge.stop_markers import EXIT_STOPPED_TO_RESUME, stopped_to_resume

    cfg = load_config(source, overrides)
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return EXIT_STOPPED_TO_RESUME if stopped_to_resume(summary) else 0


def _cmd_finetune(a) -> int:
    from lmforge.finetune import load_finetune_config, run

    flags = {"model": a.model, "data": a.data, "val_data": a.val_data, "method": a.method, "out": a.out}
    return run_stage_command(a, flags, load_finetune_config, run)


def _stored_dtype(model_path):
    """The dtype the base model's weights are stored in (the merged model is saved in it) and the lmforge
    ``config.json`` entries that let ``convert --to hf`` find the way back (``family``, ``hf_config``)."""
    from pathlib import Path

    from lmforge.locate import is_hf_folder, resolve_checkpoint
    from lmforge.train.checkpoint import load_model

    if is_hf_folder(model_path):
        from lmforge.convert.hf import SafetensorsFolder, open_source

        source = open_source(Path(model_path))
        reader = SafetensorsFolder(model_path)
        first = next(k for k in reader.keys() if reader.get(k).is_floating_point())
        return reader.get(first).dtype, {"family": source.family.name, "hf_config": source.hf_extra}
    folder = resolve_checkpoint(model_path)
    weights, _ = load_model(folder)
    stored = next(iter(weights.values())).dtype
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return stored, {k: config[k] for k in ("family", "hf_config") if k in config}


def merge(model_path, adapter_dir, out) -> str:
    """Load ``model_path`` (anything :func:`lmforge.open.load_for_inference` opens: an lmforge checkpoint or
    run, or a Hugging Face model folder), apply and fold in the adapter, and save a plain lmforge checkpoint
    at ``out`` in the base weights' dtype, with the adapter's tokenizer when it has one (else the base's)."""
    from lmforge.io import atomic_path, write_json_atomic
    from lmforge.open import adapter_tokenizer, load_for_inference
    from lmforge.peft import apply_adapter, merge_adapter
    from lmforge.train.assembly import saved_state_dict
    from lmforge.train.checkpoint import save_model, write_model_config

    stored, lineage = _stored_dtype(model_path)
    model, tokenizer = load_for_inference(model_path, device="cpu", dtype="float32")
    model = merge_adapter(apply_adapter(model, adapter_dir))
    model = model.to(stored)
    tokenizer = adapter_tokenizer(adapter_dir, tokenizer)
    with atomic_path(out) as tmp:
        save_model(tmp, saved_state_dict(model), model.cfg.to_dict(), tokenizer=tokenizer)
        if lineage:  # family / hf_config: `lmforge convert --to hf` exports it as the base's family
            doc = json.loads(write_model_config(tmp, model.cfg.to_dict()).read_text(encoding="utf-8"))
            write_json_atomic(tmp / "config.json", {**doc, **lineage})
    return str(out)


def _cmd_merge(a) -> int:
    print(f"wrote {merge(a.model, a.adapter, a.out)}")
    return 0


def _cmd_preview(a) -> int:
    from lmforge.data.sft import preview
    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.finetune import load_finetune_config

    cfg = load_finetune_config({"model": "-", "data": a.file}, a.overrides)
    preview(a.file, load_tokenizer(a.tokenizer), cfg.sft, a.seq_length + 1, count=a.count)
    return 0
