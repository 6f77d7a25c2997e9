"""Continuous batching: which sequences run in the next forward, and how many tokens each. Plain Python.

Each step first gives every decoding sequence its one token, then fills the token budget with
prefill chunks (oldest first), then admits waiting sequences, in the fairness policy's order, while
blocks and budget allow. A sequence admitted starts from the longest cached prefix of its tokens; one
whose next block another running sequence is computing right now waits for it (BatchLLM's grouping:
a shared prefix is computed once). When the pool cannot hold what a running sequence needs, the
fairness policy names a victim: its blocks are released (its cached blocks stay in the prefix cache)
and it is recomputed later from its tokens, starting from what the cache still holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .block_manager import BlockManager
from .fairness import FirstComeFirstServed, VirtualTokenCounter
from .prefix_cache import extend_block_keys
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int
    draft: Any = None  # a speculative VerificationBlock: the last token, drafted tokens after it

    @property
    def completes_sequence(self) -> bool:
        """True when the chunk reaches the last known token, so its logits give the next token."""
        return self.draft is not None or self.seq.num_processed + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_batched_tokens: int, prefill_chunk_size: int,
        fairness: FirstComeFirstServed | VirtualTokenCounter | None = None,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.fairness = fairness or FirstComeFirstServed()
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # kept in arrival order
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # of the requests scheduled so far (computed or found cached)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.fairness.on_waiting(seq, self.waiting, self.running)
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table is not None:
            self.block_manager.drop(seq.block_table)
            seq.block_table = None

    def cache_computed(self, seq: Sequence) -> None:
        """Put the sequence's newly computed full blocks in the prefix cache (after its forward)."""
        if seq.shares_prefix:
            extend_block_keys(seq.block_keys, seq.token_ids, self.block_manager.block_size)
            self.block_manager.cache_full_blocks(seq.block_table, seq.block_keys, seq.token_ids)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget, num_preempted = self.max_batched_tokens, 0
        decoding = [s for s in self.running if s.num_unprocessed == 1]
        prefilling = [s for s in self.running if s.num_unprocessed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            draft = self._fitting_draft(seq, budget)
            num_tokens = len(draft) if draft is not None else self._chunk_size(seq, budget)
            if not self._make_room(seq, num_tokens, out):
                continue
            self.block_manager.reserve(seq.block_table, num_tokens)
            out.chunks.append(ScheduledChunk(seq, num_tokens, draft))
            budget -= num_tokens
            if len(out.preempted) > num_preempted:  # victims' chunks gave their tokens back
                budget, num_preempted = self.max_batched_tokens - sum(c.num_tokens for c in out.chunks), len(out.preempted)
        if not out.preempted:
            self._admit_waiting(budget, out)
        return out

    def _fitting_draft(self, seq: Sequence, budget: int):
        """The sequence's draft if it fits the token budget and the free blocks (speculation never
        preempts anyone); otherwise it is dropped and the sequence decodes one token."""
        draft, seq.draft = seq.draft, None
        if draft is None or len(draft) > budget or not self.block_manager.can_append(seq.block_table, len(draft)):
            return None
        return draft

    def _chunk_size(self, seq: Sequence, budget: int) -> int:
        """Tokens of `seq` for this step. A chunk never crosses the end of the part a KV policy compresses
        (the context before its question, or a preempted sequence's prompt before its output)."""
        num_tokens = min(seq.num_unprocessed, budget, self.prefill_chunk_size)
        if seq.compress_len is not None and seq.num_processed < seq.compress_len < len(seq.token_ids):
            num_tokens = min(num_tokens, seq.compress_len - seq.num_processed)
        return num_tokens

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the fairness policy's victims until `seq` fits; False if `seq` itself had to go."""
        while not self.block_manager.can_append(seq.block_table, num_tokens):
            victim = self.fairness.victim(self.running)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, victim: Sequence, out: SchedulerOutput) -> None:
        for chunk in [c for c in out.chunks if c.seq is victim]:
            out.chunks.remove(chunk)
        self.running.remove(victim)
        self.block_manager.release(victim.block_table)
        victim.num_processed = 0
        victim.prompt_logits.clear()
        victim.kv_attention = victim.query_sums = None
        victim.num_preemptions += 1
        self.num_preemptions += 1
        victim.status = SequenceStatus.WAITING
        self.add(victim)
        out.preempted.append(victim)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        pending = self._keys_being_computed()
        deferred: set[int] = set()  # each keeps its place: a slot stays free for it
        while budget > 0:
            candidates = [s for s in self.fairness.admission_order(self.waiting) if id(s) not in deferred]
            if not candidates:
                break
            seq = candidates[0]
            if len(self.running) + len(deferred) >= self.max_num_seqs:
                victim = self.fairness.displaced_by(seq, self.running) if self.running else None
                if victim is None:
                    break
                self._preempt(victim, out)  # its full blocks stay in the prefix cache for its return
            if seq.block_table is None:
                seq.block_table = self.block_manager.new_table()
            cached = self._start_from_cache(seq, pending)
            if cached is None:  # its next block is being computed: it waits for it and takes it from the cache
                deferred.add(id(seq))
                continue
            num_tokens = self._chunk_size(seq, budget)
            if not self.block_manager.can_append(seq.block_table, num_tokens):
                self.block_manager.release(seq.block_table)
                seq.num_processed = 0
                break
            self._record_admission(seq, cached)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.running.sort(key=lambda s: s.arrival_order)
            self.fairness.on_admitted(seq)
            self.block_manager.reserve(seq.block_table, num_tokens)
            out.chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
            if seq.shares_prefix:
                pending.update(seq.block_keys[len(seq.block_table.cached) :])

    def _keys_being_computed(self) -> set[int]:
        """Block keys that running sequences are prefilling and have not cached yet."""
        return {key for s in self.running if s.shares_prefix and s.num_unprocessed > 1
                for key in s.block_keys[len(s.block_table.cached) :]}

    def _start_from_cache(self, seq: Sequence, pending: set[int]) -> int | None:
        """Give an empty sequence the longest cached prefix of its tokens (at least its last token is
        left to compute); returns the number of cached tokens, or None when a running sequence is
        computing its next block."""
        if not seq.shares_prefix or seq.num_processed:
            return 0
        size = self.block_manager.block_size
        extend_block_keys(seq.block_keys, seq.token_ids, size)
        keys = seq.block_keys[: (len(seq.token_ids) - 1) // size]
        blocks = self.block_manager.cached_prefix(keys, seq.token_ids)
        if len(blocks) < len(keys) and keys[len(blocks)] in pending:
            return None
        self.block_manager.share(seq.block_table, blocks)
        seq.num_processed = len(blocks) * size
        return seq.num_processed

    def _record_admission(self, seq: Sequence, num_cached: int) -> None:
        """Count a first admission's prompt tokens and cache hits, and note when it was first scheduled."""
        cache = self.block_manager.prefix_cache
        if cache is not None and seq.shares_prefix and seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached
            cache.record_query(seq.num_prompt_tokens, num_cached)
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.perf_counter()
            self.num_prompt_tokens += seq.num_prompt_tokens
