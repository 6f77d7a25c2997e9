"""Server-sent events of a generation: a chunk per output, an optional usage chunk, an error as a data
line if one comes after streaming began, then `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..outputs import RequestOutput
from .generation import Generation
from .protocol import APIError
from .responses import ChatShapes, CompletionShapes

log = logging.getLogger("tokensieve.server")


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class GenerationStream(StreamingResponse):
    """An event stream that aborts its generation's unfinished requests however it ends: done, failed,
    or cancelled because the client disconnected."""

    def __init__(self, generation: Generation, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.abort()


async def stream_events(
    generation: Generation, shapes: ChatShapes | CompletionShapes, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    finals: dict[int, RequestOutput] = {}
    logprobs_sent: dict[int, int] = {}
    started: set[int] = set()
    try:
        async for index, out in generation.outputs():
            logprobs = out.logprobs or []
            new_logprobs = logprobs[logprobs_sent.get(index, 0):]
            logprobs_sent[index] = len(logprobs)
            if out.finished:
                finals[index] = out
            if not (out.delta_text or new_logprobs or out.finished):
                continue  # text held back (it may begin a stop string) and nothing else to report
            choice = shapes.chunk_choice(index, out, new_logprobs, first=index not in started)
            started.add(index)
            yield sse(shapes.chunk([choice], with_usage_field=include_usage))
        if include_usage:
            yield sse(shapes.usage_chunk([finals[index] for index in sorted(finals)], prompt_tokens))
    except Exception as exc:
        if not isinstance(exc, APIError):
            log.exception("a stream failed")
            exc = APIError(500, f"the server failed while streaming: {exc!r}", type="server_error")
        yield sse(exc.body())
    yield sse("[DONE]")
