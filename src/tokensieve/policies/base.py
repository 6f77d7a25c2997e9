"""The KV policy interface: a policy scores the stored entries of every (layer, KV head); the engine
keeps the best ones under a budget and frees the rest for real.

A policy may ask to see attention: the engine then records, after each forward, how much attention
the latest queries paid to every stored entry (summed over the query heads that share a KV head),
and hands that record to `scores` when it compresses. A policy may also read the stored keys and
values themselves, and the statistics of the prompt's queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

KEEP = float("inf")  # the score of an entry a policy protects (sinks, recent window)


@dataclass
class EntryView:
    """One sequence's stored entries as a policy sees them, all layers at once: [layers, kv_heads, entries].

    Entries are in storage order (oldest first); index >= lengths[l, h] is padding.
    """

    attention: torch.Tensor | None  # recorded attention per entry (0 where never observed); None if not asked for
    positions: torch.Tensor  # the position each entry was computed at
    lengths: torch.Tensor  # [layers, kv_heads] stored entries
    budgets: torch.Tensor  # [layers, kv_heads] entries each head may keep
    # layer -> its keys and values [kv_heads, entries, dim] in float32 (post-RoPE keys), for a policy that reads them
    stored: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
    queries: QueryMoments | None = None  # the prompt's queries, for a policy that models future ones

    def newest(self, counts: torch.Tensor) -> torch.Tensor:
        """Mask of the `counts[l, h]` most recent stored entries of every (layer, head)."""
        index = torch.arange(self.positions.shape[-1], device=self.positions.device)
        lengths = self.lengths.unsqueeze(-1)
        return (index >= lengths - counts.unsqueeze(-1)) & (index < lengths)


@dataclass
class QueryMoments:
    """Mean and covariance of the queries seen so far, before RoPE, per layer and query head, and the
    rotation a future query gets on average (RoPE's cos and sin averaged over the next positions)."""

    mean: torch.Tensor  # [layers, heads, dim]
    covariance: torch.Tensor  # [layers, heads, dim, dim]
    future_cos: torch.Tensor  # [dim]
    future_sin: torch.Tensor  # [dim]


class KVPolicy:
    """Subclasses set `name`, say what attention they need, and implement `scores` (higher = keep)."""

    name: ClassVar[str]
    evicts: ClassVar[bool] = True
    observed_queries: int | None = 0  # latest queries per forward whose attention is recorded; None: all
    accumulate: ClassVar[bool] = False  # add each forward's attention to the record instead of replacing it
    keeps_maximum: ClassVar[bool] = False  # record the most attention an entry got from one query head and query
    reads_entries: ClassVar[bool] = False  # scores read the stored keys and values (EntryView.stored)
    # scores read the prompt's query moments (EntryView.queries); such a policy also sets `sinks` (positions
    # whose queries are left out) and `future_positions` (how far ahead RoPE's rotation is averaged)
    models_queries: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = False  # attention is observed only while the context is repeated (KVzip)
    decay: float = 1.0  # with accumulate: the record is multiplied by this once per query

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def attention_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Turn scaled q.k logits [..., entries] (-inf where not visible) into the weights that are recorded."""
        return torch.softmax(logits, dim=-1)

    def scores(self, view: EntryView) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = {k: v for k, v in vars(self).items() if k != "generator"}
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in options.items())})"


def ratio_of_budget(view: EntryView, ratio: float) -> torch.Tensor:
    """The newest `ratio` of each head's budget, as a protection mask (H2O's and Keyformer's recent window)."""
    return view.newest((view.budgets * ratio).long())
