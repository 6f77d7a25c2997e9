"""Engine settings, validated when created."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16  # entries of one (layer, KV head) per KV block
    kv_cache_bytes: int = 2 * 1024**3  # size of the KV pool (CPU pages are committed only when used)
    max_num_seqs: int = 16  # sequences running at once
    # A bigger prefill chunk runs prompts faster; a smaller one stalls other sequences' decoding for less
    # time (a 2048-token chunk of a 135M model takes about 4 s on 2 CPU cores).
    max_batched_tokens: int = 2048  # tokens in one forward
    prefill_chunk_size: int = 2048  # most prompt tokens of one sequence in one forward
    max_model_len: int | None = None  # context window; default: the model's
    native_kernels: bool = True  # C++ kernels (float32 on CPU): GGUF-block matmul, in-place paged decode attention

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_batched_tokens", "prefill_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        torch.device(self.device)  # raises on a malformed device string

    @property
    def wants_native_kernels(self) -> bool:
        return self.native_kernels and self.dtype == "float32" and torch.device(self.device).type == "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
