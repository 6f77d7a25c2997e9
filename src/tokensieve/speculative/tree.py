"""A draft tree: the last known token (the root) and guessed continuations, flattened for one forward.

Nodes are numbered so that a parent always comes before its children; siblings never repeat a
token. Node i is verified at position n + depth(i) and attends to the prefix and to its own
ancestors (the ancestor mask). Each node carries the (source, key) pairs that proposed it, so that
acceptance can be credited, and, once valued, an estimate of the chance that verification accepts it.
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

    def add(self, parent: int, token: int, key: tuple | None = None) -> int:
        """The child of `parent` with `token` (created if new, else `key` joins its keys)."""
        child = self._children[parent].get(token)
        if child is None:
            child = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.values.append(0.0)
            self.keys.append([])
            self._children.append({})
            self._children[parent][token] = child
        if key is not None and key not in self.keys[child]:
            self.keys[child].append(key)
        return child

    def add_chain(self, parent: int, tokens, keys) -> None:
        """Add `tokens` below `parent`, one per depth, each with its key."""
        for token, key in zip(tokens, keys):
            parent = self.add(parent, int(token), key)

    def credited_keys(self, node: int) -> list[tuple]:
        """The keys the node's acceptance is credited to: each proposing source's key, marked with
        whether another source proposed the same token (sources that agree are right far more often
        than either alone, so a source's rate is kept apart for the two cases)."""
        agreed = len({key[0] for key in self.keys[node]}) > 1
        return [key + (agreed,) for key in self.keys[node]]

    def value(self, rate) -> None:
        """Estimate every node's chance of acceptance: its parent's times the best rate(key) of its
        credited keys (a rate is the chance of acceptance once the parent is accepted)."""
        rates: dict[tuple, float] = {}  # many nodes share a key
        for node in range(1, len(self.tokens)):
            best = 0.0
            for key in self.credited_keys(node):
                if key not in rates:
                    rates[key] = rate(key)
                best = max(best, rates[key])
            self.values[node] = self.values[self.parents[node]] * best

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
            new_index[node] = tree.add(parent, self.tokens[node])
            tree.keys[new_index[node]] = list(self.keys[node])
            tree.values[new_index[node]] = self.values[node]
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
