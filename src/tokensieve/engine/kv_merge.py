"""Merge on evict (D2O, EMS): an evicted entry is folded into its most similar kept entry instead of dropped.

For one (layer, KV head): each evicted key's cosine similarity u to every kept key; its nearest kept
entry j takes it when u >= the threshold. Entry j then becomes D2O's weighted mean of itself and the
entries it took, keys and values alike:

    x_j <- (e * x_j + sum_i exp(u_ij) x_i) / (e + sum_i exp(u_ij))

(u <= 1, so an evicted entry never outweighs the kept one). A threshold of -1 merges every evicted
entry, as EMS does.
"""

from __future__ import annotations

import math

import torch

EVICTED_PER_SLICE = 1024  # bounds the [evicted, kept] similarities held at once


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor, threshold: float):
    """keys and values [entries, dim] of one (layer, KV head); kept and evicted: entry indices. Returns the
    kept entries that took any evicted one (indices into `keys`) and their merged keys and values."""
    if not len(kept) or not len(evicted):
        return kept[:0], keys[:0], values[:0]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    kept_unit = unit[kept]
    nearest = torch.empty(len(evicted), dtype=torch.long, device=keys.device)
    similarity = torch.empty(len(evicted), device=keys.device)
    for start in range(0, len(evicted), EVICTED_PER_SLICE):
        part = evicted[start : start + EVICTED_PER_SLICE]
        similarity[start : start + len(part)], nearest[start : start + len(part)] = (unit[part] @ kept_unit.T).max(-1)
    merging = similarity >= threshold
    weight = similarity[merging].exp()
    target = nearest[merging]
    total = torch.full((len(kept),), math.e, device=keys.device).index_add_(0, target, weight)
    merged = []
    for x in (keys, values):
        sums = (x[kept].float() * math.e).index_add_(0, target, x[evicted[merging]].float() * weight.unsqueeze(-1))
        merged.append(sums / total.unsqueeze(-1))
    took = torch.unique(target)
    return kept[took], merged[0][took], merged[1][took]
