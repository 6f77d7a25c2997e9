"""tokensieve: a lean inference engine for Llama-family LLMs with per-head paged KV storage."""

from .config import EngineConfig, KVPolicyConfig, KVSelectionConfig, SpeculativeConfig
from .embedder import Embedder
from .errors import ModelLoadError, RequestError, TokensieveError
from .llm import LLM
from .merging import MergingConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__all__ = [
    "LLM",
    "Embedder",
    "MergingConfig",
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
