"""Policies that need no attention: the full cache, a random baseline, and StreamingLLM."""

from __future__ import annotations

import torch

from .base import KEEP, EntryView, KVPolicy


class FullCache(KVPolicy):
    """Keeps everything: the reference every other policy is measured against."""

    name = "full"
    evicts = False  # the engine runs no compression at all for it


class RandomEviction(KVPolicy):
    """Keeps a uniformly random subset: the floor any real policy must beat."""

    name = "random"

    def scores(self, view: EntryView) -> torch.Tensor:
        return torch.rand(view.positions.shape, generator=self.generator).to(view.positions.device)


class StreamingLLM(KVPolicy):
    """Attention sinks (the first `sinks` positions) plus the most recent window.

    Entries keep the positions they were computed at; the cache is not re-numbered, which matters
    only beyond the model's trained context length.
    """

    name = "streaming_llm"

    def __init__(self, sinks: int = 4, seed: int = 0):
        super().__init__(seed)
        self.sinks = sinks

    def scores(self, view: EntryView) -> torch.Tensor:
        scores = view.positions.float()
        return scores.masked_fill(view.positions < self.sinks, KEEP)
