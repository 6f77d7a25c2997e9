"""The engine thread over a stand-in engine (no model): outputs reach their asyncio queue, finished
requests are released, a refused request changes nothing, a failing step fails only the requests in
flight and the thread serves on."""

from __future__ import annotations

import asyncio
import time

from tokensieve.errors import RequestError
from tokensieve.outputs import RequestMetrics, RequestOutput
from tokensieve.sampling_params import SamplingParams
from tokensieve.server.engine_thread import _STOP, ACCEPTED, EngineStepError, EngineThread, ServerStopping, Submission


class StandInEngine:
    """Enough of LLMEngine for the thread: each step gives every request one token, up to its max_tokens;
    the steps numbered in `failing_steps` raise."""

    def __init__(self, failing_steps=(), failing_stats=()):
        self.failing_steps, self.steps, self.generated = set(failing_steps), 0, 0
        self.failing_stats = set(failing_stats)  # stats() raises after these steps: a failure outside the step
        self.requests: dict[str, list] = {}  # request id -> [tokens so far, max_tokens]
        self.released: list[str] = []
        self.aborted: list[str] = []

    def add_request(self, prompt_token_ids, params, request_id, *, client, priority):
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        self.requests[request_id] = [0, params.max_tokens]
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.steps in self.failing_steps:
            raise RuntimeError("the forward broke")
        outputs = []
        for request_id, progress in list(self.requests.items()):
            progress[0] += 1
            self.generated += 1
            finished = progress[0] >= progress[1]
            if finished:
                del self.requests[request_id]
            outputs.append(RequestOutput(
                request_id, [1], "x" * progress[0], "x", [0] * progress[0], finished, "length" if finished else None,
                RequestMetrics(None, 0.0, None),
            ))
        return outputs

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    def stats(self) -> dict:
        if self.steps in self.failing_stats:
            self.failing_stats.discard(self.steps)
            raise RuntimeError("the stats broke")
        return {"waiting_by_client": {}, "generation_tokens": self.generated}


async def _replies(engine_thread: EngineThread, request_id: str, prompt=(1,), max_tokens=2) -> list:
    """What the submission's queue receives, up to the final output or the first error."""
    outputs: asyncio.Queue = asyncio.Queue()
    engine_thread.submit(Submission(
        [request_id], list(prompt), [SamplingParams(max_tokens=max_tokens)], "c", 0, asyncio.get_running_loop(), outputs
    ))
    replies = [await asyncio.wait_for(outputs.get(), 5)]
    while replies[-1] is ACCEPTED or (isinstance(replies[-1], RequestOutput) and not replies[-1].finished):
        replies.append(await asyncio.wait_for(outputs.get(), 5))
    return replies


def _with_thread(engine, scenario) -> None:
    async def run():
        engine_thread = EngineThread(engine)
        engine_thread.start()
        try:
            await scenario(engine_thread)
        finally:
            engine_thread.stop()

    asyncio.run(run())


def test_outputs_arrive_and_finished_requests_are_released():
    engine = StandInEngine()

    async def scenario(engine_thread):
        replies = await _replies(engine_thread, "a", max_tokens=3)
        assert replies[0] is ACCEPTED and [r.text for r in replies[1:]] == ["x", "xx", "xxx"]
        assert engine.released == ["a"] and engine_thread.waiting_by_client() == {}

    _with_thread(engine, scenario)


def test_a_refused_request_gets_its_error():
    async def scenario(engine_thread):
        replies = await _replies(engine_thread, "a", prompt=())
        assert len(replies) == 1 and isinstance(replies[0], RequestError)

    _with_thread(StandInEngine(), scenario)


def test_a_failing_step_fails_the_requests_in_flight_and_the_thread_serves_on():
    engine = StandInEngine(failing_steps={2})

    async def scenario(engine_thread):
        failed = await _replies(engine_thread, "a", max_tokens=5)
        assert isinstance(failed[-1], EngineStepError) and "the forward broke" in str(failed[-1])
        assert engine.aborted == ["a"] and not engine.requests
        served = await _replies(engine_thread, "b", max_tokens=2)
        assert served[-1].finished and engine.released == ["b"] and engine_thread.is_alive()

    _with_thread(engine, scenario)


def test_a_failure_outside_the_step_fails_the_requests_in_flight_and_the_thread_serves_on():
    engine = StandInEngine(failing_stats={1})

    async def scenario(engine_thread):
        failed = await _replies(engine_thread, "a", max_tokens=5)
        assert isinstance(failed[-1], EngineStepError) and "the stats broke" in str(failed[-1])
        served = await _replies(engine_thread, "b", max_tokens=2)
        assert served[-1].finished and engine_thread.is_alive()

    _with_thread(engine, scenario)


def test_stopping_answers_every_submission_still_queued():
    async def scenario():
        engine_thread = EngineThread(StandInEngine())  # not started: the stop and the submission queue together
        outputs: asyncio.Queue = asyncio.Queue()
        engine_thread._inbox.put(_STOP)
        engine_thread.submit(Submission(["a"], [1], [SamplingParams()], "c", 0, asyncio.get_running_loop(), outputs))
        engine_thread.start()
        assert isinstance(await asyncio.wait_for(outputs.get(), 5), ServerStopping)
        engine_thread.stop()

    asyncio.run(scenario())


def test_abort_stops_a_request():
    engine = StandInEngine()

    async def scenario(engine_thread):
        outputs: asyncio.Queue = asyncio.Queue()
        engine_thread.submit(Submission(
            ["a"], [1], [SamplingParams(max_tokens=10**6)], "c", 0, asyncio.get_running_loop(), outputs
        ))
        assert await asyncio.wait_for(outputs.get(), 5) is ACCEPTED
        engine_thread.abort(["a"])
        deadline = time.monotonic() + 5
        while engine.requests:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert engine.aborted == ["a"]

    _with_thread(engine, scenario)
