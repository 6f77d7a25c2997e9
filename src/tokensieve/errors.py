"""Errors a user can act on. Each message names the problem and, where possible, the fix."""


class TokensieveError(Exception):
    """Base class of every error tokensieve raises on purpose."""


class ModelLoadError(TokensieveError):
    """The model could not be found or read."""


class RequestError(TokensieveError, ValueError):
    """A request is invalid (empty prompt, too long, bad sampling values); the engine is unaffected."""


class ConfigError(TokensieveError, ValueError):
    """An engine, KV-policy or speculative setting is invalid, or settings do not fit together."""


class ContextLengthError(RequestError):
    """A prompt does not fit the model's context window (leaving one token to generate)."""

    def __init__(self, max_model_len: int, num_tokens: int, message: str):
        super().__init__(message)
        self.max_model_len = max_model_len
        self.num_tokens = num_tokens
