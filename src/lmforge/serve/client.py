"""The small async interface between the HTTP layer and the engine.

:class:`EngineClient` is all the server knows: ``generate`` (an async stream of
:class:`~lmforge.serve.engine.RequestOutput`), ``abort``, ``start``/``shutdown`` and a few facts
(model name, tokenizer, limits). :class:`AsyncEngineClient` implements it by running an
:class:`~lmforge.serve.engine.Engine` in one background thread: requests arrive through a
thread-safe queue, the thread steps the engine while there is work and hands each output back to the
event loop of the request that asked for it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from typing import AsyncIterator, Optional, Protocol, Sequence

from lmforge.errors import ConfigError
from lmforge.serve.engine import Engine, EngineBusyError, RequestFailedError, RequestOutput, SamplingParams

__all__ = ["EngineClient", "AsyncEngineClient"]


class EngineClient(Protocol):
    """What the server needs from an engine."""

    model_name: str
    adapter_names: list[str]  # LoRA adapters a request may name as its model
    tokenizer: object
    max_seq_len: int

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: Optional[str] = None,
                 adapter: Optional[str] = None) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def is_healthy(self) -> bool: ...

    def metrics_text(self) -> str: ...


class _Pending:
    """An output destination for one request: an asyncio queue on the requester's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngineClient:
    """Run an :class:`Engine` in a background thread behind an async API.

    Args:
        engine: the engine; only the background thread touches it once started.
        model_name: the name clients send as ``model``.
        max_pending: requests queued or running at most; more are refused with :class:`EngineBusyError` (503).
    """

    def __init__(self, engine: Engine, model_name: str, max_pending: int = 256):
        self.engine = engine
        self.model_name = model_name
        self.adapter_names = list(engine.lora.names) if getattr(engine, "lora", None) is not None else []
        if model_name in self.adapter_names:
            raise ConfigError(f"--lora name {model_name!r} is also the served model's name; rename the adapter or "
                              f"set --model-name")
        self.tokenizer = engine.tokenizer
        self.max_seq_len = engine.context_len  # prompt + output tokens (p-tuning's virtual tokens not counted)
        self.max_pending = max_pending
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._error: Optional[BaseException] = None

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, timeout: Optional[float] = None) -> None:
        """Refuse new requests, let queued and running ones finish, then stop the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    def is_healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def metrics_text(self) -> str:
        """The engine's metrics in Prometheus' text format (read from the engine thread's counters as they are)."""
        from lmforge.serve.metrics import render_prometheus

        return render_prometheus(self.engine.metrics, self.engine.stats(), self.model_name)

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- requests -----------------------------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: Optional[str] = None, adapter: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Submit a request (decoded with LoRA adapter ``adapter``, None: the base model) and yield its
        outputs until the finished one.

        Raises :class:`~lmforge.serve.engine.InvalidRequestError` for a bad request and
        :class:`EngineBusyError` when the queue is full or the engine is stopping. Closing the iterator
        early (a client that went away) aborts the request.
        """
        request_id = request_id or uuid.uuid4().hex
        if self._stopping or not self.is_healthy():
            raise EngineBusyError("the server is shutting down or its engine stopped; try again later")
        pending = _Pending(asyncio.get_running_loop())
        with self._lock:
            if len(self._pending) >= self.max_pending:
                raise EngineBusyError(f"the server is busy ({self.max_pending} requests queued or running); "
                                      f"try again later")
            self._pending[request_id] = pending
        self._inbox.put(("add", request_id, list(prompt_ids), params, adapter))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (its stream ends without a further output)."""
        with self._lock:
            self._pending.pop(request_id, None)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------

    def _deliver(self, request_id: str, item, last: bool) -> None:
        with self._lock:
            dest = self._pending.pop(request_id, None) if last else self._pending.get(request_id)
        if dest is not None:
            dest.put(item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, prompt, params, adapter = msg
                try:
                    self.engine.add_request(rid, prompt, params, adapter=adapter)
                except Exception as e:  # a bad request goes back to its caller
                    self._deliver(rid, e, last=True)
            else:
                self.engine.abort(msg[1])

    def _send(self, out: RequestOutput) -> None:
        """Hand an output to its request; a request that failed in the engine gets a RequestFailedError."""
        if out.finish_reason == "error":
            self._deliver(out.request_id, RequestFailedError(f"this request failed: {out.error}"), last=True)
        else:
            self._deliver(out.request_id, out, last=out.finished)

    def _loop(self) -> None:
        try:
            while True:
                self._wake.clear()
                self._drain_inbox()
                if self.engine.has_work():
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # the running requests fail; the engine and the queue go on
                        outputs = self.engine.fail_running(e)
                    for out in outputs:
                        self._send(out)
                    continue
                if self._stopping and self._inbox.empty():
                    return
                self._wake.wait(timeout=0.5)
        except BaseException as e:  # a bug outside a step: fail every waiting request rather than hang them
            self._error = e
            with self._lock:
                pending, self._pending = self._pending, {}
            for dest in pending.values():
                dest.put(RuntimeError(f"the engine failed: {type(e).__name__}: {e}"))
            raise
