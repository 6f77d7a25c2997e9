"""Lossless verification of a draft tree from the logits of one forward.

At node v (starting at the root) draw x from the target distribution at v, warped exactly as plain
sampling warps it (repetition penalty over the tokens before and along v's path). Emit x; if x is
one of v's children, descend to it and repeat, otherwise stop. Every emitted token is then an exact
sample of the target model (greedy: x = argmax), and the accepted path's KV entries are reusable.
"""

from __future__ import annotations

import torch

from ..engine.sampler import greedy_token, target_distribution, top_tokens
from ..sampling_params import SamplingParams
from .tree import ROOT, DraftTree


def draw(logits: torch.Tensor, params: SamplingParams, seen_token_ids: list[int], generator) -> int:
    """The token plain decoding would emit from these logits (the same warping, the same generator)."""
    if params.greedy:
        return greedy_token(logits, params, seen_token_ids)
    probs = target_distribution(logits, params, seen_token_ids)
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_path(
    tree: DraftTree, logits: torch.Tensor, params: SamplingParams, token_ids: list[int], generator=None,
    greedy_tokens: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Walk the tree; returns the accepted nodes (root first) and the emitted tokens (one more than
    the accepted drafted nodes). logits: [tree nodes, vocab], row i after node i; `greedy_tokens`:
    each row's `top_tokens` best, when already known."""
    plain_greedy = params.greedy and params.repetition_penalty == 1.0
    best = None
    if plain_greedy:
        best = greedy_tokens if greedy_tokens is not None else top_tokens(logits[: len(tree)], 1)[:, 0].tolist()
    node, path, emitted = ROOT, [ROOT], []
    while True:
        token = best[node] if plain_greedy else draw(logits[node], params, token_ids + emitted, generator)
        emitted.append(token)
        child = tree.children(node).get(token)
        if child is None:
            return path, emitted
        path.append(child)
        node = child
