"""Weights that do not fit their config, and adapters for another base model or rank, through every command that
loads a model: exit code 2, one `error:` line naming the file, the first tensor (its shape in the file and in the
model) and the fix; no traceback (not load_state_dict's list of every size mismatch), and no file written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.data.tokenizers import train_bpe
from lmforge.open import load_for_inference
from lmforge.peft import LoRAConfig, apply_peft, save_adapter


def _hf_folder(folder, tok_source, hidden=32, ffn=64):
    """A tiny HF Llama folder (random weights) with the tokenizer files of ``tok_source``."""
    shutil.copytree(tok_source, folder)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    target = doc["model"] if "model" in doc and path.name == "config.json" else doc
    target.update(changes)
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{name: path}``: good and broken model folders and adapters (see the table below)."""
    root = tmp_path_factory.mktemp("load_errors")
    corpus = root / "corpus.txt"
    corpus.write_text("def load(model, adapter): return model.weights + adapter.weights\n" * 20)
    tok = root / "tok"
    train_bpe([corpus], 300, tok)
    hf = _hf_folder(root / "hf", tok)
    hf48 = _hf_folder(root / "hf48", tok, hidden=48, ffn=96)  # another base model: other sizes
    ck = root / "ck"
    assert main(["convert", str(hf), str(ck), "--to", "lmforge"]) == 0
    # config.json edited after the weights were written: ffn 64 -> 96 (HF folder and lmforge checkpoint)
    hf_bad, ck_bad = root / "hf_bad", root / "ck_bad"
    shutil.copytree(hf, hf_bad)
    _edit_json(hf_bad / "config.json", intermediate_size=96)
    shutil.copytree(ck, ck_bad)
    _edit_json(ck_bad / "config.json", ffn_hidden_size=96)
    for layers in (1, 3):  # num_layers edited: tensors the file lacks, or has beyond the config
        shutil.copytree(ck, root / f"ck_layers{layers}")
        _edit_json(root / f"ck_layers{layers}" / "config.json", num_layers=layers)
    # a LoRA adapter of rank 4 on hf; the same with adapter_config.json saying r=8
    model, _ = load_for_inference(hf, device="cpu", dtype="float32")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    apply_peft(model, "lora", cfg)
    save_adapter(model, "lora", cfg, root / "lora", base_name=str(hf))
    shutil.copytree(root / "lora", root / "lora_r8")
    _edit_json(root / "lora_r8" / "adapter_config.json", r=8)
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "def load("}) + "\n")
    (root / "text.jsonl").write_text(json.dumps({"text": "def load(model): return model\n" * 4}) + "\n")
    (root / "sft.jsonl").write_text(json.dumps({"input": "def load(", "output": "model)"}) + "\n")
    return {"root": root, "hf": hf, "hf48": hf48, "ck": ck, "hf_bad": hf_bad, "ck_bad": ck_bad,
            "lora": root / "lora", "lora_r8": root / "lora_r8", "ck_layers1": root / "ck_layers1",
            "ck_layers3": root / "ck_layers3"}


CONFIG_MISMATCH = ["tensor 'layers.0.mlp.gate_proj.weight' has shape (64, 32) in the file but",
                   "config.json describes (96, 32)", "restore the config.json saved with them"]
RANK_MISMATCH = ["lora_r8/adapter_model.safetensors: tensor 'layers.0.self_attn.q_proj.lora_A.weight' has shape "
                 "(4, 32) in the file but (8, 32) in this model", "r is 8 in", "set r to 4"]
OTHER_BASE = ["lora/adapter_model.safetensors: tensor 'layers.0.self_attn.q_proj.lora_A.weight' has shape (4, 32) in "
              "the file but (4, 48) in this model", "trained on a base model of other sizes", "names {hf}"]
HF_CONFIG = ["hf_bad: tensor 'model.layers.0.mlp.gate_proj.weight' has shape (64, 32) but config.json implies (96, 32)"]
GEN = ["--prompt", "def", "--max-new-tokens", "2", "--device", "cpu"]
EVAL = ["--tasks", "wikitext2", "--task-data", "wikitext2={root}/text.jsonl", "--device", "cpu"]

CASES = {
    # name: (command line, what the one error line says); {x} is the path of models[x]
    "generate, config.json edited": (["generate", "{ck_bad}", *GEN], ["ck_bad/model.safetensors: ", *CONFIG_MISMATCH]),
    "generate, config.json with more layers": (["generate", "{ck_layers3}", *GEN],
                                               ["ck_layers3/model.safetensors: tensor 'layers.2.input_layernorm.weight' "
                                                "(9 in all) is not in the file", "num_layers"]),
    "generate, config.json with fewer layers": (["generate", "{ck_layers1}", *GEN],
                                                ["ck_layers1/model.safetensors: tensor 'layers.1.input_layernorm.weight' "
                                                 "(9 in all) is in the file but not in the model", "num_layers"]),
    "generate, HF config.json edited": (["generate", "{hf_bad}", *GEN], HF_CONFIG),
    "evaluate, config.json edited": (["evaluate", "{ck_bad}", *EVAL, "--output", "{root}/out.json"], CONFIG_MISMATCH),
    "serve, config.json edited": (["serve", "{ck_bad}", "--port", "0", "--device", "cpu"], CONFIG_MISMATCH),
    "finetune, config.json edited": (["finetune", "--model", "{ck_bad}", "--data", "{root}/sft.jsonl", "--method",
                                      "lora", "--out", "{root}/ft", "trainer.accelerator=cpu"], CONFIG_MISMATCH),
    "convert, config.json edited": (["convert", "{ck_bad}", "{root}/conv", "--to", "hf"],
                                    ["ck_bad: tensor 'layers.0.mlp.gate_proj.weight' has shape (64, 32)"]),
    "peft merge, config.json edited": (["peft", "merge", "--model", "{ck_bad}", "--adapter", "{lora}", "--out",
                                        "{root}/merged"], CONFIG_MISMATCH),
    "generate, adapter of another rank": (["generate", "{hf}", "--adapter", "{lora_r8}", *GEN], RANK_MISMATCH),
    "evaluate, adapter of another rank": (["evaluate", "{ck}", "--adapter", "{lora_r8}", *EVAL], RANK_MISMATCH),
    "serve, adapter of another rank": (["serve", "{hf}", "--adapter", "{lora_r8}", "--port", "0", "--device", "cpu"],
                                       RANK_MISMATCH),
    "peft merge, adapter of another rank": (["peft", "merge", "--model", "{hf}", "--adapter", "{lora_r8}", "--out",
                                             "{root}/merged"], RANK_MISMATCH),
    "generate, adapter of another base": (["generate", "{hf48}", "--adapter", "{lora}", *GEN], OTHER_BASE),
    "peft merge, adapter of another base": (["peft", "merge", "--model", "{hf48}", "--adapter", "{lora}", "--out",
                                             "{root}/merged"], OTHER_BASE),
    "generate --input, adapter of another base": (["generate", "{hf48}", "--adapter", "{lora}", "--input",
                                                 "{root}/prompts.jsonl", "--output", "{root}/gen.jsonl",
                                                 "--device", "cpu"], OTHER_BASE),
}


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.mark.parametrize("case", list(CASES))
def test_a_model_that_does_not_fit_is_one_error_line(case, models, capsys):
    argv, expected = CASES[case]
    paths = {k: str(v) for k, v in models.items()}
    before = _files(models["root"])
    capsys.readouterr()
    assert main([a.format(**paths) for a in argv]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err and "size mismatch" not in out + err
    for text in expected:
        assert text.format(**paths) in lines[0], (text, lines[0])
    assert _files(models["root"]) == before  # nothing written, not even a half


def test_the_good_models_load(models, capsys):
    """The table's broken inputs are broken copies of these, which load and run."""
    assert main(["generate", str(models["ck"]), *GEN]) == 0
    assert main(["generate", str(models["hf"]), "--adapter", str(models["lora"]), *GEN]) == 0
