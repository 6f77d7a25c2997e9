"""Lossless verification of a draft tree from the logits of one forward.

At node v (starting at the root) draw x from the target distribution at v, warped exactly as plain
sampling warps it (repetition penalty over the tokens before and along v's path). Emit x; if x is
one of v's children, descend to it and repeat, otherwise stop. Every emitted token is then an exact
sample of the target model (greedy: x = argmax), and the accepted path's KV entries are reusable.
Each draw is the very one plain decoding makes at that position (the sampler's clocks are a function
of the request's seed and the position), so a seeded request emits the same tokens either way.
"""

from __future__ import annotations

import torch

from ..engine.sampler import draw_token, top_tokens
from ..sampling_params import SamplingParams
from .tree import ROOT, DraftTree


def accept_path(
    tree: DraftTree, logits: torch.Tensor, params: SamplingParams, token_ids: list[int], seed: int = 0,
    greedy_tokens: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Walk the tree; returns the accepted nodes (root first) and the emitted tokens (one more than
    the accepted drafted nodes). logits: [tree nodes, vocab], row i after node i; `seed`: the request's,
    so each draw is the one plain decoding makes at that position; `greedy_tokens`: each row's
    `top_tokens` best, when already known."""
    plain_greedy = params.greedy and params.repetition_penalty == 1.0
    best = None
    if plain_greedy:
        best = greedy_tokens if greedy_tokens is not None else top_tokens(logits[: len(tree)], 1)[:, 0].tolist()
    node, path, emitted = ROOT, [ROOT], []
    while True:
        token = best[node] if plain_greedy else draw_token(logits[node], params, token_ids + emitted, seed)
        emitted.append(token)
        child = tree.children(node).get(token)
        if child is None:
            return path, emitted
        path.append(child)
        node = child
