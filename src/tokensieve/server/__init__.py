"""The OpenAI-compatible HTTP server (`tokensieve serve`)."""

from .app import create_app

__all__ = ["create_app"]
