"""How many entries each (layer, KV head) keeps, and which ones: uniform, pyramid, adaptive or global budgets."""

from __future__ import annotations

import math

import torch

ALLOCATIONS = ("uniform", "pyramid", "adaptive", "global")
PYRAMID_SLOPE = 0.5  # the first layer keeps 1.5x the mean budget, the last 0.5x
ADAPTIVE_FLOOR = 0.2  # AdaKV's safeguard: each head keeps at least this share of its layer's mean budget


def layer_budgets(mean_budget: int, num_layers: int, num_kv_heads: int, allocation: str) -> torch.Tensor:
    """Budgets [layers, kv_heads] whose mean is `mean_budget` (pyramid: more in early layers)."""
    if allocation == "pyramid" and num_layers > 1:
        depth = torch.arange(num_layers, dtype=torch.float64) / (num_layers - 1)
        per_layer = (mean_budget * (1 + PYRAMID_SLOPE * (1 - 2 * depth))).round().long()
    else:
        per_layer = torch.full((num_layers,), mean_budget, dtype=torch.long)
    return per_layer.clamp_(min=1).unsqueeze(1).expand(num_layers, num_kv_heads).contiguous()


def retrieval_budgets(budgets: torch.Tensor, lengths: torch.Tensor, retrieval: torch.Tensor) -> torch.Tensor:
    """Budgets [layers, kv_heads] with the same total: the retrieval heads (bool [layers, kv_heads]) keep
    every entry, the others share what is left evenly (at least one entry each)."""
    others = int((~retrieval).sum())
    left = int(budgets.sum()) - int(lengths[retrieval].sum())
    return torch.where(retrieval, lengths, torch.full_like(lengths, max(1, left // max(others, 1))))


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every element along the last dim (0 = best score; ties go to the older entry)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def keep_mask(scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, allocation: str) -> torch.Tensor:
    """Which entries [layers, kv_heads, entries] to keep.

    uniform / pyramid: the top `budgets[l, h]` scores of each head. adaptive (AdaKV): each layer keeps
    `budgets[l].sum()` entries chosen across its heads by score, after every head has kept
    ADAPTIVE_FLOOR of its own budget, so heads whose attention is spread out keep more. global (KVzip's
    choice): `budgets.sum()` entries chosen across every layer and head by score, with no floor.
    """
    width = scores.shape[-1]
    stored = torch.arange(width, device=scores.device) < lengths.unsqueeze(-1)
    scores = scores.float().masked_fill(~stored, float("-inf"))
    if allocation == "global":
        return (_rank(scores.flatten()).view_as(scores) < budgets.sum()) & stored
    head_rank = _rank(scores)
    if allocation != "adaptive":
        return (head_rank < budgets.unsqueeze(-1)) & stored
    floor = (budgets * ADAPTIVE_FLOOR).long()
    kept = (head_rank < floor.unsqueeze(-1)) & stored
    remaining = budgets.sum(-1) - kept.sum((-1, -2))  # [layers]
    num_layers = scores.shape[0]
    layer_rank = _rank(scores.masked_fill(kept, float("-inf")).reshape(num_layers, -1)).view_as(scores)
    return kept | ((layer_rank < remaining.view(-1, 1, 1)) & stored)


def ratio_budget(keep_ratio: float, num_tokens: int) -> int:
    """Entries to keep when a `keep_ratio` of the `num_tokens` processed so far is kept."""
    return max(1, math.ceil(keep_ratio * num_tokens))
