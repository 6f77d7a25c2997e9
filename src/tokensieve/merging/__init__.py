"""Token merging and pruning between the layers of an encoder (ToMe, PiToMe, Zero-TPrune)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import MergingConfig
from .pitome import pitome_choice
from .tokens import merge, mergeable_mask
from .tome import tome_choice
from .zero_tprune import zero_tprune_choice

__all__ = ["MergingConfig", "make_reducer"]


class PlannedReducer:
    """Runs a method's choice in each layer with a planned removal count per row (see bert.TokenReducer)."""

    def __init__(self, config: MergingConfig, plan: torch.Tensor):
        self.config, self.plan = config, plan

    def wants_attention(self, layer: int) -> bool:
        return self.config.method == "zero_tprune" and bool(self.plan[layer].any())

    def attention_bias(self, size: torch.Tensor) -> torch.Tensor:
        return size.log() if self.config.proportional_attention else (size > 0).to(size.dtype).log()

    def reduce(self, layer, x, size, keys, attention):
        mergeable = mergeable_mask(size)
        removals = torch.minimum(self.plan[layer].to(size.device), mergeable.sum(1) // 2)
        if not removals.any():
            return x, size
        metric = F.normalize(x if self.config.metric == "hidden" else keys.mean(1), dim=-1)
        if self.config.method == "tome":
            return merge(x, size, *tome_choice(mergeable, metric, removals))
        if self.config.method == "pitome":
            return merge(x, size, *pitome_choice(mergeable, metric, removals, layer, len(self.plan)))
        return merge(x, size, *zero_tprune_choice(size, mergeable, metric, attention, removals, layer, len(self.plan)))


def make_reducer(config: MergingConfig | None, num_layers: int, size: torch.Tensor) -> PlannedReducer | None:
    """The reducer of a batch (size [B, S]: 1 for real tokens, 0 for pads), or None without merging."""
    if config is None:
        return None
    return PlannedReducer(config, config.plan(num_layers, mergeable_mask(size).sum(1).cpu()))
