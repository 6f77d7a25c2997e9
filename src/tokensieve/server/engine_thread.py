"""The one thread that owns the engine: it takes submissions and aborts from a queue, steps while there
is work, and hands each output to its request's asyncio queue. The event loop never runs a forward."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

from ..engine.engine import LLMEngine
from ..sampling_params import SamplingParams

log = logging.getLogger("tokensieve.server")

ACCEPTED = "accepted"  # delivered once every engine request of a submission is queued
RATE_SAMPLE_SECONDS = 0.25  # how often the generated-token count is sampled for the token rate
RATE_SAMPLES = 64


class EngineStepError(RuntimeError):
    """The engine failed during a step; the requests in flight were aborted."""


class ServerStopping(RuntimeError):
    """The server shut down before the request finished."""


@dataclass
class Submission:
    """One HTTP request's engine requests (its choices) and the asyncio queue their outputs go to:
    ACCEPTED or an exception first, then RequestOutputs, or an exception if the engine fails."""

    request_ids: list[str]
    prompt_token_ids: list[int]
    params: list[SamplingParams]
    client: str
    priority: int
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass


@dataclass
class Abort:
    request_ids: list[str]


_STOP = object()


class EngineThread:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.snapshot: dict = engine.stats()  # replaced whole after each step: read it from any thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, Submission] = {}
        self._untaken: Counter[str] = Counter()  # engine requests per client submitted but not yet in a snapshot
        self._untaken_lock = threading.Lock()
        self._rate_samples: tuple[tuple[float, int], ...] = ((time.monotonic(), self.snapshot["generation_tokens"]),)
        self._thread = threading.Thread(target=self._run, name="tokensieve-engine", daemon=True)

    # ---- called from the event loop --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail the requests in flight and end the thread (after the step it may be running)."""
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, submission: Submission) -> None:
        with self._untaken_lock:
            self._untaken[submission.client] += len(submission.request_ids)
        self._inbox.put(submission)

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(Abort(request_ids))

    def waiting_by_client(self) -> Counter[str]:
        """Requests not yet running, per client: the engine's waiting queue and submissions not yet taken."""
        with self._untaken_lock:
            waiting = Counter(self._untaken)
        waiting.update(self.snapshot["waiting_by_client"])
        return waiting

    def generation_rate(self, window: float = 5.0) -> float:
        """Tokens generated per second over about the last `window` seconds."""
        samples, now = self._rate_samples, time.monotonic()
        base = next((s for s in reversed(samples) if s[0] <= now - window), samples[0])
        elapsed = min(now - base[0], window)
        return (samples[-1][1] - base[1]) / elapsed if elapsed > 0 else 0.0

    # ---- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._serve_once():
                    return
            except Exception as exc:  # a bug of ours outside the step: fail what is in flight, serve on
                log.exception("the engine thread failed; failing the %d requests in flight", len(self._routes))
                self._fail_all(EngineStepError(f"the engine failed while running this request: {exc!r}"))

    def _serve_once(self) -> bool:
        """Take the commands waiting (blocking while idle), then run a step; False once told to stop."""
        commands = self._take_commands(block=not self.engine.has_unfinished())
        taken: Counter[str] = Counter()
        for index, command in enumerate(commands):
            if command is _STOP:
                stopping = ServerStopping("the server is shutting down")
                self._fail_all(stopping)
                for later in commands[index + 1 :] + self._take_commands(block=False):
                    if isinstance(later, Submission):
                        later.deliver(stopping)
                return False
            if isinstance(command, Abort):
                self._abort(command.request_ids)
            else:
                self._add(command)
                taken[command.client] += len(command.request_ids)
        self._publish()
        with self._untaken_lock:
            self._untaken -= taken
        if self.engine.has_unfinished():
            self._step()
            self._publish()
        return True

    def _take_commands(self, block: bool) -> list:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, submission: Submission) -> None:
        added = []
        try:
            for request_id, params in zip(submission.request_ids, submission.params):
                self.engine.add_request(
                    submission.prompt_token_ids, params, request_id,
                    client=submission.client, priority=submission.priority,
                )
                added.append(request_id)
        except Exception as exc:  # RequestError: the client's mistake; anything else: ours, reported as such
            for request_id in added:
                self.engine.abort(request_id)
            submission.deliver(exc)
            return
        for request_id in added:
            self._routes[request_id] = submission
        submission.deliver(ACCEPTED)

    def _abort(self, request_ids: list[str]) -> None:
        routed = [request_id for request_id in request_ids if self._routes.pop(request_id, None) is not None]
        for request_id in routed:
            self.engine.abort(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the %d requests in flight", len(self._routes))
            self._fail_all(EngineStepError(f"the engine failed while running this request: {exc!r}"))
            return
        for out in outputs:
            submission = self._routes[out.request_id]
            if out.finished:
                self.engine.release(out.request_id)
                del self._routes[out.request_id]
            submission.deliver(out)

    def _fail_all(self, error: Exception) -> None:
        """Abort every request in flight and send each submission the error, once."""
        failed = {id(s): s for s in self._routes.values()}
        try:
            self._abort(list(self._routes))
        finally:  # even if the engine fails to abort, nobody is left waiting
            self._routes.clear()
            for submission in failed.values():
                submission.deliver(error)

    def _publish(self) -> None:
        self.snapshot = self.engine.stats()
        now, samples = time.monotonic(), self._rate_samples
        if len(samples) > 1 and now - samples[-2][0] < RATE_SAMPLE_SECONDS:
            samples = samples[:-1]  # the latest sample moves forward until the next one is due
        self._rate_samples = (*samples[-(RATE_SAMPLES - 1):], (now, self.snapshot["generation_tokens"]))
