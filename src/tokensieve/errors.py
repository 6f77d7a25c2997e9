"""Errors a user can act on. Each message names the problem and, where possible, the fix."""


class TokensieveError(Exception):
    """Base class of every error tokensieve raises on purpose."""


class ModelLoadError(TokensieveError):
    """The model could not be found or read."""


class RequestError(TokensieveError, ValueError):
    """A request is invalid (empty prompt, too long, bad sampling values); the engine is unaffected."""


class ConfigError(TokensieveError, ValueError):
    """An engine, KV-policy or speculative setting is invalid, or settings do not fit together."""
