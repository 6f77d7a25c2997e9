"""Token Recycling: reuse the candidates the model itself ranked high and verification threw away.

`successors[t]` holds the top-k next tokens the model predicted the last time it processed token t,
refreshed from every verified node (rejected ones too) and seeded from the prompt's logits. A
static tree of (parent, rank) slots is filled from it, one lookup per slot.
"""

from __future__ import annotations

import numpy as np

from .tree import ROOT, DraftTree


def static_tree(num_nodes: int, max_depth: int, top_k: int) -> list[tuple[int, int]]:
    """(parent slot, rank) of each slot, parents first (slot 0 is the root, slots count from 1): the
    `num_nodes` rank paths most likely under a prior where rank r is accepted with chance 0.6 / (r + 1)."""
    slots = [(-1, -1)]
    values = [1.0]
    frontier = [(0.6 / (rank + 1), 0, rank, 1) for rank in range(top_k)]  # (value, parent slot, rank, depth)
    while frontier and len(slots) <= num_nodes:
        frontier.sort(key=lambda item: -item[0])
        value, parent, rank, depth = frontier.pop(0)
        slots.append((parent, rank))
        values.append(value)
        if depth < max_depth:
            slot = len(slots) - 1
            frontier.extend((value * 0.6 / (r + 1), slot, r, depth + 1) for r in range(top_k))
    return slots[1:]


class TokenRecyclingDrafter:
    name = "recycling"

    def __init__(self, vocab_size: int, top_k: int, num_nodes: int, max_depth: int = 6):
        self.top_k = top_k
        self.successors = np.zeros((vocab_size, top_k), dtype=np.int64)
        self.known = np.zeros(vocab_size, dtype=bool)
        self.slots = static_tree(num_nodes, max_depth, top_k)

    def learn(self, token_ids, top: np.ndarray) -> None:
        """Remember the top-k successors the model gave after each of `token_ids`: `top` [tokens, k],
        the ids of each row's k largest logits, best first."""
        tokens = np.asarray(token_ids)
        self.successors[tokens] = top
        self.known[tokens] = True

    def propose(self, state: dict, token_ids: list[int], tree: DraftTree, max_depth: int) -> None:
        slot_node = [ROOT]  # the tree node of each filled slot (slot 0 is the root); None when unfilled
        slot_depth = [0]
        for parent_slot, rank in self.slots:
            parent = slot_node[parent_slot]
            depth = slot_depth[parent_slot] + 1
            slot_depth.append(depth)
            parent_token = tree.tokens[parent] if parent is not None else 0
            if parent is None or depth > max_depth or not self.known[parent_token]:
                slot_node.append(None)
                continue
            token = int(self.successors[parent_token, rank])
            slot_node.append(tree.add(parent, token, (self.name, depth, rank)))
