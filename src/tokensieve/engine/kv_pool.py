"""The tensors behind the KV blocks: keys, values and the position each entry was computed at."""

from __future__ import annotations

import numpy as np
import torch


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros whose CPU pages are only committed when first written (calloc), so an idle pool costs no RAM."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(shape + (itemsize,), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


class KVPool:
    """Storage of `num_blocks` blocks, each `block_size` entries of one (layer, KV head), in `dtype`
    (which may be narrower than the model's: float16 entries halve what decoding reads at long context).

    A flat slot is block * block_size + entry. Values lie entry-major ([blocks, block_size, dim]);
    keys lie dimension-major ([blocks, dim, block_size]: dim d of every entry of a block side by side),
    so the decode kernel scores a run of entries with one vector multiply-add per dim.
    """

    def __init__(
        self, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device, kernels=None
    ):
        self.num_blocks, self.block_size, self.head_dim, self.dtype = num_blocks, block_size, head_dim, dtype
        self.keys = _lazy_zeros((num_blocks, head_dim, block_size), dtype, device)
        native = device.type == "cpu" and dtype in (torch.float32, torch.float16)
        self.kernels = kernels if native else None  # store_kv, and the decode kernels read the pool in place
        self.values = _lazy_zeros((num_blocks, block_size, head_dim), dtype, device)
        self.positions = _lazy_zeros((num_blocks, block_size), torch.int64, device)

    def entry_major(self, name: str) -> torch.Tensor:
        """keys or values as [blocks, block_size, dim] (the keys as a strided view)."""
        return self.keys.transpose(1, 2) if name == "keys" else self.values

    def store(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys and values [tokens, kv_heads, dim] at flat slots [tokens, kv_heads]."""
        if self.kernels is not None:
            return self.kernels.store_kv(self.keys, self.values, slots.reshape(-1), keys, values)
        slots = slots.reshape(-1)
        keys, values = (t.reshape(-1, self.head_dim).to(self.dtype) for t in (keys, values))
        self.keys[slots // self.block_size, :, slots % self.block_size] = keys
        self.values.view(-1, self.head_dim)[slots] = values

    def move(self, source: torch.Tensor, destination: torch.Tensor) -> None:
        """Copy the entries at flat slots `source` to `destination` (keys, values and positions)."""
        size = self.block_size
        self.keys[destination // size, :, destination % size] = self.keys[source // size, :, source % size]
        for storage in (self.values, self.positions):
            flat = storage.view(self.num_blocks * size, -1)
            flat[destination] = flat[source]

    @property
    def bytes_per_entry(self) -> int:
        """Key + value bytes of one stored token in one (layer, KV head)."""
        return 2 * self.head_dim * self.keys.element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_entry

    @property
    def bytes_capacity(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @staticmethod
    def blocks_for_bytes(budget_bytes: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        entry = 2 * head_dim * torch.empty((), dtype=dtype).element_size()
        return max(1, budget_bytes // (block_size * entry))
