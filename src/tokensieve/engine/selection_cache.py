"""TokenSelect's Selection Cache: consecutive queries of a sequence are often alike, so a layer can attend
to the blocks it chose for an earlier query instead of choosing again.

A layer's choice is kept with the query that made it and the state of the sequence's blocks then. A
later query of the same layer reuses it while its cosine similarity to that query is at least the
threshold and the sequence's blocks are the same ones (no block added, dropped or moved: only the
last block has grown, and it is always among the chosen)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Choice:
    query: torch.Tensor  # [kv_heads, group, dim]: the query that chose
    places: torch.Tensor  # [kv_heads, chosen]: the chosen blocks' places in the block table, in order
    selected_lengths: torch.Tensor  # [kv_heads]: entries in the chosen blocks then
    lengths: torch.Tensor  # [kv_heads]: entries stored then
    budget: torch.Tensor  # [kv_heads]: blocks the budget allowed then
    version: int  # the block table's version then


class SelectionCache:
    """One sequence's choices, by layer."""

    def __init__(self):
        self.choices: dict[int, Choice] = {}

    def reusable(self, layer: int, query: torch.Tensor, budget: torch.Tensor, version: int, threshold: float) -> Choice | None:
        """The layer's earlier choice if `query` [kv_heads, group, dim] may reuse it, else None."""
        choice = self.choices.get(layer)
        if choice is None or choice.version != version or not torch.equal(choice.budget, budget):
            return None
        similarity = torch.nn.functional.cosine_similarity(query.flatten().float(), choice.query.flatten().float(), dim=0)
        return choice if float(similarity) >= threshold else None
