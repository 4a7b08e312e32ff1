"""One prompt, one list of ids: fine-tuning, data preview, generate (one prompt and a file), the server
(completions and chat) and evaluation all tokenize a prompt by the tokenizer's own BOS convention
(lmforge.data.prompts), so a fine-tuned model is served and scored on the inputs it was trained on.
A chat template stored as chat_template.jinja (transformers 5) is read, and carried into checkpoints and
adapter folders."""

import json

import pytest
from fastapi.testclient import TestClient

from lmforge.cli import main
from lmforge.data.prompts import encode_prompt
from lmforge.data.tokenizers import load_tokenizer, train_bpe
from lmforge.serve.engine import Engine

from tests.finetune.conftest import save_tiny_model, write_jsonl

PROMPT = "Which food is red? Answer:"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tokenizer(root, kind: str):
    """``gpt2``: BOS named in tokenizer_config.json (<|endoftext|>) but never added (GPT-2's convention);
    ``llama``: the post-processor puts <s> first; ``explicit``: add_bos_token=true with no post-processor BOS."""
    from tokenizers import processors

    corpus = root / "corpus.txt"
    corpus.write_text("Which food is red? Answer: apple. user assistant system hello there\n" * 30)
    tok = train_bpe([corpus], 300, root / "train")
    if kind == "gpt2":
        tok.config["bos_token"] = "<|endoftext|>"
    else:
        tok.backend.add_special_tokens(["<s>"])
        tok.config["bos_token"] = "<s>"
        if kind == "llama":
            bos = tok.backend.token_to_id("<s>")
            tok.backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                       special_tokens=[("<s>", bos)])
        else:
            tok.config["add_bos_token"] = True
    folder = root / "tok"
    tok.save(folder)
    return folder


@pytest.mark.parametrize("kind,bos_first", [("gpt2", False), ("llama", True), ("explicit", True)])
def test_one_prompt_has_the_same_ids_on_every_path(tmp_path, monkeypatch, capsys, kind, bos_first):
    import lmforge.data.sft as sft
    from lmforge.data.sft import SFTDataConfig, encode_record
    from lmforge.eval.scorer import Scorer
    from lmforge.open import load_for_inference
    from lmforge.serve.client import AsyncEngineClient
    from lmforge.serve.engine import engine_from_checkpoint
    from lmforge.serve.server import build_app

    tok = load_tokenizer(make_tokenizer(tmp_path, kind))
    ckpt = save_tiny_model(tmp_path / "model", tok)
    want = encode_prompt(tok, PROMPT)
    assert (want[0] == tok.bos_id) == bos_first and want.count(tok.bos_id) == int(bos_first)
    seen: dict[str, list] = {}

    # fine-tuning
    s = encode_record({"input": PROMPT, "output": " apple"}, "t:1", tok, SFTDataConfig())
    seen["finetune"] = s.ids[:s.prompt_len]

    # data preview
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": PROMPT, "output": " apple"}])
    encode_records = sft.encode_records

    def recording(*args, **kwargs):
        out = encode_records(*args, **kwargs)
        seen["preview"] = out[0].ids[:out[0].prompt_len]
        return out

    monkeypatch.setattr(sft, "encode_records", recording)
    assert main(["data", "preview", data, "--tokenizer", str(ckpt)]) == 0

    # generate: one prompt, then a file; the engine records what it is given
    added = []
    add_request = Engine.add_request
    monkeypatch.setattr(Engine, "add_request",
                        lambda self, rid, ids, params, adapter=None: (added.append(list(ids)),
                                                                      add_request(self, rid, ids, params, adapter))[1])
    assert main(["generate", ckpt, "--prompt", PROMPT, "--max-new-tokens", "2", "--greedy"]) == 0
    seen["generate --prompt"] = added.pop()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPT}])
    assert main(["generate", ckpt, "--input", prompts, "--output", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "2"]) == 0
    seen["generate --input"] = added.pop()

    # the server
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=2)
    with TestClient(build_app(AsyncEngineClient(engine, "m"))) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text
        seen["serve"] = added.pop()
        assert r.json()["usage"]["prompt_tokens"] == len(want)

    # evaluation
    model, etok = load_for_inference(ckpt, device="cpu", dtype="float32")
    scorer = Scorer(model, etok, max_length=64)
    seen["evaluate"] = scorer.encode(PROMPT)
    seen["evaluate pair"] = scorer.encode_pair(PROMPT, " apple")[0]

    capsys.readouterr()
    assert {path: ids for path, ids in seen.items() if ids != want} == {}, want


def test_chat_prompt_ids_are_those_fine_tuning_trained_on(tmp_path, monkeypatch):
    """A chat template in chat_template.jinja (no chat_template in tokenizer_config.json) is used by
    fine-tuning and the server alike, and the served prompt is the trained conversation up to the answer."""
    from lmforge.data.sft import SFTDataConfig, encode_record
    from lmforge.serve.client import AsyncEngineClient
    from lmforge.serve.engine import engine_from_checkpoint
    from lmforge.serve.server import build_app

    folder = make_tokenizer(tmp_path, "llama")
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    tok = load_tokenizer(folder)
    messages = [{"role": "user", "content": "Which food is red?"}, {"role": "assistant", "content": "apple"}]
    s = encode_record({"messages": messages}, "t:1", tok, SFTDataConfig())
    trained_prompt = s.ids[:s.prompt_len]
    assert trained_prompt[0] == tok.bos_id and trained_prompt.count(tok.bos_id) == 1

    ckpt = save_tiny_model(tmp_path / "model", tok)  # the template travels with the saved tokenizer
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    added = []
    add_request = Engine.add_request
    monkeypatch.setattr(Engine, "add_request",
                        lambda self, rid, ids, params, adapter=None: (added.append(list(ids)),
                                                                      add_request(self, rid, ids, params, adapter))[1])
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=2)
    with TestClient(build_app(AsyncEngineClient(engine, "m"))) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages[:1], "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert added == [trained_prompt]

