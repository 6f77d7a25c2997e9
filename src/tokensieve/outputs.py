"""What the engine returns for a request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestMetrics:
    time_to_first_token: float | None  # seconds from arrival (queueing and prefill)
    total_time: float  # seconds from arrival to this output
    decode_tokens_per_second: float | None  # output tokens after the first, per second
    queue_time: float | None = None  # seconds from arrival until first scheduled


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling settings), and the likeliest tokens'."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), likeliest first


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
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when the request asked
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)
