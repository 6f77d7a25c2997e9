"""Ranks within rows of scores: what the top-k choices of block selection and token merging compare."""

from __future__ import annotations

import torch


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's place [..., n] when its row is sorted by score, highest first (0 = best; ties: earlier first)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    places = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)
