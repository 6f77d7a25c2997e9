"""The tensors behind the KV blocks: keys, values, the position each entry was computed at, and, for
block selection, each block's per-dimension key bounds."""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import layer_ops
from .block_table import BlockTable


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
        self, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device, kernels=None,
        key_bounds: bool = False,
    ):
        self.dtype = dtype
        self.keys = _lazy_zeros((num_blocks, head_dim, block_size), dtype, device)
        self.values = _lazy_zeros((num_blocks, block_size, head_dim), dtype, device)
        native = device.type == "cpu" and dtype in (torch.float32, torch.float16)
        self._init_bookkeeping(num_blocks, block_size, head_dim, device, kernels if native else None, key_bounds, dtype)

    def _init_bookkeeping(self, num_blocks, block_size, head_dim, device, kernels, key_bounds: bool, bounds_dtype) -> None:
        """What every pool has beside its entries: sizes, kernels, positions and (for selection) key bounds."""
        self.num_blocks, self.block_size, self.head_dim, self.device = num_blocks, block_size, head_dim, device
        self.kernels = kernels  # store_kv, and the decode kernels read the pool in place
        self.positions = _lazy_zeros((num_blocks, block_size), torch.int64, device)
        # Quest's page summary: the per-dimension min and max of each block's keys (block_selection.py)
        self.key_min = _lazy_zeros((num_blocks, head_dim), bounds_dtype, device) if key_bounds else None
        self.key_max = _lazy_zeros((num_blocks, head_dim), bounds_dtype, device) if key_bounds else None

    def entry_major(self, name: str) -> torch.Tensor:
        """keys or values as [blocks, block_size, dim] (the keys as a strided view)."""
        return self.keys.transpose(1, 2) if name == "keys" else self.values

    @property
    def read_dtype(self) -> torch.dtype:
        """What read_blocks returns."""
        return self.dtype

    def read_blocks(self, name: str, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """keys or values of blocks `ids` as [len(ids), block_size, dim] in read_dtype (into `out` when given)."""
        return torch.index_select(self.entry_major(name), 0, ids, out=out)

    def store(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys and values [tokens, kv_heads, dim] at flat slots [tokens, kv_heads]."""
        slots = slots.reshape(-1)
        if self.key_min is not None:
            self._bound_new_keys(slots, keys)
        ops = layer_ops(self.kernels, keys)
        if ops is not None:
            return ops.store_kv(self.keys, self.values, slots, keys, values)
        keys, values = (t.reshape(-1, self.head_dim).to(self.dtype) for t in (keys, values))
        self.keys[slots // self.block_size, :, slots % self.block_size] = keys
        self.values.view(-1, self.head_dim)[slots] = values

    def _bound_new_keys(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Key bounds that cover the keys [tokens, kv_heads, dim] being written; a block whose first entry
        is written starts over (its earlier keys belonged to an owner that freed it)."""
        if self.kernels is not None:
            return self.kernels.widen_key_bounds(self.key_min, self.key_max, slots, keys, self.block_size)
        first_entries = slots[slots % self.block_size == 0]
        self.key_min[first_entries // self.block_size] = float("inf")
        self.key_max[first_entries // self.block_size] = float("-inf")
        self._widen_bounds(slots, keys.reshape(-1, self.head_dim).to(self.key_min.dtype))

    def _widen_bounds(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Widen the key bounds of the blocks holding `slots` to cover `keys` [len(slots), dim]."""
        blocks = (slots // self.block_size).unsqueeze(-1).expand_as(keys)
        self.key_min.scatter_reduce_(0, blocks, keys, "amin")
        self.key_max.scatter_reduce_(0, blocks, keys, "amax")

    def move(self, source: torch.Tensor, destination: torch.Tensor, table: BlockTable) -> None:
        """Copy the entries at flat slots `source` to `destination` (keys, values and positions), within
        the blocks of `table` (compaction, or the accepted path of a draft)."""
        size = self.block_size
        moved_keys, moved_values = self.keys[source // size, :, source % size], self.values.view(-1, self.head_dim)[source]
        flat_positions = self.positions.view(-1)
        flat_positions[destination] = flat_positions[source]
        self.overwrite(destination, moved_keys, moved_values, table)

    def overwrite(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: BlockTable) -> None:
        """Replace the keys and values [len(slots), dim] of entries `table` holds at flat `slots`."""
        size = self.block_size
        self.keys[slots // size, :, slots % size] = keys.to(self.dtype)
        self.values.view(-1, self.head_dim)[slots] = values.to(self.dtype)
        if self.key_min is not None:  # the bounds stay bounds (perhaps loose: what left a block still counts)
            self._widen_bounds(slots, keys.to(self.key_min.dtype))

    def paged_scores(self, q, block_tables, lengths, scale, row_of_slot, visibility, block_rows) -> torch.Tensor:
        """The native decode kernel's q.k scores over the pool (see paged_attention.cpp)."""
        return self.kernels.paged_scores(q, self.keys, block_tables, lengths, scale, row_of_slot, visibility, block_rows)

    def paged_softmax_values(self, scores, block_tables, lengths, row_of_slot, block_rows, num_rows) -> torch.Tensor:
        """The native decode kernel's softmax-weighted sum of values (see paged_attention.cpp)."""
        return self.kernels.paged_softmax_values(scores, self.values, block_tables, lengths, row_of_slot, block_rows, num_rows)

    @property
    def bytes_per_block(self) -> int:
        return self.block_bytes(self.block_size, self.head_dim, self.dtype, self.key_min is not None)

    @property
    def bytes_per_entry(self) -> float:
        """A block's bytes per entry it holds."""
        return self.bytes_per_block / self.block_size

    @property
    def bytes_capacity(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def allocated_bytes(self, used_blocks: int, peak: bool = False) -> int:
        """Bytes held by `used_blocks` handed-out blocks (`peak`: the most they have held)."""
        return used_blocks * self.bytes_per_block

    @staticmethod
    def block_bytes(block_size: int, head_dim: int, dtype: torch.dtype, key_bounds: bool = False) -> int:
        """One block's entries' keys and values, and its key bounds when the pool keeps them."""
        item = torch.empty((), dtype=dtype).element_size()
        return (block_size + key_bounds) * 2 * head_dim * item
