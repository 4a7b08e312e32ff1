"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn on 127.0.0.1."""

import asyncio
import inspect
import json
import socket
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn

from lmforge.data.tokenizers import load_tokenizer, train_bpe
from lmforge.models import ModelConfig, Transformer
from lmforge.models.generate import generate
from lmforge.serve.client import AsyncEngineClient
from lmforge.serve.engine import EngineBusyError, SamplingParams, engine_from_checkpoint
from lmforge.serve.server import build_app
from lmforge.train.checkpoint import save_model
from tests.conftest import load_benchmark

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
API_KEY = "sk-test-key"
MODEL = "tiny"


def make_checkpoint(root, chat_template: bool):
    """A tiny Llama-style model with random weights and a BPE tokenizer trained on stdlib source."""
    import difflib
    import textwrap

    text = root / "corpus.txt"
    text.write_text(inspect.getsource(textwrap) + inspect.getsource(difflib))
    tok = train_bpe([text], 300, root / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=128, normalization="rmsnorm",
                      activation="swiglu", bias=False, position_embedding_type="rope",
                      share_embeddings_and_output_weights=False, init_method_std=0.4)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    folder = root / "ckpt"
    save_model(folder, model.state_dict(), cfg.to_dict(), tokenizer=tok)
    if chat_template:
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = TEMPLATE
        config_path.write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(folder, api_key=None, max_batch_size=8, loras=None, **limits):
    engine = engine_from_checkpoint(folder, device="cpu", dtype="float32", max_batch_size=max_batch_size, loras=loras)
    client = AsyncEngineClient(engine, MODEL)
    app = build_app(client, api_key=api_key, **limits)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/v1", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("serve"), chat_template=True)
    with running_server(folder, api_key=API_KEY, max_prompt_tokens=100, max_tokens_limit=64) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0], api_key=API_KEY, max_retries=0, timeout=60)


def reference(engine, prompt_ids, n):
    """Greedy decoding one request at a time (lmforge.models.generate), as text."""
    ids = generate(engine.model, prompt_ids, n, greedy=True, eod_id=engine.tokenizer.eod_id)
    return engine.tokenizer.decode(ids, skip_special_tokens=True), ids


PROMPTS = ["def wrap(text, width=70", "import re", "class Sequence", "    return", "x = 1\n", "# comment"]


def test_models_and_health(served, client):
    import httpx

    url, engine = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(url.rsplit("/v1", 1)[0] + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_completion_equals_greedy_reference(served, client):
    engine = served[1]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text, ids = reference(engine, engine.tokenizer.encode(PROMPTS[0]), 12)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[0]))
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # several prompts and n samples in one request
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=5, temperature=0, n=2)
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == reference(engine, engine.tokenizer.encode(PROMPTS[0]), 5)[0]
    assert r.choices[2].text == reference(engine, engine.tokenizer.encode(PROMPTS[1]), 5)[0]


def test_chat_uses_the_template(served, client):
    engine = served[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def main():"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    rendered = "<|system|>be brief\n<|user|>def main():\n<|assistant|>"
    prompt_ids = engine.tokenizer.encode(rendered)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(engine, prompt_ids, 10)[0]
    # streamed chat gives the same text
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == r.choices[0].message.content
    assert finish == r.choices[0].finish_reason and usage.completion_tokens == r.usage.completion_tokens


def test_streaming_completion(served, client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                            stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_sequences(served, client):
    engine = served[1]
    text, _ = reference(engine, engine.tokenizer.encode(PROMPTS[0]), 24)
    stop = text[5:8]
    assert len(stop) == 3 and text.index(stop) >= 1
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "@@@"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            got, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert got == text[: text.index(stop)]
        assert finish == "stop"


def test_logprobs(served, client):
    engine = served[1]
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    _, ids = reference(engine, prompt_ids, 4)
    with torch.no_grad():
        full = engine.model(torch.tensor([prompt_ids + ids[:3]]))[0].float().log_softmax(-1)
    for i, value in enumerate(lp.token_logprobs):
        row = full[len(prompt_ids) - 1 + i]
        assert value == pytest.approx(float(row.max()), abs=1e-4)  # greedy: the most likely token
        assert len(lp.top_logprobs[i]) <= 3 and max(lp.top_logprobs[i].values()) == pytest.approx(value, abs=1e-4)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5) for c in content)


def test_echo_scores_the_prompt(served, client):
    """echo + logprobs + max_tokens=0 (how lm-evaluation-harness scores a served model): the prompt's tokens
    with their log-probabilities under a full forward; with max_tokens > 0 the completion follows."""
    engine = served[1]
    prompt = PROMPTS[0]
    ids = engine.tokenizer.encode(prompt)
    with torch.no_grad():
        full = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(full[i - 1, ids[i]]), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(full[i - 1].max()), abs=1e-4)
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    # echo with a completion: prompt + the greedy continuation, logprobs of both parts in order
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=3, echo=True, logprobs=0, temperature=0,
                                  extra_body={"ignore_eos": True})
    text, new = reference(engine, ids, 3)
    assert r.choices[0].text == engine.tokenizer.decode(ids) + text
    assert len(r.choices[0].logprobs.tokens) == len(ids) + 3
    assert r.choices[0].logprobs.token_logprobs[1] == pytest.approx(float(full[0, ids[1]]), abs=1e-4)
    # streamed echo gives the same text; without logprobs echo just prepends the prompt
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == prompt + text
    # max_tokens=0 needs echo
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)


def test_invalid_requests_get_openai_error_bodies(served, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature" and "temperature" in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=65)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens="many")
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="def " * 101, max_tokens=4)
    assert e.value.status_code == 413 and "at most 100" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_wrong_api_key_is_401(served):
    bad = openai.OpenAI(base_url=served[0], api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_64_concurrent_greedy_requests_equal_one_at_a_time(served):
    url, engine = served
    batch_sizes = []
    step = engine.step

    def recording_step():  # the engine thread calls this: record how many sequences ran together
        batch_sizes.append(len(engine.running) + len(engine.waiting))
        return step()

    engine.step = recording_step
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) + str(i) for i in range(64)]
    lengths = [4 + i % 9 for i in range(64)]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*[aclient.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                                          for p, n in zip(prompts, lengths)])
        finally:
            await aclient.close()

    try:
        results = asyncio.run(run_all())
    finally:
        del engine.step
    assert max(batch_sizes) > 8  # requests queued beyond the batch of 8: continuous batching did the work
    for p, n, r in zip(prompts, lengths, results):
        assert r.choices[0].text == reference(engine, engine.tokenizer.encode(p), n)[0], p


def test_metrics_in_prometheus_text(served):
    """/metrics (behind the key) counts what the engine did: finished requests' TTFT and TPOT histograms,
    generated tokens, KV blocks (all given back once idle)."""
    import httpx

    url, engine = served
    base = url[: -len("/v1")]
    assert httpx.get(f"{base}/metrics").status_code == 401
    before = engine.metrics.ttft.count
    client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
    for n in (3, 5):
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=n, temperature=0)
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    label = f'{{model_name="{MODEL}"}}'
    assert values[f"lmforge_time_to_first_token_seconds_count{label}"] == before + 2
    assert values[f"lmforge_time_per_output_token_seconds_count{label}"] >= 2
    assert values[f'lmforge_time_to_first_token_seconds_bucket{{model_name="{MODEL}",le="+Inf"}}'] == before + 2
    assert values[f"lmforge_generation_tokens_total{label}"] >= 8
    assert values[f"lmforge_kv_blocks_used{label}"] == 0 and values[f"lmforge_requests_running{label}"] == 0
    assert values[f"lmforge_kv_blocks_total{label}"] == engine.cache.num_blocks - 1


def test_chat_without_template_is_400(tmp_path):
    folder = make_checkpoint(tmp_path, chat_template=False)
    with running_server(folder) as (url, _):
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        # no --api-key: any key (or none) is accepted
        assert c.completions.create(model=MODEL, prompt="a", max_tokens=1).usage.completion_tokens == 1


def test_shutdown_finishes_running_requests(tmp_path):
    folder = make_checkpoint(tmp_path, chat_template=False)
    engine = engine_from_checkpoint(folder, device="cpu", dtype="float32", max_batch_size=2)
    tok = load_tokenizer(folder)

    async def main():
        client = AsyncEngineClient(engine, MODEL)
        await client.start()
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        outs = []

        async def consume():
            async for o in client.generate(tok.encode("def f"), params):
                outs.append(o)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.005)
        await client.shutdown()  # waits for the running request
        await task
        with pytest.raises(EngineBusyError):
            async for _ in client.generate(tok.encode("x"), params):
                pass
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in outs) == 40


def test_serve_load_online_mode_counts_every_token_and_refusal(served):
    """benchmarks/serve_load.py's online mode (Poisson arrivals, streamed token-id prompts over httpx) against this
    server: every requested token streams back and is counted, latencies are measured; requests the server
    refuses (a wrong API key) are counted as failed, not crashed on."""
    bench = load_benchmark("serve_load")
    url, engine = served
    argv = ["--url", url, "--model", MODEL, "--api-key", API_KEY, "--rate", "200", "--num-requests", "5",
            "--prompt-len", "3", "10", "--output-len", "2", "6", "--vocab-size", str(engine.tokenizer.vocab_size)]
    a = bench.parse_args(argv)
    (row,) = bench.online(a)
    assert row["requests"] == 5 and row["failed"] == 0
    assert row["output_tokens"] == sum(n for _, n in bench.workload(a, a.vocab_size))
    assert 0 < row["ttft_p50"] <= row["ttft_p99"] and 0 < row["tpot_p50"] <= row["tpot_p99"]
    (refused,) = bench.online(bench.parse_args(argv[:4] + ["--api-key", "wrong"] + argv[6:]))
    assert refused["failed"] == 5 and refused["output_tokens"] == 0


@pytest.fixture(scope="module")
def special_stop(tmp_path_factory):
    """A checkpoint whose tokenizer marks a token the model generates greedily after PROMPTS[0] as special (same
    id): (folder, the token's text, the reference ids before it, the prompt's ids)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("special_stop"), chat_template=False)
    engine = engine_from_checkpoint(folder, device="cpu", dtype="float32")
    tok = engine.tokenizer
    prompt = tok.encode(PROMPTS[0])
    ids = generate(engine.model, prompt, 24, greedy=True, eod_id=tok.eod_id)
    k, t = next((k, t) for k, t in enumerate(ids) if k >= 2 and t not in ids[:k]
                and tok.decode([t]) == tok.id_to_token(t) and tok.id_to_token(t).isalpha())
    text = tok.id_to_token(t)
    config = json.loads((folder / "tokenizer.json").read_text())
    config["added_tokens"].append({"id": t, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                                   "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(config))
    special = load_tokenizer(folder)
    assert special.encode(PROMPTS[0]) == prompt and special.token_to_id(text) == t
    assert special.decode([t]) == text and special.decode([t], skip_special_tokens=True) == ""
    return folder, text, ids[:k], prompt


def test_a_stop_string_that_is_a_special_token_stops_the_engine_there(special_stop):
    """The engine matches stop strings on text decoded without special tokens; one that is a special token
    (``<|eot_id|>``) stops generation as that token does."""
    folder, text, before, prompt = special_stop
    engine = engine_from_checkpoint(folder, device="cpu", dtype="float32")
    (got,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=[text]))
    assert got == before
    (plain,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))
    assert len(plain) > len(before) + 1  # without the stop string it goes on past the token


def test_a_special_token_stop_string_stops_a_served_completion(special_stop):
    folder, text, before, _ = special_stop
    with running_server(folder) as (url, engine):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        for stream in (False, True):
            r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[text],
                                          stream=stream)
            if stream:
                chunks = list(r)
                got, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
            else:
                got, finish = r.choices[0].text, r.choices[0].finish_reason
                assert r.usage.completion_tokens == len(before) + 1  # the stop token counts, as EOS does
            assert (got, finish) == (engine.tokenizer.decode(before, skip_special_tokens=True), "stop")
