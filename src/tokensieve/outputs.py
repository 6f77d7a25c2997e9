"""What the engine returns for a request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestMetrics:
    time_to_first_token: float | None  # seconds from arrival (queueing and prefill)
    total_time: float  # seconds from arrival to this output
    decode_tokens_per_second: float | None  # output tokens after the first, per second


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str  # all text generated so far
    delta_text: str  # text new since the previous output of this request
    token_ids: list[int]  # all tokens generated so far
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    metrics: RequestMetrics

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)
