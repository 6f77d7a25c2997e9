"""Turns logits into tokens: repetition penalty, temperature, top-k, top-p, min-p, seeded draws.

`target_distribution` is the single definition of the warped distribution; plain sampling draws
from it and speculative verification must use the very same function to stay lossless.
"""

from __future__ import annotations

import torch

from ..kernels import kernels_take
from ..sampling_params import SamplingParams
from .sequence import Sequence


def apply_repetition_penalty(logits: torch.Tensor, seen_token_ids: list[int], penalty: float) -> torch.Tensor:
    """Make every already-seen token less likely: positive logits are divided, negative multiplied."""
    if penalty == 1.0 or not seen_token_ids:
        return logits
    seen = torch.tensor(sorted(set(seen_token_ids)), device=logits.device)
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def target_distribution(logits: torch.Tensor, params: SamplingParams, seen_token_ids: list[int]) -> torch.Tensor:
    """Probabilities [vocab] of the next token under `params` (for temperature > 0)."""
    logits = apply_repetition_penalty(logits.float(), seen_token_ids, params.repetition_penalty)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        probs = probs.clone()
        probs[order[mass_before >= params.top_p]] = 0.0  # keep the smallest set reaching top_p
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def top_tokens(logits: torch.Tensor, k: int, kernels=None) -> torch.Tensor:
    """Token ids [rows, k] of each row's k largest logits, best first. Column 0 is the greedy token:
    argmax's (a tie goes to the lower id), by the native kernel when there is one (a tenth of the time)."""
    if kernels_take(kernels, logits):
        return kernels.top_tokens(logits, k)
    best = logits.argmax(dim=-1, keepdim=True)
    if k == 1:
        return best
    top = torch.topk(logits, k, dim=-1).indices
    top[:, :1] = best  # an exact tie at the top may then repeat a token, which costs a drafter one guess
    return top


def greedy_token(logits: torch.Tensor, params: SamplingParams, seen_token_ids: list[int]) -> int:
    return int(apply_repetition_penalty(logits, seen_token_ids, params.repetition_penalty).argmax())


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], kernels=None) -> list[int]:
    """One next token per row of `logits` [rows, vocab]; row i belongs to seqs[i]."""
    plain_greedy = [i for i, s in enumerate(seqs) if s.params.greedy and s.params.repetition_penalty == 1.0]
    tokens: list[int | None] = [None] * len(seqs)
    if plain_greedy:
        best = top_tokens(logits[plain_greedy], 1, kernels)[:, 0].tolist()
        for row, token in zip(plain_greedy, best):
            tokens[row] = token
    for row, seq in enumerate(seqs):
        if tokens[row] is not None:
            continue
        if seq.params.greedy:
            tokens[row] = greedy_token(logits[row], seq.params, seq.token_ids)
        else:
            probs = target_distribution(logits[row], seq.params, seq.token_ids)
            tokens[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens
