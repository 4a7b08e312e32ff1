"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over an :class:`~lmforge.serve.client.EngineClient`.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (the tokenizer's chat template), streaming as server-sent events
(``data: {...}`` lines, then ``data: [DONE]``), usage counts, and errors as OpenAI's body
``{"error": {"message", "type", "param", "code"}}``:

=====  ================================================================================
400    a value the engine cannot use (temperature < 0, max_tokens beyond the context, no chat template, bad
       SteerLM ``attributes``)
401    a missing or wrong API key (when the server has one)
404    an unknown model name or route
413    a prompt longer than the server's prompt limit, or a body over ``max_request_bytes`` (checked first)
422    a request body that does not match the schema (a wrong type, a missing field)
499    the client of a non-streaming request disconnected (its request was aborted in the engine)
500    this request failed inside the engine (non-finite logits...); the engine goes on with the others
503    the queue is full or the server is shutting down
=====  ================================================================================

A SteerLM model (fine-tuned with ``sft.attributes``) is steered per request with the extra body field
``attributes``: an object (``{"quality": 4, "helpfulness": 4}``) or the attribute string NeMo-Aligner's SteerLM
prompts carry (``"quality:4,helpfulness:4"``). The prompt then gets the attribute string in the format stored in
the model's tokenizer config, as ``lmforge generate --attributes`` builds it (:mod:`lmforge.data.steer`): a text
prompt of ``/v1/completions`` becomes the format's template filled with it, a chat gets the attribute line after
every assistant turn's generation prompt. An unknown attribute, a missing one, a value out of range, token-id
prompts, or ``attributes`` sent to a model without a stored format are 400.

Prompts are tokenized in a worker thread, never on the event loop (a long prompt does not block /health).

The server only talks to the engine through the client interface (``generate``, ``abort``,
``start``, ``shutdown``); it never touches the model.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.data.prompts import encode_prompt
from lmforge.errors import UserError
from lmforge.serve.chat import NoChatTemplateError, load_chat_template
from lmforge.serve.client import EngineClient
from lmforge.serve.engine import (SEED_RANGE, InvalidRequestError, PromptTooLongError, RequestOutput, SamplingParams,
                                  TokenLogprob)

__all__ = ["build_app", "run_server", "APIError", "CompletionRequest", "ChatCompletionRequest"]


# ----------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    status = getattr(e, "status", None)
    if isinstance(e, UserError) and not isinstance(status, int):
        status = 400
    if isinstance(status, int):
        kind = ("service_unavailable" if status == 503 else "server_error" if status >= 500
                else "invalid_request_error")
        return APIError(status, str(e), kind, getattr(e, "param", None))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before anything parses or
    tokenizes it (at once from its Content-Length; a chunked body is counted as it arrives and never held
    beyond the limit). Accepted bodies are replayed to the app unchanged."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    def _refuse(self, size: str) -> JSONResponse:
        return APIError(413, f"the request body is {size} bytes; this server accepts at most {self.limit} "
                             f"(--max-request-bytes); send a shorter prompt", "invalid_request_error").response()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(length.decode())(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(f"more than {size}")(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect when the client goes away

        return await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------
# Request bodies (OpenAI's fields, plus vLLM's usual sampling extras)


class _SamplingFields(BaseModel):
    model: str
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    seed: Optional[int] = None
    user: Optional[str] = None
    # extras
    top_k: Optional[int] = None
    min_p: Optional[float] = 0.0
    repetition_penalty: Optional[float] = 1.0
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    attributes: Optional[Union[str, dict[str, Any]]] = None  # SteerLM steering (see the module doc)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


# ----------------------------------------------------------------------------------------------
# The app


class _Server:
    """Request handling shared by the routes (holds the client and the limits; no global state)."""

    def __init__(self, client: EngineClient, api_key: Optional[str], max_prompt_tokens: int, max_tokens_limit: int):
        self.client = client
        self.api_key = api_key
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        self.tokenizer = client.tokenizer
        self._chat = None
        self._chat_loaded = False
        self._steer_format = ...  # the SteerLM attribute format, read on first use

    # -- checks --------------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    def check_model(self, name: str) -> Optional[str]:
        """The LoRA adapter a request's ``model`` names (None: the base model); 404 for an unknown name."""
        if name == self.client.model_name:
            return None
        if name in self.client.adapter_names:
            return name
        served = ", ".join(repr(n) for n in [self.client.model_name, *self.client.adapter_names])
        raise APIError(404, f"the model '{name}' does not exist; this server serves {served}",
                       "invalid_request_error", "model", "model_not_found")

    def chat_template(self):
        if not self._chat_loaded:
            self._chat = load_chat_template(self.tokenizer)
            self._chat_loaded = True
        if self._chat is None:
            raise NoChatTemplateError("this model's tokenizer has no chat template (no 'chat_template' in "
                                      "tokenizer_config.json, no chat_template.jinja); use /v1/completions or add "
                                      "a template to the tokenizer folder", "messages")
        return self._chat

    def steering(self, given) -> Optional[tuple]:
        """``(format, values)`` of a request's ``attributes`` (None when not sent), checked as ``generate
        --attributes`` checks them (:func:`lmforge.data.steer.requested_values`); UserError (400) otherwise."""
        from lmforge.data.steer import format_of, requested_values

        if given is None:
            return None
        if self._steer_format is ...:
            self._steer_format = format_of(self.tokenizer, "the served model") if self.tokenizer is not None else None
        return self._steer_format, requested_values(self._steer_format, given, "attributes",
                                                    f"the served model '{self.client.model_name}'")

    def params(self, req: _SamplingFields, prompt_len: int, max_tokens: Optional[int], logprobs: Optional[int],
               prompt_logprobs: Optional[int] = None) -> SamplingParams:
        if prompt_len > self.max_prompt_tokens:
            raise PromptTooLongError(f"the prompt has {prompt_len} tokens; this server accepts at most "
                                     f"{self.max_prompt_tokens}", "prompt")
        room = self.client.max_seq_len - prompt_len
        if max_tokens is None:
            max_tokens = min(room, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens={max_tokens} is above this server's limit of "
                                      f"{self.max_tokens_limit}", "max_tokens")
        if max_tokens > room:
            raise InvalidRequestError(f"this model's context is {self.client.max_seq_len} tokens; the prompt has "
                                      f"{prompt_len}, so max_tokens can be at most {room} (asked {max_tokens})",
                                      "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        p = SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                           top_k=req.top_k, top_p=1.0 if req.top_p is None else req.top_p, min_p=req.min_p or 0.0,
                           repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                           frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
                           stop=stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                           seed=req.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        p.validate()
        return p

    # -- running requests -----------------------------------------------------------------------------

    def requests(self, prompts: list[list[int]], params: SamplingParams, n: int, adapter: Optional[str] = None
                 ) -> list[AsyncIterator[RequestOutput]]:
        """One engine stream per (prompt, sample); sample i of a seeded request uses seed + i (wrapping
        within the signed 64-bit range)."""
        streams = []
        for prompt in prompts:
            for i in range(n):
                p = params if i == 0 or params.seed is None else _with_seed(params, _wrap_seed(params.seed + i))
                streams.append(self.client.generate(prompt, p, adapter=adapter))
        return streams

    def token_text(self, tid: int) -> str:
        return self.tokenizer.decode([tid]) if self.tokenizer is not None else str(tid)


def _wrap_seed(seed: int) -> int:
    lo, hi = SEED_RANGE
    return (seed - lo) % (hi - lo + 1) + lo


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams in arrival order, tagged with the stream's index."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, end))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _primed(agen: AsyncIterator) -> AsyncIterator:
    """Start ``agen`` now (so a request error is raised before the response begins); yield everything."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = None
        empty = True
    else:
        empty = False

    async def rest():
        if not empty:
            yield first
        async for item in agen:
            yield item

    return rest()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _completion_logprobs(server: _Server, lps: list[TokenLogprob], offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        text = server.token_text(lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append(_top_dict(server, lp.top))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(server: _Server, top: list[tuple[int, float]]) -> dict[str, float]:
    """OpenAI's ``{token text: logprob}``; tokens that decode to the same text keep the most likely value."""
    out: dict[str, float] = {}
    for t, v in top:  # most likely first
        out.setdefault(server.token_text(t), v)
    return out


def _prompt_logprobs(server: _Server, ids: list[int], lps: Optional[list[Optional[TokenLogprob]]]) -> dict:
    """The prompt part of an echoed completion's logprobs: the first token has none (null)."""
    lps = lps or [None] * len(ids)
    tokens = [server.token_text(t) for t in ids]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
            "top_logprobs": [None if lp is None else _top_dict(server, lp.top) for lp in lps],
            "text_offset": offsets}


def _chat_logprobs(server: _Server, lps: list[TokenLogprob]) -> dict:
    def entry(tid: int, value: float) -> dict:
        text = server.token_text(tid)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def default_max_request_bytes(max_prompt_tokens: int) -> int:
    """The default body limit: 64 bytes per prompt token (JSON-escaped text, or a list of token ids, of the
    longest prompt accepted, with room to spare), at least 1 MiB."""
    return max(1 << 20, 64 * int(max_prompt_tokens))


def build_app(client: EngineClient, api_key: Optional[str] = None, max_prompt_tokens: Optional[int] = None,
              max_tokens_limit: Optional[int] = None, max_request_bytes: Optional[int] = None,
              disconnect_poll_s: float = 0.25) -> FastAPI:
    """The FastAPI app serving ``client``'s model.

    Args:
        client: the engine client; started when the app starts, shut down (running requests finished)
            when it stops.
        api_key: when set, every /v1 route needs ``Authorization: Bearer <api_key>``.
        max_prompt_tokens: longest prompt accepted (413 above); default the engine's context - 1.
        max_tokens_limit: largest ``max_tokens`` accepted (400 above); default the engine's context.
        max_request_bytes: largest request body accepted (413 above, before it is parsed or tokenized);
            default :func:`default_max_request_bytes`.
        disconnect_poll_s: how often a non-streaming request checks that its client is still there (a client
            that left has its request aborted in the engine).
    """
    server = _Server(client, api_key, max_prompt_tokens or client.max_seq_len - 1,
                     max_tokens_limit or client.max_seq_len)
    body_limit = max_request_bytes or default_max_request_bytes(server.max_prompt_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        try:
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=body_limit)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected):
        return JSONResponse({"error": {"message": "the client disconnected", "type": "client_closed_request",
                                       "param": None, "code": None}}, status_code=499)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError):
        return _as_api_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        first = e.errors()[0].get("loc", ()) if e.errors() else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return APIError(422, "invalid request: " + "; ".join(parts), "invalid_request_error", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}", kind).response()

    @app.get("/health")
    async def health():
        if not client.is_healthy():
            return APIError(503, "the engine is not running", "service_unavailable").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        """Prometheus text: requests running and waiting, KV blocks, token counters, TTFT and TPOT histograms
        (behind the API key like every route but /health)."""
        server.check_key(request)
        return PlainTextResponse(client.metrics_text(), media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lmforge",
                "max_model_len": client.max_seq_len}
        if name != client.model_name:  # a LoRA adapter over the base model
            card["parent"] = client.model_name
        return card

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [model_card(n) for n in [client.model_name, *client.adapter_names]]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.check_key(request)
        server.check_model(model_id)
        return model_card(model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_key(request)
        adapter = server.check_model(body.model)
        steer = server.steering(body.attributes)
        if steer is not None:  # SteerLM: each text prompt filled into the model's attribute template
            body.prompt = _steered_prompts(body.prompt, *steer)
        prompts = await run_in_threadpool(_completion_prompts, server, body.prompt)  # off the event loop
        # echo: the prompt comes back before the completion, with its tokens' logprobs when logprobs is set
        # (max_tokens=0 then scores the prompt alone: how lm-evaluation-harness scores a served model)
        echo = _echo_texts(server, body.prompt, prompts) if body.echo else None
        prompt_lp = None
        if body.echo:
            prompt_lp = body.logprobs if body.logprobs is not None else (0 if body.max_tokens == 0 else None)
        params = [server.params(body, len(p), body.max_tokens, body.logprobs, prompt_lp) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = [s for i, p in enumerate(prompts) for s in server.requests([p], params[i], body.n, adapter)]
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        prompt_tokens = sum(len(p) for p in prompts)
        echoes = [(echo[j // body.n], prompts[j // body.n]) for j in range(len(streams))] if echo else None
        if body.stream:
            return await _stream(server, streams, body, base, prompt_tokens, chat=False, echoes=echoes)
        results = await _collect(streams, request, disconnect_poll_s)
        choices = []
        for i, r in enumerate(results):
            head_text, lp = (echoes[i][0] if echoes else ""), None
            if body.logprobs is not None:
                lp = _completion_logprobs(server, r["logprobs"], len(head_text))
                if echoes:
                    head = _prompt_logprobs(server, echoes[i][1], r["prompt_logprobs"])
                    lp = {k: head[k] + lp[k] for k in lp}
            choices.append({"index": i, "text": head_text + r["text"], "logprobs": lp,
                            "finish_reason": r["finish_reason"]})
        completion_tokens = sum(r["completion_tokens"] for r in results)
        return {**base, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_key(request)
        adapter = server.check_model(body.model)
        steer = server.steering(body.attributes)
        if steer is None:
            encode = lambda: server.chat_template().encode(body.messages)  # noqa: E731
        else:  # SteerLM: the attribute line after every assistant turn's generation prompt, as generate puts it
            encode = lambda: server.chat_template().encode_steered(body.messages, *steer, "messages")  # noqa: E731
        prompt = await run_in_threadpool(encode)  # off the event loop
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = server.params(body, len(prompt), max_tokens, logprobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = server.requests([prompt], params, body.n, adapter)
        base = {"id": rid, "object": "chat.completion", "created": created, "model": body.model}
        if body.stream:
            return await _stream(server, streams, body, {**base, "object": "chat.completion.chunk"}, len(prompt),
                                 chat=True)
        results = await _collect(streams, request, disconnect_poll_s)
        choices = []
        for i, r in enumerate(results):
            lp = _chat_logprobs(server, r["logprobs"]) if body.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": lp,
                            "finish_reason": r["finish_reason"]})
        completion_tokens = sum(r["completion_tokens"] for r in results)
        return {**base, "choices": choices, "usage": _usage(len(prompt), completion_tokens)}

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _steered_prompts(prompt, fmt, values: dict):
    """A completion request's text prompt(s) conditioned on SteerLM ``values`` (``fmt``'s template); token-id
    prompts cannot be (the attribute string is text): 400."""
    if isinstance(prompt, str):
        return fmt.prompt(prompt, values)
    if not prompt or not all(isinstance(p, str) for p in prompt):
        raise InvalidRequestError("attributes steer text prompts (the attribute string is placed into the prompt "
                                  "text); send the prompt as text, not token ids", "attributes")
    return [fmt.prompt(p, values) for p in prompt]


def _completion_prompts(server: _Server, prompt) -> list[list[int]]:
    """Token ids of each prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not prompt:
        raise InvalidRequestError("prompt is empty", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if server.tokenizer is None:
                raise InvalidRequestError("this server has no tokenizer: send token ids as the prompt", "prompt")
            ids = encode_prompt(server.tokenizer, p)  # the rule fine-tuning used (lmforge.data.prompts)
        else:
            ids = list(p)
        if not ids:
            raise InvalidRequestError("a prompt encodes to no tokens; give some text", "prompt")
        out.append(ids)
    return out


def _echo_texts(server: _Server, prompt, prompts: list[list[int]]) -> list[str]:
    """The text echoed for each prompt: as sent when it was text, else its tokens decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if server.tokenizer is None:
        return ["" for _ in prompts]
    return [server.tokenizer.decode(ids) for ids in prompts]


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away; its engine requests were aborted."""


async def _collect(streams: list[AsyncIterator[RequestOutput]], request: Optional[Request] = None,
                   poll_s: float = 0.25) -> list[dict]:
    """Every stream's whole output. While waiting, the client is checked every ``poll_s`` seconds: when it
    has disconnected, the streams are closed (which aborts their requests in the engine, freeing their queue
    places and KV-cache blocks) and :class:`ClientDisconnected` is raised."""
    results = [{"text": "", "logprobs": [], "finish_reason": None, "completion_tokens": 0, "prompt_logprobs": None}
               for _ in streams]

    async def gather() -> None:
        async for i, out in _merged(streams):
            r = results[i]
            if out.prompt_logprobs is not None:
                r["prompt_logprobs"] = out.prompt_logprobs
            r["text"] += out.text
            r["logprobs"].extend(out.logprobs or [])
            r["completion_tokens"] = out.completion_tokens
            if out.finished:
                r["finish_reason"] = out.finish_reason

    task = asyncio.ensure_future(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s if request is not None else None)
            if done:
                break
            if await request.is_disconnected():
                raise ClientDisconnected()
        task.result()
    except ClientDisconnected:
        raise
    except Exception as e:
        raise _as_api_error(e) from e
    finally:
        if not task.done():
            task.cancel()  # closes the streams: each aborts its request in the engine
            await asyncio.gather(task, return_exceptions=True)
    return results


async def _stream(server: _Server, streams, body: _SamplingFields, base: dict, prompt_tokens: int, chat: bool,
                  echoes: Optional[list[tuple[str, list[int]]]] = None):
    try:
        events = await _primed(_merged(streams))
    except Exception as e:
        raise _as_api_error(e) from e
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    want_lp = bool(getattr(body, "logprobs", None)) if chat else body.logprobs is not None

    async def sse() -> AsyncIterator[str]:
        completion_tokens = [0] * len(streams)
        offsets = [0] * len(streams)
        if chat:
            for i in range(len(streams)):
                yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        echoed = [False] * len(streams)
        try:
            async for i, out in events:
                completion_tokens[i] = out.completion_tokens
                if echoes and not echoed[i]:  # the prompt first (its first output carries the prompt logprobs)
                    echoed[i] = True
                    text, ids = echoes[i]
                    lp = _prompt_logprobs(server, ids, out.prompt_logprobs) if want_lp else None
                    yield _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}],
                                **({"usage": None} if include_usage else {})})
                    offsets[i] = len(text)
                if not out.text and not out.finished and not (want_lp and out.logprobs):
                    continue
                if chat:
                    lp = _chat_logprobs(server, out.logprobs or []) if want_lp else None
                    choice = {"index": i, "delta": {"content": out.text} if out.text else {}, "logprobs": lp,
                              "finish_reason": out.finish_reason if out.finished else None}
                else:
                    lp = _completion_logprobs(server, out.logprobs or [], offsets[i]) if want_lp else None
                    choice = {"index": i, "text": out.text, "logprobs": lp,
                              "finish_reason": out.finish_reason if out.finished else None}
                offsets[i] += len(out.text)
                chunk = {**base, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
        except Exception as e:  # after the response began, the error travels as an event
            yield _sse(_as_api_error(e).body())
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, sum(completion_tokens))})
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def run_server(model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
               model_name: Optional[str] = None, max_batch_size: int = 32, max_seq_len: Optional[int] = None,
               max_prompt_tokens: Optional[int] = None, max_tokens_limit: Optional[int] = None,
               max_pending: int = 256, device: str = "auto", dtype: str = "auto", compile_decode: bool = False,
               adapter: Optional[str] = None, loras: Optional[dict[str, str]] = None,
               graceful_timeout: int = 600, log_level: str = "info", max_request_bytes: Optional[int] = None,
               **engine_kwargs) -> None:
    """Load ``model_path`` and serve it until SIGINT/SIGTERM (running requests are finished first).
    ``engine_kwargs`` go to the :class:`~lmforge.serve.engine.Engine` (KV cache and scheduler settings)."""
    from lmforge.serve.engine import engine_from_checkpoint

    engine = engine_from_checkpoint(model_path, device=device, dtype=dtype, adapter=adapter, loras=loras,
                                    max_batch_size=max_batch_size,
                                    max_seq_len=max_seq_len, compile_decode=compile_decode, **engine_kwargs)
    serve_engine(engine, model_path, host=host, port=port, api_key=api_key, model_name=model_name,
                 max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit, max_pending=max_pending,
                 graceful_timeout=graceful_timeout, log_level=log_level, max_request_bytes=max_request_bytes)


def serve_engine(engine, model_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
                 model_name: Optional[str] = None, max_prompt_tokens: Optional[int] = None,
                 max_tokens_limit: Optional[int] = None, max_pending: int = 256, graceful_timeout: int = 600,
                 log_level: str = "info", max_request_bytes: Optional[int] = None) -> None:
    """Serve ``engine`` (the model of ``model_path``: its folder names it unless ``model_name``) until
    SIGINT/SIGTERM; running requests are finished first. (``run_server`` builds the engine; tensor-parallel
    serving gives rank 0's :class:`~lmforge.serve.tensor_parallel.LockstepEngine`.)"""
    import uvicorn
    from pathlib import Path

    from lmforge.serve.client import AsyncEngineClient

    name = model_name or Path(model_path).resolve().name
    client = AsyncEngineClient(engine, name, max_pending=max_pending)
    app = build_app(client, api_key=api_key, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                    max_request_bytes=max_request_bytes)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout, log_level=log_level)
