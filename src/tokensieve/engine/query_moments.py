"""Running mean and covariance of one sequence's queries before RoPE, per layer and query head, for
policies that model the queries still to come (ExpectedAttention)."""

from __future__ import annotations

import torch

from ..models.rope import RotaryEmbedding, apply_rotary
from ..policies import QueryMoments


class QuerySums:
    """Count, sum and sum of outer products of the queries recorded so far (float64)."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, device: torch.device):
        self.counts = torch.zeros(num_layers, dtype=torch.float64)
        self.sums = torch.zeros(num_layers, num_heads, head_dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_layers, num_heads, head_dim, head_dim, dtype=torch.float64, device=device)

    def add(self, layer: int, queries: torch.Tensor) -> None:
        """Add queries [tokens, heads, dim] (before RoPE) to `layer`'s sums."""
        queries = queries.double().transpose(0, 1)  # [heads, tokens, dim]
        self.counts[layer] += queries.shape[1]
        self.sums[layer] += queries.sum(1)
        self.outer[layer] += queries.transpose(1, 2) @ queries

    def moments(self, rotary: RotaryEmbedding, next_position: int, future_positions: int) -> QueryMoments:
        """The queries' moments (covariance divided by the count, as kvpress does), with RoPE's cos and sin
        averaged over the `future_positions` positions from `next_position` (those the table holds)."""
        count = self.counts.clamp(min=1).view(-1, 1, 1)
        mean = self.sums / count
        covariance = self.outer / count.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        last = rotary.cos.shape[0]
        window = slice(min(next_position, last - 1), min(next_position + future_positions, last))
        return QueryMoments(mean.float(), covariance.float(), rotary.cos[window].mean(0), rotary.sin[window].mean(0))


def unrotate(queries: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    """Queries [tokens, heads, dim] as they were before RoPE turned them at `positions` [tokens]."""
    cos, sin = rotary(positions, torch.float32)
    return apply_rotary(queries.float(), cos, -sin)  # the same turn backwards
