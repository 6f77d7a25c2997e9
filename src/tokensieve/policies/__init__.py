"""KV-cache policies: each scores stored entries; the engine keeps the best under a budget."""

from __future__ import annotations

from ..errors import ConfigError
from .accumulated import A2SF, H2O, Keyformer
from .base import EntryView, KVPolicy, QueryMoments
from .budget import ALLOCATIONS, keep_mask, layer_budgets, ratio_budget, retrieval_budgets
from .entries import ExpectedAttention, KeyDiff
from .kvzip import KVzip
from .observation import TOVA, SnapKV
from .position import FullCache, RandomEviction, StreamingLLM

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls for cls in (
        FullCache, RandomEviction, StreamingLLM, H2O, A2SF, Keyformer, SnapKV, TOVA, KeyDiff, ExpectedAttention, KVzip,
    )
}


def make_policy(name: str, options: dict | None = None, seed: int = 0) -> KVPolicy:
    """Build a policy by name; unknown names or bad options raise ConfigError saying what is accepted."""
    if name not in POLICIES:
        raise ConfigError(f"unknown KV policy {name!r}; known policies: {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**(options or {}), seed=seed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad options for KV policy {name!r}: {exc}") from None


__all__ = [
    "ALLOCATIONS", "POLICIES", "EntryView", "KVPolicy", "QueryMoments", "keep_mask", "layer_budgets", "make_policy", "ratio_budget",
]
