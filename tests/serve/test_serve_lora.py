"""LoRA adapters selected per request: the engine mixes adapters in one batch, and the server maps an
OpenAI request's ``model`` to an adapter (``lmforge serve --lora NAME=DIR``)."""

import asyncio

import openai
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.models.generate import generate
from lmforge.open import load_for_inference
from lmforge.peft import LoRAConfig, apply_adapter, apply_peft, save_adapter
from lmforge.serve.client import AsyncEngineClient
from lmforge.serve.engine import Engine, InvalidRequestError, SamplingParams, engine_from_checkpoint
from tests.serve.test_serve_server import MODEL, make_checkpoint, running_server

ADAPTERS = {"sql": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "chat": LoRAConfig(r=8, lora_alpha=8, target_modules=["all-linear"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_lora")
    ckpt = make_checkpoint(root, chat_template=False)
    folders = {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        model, _ = load_for_inference(ckpt, device="cpu", dtype="float32")
        apply_peft(model, "lora", cfg)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():  # B is zero after init: give every adapter a real effect
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        folders[name] = save_adapter(model, "lora", cfg, root / name)
    return ckpt, folders


def reference_model(ckpt, folder):
    """The base model, or the base with one adapter applied (unmerged), for one-request greedy decoding."""
    model, tok = load_for_inference(ckpt, device="cpu", dtype="float32")
    if folder is not None:
        model = apply_adapter(model, folder)
    return model.eval(), tok


def test_engine_mixes_adapters_in_one_batch(setup):
    ckpt, folders = setup
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=3, loras=folders)
    tok = engine.tokenizer
    texts = ["def wrap(text", "import re", "class Sequence", "    return", "x = 1\n", "# comment", "for i in"]
    choice = [None, "sql", "chat", "sql", None, "chat", "chat"]
    prompts = [tok.encode(t) for t in texts]
    ids = [f"r{i}" for i in range(len(texts))]
    for rid, prompt, adapter in zip(ids, prompts, choice):  # 7 requests through 3 slots: continuous batching
        engine.add_request(rid, prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                           adapter=adapter)
    got = {rid: [] for rid in ids}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
    refs = {name: reference_model(ckpt, folders.get(name))[0] for name in (None, "sql", "chat")}
    for rid, prompt, adapter in zip(ids, prompts, choice):
        assert got[rid] == generate(refs[adapter], prompt, 10, greedy=True), (rid, adapter)
    # the adapters matter: the same prompt decodes differently under each
    outs = {a: generate(refs[a], prompts[0], 10, greedy=True) for a in refs}
    assert len({tuple(v) for v in outs.values()}) == 3


def test_prefix_cache_keeps_adapters_apart(setup):
    """One prompt under the base model, each adapter, then the base again, one after another: only the second base
    request takes the cached prefix blocks (the adapter is part of a block's key), and every request gets the
    greedy tokens of its own model."""
    ckpt, folders = setup
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=2, loras=folders,
                                    block_size=4)
    prompt = engine.tokenizer.encode("def wrap(text, width=70, **kwargs):")
    assert len(prompt) > 8
    refs = {name: reference_model(ckpt, folders.get(name))[0] for name in (None, "sql", "chat")}
    for i, adapter in enumerate([None, "sql", "chat", None]):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                           adapter=adapter)
        tokens, final = [], None
        while engine.has_work():
            for out in engine.step():
                tokens += out.token_ids
                final = out if out.finished else final
        assert tokens == generate(refs[adapter], prompt, 6, greedy=True), (i, adapter)
        cached = (len(prompt) - 1) // 4 * 4 if i == 3 else 0
        assert final.metrics.cached_tokens == cached, (i, adapter, final.metrics)


def test_engine_refuses_unknown_adapter(setup):
    ckpt, folders = setup
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=2, loras=folders)
    with pytest.raises(InvalidRequestError, match="'nope' is not loaded; loaded adapters: sql, chat"):
        engine.add_request("a", [1, 2], SamplingParams(), adapter="nope")
    plain = Engine(reference_model(ckpt, None)[0], None)
    with pytest.raises(InvalidRequestError, match=r"loaded adapters: \(none\)"):
        plain.add_request("a", [1, 2], SamplingParams(), adapter="sql")


def test_server_routes_model_names_to_adapters(setup):
    ckpt, folders = setup
    with running_server(ckpt, max_batch_size=4, loras=folders) as (url, engine):
        sync = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        cards = {m.id: m for m in sync.models.list().data}
        assert list(cards) == [MODEL, "sql", "chat"]
        assert cards["sql"].model_extra["parent"] == MODEL and "parent" not in (cards[MODEL].model_extra or {})
        with pytest.raises(openai.NotFoundError) as e:
            sync.completions.create(model="nope", prompt="x", max_tokens=2)
        assert "'tiny', 'sql', 'chat'" in e.value.body["message"]

        prompt = "def wrap(text, width=70"
        names = [MODEL, "sql", "chat"] * 4

        async def ask_all():
            client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
            return await asyncio.gather(*(client.completions.create(model=n, prompt=prompt, max_tokens=8,
                                                                    temperature=0) for n in names))

        replies = asyncio.run(ask_all())
        tok = engine.tokenizer
        for name, r in zip(names, replies):
            model, _ = reference_model(ckpt, folders.get(name))
            ids = generate(model, tok.encode(prompt), 8, greedy=True, eod_id=tok.eod_id)
            assert r.model == name
            assert r.choices[0].text == tok.decode(ids, skip_special_tokens=True), name


def test_adapter_name_must_differ_from_the_model_name(setup):
    ckpt, folders = setup
    engine = engine_from_checkpoint(ckpt, device="cpu", dtype="float32", max_batch_size=2, loras={"sql": folders["sql"]})
    with pytest.raises(ConfigError, match="also the served model's name"):
        AsyncEngineClient(engine, "sql")


@pytest.mark.parametrize("arg, message", [("sql", "write NAME=DIR"), ("=dir", "write NAME=DIR"),
                                          ("dora=/nonexistent/adapter", "adapter_config.json")])
def test_serve_lora_argument_errors_are_one_line(setup, capsys, arg, message):
    ckpt, _ = setup
    assert main(["serve", str(ckpt), "--lora", arg, "--port", "1"]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_file_lines_pick_their_adapter(setup, tmp_path, capsys):
    import json

    ckpt, folders = setup
    lines = [{"id": "a", "prompt": "import re"}, {"id": "b", "prompt": "import re", "adapter": "sql"},
             {"id": "c", "prompt": "class Sequence", "adapter": "chat"}]
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    args = ["generate", str(ckpt), "--input", str(inp), "--output", str(out), "--greedy", "--max-new-tokens", "6",
            "--device", "cpu", "--dtype", "float32", "--lora", f"sql={folders['sql']}", "--lora", f"chat={folders['chat']}"]
    assert main(args) == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for line in lines:
        model, tok = reference_model(ckpt, folders.get(line.get("adapter")))
        ids = generate(model, tok.encode(line["prompt"]), 6, greedy=True, eod_id=tok.eod_id)
        assert got[line["id"]]["completion"] == tok.decode(ids, skip_special_tokens=True), line
        assert got[line["id"]].get("adapter") == line.get("adapter")
    # an unknown adapter name is one line naming the file and the line id
    inp.write_text(json.dumps({"id": "z", "prompt": "x", "adapter": "nope"}) + "\n")
    assert main(args[:5] + [str(tmp_path / "out2.jsonl")] + args[6:]) == 2
    err = capsys.readouterr().err
    assert 'prompts.jsonl:1 (id "z")' in err and "'nope' is not loaded" in err and "Traceback" not in err
    # --lora with a single --prompt is refused (lines name adapters)
    assert main(["generate", str(ckpt), "--prompt", "x", "--lora", f"sql={folders['sql']}"]) == 2
    assert "--lora goes with --input" in capsys.readouterr().err
