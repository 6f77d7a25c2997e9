"""Settings of token merging inside an encoder, and the per-row, per-layer plan they give."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

METHODS = ("tome", "pitome", "zero_tprune")
SCHEDULES = ("constant", "decreasing")
METRICS = ("hidden", "keys")


@dataclass(frozen=True)
class MergingConfig:
    """method: "tome" (bipartite soft matching), "pitome" (energy-protected matching) or "zero_tprune"
    (PageRank importance over the attention graph; prunes). ratio: the fraction of each row's real
    tokens ([CLS] and [SEP] aside) removed by the last layer, spread over the layers from start_layer
    on: evenly ("constant") or more in early layers ("decreasing", weights L, L-1, ..., 1). metric: what
    similarity compares, the hidden states after attention ("hidden") or the attention keys averaged
    over heads ("keys", as the ToMe and PiToMe papers do); on all-MiniLM-L6-v2 the hidden states keep
    the embeddings closer to the unmerged ones (BENCHMARKS.md). proportional_attention: a merged token
    adds log(size) to the attention logits, so it weighs as the tokens it stands for (ToMe); off, it
    weighs as one token (PiToMe's BERT code)."""

    method: str = "tome"
    ratio: float = 0.5
    start_layer: int = 0
    schedule: str = "constant"
    metric: str = "hidden"
    proportional_attention: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown merging method {self.method!r}; known: {', '.join(METHODS)}")
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"merging ratio must be in [0, 1), got {self.ratio}")
        if self.start_layer < 0:
            raise ConfigError(f"start_layer must be non-negative, got {self.start_layer}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown merging schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.metric not in METRICS:
            raise ConfigError(f"unknown merging metric {self.metric!r}; known: {', '.join(METRICS)}")

    def plan(self, num_layers: int, mergeable: torch.Tensor) -> torch.Tensor:
        """How many tokens each row loses in each layer: [num_layers, B] from each row's count of
        mergeable tokens [B]. Rounded cumulative targets, so the rows' totals are exact."""
        if self.start_layer >= num_layers:
            raise ConfigError(f"start_layer {self.start_layer} is beyond the model's {num_layers} layers")
        active = num_layers - self.start_layer
        weights = torch.ones(active) if self.schedule == "constant" else torch.arange(active, 0, -1, dtype=torch.float64)
        cumulative = weights.cumsum(0) / weights.sum()
        targets = torch.floor(cumulative[:, None] * self.ratio * mergeable.double()[None, :] + 0.5).long()
        per_layer = torch.diff(targets, dim=0, prepend=torch.zeros_like(targets[:1]))
        return torch.cat([torch.zeros(self.start_layer, mergeable.shape[0], dtype=torch.long), per_layer])
