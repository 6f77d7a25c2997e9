"""PiToMe ("Accelerating Transformers with Spectrum-Preserving Token Merging"), its text variant.

Each token's energy is its mean Gaussian-kernel similarity to the row's other tokens,
exp(-((1 - cos) / sigma)^2 / 2) with sigma = 1 - margin and margin = 0.9 - 0.25 l / L (cosine of the
merging metric). Only the 2r most redundant (highest-energy) tokens may merge: the r highest form A, the next r
form B, and every A token merges into its most similar B token; the rest are protected.
"""

from __future__ import annotations

import torch

from ..ranking import ranks


def pitome_choice(mergeable: torch.Tensor, metric: torch.Tensor, removals: torch.Tensor, layer: int, num_layers: int):
    """Which tokens merge (sources [B, S]) and into which positions, r = removals[b] per row, among the
    mergeable tokens [B, S] (see tokens.mergeable_mask); metric [B, S, d] is unit-norm."""
    similarity = metric @ metric.transpose(1, 2)
    sigma = 1 - (0.9 - 0.25 * layer / num_layers)
    kernel = torch.exp(-0.5 * ((1 - similarity) / sigma) ** 2) * mergeable[:, None, :]
    energy = kernel.sum(-1) / mergeable.sum(-1, keepdim=True).clamp_min(1)
    place = ranks(energy.masked_fill(~mergeable, float("-inf")))
    in_a = mergeable & (place < removals[:, None])
    in_b = mergeable & (place >= removals[:, None]) & (place < 2 * removals[:, None])
    partner = similarity.masked_fill(~in_b[:, None, :], float("-inf")).argmax(-1)
    return in_a, partner
