"""A draft tree: the last known token (the root) and guessed continuations, flattened for one forward.

Nodes are numbered so that a parent always comes before its children; siblings never repeat a
token. Node i is verified at position n + depth(i) and attends to the prefix and to its own
ancestors (the ancestor mask). Each node carries an estimate of the chance that verification
accepts it, and the (source, key) pairs that proposed it, so acceptance can be credited.
"""

from __future__ import annotations

import numpy as np

ROOT = 0


class DraftTree:
    def __init__(self, root_token: int):
        self.tokens = [root_token]
        self.parents = [-1]
        self.depths = [0]
        self.values = [1.0]  # estimated probability that the node is accepted (the root always is)
        self.keys: list[list[tuple]] = [[]]  # per node: the (source, key) pairs that proposed it
        self._children: list[dict[int, int]] = [{}]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_drafted(self) -> int:
        return len(self.tokens) - 1

    def children(self, node: int) -> dict[int, int]:
        """token -> child node."""
        return self._children[node]

    def add(self, parent: int, token: int, value: float, key: tuple | None = None) -> int:
        """The child of `parent` with `token` (created if new; a repeat keeps the higher value)."""
        child = self._children[parent].get(token)
        if child is None:
            child = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.values.append(value)
            self.keys.append([])
            self._children.append({})
            self._children[parent][token] = child
        else:
            self.values[child] = max(self.values[child], value)
        if key is not None and key not in self.keys[child]:
            self.keys[child].append(key)
        return child

    def add_chain(self, parent: int, tokens, keys, rate) -> None:
        """Add `tokens` below `parent`, one per depth, valued along the chain: the value of `parent`
        times rate(key) of every key down to the token."""
        value = self.values[parent]
        for token, key in zip(tokens, keys):
            value *= rate(key)
            parent = self.add(parent, int(token), value, key)

    def path(self, node: int) -> list[int]:
        """Nodes from the root down to `node`."""
        nodes = []
        while node != -1:
            nodes.append(node)
            node = self.parents[node]
        return nodes[::-1]

    def ranked(self) -> list[int]:
        """Drafted nodes, most likely first; a parent always ranks before its children."""
        return sorted(range(1, len(self.tokens)), key=lambda i: (-self.values[i], self.depths[i], i))

    def pruned(self, num_nodes: int) -> "DraftTree":
        """The tree of the `num_nodes` most likely drafted nodes (a closed subtree: ancestors included)."""
        keep = sorted(self.ranked()[:num_nodes])
        tree = DraftTree(self.tokens[ROOT])
        new_index = {ROOT: ROOT}
        for node in keep:  # parents come first in node order
            parent = new_index[self.parents[node]]
            new_index[node] = tree.add(parent, self.tokens[node], self.values[node])
            tree.keys[new_index[node]] = list(self.keys[node])
        return tree

    def ancestor_mask(self) -> np.ndarray:
        """[nodes, nodes] bool: node i sees node j iff j is i or one of its ancestors."""
        size = len(self.tokens)
        mask = np.zeros((size, size), dtype=bool)
        for node in range(size):
            parent = self.parents[node]
            if parent >= 0:
                mask[node] = mask[parent]
            mask[node, node] = True
        return mask
