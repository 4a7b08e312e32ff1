"""``lmforge export MODEL OUT --format hf|gguf|nemo``: round trips of tiny models built from config with random
weights (GGUF read back with the gguf package's GGUFReader, .nemo with lmforge's own import), and refusals."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.convert.hf import open_source
from lmforge.convert.export import gguf_tensor_name, rope_unpermute
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import save_model

LLAMA = dict(vocab_size=80, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=56, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu", bias=False,
             position_embedding_type="rope", rotary_base=500000.0, share_embeddings_and_output_weights=False)
GPT = dict(vocab_size=80, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=56,
           max_position_embeddings=64, normalization="layernorm", activation="gelu", bias=True,
           position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)


def _tokenizer_json(folder) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained here on a few lines, with <|endoftext|> as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=70, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40])
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20 + ["the cat sat on the mat"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))


def _checkpoint(tmp_path, style: dict, name: str = "ckpt", **changes):
    cfg = ModelConfig(**{**style, **changes})
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 else 0.0))
    folder = tmp_path / name
    save_model(folder, model.state_dict(), cfg.to_dict())
    _tokenizer_json(folder)
    return folder, dict(open_source(folder).tensors())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_round_trip(tmp_path, capsys, dtype):
    """Tensors under llama.cpp's names (q/k permuted to the interleaved RoPE layout), llama.* metadata and the
    tokenizer, read back with gguf.GGUFReader."""
    import gguf

    folder, ours = _checkpoint(tmp_path, LLAMA)
    out = tmp_path / "model.gguf"
    assert main(["export", str(folder), str(out), "--format", "gguf", "--dtype", dtype]) == 0
    assert '"format": "gguf"' in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (2, 32, 56)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.freq_base") == 500000.0 and field("llama.context_length") == 64
    assert field("llama.rope.dimension_count") == 8
    assert field("general.file_type") == (0 if dtype == "float32" else 1)
    tokens = field("tokenizer.ggml.tokens")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    assert len(tokens) == 80 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[75] == "[PAD75]" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.eos_token_id") == vocab["<|endoftext|>"]
    assert len(field("tokenizer.ggml.merges")) > 0
    got = {t.name: t for t in reader.tensors}
    assert set(got) == {gguf_tensor_name(n) for n in ours}
    assert "blk.1.attn_q.weight" in got and "token_embd.weight" in got and "output.weight" in got
    for name, tensor in ours.items():
        t = got[gguf_tensor_name(name)]
        data = torch.from_numpy(np.array(t.data)).reshape(tuple(tensor.shape))
        if name.endswith("q_proj.weight"):
            data = rope_unpermute(data, 4)
        elif name.endswith("k_proj.weight"):
            data = rope_unpermute(data, 2)
        want = tensor if tensor.dim() == 1 or dtype == "float32" else tensor.half()
        assert data.dtype == (torch.float32 if tensor.dim() == 1 or dtype == "float32" else torch.float16), name
        assert torch.equal(data, want.to(data.dtype)), name
    # the permutation is the one llama.cpp applies (pairs of rotated channels side by side)
    q = ours["layers.0.self_attn.q_proj.weight"]
    q = q if dtype == "float32" else q.half().float()
    permuted = torch.from_numpy(np.array(got["blk.0.attn_q.weight"].data)).float().reshape(q.shape)
    hd = 8
    assert torch.equal(permuted[1], q[hd // 2]) and torch.equal(permuted[0], q[0]) and torch.equal(permuted[2], q[1])


def test_gguf_refuses_other_families(tmp_path, capsys):
    folder, _ = _checkpoint(tmp_path, GPT)
    out = tmp_path / "model.gguf"
    assert main(["export", str(folder), str(out), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "llama.cpp's llama architecture" in err and "gpt2 family" in err and "--format hf" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_nemo_round_trip(tmp_path, capsys, style):
    """A .nemo archive lmforge's own import reads back to equal tensors; its pickle holds plain tensors only."""
    folder, ours = _checkpoint(tmp_path, GPT if style == "gpt" else LLAMA)
    out = tmp_path / "model.nemo"
    assert main(["export", str(folder), str(out), "--format", "nemo"]) == 0
    with tarfile.open(out) as tar:
        names = sorted(m.name for m in tar.getmembers())
        weights = tar.extractfile("./model_weights.ckpt").read()
        config = tar.extractfile("./model_config.yaml").read().decode()
    assert names == ["./model_config.yaml", "./model_weights.ckpt", "./tokenizer.json"]
    state = torch.load(io.BytesIO(weights), weights_only=True)  # nothing but tensors (and None)
    assert all(v is None or isinstance(v, torch.Tensor) for v in state.values())
    assert "model.decoder.layers.1.self_attention.linear_qkv.weight" in state
    assert ("model.output_layer.weight" in state) == (style == "llama")
    assert "mcore_gpt: true" in config and ("fast-swiglu" in config) == (style == "llama")
    back = dict(open_source(out).tensors())
    assert sorted(back) == sorted(ours)
    for name in ours:
        assert torch.equal(back[name], ours[name]), name
    # and through the CLI: .nemo -> lmforge checkpoint, the same tensors again
    assert main(["convert", str(out), str(tmp_path / "again"), "--to", "lmforge", "--no-progress"]) == 0
    again = dict(open_source(tmp_path / "again").tensors())
    assert all(torch.equal(again[n], ours[n]) for n in ours)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_nemo_refuses_what_its_config_cannot_say(tmp_path, capsys):
    folder, _ = _checkpoint(tmp_path, LLAMA, qkv_bias=True)  # Qwen2-style biases on q, k, v only
    out = tmp_path / "model.nemo"
    assert main(["export", str(folder), str(out), "--format", "nemo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: NeMo's model_config.yaml cannot express qkv_bias=True") and "\n" not in err
    assert not out.exists()


def test_hf_export_is_convert_to_hf(tmp_path, capsys):
    import transformers

    folder, ours = _checkpoint(tmp_path, LLAMA)
    out = tmp_path / "hf"
    assert main(["export", str(folder), str(out), "--format", "hf", "--no-progress"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.weight"], ours["layers.1.self_attn.k_proj.weight"])
    assert torch.equal(sd["lm_head.weight"], ours["lm_head.weight"])
    assert (out / "tokenizer.json").is_file()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    folder, _ = _checkpoint(tmp_path, LLAMA)
    out = tmp_path / "model.nemo"
    out.write_bytes(b"old")
    assert main(["export", str(folder), str(out), "--format", "nemo"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert main(["export", str(folder), str(out), "--format", "nemo", "--overwrite"]) == 0
    assert tarfile.is_tarfile(out)
    assert main(["export", str(folder), str(tmp_path / "model.bin"), "--format", "gguf"]) == 2
    assert "name it ....gguf" in capsys.readouterr().err


def test_readme_export_commands_run_verbatim(tmp_path, monkeypatch, capsys):
    """The README's export block, verbatim, on a tiny Llama saved where the block expects a checkpoint."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = text[text.index("## Export:"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and all(c.startswith("lmforge export ") for c in commands)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "tiny_llama" / "checkpoints").mkdir(parents=True)
    _checkpoint(tmp_path / "results" / "tiny_llama" / "checkpoints", LLAMA, name="step_0000030")
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    import gguf

    assert gguf.GGUFReader("tiny.gguf").fields["general.architecture"].contents() == "llama"
    assert (tmp_path / "tiny_hf" / "config.json").is_file() and tarfile.is_tarfile(tmp_path / "tiny.nemo")
