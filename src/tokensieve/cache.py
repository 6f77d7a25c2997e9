"""Where tokensieve keeps what it builds once: converted tokenizers, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$TOKENSIEVE_CACHE, else $XDG_CACHE_HOME/tokensieve, else ~/.cache/tokensieve."""
    explicit = os.environ.get("TOKENSIEVE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokensieve"
