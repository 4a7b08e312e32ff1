"""Conversion plumbing: CLI, carried files, shards, load_for_inference of HF folders, bad input."""

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.cli import main
from lmforge.convert.hf import convert
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.generate import generate
from lmforge.open import load_for_inference

V = 97
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def make_hf(folder, tied=False, layers=2):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=88, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT, "eos_token": "t2"}))
    (folder / "chat_template.jinja").write_text(CHAT)
    return model


def test_cli_round_trip_carries_files_and_shards(tmp_path, capsys):
    make_hf(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "lmforge", "--no-progress",
                 "--max-shard-size", "20KB"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["source_format"] == "hf" and summary["family"] == "llama"
    ours = tmp_path / "ours"
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (ours / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert main(["convert", str(ours), str(tmp_path / "back"), "--to", "hf", "--no-progress"]) == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["architectures"] == ["LlamaForCausalLM"] and back["eos_token_id"] == 2
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == CHAT
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert isinstance(reloaded, transformers.LlamaForCausalLM)


def test_load_for_inference_reads_hf_folder_and_lmforge_checkpoint(tmp_path):
    hf_model = make_hf(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours", to="lmforge", progress=False)
    ids = torch.randint(0, V, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model(ids).logits
    for folder in (tmp_path / "hf", tmp_path / "ours"):
        model, tok = load_for_inference(folder, device="cpu", dtype="float32")
        with torch.no_grad():
            assert (model(ids) - expected).abs().max().item() < 1e-4
        assert tok.encode("t5 t7") == [5, 7]
        assert len(generate(model, [5, 7], max_new_tokens=3, greedy=True)) == 3


def test_lmforge_pretrained_checkpoint_exports_to_hf(tmp_path):
    """A checkpoint written by training (no family recorded) exports by its guessed family."""
    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.checkpoint import save_model

    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=40,
                      max_position_embeddings=32)  # GPT style: learned positions, exact GELU, biases, tied
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_model(tmp_path / "ckpt", model.state_dict(), cfg.to_dict())
    summary = convert(tmp_path / "ckpt", tmp_path / "hf", to="hf", progress=False)
    assert summary["family"] == "gpt2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids)).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_architecture_names_supported(tmp_path):
    make_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(model_type="bert", architectures=["BertModel"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model_type='bert'.*supported: llama.*mistral"):
        convert(tmp_path / "hf", tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    make_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 90
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight.*\(88, 48\).*\(90, 48\)"):
        convert(tmp_path / "hf", tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary left either


def test_missing_shard_and_half_download(tmp_path):
    make_hf(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "sharded", to="lmforge", progress=False, max_shard_bytes=20_000)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing"):
        convert(tmp_path / "sharded", tmp_path / "out", to="hf", progress=False)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert(tmp_path / "hf", tmp_path / "out", to="lmforge", progress=False)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="interrupted"):
        load_for_inference(tmp_path / "hf", device="cpu")
    assert not (tmp_path / "out").exists()


def test_extra_layers_in_weights_are_reported(tmp_path):
    make_hf(tmp_path / "hf", layers=3)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.2\..*not used"):
        convert(tmp_path / "hf", tmp_path / "out", to="lmforge", progress=False)


def test_unrepresentable_config_names_field(tmp_path):
    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.checkpoint import save_model

    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=40,
                      max_position_embeddings=32, bias=False)
    save_model(tmp_path / "ckpt", Transformer(cfg).state_dict(), cfg.to_dict())
    with pytest.raises(ConfigError, match=r"model\.bias=False cannot be represented as an HF GPT2LMHeadModel"):
        convert(tmp_path / "ckpt", tmp_path / "out", to="hf", progress=False)
    hf_cfg = transformers.MistralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=40).to_dict()
    hf_cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ConfigError, match="yarn"):
        convert(tmp_path / "hf", tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_errors(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and "\n" not in err
    make_hf(tmp_path / "hf")
    (tmp_path / "exists").mkdir()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "exists"), "--to", "lmforge"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_training_runs_results_folder_converts_its_newest_checkpoint(tiny_corpus, tmp_path):
    """`lmforge convert RESULTS_DIR out --to hf` takes the run's newest complete checkpoint (what a pipeline's
    conversion stage needs: it cannot know the step folder's name before training has run)."""
    from lmforge.config import load_config
    from lmforge.open import load_for_inference
    from lmforge.train.pretrain import run
    from tests.conftest import tiny_overrides

    run(load_config("tiny/llama", tiny_overrides(tiny_corpus, tmp_path / "run", **{"trainer.max_steps": 4})))
    summary = convert(tmp_path / "run", tmp_path / "hf", to="hf", progress=False)
    assert summary["family"] == "llama"
    trained, _ = load_for_inference(tmp_path / "run" / "checkpoints" / "step_0000004", device="cpu", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, trained.cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - trained(ids)).abs().max().item() < 1e-4
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        convert(tmp_path / "empty", tmp_path / "hf2", to="hf", progress=False)
