"""Policies that accumulate the attention each entry receives over time: H2O, A2SF, Keyformer."""

from __future__ import annotations

import torch

from .base import KEEP, EntryView, KVPolicy, ratio_of_budget


class H2O(KVPolicy):
    """Heavy hitters: the attention each key has accumulated from every query so far, plus a recent
    window of `recent_ratio` of the budget."""

    name = "h2o"
    observed_queries = None
    accumulate = True

    def __init__(self, recent_ratio: float = 0.5, seed: int = 0):
        super().__init__(seed)
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio}")
        self.recent_ratio = recent_ratio

    def scores(self, view: EntryView) -> torch.Tensor:
        return view.attention.masked_fill(ratio_of_budget(view, self.recent_ratio), KEEP)


class A2SF(H2O):
    """H2O whose accumulated score is multiplied by a forgetting factor after every query, so old
    attention counts less and the bias toward early tokens goes away."""

    name = "a2sf"

    def __init__(self, forgetting: float = 0.99, recent_ratio: float = 0.1, seed: int = 0):
        super().__init__(recent_ratio, seed)
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.decay = self.forgetting = forgetting


class Keyformer(H2O):
    """H2O with a Gumbel-regularised score: the accumulated softmax of attention logits plus Gumbel
    noise, at temperature `tau`, and a recent window. The noise is drawn per (query head, key), as
    the paper's zeta_i is indexed by the key, and shared by the queries of one forward: noise for
    every (query, key) pair of a long prefill would cost more than the attention itself."""

    name = "keyformer"

    def __init__(self, tau: float = 1.0, recent_ratio: float = 0.3, seed: int = 0):
        super().__init__(recent_ratio, seed)
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = tau

    def attention_weights(self, logits: torch.Tensor) -> torch.Tensor:
        shape = logits.shape[:-2] + (1, logits.shape[-1])
        uniform = torch.rand(shape, generator=self.generator).clamp_(min=1e-10).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform))
        return torch.softmax((logits + gumbel) / self.tau, dim=-1)
