"""`lmforge peft merge --model HF_FOLDER` takes a Hugging Face folder, as every other command does: the merged
checkpoint gives the logits of the base with the adapter applied, keeps the base's stored dtype and its
family (so `convert --to hf` exports it back), and carries the tokenizer."""

import json

import torch
import transformers
from safetensors import safe_open

from lmforge.cli import main
from lmforge.data.tokenizers import train_bpe
from lmforge.open import load_for_inference
from lmforge.peft import LoRAConfig, adapter_for_inference, apply_peft, save_adapter


def hf_folder(root):
    """A tiny HF Llama folder (bf16 safetensors, random weights) with a BPE tokenizer of matching vocabulary."""
    corpus = root / "corpus.txt"
    corpus.write_text("def merge(model, adapter): return model + adapter\n" * 20)
    folder = root / "hf"
    tok = train_bpe([corpus], 280, folder)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


def logits(model):
    x = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.float()(x)


def test_peft_merge_takes_an_hf_folder(tmp_path, capsys):
    base = hf_folder(tmp_path)
    model, _ = load_for_inference(base, device="cpu", dtype="float32")
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_peft(model, "lora", cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_adapter(model, "lora", cfg, tmp_path / "adapter", base_name=str(base))

    out = tmp_path / "merged"
    assert main(["peft", "merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    merged, tok = load_for_inference(out, device="cpu", dtype="float32")
    plain, _ = load_for_inference(base, device="cpu", dtype="float32")
    want = logits(adapter_for_inference(plain, tmp_path / "adapter"))
    assert (logits(load_for_inference(base, device="cpu", dtype="float32")[0]) - want).abs().max() > 1e-3
    assert (logits(merged) - want).abs().max() < 0.05  # stored in bf16, like the base
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "llama" and "model" in config
    assert tok.vocab_size == merged.cfg.vocab_size
    # the merged checkpoint goes back to Hugging Face as the base's family
    assert main(["convert", str(out), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "llama"
