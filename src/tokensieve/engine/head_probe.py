"""Retrieval heads vs streaming heads (RazorAttention, DuoAttention), found without training.

The model reads a sequence of random tokens twice. While it reads the second copy, a head that
retrieves from far back attends to where the current token stood in the first copy ("echo") or to
the token that followed it there ("induction"); a streaming head attends to the sinks and the recent
window instead. A (layer, KV head)'s retrieval score is its echo plus its induction attention,
averaged over the second copy's queries, its query heads and `REPEATS` random sequences.

The scores depend only on the weights, so they are cached per model like the latency table.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_root
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .runner import ModelRunner
from .scheduler import ScheduledChunk
from .sequence import Sequence

log = logging.getLogger(__name__)
PROBE_TOKENS = 256  # length of one random sequence (read twice)
REPEATS = 2  # random sequences averaged over
SEED = 0


def probe_file(fingerprint: object) -> Path:
    """Where the scores of the model described by `fingerprint` (any repr-able description) are cached."""
    digest = hashlib.sha256(repr((fingerprint, PROBE_TOKENS, REPEATS, SEED)).encode()).hexdigest()[:16]
    return cache_root() / "heads" / f"retrieval-{digest}.json"


class HeadProbe:
    def __init__(self, runner: ModelRunner, block_manager: BlockManager, vocab_size: int):
        self.runner, self.block_manager, self.vocab_size = runner, block_manager, vocab_size

    def scores(self, cache_file: Path | None) -> torch.Tensor:
        """Retrieval scores [layers, kv_heads] (echo + induction attention), from `cache_file` when it holds them."""
        if cache_file is not None and cache_file.exists():
            return torch.tensor(json.loads(cache_file.read_text())["retrieval"])
        scores = self.measure()
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps({"retrieval": scores.tolist()}))
        log.info("retrieval-head probe: scores measured%s", f", cached in {cache_file}" if cache_file else "")
        return scores

    def measure(self) -> torch.Tensor:
        manager = self.block_manager
        rng = np.random.default_rng(SEED)
        total = torch.zeros(manager.num_layers, manager.num_kv_heads, dtype=torch.float64)
        for repeat in range(REPEATS):
            ids = rng.integers(0, self.vocab_size, PROBE_TOKENS).tolist()
            seq = Sequence(f"head-probe-{repeat}", ids + ids, SamplingParams(temperature=0), arrival_order=-1)
            seq.block_table = manager.new_table()
            try:
                manager.reserve(seq.block_table, PROBE_TOKENS)
                self.runner.run([ScheduledChunk(seq, PROBE_TOKENS)])
                seq.num_processed = PROBE_TOKENS
                observe = lambda layer, logits, first, _: total[layer].add_(self._retrieval(logits, first))  # noqa: E731
                self.runner.run_discarded(seq, ids, observe)
            finally:
                manager.drop(seq.block_table)
        return (total / (REPEATS * PROBE_TOKENS)).float()

    @staticmethod
    def _retrieval(logits: torch.Tensor, first_query: int) -> torch.Tensor:
        """Echo + induction attention [kv_heads] summed over second-copy queries first_query.. (logits
        [kv_heads, group, queries, entries] over the first copy and the second copy so far)."""
        attention = torch.softmax(logits.double(), dim=-1).mean(1)  # [kv_heads, queries, entries]
        rows = torch.arange(attention.shape[1])
        copy = first_query + rows  # each query's token stood at this entry in the first copy
        echo = attention[:, rows, copy].sum(-1)
        follows = copy + 1 < PROBE_TOKENS  # the token after it there (the last query has none)
        induction = attention[:, rows[follows], copy[follows] + 1].sum(-1)
        return echo + induction
