"""KVzip's scoring pass for the engine: the model repeats a sequence's context, chunk by chunk, while
the compressor records the attention the repeat pays to the stored entries; the repeat's own entries
are dropped after each chunk."""

from __future__ import annotations

import logging
import time

from ..policies import KVPolicy
from .block_manager import BlockManager
from .runner import ModelRunner
from .sequence import Sequence

log = logging.getLogger(__name__)
SEPARATOR = "\n#############"  # marks where a message's content ends inside the rendered template
INSTRUCTION_ROOM = 64  # entries a repeat chunk holds beyond its context tokens, at most: instruction, overlap, turn end
SMALLEST_CHUNK = 16


def turn_end(tokenizer) -> list[int]:
    """The tokens that close a user's message and open the assistant's reply in the chat template
    (kvpress's way: render a dummy message, take what follows its content); a newline without one."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode("\n", add_special_tokens=False)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "dummy context" + SEPARATOR}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(rendered.split(SEPARATOR)[1], add_special_tokens=False)


class ContextRepeat:
    def __init__(self, policy: KVPolicy, runner: ModelRunner, block_manager: BlockManager, tokenizer):
        self.policy, self.runner, self.block_manager, self.tokenizer = policy, runner, block_manager, tokenizer
        self._turn_end: list[int] | None = None  # rendered at the first repeat: chat templates load transformers
        self.seconds = 0.0  # spent repeating, over all sequences

    def __call__(self, seq: Sequence, observer) -> None:
        """Repeat `seq`'s context in chunks the free blocks can hold (the policy's size, or smaller while
        other sequences hold the pool); with no room at all the context is not scored and a warning says so."""
        began = time.perf_counter()
        chunk_tokens = min(self.policy.chunk_tokens, self._room() - INSTRUCTION_ROOM)
        if chunk_tokens < SMALLEST_CHUNK:
            log.warning("KV policy %s: no free KV blocks to repeat the context of request %s; its entries are "
                        "kept by position only", self.policy.name, seq.request_id)
            return
        if self._turn_end is None:
            self._turn_end = turn_end(self.tokenizer)
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        for token_ids in self.policy.repeat_chunks(seq.token_ids[: seq.compress_len], encode, self._turn_end, chunk_tokens):
            self.runner.run_discarded(seq, token_ids, observer, self.policy.observed_queries)
        self.seconds += time.perf_counter() - began

    def _room(self) -> int:
        """Entries every (layer, KV head) of a sequence can still add, however its last block is filled."""
        manager = self.block_manager
        per_head = manager.num_free_blocks // (manager.num_layers * manager.num_kv_heads)
        return max(0, per_head - 1) * manager.block_size
