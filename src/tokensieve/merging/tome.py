"""ToMe ("Token Merging: Your ViT but Faster"): bipartite soft matching.

Tokens alternate into sets A and B; each A token finds its most similar B token (cosine of the merging
metric: see MergingConfig.metric), and the r best-matched A tokens merge into their B partners.
"""

from __future__ import annotations

import torch

from ..ranking import ranks


def tome_choice(mergeable: torch.Tensor, metric: torch.Tensor, removals: torch.Tensor):
    """Which tokens merge (sources [B, S]) and into which positions, r = removals[b] per row, among the
    mergeable tokens [B, S] (see tokens.mergeable_mask); metric [B, S, d] is unit-norm."""
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    allowed = mergeable[:, ::2, None] & mergeable[:, None, 1::2]
    best, partner = scores.masked_fill(~allowed, float("-inf")).max(-1)
    chosen = (ranks(best) < removals[:, None]) & (best > float("-inf"))
    sources = torch.zeros_like(mergeable)
    sources[:, ::2] = chosen
    destination = torch.zeros_like(mergeable, dtype=torch.long)
    destination[:, ::2] = 2 * partner + 1
    return sources, destination
