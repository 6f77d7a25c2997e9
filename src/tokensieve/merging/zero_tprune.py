"""Zero-TPrune ("Zero-Shot Token Pruning through Leveraging of the Attention Graph"): prune, not merge.

Importance is a weighted PageRank over each head's attention graph (s <- A^T s from uniform scores over
the row's real tokens), combined over heads by root mean square. Three stages: a one-iteration ranking
splits the tokens into a less and a more important half; the less important tokens most similar (cosine
of the merging metric) to one of the more important half are pruned (S-stage, half the removals); then
full PageRank over the survivors prunes the least important (I-stage, the other half).
"""

from __future__ import annotations

import torch

from ..ranking import ranks


def pagerank_iterations(layer: int, num_layers: int) -> int:
    """More iterations in the first third of the layers, fewer in the middle, one at the end, as in the
    paper; but 5 / 2 / 1, not its 30-50 / 5-10 / 1: on all-MiniLM-L6-v2 the walk never converges (it
    oscillates) and 3 to 30 early iterations give the same embeddings (BENCHMARKS.md), 30 at 1.2x the time."""
    third = max(num_layers // 3, 1)
    return 5 if layer < third else 2 if layer < num_layers - third else 1


def importance(attention: torch.Tensor, alive: torch.Tensor, iterations: int) -> torch.Tensor:
    """Weighted PageRank of each token over the graph among `alive` tokens: attention [B, H, S, S] -> [B, S]."""
    alive_scores = alive.to(attention.dtype)[:, None, :]
    scores = alive_scores / alive_scores.sum(-1, keepdim=True)
    for _ in range(iterations):
        scores = (scores.unsqueeze(-2) @ attention).squeeze(-2) * alive_scores
    return scores.pow(2).mean(1).sqrt()


def zero_tprune_choice(size: torch.Tensor, mergeable: torch.Tensor, metric: torch.Tensor, attention: torch.Tensor,
                       removals: torch.Tensor, layer: int, num_layers: int):
    """Tokens to drop, among the mergeable ones [B, S] (see tokens.mergeable_mask): (no sources, their
    placeholder destinations, the kept mask)."""
    similar_count = removals // 2
    first_look = importance(attention, size > 0, 1).masked_fill(~mergeable, float("inf"))
    less_important = mergeable & (ranks(-first_look) < mergeable.sum(1, keepdim=True) // 2)
    similarity = (metric @ metric.transpose(1, 2)).masked_fill(~(mergeable & ~less_important)[:, None, :], float("-inf"))
    best = similarity.amax(-1).masked_fill(~less_important, float("-inf"))
    pruned = less_important & (ranks(best) < similar_count[:, None]) & (best > float("-inf"))
    alive = (size > 0) & ~pruned
    scores = importance(attention, alive, pagerank_iterations(layer, num_layers))
    scores = scores.masked_fill(~(mergeable & alive), float("inf"))
    pruned |= ranks(-scores) < (removals - pruned.sum(1))[:, None]
    no_sources = torch.zeros_like(pruned)
    return no_sources, torch.zeros_like(size, dtype=torch.long), (size > 0) & ~pruned
