"""Lookahead decoding (Jacobi iteration) with an n-gram pool.

Beside the draft tree, every verification forward carries a window of `levels` x `width` guessed
tokens. Column c is a chain: its token at level l guesses the token c + l + 1 places after the root,
sits at that position, and sees the root, the level-0 guesses of the columns before it and its own
column below it. The model's prediction after the top of each column completes an n-gram
(the column + that prediction) that goes into the pool under its first token; the window then
moves up one level, its new top level made of those predictions (one Jacobi step). Drafts are
the pool's n-grams that start with the root token.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .tree import ROOT, DraftTree


class LookaheadDrafter:
    name = "lookahead"

    def __init__(self, ngram: int = 4, width: int = 4, ngrams_per_key: int = 7, seed: int = 0):
        if ngram < 2 or width < 1:
            raise ValueError(f"lookahead needs ngram >= 2 and width >= 1, got {ngram} and {width}")
        self.levels, self.width, self.ngrams_per_key = ngram - 1, width, ngrams_per_key
        self.rng = np.random.default_rng(seed)
        self.offsets, self.mask = self._layout()

    @property
    def branch_size(self) -> int:
        return self.levels * self.width

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """Position offsets after the root [branch] and who sees whom [branch, branch]; row = l * width + c."""
        level, column = np.divmod(np.arange(self.branch_size), self.width)
        offsets = column + level + 1
        earlier_column_start = (level[None, :] == 0) & (column[None, :] < column[:, None])
        own_column_below = (column[None, :] == column[:, None]) & (level[None, :] <= level[:, None])
        return offsets, earlier_column_start | own_column_below

    def _state(self, state: dict, token_ids: list[int]) -> dict:
        if "window" not in state:  # start from random tokens of the prompt, as LADE does
            state["window"] = self.rng.choice(np.asarray(token_ids), size=(self.levels, self.width))
            state["pool"] = {}
        return state

    def branch_tokens(self, state: dict, token_ids: list[int]) -> np.ndarray:
        return self._state(state, token_ids)["window"].reshape(-1)

    def learn(self, state: dict, branch_predictions: np.ndarray) -> None:
        """One Jacobi step from the model's greedy token after each branch row: new n-grams into
        the pool, window up."""
        window = state["window"]
        predictions = np.asarray(branch_predictions).reshape(self.levels, self.width)
        top = predictions[-1]
        pool: dict = state["pool"]
        for column in range(self.width):
            ngram = tuple(int(t) for t in window[:, column]) + (int(top[column]),)
            entries = pool.setdefault(ngram[0], OrderedDict())
            entries.pop(ngram[1:], None)
            entries[ngram[1:]] = True  # most recent last
            if len(entries) > self.ngrams_per_key:
                entries.popitem(last=False)
        state["window"] = np.concatenate([window[1:], top[None, :]])

    def propose(self, state: dict, token_ids: list[int], tree: DraftTree, max_depth: int) -> None:
        entries = self._state(state, token_ids)["pool"].get(tree.tokens[ROOT])
        if not entries:
            return
        for continuation in reversed(entries):  # most recent first
            chain = continuation[:max_depth]
            keys = [(self.name, depth) for depth in range(1, len(chain) + 1)]
            tree.add_chain(ROOT, chain, keys)
