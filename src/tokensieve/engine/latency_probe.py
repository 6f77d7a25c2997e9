"""Times verification forwards on this machine: `batch` dummy sequences (random tokens, a given
context) carrying `drafted` draft tokens in all, through the engine's own runner and pool."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..sampling_params import SamplingParams
from ..speculative.speculator import VerificationBlock
from ..speculative.tree import DraftTree
from .block_manager import BlockManager
from .runner import ModelRunner
from .scheduler import ScheduledChunk
from .sequence import Sequence

ROUNDS = 5


def _chain_block(tokens: list[int]) -> VerificationBlock:
    tree = DraftTree(tokens[0])
    node = 0
    for token in tokens[1:]:
        node = tree.add(node, token)
    return VerificationBlock.of_tree(tree)


class LatencyProbe:
    def __init__(
        self, runner: ModelRunner, block_manager: BlockManager, vocab_size: int, max_model_len: int, rounds: int = ROUNDS
    ):
        self.runner, self.block_manager, self.vocab_size = runner, block_manager, vocab_size
        self.max_model_len, self.rounds = max_model_len, rounds

    def __call__(self, batch: int, grid: list[int], context: int) -> list[float]:
        """Median seconds of a forward carrying each number of drafted tokens in `grid` after `context`
        tokens (fewer where the model's context is shorter; inf for all when the pool has no room).
        The grid is timed round after round, so that a noisy moment of the machine spreads over
        every point instead of inflating one."""
        rng = np.random.default_rng(batch)
        manager = self.block_manager
        most = -(-max(grid) // batch)
        context = max(1, min(context, self.max_model_len - most - 1))
        needed = batch * manager.num_layers * manager.num_kv_heads * -(-(context + most + 1) // manager.block_size)
        if needed > manager.num_free_blocks:
            return [float("inf")] * len(grid)
        seqs = []
        try:
            for i in range(batch):
                ids = rng.integers(0, self.vocab_size, context + 1).tolist()
                seq = Sequence(f"latency-probe-{i}", ids, SamplingParams(temperature=0), arrival_order=-1)
                seq.block_table = manager.new_table()
                seqs.append(seq)
                manager.reserve(seq.block_table, context)
                self.runner.run([ScheduledChunk(seq, context)])
                seq.num_processed = context
            forwards = [self._chunks(seqs, drafted, rng) for drafted in grid]
            timings = [[] for _ in grid]
            for rounds in range(self.rounds + 1):  # the first round warms up
                for chunks, times in zip(forwards, timings):
                    seconds = self._time(chunks)
                    if rounds:
                        times.append(seconds)
            return [float(np.median(times)) for times in timings]
        finally:
            for seq in seqs:
                manager.drop(seq.block_table)

    def _chunks(self, seqs: list[Sequence], drafted: int, rng) -> list[ScheduledChunk]:
        per_seq = [drafted // len(seqs) + (i < drafted % len(seqs)) for i in range(len(seqs))]
        return [
            ScheduledChunk(seq, n + 1, _chain_block(rng.integers(0, self.vocab_size, n + 1).tolist())) if n
            else ScheduledChunk(seq, 1)
            for seq, n in zip(seqs, per_seq)
        ]

    def _time(self, chunks: list[ScheduledChunk]) -> float:
        """One forward, then its entries dropped again."""
        for chunk in chunks:
            self.block_manager.reserve(chunk.seq.block_table, chunk.num_tokens)
        began = time.perf_counter()
        logits, _ = self.runner.run(chunks)
        if logits.is_cuda:  # a forward only queues its kernels there
            torch.cuda.synchronize(logits.device)
        seconds = time.perf_counter() - began
        for chunk in chunks:
            self.block_manager.keep_appended(chunk.seq.block_table, chunk.num_tokens, np.zeros(0, dtype=np.int64))
        return seconds
