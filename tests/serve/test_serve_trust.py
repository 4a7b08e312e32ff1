"""The server never dies: sampling values are validated like OpenAI's and cannot overflow, one failing request
leaves the others running, big bodies are refused before parsing, prompts are tokenized off the event loop,
and a client that leaves has its request aborted in the engine."""

import asyncio
import json
import math
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from lmforge.models.generate import generate
from lmforge.serve.client import AsyncEngineClient
from lmforge.serve.engine import (InvalidRequestError, RequestFailedError, SamplingParams, engine_from_checkpoint,
                                  process_logits)
from lmforge.serve.server import build_app

from tests.serve.test_serve_server import free_port, make_checkpoint

MODEL = "tiny"


@contextmanager
def serving(engine, **app_kwargs):
    """uvicorn on 127.0.0.1 over ``engine``; yields (base url, port, client)."""
    client = AsyncEngineClient(engine, MODEL)
    app = build_app(client, **app_kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", port, client
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition, what: str, limit: float = 30.0) -> None:
    deadline = time.time() + limit
    while not condition():
        assert time.time() < deadline, f"never happened: {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("trust"), chat_template=True)


def new_engine(folder, **kw):
    return engine_from_checkpoint(folder, device="cpu", dtype="float32", max_batch_size=kw.pop("max_batch_size", 4),
                                  **kw)


@pytest.mark.parametrize("field,value,param", [
    ("temperature", 2.5, "temperature"), ("temperature", float("nan"), "temperature"),
    ("temperature", float("inf"), "temperature"), ("top_p", 0.0, "top_p"), ("top_p", float("nan"), "top_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("repetition_penalty", float("inf"), "repetition_penalty"),
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3.0, "frequency_penalty"),
    ("seed", 2 ** 70, "seed"), ("seed", -2 ** 64, "seed"), ("top_k", -1, "top_k"),
])
def test_sampling_values_are_validated_like_openai(field, value, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.param == param and field in str(e.value)
    SamplingParams(temperature=2.0, presence_penalty=-2.0, frequency_penalty=2.0, seed=2 ** 63 - 1,
                   repetition_penalty=1e-40, top_p=1.0).validate()  # the edges are accepted


def test_process_logits_cannot_overflow():
    logits = torch.randn(3, 50) * 10
    histories = [([1, 2, 3], [4, 5]), ([7, 8], [9]), ([1], [])]
    params = [SamplingParams(temperature=1.0, repetition_penalty=1e-40),
              SamplingParams(temperature=1e-38, top_p=0.9),  # below MIN_TEMPERATURE: greedy
              SamplingParams(temperature=2e-5, top_k=5, min_p=0.1)]
    out = process_logits(logits, params, histories)
    assert not out.isnan().any()
    assert not out.isposinf().any()
    for row in out:
        probs = row.softmax(-1)
        assert torch.isfinite(probs).all() and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    assert params[1].greedy and not params[2].greedy


def test_tiny_temperature_and_repetition_penalty_keep_the_server_alive(folder):
    engine = new_engine(folder)
    with serving(engine) as (base, _, _client):
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        ids = engine.tokenizer.encode("import re")
        want = engine.tokenizer.decode(generate(engine.model, ids, 6, greedy=True, eod_id=engine.tokenizer.eod_id),
                                       skip_special_tokens=True)
        r = c.completions.create(model=MODEL, prompt="import re", max_tokens=6, temperature=1e-38)
        assert r.choices[0].text == want  # as greedy
        r = c.completions.create(model=MODEL, prompt="import re", max_tokens=6, temperature=1.0, seed=3,
                                 extra_body={"repetition_penalty": 1e-40})
        assert r.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt="import re", max_tokens=2, seed=2 ** 70)
        assert e.value.status_code == 400 and e.value.body["param"] == "seed"
        assert httpx.get(base + "/health").status_code == 200
        r = c.completions.create(model=MODEL, prompt="import re", max_tokens=6, temperature=0)
        assert r.choices[0].text == want


def test_one_failing_request_leaves_the_others_running(folder):
    """A request whose prefill raises, one whose logits are NaN, and a failed decode step: each gets an
    error; the other requests finish, and the engine serves later ones."""
    engine = new_engine(folder)
    tok = engine.tokenizer
    poison = tok.encode("POISON")
    prefill, launch = engine.runner.prefill, engine.runner.launch_decode
    nan_ids: set[str] = set()
    fail_decode = threading.Event()

    def bad_prefill(chunks):
        if any(s.prompt_ids == poison for s, _, _ in chunks):
            raise RuntimeError("out of memory (simulated)")
        return prefill(chunks)

    def bad_launch(seqs, greedy_only):
        if fail_decode.is_set():
            fail_decode.clear()
            raise RuntimeError("device error (simulated)")
        return launch(seqs, greedy_only)

    import lmforge.serve.sampler as engine_mod

    real = engine_mod.process_logits

    def nan_logits(logits, params, histories):
        out = real(logits, params, histories)
        for b, p in enumerate(params):
            if p.seed == 666:
                out[b] = float("nan")
        return out

    engine.runner.prefill, engine.runner.launch_decode = bad_prefill, bad_launch
    engine_mod.process_logits = nan_logits
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def run(client, prompt, params):
        outs = []
        try:
            async for o in client.generate(tok.encode(prompt), params):
                outs.append(o)
        except RequestFailedError as e:
            return str(e)
        return sum(len(o.token_ids) for o in outs)

    async def main():
        client = AsyncEngineClient(engine, MODEL)
        await client.start()
        try:
            first = await asyncio.gather(run(client, "import re", greedy), run(client, "POISON", greedy),
                                         run(client, "class A", SamplingParams(max_tokens=8, seed=666, ignore_eos=True)),
                                         run(client, "def f", greedy))
            fail_decode.set()
            second = await run(client, "x = 1", greedy)  # its first decode step fails
            third = await asyncio.gather(run(client, "import re", greedy), run(client, "def f", greedy))
            return first, second, third, client.is_healthy()
        finally:
            await client.shutdown()

    try:
        first, second, third, healthy = asyncio.run(main())
    finally:
        engine_mod.process_logits = real
    assert first[0] == 8 and first[3] == 8
    assert "out of memory (simulated)" in first[1]
    assert "not finite" in first[2]
    assert "device error (simulated)" in second
    assert third == [8, 8] and healthy
    assert not engine.has_work() and not engine._ids


def test_a_big_body_is_refused_before_it_is_parsed(folder, monkeypatch):
    import lmforge.serve.server as server_mod

    engine = new_engine(folder)
    calls = []
    encode = server_mod.encode_prompt

    def recording_encode(tokenizer, text):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((len(text), on_loop))
        return encode(tokenizer, text)

    monkeypatch.setattr(server_mod, "encode_prompt", recording_encode)
    with serving(engine, max_prompt_tokens=100) as (base, _, _client):
        big = {"model": MODEL, "prompt": "def " * 500_000, "max_tokens": 2}  # 2 MB: over the default 1 MiB
        r = httpx.post(base + "/v1/completions", json=big, timeout=60)
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
        assert calls == []  # never tokenized

        def chunks():  # no Content-Length: counted as it arrives
            data = json.dumps(big).encode()
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]

        r = httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 413 and "at most 1048576" in r.json()["error"]["message"]
        assert calls == []
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "import re", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200
        assert calls == [(len("import re"), False)]  # tokenized in a worker thread, not on the event loop


def test_a_client_that_disconnects_has_its_request_aborted(folder):
    engine = new_engine(folder)
    gate, entered = threading.Event(), threading.Event()
    steps = []
    step = engine.step

    def gated_step():
        entered.set()
        gate.wait(30)
        steps.append(1)
        return step()

    engine.step = gated_step
    with serving(engine, disconnect_poll_s=0.05) as (_, port, client):
        body = json.dumps({"model": MODEL, "prompt": "import re", "max_tokens": 50, "temperature": 0,
                           "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(entered.is_set, "the engine took the request")
        assert client.num_pending == 1
        sock.close()
        wait_until(lambda: client.num_pending == 0, "the request left its queue place")
        gate.set()
        wait_until(lambda: not engine.has_work(), "the engine dropped the request")
    assert len(steps) < 50  # aborted long before its 50 tokens
