"""tokensieve: a lean inference engine for Llama-family LLMs with per-head paged KV storage."""

from .config import EngineConfig, KVPolicyConfig, KVSelectionConfig, SpeculativeConfig
from .errors import ModelLoadError, RequestError, TokensieveError
from .llm import LLM
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = [
    "LLM",
    "EngineConfig",
    "KVPolicyConfig",
    "KVSelectionConfig",
    "SpeculativeConfig",
    "SamplingParams",
    "RequestOutput",
    "TokensieveError",
    "ModelLoadError",
    "RequestError",
]
