"""Pool an encoder's token states into one vector per row, weighing each token by its size.

A merged token stands for `size` original tokens, so the size-weighted mean sum(s h) / sum(s) of a
merged sequence is the plain mean of the unmerged one whenever merges are size-weighted averages;
pads have size 0 and count for nothing. Real tokens fill each row's front (merging keeps them there).
"""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, size: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, S, D], size [B, S] -> [B, D], by a sentence-transformers pooling mode."""
    weights = size.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean_tokens":
        return (hidden * weights).sum(1) / weights.sum(1)
    if mode == "mean_sqrt_len_tokens":
        return (hidden * weights).sum(1) / weights.sum(1).sqrt()
    if mode == "max_tokens":
        return hidden.masked_fill(weights == 0, float("-inf")).amax(1)
    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = (size > 0).sum(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    raise ValueError(f"unknown pooling mode {mode!r}")
