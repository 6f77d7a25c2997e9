"""KVzip ("Query-Agnostic KV Cache Compression with Context Reconstruction"): an entry matters as much
as the model needs it to repeat the context it came from."""

from __future__ import annotations

import torch

from .base import KEEP, EntryView, KVPolicy

FIRST_REPEAT = "\n\nRepeat the previous context exactly."
NEXT_REPEAT = "\n\nRepeat the part of the previous context exactly, starting with"


class KVzip(KVPolicy):
    """Once the context is stored, the engine teacher-forces the model to repeat it, in chunks of
    `chunk_tokens` (each after FIRST_REPEAT, or NEXT_REPEAT and the previous chunk's last `overlap`
    tokens, closed as a user turn), and drops the repeat's own entries after each chunk. An entry's
    score is the most attention any repeating query of any query head paid it (softmax over everything
    the query sees); the first `sinks` positions are kept. It compresses once, when the context is in:
    its prefill holds the whole context, and costs about three prefills of it.
    """

    name = "kvzip"
    observed_queries = None
    accumulate = True
    keeps_maximum = True
    reconstructs = True

    def __init__(self, chunk_tokens: int = 2048, overlap: int = 8, sinks: int = 4, seed: int = 0):
        super().__init__(seed)
        if chunk_tokens < 1 or overlap < 0 or sinks < 0:
            raise ValueError(f"chunk_tokens must be >= 1, overlap and sinks >= 0; got {chunk_tokens}, {overlap}, {sinks}")
        self.chunk_tokens, self.overlap, self.sinks = chunk_tokens, overlap, sinks

    def repeat_chunks(self, context: list[int], encode, turn_end: list[int], chunk_tokens: int) -> list[list[int]]:
        """The token ids of each repeat forward: instruction, the turn's end, then `chunk_tokens` of the context."""
        chunks = []
        for start in range(0, len(context), chunk_tokens):
            if start == 0:
                instruction = encode(FIRST_REPEAT)
            else:
                instruction = encode(NEXT_REPEAT) + context[max(0, start - self.overlap) : start]
            chunks.append(instruction + turn_end + context[start : start + chunk_tokens])
        return chunks

    def scores(self, view: EntryView) -> torch.Tensor:
        return view.attention.masked_fill(view.positions < self.sinks, KEEP)
