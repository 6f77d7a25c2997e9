"""The load generator of `tokensieve bench serve`: streamed chat requests over httpx, timed chunk by
chunk, with fixed concurrency or Poisson arrivals, for one client or several at once.

A request's timings (vLLM's `bench serve` measures):
- TTFT: from sending the request to the first chunk that carries text;
- ITL: the gap between consecutive text chunks;
- TPOT: (e2e - TTFT) / (tokens - 1), the mean time per token after the first;
- e2e: from sending to the end of the stream;
- tokens: the usage chunk's completion_tokens (stream_options.include_usage), or the number of
  text chunks when a server sends no usage (llama-cpp-python streams one token a chunk).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

from .serve_workloads import ClientLoad, Conversation


@dataclass
class RequestRecord:
    """One request's outcome and timings (seconds); `start` and `chunk_times` are from the run's start."""

    user: str
    conversation: str
    turn: int
    category: str = ""
    start: float = 0.0
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft: float | None = None
    e2e: float | None = None
    tpot: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""

    def to_json(self, keep_text: bool = False) -> dict:
        row = asdict(self)
        row["itl"] = [round(x, 6) for x in self.itl]
        row["chunk_times"] = [round(x, 6) for x in self.chunk_times]
        if not keep_text:
            row.pop("text")
        return row


@dataclass
class Target:
    """Where and how requests go: the server's base URL (http://host:port), the model name it serves,
    the settings every request carries."""

    base_url: str
    model: str
    max_tokens: int = 64
    api_key: str | None = None
    request_timeout: float = 300.0
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)  # fields a particular server needs (llama.cpp's sampling defaults)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, messages: list[dict], user: str) -> dict:
        body = {
            "model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "user": user,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body | self.extra_body


def _chunk_text(data: dict) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or ""


async def send_chat(http, target: Target, messages: list[dict], record: RequestRecord, run_start: float) -> RequestRecord:
    """Stream one chat completion and fill `record` with its timings."""
    sent = time.perf_counter()
    record.start = sent - run_start
    last = None
    pieces: list[str] = []
    try:
        async with http.stream("POST", f"{target.base_url}/v1/chat/completions", json=target.body(messages, record.user),
                               headers=target.headers(), timeout=target.request_timeout) as response:
            record.status = response.status_code
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                record.error = f"HTTP {response.status_code}: {detail}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                data = json.loads(payload)
                if "error" in data:
                    error = data["error"]
                    record.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
                    return record
                text = _chunk_text(data)
                if text:
                    if last is None:
                        record.ttft = now - sent
                    else:
                        record.itl.append(now - last)
                    record.chunk_times.append(now - run_start)
                    last = now
                    pieces.append(text)
                for choice in data.get("choices") or []:
                    record.finish_reason = choice.get("finish_reason") or record.finish_reason
                usage = data.get("usage")
                if usage:
                    record.tokens = int(usage.get("completion_tokens") or 0)
                    record.tokens_from_usage = True
                    record.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_tokens = details.get("cached_tokens")
    except Exception as exc:  # a refused connection, a timeout, a broken stream: the request failed
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.e2e = time.perf_counter() - sent
    record.text = "".join(pieces)
    if not record.tokens_from_usage:
        record.tokens = len(record.chunk_times)
    if record.ttft is None:
        record.error = "no text in the stream"
        return record
    record.ok = True
    if record.tokens > 1:
        record.tpot = (record.e2e - record.ttft) / (record.tokens - 1)
    return record


async def run_conversation(http, target: Target, conversation: Conversation, user: str, run_start: float,
                           records: list[RequestRecord]) -> None:
    """The turns of one conversation, one after the other, each with the answers before it; stops at
    the first failed turn."""
    answers: list[str] = []
    for turn in range(len(conversation.turns)):
        record = RequestRecord(user, conversation.id, turn, conversation.category)
        records.append(record)
        await send_chat(http, target, conversation.messages(turn, answers), record, run_start)
        if not record.ok:
            return
        answers.append(record.text)


async def _client_fixed(http, target: Target, client: ClientLoad, run_start: float, records: list) -> None:
    queue = list(reversed(client.conversations))

    async def worker() -> None:
        while queue:
            await run_conversation(http, target, queue.pop(), client.user, run_start, records)

    await asyncio.gather(*(worker() for _ in range(max(1, client.concurrency or 1))))


async def _client_poisson(http, target: Target, client: ClientLoad, run_start: float, records: list) -> None:
    """Conversations start at Poisson arrivals of `client.rate` per second (exponential gaps, seeded);
    `client.concurrency`, when set, caps how many are in flight."""
    rng = random.Random(client.seed)
    limit = asyncio.Semaphore(client.concurrency) if client.concurrency else None

    async def one(conversation: Conversation) -> None:
        if limit is None:
            await run_conversation(http, target, conversation, client.user, run_start, records)
            return
        async with limit:
            await run_conversation(http, target, conversation, client.user, run_start, records)

    tasks = []
    for conversation in client.conversations:
        tasks.append(asyncio.create_task(one(conversation)))
        await asyncio.sleep(rng.expovariate(client.rate))
    await asyncio.gather(*tasks)


async def run_clients(target: Target, clients: list[ClientLoad], timeout: float,
                      transport=None) -> tuple[list[RequestRecord], float]:
    """Every client's conversations, all clients at once; returns the requests (in the order they were
    sent, unfinished ones marked with an error when the timeout cut the run) and the run's seconds.
    `transport`: an httpx transport in place of the network (tests)."""
    import httpx

    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=target.request_timeout, transport=transport) as http:
        run_start = time.perf_counter()
        jobs = [(_client_poisson if c.rate else _client_fixed)(http, target, c, run_start, records) for c in clients]
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), timeout)
        except asyncio.TimeoutError:
            for record in records:
                if not record.ok and record.error is None:
                    record.error = f"cut by the run's {timeout:.0f} s timeout"
        duration = time.perf_counter() - run_start
    return records, duration
