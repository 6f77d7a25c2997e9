"""Policies that look at the attention of the latest queries only: SnapKV and TOVA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import KEEP, EntryView, KVPolicy


class SnapKV(KVPolicy):
    """Attention from the last `window` queries (the observation window) to every entry, summed,
    max-pooled over neighbouring entries (`kernel`), top-k per KV head; the window itself is kept.

    Run after each prefill chunk, the window is the end of that chunk.
    """

    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 7, seed: int = 0):
        super().__init__(seed)
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"window must be >= 1 and kernel odd and >= 1, got window={window}, kernel={kernel}")
        self.window, self.kernel = window, kernel
        self.observed_queries = window

    def scores(self, view: EntryView) -> torch.Tensor:
        shape = view.attention.shape
        pooled = F.max_pool1d(view.attention.reshape(-1, 1, shape[-1]), self.kernel, 1, self.kernel // 2).view(shape)
        return pooled.masked_fill(view.newest(torch.full_like(view.lengths, self.window)), KEEP)


class TOVA(KVPolicy):
    """Token Omission Via Attention: keep the entries the current (latest) query attends to most."""

    name = "tova"
    observed_queries = 1

    def scores(self, view: EntryView) -> torch.Tensor:
        return view.attention
