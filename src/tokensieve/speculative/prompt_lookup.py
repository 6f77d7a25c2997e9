"""Prompt lookup: find the latest n tokens (n = max_ngram..1) earlier in prompt + output and propose
what followed them. Each distinct earlier match becomes a branch of the draft tree."""

from __future__ import annotations

from collections import defaultdict

from .tree import ROOT, DraftTree


class NgramIndex:
    """Where each n-gram (n <= max_ngram) of a token list ended, kept up to date as the list grows."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.followers: list[dict[tuple, list[int]]] = [defaultdict(list) for _ in range(max_ngram + 1)]
        self.num_indexed = 0  # tokens whose preceding n-grams are indexed

    def update(self, token_ids: list[int]) -> None:
        for end in range(max(self.num_indexed, 1), len(token_ids)):  # the n-gram ending before `end`
            for n in range(1, min(self.max_ngram, end) + 1):
                self.followers[n][tuple(token_ids[end - n : end])].append(end)
        self.num_indexed = max(self.num_indexed, len(token_ids))


class PromptLookupDrafter:
    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 4):
        self.max_ngram, self.min_ngram, self.max_matches = max_ngram, min_ngram, max_matches

    def propose(self, state: dict, token_ids: list[int], tree: DraftTree, max_depth: int) -> None:
        index = state.get("index") or state.setdefault("index", NgramIndex(self.max_ngram))
        index.update(token_ids)
        found = 0
        for n in range(min(self.max_ngram, len(token_ids)), self.min_ngram - 1, -1):
            followers = index.followers[n].get(tuple(token_ids[-n:]), ())
            for start in reversed(followers):  # latest match first
                if found == self.max_matches:
                    return
                continuation = token_ids[start : start + max_depth]
                keys = [(self.name, n, depth) for depth in range(1, len(continuation) + 1)]
                tree.add_chain(ROOT, continuation, keys)
                found += 1
            if found:  # a longer match is the better evidence; shorter ones only when none was found
                return
