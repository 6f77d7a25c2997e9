"""Policies that score the stored keys and values themselves, with no attention from the context:
KeyDiff and ExpectedAttention. Neither depends on which question comes later, and both cost one pass
over the stored entries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.rope import rotate_half
from .base import KEEP, EntryView, KVPolicy


class KeyDiff(KVPolicy):
    """Keep the keys least like the head's average direction: score = -cos(key, mean of the unit keys).

    Compressing after every prefill chunk, the mean is over what the head holds then: the paper's
    block-wise KeyDiff, with the chunk as its block.
    """

    name = "keydiff"
    reads_entries = True

    def scores(self, view: EntryView) -> torch.Tensor:
        scores = torch.zeros(view.positions.shape, dtype=torch.float32, device=view.positions.device)
        for layer in range(scores.shape[0]):
            keys, _ = view.stored(layer)  # [kv_heads, entries, dim]
            lengths = view.lengths[layer]
            stored = torch.arange(keys.shape[1], device=keys.device) < lengths.unsqueeze(-1)
            unit = F.normalize(keys, dim=-1) * stored.unsqueeze(-1)
            anchor = unit.sum(1, keepdim=True) / lengths.clamp(min=1).view(-1, 1, 1)
            scores[layer, :, : keys.shape[1]] = -F.cosine_similarity(keys, anchor, dim=-1)
        return scores


class ExpectedAttention(KVPolicy):
    """The attention future queries are expected to pay each entry, times the norm of its value.

    Future queries are modelled as a Gaussian: the mean and covariance of the prompt's queries before
    RoPE, turned by RoPE's rotation averaged over the next `future_positions` positions (R). A key k then
    gets logit k.(R mu)/sqrt(d) + k^T (R S R^T) k / 2d, softmaxed over the head's entries and averaged
    over the query heads that share the KV head; the score is (that + epsilon) * |v|. The first `sinks`
    positions are kept. kvpress's ExpectedAttentionPress, with its leaderboard's epsilon.
    """

    name = "expected_attention"
    reads_entries = True
    models_queries = True

    def __init__(self, future_positions: int = 512, sinks: int = 4, epsilon: float = 1e-2, covariance: bool = True,
                 value_norm: bool = True, seed: int = 0):
        super().__init__(seed)
        if future_positions < 1 or sinks < 0 or epsilon < 0:
            raise ValueError(f"future_positions must be >= 1, sinks and epsilon >= 0; got {future_positions}, {sinks}, {epsilon}")
        self.future_positions, self.sinks, self.epsilon = future_positions, sinks, epsilon
        self.covariance, self.value_norm = covariance, value_norm

    def scores(self, view: EntryView) -> torch.Tensor:
        moments = view.queries
        scores = torch.zeros(view.positions.shape, dtype=torch.float32, device=view.positions.device)
        rotation = _averaged_rotation(moments.future_cos, moments.future_sin)  # [dim, dim]
        for layer in range(scores.shape[0]):
            keys, values = view.stored(layer)  # [kv_heads, entries, dim]
            num_kv_heads, entries, dim = keys.shape
            mean = moments.mean[layer] @ rotation.T  # [heads, dim]
            per_query_head = keys.repeat_interleave(mean.shape[0] // num_kv_heads, dim=0)  # [heads, entries, dim]
            logits = (per_query_head @ mean.unsqueeze(-1)).squeeze(-1) / dim**0.5
            if self.covariance:
                covariance = rotation @ moments.covariance[layer] @ rotation.T  # [heads, dim, dim]
                logits += ((per_query_head @ covariance) * per_query_head).sum(-1) / (2 * dim)
            hidden = ~(torch.arange(entries, device=keys.device) < view.lengths[layer].unsqueeze(-1))
            hidden |= view.positions[layer, :, :entries] < self.sinks
            logits = logits.view(num_kv_heads, -1, entries).masked_fill(hidden.unsqueeze(1), float("-inf"))
            expected = torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(1)  # [kv_heads, entries]
            if self.value_norm:
                expected = (expected + self.epsilon) * values.norm(dim=-1)
            scores[layer, :, :entries] = expected.masked_fill(view.positions[layer, :, :entries] < self.sinks, KEEP)
        return scores


def _averaged_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation as a matrix, with averaged cos and sin [dim]: x -> x * cos + rotate_half(x) * sin."""
    identity = torch.eye(cos.shape[0], dtype=cos.dtype, device=cos.device)
    return torch.diag(cos) + torch.diag(sin) @ rotate_half(identity).T
