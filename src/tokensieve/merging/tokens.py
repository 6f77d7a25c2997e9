"""Operations on a padded batch of token states shared by every merging method.

Each row keeps its real tokens at the front, in their original order, then pads of size 0. Its first
and last real tokens ([CLS] and [SEP]) are protected: they never merge and are never merged into.
"""

from __future__ import annotations

import torch


def mergeable_mask(size: torch.Tensor) -> torch.Tensor:
    """[B, S]: real tokens other than each row's first and last."""
    real = size > 0
    last = real.sum(1, keepdim=True) - 1
    positions = torch.arange(size.shape[1], device=size.device)
    return real & (positions > 0) & (positions < last)


def merge(x: torch.Tensor, size: torch.Tensor, sources: torch.Tensor, destination: torch.Tensor,
          kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every source token into its destination by a size-weighted average, then drop the
    sources (and any token outside `kept`). sources [B, S] bool, destination [B, S] positions."""
    weight, own = size * sources, size * ~sources
    destination = torch.where(sources, destination, torch.zeros_like(destination))
    received = torch.zeros_like(size).scatter_add_(1, destination, weight)
    total = own + received
    summed = (x * own.unsqueeze(-1)).scatter_add_(
        1, destination.unsqueeze(-1).expand_as(x), x * weight.unsqueeze(-1))
    merged_into = received > 0
    x = torch.where(merged_into.unsqueeze(-1), summed / total.clamp_min(1e-12).unsqueeze(-1), x)
    survivors = (size > 0) & ~sources & (kept if kept is not None else True)
    return compact(x, torch.where(survivors, total, torch.zeros_like(total)), survivors)


def compact(x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's kept tokens to its front, in order, and cut the batch to its longest row."""
    width = int(kept.sum(1).max())
    order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)[:, :width]
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    size = size.gather(1, order) * kept.gather(1, order)
    return x, size
