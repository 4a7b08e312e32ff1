"""SFT data: loss masks, templates, chat rendering, truncation policy and packing, token by token."""

import numpy as np
import pytest
import torch

from lmforge.data.sft import (SFTDataConfig, build_sft_dataset, encode_record, encode_records, load_sft_dataset,
                              read_jsonl)
from lmforge.errors import ConfigError, DataError

from tests.finetune.conftest import write_jsonl  # noqa: E402

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def plain(tok, text):
    return tok.backend.encode(text, add_special_tokens=False).ids


def test_input_output_mask_is_the_response_only(sft_tokenizer):
    tok = sft_tokenizer
    s = encode_record({"input": "Which food is red? Answer:", "output": " apple"}, "f:1", tok, SFTDataConfig())
    p, r = plain(tok, "Which food is red? Answer:"), plain(tok, " apple") + [tok.eod_id]
    assert s.ids == p + r
    assert s.mask == [0] * len(p) + [1] * len(r)
    s2 = encode_record({"input": "x", "output": " apple"}, "f:1", tok, SFTDataConfig(train_on_prompt=True))
    assert all(s2.mask)


def test_prompt_template_and_field_names(sft_tokenizer):
    tok = sft_tokenizer
    cfg = SFTDataConfig(prompt_template="Q: {question}\nA:", output_key="answer")
    s = encode_record({"question": "Which food is red?", "answer": " apple"}, "f:1", tok, cfg)
    p = plain(tok, "Q: Which food is red?\nA:")
    assert s.ids[:len(p)] == p and s.mask[:len(p)] == [0] * len(p)
    with pytest.raises(DataError, match=r"f:7.*'question'"):
        encode_record({"input": "x", "answer": "y"}, "f:7", tok, cfg)
    with pytest.raises(ConfigError, match="placeholders"):
        SFTDataConfig(prompt_template="{0}").validate()


def test_bad_records_name_file_and_line(tmp_path, sft_tokenizer):
    tok = sft_tokenizer
    with pytest.raises(DataError, match=r"f:3.*'output'.*output_key"):
        encode_record({"input": "x"}, "f:3", tok, SFTDataConfig())
    with pytest.raises(DataError, match=r"f:4.*empty"):
        encode_record({"input": "x", "output": "  "}, "f:4", tok, SFTDataConfig())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_jsonl(bad)


def test_chat_records_train_only_assistant_turns(sft_tokenizer):
    tok = sft_tokenizer
    rec = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"},
                        {"role": "user", "content": "red?"}, {"role": "assistant", "content": "apple"}]}
    with pytest.raises(DataError, match="chat template"):
        encode_record(rec, "c:1", tok, SFTDataConfig())
    s = encode_record(rec, "c:1", tok, SFTDataConfig(chat_template=CHAT))
    # trim_blocks (as transformers renders) drops the newline after each block tag
    text = "<|user|>hello<|assistant|>there<|endoftext|><|user|>red?<|assistant|>apple<|endoftext|>"
    assert tok.decode(s.ids) == text
    trained = "".join(tok.decode([i]) for i, m in zip(s.ids, s.mask) if m)
    assert trained == "there<|endoftext|>apple<|endoftext|>"


def test_truncation_policy_is_counted(sft_tokenizer):
    tok = sft_tokenizer
    recs = [("f:1", {"input": "Which food is red? Answer:", "output": " apple apple apple apple apple"}),
            ("f:2", {"input": "red", "output": " apple"})]
    from lmforge.data.sft import SFTStats

    stats = SFTStats()
    out = encode_records(recs, tok, SFTDataConfig(truncation="drop"), 12, stats)
    assert len(out) == 1 and stats.dropped == 1 and stats.truncated == 0
    stats = SFTStats()
    out = encode_records(recs, tok, SFTDataConfig(truncation="truncate"), 12, stats)
    assert len(out) == 2 and stats.truncated == 1 and len(out[0].ids) == 12
    stats = SFTStats()
    out = encode_records(recs[:1], tok, SFTDataConfig(), 5, stats)  # prompt alone fills the row
    assert out == [] and stats.no_trained_tokens == 1


def test_packing_rows_token_by_token_and_loss_equals_separate_samples(sft_tokenizer):
    from lmforge.models import ModelConfig, Transformer
    from lmforge.train.objectives import CausalLMLoss

    tok = sft_tokenizer
    recs = [(f"f:{i}", {"input": f"Which food is {c}? Answer:", "output": f" {f}"})
            for i, (c, f) in enumerate([("red", "apple"), ("green", "lime"), ("gold", "honey")])]
    samples = encode_records(recs, tok, SFTDataConfig(), 40)
    total = sum(len(s.ids) for s in samples)
    ds = build_sft_dataset(samples, total + 3, pad_id=tok.eod_id, pack=True, shuffle=False)
    assert len(ds) == 1
    row = ds[0]
    at = 0
    for k, s in enumerate(samples):
        n = len(s.ids)
        assert row["tokens"][at:at + n].tolist() == s.ids
        assert row["positions"][at:at + n].tolist() == list(range(n))
        assert (row["segment_ids"][at:at + n] == k).all()
        assert row["loss_mask"][at:at + n].tolist() == [0] + s.mask[1:]
        at += n
    assert row["loss_mask"][at:].sum() == 0 and (row["segment_ids"][at:] == 3).all()

    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=128, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope", hidden_dropout=0.0, attention_dropout=0.0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    objective = CausalLMLoss(model)
    t = {k: torch.from_numpy(v)[None] for k, v in row.items()}
    packed_sum, packed_n = objective(**t)
    sep_sum, sep_n = 0.0, 0
    for s in samples:
        l, n = objective(torch.tensor([s.ids]), loss_mask=torch.tensor([s.mask]))
        sep_sum, sep_n = sep_sum + float(l), sep_n + n
    assert packed_n == sep_n == sum(sum(s.mask) for s in samples)
    assert abs(float(packed_sum) - sep_sum) < 1e-4


def test_unpacked_rows_pad_after_the_sample(tmp_path, sft_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "Which food is red? Answer:", "output": " apple"}])
    ds = load_sft_dataset(path, sft_tokenizer, SFTDataConfig(), 32, shuffle=False)
    row = ds[0]
    assert set(row) == {"tokens", "loss_mask"}
    n = len(ds.samples[0].ids)
    assert row["tokens"][n:].tolist() == [sft_tokenizer.eod_id] * (32 - n)
    assert row["loss_mask"][n:].sum() == 0 and np.array_equal(row["loss_mask"][:n], ds.samples[0].mask)
