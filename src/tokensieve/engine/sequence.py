"""A request as the engine sees it: tokens, progress, KV layout and stopping state. Plain Python."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from ..sampling_params import SamplingParams
from .block_table import BlockTable


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_order: int
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_processed: int = 0  # tokens whose keys/values have been computed (not the entries still stored)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    block_table: BlockTable | None = None
    seed: int = 0  # what the sampler's draws for this request derive from
    want_prompt_logits: bool = False
    prompt_logits: list[Any] = field(default_factory=list)
    num_preemptions: int = 0
    compress_len: int | None = None  # leading prompt tokens the KV policy compresses while prefilling (None: no policy)
    kv_attention: list[Any] | None = None  # per layer: attention each stored entry received, if the policy asks
    query_sums: Any = None  # QuerySums of the compressed prompt's queries, if the policy models queries
    forwards_since_compression: int = 0
    selection_cache: Any = None  # TokenSelect's SelectionCache, when decoding reuses block selections
    speculates: bool = False
    draft: Any = None  # the VerificationBlock of the next forward, when speculating
    drafter_state: dict = field(default_factory=dict)  # each drafter's memory of this sequence
    first_logits_position: int | None = None  # prompt positions from here on get logits (None: only the last)
    client: str = "default"  # who sent it: fair scheduling shares the engine between clients
    priority: int = 0  # lower runs first among the same client's requests
    logprobs: list[Any] | None = None  # a TokenLogprob per generated token, when params.logprobs is set
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    shares_prefix: bool = False  # takes its prefix from the prefix cache and adds its full blocks to it
    block_keys: list[int] = field(default_factory=list)  # prefix-cache key of each full block of token_ids
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_unprocessed(self) -> int:
        return len(self.token_ids) - self.num_processed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.token_ids.append(token_id)

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
