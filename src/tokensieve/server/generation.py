"""One HTTP request's engine requests, seen from the event loop: queue them, read their outputs, abort
the unfinished ones when the request ends for any reason (done, failed, client gone)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import AsyncIterator, Awaitable, Callable

from ..errors import RequestError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .engine_thread import ACCEPTED, EngineThread, ServerStopping, Submission
from .metrics import ServerMetrics
from .protocol import APIError, request_error

ID_PREFIXES = {"chat": "chatcmpl", "completion": "cmpl"}
PROMPT_FIELDS = {"chat": "messages", "completion": "prompt"}


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


def _engine_failure(exc: Exception) -> APIError:
    if isinstance(exc, ServerStopping):
        return APIError(503, str(exc), type="server_error", code="server_shutting_down")
    return APIError(500, str(exc), type="server_error", code="engine_error")


class Generation:
    def __init__(self, engine_thread: EngineThread, metrics: ServerMetrics, response_id: str):
        self.response_id = response_id
        self._engine_thread, self._metrics = engine_thread, metrics
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._unfinished: dict[str, int] = {}  # request id -> choice index
        self._last_output_time: dict[int, float] = {}

    @classmethod
    async def start(cls, engine_thread: EngineThread, metrics: ServerMetrics, kind: str, prompt_token_ids: list[int],
                    params: list[SamplingParams], client: str, priority: int) -> "Generation":
        """Queue one engine request per choice of a "chat" or "completion"; return once the engine holds
        them all (or raise an APIError)."""
        generation = cls(engine_thread, metrics, f"{ID_PREFIXES[kind]}-{secrets.token_hex(12)}")
        request_ids = [f"{generation.response_id}-{index}" for index in range(len(params))]
        engine_thread.submit(Submission(
            request_ids, prompt_token_ids, params, client, priority, asyncio.get_running_loop(), generation._outputs
        ))
        try:
            reply = await generation._outputs.get()
        except asyncio.CancelledError:  # the request ended while the engine thread was busy
            engine_thread.abort(request_ids)
            raise
        if isinstance(reply, RequestError):
            raise request_error(reply, PROMPT_FIELDS[kind])
        if reply is not ACCEPTED:
            raise _engine_failure(reply)
        generation._unfinished = {request_id: index for index, request_id in enumerate(request_ids)}
        return generation

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, until every choice has finished."""
        while self._unfinished:
            item = await self._outputs.get()
            if isinstance(item, Exception):
                self._unfinished.clear()  # the engine thread has already aborted them
                raise _engine_failure(item)
            index = self._unfinished[item.request_id]
            self._observe(index, item)
            if item.finished:
                del self._unfinished[item.request_id]
            yield index, item

    async def finals(self, receive: Callable[[], Awaitable[dict]]) -> list[RequestOutput]:
        """Every choice's final output; raises ClientDisconnected as soon as the client leaves (the
        request's ASGI `receive` then gives http.disconnect)."""
        finals: dict[int, RequestOutput] = {}

        async def read_all() -> None:
            async for index, out in self.outputs():
                if out.finished:
                    finals[index] = out

        async def disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        reader, watcher = asyncio.ensure_future(read_all()), asyncio.ensure_future(disconnect())
        try:
            await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                raise ClientDisconnected()
        finally:
            reader.cancel()
            watcher.cancel()
        reader.result()
        return [finals[index] for index in sorted(finals)]

    def abort(self) -> None:
        """Free the engine requests that have not finished (a no-op once all have)."""
        if self._unfinished:
            self._engine_thread.abort(list(self._unfinished))
            self._unfinished.clear()

    def _observe(self, index: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        if index in self._last_output_time:
            self._metrics.inter_token_latency.observe(now - self._last_output_time[index])
        self._last_output_time[index] = now
        if out.finished:
            self._metrics.observe_finished(out)
